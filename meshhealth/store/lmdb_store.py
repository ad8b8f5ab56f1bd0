"""One LMDB environment per node.

Named databases::

    headers   node(32) + height(8)        -> encoded BlockHeader
    bodies    node(32) + height(8)        -> encoded body (list of entries)
    heads     node(32)                    -> height(8) + hash(32)
    readings  pid(4) stream(1) hour(4) nid(2) height(4) -> entry indexes (msgpack);
              written with every block, queried from the sharing issue on
    seqmarks  device(32)                  -> SeqMark
    acl       entry hash(32)              -> node(32) + height(8) + index(4), for every
              control transaction and equivocation proof
    audit     patient(32) + ts(8) + node(32) + height(8) + index(4) -> node(32) +
              height(8) + index(4), for every access log (the patient's audit trail,
              from every chain).  The key holds the log's location, so two logs never
              share a record: a bad authority that copies an honest log's patient, time
              and request into its own log cannot overwrite the honest one (issue 11).
              Stores of the old format (patient + ts + request[:8], which could collide)
              are re-indexed when opened (meta ``audit_format``)
    links     node(32) + chain(32)        -> height(8): the highest block of ``chain``
              that ``node``'s blocks link to (what confirmation counts)
    names     kind(1) + name               -> small local id, and ``~`` kind(1) id -> name
    meta      key                          -> value

The ``readings`` index groups the readings of one patient's stream that fall
in one hour *and* one block under one key, with the patient, stream and
chain interned to small local ids, so an index entry costs a few bytes per
reading when a block carries many readings of a stream.  Stream names are
anyone's to make up, so past the 254th every new one shares the id
``SHARED_STREAM`` (a commit never fails for want of ids), and readers keep
only the entries whose own patient and stream fields match.

A block is committed with everything it implies (header, body, head,
index, seq marks, enrolments) in **one** write transaction: after a crash
either all of it is there or none of it.  ``MapFullError`` doubles the map
and retries instead of failing.

Erasure (``prune_patient``) rewrites bodies with the erased entries as leaf
hashes, but LMDB keeps the old pages' bytes (free pages, and the tails of
recycled page buffers), so ``compact`` then rewrites the whole environment
from its live records and swaps it in.  Every read goes through ``_read``: a
gate that holds readers back for the few milliseconds of the swap, so a read
must not wait for the writer thread while it holds a transaction open.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb

from meshhealth.chain.block import Block, decode_body, encode_body
from meshhealth.chain.merkle import is_pruned, pruned
from meshhealth.crypto.hashing import h
from meshhealth.errors import InvalidBlock, RemoteError, StorageError
from meshhealth.ingest.commit import HOUR_MS as HOUR_MS  # re-exported: the index unit
from meshhealth.ingest.commit import MAX_INDEX_HOUR, Commit
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.wire import BlockHeader, Reading, decode_entry
from meshhealth.wire.codec import pack, unpack
from meshhealth.wire.types import ACCESS_LOGS

# the stream id every stream name past the 254th shares in the readings index: a bucket
# may then hold readings of several streams, and readers filter by the entries' fields
SHARED_STREAM = b"\xff"
COMPACT_NAME = "data.mdb.compact"  # the compacting copy, while it is written
COMPACT_TXN_BYTES = 32 << 20  # what one transaction of the compacting copy writes
COMPACT_DUE = b"compact_due"  # meta: an erasure freed pages compact() has not cleared
AUDIT_FORMAT = b"audit_format"  # meta: the audit index's key format (absent: the old one)
AUDIT_FORMAT_V = b"\x02"  # patient + ts + location: one record per log, never shared
_DBS = (
    "headers",
    "bodies",
    "heads",
    "readings",
    "seqmarks",
    "acl",
    "audit",
    "links",
    "names",
    "meta",
)


def chain_key(node: bytes, height: int) -> bytes:
    return node + struct.pack(">Q", height)


def audit_key(patient: bytes, ts_ms: int, loc: bytes) -> bytes:
    """The audit index key of the access log at ``loc`` (node(32) + height(8) +
    index(4)): its location is part of it, so no other log can take its record."""
    return patient + struct.pack(">Q", ts_ms) + loc


def _u32(v: int, what: str, hdr: BlockHeader) -> bytes:
    """A 32-bit index field; a value out of its range is the block's fault, never a crash
    (admission refuses such blocks first: this is the last line)."""
    if not 0 <= v <= MAX_INDEX_HOUR:
        raise InvalidBlock(
            f"{what} {v} beyond the readings index", node=hdr.node, height=hdr.height
        )
    return struct.pack(">I", v)


def _hour(t_ms: int, hdr: BlockHeader) -> bytes:
    return _u32(t_ms // HOUR_MS if t_ms >= 0 else -1, "reading hour", hdr)


class _Gate:
    """Many readers at once, or the one thread swapping the environment (see compact)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._closed = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._closed:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._closed = True  # new readers wait: the swap cannot starve
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._closed = False
                self._cond.notify_all()


