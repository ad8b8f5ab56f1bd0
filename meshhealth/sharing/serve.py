"""The node's side of a read: who may read what, and the verifiable answer.

A reader asks for one patient's stream over ``[from_ms, to_ms]``.
:func:`decide` says which parts of that range the access state lets it
read (all of it for the patient; the windows of its active grants for a
grantee; nothing at or before the patient's erasure) or, when nothing,
why not.  :func:`collect` then reads the readings index and answers with
every matching reading *exactly as stored in its block*, grouped by block:
the signed block header, the entries with their indexes, and one Merkle
proof for all of them (:func:`meshhealth.chain.merkle.multiproof`).  The
reader checks the device signatures, the proofs against the header's root,
and the header's signature, then decrypts locally: the node never sees a
value in clear, and could not forge or hide-and-replace one undetected.

Answer (msgpack)::

    ["RS1", next, enrolments, blocks]
    next        where the following page starts (an integer: pass it as ``after``),
                or nil when this is the last page
    enrolments  the patient's signed EnrollDevice transactions (who may write what)
    blocks      [[header, [[index, entry], ...], proof], ...]
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from meshhealth.chain import merkle
from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import decode_body
from meshhealth.store.lmdb_store import Store
from meshhealth.wire.codec import pack

PAGE_BYTES = 8 * 1024 * 1024  # an answer stops after the block that crosses this
ENTRY_OVERHEAD = 8  # msgpack framing of one [index, entry] pair, roughly


@dataclass(frozen=True, slots=True)
class Decision:
    """What a reader may see of the range it asked for."""

    windows: tuple[tuple[int, int], ...]  # inclusive [lo, hi] ranges of sample start times
    grant: bytes  # the grant that allows it (empty for the patient themself)
    reason: str  # why nothing is allowed, when ``windows`` is empty

    @property
    def allowed(self) -> bool:
        return bool(self.windows)


def decide(
    access: AccessState, reader: bytes, patient: bytes, stream: str, from_ms: int, to_ms: int
) -> Decision:
    erased = access.erased.get(patient, -1)
    lo_floor = max(from_ms, erased + 1)
    if reader == patient:
        if lo_floor > to_ms:
            return Decision((), b"", "erased")
        return Decision(((lo_floor, to_ms),), b"", "")
    mine = [
        (gid, g)
        for gid, g in access.grants_to(reader).items()
        if g.patient == patient and any(s.stream == stream for s in g.streams)
    ]
    if not mine:
        return Decision((), b"", "no_grant")
    active = [(gid, g) for gid, g in mine if not access.is_revoked(gid)]
    if not active:
        return Decision((), b"", "revoked")
    windows, first = [], b""
    for gid, g in sorted(active, key=lambda kv: (kv[1].from_ms, kv[0])):  # a total order
        lo = max(lo_floor, g.from_ms)
        hi = to_ms if g.open else min(to_ms, g.until_ms)
        if lo <= hi:
            windows.append((lo, hi))
            first = first or gid
    if not windows:
        if erased >= to_ms:
            return Decision((), b"", "erased")
        ends = [g.until_ms for _, g in active if not g.open]
        expired = len(ends) == len(active) and max(ends) < from_ms
        return Decision((), b"", "expired" if expired else "outside_grant")
    return Decision(tuple(windows), first, "")


def _inside(t: int, windows: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= t <= hi for lo, hi in windows)


def collect(
    store: Store,
    enrolments: list[bytes],
    patient: bytes,
    stream: str,
    decision: Decision,
    *,
    after: int = 0,
    page_bytes: int = PAGE_BYTES,
) -> tuple[bytes, int]:
    """The encoded answer for the allowed windows, from bucket ``after`` on, and how many
    readings it carries.  Runs in a thread: it reads only the store (LMDB readers do not
    block the writer) and what it is passed."""
    lo = min(w[0] for w in decision.windows)
    hi = max(w[1] for w in decision.windows)
    buckets = store.reading_blocks(patient, stream, lo, hi)
    blocks: list[list[object]] = []
    seen: set[tuple[bytes, int]] = set()
    size = count = 0
    nxt: int | None = None
    # the block last read: consecutive buckets (hours) often share one
    at: tuple[bytes, int] | None = None
    header: bytes = b""
    body: tuple[bytes, ...] = ()
    tree: list[list[bytes]] = []
    for b in range(after, len(buckets)):
        if size >= page_bytes:
            nxt = b
            break
        node, height, indexes = buckets[b]
        if at != (node, height):
            raw = store.raw_block(node, height)
            if raw is None:
                continue
            at, header, body = (node, height), raw[0], decode_body(raw[1])
            tree = merkle.levels([merkle.leaf_of(e) for e in body])
        picked: list[tuple[int, bytes]] = []
        for i in indexes:
            e = body[i]
            if merkle.is_pruned(e):
                continue
            # a stored entry was validated when it was admitted: read the fields in place
            _, device, who, name, seq, t_ms, *_ = msgpack.unpackb(e)
            if who != patient or name != stream:
                continue  # a bucket shared by streams named after the index's ids ran out
            if (device, seq) in seen or not _inside(t_ms, decision.windows):
                continue
            seen.add((device, seq))
            picked.append((i, e))
            size += len(e) + ENTRY_OVERHEAD
        if picked:
            proof = merkle.multiproof(tree, [i for i, _ in picked])
            blocks.append([header, picked, proof])
            size += len(header) + 32 * len(proof)
            count += len(picked)
    return pack(["RS1", nxt, enrolments, blocks]), count
