"""Grants, both sides: the patient seals keys to a grantee, the grantee opens them.

A **bounded** grant seals the message keys of exactly the epochs its window
touches, so the grantee can decrypt that window and nothing else, whichever
node serves it the ciphertext (a key for an epoch is all or nothing, so the
window is rounded out to whole epochs). An **open** grant seals the ratchet
key at its start; the grantee ratchets forward on its own, until the
patient moves the stream to a new key chain.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.public

from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity, box_public_of
from meshhealth.sharing.keychain import (
    ChainCursor,
    KeyChain,
    decode_samples,
    decrypt,
    epoch_of,
    seal,
)
from meshhealth.sharing.keychain import message_key as derive_message_key
from meshhealth.wire import Grant, GrantStream, Reading, Rechain, SealedKey
from meshhealth.wire.types import MAX_GRANT, OPEN

KEY_LEN = 32
RAW = nacl.encoding.RawEncoder
_TOO_LONG = (
    f"a bounded grant carries one key per epoch and stream, at most {MAX_GRANT:,} bytes in all: "
    "grant a shorter window, fewer streams, or an open grant"
)


def make_grant(
    patient: Identity,
    chains: dict[str, KeyChain],
    grantee: bytes,
    *,
    streams: Iterable[str],
    from_ms: int,
    until_ms: int | None,
    now_ms: int,
    pseudonymous: bool = False,
) -> Grant:
    """The patient's signed grant; ``until_ms=None`` makes it open."""
    box = box_public_of(grantee)
    out = []
    for name in sorted(set(streams)):
        c = chains.get(name)
        if c is None:
            raise ValueError(f"the patient has no key chain for stream {name!r}")
        first = max(epoch_of(from_ms, c.epoch_ms), c.start_epoch)
        if until_ms is None:
            last, keys = OPEN, c.key(first)
        else:
            last = epoch_of(until_ms, c.epoch_ms)
            if last < first:
                raise ValueError(f"stream {name!r}: the window ends before its key chain starts")
            if (last - first + 1) * KEY_LEN > MAX_GRANT:
                raise ValueError(_TOO_LONG)
            cur = c.cursor(first)  # walk the ratchet once, forward
            keys = b"".join(cur.message_key(e) for e in range(first, last + 1))
        out.append(
            GrantStream(name, c.chain_id, c.start_epoch, c.epoch_ms, first, last, seal(keys, box))
        )
    size = sum(len(s.sealed) + 64 for s in out)
    if size > MAX_GRANT - 1024:
        raise ValueError(_TOO_LONG)
    return Grant.create(
        patient.signing,
        grantee=grantee,
        ts_ms=now_ms,
        from_ms=from_ms,
        until_ms=until_ms or 0,
        pseudonymous=int(pseudonymous),
        streams=tuple(out),
    )