class Store:
    def __init__(self, path: Path, *, map_size_mb: int = 64, readonly: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.readonly = readonly
        self._map_size = map_size_mb * 1024 * 1024
        if not readonly:  # a compaction a crash cut short: the live file is the old one
            (path / COMPACT_NAME).unlink(missing_ok=True)
        self._open()
        self._names: dict[bytes, bytes] = {}
        self._write_lock = threading.Lock()
        self._gate = _Gate()
        self.compactions = 0
        self.compact_seconds = 0.0
        self.audit_migrated = 0  # records the old-format audit index was rebuilt into
        if not readonly:
            self.audit_migrated = int(self._write(self._migrate_audit))

    def _migrate_audit(self, txn: Any) -> int:
        """Rebuild the audit index from the blocks if it is of the old format (its key
        was patient + ts + request[:8]: two logs could share, and overwrite, a record).
        Once per store; returns the records written."""
        if txn.get(AUDIT_FORMAT, db=self.db["meta"]) == AUDIT_FORMAT_V:
            return 0
        n = 0
        if txn.stat(self.db["audit"])["entries"]:
            txn.drop(self.db["audit"], delete=False)
            for key, raw in txn.cursor(db=self.db["bodies"]):
                try:
                    entries = decode_body(bytes(raw))
                except RemoteError:
                    continue  # verify_chain's to report
                for i, e in enumerate(entries):
                    if is_pruned(e):
                        continue
                    try:
                        log = decode_entry(e)
                    except RemoteError:
                        continue
                    if isinstance(log, ACCESS_LOGS):
                        loc = bytes(key) + struct.pack(">I", i)
                        txn.put(audit_key(log.patient, log.ts_ms, loc), loc, db=self.db["audit"])
                        n += 1
        txn.put(AUDIT_FORMAT, AUDIT_FORMAT_V, db=self.db["meta"])
        return n

    def _open(self) -> None:
        try:
            self.env = lmdb.open(
                str(self.path),
                map_size=self._map_size,
                max_dbs=len(_DBS),
                readonly=self.readonly,
                lock=True,
                subdir=True,
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open LMDB store at {self.path}: {exc}") from exc
        self.db = (
            {name: self.env.open_db(name.encode(), create=not self.readonly) for name in _DBS}
            if not self.readonly
            else self._open_ro()
        )

    def _open_ro(self) -> dict[str, Any]:
        return {name: self.env.open_db(name.encode(), create=False) for name in _DBS}

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._gate.shared(), self.env.begin() as txn:
            yield txn

    def close(self) -> None:
        self.env.close()

    # --- writing ----------------------------------------------------------

    def _write(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(txn, ...)`` in one write transaction, growing the map when full."""
        with self._write_lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn, *args)
                except lmdb.MapFullError:
                    self._names.clear()  # ids minted in the aborted txn are gone
                    self._map_size = self.env.info()["map_size"] * 2
                    self.env.set_mapsize(self._map_size)
                except lmdb.Error as exc:
                    raise StorageError(f"LMDB write failed: {exc}") from exc

    def _name_id(
        self, txn: Any, kind: bytes, name: bytes, width: int, *, shared: bytes | None = None
    ) -> bytes:
        """The small id of ``name``, minted on first use.  With ``shared``, names past the
        id space all get that one id (readers tell them apart by the entries themselves):
        anyone can make up stream names, and running out must not stop a commit."""
        k = kind + name
        got = self._names.get(k) or txn.get(k, db=self.db["names"])
        if got is None:
            counter = b"#" + kind
            n = int.from_bytes(txn.get(counter, b"\0" * width, db=self.db["names"]), "big") + 1
            if shared is not None and n >= int.from_bytes(shared, "big"):
                self._names[k] = shared
                return shared
            if n >= 1 << (8 * width):
                raise StorageError(f"too many distinct {kind.decode()} names for the index")
            got = n.to_bytes(width, "big")
            txn.put(counter, got, db=self.db["names"])
            txn.put(k, got, db=self.db["names"])
            txn.put(b"~" + kind + got, name, db=self.db["names"])
        self._names[k] = got
        return got

    def commit_block(self, c: Commit) -> None:
        self._write(self._commit, c)

    def _commit(self, txn: Any, c: Commit) -> None:
        hdr = c.block.header
        key = chain_key(hdr.node, hdr.height)
        if not txn.put(key, hdr.encode(), db=self.db["headers"], overwrite=False):
            raise StorageError(f"block {hdr.height} of {hdr.node.hex()[:8]} already stored")
        entries = c.block.entries
        if c.prune:
            entries = tuple(pruned(e) if i in c.prune else e for i, e in enumerate(entries))
        txn.put(key, encode_body(entries), db=self.db["bodies"])
        txn.put(hdr.node, struct.pack(">Q", hdr.height) + c.block.hash, db=self.db["heads"])
        nid = self._name_id(txn, b"n", hdr.node, 2)
        buckets: dict[bytes, list[int]] = {}
        for r in c.readings:
            if r.index in c.prune:
                continue
            pid = self._name_id(txn, b"p", r.patient, 4)
            sid = self._name_id(txn, b"s", r.stream.encode(), 1, shared=SHARED_STREAM)
            bkey = pid + sid + _hour(r.t_ms, hdr) + nid + _u32(hdr.height, "height", hdr)
            buckets.setdefault(bkey, []).append(r.index)
        for bkey, idx in buckets.items():
            txn.put(bkey, pack(idx), db=self.db["readings"])
        for device, mark in c.seqmarks.items():
            txn.put(device, mark.encode(), db=self.db["seqmarks"])
        for tx_hash, index in c.txs:
            txn.put(tx_hash, key + struct.pack(">I", index), db=self.db["acl"])
        for patient, ts, _request, index in c.audit:
            loc = key + struct.pack(">I", index)
            txn.put(audit_key(patient, ts, loc), loc, db=self.db["audit"])
        for link in hdr.links:  # links only move forward along a chain
            txn.put(hdr.node + link.node, struct.pack(">Q", link.height), db=self.db["links"])
        n = int.from_bytes(txn.get(b"readings", b"\0" * 8, db=self.db["meta"]), "big")
        n += sum(r.counted for r in c.readings)
        txn.put(b"readings", n.to_bytes(8, "big"), db=self.db["meta"])

    def set_meta(self, key: str, value: bytes) -> None:
        def put(txn: Any) -> None:
            txn.put(key.encode(), value, db=self.db["meta"])

        self._write(put)

    # --- reading ------------------------------------------------------------

    def meta(self, key: str) -> bytes | None:
        with self._read() as txn:
            v = txn.get(key.encode(), db=self.db["meta"])
        return None if v is None else bytes(v)

    def reading_count(self) -> int:
        return int.from_bytes(self.meta("readings") or b"\0", "big")

    def head(self, node: bytes) -> tuple[int, bytes] | None:
        with self._read() as txn:
            v = txn.get(node, db=self.db["heads"])
        return None if v is None else (struct.unpack(">Q", v[:8])[0], bytes(v[8:]))

    def heads(self) -> dict[bytes, tuple[int, bytes]]:
        with self._read() as txn:
            return {
                bytes(k): (struct.unpack(">Q", v[:8])[0], bytes(v[8:]))
                for k, v in txn.cursor(db=self.db["heads"])
            }

    def raw_header(self, node: bytes, height: int) -> bytes | None:
        with self._read() as txn:
            v = txn.get(chain_key(node, height), db=self.db["headers"])
        return None if v is None else bytes(v)

    def header(self, node: bytes, height: int) -> BlockHeader | None:
        raw = self.raw_header(node, height)
        return None if raw is None else BlockHeader.decode(raw)

    def block_hash(self, node: bytes, height: int) -> bytes | None:
        """A stored block's hash: the stored header bytes are canonical; hash them as they are."""
        raw = self.raw_header(node, height)
        return None if raw is None else h(raw)

    def raw_block(self, node: bytes, height: int) -> tuple[bytes, bytes] | None:
        """(encoded header, encoded body) exactly as stored."""
        with self._read() as txn:
            k = chain_key(node, height)
            hv, bv = txn.get(k, db=self.db["headers"]), txn.get(k, db=self.db["bodies"])
        return None if hv is None or bv is None else (bytes(hv), bytes(bv))

    def block(self, node: bytes, height: int) -> Block | None:
        raw = self.raw_block(node, height)
        return None if raw is None else Block(BlockHeader.decode(raw[0]), decode_body(raw[1]))

    def iter_raw_chain(self, node: bytes) -> Iterator[tuple[int, bytes, bytes | None]]:
        """(height, header bytes, body bytes) in height order, as stored."""
        with self._read() as txn:
            cur = txn.cursor(db=self.db["headers"])
            bodies = txn.cursor(db=self.db["bodies"])
            if not cur.set_range(chain_key(node, 0)):
                return
            for k, v in cur:
                if k[:32] != node:
                    break
                yield (
                    struct.unpack(">Q", k[32:])[0],
                    bytes(v),
                    (bytes(b) if (b := bodies.get(k)) is not None else None),
                )

    def link_heights(self) -> dict[bytes, dict[bytes, int]]:
        """node -> chain -> the highest height of ``chain`` that ``node``'s blocks link to."""
        out: dict[bytes, dict[bytes, int]] = {}
        with self._read() as txn:
            for k, v in txn.cursor(db=self.db["links"]):
                out.setdefault(bytes(k[:32]), {})[bytes(k[32:])] = struct.unpack(">Q", v)[0]
        return out

    def seqmarks(self) -> dict[bytes, SeqMark]:
        with self._read() as txn:
            return {
                bytes(k): SeqMark.decode(bytes(v)) for k, v in txn.cursor(db=self.db["seqmarks"])
            }

    def control_entries(self) -> list[bytes]:
        """Every control transaction and proof in the replica, read back from the blocks."""
        with self._read() as txn:
            locs = [bytes(v) for _, v in txn.cursor(db=self.db["acl"])]
        return self.entries_at(locs)

    def entries_at(self, locs: list[bytes]) -> list[bytes]:
        """The entries at these locations (node(32) + height(8) + index(4)), as stored;
        each block is read and decoded once however many of its entries are asked for."""
        out: list[bytes] = []
        bodies: dict[bytes, tuple[bytes, ...]] = {}
        with self._read() as txn:
            for loc in locs:
                key = loc[:40]
                if key not in bodies:
                    body = txn.get(key, db=self.db["bodies"])
                    if body is None:
                        raise StorageError("an index points at a missing block")
                    bodies[key] = decode_body(bytes(body))
                out.append(bodies[key][struct.unpack(">I", loc[40:])[0]])
        return out

    # --- the sharing read path ----------------------------------------------

    def _name(self, txn: Any, kind: bytes, lid: bytes) -> bytes | None:
        v = txn.get(b"~" + kind + lid, db=self.db["names"])
        return None if v is None else bytes(v)

    def reading_blocks(
        self, patient: bytes, stream: str, from_ms: int, to_ms: int
    ) -> list[tuple[bytes, int, list[int]]]:
        """(node, height, entry indexes) of the blocks holding ``patient``'s ``stream``
        readings that *start* in [from_ms, to_ms] (a reading spans at most an hour, so
        the hours scanned begin one before ``from_ms``), in time order of the hour."""
        out: list[tuple[bytes, int, list[int]]] = []
        with self._read() as txn:
            names = self.db["names"]
            pid = txn.get(b"p" + patient, db=names)
            sid = txn.get(b"s" + stream.encode(), db=names)
            if sid is None and txn.get(b"#s", b"\0", db=names)[0] >= SHARED_STREAM[0] - 1:
                sid = SHARED_STREAM  # a stream named after the id space ran out
            if pid is None or sid is None:
                return out
            prefix = bytes(pid) + bytes(sid)
            lo = prefix + struct.pack(">I", min(0xFFFF_FFFF, max(0, from_ms // HOUR_MS - 1)))
            hi = to_ms // HOUR_MS
            nodes: dict[bytes, bytes | None] = {}
            cur = txn.cursor(db=self.db["readings"])
            if not cur.set_range(lo):
                return out
            for k, v in cur:
                if k[:5] != prefix or struct.unpack(">I", k[5:9])[0] > hi:
                    break
                nid = bytes(k[9:11])
                if nid not in nodes:
                    nodes[nid] = self._name(txn, b"n", nid)
                node = nodes[nid]
                if node is None:
                    raise StorageError("the readings index names an unknown chain")
                out.append(
                    (node, struct.unpack(">I", k[11:15])[0], unpack(bytes(v), max_len=1 << 20))
                )
        return out

    def audit_trail(
        self, patient: bytes, from_ms: int = 0, to_ms: int = 2**63 - 1
    ) -> list[tuple[bytes, bytes, int, int]]:
        """(entry, node, height, index) of every access log about ``patient`` logged in
        [from_ms, to_ms], from every chain, in time order.  One log copied into a
        second chain is listed once (at its first location in key order)."""
        with self._read() as txn:
            cur = txn.cursor(db=self.db["audit"])
            locs: list[bytes] = []
            if cur.set_range(patient + struct.pack(">Q", from_ms)):
                for k, v in cur:
                    if k[:32] != patient or struct.unpack(">Q", k[32:40])[0] > to_ms:
                        break
                    locs.append(bytes(v))
        seen: set[bytes] = set()
        out: list[tuple[bytes, bytes, int, int]] = []
        for e, loc in zip(self.entries_at(locs), locs, strict=True):
            if e in seen:
                continue
            seen.add(e)
            out.append(
                (e, loc[:32], struct.unpack(">Q", loc[32:40])[0], struct.unpack(">I", loc[40:])[0])
            )
        return out

    def prune_patient(self, patient: bytes, upto_ms: int) -> int:
        """Erase: replace every stored reading of ``patient`` that starts at or before
        ``upto_ms`` by its leaf hash, and drop it from the index.  Returns how many were
        pruned.  Headers, roots and every other entry stay, so every chain still verifies."""
        return int(self._write(self._prune, patient, upto_ms))

    def _prune(self, txn: Any, patient: bytes, upto_ms: int) -> int:
        pid = txn.get(b"p" + patient, db=self.db["names"])
        if pid is None:
            return 0
        pid = bytes(pid)
        buckets: list[tuple[bytes, list[int]]] = []
        cur = txn.cursor(db=self.db["readings"])
        if cur.set_range(pid):
            for k, v in cur:
                if k[:4] != pid:
                    break
                if struct.unpack(">I", k[5:9])[0] <= upto_ms // HOUR_MS:
                    buckets.append((bytes(k), unpack(bytes(v), max_len=1 << 20)))
        bodies: dict[bytes, list[bytes]] = {}
        changed: set[bytes] = set()
        n = 0
        for k, idx in buckets:
            node = self._name(txn, b"n", k[9:11])
            if node is None:
                raise StorageError("the readings index names an unknown chain")
            key = chain_key(node, struct.unpack(">I", k[11:15])[0])
            if key not in bodies:
                bodies[key] = list(decode_body(bytes(txn.get(key, db=self.db["bodies"]))))
            body, left = bodies[key], []
            for i in idx:
                if is_pruned(body[i]):
                    continue
                if Reading.decode(body[i]).t_ms <= upto_ms:
                    body[i] = pruned(body[i])
                    changed.add(key)
                    n += 1
                else:  # an hour bucket may straddle upto_ms: keep what is after it
                    left.append(i)
            if left:
                txn.put(k, pack(left), db=self.db["readings"])
            else:
                txn.delete(k, db=self.db["readings"])
        for key in changed:
            txn.put(key, encode_body(bodies[key]), db=self.db["bodies"])
        if changed:  # the old bodies' pages are free now, not blank: compact() clears them
            txn.put(COMPACT_DUE, b"\x01", db=self.db["meta"])
        return n

    def compact_due(self) -> bool:
        """Whether an erasure freed pages that still hold its payloads (until compact())."""
        return self.meta(COMPACT_DUE.decode()) is not None

    def compact(self) -> float:
        """Rewrite the environment with only its live records, so that no byte of an
        erased payload is left in ``data.mdb``: LMDB reuses freed pages but never blanks
        them, and not only free pages keep old bytes.  Its compacting copy
        (``MDB_CP_COMPACT``) is not enough either: a page LMDB recycles from its own pool
        of page buffers is not zeroed, so the tail of a live overflow page can still hold
        a body that was there before it was pruned, and the copy takes pages whole.  So the
        records are copied one by one into a fresh environment that never saw the erased
        bytes (its recycled buffers only ever held live records), in transactions of at
        most ``COMPACT_TXN_BYTES``.

        All of it under the writer lock; then, with every reader of this process held at
        the gate for the few milliseconds it takes, the environment is closed, the copy
        renamed over ``data.mdb`` (with a fresh lock file: the old one names the old
        file's last transaction) and reopened.  A crash before the rename leaves the old
        file and the flag that calls for this again on start; after it, the new one.  It
        costs one read and one write of the live data and blocks writers that long (the
        caller runs it in the writer thread, once per erasure batch).  Another process that
        has the store open (a read-only ``chain verify``) reads the old inode until it
        closes it.  Returns the seconds it took."""
        if self.readonly:
            raise StorageError("a read-only store cannot be compacted")
        with self._write_lock:
            t0 = time.perf_counter()
            tmp = self.path / COMPACT_NAME
            try:
                tmp.unlink(missing_ok=True)
                self._copy_live(tmp)
                with self._gate.exclusive():
                    self.env.close()
                    (self.path / "lock.mdb").unlink(missing_ok=True)
                    os.replace(tmp, self.path / "data.mdb")
                    dfd = os.open(self.path, os.O_RDONLY)
                    try:
                        os.fsync(dfd)
                    finally:
                        os.close(dfd)
                    self._open()
                    self._names.clear()
            except (OSError, lmdb.Error) as exc:
                raise StorageError(f"compacting the store failed: {exc}") from exc
            took = time.perf_counter() - t0
            self.compactions += 1
            self.compact_seconds += took
            return took

    def _copy_live(self, dest: Path) -> None:
        """Every record of every database, and nothing else, into a new file ``dest``."""
        self._map_size = max(self._map_size, self.env.info()["map_size"])
        new = lmdb.open(
            str(dest), map_size=self._map_size, max_dbs=len(_DBS), subdir=False, lock=False
        )
        try:
            with self.env.begin() as src:
                for name in _DBS:
                    ndb = new.open_db(name.encode(), create=True)
                    chunk: list[tuple[bytes, bytes]] = []
                    size = 0
                    for k, v in src.cursor(db=self.db[name]):
                        if name == "meta" and k == COMPACT_DUE:
                            continue
                        chunk.append((k, v))
                        size += len(k) + len(v)
                        if size >= COMPACT_TXN_BYTES:
                            self._put_all(new, ndb, chunk)
                            chunk, size = [], 0
                    self._put_all(new, ndb, chunk)
            new.sync(True)
        finally:
            new.close()

    @staticmethod
    def _put_all(env: Any, db: Any, items: list[tuple[bytes, bytes]]) -> None:
        if items:
            with env.begin(write=True) as txn:
                txn.cursor(db=db).putmulti(items, append=True)

    def disk_bytes(self) -> int:
        """Bytes of the store actually in use (pages up to the high-water mark)."""
        with self._gate.shared():
            info, stat = self.env.info(), self.env.stat()
        return int((info["last_pgno"] + 1) * stat["psize"])

    def statistics(self) -> dict[str, Any]:
        with self._gate.shared():
            info = self.env.info()
        return {
            "map_size": info["map_size"],
            "used_bytes": self.disk_bytes(),
            "readings": self.reading_count(),
            "compactions": self.compactions,
            "compact_seconds": round(self.compact_seconds, 3),
        }

    # --- checking and rebuilding the derived databases (meshhealth.store.derived) --

    def iter_all_raw(self) -> Iterator[tuple[bytes, bytes, bytes | None]]:
        """(node(32) + height(8), header bytes, body bytes) of every stored block, in key
        order (chain by chain, by height): the chains, whatever ``heads`` says."""
        with self._read() as txn:
            bodies = txn.cursor(db=self.db["bodies"])
            for k, v in txn.cursor(db=self.db["headers"]):
                b = bodies.get(k)
                yield bytes(k), bytes(v), (bytes(b) if b is not None else None)

    def bodies_without_header(self) -> list[bytes]:
        with self._read() as txn:
            headers = self.db["headers"]
            return [
                bytes(k)
                for k in txn.cursor(db=self.db["bodies"]).iternext(values=False)
                if txn.get(k, db=headers) is None
            ]

    def raw_items(self, db: str) -> dict[bytes, bytes]:
        """Every record of one database, as stored."""
        return dict(self.iter_items(db))

    def iter_items(self, db: str) -> Iterator[tuple[bytes, bytes]]:
        with self._read() as txn:
            for k, v in txn.cursor(db=self.db[db]):
                yield bytes(k), bytes(v)

    def raw_get(self, db: str, key: bytes) -> bytes | None:
        with self._read() as txn:
            v = txn.get(key, db=self.db[db])
        return None if v is None else bytes(v)

    def count(self, db: str) -> int:
        with self._read() as txn:
            return int(txn.stat(self.db[db])["entries"])

    def replace_derived(
        self,
        *,
        heads: dict[bytes, bytes],
        readings: Callable[[], Iterable[tuple[tuple[bytes, str, int, bytes, int], list[int]]]],
        seqmarks: dict[bytes, bytes],
        acl: dict[bytes, bytes],
        audit: dict[bytes, bytes],
        links: dict[bytes, bytes],
        reading_count: int,
    ) -> int:
        """Empty every derived database and write these records, in one transaction
        (``meshhealth store reindex``, with the node stopped); the names the readings
        index interns are minted afresh, in the order of ``readings()`` (called again if the
        map grows and the transaction is retried; it may read the blocks, which this
        does not change).
        Returns the readings index records written."""

        def write(txn: Any) -> int:
            n = 0
            for name in ("heads", "readings", "names", "seqmarks", "acl", "audit", "links"):
                txn.drop(self.db[name], delete=False)
            self._names.clear()
            for db, records in (
                ("heads", heads),
                ("seqmarks", seqmarks),
                ("acl", acl),
                ("audit", audit),
                ("links", links),
            ):
                for k, v in records.items():
                    txn.put(k, v, db=self.db[db])
            for (patient, stream, hour, node, height), idx in readings():
                bkey = (
                    self._name_id(txn, b"p", patient, 4)
                    + self._name_id(txn, b"s", stream.encode(), 1, shared=SHARED_STREAM)
                    + struct.pack(">I", hour)
                    + self._name_id(txn, b"n", node, 2)
                    + struct.pack(">I", height)
                )
                old = txn.get(bkey, db=self.db["readings"])
                if old is not None:  # streams that share an id: one record for them all
                    idx = sorted({*unpack(bytes(old), max_len=1 << 20), *idx})
                    n -= 1
                txn.put(bkey, pack(idx), db=self.db["readings"])
                n += 1
            txn.put(b"readings", reading_count.to_bytes(8, "big"), db=self.db["meta"])
            txn.put(AUDIT_FORMAT, AUDIT_FORMAT_V, db=self.db["meta"])
            return n

        return int(self._write(write))


def open_by(path: Path) -> int | None:
    """The pid of a process that has the LMDB store at ``path`` open, or None.

    Every process that opens an environment holds a shared POSIX record lock on
    the first byte of ``lock.mdb`` until it closes it (LMDB's ``mdb_env_excl_lock``);
    the kernel drops it when the process dies, even by ``kill -9``.  Asking for
    the exclusive lock (``F_GETLK``, which takes nothing) tells whether anyone
    holds it, and who.  Call it before this process opens the store itself:
    POSIX locks are per process, so our own would not show.
    """
    import fcntl

    lockfile = path / "lock.mdb"
    if not lockfile.exists():
        return None
    try:
        fd = os.open(lockfile, os.O_RDONLY)  # F_GETLK asks; it needs no write access
    except OSError as exc:
        raise StorageError(f"cannot read {lockfile}: {exc}") from exc
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        got = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
    finally:
        os.close(fd)
    return None if got[0] == fcntl.F_UNLCK else int(got[4])
