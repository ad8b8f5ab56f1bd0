"""The async ingest shell: raw payloads in, committed blocks and receipts out.

Three tasks share the work:

* ``_verify_loop`` takes chunks of raw payloads off the inbox and ships them
  to the verifier processes, keeping a bounded number of chunks in flight and
  consuming the results in submission order (so a device's readings are
  admitted in the order they arrived).
* ``_seal_loop`` seals the batch when it is full or its interval has passed,
  commits it in the single LMDB writer thread, then publishes receipts.
* The MQTT callback only appends to the inbox; past ``max_backlog`` it drops
  (counted as ``overload``): the devices still hold those readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from meshhealth.errors import MalformedMessage, Rejected
from meshhealth.ingest import verify
from meshhealth.ingest.batcher import Batcher, make_receipt
from meshhealth.ingest.commit import Commit
from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import EquivocationProof, decode_control
from meshhealth.workers import forkserver_pool

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]


VERIFY_PART = 512  # entries per verifier call when checking peers' blocks


COMPACT_EVERY_S = 30.0  # the least time between two compactions after erasures


@dataclass
class _VerifyJob:
    """Part ``index`` of one block's entries; the block's future completes with its last part."""

    entries: list[bytes]
    block: asyncio.Future[list[verify.Result]]
    parts: list[list[verify.Result] | None]
    index: int

    def done(self, fut: asyncio.Future[list[verify.Result]]) -> None:
        if self.block.done():
            return
        if fut.cancelled():
            self.block.cancel()
            return
        if fut.exception() is not None:
            self.block.set_exception(fut.exception())  # type: ignore[arg-type]
            return
        self.parts[self.index] = fut.result()
        if all(p is not None for p in self.parts):
            self.block.set_result([r for p in self.parts if p is not None for r in p])


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Pipeline:
    def __init__(
        self,
        batcher: Batcher,
        store: Store,
        *,
        workers: int,
        chunk_size: int,
        max_backlog: int,
        receipts_topic: str,
        publish: Publish,
    ) -> None:
        self.batcher = batcher
        self.store = store
        self.chunk_size = chunk_size
        self.max_backlog = max_backlog
        self.receipts_topic = receipts_topic
        self.publish = publish
        self.workers = workers
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._wake = asyncio.Event()
        self._seal_now = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        # cleared until the node knows its own chain's head (see GossipShell.sync_own_chain):
        # sealing before then could sign a second block at a height peers already hold
        self.may_seal = asyncio.Event()
        self.may_seal.set()
        self.committed: dict[bytes, SeqMark] = store.seqmarks()
        # device -> the highest seq we took from it that no receipt of ours covers yet
        self._owed: dict[bytes, int] = {}
        # device -> (chain, height, hash) of the block whose commit last moved its
        # contiguous mark: the block a receipt names (one entry per device in ``committed``)
        self._held: dict[bytes, tuple[bytes, int, bytes]] = {}
        # also receipt the readings other chains bring us (devices that wait for receipts
        # from several authorities before deleting; off: receipts only for what we took in)
        self.receipt_replicated = False
        self.received = 0
        self.blocks = 0
        self.committed_readings = store.reading_count()
        self.sealed_readings = 0  # readings in our own blocks since start (metrics)
        self.commit_seconds = 0.0
        self.pruned = 0  # readings erased from this store since start
        self._next_compact = 0.0  # monotonic time the next compaction may start
        self._pool: Executor | None = None
        # held while a block (ours or a peer's) is admitted and committed: one writer of state
        self.apply_lock = asyncio.Lock()
        self.on_block: Callable[[Commit], None] | None = None  # after each local commit
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="lmdb-writer")
        # peers' blocks waiting for the verifier processes (see verify_blocks)
        self._verify_queue: deque[deque[_VerifyJob]] = deque()
        self._verifying = 0

    # --- inputs -----------------------------------------------------------

    def on_payload(self, topic: str, payload: bytes) -> None:
        self.received += 1
        if len(self._inbox) >= self.max_backlog:
            self.batcher.reject("overload")
            return
        self._inbox.append((topic, payload))
        if len(self._inbox) in (1, self.chunk_size):  # the loop is idle, or a chunk is full
            self._wake.set()

    def submit_tx(self, raw: bytes) -> bytes:
        """Admit a control transaction from the API; raises on anything bad."""
        try:
            tx = decode_control(raw)
        except MalformedMessage:
            self.batcher.reject("malformed_tx")
            raise
        try:
            tid = self.batcher.admit_tx(raw, tx, now_ms())
        except Rejected as exc:
            self.batcher.reject(exc.reason)
            raise
        self.check_full()
        return tid

    def submit_proof(self, proof: EquivocationProof) -> bool:
        """Put an equivocation proof we found in our next block; False if already known."""
        added = self.batcher.admit_proof(proof, now_ms())
        if added:
            self.check_full()
        return added

    # --- tasks ------------------------------------------------------------

    async def run(self) -> None:
        if self.workers > 0:
            # workers need only the verifier, not the node's aiohttp/MQTT stack; they (and
            # the forkserver and resource tracker) exit when the node does, even by kill -9
            self._pool = forkserver_pool(self.workers, ["meshhealth.ingest.verify"])
            # start every worker now, not when the first readings (or a catch-up) arrive
            loop = asyncio.get_running_loop()
            await asyncio.gather(
                *(
                    loop.run_in_executor(self._pool, verify.check_chunk, [])
                    for _ in range(self.workers)
                )
            )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._verify_loop())
                tg.create_task(self._seal_loop())
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
            self._writer.shutdown(wait=True)

    async def _verify_loop(self) -> None:
        loop = asyncio.get_running_loop()
        in_flight: deque[tuple[list[str], list[bytes], asyncio.Future[list[verify.Result]]]]
        in_flight = deque()
        limit = max(1, 2 * self.workers)
        while True:
            if not self._inbox and not in_flight:
                # idle: sleep until a payload arrives (no polling), then give a chunk up to
                # 5 ms to fill, so a trickle still ships in chunks rather than one by one
                self._wake.clear()
                await self._wake.wait()
                if len(self._inbox) < self.chunk_size:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 0.005)
            elif not self._inbox or len(in_flight) >= limit:
                topics, payloads, fut = in_flight.popleft()
                await self._admit(topics, payloads, await fut)
                continue
            if not self._inbox:
                continue
            n = min(self.chunk_size, len(self._inbox))
            chunk = [self._inbox.popleft() for _ in range(n)]
            topics = [t for t, _ in chunk]
            payloads = [p for _, p in chunk]
            if self._pool is None:
                await self._admit(topics, payloads, verify.check_chunk(payloads))
            else:
                fut = loop.run_in_executor(self._pool, verify.check_chunk, payloads)
                in_flight.append((topics, payloads, fut))

    async def _admit(
        self, topics: list[str], payloads: list[bytes], results: list[verify.Result]
    ) -> None:
        b = self.batcher
        t = now_ms()
        for i, (topic, res) in enumerate(zip(topics, results, strict=True)):
            if res[0] is not None:
                b.reject(res[0])
                continue
            r = verify.rebuild(res)
            try:
                dev = bytes.fromhex(topic.rsplit("/", 1)[-1])
            except ValueError:
                dev = b""
            try:
                b.admit_reading(payloads[i], r, t, topic_device=dev)
            except Rejected as exc:
                b.reject(exc.reason)
            else:
                self._owed[r.device] = max(self._owed.get(r.device, -1), r.seq)
            if b.full():
                self.check_full()
                await self._room.wait()

    def check_full(self) -> None:
        if self.batcher.full():
            self._room.clear()
            self._seal_now.set()

    async def _seal_loop(self) -> None:
        loop = asyncio.get_running_loop()
        b = self.batcher
        while True:
            deadline = b.deadline_ms()
            wait_s = 0.05 if deadline is None else max(0.0, (deadline - now_ms()) / 1000)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._seal_now.wait(), wait_s)
            self._seal_now.clear()
            await self.may_seal.wait()
            if not b.due(now_ms()):
                if b.want_receipt:
                    self._send_receipts(set())
                continue
            async with self.apply_lock:
                t0 = time.perf_counter()
                commit = b.seal(now_ms())
                self._room.set()
                await loop.run_in_executor(self._writer, self.store.commit_block, commit)
                self.commit_seconds += time.perf_counter() - t0
                self._on_committed(commit)
                await self.prune_erased()

    async def commit_remote(self, c: Commit) -> None:
        """Write a peer's admitted block (the caller holds ``apply_lock``)."""
        await asyncio.get_running_loop().run_in_executor(self._writer, self.store.commit_block, c)
        self._note_held(c)
        await self.prune_erased()
        # a device whose readings a shared subscription split across nodes: our last
        # receipt stopped at a gap another chain has just filled; the device waits for us
        owed = {d for d in c.seqmarks if d in self._owed or self.receipt_replicated}
        if owed:
            self._send_receipts(owed)

    async def prune_erased(self) -> None:
        """Carry out the erasures applied since the last call: the patients' stored
        payloads become leaf hashes (in the writer thread, like every other write), and
        then the store is compacted so that no freed page keeps the payloads' bytes."""
        loop = asyncio.get_running_loop()
        while self.batcher.erasures_due:
            patient, upto = self.batcher.erasures_due.pop()
            n = await loop.run_in_executor(self._writer, self.store.prune_patient, patient, upto)
            self.pruned += n
            log.info("erased %d readings of patient %s", n, patient.hex()[:8])
        # once per batch of erasures, not once per patient, and at most every
        # COMPACT_EVERY_S (each costs a pass over the whole store with writes held up):
        # a patient erasing again and again cannot keep the writer busy compacting
        if self.store.compact_due() and time.monotonic() >= self._next_compact:
            took = await loop.run_in_executor(self._writer, self.store.compact)
            self._next_compact = time.monotonic() + COMPACT_EVERY_S
            log.info("compacted the store after an erasure in %.3f s", took)

    def verify_blocks(self, bodies: list[list[bytes]]) -> list[asyncio.Future[list[verify.Result]]]:
        """Start checking the entries of several blocks; one future per block.

        A catch-up receives blocks in batches, one batch per chain, and a
        block of one chain usually needs blocks of the others first (its
        links).  So the blocks are checked in the verifier processes in
        parts of at most ``VERIFY_PART`` entries, taken round-robin from
        every batch waiting, a few parts in flight at a time: the lowest
        blocks of every chain are checked first, and the caller admits and
        commits them while the workers go on with the rest.
        """
        loop = asyncio.get_running_loop()
        out: list[asyncio.Future[list[verify.Result]]] = [loop.create_future() for _ in bodies]
        if self._pool is None or sum(map(len, bodies)) < 64:
            for fut, body in zip(out, bodies, strict=True):
                fut.set_result(verify.check_entries(body))
            return out
        jobs: deque[_VerifyJob] = deque()
        for fut, body in zip(out, bodies, strict=True):
            if not body:
                fut.set_result([])
                continue
            parts = [body[i : i + VERIFY_PART] for i in range(0, len(body), VERIFY_PART)]
            slots: list[list[verify.Result] | None] = [None] * len(parts)
            jobs.extend(_VerifyJob(part, fut, slots, k) for k, part in enumerate(parts))
        if jobs:
            self._verify_queue.append(jobs)
            self._pump_verify()
        return out

    def _pump_verify(self) -> None:
        assert self._pool is not None
        loop = asyncio.get_running_loop()
        while self._verify_queue and self._verifying < 2 * self.workers:
            batch = self._verify_queue.popleft()
            job = batch.popleft()
            if batch:
                self._verify_queue.append(batch)  # round-robin over the waiting batches
            if job.block.done():
                continue  # its block was dropped (the caller cancelled it): no work, no memory
            self._verifying += 1
            fut = loop.run_in_executor(self._pool, verify.check_entries, job.entries)
            fut.add_done_callback(job.done)
            fut.add_done_callback(self._verify_done)

    def _verify_done(self, _: asyncio.Future[list[verify.Result]]) -> None:
        self._verifying -= 1
        self._pump_verify()

    def _on_committed(self, c: Commit) -> None:
        if self.on_block is not None:
            self.on_block(c)
        self.blocks += 1
        self.committed_readings += len(c.readings)
        self.sealed_readings += len(c.readings)
        self._note_held(c)
        self._send_receipts(set(c.seqmarks))

    def _note_held(self, c: Commit) -> None:
        """Take in a committed block's seq marks; where a device's contiguous mark moved,
        this block holds the reading at the old mark + 1, which the new mark covers."""
        hdr = c.block.header
        where = (hdr.node, hdr.height, c.block.hash)
        for d, mark in c.seqmarks.items():
            old = self.committed.get(d)
            if old is None or mark.contiguous > old.contiguous:
                self._held[d] = where
            self.committed[d] = mark

    def _send_receipts(self, devices: set[bytes]) -> None:
        b = self.batcher
        devices |= b.want_receipt
        b.want_receipt = set()
        t = now_ms()
        for d in devices:
            mark = self.committed.get(d)
            if mark is None or mark.contiguous == 0:
                continue
            block = self._held.get(d)
            if block is None:
                # committed before this process started: name our own head, which
                # follows every block holding them in our replica
                if b.height < 0:
                    continue
                block = (b.me, b.height, b.prev)
            rc = make_receipt(b.key, b.network, d, mark, block, t)
            self.publish(self.receipts_topic.format(device=d.hex()), rc.encode())
            if mark.contiguous >= self._owed.get(d, -1):
                self._owed.pop(d, None)

    def statistics(self) -> dict[str, Any]:
        b = self.batcher
        return {
            "received": self.received,
            "accepted": b.accepted,
            "rejects": dict(b.rejects),
            "rejected": sum(b.rejects.values()),
            "backlog": len(self._inbox),
            "pending": b.pending,
            "blocks_sealed": self.blocks,
            "height": b.height,
            "readings_committed": self.committed_readings,
            "commit_seconds": round(self.commit_seconds, 3),
            "erased_readings": self.pruned,
        }

    async def flush(self) -> None:
        """Seal and commit whatever is batched (graceful stop; the writer thread is done)."""
        if self.batcher.pending and self.may_seal.is_set():
            commit = self.batcher.seal(now_ms())
            await asyncio.to_thread(self.store.commit_block, commit)
            self._on_committed(commit)
