"""The pure heart of ingest: admit entries, batch them, seal blocks.

No I/O here.  The shell feeds it verified readings and control transactions
with the current time, asks ``due(now)`` and, when due, calls ``seal(now)``
to get a :class:`Commit` for the store.  Policy checks that need state live
here; checks that need only the bytes (size, decoding, signature) run
before, in the verifier processes.

Sequence marks are updated when a block is *sealed*, not when it is
committed, so a reading that arrives while its twin is being written is
still recognised as a duplicate.  A failed commit is fatal for the node
process (restart rebuilds everything from LMDB), which keeps this simple.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import nacl.signing

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import build_block
from meshhealth.crypto.hashing import h
from meshhealth.errors import Rejected, RemoteError
from meshhealth.ingest.commit import Commit, IndexedReading
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.wire import (
    AccessLog,
    AccessLogV2,
    Control,
    EnrollDevice,
    EquivocationProof,
    Erase,
    Link,
    Reading,
    ReceiptV2,
)


@dataclass
class BatchLimits:
    interval_ms: int = 1000
    max_entries: int = 4_096
    max_bytes: int = 8 * 1024 * 1024
    max_future_skew_ms: int = 30_000


@dataclass
class Batcher:
    key: nacl.signing.SigningKey
    network: bytes
    limits: BatchLimits
    access: AccessState
    marks: dict[bytes, SeqMark]
    height: int = -1  # height of the last sealed block
    prev: bytes = b""  # hash of the last sealed block (network id before the first)
    rejects: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    # the batch being built
    _entries: list[bytes] = field(default_factory=list)
    _readings: list[IndexedReading] = field(default_factory=list)
    _txs: list[tuple[bytes, int]] = field(default_factory=list)
    _seqs: dict[bytes, set[int]] = field(default_factory=dict)  # per device, in this batch
    _bytes: int = 0
    _started_ms: int | None = None
    # devices that re-sent committed readings: they need a fresh receipt
    want_receipt: set[bytes] = field(default_factory=set)
    # other chains' heads that advanced since our last block: the next block links them
    _links_due: dict[bytes, Link] = field(default_factory=dict)
    # authorities proven to have equivocated -> the height of the first proof
    faulty: dict[bytes, int] = field(default_factory=dict)
    # erasures applied since the shell last pruned the store: (patient, up to ts_ms)
    erasures_due: list[tuple[bytes, int]] = field(default_factory=list)
    _audit: list[tuple[bytes, int, bytes, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prev:
            self.prev = self.network
        self.me = bytes(self.key.verify_key)

    # --- admission --------------------------------------------------------

    def is_pending(self, device: bytes, seq: int) -> bool:
        return seq in self._seqs.get(device, ())

    def note_remote_head(
        self, node: bytes, height: int, block_hash: bytes, *, carries_entries: bool, now_ms: int
    ) -> None:
        """Another chain advanced in our replica: our next block links its new head.

        A block with entries needs our link to become confirmed, so it makes
        our next block due even if we ingest nothing; a link-only block does
        not (else idle nodes would answer each other's links forever).
        Our own chain, fetched back from peers after a restore or a wiped
        data dir, moves our head instead: the next block we seal follows it.
        """
        if node == self.me:
            if height > self.height:
                self.height, self.prev = height, block_hash
            return
        self._links_due[node] = Link(node, height, block_hash)
        if carries_entries and self._started_ms is None:
            self._started_ms = now_ms

    def reject(self, reason: str) -> None:
        self.rejects[reason] += 1

    def admit_reading(
        self, raw: bytes, r: Reading, now_ms: int, *, topic_device: bytes | None = None
    ) -> None:
        """Add a signature-checked reading to the batch or raise :class:`Rejected`."""
        if topic_device is not None and topic_device != r.device:
            raise Rejected("topic_mismatch", "reading published on another device's topic")
        if r.t_last_ms > now_ms + self.limits.max_future_skew_ms:
            raise Rejected("future_timestamp", f"{r.t_last_ms - now_ms} ms ahead")
        self.access.check_reading(r, ingest=True)
        mark = self.marks.get(r.device)
        if mark is None:
            mark = self.marks[r.device] = SeqMark()
        pending = self._seqs.setdefault(r.device, set())
        if mark.has(r.seq) or r.seq in pending:
            self.want_receipt.add(r.device)
            raise Rejected("duplicate", f"seq {r.seq} already stored")
        if not mark.room_for(r.seq):
            raise Rejected("seq_window", "too many readings above a gap; re-send the gap first")
        pending.add(r.seq)
        self._add(raw, now_ms)
        self._readings.append(IndexedReading(len(self._entries) - 1, r.patient, r.stream, r.t_ms))

    def admit_tx(self, raw: bytes, tx: Control, now_ms: int) -> bytes:
        """Verify and add a control transaction; returns its hash."""
        try:
            tx.verify()
        except RemoteError as exc:
            raise Rejected("bad_signature", str(exc)) from exc
        if tx.ts_ms > now_ms + self.limits.max_future_skew_ms:
            raise Rejected("future_timestamp", "transaction from the future")
        if isinstance(tx, EnrollDevice) and tx.device == tx.patient:
            raise Rejected("bad_tx", "a patient cannot enrol itself as a device")
        tid = h(raw)
        if not self.access.apply(tx):
            raise Rejected("duplicate_tx", tid.hex()[:16])
        if isinstance(tx, Erase):
            self.erasures_due.append((tx.patient, tx.ts_ms))
        self._add(raw, now_ms)
        self._txs.append((tid, len(self._entries) - 1))
        return tid

    def admit_proof(self, proof: EquivocationProof, now_ms: int) -> bool:
        """Put a checked equivocation proof in the batch; False if its node is known faulty."""
        a, _ = proof.headers()
        if a.network != self.network:
            raise Rejected("bad_proof", "equivocation proof of another network")
        if a.node in self.faulty:
            return False
        raw = proof.encode()
        self.faulty[a.node] = a.height
        self._add(raw, now_ms)
        self._txs.append((h(raw), len(self._entries) - 1))
        return True

    def admit_log(self, log: AccessLog | AccessLogV2, now_ms: int) -> None:
        """Put an access log this node signed in its next block (the patient's audit trail)."""
        raw = log.encode()
        self._add(raw, now_ms)
        self._audit.append((log.patient, log.ts_ms, log.request, len(self._entries) - 1))

    def _add(self, raw: bytes, now_ms: int) -> None:
        if self._started_ms is None:
            self._started_ms = now_ms
        self._entries.append(raw)
        self._bytes += len(raw) + 3
        self.accepted += 1

    # --- sealing ----------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._entries)

    def full(self) -> bool:
        return (
            len(self._entries) >= self.limits.max_entries
            or self._bytes + 4096 > self.limits.max_bytes
        )

    def due(self, now_ms: int) -> bool:
        if self._started_ms is None:
            return False
        assert self._started_ms is not None
        return self.full() or now_ms - self._started_ms >= self.limits.interval_ms

    def deadline_ms(self) -> int | None:
        """When the current batch becomes due by time alone."""
        return None if self._started_ms is None else self._started_ms + self.limits.interval_ms

    def seal(self, now_ms: int) -> Commit:
        touched: dict[bytes, SeqMark] = {}
        for device, seqs in self._seqs.items():
            if not seqs:
                continue
            mark = self.marks[device]
            for s in seqs:
                mark.add(s)
            touched[device] = mark.copy()
        block = build_block(
            self.key,
            network=self.network,
            height=self.height + 1,
            prev=self.prev,
            ts_ms=now_ms,
            entries=self._entries,
            links=tuple(self._links_due.values()),
        )
        self._links_due = {}
        # readings batched before their patient's erasure reached us (from a peer's block
        # while they waited here): sealed as received, stored as leaf hashes only
        prune = frozenset(
            r.index for r in self._readings if self.access.erased.get(r.patient, -1) >= r.t_ms
        )
        commit = Commit(
            block, tuple(self._readings), touched, tuple(self._txs), tuple(self._audit), prune
        )
        self.height, self.prev = block.header.height, block.hash
        self._entries, self._readings, self._txs, self._seqs = [], [], [], {}
        self._audit = []
        self._bytes, self._started_ms = 0, None
        return commit


def make_receipt(
    key: nacl.signing.SigningKey,
    network: bytes,
    device: bytes,
    mark: SeqMark,
    block: tuple[bytes, int, bytes],
    now_ms: int,
) -> ReceiptV2:
    """An A2 receipt: ``device``'s readings up to ``mark.contiguous`` are stored, and
    ``block`` = (chain, height, hash) holds one of them (see :class:`ReceiptV2`)."""
    chain, height, block_hash = block
    return ReceiptV2.create(
        key,
        network=network,
        device=device,
        seq=mark.contiguous,
        chain=chain,
        height=height,
        hash=block_hash,
        ts_ms=now_ms,
    )
