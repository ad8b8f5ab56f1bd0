"""Admitting another authority's block into our replica (pure).

The gossip shell has already checked the header against its place in the
chain (network, authority signature, height, prev hash).  Here the body is
checked against the header, and then every entry is checked, as strictly as
our own ingest would check it:

* the Merkle root and the entry count;
* every entry's signature — done beforehand in the verifier processes and
  passed in as ``checked`` (:func:`meshhealth.ingest.verify.check_entries`;
  a valid reading comes back as its fields, so it is not decoded twice);
* enrolments, applied in entry order, and equivocation proofs (the node
  they accuse is marked faulty);
* readings from enrolled devices, on a known key chain and epoch; a reading
  of a device its patient removed (D1), timed at or after the removal, is
  pruned (its leaf hash kept, counted as ``removed_device``), not served;
* every *link*: the block must link only to blocks we already hold, with
  matching hashes.  Links are how causality travels.  A reading's
  enrolment may sit in a third chain, and it always sits at or below
  something the producer linked, so applying blocks after their links
  keeps the access state sound in any arrival order.

A reading whose (device, seq) we already hold is valid in a second chain
too: the device sent it to two nodes, for instance after a failover on a
shared subscription.  It is stored, but not indexed twice.

Nothing is changed until the whole block has passed.  Then the commit is
returned, and the access state and seq marks are updated in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import Block, verify_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.crypto.hashing import h
from meshhealth.errors import InvalidBlock, Rejected, RemoteError
from meshhealth.ingest import verify
from meshhealth.ingest.batcher import Batcher
from meshhealth.ingest.commit import Commit, IndexedReading
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.wire import (
    BlockHeader,
    Control,
    EquivocationProof,
    Erase,
    Reading,
    decode_entry,
)
from meshhealth.wire.types import ACCESS_LOGS, CONTROL_CLASSES


class MissingLinks(Exception):
    """The block links to blocks we do not hold yet: fetch them, then retry."""

    def __init__(self, missing: list[tuple[bytes, int]]):
        super().__init__(f"{len(missing)} linked block(s) missing")
        self.missing = missing


def _removed_since(a: AccessState, overlay: AccessState, r: Reading) -> int | None:
    """When ``r``'s device was removed for its patient, if that is at or before ``r``."""
    times = [
        t
        for t in (a.removed_at(r.device, r.patient), overlay.removed_at(r.device, r.patient))
        if t is not None and r.t_last_ms >= t
    ]
    return min(times) if times else None


def admit_remote(
    b: Batcher,
    header: BlockHeader,
    entries: Sequence[bytes],
    checked: Sequence[verify.Result],
    *,
    block_hash_at: Callable[[bytes, int], bytes | None],
    now_ms: int,
) -> Commit:
    node, height = header.node, header.height

    def bad(msg: str) -> InvalidBlock:
        return InvalidBlock(msg, node=node, height=height)

    verify_body(header, entries)
    missing = []
    for link in header.links:
        if link.node == node:
            raise bad("a block links its own chain")
        have = block_hash_at(link.node, link.height)
        if have is None:
            missing.append((link.node, link.height))
        elif have != link.hash:
            raise bad(f"link to {link.node.hex()[:8]}#{link.height} disagrees with our replica")
    if missing:
        raise MissingLinks(missing)
    overlay = AccessState()
    new_txs: list[Control] = []
    faults: dict[bytes, int] = {}
    adds: dict[bytes, set[int]] = {}
    index: list[IndexedReading] = []
    txs: list[tuple[bytes, int]] = []
    skew = b.limits.max_future_skew_ms
    audit: list[tuple[bytes, int, bytes, int]] = []
    prune: set[int] = set()
    for i, (raw, res) in enumerate(zip(entries, checked, strict=True)):
        if res[0] is not None:
            raise bad(f"entry {i}: {res[0]}")
        if is_pruned(raw):
            continue  # erased where it came from: its leaf hash is all there is
        try:
            e = verify.rebuild(res) if len(res) > 1 else decode_entry(raw)
        except RemoteError as exc:
            raise bad(f"entry {i}: {exc}") from exc
        if isinstance(e, CONTROL_CLASSES):
            overlay.apply(e)
            new_txs.append(e)
            txs.append((h(raw), i))
            continue
        if isinstance(e, ACCESS_LOGS):
            if e.node != node or e.network != b.network:
                raise bad(f"entry {i}: an access log signed by another node")
            audit.append((e.patient, e.ts_ms, e.request, i))
            continue
        if isinstance(e, EquivocationProof):
            a, _ = e.headers()  # signatures were checked with the other entries
            if a.network != b.network:
                raise bad(f"entry {i}: equivocation proof of another network")
            faults.setdefault(a.node, a.height)
            txs.append((h(raw), i))
            continue
        assert isinstance(e, Reading)
        if e.t_last_ms > header.ts_ms + skew:
            raise bad(f"entry {i}: reading from after its block")
        try:
            b.access.check_reading(e)
        except Rejected:
            try:
                overlay.check_reading(e)
            except Rejected as exc:
                raise bad(f"entry {i}: {exc.reason}") from exc
        if max(b.access.erased.get(e.patient, -1), overlay.erased.get(e.patient, -1)) >= e.t_ms:
            prune.add(i)  # its patient erased it: keep only its leaf hash
        elif _removed_since(b.access, overlay, e) is not None:
            # its patient removed the device (a stolen key) before this reading's time; the
            # producer sealed it before it saw the removal, so the block stays valid, but
            # we keep only its leaf hash and serve it to no one
            prune.add(i)
            b.reject("removed_device")
        mark = b.marks.get(e.device)
        seen = adds.setdefault(e.device, set())
        if (mark is not None and mark.has(e.seq)) or e.seq in seen or b.is_pending(e.device, e.seq):
            # held already, via another chain: valid, indexed (so an erasure finds this
            # copy too) but not counted twice
            index.append(IndexedReading(i, e.patient, e.stream, e.t_ms, counted=False))
            continue
        seen.add(e.seq)
        index.append(IndexedReading(i, e.patient, e.stream, e.t_ms))
    # the block is valid: now change state
    for tx in new_txs:
        if b.access.apply(tx) and isinstance(tx, Erase):
            b.erasures_due.append((tx.patient, tx.ts_ms))
    for accused, at in faults.items():
        b.faulty.setdefault(accused, at)
    touched: dict[bytes, SeqMark] = {}
    for device, seqs in adds.items():
        if not seqs:
            continue
        mark = b.marks.setdefault(device, SeqMark())
        for s in seqs:
            mark.add(s)
        touched[device] = mark.copy()
    block = Block(header, tuple(entries))
    b.note_remote_head(node, height, block.hash, carries_entries=bool(entries), now_ms=now_ms)
    return Commit(block, tuple(index), touched, tuple(txs), tuple(audit), frozenset(prune))
