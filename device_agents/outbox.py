"""A device's persistent outbox (LMDB): nothing leaves it until a receipt covers it.

Keys::

    b"r" + device(32) + seq(8)  -> encoded, signed reading
    b"d" + device(32)           -> the device's state (key seed, patient,
                                   next seq, stream key cursors)
    b"a" + device(32) + node(32) -> the latest receipt (A2, signed) of that
                                   authority that deleted readings: what it
                                   claims to store, and in which block
    b"s" + device(32)           -> seq(8): the highest seq actually published
                                   (written after the publish returned): a
                                   restarted agent refuses receipts above it,
                                   so readings produced but never sent cannot
                                   be deleted by a lying receipt

A reading and the device's next sequence number are written in one
transaction, so a restarted agent never reuses a sequence number (which
would also reuse nothing cryptographic: nonces are random).  The directory
holds device secrets; it is created with mode 0700.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from meshhealth.wire.codec import pack, unpack


class Outbox:
    def __init__(self, path: Path, *, map_size_mb: int = 256) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
        self.path = path
        self.env = lmdb.open(str(path), map_size=map_size_mb << 20, max_dbs=1)
        self._counts: dict[bytes, int] = {}
        self._lock = threading.RLock()  # compact() swaps the environment under it

    def compact(self) -> None:
        """Rewrite the outbox from its live records into a fresh file swapped in for the
        old one: LMDB keeps the bytes of the pages it frees, so a device state written
        before (a retired key chain's cursor, which opens that chain's later epochs)
        stays in the file until this runs.  Called once a device forgets a retired chain."""
        with self._lock:
            tmp = self.path / "data.mdb.compact"
            tmp.unlink(missing_ok=True)
            map_size = self.env.info()["map_size"]
            new = lmdb.open(str(tmp), map_size=map_size, subdir=False, lock=False)
            try:
                with self.env.begin() as src, new.begin(write=True) as dst:
                    dst.cursor().putmulti(iter(src.cursor()), append=True)
                new.sync(True)
            finally:
                new.close()
            self.env.close()
            (self.path / "lock.mdb").unlink(missing_ok=True)  # it names the old file's txns
            os.replace(tmp, self.path / "data.mdb")
            self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=1)

    def close(self) -> None:
        self.env.close()

    def _write(self, fn: Any) -> Any:
        with self._lock:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def save_state(self, device: bytes, state: list[Any]) -> None:
        self._write(lambda txn: txn.put(b"d" + device, pack(state)))

    def states(self) -> dict[bytes, list[Any]]:
        with self._lock, self.env.begin() as txn:
            cur = txn.cursor()
            out = {}
            if cur.set_range(b"d"):
                for k, v in cur:
                    if k[:1] != b"d":
                        break
                    out[bytes(k[1:])] = unpack(bytes(v), max_len=1 << 20)
            return out

    def put(self, device: bytes, seq: int, reading: bytes, state: list[Any]) -> None:
        def fn(txn: Any) -> None:
            txn.put(b"r" + device + struct.pack(">Q", seq), reading)
            txn.put(b"d" + device, pack(state))

        self._write(fn)

    def put_many(
        self, items: list[tuple[bytes, int, bytes]], states: dict[bytes, list[Any]]
    ) -> None:
        """Store many readings (and the devices' new states) in one transaction."""

        def fn(txn: Any) -> None:
            for device, seq, reading in items:
                txn.put(b"r" + device + struct.pack(">Q", seq), reading)
            for device, state in states.items():
                txn.put(b"d" + device, pack(state))

        self._write(fn)

    def sent(self, device: bytes) -> int:
        """The highest seq of ``device`` published (0: none known; an outbox from before
        this record counts nothing as sent: its unreceipted readings are re-sent on the
        first connection anyway, and receipts above what is re-sent are refused)."""
        with self._lock, self.env.begin() as txn:
            v = txn.get(b"s" + device)
        return 0 if v is None else int(struct.unpack(">Q", v)[0])

    def mark_sent(self, device: bytes, seq: int) -> None:
        """Record that ``device``'s readings up to ``seq`` were published (never lowers)."""

        def fn(txn: Any) -> None:
            v = txn.get(b"s" + device)
            if v is None or struct.unpack(">Q", v)[0] < seq:
                txn.put(b"s" + device, struct.pack(">Q", seq))

        self._write(fn)

    def ack(self, device: bytes, upto: int, node: bytes = b"", receipt: bytes = b"") -> int:
        """Drop every reading of ``device`` with seq <= ``upto``; returns how many.
        ``receipt`` (signed by authority ``node``) is kept, in the same transaction."""

        def fn(txn: Any) -> int:
            if receipt:
                txn.put(b"a" + device + node, receipt)
            cur = txn.cursor()
            n = 0
            prefix = b"r" + device
            if cur.set_range(prefix):
                while cur.key()[:33] == prefix and struct.unpack(">Q", cur.key()[33:])[0] <= upto:
                    if not cur.delete():
                        break
                    n += 1
            return n

        return int(self._write(fn))

    def receipts(self, device: bytes) -> dict[bytes, bytes]:
        """Authority -> the latest receipt of it that deleted ``device``'s readings."""
        with self._lock, self.env.begin() as txn:
            cur = txn.cursor()
            prefix = b"a" + device
            out = {}
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:33] != prefix:
                        break
                    out[bytes(k[33:])] = bytes(v)
            return out

    def pending(
        self, device: bytes, after: int = 0, limit: int = 1 << 30
    ) -> Iterator[tuple[int, bytes]]:
        """(seq, reading) of ``device`` above ``after``, in seq order."""
        with self._lock, self.env.begin() as txn:
            cur = txn.cursor()
            prefix = b"r" + device
            n = 0
            if cur.set_range(prefix + struct.pack(">Q", after + 1)):
                for k, v in cur:
                    if k[:33] != prefix or n >= limit:
                        break
                    n += 1
                    yield struct.unpack(">Q", k[33:])[0], bytes(v)

    def count(self, device: bytes | None = None) -> int:
        with self._lock, self.env.begin() as txn:
            cur = txn.cursor()
            prefix = b"r" + (device or b"")
            n = 0
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if k[: len(prefix)] != prefix:
                        break
                    n += 1
            return n
