"""Admitting another authority's block into our replica (pure).

The gossip shell has already checked the header against its place in the
chain (network, authority signature, height, prev hash).  Here the body is
checked against the header, and then every entry is checked, as strictly as
our own ingest would check it:

* the producer's clock and ours: the header's time, and every reading's,
  transaction's and access log's time, may be at most ``max_future_skew_ms``
  past *our* clock (and past the header's), the bound local ingest applies;
  a reading's hour and the block's height must fit the readings index;
* the Merkle root and the entry count;
* every entry's signature — done beforehand in the verifier processes and
  passed in as ``checked`` (:func:`meshhealth.ingest.verify.check_entries`;
  a valid reading comes back as its fields, so it is not decoded twice);
* enrolments, applied in entry order, and equivocation proofs (the node
  they accuse is marked faulty);
* readings from enrolled devices, on a known key chain and epoch, and no
  more seqs above a device's gap than a stored seq mark may hold
  (:data:`~meshhealth.ingest.seqmarks.MAX_ABOVE_STORED`); a reading
  of a device its patient removed (D1), timed at or after the removal, or in
  a block sealed ``REMOVAL_GRACE_MS`` or more after it (whatever the reading's
  time: a stolen key backdates), is pruned (its leaf hash kept, counted as
  ``removed_device``), not served;
* access logs signed by the producer; no L1 log in a block that holds an
  L2 one (an L1 carries no signed request, so any request bytes);
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

import struct
from collections.abc import Callable, Sequence

from meshhealth.chain.acl import AccessState, removed_reading
from meshhealth.chain.block import MAX_BLOCK_ENTRIES, Block, verify_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.crypto.hashing import h
from meshhealth.errors import InvalidBlock, Rejected, RemoteError
from meshhealth.ingest import verify
from meshhealth.ingest.batcher import Batcher, body_size
from meshhealth.ingest.commit import MAX_HEIGHT, Commit, IndexedReading, index_hour_ok
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.wire import (
    AccessLog,
    BlockHeader,
    Control,
    EnrollDevice,
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


class RefusedBlock(InvalidBlock):
    """A peer's block that admission refuses; ``reason`` labels the reject counter
    (``peer_block_<reason>`` in the ingest statistics): ``future``, ``index_range``,
    ``size``, ``link``, ``seq_gap``, ``log_version`` or ``entry``."""

    def __init__(self, message: str, reason: str, *, node: bytes, height: int):
        super().__init__(message, node=node, height=height)
        self.reason = reason


class ChainOverBudget(RefusedBlock):
    """A peer's block that would take its chain past ``chain_bytes_per_hour`` (reason
    ``rate``).  The block may well be valid: the peer that forwarded it is not at fault,
    and the block is pulled again once the chain's next hour opens."""


HOUR_MS = 3_600_000


def _removed_since(a: AccessState, overlay: AccessState, r: Reading, block_ts_ms: int) -> bool:
    """Whether ``r``'s device was removed for its patient before ``r``'s time, or long
    enough before the block was sealed that its producer should have known
    (:func:`~meshhealth.chain.acl.removed_reading`)."""
    return any(
        removed_reading(t, r, block_ts_ms)
        for t in (a.removed_at(r.device, r.patient), overlay.removed_at(r.device, r.patient))
    )


def admit_remote(
    b: Batcher,
    header: BlockHeader,
    entries: Sequence[bytes],
    checked: Sequence[verify.Result],
    *,
    block_hash_at: Callable[[bytes, int], bytes | None],
    now_ms: int,
) -> Commit:
    """Check a peer's block as strictly as our own ingest would; the commit, or
    :class:`InvalidBlock` (or :class:`MissingLinks`).  Nothing a peer sent escapes as
    anything else: a value error on its data is an invalid block too."""
    try:
        return _admit_remote(
            b, header, entries, checked, block_hash_at=block_hash_at, now_ms=now_ms
        )
    except RefusedBlock as exc:
        b.reject(f"peer_block_{exc.reason}")
        raise
    except InvalidBlock:
        b.reject("peer_block_body")  # count or Merkle root
        raise
    except (ValueError, OverflowError, TypeError, struct.error) as exc:
        b.reject("peer_block_data")
        raise InvalidBlock(
            f"unusable block data: {type(exc).__name__}: {exc}",
            node=header.node,
            height=header.height,
        ) from exc


