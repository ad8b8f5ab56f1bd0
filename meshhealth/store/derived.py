"""The derived databases of a store, recomputed from its blocks: checked or rebuilt.

``headers`` and ``bodies`` are the chains; every other database of
:mod:`meshhealth.store.lmdb_store` is derived from them when a block is
committed, and the read paths trust them: a byte flipped in ``readings``
hides readings from every provider and from the patient, a lost ``acl``
record drops a grant or an enrolment at the next start-up, a wrong
``seqmarks`` record refuses a device's new readings as duplicates.

:func:`scan` reads every stored block once and computes what each derived
database must hold; :func:`check` compares it with what is stored, record by
record (missing, extra and altered records, each named by database and key);
:func:`rebuild` writes the recomputed databases in one transaction
(``meshhealth store reindex``).

What the blocks cannot tell exactly, after an erase replaced readings by
their leaf hashes (only the hash is left, not the device and seq):

* ``seqmarks``: the stored marks must cover every seq still in the blocks;
  seqs (and devices) beyond that are accepted when the store holds erased
  entries, and must not exist when it holds none;
* ``meta/readings`` (readings ever committed, counted once per device and
  seq): between the distinct readings left and that plus the erased entries;
* ``names`` (the local ids the readings index interns): every record must be
  consistent (id <-> name, below its counter); names no index record uses
  any more (an erased patient) are allowed.

Where the same transaction sits in two chains, the stored ``acl`` location
may be either of them; the ``audit`` index has one record per access log
location (its key holds the location), so there is nothing to choose.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import decode_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.crypto.hashing import h
from meshhealth.errors import MalformedMessage, MeshHealthError, RemoteError
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.store.lmdb_store import (
    AUDIT_FORMAT,
    AUDIT_FORMAT_V,
    HOUR_MS,
    SHARED_STREAM,
    Store,
    audit_key,
    chain_key,
)
from meshhealth.wire import BlockHeader, EquivocationProof, Reading, decode_entry
from meshhealth.wire.codec import unpack
from meshhealth.wire.types import ACCESS_LOGS, CONTROL_CLASSES

# every database of the store; the first two are the chains, the rest derived
PRIMARY = ("headers", "bodies")
DERIVED = ("heads", "readings", "names", "seqmarks", "acl", "audit", "links", "meta")
NAME_WIDTH = {b"n": 2, b"p": 4, b"s": 1}  # chain, patient, stream ids in the readings index

# (patient, stream, hour, chain, height): one readings index record
BucketKey = tuple[bytes, str, int, bytes, int]
Blocks = Iterator[tuple[bytes, BlockHeader, tuple[bytes, ...]]]


def _blocks(store: Store) -> Blocks:
    """(node + height, header, entries) of every decodable stored block, in key order
    (the undecodable ones and missing bodies are ``verify_chain``'s to report)."""
    for key, raw_header, raw_body in store.iter_all_raw():
        if raw_body is None:
            continue
        try:
            yield key, BlockHeader.decode(raw_header), decode_body(raw_body)
        except RemoteError:
            continue


def _decoded(entries: tuple[bytes, ...]) -> Iterator[tuple[int, Any]]:
    for i, raw in enumerate(entries):
        if is_pruned(raw):
            yield i, None
            continue
        try:
            yield i, decode_entry(raw)
        except RemoteError:
            continue


def block_buckets(key: bytes, entries: tuple[bytes, ...]) -> dict[BucketKey, list[int]]:
    """The readings index records one block implies (every reading it still holds)."""
    node, height = key[:32], struct.unpack(">Q", key[32:])[0]
    out: dict[BucketKey, list[int]] = {}
    for i, e in _decoded(entries):
        if isinstance(e, Reading):
            out.setdefault((e.patient, e.stream, e.t_ms // HOUR_MS, node, height), []).append(i)
    return out


def all_buckets(store: Store) -> Iterator[tuple[BucketKey, list[int]]]:
    for key, _, entries in _blocks(store):
        yield from block_buckets(key, entries).items()


@dataclass
class Scan:
    """What the derived databases must hold, from the blocks alone.  The readings index,
    the largest, is not held here: :func:`check` and :func:`rebuild` stream it block by
    block, so memory is one block's records, not the store's."""

    heads: dict[bytes, bytes] = field(default_factory=dict)  # node -> height(8) + hash
    marks: dict[bytes, SeqMark] = field(default_factory=dict)  # device -> seqs in the blocks
    distinct_readings: int = 0  # (device, seq) pairs in the blocks
    acl: dict[bytes, list[bytes]] = field(default_factory=dict)  # tx hash -> locations
    audit: dict[bytes, list[bytes]] = field(default_factory=dict)  # audit key -> locations
    links: dict[bytes, bytes] = field(default_factory=dict)  # node + chain -> height(8)
    pruned: int = 0  # erased entries (leaf hashes only)
    access: AccessState = field(default_factory=AccessState)  # every control tx, replayed
    problems: list[str] = field(default_factory=list)  # in the chains themselves


def _loc(key: bytes, index: int) -> bytes:
    return key + struct.pack(">I", index)


def scan(store: Store) -> Scan:
    """Read every stored block once."""
    sc = Scan()
    for key, raw_header, _ in store.iter_all_raw():
        sc.heads[key[:32]] = key[32:] + h(raw_header)
    for key, header, entries in _blocks(store):
        node = key[:32]
        for link in header.links:  # the latest block of a chain that links another wins
            sc.links[node + link.node] = struct.pack(">Q", link.height)
        for i, e in _decoded(entries):
            if e is None:
                sc.pruned += 1
            elif isinstance(e, Reading):
                m = sc.marks.setdefault(e.device, SeqMark())
                if not m.has(e.seq):
                    m.add(e.seq)
                    sc.distinct_readings += 1
            elif isinstance(e, (*CONTROL_CLASSES, EquivocationProof)):
                sc.acl.setdefault(h(entries[i]), []).append(_loc(key, i))
                if isinstance(e, CONTROL_CLASSES):
                    sc.access.apply(e)
            elif isinstance(e, ACCESS_LOGS):
                loc = _loc(key, i)
                sc.audit.setdefault(audit_key(e.patient, e.ts_ms, loc), []).append(loc)
    for key in store.bodies_without_header():
        sc.problems.append(f"bodies: {key.hex()}: a body with no header")
    return sc


# --- checking -----------------------------------------------------------------


def _names(records: dict[bytes, bytes], out: list[str]) -> dict[tuple[bytes, bytes], bytes]:
    """Check the names database; returns (kind, id) -> name for what is consistent."""
    ids: dict[tuple[bytes, bytes], bytes] = {}
    counters: dict[bytes, int] = {}
    forward: dict[tuple[bytes, bytes], bytes] = {}  # (kind, name) -> id
    for k, v in records.items():
        if k[:1] == b"#" and k[1:] in NAME_WIDTH and len(v) == NAME_WIDTH[k[1:]]:
            counters[k[1:]] = int.from_bytes(v, "big")
        elif k[:1] == b"~" and k[1:2] in NAME_WIDTH and len(k) == 2 + NAME_WIDTH[k[1:2]]:
            ids[(k[1:2], k[2:])] = v
        elif k[:1] in NAME_WIDTH and len(v) == NAME_WIDTH[k[:1]]:
            forward[(k[:1], k[1:])] = v
        else:
            out.append(f"names: {k.hex()}: not a name record")
    good: dict[tuple[bytes, bytes], bytes] = {}
    for (kind, name), lid in forward.items():
        if ids.get((kind, lid)) != name:
            out.append(f"names: {(kind + name).hex()}: id {lid.hex()} has no matching reverse")
        elif int.from_bytes(lid, "big") > counters.get(kind, -1):
            out.append(f"names: {(kind + name).hex()}: id {lid.hex()} above the counter")
        else:
            good[(kind, lid)] = name
    for (kind, lid), name in ids.items():
        if forward.get((kind, name)) != lid:
            out.append(f"names: {(b'~' + kind + lid).hex()}: reverse of a name it is not")
    return good


def _bucket(b: BucketKey) -> str:
    patient, stream, hour, node, height = b
    return f"patient {patient.hex()[:16]} {stream} hour {hour} chain {node.hex()[:8]}#{height}"


def _indexes(v: bytes) -> list[int] | None:
    try:
        idx = unpack(v, max_len=1 << 20)
    except MalformedMessage:
        return None
    ok = isinstance(idx, list) and all(type(i) is int for i in idx)
    return idx if ok else None


def _records(
    buckets: Iterable[tuple[BucketKey, list[int]]],
    ids: dict[tuple[bytes, bytes], bytes],
    streams_full: bool,
    out: list[str],
) -> Iterator[tuple[BucketKey, bytes, list[int]]]:
    """(a bucket, its record key, the record's entry indexes), per record: buckets of one
    block that share a key (streams sharing an id) are merged."""
    pending: dict[bytes, tuple[BucketKey, list[int]]] = {}
    block: tuple[bytes, int] | None = None
    for bkey, idx in buckets:
        patient, stream, hour, node, height = bkey
        if block != (node, height):
            for k, (first, merged) in pending.items():
                yield first, k, sorted(merged)
            pending, block = {}, (node, height)
        pid, sid = ids.get((b"p", patient)), ids.get((b"s", stream.encode()))
        if sid is None and streams_full:
            sid = SHARED_STREAM
        nid = ids.get((b"n", node))
        if pid is None or sid is None or nid is None:
            out.append(f"readings: {_bucket(bkey)}: missing (entries {idx}; no id for its names)")
            continue
        skey = pid + sid + struct.pack(">I", hour) + nid + struct.pack(">I", height)
        got = pending.setdefault(skey, (bkey, []))
        got[1].extend(idx)
    for k, (first, merged) in pending.items():
        yield first, k, sorted(merged)


def _check_readings(store: Store, names: dict[tuple[bytes, bytes], bytes], out: list[str]) -> None:
    """Every record the blocks imply, looked up (missing, altered); then, only if the
    stored count differs from what matched, every stored record (extra, malformed)."""
    ids = {(kind, name): lid for (kind, lid), name in names.items()}
    # past 254 stream names, every new one shares SHARED_STREAM (lmdb_store): then one
    # record holds the readings of several streams, so the blocks' buckets are grouped
    # by the record key they map to
    streams_full = store.raw_get("names", b"#s") in (bytes([SHARED_STREAM[0] - 1]), SHARED_STREAM)
    matched = 0
    for bkey, skey, idx in _records(all_buckets(store), ids, streams_full, out):
        v = store.raw_get("readings", skey)
        if v is None:
            out.append(f"readings: {skey.hex()} ({_bucket(bkey)}): missing (entries {idx})")
        elif _indexes(v) != idx:
            out.append(
                f"readings: {skey.hex()} ({_bucket(bkey)}): altered "
                f"(entries {_indexes(v)} instead of {idx})"
            )
            matched += 1  # found, if wrong: not an extra
        else:
            matched += 1
    if store.count("readings") == matched:
        return
    cache: tuple[bytes, dict[BucketKey, list[int]]] = (b"", {})
    for k, _ in store.iter_items("readings"):
        if len(k) != 15:
            out.append(f"readings: {k.hex()}: key of {len(k)} bytes, not 15")
            continue
        who, what = names.get((b"p", k[:4])), names.get((b"s", k[4:5]))
        chain = names.get((b"n", k[9:11]))
        if who is None or what is None or chain is None:
            out.append(f"readings: {k.hex()}: names an unknown patient, stream or chain id")
            continue
        at = struct.unpack(">I", k[11:15])[0]
        hour = struct.unpack(">I", k[5:9])[0]
        bkey = (who, what.decode(errors="replace"), hour, chain, at)
        ckey = chain_key(chain, at)
        if cache[0] != ckey:
            raw = store.raw_block(chain, at)
            body = None
            if raw is not None:
                with contextlib.suppress(RemoteError):
                    body = decode_body(raw[1])
            cache = (ckey, block_buckets(ckey, body) if body is not None else {})
        if bkey not in cache[1]:
            out.append(f"readings: {k.hex()} ({_bucket(bkey)}): extra record, no such readings")


def _exact(db: str, want: dict[bytes, bytes], have: dict[bytes, bytes], out: list[str]) -> None:
    for k in sorted(want.keys() - have.keys()):
        out.append(f"{db}: {k.hex()}: missing")
    for k in sorted(have.keys() - want.keys()):
        out.append(f"{db}: {k.hex()}: extra record, not implied by any block")
    for k in sorted(want.keys() & have.keys()):
        if want[k] != have[k]:
            out.append(f"{db}: {k.hex()}: altered ({have[k].hex()} instead of {want[k].hex()})")


def _located(
    db: str, want: dict[bytes, list[bytes]], have: dict[bytes, bytes], out: list[str]
) -> None:
    for k in sorted(want.keys() - have.keys()):
        out.append(f"{db}: {k.hex()}: missing")
    for k in sorted(have.keys() - want.keys()):
        out.append(f"{db}: {k.hex()}: extra record, not implied by any block")
    for k in sorted(want.keys() & have.keys()):
        if have[k] not in want[k]:
            out.append(f"{db}: {k.hex()}: altered (points at {have[k].hex()}, not at the entry)")


def _covers(stored: SeqMark, want: SeqMark) -> bool:
    """Whether ``stored`` marks every seq ``want`` marks."""
    if stored.contiguous < want.contiguous and not all(
        stored.has(s) for s in range(stored.contiguous + 1, want.contiguous + 1)
    ):
        return False
    return all(stored.has(s) for s in want.above)


def _decode_mark(v: bytes) -> SeqMark | str:
    try:
        return SeqMark.decode(v)
    except (MeshHealthError, TypeError, ValueError) as exc:
        return str(exc) or exc.__class__.__name__


def check(store: Store, sc: Scan) -> list[str]:
    """Every way the derived databases differ from what the blocks imply; [] when none."""
    out = list(sc.problems)
    raw = {db: store.raw_items(db) for db in DERIVED if db != "readings"}
    _exact("heads", sc.heads, raw["heads"], out)
    _exact("links", sc.links, raw["links"], out)
    _located("acl", sc.acl, raw["acl"], out)
    if raw["meta"].get(AUDIT_FORMAT) != AUDIT_FORMAT_V and raw["audit"]:
        # a store of the old format, opened read-only (a node start would rebuild it)
        out.append(
            "audit: an index of the old key format (patient + ts + request, where two logs "
            "can share a record): `store reindex` or starting the node rebuilds it"
        )
    else:
        _located("audit", sc.audit, raw["audit"], out)
    _check_readings(store, _names(raw["names"], out), out)
    for device, v in sorted(raw["seqmarks"].items()):
        stored = _decode_mark(v)
        want = sc.marks.get(device)
        if isinstance(stored, str):
            out.append(f"seqmarks: {device.hex()}: undecodable ({stored})")
        elif want is None:
            if not sc.pruned:
                out.append(f"seqmarks: {device.hex()}: extra record, no reading of this device")
        elif not _covers(stored, want):
            out.append(f"seqmarks: {device.hex()}: altered (misses seqs stored in the blocks)")
        elif not sc.pruned and (stored.contiguous, stored.above) != (want.contiguous, want.above):
            out.append(f"seqmarks: {device.hex()}: altered (marks seqs no block holds)")
    for device in sorted(sc.marks.keys() - raw["seqmarks"].keys()):
        out.append(f"seqmarks: {device.hex()}: missing")
    count = int.from_bytes(raw["meta"].get(b"readings", b""), "big")
    lo = sc.distinct_readings
    if not lo <= count <= lo + sc.pruned:
        out.append(
            f"meta: readings: counts {count} readings, the blocks hold {lo}"
            + (f" (+ up to {sc.pruned} erased)" if sc.pruned else "")
        )
    return out


# --- rebuilding ---------------------------------------------------------------


def rebuild(store: Store, sc: Scan) -> dict[str, int]:
    """Rewrite every derived database from ``sc`` and the blocks, in one transaction;
    records per database.  Kept from the stored ones where the blocks cannot tell (see
    the module docstring)."""
    raw = {db: store.raw_items(db) for db in ("acl", "audit", "seqmarks", "meta")}

    def place(want: dict[bytes, list[bytes]], have: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return {k: (have[k] if have.get(k) in locs else locs[0]) for k, locs in want.items()}

    marks = {d: m.copy() for d, m in sc.marks.items()}
    if sc.pruned:  # erased readings' seqs are only in the stored marks: keep them
        for device, v in raw["seqmarks"].items():
            stored = _decode_mark(v)
            if isinstance(stored, str):
                continue
            m = marks.get(device, SeqMark())
            merged = marks[device] = SeqMark(max(m.contiguous, stored.contiguous))
            for s in sorted(m.above | stored.above):
                merged.add(s)
    count = int.from_bytes(raw["meta"].get(b"readings", b""), "big")
    count = min(max(count, sc.distinct_readings), sc.distinct_readings + sc.pruned)
    buckets = store.replace_derived(
        heads=sc.heads,
        readings=lambda: all_buckets(store),
        seqmarks={d: m.encode() for d, m in marks.items()},
        acl=place(sc.acl, raw["acl"]),
        audit=place(sc.audit, raw["audit"]),
        links=sc.links,
        reading_count=count,
    )
    return {
        "heads": len(sc.heads),
        "readings": buckets,
        "seqmarks": len(marks),
        "acl": len(sc.acl),
        "audit": len(sc.audit),
        "links": len(sc.links),
    }


__all__ = ["DERIVED", "PRIMARY", "Scan", "all_buckets", "block_buckets", "check", "rebuild", "scan"]
