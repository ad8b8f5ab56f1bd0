"""The pure heart of ingest: admit entries, batch them, seal blocks.

No I/O here.  The shell feeds it verified readings and control transactions
with the current time, asks ``due(now)`` and, when due, calls ``seal(now)``
to get a :class:`Commit` for the store.  Policy checks that need state live
here; checks that need only the bytes (size, decoding, signature) run
before, in the verifier processes.

Bounds: a block's encoded body is at most ``ingest.max_block_bytes`` (never
more than ``MAX_BLOCK_BYTES``, what every peer decodes) and ``max_entries``,
counted exactly as :func:`~meshhealth.chain.block.encode_body` will encode
it; its header links at most ``MAX_LINKS`` chains.  An entry that does not
fit goes into the next block; at most two blocks' worth wait (else ``busy``),
and :meth:`Batcher.seal` decodes what it is about to sign before signing.

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
from meshhealth.chain.block import (
    MAX_BLOCK_BYTES,
    MAX_BLOCK_ENTRIES,
    build_block,
    decode_body,
    encode_body,
)
from meshhealth.crypto.hashing import h
from meshhealth.errors import LocalError, MalformedMessage, Rejected, RemoteError
from meshhealth.ingest import seqmarks
from meshhealth.ingest.commit import Commit, IndexedReading
from meshhealth.ingest.seqmarks import MAX_ABOVE_STORED, SeqMark
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
from meshhealth.wire.codec import bin_size
from meshhealth.wire.types import MAX_HEADER, MAX_LINKS, MAX_READING


@dataclass
class BatchLimits:
    interval_ms: int = 1000
    max_entries: int = 4_096
    max_bytes: int = 8 * 1024 * 1024
    max_future_skew_ms: int = 30_000
    # per device: committed seqs above a gap we take in (None: seqmarks.MAX_ABOVE)
    max_seq_gap: int | None = None
    # per other authority's chain: body bytes admitted per hour of its blocks' header times
    # (None: unbounded); see replica.admit_remote
    chain_bytes_per_hour: int | None = 2 * 1024**3

    @property
    def max_seq_gap_local(self) -> int:
        """The bound on a device's seqs above a gap that local ingest lets in."""
        return min(self.max_seq_gap or seqmarks.MAX_ABOVE, MAX_ABOVE_STORED)

    @property
    def max_seq_gap_stored(self) -> int:
        """The bound on a device's seqs above a gap in a *peer's* block (see seqmarks)."""
        return min(MAX_ABOVE_STORED, 4 * (self.max_seq_gap or seqmarks.MAX_ABOVE))


MAX_BATCHES = 2  # the block being built, and the next one (an entry too big for the first)


def _array_len(n: int) -> int:
    """Bytes of the msgpack array header of an ``n``-entry body."""
    return 1 if n < 16 else 3 if n < 1 << 16 else 5


def body_size(entry_sizes: list[int]) -> int:
    """The exact size of :func:`encode_body` of entries of these sizes."""
    return _array_len(len(entry_sizes)) + sum(bin_size(n) for n in entry_sizes)


@dataclass
class _Batch:
    """One block's worth of entries, with what the store needs to know about them."""

    entries: list[bytes] = field(default_factory=list)
    readings: list[IndexedReading] = field(default_factory=list)
    txs: list[tuple[bytes, int]] = field(default_factory=list)
    seqs: dict[bytes, set[int]] = field(default_factory=dict)  # per device
    audit: list[tuple[bytes, int, bytes, int]] = field(default_factory=list)
    payload: int = 0  # encoded bytes of the entries (without the array header)
    started_ms: int | None = None

    def size_with(self, n: int) -> int:
        """The encoded body's size if an ``n``-byte entry were added."""
        return _array_len(len(self.entries) + 1) + self.payload + bin_size(n)


