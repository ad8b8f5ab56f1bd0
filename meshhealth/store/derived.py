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

Where the same transaction (or two access logs with one audit key) sits in
two chains, the stored location may be either of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import decode_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.crypto.hashing import h
from meshhealth.errors import MalformedMessage, RemoteError
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.store.lmdb_store import HOUR_MS, Store
from meshhealth.wire import AccessLog, BlockHeader, EquivocationProof, Reading, decode_entry
from meshhealth.wire.codec import unpack
from meshhealth.wire.types import CONTROL_CLASSES

# every database of the store; the first two are the chains, the rest derived
PRIMARY = ("headers", "bodies")
DERIVED = ("heads", "readings", "names", "seqmarks", "acl", "audit", "links", "meta")
NAME_WIDTH = {b"n": 2, b"p": 4, b"s": 1}  # chain, patient, stream ids in the readings index

# (patient, stream, hour, chain, height): one readings index record
BucketKey = tuple[bytes, str, int, bytes, int]


@dataclass
class Scan:
    """What the derived databases must hold, from the blocks alone."""

    heads: dict[bytes, bytes] = field(default_factory=dict)  # node -> height(8) + hash
    readings: dict[BucketKey, list[int]] = field(default_factory=dict)
    seqs: dict[bytes, set[int]] = field(default_factory=dict)  # device -> seqs in the blocks
    acl: dict[bytes, list[bytes]] = field(default_factory=dict)  # tx hash -> locations
    audit: dict[bytes, list[bytes]] = field(default_factory=dict)  # audit key -> locations
    links: dict[bytes, bytes] = field(default_factory=dict)  # node + chain -> height(8)
    pruned: int = 0  # erased entries (leaf hashes only)
    access: AccessState = field(default_factory=AccessState)  # every control tx, replayed
    problems: list[str] = field(default_factory=list)  # in the chains themselves

    @property
    def distinct_readings(self) -> int:
        return sum(len(s) for s in self.seqs.values())

    def marks(self) -> dict[bytes, SeqMark]:
        out: dict[bytes, SeqMark] = {}
        for device, seqs in self.seqs.items():
            m = out[device] = SeqMark()
            for s in sorted(seqs):
                m.add(s)
        return out


def _loc(key: bytes, index: int) -> bytes:
    return key + struct.pack(">I", index)


