"""The gossip shell: websockets between nodes, driving the pure gossip core.

Each node dials every peer URL it was given and accepts connections on
``/v1/gossip``.  A connection starts with the mutual signed handshake
(:mod:`meshhealth.gossip.handshake`); after it, every frame is one
canonical gossip message.  Each peer has a bounded send queue.  When it is
full, pushes and digests are dropped and counted rather than waited for,
so a slow peer never stalls the others, and anti-entropy repairs whatever
a drop cost.

Received blocks are validated here, before the core hears of them:
header against the replica's head, entries in the verifier processes,
then :func:`meshhealth.ingest.replica.admit_remote` and the commit, under
the same lock as our own blocks.  A block above the head, or one whose
links we lack, waits in a bounded buffer while the gap is pulled.  A peer
that sends an invalid block is penalised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from meshhealth.chain.block import decode_body, verify_header
from meshhealth.errors import InvalidBlock, RemoteError
from meshhealth.gossip import handshake as hs
from meshhealth.gossip import wire
from meshhealth.gossip.messages import Blocks, Push, Send
from meshhealth.gossip.protocol import Gossip, GossipParams
from meshhealth.ingest.replica import MissingLinks, admit_remote
from meshhealth.wire import BlockHeader

if TYPE_CHECKING:
    from meshhealth.node import Node

log = logging.getLogger(__name__)
MAX_BUFFERED = 4096


@dataclass
class Connection:
    peer: bytes
    authority: bool
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(maxsize=512))


class GossipShell:
    def __init__(
        self, node: Node, peer_urls: list[str], params: GossipParams, *, observers: bool = False
    ) -> None:
        import random

        self.node, self.peer_urls, self.observers = node, peer_urls, observers
        self.me = node.identity.public
        self.authorities = {a.key for a in node.genesis.authorities}
        self.core = Gossip(self.me, random.Random(), params)
        for a in self.authorities:
            self.core.add_peer(a, time.monotonic())
        self.core.restore({n: h for n, (h, _) in node.store.heads().items()})
        self.conns: dict[bytes, Connection] = {}
        self.buffer: dict[tuple[bytes, int], tuple[bytes, bytes, bytes, int]] = {}
        self.counters: Counter[str] = Counter()
        node.pipeline.on_block = self._on_local_block

    # --- sending ----------------------------------------------------------------------

    def _on_local_block(self, c: Any) -> None:
        hdr = c.block.header
        self.dispatch(self.core.on_block_stored(None, hdr.node, hdr.height, time.monotonic()))

    def dispatch(self, sends: list[Send]) -> None:
        for s in sends:
            conn = self.conns.get(s.peer)
            if conn is None:
                self.counters["no_connection"] += 1
                continue
            msg = s.message
            blocks: list[wire.RawBlock] = []
            if isinstance(msg, Push):
                raw = self.node.store.raw_block(msg.chain, msg.height)
                blocks = [raw] if raw else []
            elif isinstance(msg, Blocks):
                for h in range(msg.from_height, msg.to_height + 1):
                    raw = self.node.store.raw_block(msg.chain, h)
                    if raw is None:
                        break
                    blocks.append(raw)
                if len(blocks) != msg.to_height - msg.from_height + 1:
                    continue
            if isinstance(msg, Push) and not blocks:
                continue
            data = wire.encode(msg, blocks)
            try:
                conn.queue.put_nowait(data)
                self.counters["sent"] += 1
                self.counters["bytes_out"] += len(data)
            except asyncio.QueueFull:
                self.counters["dropped_slow_peer"] += 1

    # --- connections ------------------------------------------------------------------

    async def run(self) -> None:
        async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as tg:
            for url in self.peer_urls:
                tg.create_task(self._dial_forever(session, url))
            tg.create_task(self._ticks())

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.core.params.tick_s)
            self.dispatch(self.core.on_tick(time.monotonic()))

    async def _dial_forever(self, session: aiohttp.ClientSession, url: str) -> None:
        delay = 0.5
        while True:
            try:
                async with session.ws_connect(
                    f"{url}/v1/gossip", max_msg_size=wire.MAX_GOSSIP, heartbeat=10
                ) as ws:
                    conn = await self._handshake_initiator(ws)
                    delay = 0.5
                    await self._serve(conn)
            except (
                aiohttp.ClientError,
                aiohttp.WSMessageTypeError,
                OSError,
                TimeoutError,
                hs.HandshakeError,
                RemoteError,
            ) as exc:
                # a peer that is down, refuses us or breaks the protocol: back off, retry
                log.info("gossip: %s: %s", url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _hello(self) -> hs.Hello:
        return hs.Hello(self.node.network, self.me, os.urandom(hs.CHALLENGE_LEN))

    async def _receive_hello(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
    ) -> tuple[hs.Hello, hs.Peer]:
        """The peer's Hello, checked against our network and authority set."""
        theirs = hs.Hello.decode(await asyncio.wait_for(ws.receive_bytes(), 10))
        peer = hs.check_hello(
            theirs,
            network=self.node.network,
            me=self.me,
            authorities=self.authorities,
            observers=self.observers,
        )
        return theirs, peer

    async def _handshake_initiator(self, ws: aiohttp.ClientWebSocketResponse) -> Connection:
        mine = self._hello()
        await ws.send_bytes(mine.encode())
        theirs, peer = await self._receive_hello(ws)
        proof = hs.Proof.decode(await asyncio.wait_for(ws.receive_bytes(), 10))
        hs.check_proof(proof, peer.id, "HR", self.node.network, mine, theirs)
        await ws.send_bytes(
            hs.prove(self.node.identity.signing, "HI", self.node.network, mine, theirs).encode()
        )
        return Connection(peer.id, peer.authority, ws)

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=wire.MAX_GOSSIP, heartbeat=10)
        await ws.prepare(request)
        try:
            theirs, peer = await self._receive_hello(ws)
            mine = self._hello()
            await ws.send_bytes(mine.encode())
            await ws.send_bytes(
                hs.prove(self.node.identity.signing, "HR", self.node.network, theirs, mine).encode()
            )
            proof = hs.Proof.decode(await asyncio.wait_for(ws.receive_bytes(), 10))
            hs.check_proof(proof, peer.id, "HI", self.node.network, theirs, mine)
        except (hs.HandshakeError, RemoteError, TimeoutError, aiohttp.WSMessageTypeError) as exc:
            self.counters["handshake_refused"] += 1
            log.info("gossip: refused a peer: %s", exc)
            await ws.close()
            return ws
        await self._serve(Connection(peer.id, peer.authority, ws))
        return ws

    async def _serve(self, conn: Connection) -> None:
        old = self.conns.get(conn.peer)
        self.conns[conn.peer] = conn
        self.counters["connected"] += 1
        writer = asyncio.create_task(self._write(conn))
        try:
            async for frame in conn.ws:
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    break
                self.counters["bytes_in"] += len(frame.data)
                await self._on_frame(conn, frame.data)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer
            if self.conns.get(conn.peer) is conn:
                if old is not None and not old.ws.closed:
                    self.conns[conn.peer] = old
                else:
                    del self.conns[conn.peer]

    async def _write(self, conn: Connection) -> None:
        while True:
            data = await conn.queue.get()
            await conn.ws.send_bytes(data)

    # --- receiving ------------------------------------------------------------------------

    async def _on_frame(self, conn: Connection, data: bytes) -> None:
        now = time.monotonic()
        try:
            msg, raws = wire.decode(data)
        except RemoteError:
            self.counters["malformed"] += 1
            self.core.penalise(conn.peer, now)
            return
        if isinstance(msg, Push):
            await self._receive(conn, msg.chain, msg.height, raws[0], msg.hops, forward=True)
        elif isinstance(msg, Blocks):
            for h, raw in zip(range(msg.from_height, msg.to_height + 1), raws, strict=True):
                await self._receive(conn, msg.chain, h, raw, msg.hops, forward=False)
        else:
            self.dispatch(self.core.on_message(conn.peer, msg, now))

    async def _receive(
        self,
        conn: Connection,
        chain: bytes,
        height: int,
        raw: wire.RawBlock,
        hops: int,
        *,
        forward: bool,
    ) -> None:
        now = time.monotonic()
        if not conn.authority or chain not in self.authorities:
            self.counters["refused_block"] += 1
            self.core.penalise(conn.peer, now)
            return
        if chain == self.me:
            return  # our own chain: we are its only writer
        head = self.node.store.head(chain)
        head_h, head_hash = (-1, self.node.network) if head is None else head
        if height <= head_h:
            self.core.on_duplicate(conn.peer, now)
            return
        if height > head_h + 1:
            if len(self.buffer) < MAX_BUFFERED:
                self.buffer[(chain, height)] = (conn.peer, raw[0], raw[1], hops)
            self.dispatch(self.core.on_ahead(conn.peer, chain, height, now))
            return
        if await self._apply(conn.peer, chain, height, raw, head_hash, hops, forward):
            await self._drain(chain)

    async def _apply(
        self,
        src: bytes,
        chain: bytes,
        height: int,
        raw: wire.RawBlock,
        prev: bytes,
        hops: int,
        forward: bool,
    ) -> bool:
        now = time.monotonic()
        try:
            header = BlockHeader.decode(raw[0])
            if header.node != chain:
                raise InvalidBlock("block of another chain", node=chain, height=height)
            verify_header(header, network=self.node.network, prev=prev, height=height)
            entries = list(decode_body(raw[1]))
            results = await self.node.pipeline.verify_entries(entries)
            async with self.node.pipeline.apply_lock:
                if (self.node.store.head(chain) or (-1, b""))[0] >= height:
                    return False  # applied meanwhile, from another peer
                commit = admit_remote(
                    self.node.batcher,
                    header,
                    entries,
                    results,
                    block_hash_at=self.node.store.block_hash,
                    now_ms=time.time_ns() // 1_000_000,
                )
                await self.node.pipeline.commit_remote(commit)
        except MissingLinks as m:
            if len(self.buffer) < MAX_BUFFERED:
                self.buffer[(chain, height)] = (src, raw[0], raw[1], hops)
            for n, h in m.missing:
                self.dispatch(self.core.on_ahead(src, n, h + 1, now))
            return False
        except RemoteError as exc:
            self.counters["invalid_block"] += 1
            log.warning(
                "gossip: invalid block %s#%d from %s: %s",
                chain.hex()[:8],
                height,
                src.hex()[:8],
                exc,
            )
            self.core.penalise(src, now)
            return False
        self.counters["blocks_applied"] += 1
        self.dispatch(
            self.core.on_block_stored(src, chain, height, now, hops=hops, forward=forward)
        )
        return True

    async def _drain(self, chain: bytes) -> None:
        """Apply buffered blocks that have become applicable (parents and links present)."""
        progress = True
        while progress:
            progress = False
            for c, h in sorted(self.buffer, key=lambda k: k[1]):
                head = self.node.store.head(c)
                head_h, head_hash = (-1, self.node.network) if head is None else head
                if h <= head_h:
                    self.buffer.pop((c, h), None)
                    continue
                if h != head_h + 1:
                    continue
                src, hraw, braw, hops = self.buffer.pop((c, h))
                if await self._apply(src, c, h, (hraw, braw), head_hash, hops, False):
                    progress = True
                    break

    def statistics(self) -> dict[str, Any]:
        return {
            "connections": sorted(p.hex()[:8] for p in self.conns),
            "buffered": len(self.buffer),
            **dict(self.counters),
            "core": self.core.statistics(),
        }