def _admit_remote(
    b: Batcher,
    header: BlockHeader,
    entries: Sequence[bytes],
    checked: Sequence[verify.Result],
    *,
    block_hash_at: Callable[[bytes, int], bytes | None],
    now_ms: int,
) -> Commit:
    node, height = header.node, header.height

    def bad(msg: str, reason: str = "entry") -> RefusedBlock:
        return RefusedBlock(msg, reason, node=node, height=height)

    skew = b.limits.max_future_skew_ms
    # times are bounded by OUR clock, as local ingest bounds them, not only by the
    # producer's header (which a bad authority sets as it likes)
    if header.ts_ms > now_ms + skew:
        raise bad(f"block from {header.ts_ms - now_ms} ms in the future", "future")
    if height > MAX_HEIGHT:
        raise bad("height beyond the index's range", "index_range")
    if len(entries) > MAX_BLOCK_ENTRIES:
        raise bad(f"{len(entries)} entries exceed the block bound", "size")
    latest_ms = min(header.ts_ms, now_ms) + skew  # no entry's time may be later
    verify_body(header, entries)
    missing = []
    linked: set[bytes] = set()
    for link in header.links:
        if link.node == node:
            raise bad("a block links its own chain", "link")
        if link.node in linked:
            raise bad("a block links one chain twice", "link")
        linked.add(link.node)
        if b.authorities and link.node not in b.authorities:
            raise bad(f"a link to {link.node.hex()[:8]}, which is no authority", "link")
        have = block_hash_at(link.node, link.height)
        if have is None:
            missing.append((link.node, link.height))
        elif have != link.hash:
            where = f"{link.node.hex()[:8]}#{link.height}"
            raise bad(f"link to {where} disagrees with our replica", "link")
    if missing:
        raise MissingLinks(missing)
    overlay = AccessState()
    new_txs: list[Control] = []
    faults: dict[bytes, int] = {}
    adds: dict[bytes, set[int]] = {}
    index: list[IndexedReading] = []
    txs: list[tuple[bytes, int]] = []
    audit: list[tuple[bytes, int, bytes, int]] = []
    prune: set[int] = set()
    l1: list[int] = []  # the block's L1 access logs (no signed request)
    l2 = False  # whether it holds an L2 one
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
            if e.ts_ms > latest_ms:
                raise bad(f"entry {i}: a transaction from the future", "future")
            if isinstance(e, EnrollDevice) and e.device == e.patient:
                raise bad(f"entry {i}: a patient enrolled as its own device")
            overlay.apply(e)
            new_txs.append(e)
            txs.append((h(raw), i))
            continue
        if isinstance(e, ACCESS_LOGS):
            if e.node != node or e.network != b.network:
                raise bad(f"entry {i}: an access log signed by another node")
            if e.ts_ms > latest_ms:
                raise bad(f"entry {i}: an access log from the future", "future")
            if isinstance(e, AccessLog):
                l1.append(i)
            else:
                l2 = True
            audit.append((e.patient, e.ts_ms, e.request, i))
            continue
        if isinstance(e, EquivocationProof):
            a, _ = e.headers()  # signatures were checked with the other entries
            if a.network != b.network:
                raise bad(f"entry {i}: equivocation proof of another network")
            if b.authorities and a.node not in b.authorities:
                raise bad(f"entry {i}: equivocation proof against no authority")
            faults.setdefault(a.node, a.height)
            txs.append((h(raw), i))
            continue
        assert isinstance(e, Reading)
        if e.t_last_ms > latest_ms:
            raise bad(f"entry {i}: a reading from after its block or our clock", "future")
        if not index_hour_ok(e.t_ms):
            raise bad(f"entry {i}: a reading time beyond the index's range", "index_range")
        try:
            b.access.check_reading(e)
        except Rejected:
            try:
                overlay.check_reading(e)
            except Rejected as exc:
                raise bad(f"entry {i}: {exc.reason}") from exc
        if max(b.access.erased.get(e.patient, -1), overlay.erased.get(e.patient, -1)) >= e.t_ms:
            prune.add(i)  # its patient erased it: keep only its leaf hash
        elif _removed_since(b.access, overlay, e, header.ts_ms):
            # its patient removed the device (a stolen key) before this reading's time, or
            # well before the block was sealed (a backdated reading); the producer may not
            # have seen the removal yet, so the block stays valid, but we keep only its
            # leaf hash and serve it to no one
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
    if l1 and l2:
        # a producer that logs L2 (the reader's signed request) has no honest reason to
        # log an L1 in the same block: an L1 carries any request bytes it likes
        raise bad(f"entry {l1[0]}: an L1 access log in a block of L2 ones", "log_version")
    # the same bound on a device's out-of-order seqs as local ingest, with room for
    # honest nodes that took in one device's readings concurrently (seqmarks.py).  It
    # counts the device's seqs still waiting in our own batches too: they join the
    # mark when we seal, and a stored mark must never pass the bound (a seal that
    # cannot be committed would stop the node), so the peer's block is refused here.
    # Each pending seq adds at most one to the stored gap set, whatever order batches are
    # sealed in, except the one right after the mark's contiguous part (it only shrinks the
    # set); so mark + this block + pending, counted so, bounds every mark we will store.
    new_marks: dict[bytes, SeqMark] = {}  # each device's mark once this block is in
    for device, seqs in adds.items():
        if not seqs:
            continue
        mark = new_marks[device] = b.marks.get(device, SeqMark()).copy()
        for s in seqs:
            mark.add(s)
        pending = b.pending_seqs(device)
        gapped = len(mark.above) + sum(1 for s in pending if s != mark.contiguous + 1)
        if gapped > b.limits.max_seq_gap_stored:
            raise bad(
                f"device {device.hex()[:8]}: {gapped} seqs above a gap "
                f"(at most {b.limits.max_seq_gap_stored})",
                "seq_gap",
            )
    # a chain's growth rate: at most chain_bytes_per_hour of bodies per hour of its claimed
    # time.  A block is charged to the hour of the latest header time the chain has shown
    # (so backdating buys nothing), and header times are bounded by our clock + skew
    # above; catch-up of old hours is charged to old hours, so it is not throttled.
    budget = b.limits.chain_bytes_per_hour
    rate = None
    if budget is not None and node != b.me:
        size = body_size([len(e) for e in entries])
        last_ts, last_hour, used = b.chain_rate.get(node, (0, -1, 0))
        at = max(header.ts_ms, last_ts)
        hour = at // HOUR_MS
        used = used if hour == last_hour else 0
        if used + size > budget:
            raise ChainOverBudget(
                f"chain {node.hex()[:8]} over {budget} body bytes in the hour of its blocks",
                "rate",
                node=node,
                height=height,
            )
        rate = (at, hour, used + size)
    # the block is valid: now change state
    if rate is not None:
        b.chain_rate[node] = rate
    for tx in new_txs:
        if b.access.apply(tx) and isinstance(tx, Erase):
            b.erasures_due.append((tx.patient, tx.ts_ms))
    for accused, at in faults.items():
        b.faulty.setdefault(accused, at)
    b.marks.update(new_marks)
    touched = {device: mark.copy() for device, mark in new_marks.items()}
    block = Block(header, tuple(entries))
    b.note_remote_head(node, height, block.hash, carries_entries=bool(entries), now_ms=now_ms)
    return Commit(block, tuple(index), touched, tuple(txs), tuple(audit), frozenset(prune))