@dataclass
class GrantKeys:
    """What a grantee can decrypt under one grant (opened with its own key)."""

    grant: Grant
    id: bytes
    bounded: dict[tuple[bytes, int], bytes] = field(default_factory=dict)  # (chain, epoch) -> M
    cursors: dict[bytes, ChainCursor] = field(default_factory=dict)  # chain -> open cursor
    # keys the pseudonyms of an export under this grant: from the grantee's own secret key
    # and the grant's sealed keys, so only the grantee can compute them (never the grant id
    # or another public value, which anyone holding the chain could try)
    pseudonym_key: bytes = b""

    @classmethod
    def open(cls, grant: Grant, grantee: Identity) -> GrantKeys:
        if grant.grantee != grantee.public:
            raise ValueError("this grant is for someone else")
        keys = cls(grant, h(grant.encode()))
        box = nacl.public.SealedBox(grantee.box_private)
        secret = nacl.hash.blake2b(
            bytes(grantee.box_private), digest_size=32, person=b"mh/pseud-seed", encoder=RAW
        )
        for s in grant.streams:
            try:
                plain = box.decrypt(s.sealed)
            except nacl.exceptions.CryptoError as exc:
                raise ValueError(f"stream {s.stream}: the sealed keys do not open") from exc
            secret = nacl.hash.blake2b(
                plain, digest_size=32, key=secret, person=b"mh/pseud-seed", encoder=RAW
            )
            if s.open:
                keys.cursors[s.chain_id] = ChainCursor(s.chain_id, s.epoch_ms, s.first_epoch, plain)
            else:
                for i, e in enumerate(range(s.first_epoch, s.last_epoch + 1)):
                    keys.bounded[(s.chain_id, e)] = plain[i * KEY_LEN : (i + 1) * KEY_LEN]
        keys.pseudonym_key = nacl.hash.blake2b(
            keys.id, digest_size=32, key=secret, person=b"mh/pseud-key", encoder=RAW
        )
        return keys

    def follow(self, tx: Rechain, grantee: Identity) -> bool:
        """Take up the new key chain a rechain sealed to this grant; False if it sealed
        none to it (the grant was revoked, or it is not for this stream)."""
        for k in tx.grants:
            if k.to == self.id and tx.patient == self.grant.patient:
                key = nacl.public.SealedBox(grantee.box_private).decrypt(k.sealed)
                self.cursors[tx.chain_id] = ChainCursor(tx.chain_id, tx.epoch_ms, k.epoch, key)
                return True
        return False

    def message_key(self, chain_id: bytes, epoch: int) -> bytes | None:
        """M(epoch) of that key chain, if this grant reaches it; None if it does not."""
        key = self.bounded.get((chain_id, epoch))
        if key is not None:
            return key
        cur = self.cursors.get(chain_id)
        if cur is None or epoch < cur.epoch:
            return None
        return derive_message_key(
            ChainCursor(chain_id, cur.epoch_ms, cur.epoch, cur.key).key_at(epoch)
        )

    def decrypt(self, r: Reading) -> tuple[str, list[tuple[int, tuple[float, ...]]]] | None:
        """The reading's (unit, samples), or None if this grant holds no key for it."""
        key = self.message_key(r.chain_id, r.epoch)
        if key is None:
            return None
        return decode_samples(decrypt(key, r.nonce, r.ciphertext, r.associated_data()), r.t_ms)


def make_rechain(
    patient: Identity,
    old: KeyChain,
    devices: Iterable[bytes],
    open_grants: Iterable[tuple[bytes, Grant]],
    *,
    now_ms: int,
    switch_ms: int,
) -> tuple[Rechain, KeyChain]:
    """Move ``old``'s stream to a fresh chain from ``switch_ms`` on: its key sealed to every
    device and to the grantee of every open grant given (a revoked one must not be among
    them).  Returns the signed transaction and the new chain, for the patient's key file."""
    start = epoch_of(switch_ms, old.epoch_ms)
    new = KeyChain.new(old.stream, start, old.epoch_ms)
    to_devices = tuple(
        SealedKey(d, start, seal(new.key(start), box_public_of(d))) for d in sorted(set(devices))
    )
    to_grants = []
    for gid, g in open_grants:
        if not g.open or all(s.stream != old.stream for s in g.streams):
            continue
        first = max(start, epoch_of(g.from_ms, old.epoch_ms))
        to_grants.append(SealedKey(gid, first, seal(new.key(first), box_public_of(g.grantee))))
    tx = Rechain.create(
        patient.signing,
        ts_ms=switch_ms,
        stream=old.stream,
        chain_id=new.chain_id,
        start_epoch=start,
        epoch_ms=new.epoch_ms,
        devices=to_devices,
        grants=tuple(to_grants),
    )
    if tx.ts_ms < now_ms:
        raise ValueError("a rechain cannot take effect in the past")
    return tx, new


__all__ = ["GrantKeys", "make_grant", "make_rechain"]


def grant_doc(gid: bytes, g: Grant) -> dict[str, Any]:
    """A grant's own fields as JSON: the node's grant lists and the local viewers' pages
    each add what they know beside it (revocation, the signed transaction, a state)."""
    return {
        "id": gid.hex(),
        "patient": g.patient.hex(),
        "grantee": g.grantee.hex(),
        "streams": [s.stream for s in g.streams],
        "from_ms": g.from_ms,
        "until_ms": None if g.open else g.until_ms,
        "open": g.open,
        "pseudonymous": bool(g.pseudonymous),
        "ts_ms": g.ts_ms,
    }