@dataclass
class Batcher:
    """Admits entries into bounded batches and seals each as one block.

    Every batch's encoded body stays within ``max_bytes`` (at most
    :data:`MAX_BLOCK_BYTES`, what every peer's decoder takes) and
    ``max_entries``: an entry that would push the batch being built past
    either goes into the next batch, and when that one is full too it is
    refused (``busy``) before it changes any state.  So at most
    ``MAX_BATCHES`` blocks' worth of entries wait in memory, and a sealed
    block always decodes with :func:`decode_body`.
    """

    key: nacl.signing.SigningKey
    network: bytes
    limits: BatchLimits
    access: AccessState
    marks: dict[bytes, SeqMark]
    height: int = -1  # height of the last sealed block
    prev: bytes = b""  # hash of the last sealed block (network id before the first)
    rejects: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    # the batches being built: the first is sealed next
    _batches: list[_Batch] = field(default_factory=lambda: [_Batch()])
    # devices that re-sent committed readings: they need a fresh receipt
    want_receipt: set[bytes] = field(default_factory=set)
    # other chains' heads that advanced since our last block: the next block links them
    _links_due: dict[bytes, Link] = field(default_factory=dict)
    # authorities proven to have equivocated -> the height of the first proof
    faulty: dict[bytes, int] = field(default_factory=dict)
    # erasures applied since the shell last pruned the store: (patient, up to ts_ms)
    erasures_due: list[tuple[bytes, int]] = field(default_factory=list)
    # the network's authorities: a peer's block may link only to their chains (empty: any)
    authorities: frozenset[bytes] = frozenset()
    # per other chain: (latest header ts seen, its hour, body bytes charged to that hour)
    chain_rate: dict[bytes, tuple[int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prev:
            self.prev = self.network
        self.me = bytes(self.key.verify_key)
        # the network-wide bounds hold whatever the configuration says
        self.max_bytes = min(self.limits.max_bytes, MAX_BLOCK_BYTES)
        self.max_entries = min(self.limits.max_entries, MAX_BLOCK_ENTRIES)

    # --- admission --------------------------------------------------------

    def is_pending(self, device: bytes, seq: int) -> bool:
        return any(seq in b.seqs.get(device, ()) for b in self._batches)

    def _pending_seqs(self, device: bytes) -> int:
        return sum(len(b.seqs.get(device, ())) for b in self._batches)

    def pending_seqs(self, device: bytes) -> list[int]:
        """The device's seqs waiting in our batches (they join its mark when sealed)."""
        return [s for b in self._batches for s in b.seqs.get(device, ())]

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
        first = self._batches[0]
        if carries_entries and first.started_ms is None:
            first.started_ms = now_ms

    def reject(self, reason: str) -> None:
        self.rejects[reason] += 1

    def has_room(self, n: int) -> bool:
        """Whether an ``n``-byte entry would be admitted now (not refused as ``busy``)."""
        try:
            self._place(n, dry=True)
        except Rejected:
            return False
        return True

    def _place(self, n: int, *, proof: bool = False, dry: bool = False) -> _Batch:
        """The batch an ``n``-byte entry goes in; raises :class:`Rejected` if none may take
        it.  Called before an admission changes any state.  An equivocation proof always
        finds a batch (there is at most one per authority, ever)."""
        if _array_len(1) + bin_size(n) > self.max_bytes:
            raise Rejected("oversized", f"an entry of {n} bytes exceeds the block bound")
        last = self._batches[-1]
        if len(last.entries) < self.max_entries and last.size_with(n) <= self.max_bytes:
            return last
        if len(self._batches) >= MAX_BATCHES and not proof:
            raise Rejected("busy", "the next blocks are full; retry in a moment")
        nxt = _Batch()
        if not dry:
            self._batches.append(nxt)
        return nxt

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
            mark = SeqMark()
        if mark.has(r.seq) or self.is_pending(r.device, r.seq):
            self.want_receipt.add(r.device)
            raise Rejected("duplicate", f"seq {r.seq} already stored")
        gaps = self._pending_seqs(r.device)
        # what is stored after the seal: the mark, every pending seq and this one; a peer's
        # block may have filled the mark past our local bound (room only for the gap)
        if not mark.room_for(r.seq, pending=gaps, bound=self.limits.max_seq_gap_local):
            raise Rejected("seq_window", "too many readings above a gap; re-send the gap first")
        batch = self._place(len(raw))
        self.marks.setdefault(r.device, mark)
        batch.seqs.setdefault(r.device, set()).add(r.seq)
        self._add(batch, raw, now_ms)
        batch.readings.append(IndexedReading(len(batch.entries) - 1, r.patient, r.stream, r.t_ms))

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
        if tid in self.access.seen:
            raise Rejected("duplicate_tx", tid.hex()[:16])
        batch = self._place(len(raw))
        if not self.access.apply(tx):
            raise Rejected("duplicate_tx", tid.hex()[:16])
        if isinstance(tx, Erase):
            self.erasures_due.append((tx.patient, tx.ts_ms))
        self._add(batch, raw, now_ms)
        batch.txs.append((tid, len(batch.entries) - 1))
        return tid

    def admit_proof(self, proof: EquivocationProof, now_ms: int) -> bool:
        """Put a checked equivocation proof in the batch; False if its node is known faulty."""
        a, _ = proof.headers()
        if a.network != self.network:
            raise Rejected("bad_proof", "equivocation proof of another network")
        if a.node in self.faulty:
            return False
        raw = proof.encode()
        batch = self._place(len(raw), proof=True)
        self.faulty[a.node] = a.height
        self._add(batch, raw, now_ms)
        batch.txs.append((h(raw), len(batch.entries) - 1))
        return True

    def admit_log(self, log: AccessLog | AccessLogV2, now_ms: int) -> None:
        """Put an access log this node signed in its next block (the patient's audit trail);
        raises :class:`Rejected` (``busy``) when the next blocks are full."""
        raw = log.encode()
        batch = self._place(len(raw))
        self._add(batch, raw, now_ms)
        batch.audit.append((log.patient, log.ts_ms, log.request, len(batch.entries) - 1))

    def _add(self, batch: _Batch, raw: bytes, now_ms: int) -> None:
        if batch.started_ms is None:
            batch.started_ms = now_ms
        batch.entries.append(raw)
        batch.payload += bin_size(len(raw))
        self.accepted += 1

    # --- sealing ----------------------------------------------------------

    @property
    def pending(self) -> int:
        return sum(len(b.entries) for b in self._batches)

    def full(self) -> bool:
        """The block being built should be sealed now: it cannot take another maximal
        reading, or entries already wait for the block after it."""
        first = self._batches[0]
        return (
            len(self._batches) > 1
            or len(first.entries) >= self.max_entries
            or first.size_with(MAX_READING) > self.max_bytes
        )

    def due(self, now_ms: int) -> bool:
        started = self._batches[0].started_ms
        if started is None:
            return False
        return self.full() or now_ms - started >= self.limits.interval_ms

    def deadline_ms(self) -> int | None:
        """When the current batch becomes due by time alone."""
        started = self._batches[0].started_ms
        return None if started is None else started + self.limits.interval_ms

    def seal(self, now_ms: int) -> Commit:
        batch = self._batches[0]
        body = encode_body(batch.entries)
        # never sign what a peer's decoder (or our own start-up replay) would refuse
        try:
            ok = len(body) <= self.max_bytes and decode_body(body) == tuple(batch.entries)
        except MalformedMessage:
            ok = False
        if not ok:
            raise LocalError(f"refusing to seal a {len(body)}-byte body that does not decode")
        touched: dict[bytes, SeqMark] = {}
        for device, seqs in batch.seqs.items():
            if not seqs:
                continue
            mark = self.marks[device].copy()
            for s in seqs:
                mark.add(s)
            # admission keeps every mark within the stored bound (admit_reading and
            # replica.admit_remote count pending seqs): never sign a block whose commit
            # could not store its marks
            if len(mark.above) > MAX_ABOVE_STORED:
                raise LocalError(f"refusing to seal: a seq mark of {len(mark.above)} gaps")
            touched[device] = mark
        links = list(self._links_due.values())[:MAX_LINKS]  # the rest go in the next block
        block = build_block(
            self.key,
            network=self.network,
            height=self.height + 1,
            prev=self.prev,
            ts_ms=now_ms,
            entries=batch.entries,
            links=links,
        )
        if len(block.header.encode()) > MAX_HEADER:
            raise LocalError("refusing to seal a block header over its bound")
        for link in links:
            del self._links_due[link.node]
        for device, mark in touched.items():  # the marks change only once the block is built
            held = self.marks[device]
            held.contiguous, held.above = mark.contiguous, set(mark.above)
        # readings batched before their patient's erasure reached us (from a peer's block
        # while they waited here): sealed as received, stored as leaf hashes only
        prune = frozenset(
            r.index for r in batch.readings if self.access.erased.get(r.patient, -1) >= r.t_ms
        )
        commit = Commit(
            block, tuple(batch.readings), touched, tuple(batch.txs), tuple(batch.audit), prune
        )
        self.height, self.prev = block.header.height, block.hash
        self._batches.pop(0)
        if not self._batches:
            self._batches.append(_Batch())
        if self._links_due and self._batches[0].started_ms is None:
            self._batches[0].started_ms = now_ms  # links left over: they go in the next block
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
