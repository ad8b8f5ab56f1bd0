"""One wearable: its identity, its stream keys, and how it turns samples into readings.

A device holds, per stream, a forward-only ratchet cursor unsealed from the
patient's enrolment; it can encrypt for its current epoch and any later
one, never for an earlier one.  Samples are split at key-epoch boundaries
(and at ``max_samples``) so every reading is encrypted under one message
key and stays under the wire's size bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from device_agents.sensors import STREAMS
from meshhealth.crypto.keys import Identity
from meshhealth.sharing.keychain import ChainCursor, encode_samples, encrypt, unseal
from meshhealth.wire import EnrollDevice, Reading, Rechain
from meshhealth.wire.types import MAX_SPAN_MS

Sample = tuple[int, tuple[float, ...]]
MAX_SAMPLES = 200  # keeps a reading well under 4 KiB


@dataclass
class Device:
    identity: Identity
    patient: bytes
    cursors: dict[str, ChainCursor] = field(default_factory=dict)
    next_seq: int = 1
    # a stream's chain before its latest rechain: samples older than the new chain's start
    previous: dict[str, ChainCursor] = field(default_factory=dict)
    # set when a retired chain's key is forgotten: the agent then compacts the outbox, whose
    # freed pages still hold the states written with it
    forgot_retired: bool = False

    @property
    def id(self) -> bytes:
        return self.identity.public

    def accept_enrollment(self, tx: EnrollDevice) -> None:
        """Unseal this device's stream keys from the patient's enrolment."""
        if tx.device != self.id or tx.patient != self.patient:
            raise ValueError("enrolment is for another device or patient")
        tx.verify()
        for sk in tx.streams:
            key = unseal(sk.sealed, self.identity.box_private)
            self.cursors[sk.stream] = ChainCursor(sk.chain_id, sk.epoch_ms, sk.key_epoch, key)

    def accept_rechain(self, tx: Rechain) -> bool:
        """Switch a stream to the patient's new key chain; False if this rechain is not for
        this device or is the chain it already uses.  Give it only the stream's *latest*
        rechain (see :func:`device_agents.keys.follow_rechains`)."""
        current = self.cursors.get(tx.stream)
        if tx.patient != self.patient or current is None or current.chain_id == tx.chain_id:
            return False
        mine = [k for k in tx.devices if k.to == self.id]
        if not mine:
            return False
        tx.verify()
        key = unseal(mine[0].sealed, self.identity.box_private)
        self.previous[tx.stream] = self.cursors[tx.stream]
        self.cursors[tx.stream] = ChainCursor(tx.chain_id, tx.epoch_ms, mine[0].epoch, key)
        return True

    def readings(
        self, stream: str, samples: Sequence[Sample], *, max_samples: int = MAX_SAMPLES
    ) -> list[tuple[int, bytes]]:
        """Encrypt and sign ``samples`` (time-ordered) into readings; returns (seq, bytes)."""
        cur = self.cursors[stream]
        old = self.previous.get(stream)
        start = cur.epoch * cur.epoch_ms
        if old is not None and samples and samples[0][0] >= start:
            del self.previous[stream]  # switched for good: forget the retired chain's key
            self.forgot_retired = True
            old = None
        if old is not None and samples and samples[0][0] < start:  # from before the rechain
            before = [s for s in samples if s[0] < start]
            return self._encrypt(stream, old, before, max_samples) + self._encrypt(
                stream, cur, samples[len(before) :], max_samples
            )
        return self._encrypt(stream, cur, samples, max_samples)

    def _encrypt(
        self, stream: str, cur: ChainCursor, samples: Sequence[Sample], max_samples: int
    ) -> list[tuple[int, bytes]]:
        spec = STREAMS[stream]
        out: list[tuple[int, bytes]] = []
        group: list[Sample] = []

        def flush() -> None:
            if group:
                out.append(self._seal(stream, spec.unit, spec.decimals, cur, group))
                group.clear()

        for s in samples:
            if group and (
                len(group) >= max_samples
                or s[0] // cur.epoch_ms != group[0][0] // cur.epoch_ms
                or s[0] - group[0][0] > MAX_SPAN_MS
            ):
                flush()
            group.append(s)
        flush()
        return out

    def _seal(
        self, stream: str, unit: str, decimals: int, cur: ChainCursor, group: list[Sample]
    ) -> tuple[int, bytes]:
        t0 = group[0][0]
        epoch = t0 // cur.epoch_ms
        seq = self.next_seq
        self.next_seq += 1
        header = Reading(
            self.id,
            self.patient,
            stream,
            seq,
            t0,
            group[-1][0] - t0,
            cur.chain_id,
            epoch,
            b"\0" * 24,
            b"",
            b"\0" * 64,
        )
        nonce, ct = encrypt(
            cur.message_key(epoch),
            encode_samples(unit, decimals, t0, group),
            header.associated_data(),
        )
        r = Reading.create(
            self.identity.signing,
            patient=self.patient,
            stream=stream,
            seq=seq,
            t_ms=t0,
            span_ms=header.span_ms,
            chain_id=cur.chain_id,
            epoch=epoch,
            nonce=nonce,
            ciphertext=ct,
        )
        return seq, r.encode()

    # --- persistence (kept in the outbox) ------------------------------------

    def state(self) -> list[Any]:
        return [
            bytes(self.identity.signing),
            self.patient,
            self.next_seq,
            [[s, c.chain_id, c.epoch_ms, c.epoch, c.key] for s, c in self.cursors.items()],
        ]

    @classmethod
    def from_state(cls, state: list[Any]) -> Device:
        seed, patient, next_seq, cursors = state
        return cls(
            Identity("device", nacl.signing.SigningKey(seed)),
            patient,
            {s: ChainCursor(cid, ems, ep, k) for s, cid, ems, ep, k in cursors},
            next_seq,
        )