def scan(store: Store) -> Scan:
    """Read every stored block once (undecodable ones are left to ``verify_chain``)."""
    sc = Scan()
    for key, raw_header, raw_body in store.iter_all_raw():
        node, height = key[:32], struct.unpack(">Q", key[32:])[0]
        sc.heads[node] = struct.pack(">Q", height) + h(raw_header)
        if raw_body is None:
            continue  # verify_chain reports it
        try:
            header = BlockHeader.decode(raw_header)
            entries = decode_body(raw_body)
        except RemoteError:
            continue
        for link in header.links:  # the latest block of a chain that links another wins
            sc.links[node + link.node] = struct.pack(">Q", link.height)
        for i, raw in enumerate(entries):
            if is_pruned(raw):
                sc.pruned += 1
                continue
            try:
                e = decode_entry(raw)
            except RemoteError:
                continue
            if isinstance(e, Reading):
                bkey = (e.patient, e.stream, e.t_ms // HOUR_MS, node, height)
                sc.readings.setdefault(bkey, []).append(i)
                sc.seqs.setdefault(e.device, set()).add(e.seq)
            elif isinstance(e, (*CONTROL_CLASSES, EquivocationProof)):
                sc.acl.setdefault(h(raw), []).append(_loc(key, i))
                if isinstance(e, CONTROL_CLASSES):
                    sc.access.apply(e)
            elif isinstance(e, AccessLog):
                akey = e.patient + struct.pack(">Q", e.ts_ms) + e.request[:8]
                sc.audit.setdefault(akey, []).append(_loc(key, i))
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


def _stored_readings(
    records: dict[bytes, bytes], names: dict[tuple[bytes, bytes], bytes], out: list[str]
) -> dict[BucketKey, tuple[bytes, list[int]]]:
    got: dict[BucketKey, tuple[bytes, list[int]]] = {}
    for k, v in records.items():
        if len(k) != 15:
            out.append(f"readings: {k.hex()}: key of {len(k)} bytes, not 15")
            continue
        patient, stream = names.get((b"p", k[:4])), names.get((b"s", k[4:5]))
        node = names.get((b"n", k[9:11]))
        if patient is None or stream is None or node is None:
            out.append(f"readings: {k.hex()}: names an unknown patient, stream or chain id")
            continue
        try:
            idx = unpack(v, max_len=1 << 20)
            if not isinstance(idx, list) or not all(type(i) is int for i in idx):
                raise MalformedMessage("not a list of entry indexes")
        except MalformedMessage as exc:
            out.append(f"readings: {k.hex()}: undecodable value ({exc})")
            continue
        bkey = (
            patient,
            stream.decode(errors="replace"),
            struct.unpack(">I", k[5:9])[0],
            node,
            struct.unpack(">I", k[11:15])[0],
        )
        got[bkey] = (k, idx)
    return got


def _bucket(b: BucketKey) -> str:
    patient, stream, hour, node, height = b
    return f"patient {patient.hex()[:16]} {stream} hour {hour} chain {node.hex()[:8]}#{height}"


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


def check(store: Store, sc: Scan) -> list[str]:
    """Every way the derived databases differ from what the blocks imply; [] when none."""
    out = list(sc.problems)
    raw = {db: store.raw_items(db) for db in DERIVED}
    _exact("heads", sc.heads, raw["heads"], out)
    _exact("links", sc.links, raw["links"], out)
    _located("acl", sc.acl, raw["acl"], out)
    _located("audit", sc.audit, raw["audit"], out)
    names = _names(raw["names"], out)
    have = _stored_readings(raw["readings"], names, out)
    for b in sorted(sc.readings.keys() - have.keys()):
        out.append(f"readings: {_bucket(b)}: missing (entries {sc.readings[b]})")
    for b in sorted(have.keys() - sc.readings.keys()):
        out.append(f"readings: {have[b][0].hex()} ({_bucket(b)}): extra record")
    for b in sorted(sc.readings.keys() & have.keys()):
        if have[b][1] != sc.readings[b]:
            out.append(
                f"readings: {have[b][0].hex()} ({_bucket(b)}): altered "
                f"(entries {have[b][1]} instead of {sc.readings[b]})"
            )
    marks = sc.marks()
    for device, v in sorted(raw["seqmarks"].items()):
        try:
            stored = SeqMark.decode(v)
        except (MalformedMessage, TypeError, ValueError) as exc:
            out.append(f"seqmarks: {device.hex()}: undecodable ({exc})")
            continue
        want = marks.get(device)
        if want is None:
            if not sc.pruned:
                out.append(f"seqmarks: {device.hex()}: extra record, no reading of this device")
        elif not all(stored.has(s) for s in sc.seqs[device]):
            out.append(f"seqmarks: {device.hex()}: altered (misses seqs stored in the blocks)")
        elif not sc.pruned and (stored.contiguous, stored.above) != (want.contiguous, want.above):
            out.append(f"seqmarks: {device.hex()}: altered (marks seqs no block holds)")
    for device in sorted(marks.keys() - raw["seqmarks"].keys()):
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
    """Rewrite every derived database from ``sc`` in one transaction; records per database.
    Kept from the stored ones where the blocks cannot tell (see the module docstring)."""
    raw = {db: store.raw_items(db) for db in ("acl", "audit", "seqmarks", "meta")}

    def place(want: dict[bytes, list[bytes]], have: dict[bytes, bytes]) -> dict[bytes, bytes]:
        return {k: (have[k] if have.get(k) in locs else locs[0]) for k, locs in want.items()}

    marks = sc.marks()
    if sc.pruned:  # erased readings' seqs are only in the stored marks: keep them
        for device, v in raw["seqmarks"].items():
            try:
                stored = SeqMark.decode(v)
            except (MalformedMessage, TypeError, ValueError):
                continue
            m = marks.get(device, SeqMark())
            top = max(m.contiguous, stored.contiguous)
            merged = marks[device] = SeqMark(top)
            for s in sorted(m.above | stored.above):
                merged.add(s)
    count = int.from_bytes(raw["meta"].get(b"readings", b""), "big")
    count = min(max(count, sc.distinct_readings), sc.distinct_readings + sc.pruned)
    store.replace_derived(
        heads=sc.heads,
        readings=sc.readings,
        seqmarks={d: m.encode() for d, m in marks.items()},
        acl=place(sc.acl, raw["acl"]),
        audit=place(sc.audit, raw["audit"]),
        links=sc.links,
        reading_count=count,
    )
    return {
        "heads": len(sc.heads),
        "readings": len(sc.readings),
        "seqmarks": len(marks),
        "acl": len(sc.acl),
        "audit": len(sc.audit),
        "links": len(sc.links),
    }


__all__ = ["DERIVED", "PRIMARY", "Scan", "check", "rebuild", "scan"]
