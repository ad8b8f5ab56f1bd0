"""The gossip shell: websockets between nodes, driving the pure gossip core.

Each node dials every peer URL it was given and accepts connections on
``/v1/gossip``.  A connection starts with the mutual signed handshake
(:mod:`meshhealth.gossip.handshake`); after it, every frame is one
canonical gossip message.  Each peer has a bounded send queue.  When it is
full, pushes and digests are dropped and counted rather than waited for,
so a slow peer never stalls the others, and anti-entropy repairs whatever
a drop cost.

Right after the handshake both sides ask for each other's full head vector
and swap the authority addresses they know (peer exchange).  Until a
node has heard, from its peers, how far its *own* chain got, it seals
nothing (:meth:`GossipShell.sync_own_chain`): a node restored from an old
backup or started on a wiped data dir first fetches its own blocks back,
and only then signs the next one, so it never equivocates.

Received blocks are validated here, before the core hears of them:
header against the replica's head, entries in the verifier processes,
then :func:`meshhealth.ingest.replica.admit_remote` and the commit, under
the same lock as our own blocks.  A block above the head, or one whose
links we lack, waits in a bounded buffer while the gap is pulled.  A peer
that sends an invalid block is penalised.

A block for a height we already hold, with a different, validly signed
header, is an equivocation: the two headers become an
:class:`~meshhealth.wire.EquivocationProof` in our next block, which
carries it to every replica; the producer is marked faulty, and we keep
the branch we had.  A block whose prev hash disagrees with our head is a
hint of the same thing: we pull the peer's version of our head to get the
proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl
import statistics
import struct
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from meshhealth.chain.block import decode_body, verify_body, verify_header
from meshhealth.chain.lattice import equivocation
from meshhealth.errors import InvalidBlock, RemoteError
from meshhealth.gossip import handshake as hs
from meshhealth.gossip import wire
from meshhealth.gossip.messages import (
    Blocks,
    FullHeads,
    Heads,
    Message,
    PeerList,
    Pull,
    Push,
    Send,
)
from meshhealth.gossip.protocol import Gossip, GossipParams
from meshhealth.ingest import verify
from meshhealth.ingest.replica import ChainOverBudget, MissingLinks, admit_remote
from meshhealth.net.tls import peer_is_node
from meshhealth.wire import BlockHeader

if TYPE_CHECKING:
    from meshhealth.node import Node

log = logging.getLogger(__name__)
MAX_BUFFERED = 4096  # blocks in the out-of-order buffer, in all (besides its byte bounds)
MAX_QUEUED = 512  # frames in one peer's send queue (besides its byte bounds)
MiB = 1024 * 1024
# errors decoding or admitting what a peer sent that are not yet RemoteErrors: a bug in a
# decoder, but the peer's doing all the same (logged with the peer, counted, penalised)
PEER_FAULTS = (
    RemoteError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    struct.error,
    UnicodeError,
)
LATENCY_SAMPLES = 50_000
Checked = asyncio.Future[list[verify.Result]]  # a block's entries, being checked or done


@dataclass(frozen=True, slots=True)
class Arrival:
    """A peer's block on its way into our replica (it may wait in the buffer)."""

    src: bytes  # the peer it came from
    chain: bytes
    height: int
    raw: wire.RawBlock
    hops: int
    checked: Checked | None = None  # its entries' checks, started on arrival
    entries: list[bytes] | None = None  # its body, decoded (with ``checked``)


MAX_DIAL_BACKOFF_S = 10.0
# before a peer has proved its key, all it can make us hold is the frame it is sending
# (up to 16 MiB: aiohttp fixes a websocket's frame bound when it opens): so few at a time
MAX_HANDSHAKES = 16  # inbound handshakes in progress, in all
MAX_HANDSHAKES_PER_SOURCE = 4  # ... and from one address
HANDSHAKE_S = 10.0
MAX_LINKS_PER_PEER = 2  # connections to one peer (one each way); a newer one ends the oldest
MAX_OBSERVERS = 32  # read-only peers connected at once
MAX_REPLY_BYTES = 4 * MiB  # a pull reply stops adding blocks here (one always fits)
# start-up sync: no block of our own chain for this long, while a peer proved it is longer,
# is logged and shown (gossip.own_sync_stalled_s in /v1/status); the fetch goes on
OWN_SYNC_STALL_S = 30.0


@dataclass(frozen=True)
class GossipLimits:
    """What a peer can make us hold in memory (the ``[gossip]`` config keys).

    A block is at most 8 MiB + 64 KiB, a pull reply at most 4 MiB or one
    block, so 32 MiB per peer holds several of either; 128 MiB in total
    is four peers' worth, and with blocks of a typical size (kilobytes)
    thousands of them.  Each bound holds per sending peer and in total.
    """

    buffer_peer_bytes: int = 32 * MiB  # blocks waiting for their parent or links
    buffer_total_bytes: int = 128 * MiB
    send_peer_bytes: int = 32 * MiB  # frames queued to one peer
    send_total_bytes: int = 128 * MiB
    slow_peer_s: float = 60.0  # a peer that finishes no frame for this long is cut off
    claim_timeout_s: float = 10.0  # to back a claim about our own chain with our header
    # blocks one peer can have waiting (besides bytes: thousands of tiny signed blocks are
    # cheap to make), and how long a chain's waiting blocks may wait for its head to move
    buffer_peer_blocks: int = MAX_BUFFERED // 4
    buffer_gap_s: float = 60.0


# what one decoded entry costs besides its bytes: a bytes object's header and its list slot
ENTRY_OVERHEAD = 40
# what one entry's check result costs besides its bytes: a reading's is a tuple of twelve
# fields, each its own object (measured with tracemalloc: ~450 bytes above the reading's
# size, so a 225-byte reading's result takes ~680; tests/test_gossip_core.py)
RESULT_OVERHEAD = 512


def arrival_cost(a: Arrival) -> int:
    """The bytes a buffered block keeps alive: raw header and body, the body decoded, and
    its entries' check results."""
    cost = len(a.raw[0]) + len(a.raw[1]) + 256
    if a.entries is not None:
        n, size = len(a.entries), sum(map(len, a.entries))
        cost += size + n * ENTRY_OVERHEAD
        if a.checked is not None:
            cost += size + n * RESULT_OVERHEAD
    elif a.checked is not None:  # (not made so: checks start from the decoded body)
        cost += 4 * len(a.raw[1])
    return cost


def check_signed_block(
    network: bytes, chain: bytes, height: int, raw: wire.RawBlock, entries: list[bytes] | None
) -> None:
    """What a block must pass to wait in the buffer: a header of ``chain`` at ``height`` in
    our network, signed by that chain's producer, and a body that matches it (count and
    Merkle root).  Its entries and links are checked when it applies.  Raises
    :class:`RemoteError` (``InvalidBlock``, ``MalformedMessage``, ``InvalidSignature``)."""
    header = BlockHeader.decode(raw[0])
    if (header.node, header.height, header.network) != (chain, height, network):
        raise InvalidBlock("header names another place", node=chain, height=height)
    header.verify()
    verify_body(header, list(decode_body(raw[1])) if entries is None else entries)


@dataclass
class Connection:
    peer: bytes
    authority: bool
    ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse
    queue: deque[bytes] = field(default_factory=deque)
    queued_bytes: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the queue has a frame

    def abort(self) -> None:
        """Drop the connection under the websocket (a peer that stopped reading)."""
        sock = self.ws.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class GossipShell:
    def __init__(
        self,
        node: Node,
        peer_urls: list[str],
        params: GossipParams,
        *,
        observers: bool = False,
        advertise_url: str = "",
        peer_exchange: bool = True,
        client_ssl: ssl.SSLContext | None = None,
        limits: GossipLimits | None = None,
    ) -> None:
        self.node, self.peer_urls, self.observers = node, peer_urls, observers
        self.limits = limits or GossipLimits()
        self.client_ssl = client_ssl  # dialing https:// peers: our CA, our certificate
        self.advertise_url, self.peer_exchange = advertise_url, peer_exchange
        self.me = node.identity.public
        self.authorities = {a.key for a in node.genesis.authorities}
        self.core = Gossip(self.me, random.Random(), params)
        for a in self.authorities:
            self.core.add_peer(a, time.monotonic())
        self.core.restore({n: h for n, (h, _) in node.store.heads().items()})
        self.conns: dict[bytes, Connection] = {}
        # blocks that arrived before their parent or their links: chain -> height -> block
        self.buffer: dict[bytes, dict[int, Arrival]] = {}
        self.buffered = 0
        self.buffer_bytes = 0  # what the buffer holds, in all and per sending peer
        self.buffer_by_peer: Counter[bytes] = Counter()
        self.buffer_blocks_by_peer: Counter[bytes] = Counter()
        # chain -> since when its buffered blocks wait without its head moving
        self._gap_since: dict[bytes, float] = {}
        self.send_bytes = 0  # what every send queue holds, in all and per peer (every
        self.send_by_peer: Counter[bytes] = Counter()  # connection of that peer together)
        self.counters: Counter[str] = Counter()
        # what each authority peer says our own chain's head is (start-up sync): only
        # heights we hold, or that the peer backed with our own signed header there
        self.own_reports: dict[bytes, int] = {}
        # claims our own chain is ahead of our replica, until backed:
        # peer -> (height, deadline, when to ask again for our header there)
        self.own_claims: dict[bytes, tuple[int, float, float]] = {}
        self.liars: set[bytes] = set()  # peers that could not back a claim about our chain
        self.own_stalled_since: float | None = None  # our chain's fetch moved no block since
        self.synced = not peer_urls
        if not self.synced:
            node.pipeline.may_seal.clear()  # sync_own_chain sets it again
        # (chain, height, ms from the producer's seal to our commit), newest last
        self.latency: deque[tuple[bytes, int, float]] = deque(maxlen=LATENCY_SAMPLES)
        self._dialing: set[str] = set()
        self._handshakes: Counter[str] = Counter()  # inbound, in progress, per source address
        self._links: dict[bytes, list[Connection]] = {}  # every live connection, per peer
        self._applying: dict[tuple[bytes, int], bytes] = {}  # block -> header, being applied
        self._session: aiohttp.ClientSession | None = None
        self._tasks: asyncio.TaskGroup | None = None
        node.pipeline.on_block = self._on_local_block

    # --- sending ----------------------------------------------------------------------

    def _on_local_block(self, c: Any) -> None:
        hdr = c.block.header
        self.dispatch(self.core.on_block_stored(None, hdr.node, hdr.height, time.monotonic()))

    def _room(self, conn: Connection) -> int:
        """How many bytes more this peer's send queue may take (per peer and in total)."""
        if len(conn.queue) >= MAX_QUEUED:
            return 0
        lim = self.limits
        peer, total = lim.send_peer_bytes - self.send_by_peer[conn.peer], lim.send_total_bytes
        return max(0, min(peer, total - self.send_bytes))

    def _queued(self, conn: Connection, n: int) -> None:
        conn.queued_bytes += n
        self.send_bytes += n
        self.send_by_peer[conn.peer] += n
        if self.send_by_peer[conn.peer] <= 0:
            del self.send_by_peer[conn.peer]

    def dispatch(self, sends: list[Send]) -> None:
        for s in sends:
            conn = self.conns.get(s.peer)
            if conn is None:
                self.counters["no_connection"] += 1
                continue
            room = self._room(conn)
            if room < 1024:
                # a peer that does not read: no pull answered, no block read for it (the
                # work and memory stop here); anti-entropy repairs what it missed
                self.counters["dropped_slow_peer"] += 1
                continue
            msg = s.message
            blocks: list[wire.RawBlock] = []
            if isinstance(msg, Push):
                raw = self.node.store.raw_block(msg.chain, msg.height)
                blocks = [raw] if raw else []
            elif isinstance(msg, Blocks):
                size, cap = 0, min(MAX_REPLY_BYTES, room)
                for h in range(msg.from_height, msg.to_height + 1):
                    raw = self.node.store.raw_block(msg.chain, h)
                    if raw is None or (blocks and size + len(raw[0]) + len(raw[1]) > cap):
                        break
                    blocks.append(raw)
                    size += len(raw[0]) + len(raw[1])
                if not blocks:
                    continue
                # a shorter reply than asked: the puller asks again from where it ends
                msg = Blocks(
                    msg.chain, msg.from_height, msg.from_height + len(blocks) - 1, msg.hops
                )
            if isinstance(msg, Push) and not blocks:
                continue
            data = wire.encode(msg, blocks)
            if len(data) > room:
                self.counters["dropped_slow_peer"] += 1
                continue
            self._queued(conn, len(data))
            conn.queue.append(data)
            conn.ready.set()
            self.counters["sent"] += 1
            self.counters["bytes_out"] += len(data)

    # --- connections ------------------------------------------------------------------

    async def run(self) -> None:
        tls = None if self.client_ssl is None else aiohttp.TCPConnector(ssl=self.client_ssl)
        async with aiohttp.ClientSession(connector=tls) as session, asyncio.TaskGroup() as tg:
            self._session, self._tasks = session, tg
            for url in self.peer_urls:
                self._dial(url)
            tg.create_task(self._ticks())

    def close(self) -> None:
        """Drop every gossip connection (on stop: the API server would otherwise wait for
        the open websockets' handlers before it shuts down)."""
        for links in list(self._links.values()):
            for conn in links:
                conn.abort()

    def _dial(self, url: str) -> None:
        if url in self._dialing or self._tasks is None or self._session is None:
            return
        self._dialing.add(url)
        self._tasks.create_task(self._dial_forever(self._session, url))

    async def sync_own_chain(self, timeout: float) -> bool:
        """Wait until peers told us how far our own chain got, and we hold that much.

        Done when at least one authority peer reported, every connected
        authority peer reported (or a second passed since the first did), and
        our replica of our own chain reaches the highest reported head (the
        core pulls it, like any other chain).  A report above what we hold
        counts only once its peer sent our own signed header at that height
        (within ``claim_timeout_s``); a peer that cannot back its claim is
        penalised and not heard on our chain again.  If no peer has answered
        within ``timeout`` the node goes on from its local head (False; it is
        logged and counted).  But once a peer proved our chain is longer than
        what we hold, there is no time limit: sealing before we hold it would
        sign a second block at a height the network already has.  (The node
        stops waiting on SIGTERM: see :meth:`Node.run`.)
        """
        deadline = time.monotonic() + timeout
        first: float | None = None
        ok, behind, next_log = self.synced, False, time.monotonic() + timeout
        next_want = time.monotonic() + 1.0
        last_mine, moved = -2, time.monotonic()
        while not ok:
            self._expire_own_claims()
            mine = (self.node.store.head(self.me) or (-1, b""))[0]
            if mine != last_mine:
                last_mine, moved, self.own_stalled_since = mine, time.monotonic(), None
            elif (
                behind
                and self.own_stalled_since is None
                and time.monotonic() - moved >= OWN_SYNC_STALL_S
            ):
                self.own_stalled_since = moved
                self.counters["own_sync_stalled"] += 1
                log.warning(
                    "gossip: no peer delivered a block of our own chain for %.0f s "
                    "(we hold %d, peers proved %d): not sealing below a proved head; "
                    "still asking every peer that proved one, in turn",
                    time.monotonic() - moved,
                    mine,
                    max(self.own_reports.values()),
                )
            if self.own_reports:
                first = first or time.monotonic()
                connected = {p for p, c in self.conns.items() if c.authority} - self.liars
                settled = connected <= set(self.own_reports) or time.monotonic() - first >= 1.0
                behind = mine < max(self.own_reports.values())
                ok = settled and not behind and not self.own_claims
            if ok or (not behind and not self.own_claims and time.monotonic() >= deadline):
                break
            if behind and time.monotonic() >= next_want:
                # keep fetching from every peer that proved a head above ours (the core
                # drops a claim whose pull went unanswered; a proved one must come back)
                next_want = time.monotonic() + 1.0
                for peer, h in self.own_reports.items():
                    if h > mine:
                        self.dispatch(self.core.want(peer, self.me, h, time.monotonic()))
            if behind and time.monotonic() >= next_log:
                log.warning(
                    "still fetching our own chain from peers: we hold %d, they hold %d",
                    mine,
                    max(self.own_reports.values()),
                )
                next_log = time.monotonic() + timeout
            await asyncio.sleep(0.05)
        self.synced = True
        self.own_stalled_since = None
        self.own_claims.clear()
        self.node.pipeline.may_seal.set()
        self.counters["startup_sync_ok" if ok else "startup_sync_timeout"] += 1
        return ok

    async def _ticks(self) -> None:
        while True:
            await asyncio.sleep(self.core.params.tick_s)
            self.dispatch(self.core.on_tick(time.monotonic()))
            self._evict_stale(time.monotonic())

    def _evict_stale(self, now: float) -> None:
        """Drop the buffered blocks of every chain whose head has not moved for
        ``buffer_gap_s`` while they waited: a gap nobody fills (a peer that pushes blocks
        far ahead and never the one that follows our head) must not hold the buffer for
        good.  They are counted (``buffer_evicted``) and pulled again when the gap fills."""
        for chain, since in list(self._gap_since.items()):
            if now - since < self.limits.buffer_gap_s:
                continue
            for h in list(self.buffer.get(chain, {})):
                old = self._take(chain, h)
                if old is not None:
                    self._discard(old)
                    self.counters["buffer_evicted"] += 1
            self._gap_since.pop(chain, None)

    async def _dial_forever(self, session: aiohttp.ClientSession, url: str) -> None:
        delay = 0.5
        while True:
            try:
                async with session.ws_connect(
                    f"{url}/v1/gossip", max_msg_size=wire.MAX_GOSSIP, heartbeat=10
                ) as ws:
                    conn = await self._handshake_initiator(ws)
                    self.core.note_address(conn.peer, url)
                    delay = 0.5
                    await self._serve(conn)
            except (
                aiohttp.ClientError,
                aiohttp.WSMessageTypeError,
                OSError,
                TimeoutError,
                RemoteError,  # HandshakeError among them
            ) as exc:
                # a peer that is down, refuses us or breaks the protocol: back off, retry
                if isinstance(exc, aiohttp.ClientSSLError):
                    self.counters["tls_refused"] += 1  # its certificate failed our CA check
                    log.warning("gossip: %s: TLS: %s", url, exc)
                else:
                    log.info("gossip: %s: %s", url, exc)
            except Exception:
                # a bug on this connection must not end the node (every connection and
                # task shares its TaskGroup): log it in full, count it, dial again
                self.counters["connection_errors"] += 1
                log.exception("gossip: %s: connection failed", url)
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, MAX_DIAL_BACKOFF_S)

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
        if not peer_is_node(request.transport):
            self.counters["tls_refused"] += 1
            raise web.HTTPForbidden(text="gossip over TLS needs a node certificate of our CA")
        source = request.remote or "?"
        if (
            sum(self._handshakes.values()) >= MAX_HANDSHAKES
            or self._handshakes[source] >= MAX_HANDSHAKES_PER_SOURCE
        ):
            self.counters["handshake_busy"] += 1
            raise web.HTTPServiceUnavailable(text="too many gossip handshakes in progress")
        self._handshakes[source] += 1
        ws = web.WebSocketResponse(max_msg_size=wire.MAX_GOSSIP, heartbeat=10)
        try:
            await ws.prepare(request)
            async with asyncio.timeout(HANDSHAKE_S):
                theirs, peer = await self._receive_hello(ws)
                mine = self._hello()
                await ws.send_bytes(mine.encode())
                await ws.send_bytes(
                    hs.prove(
                        self.node.identity.signing, "HR", self.node.network, theirs, mine
                    ).encode()
                )
                proof = hs.Proof.decode(await ws.receive_bytes())
                hs.check_proof(proof, peer.id, "HI", self.node.network, theirs, mine)
        except (RemoteError, TimeoutError, aiohttp.WSMessageTypeError) as exc:
            self.counters["handshake_refused"] += 1
            log.info("gossip: refused a peer: %s", exc)
            await ws.close()
            return ws
        finally:
            self._handshakes[source] -= 1
            if self._handshakes[source] <= 0:
                del self._handshakes[source]
        await self._serve(Connection(peer.id, peer.authority, ws))
        return ws

    async def _serve(self, conn: Connection) -> None:
        observers = sum(1 for c in self._links.values() if not c[0].authority)
        if not conn.authority and conn.peer not in self._links and observers >= MAX_OBSERVERS:
            self.counters["observers_refused"] += 1
            await conn.ws.close()
            return
        links = self._links.setdefault(conn.peer, [])
        links.append(conn)
        while len(links) > MAX_LINKS_PER_PEER:
            self.counters["connections_replaced"] += 1
            links.pop(0).abort()
        try:
            await self._serve_link(conn)
        finally:
            links.remove(conn)
            if not links and self._links.get(conn.peer) is links:
                del self._links[conn.peer]
                if not conn.authority:
                    self.core.forget(conn.peer)  # an observer leaves nothing behind

    async def _serve_link(self, conn: Connection) -> None:
        old = self.conns.get(conn.peer)
        self.conns[conn.peer] = conn
        self.counters["connected"] += 1
        writer = asyncio.create_task(self._write(conn))
        fresh = len(self._links.get(conn.peer, ())) <= 1  # its first link, or its only one
        self.dispatch(self.core.on_connected(conn.peer, time.monotonic(), fresh=fresh))
        if self.peer_exchange:
            self.dispatch([Send(conn.peer, self.core.peer_list(self.advertise_url))])
        try:
            async for frame in conn.ws:
                if frame.type is not aiohttp.WSMsgType.BINARY:
                    break
                self.counters["bytes_in"] += len(frame.data)
                try:
                    await self._on_frame(conn, frame.data)
                except PEER_FAULTS as exc:
                    # the frame boundary: nothing a peer sends gets past it (a non-RemoteError
                    # here is a decoder that should have said MalformedMessage: logged in full)
                    self._peer_fault(conn.peer, "malformed", "a frame", exc)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, aiohttp.ClientError):
                await writer
            self._queued(conn, -conn.queued_bytes)  # what it never sent is freed with it
            conn.queue.clear()
            if self.conns.get(conn.peer) is conn:
                if old is not None and not old.ws.closed:
                    self.conns[conn.peer] = old
                else:
                    del self.conns[conn.peer]

    async def _write(self, conn: Connection) -> None:
        """Send the queue in order; a peer that takes nothing for ``slow_peer_s`` is cut."""
        while True:
            if not conn.queue:
                conn.ready.clear()
                await conn.ready.wait()
                continue
            data = conn.queue[0]
            try:
                await asyncio.wait_for(conn.ws.send_bytes(data), self.limits.slow_peer_s)
            except TimeoutError:
                self.counters["slow_peer_disconnected"] += 1
                log.warning(
                    "gossip: %s took no frame for %.0f s: disconnecting it",
                    conn.peer.hex()[:8],
                    self.limits.slow_peer_s,
                )
                conn.abort()
                return
            conn.queue.popleft()
            self._queued(conn, -len(data))

    # --- receiving ------------------------------------------------------------------------

    def _peer_fault(self, peer: bytes, counter: str, what: str, exc: BaseException) -> None:
        """Count and penalise what a peer sent that we refuse; log it with the peer."""
        self.counters[counter] += 1
        if not isinstance(exc, RemoteError):
            self.counters["peer_fault_uncaught_type"] += 1
        log.warning(
            "gossip: %s from %s refused: %s: %s",
            what,
            peer.hex()[:8],
            type(exc).__name__,
            exc,
            exc_info=not isinstance(exc, RemoteError),
        )
        self.core.penalise(peer, time.monotonic())

    async def _on_frame(self, conn: Connection, data: bytes) -> None:
        now = time.monotonic()
        try:
            msg, raws = wire.decode(data)
        except PEER_FAULTS as exc:
            self._peer_fault(conn.peer, "malformed", "a frame", exc)
            return
        if isinstance(msg, PeerList):
            self._on_peer_list(conn, msg)
        elif isinstance(msg, Push):
            arrival = Arrival(conn.peer, msg.chain, msg.height, raws[0], msg.hops)
            await self._receive(conn, arrival, forward=True)
        elif isinstance(msg, Blocks):
            if not self._accepts(conn, msg.chain):
                return
            if msg.chain == self.me:
                if self.synced:
                    return  # we are our chain's only writer: nothing to check or apply
                self._check_own_claim(conn.peer, msg.to_height, raws[-1][0])
            # check every entry of the batch in the verifier processes at once, then
            # apply the blocks in order, each as soon as its own entries are done; only
            # blocks that follow our head (a batch from above it waits unchecked, and a
            # block we hold needs no check)
            head_h = (self.node.store.head(msg.chain) or (-1, b""))[0]
            bodies: list[list[bytes] | None] = []
            for h, raw in zip(range(msg.from_height, msg.to_height + 1), raws, strict=True):
                if h <= head_h or msg.from_height > head_h + 1:
                    bodies.append(None)
                    continue
                try:
                    bodies.append(list(decode_body(raw[1])))
                except RemoteError:
                    bodies.append(None)  # _apply decodes it again and rejects it
            checks = iter(self.node.pipeline.verify_blocks([b for b in bodies if b is not None]))
            self.dispatch(
                self.core.on_blocks_arrived(
                    conn.peer, msg.chain, msg.to_height, now, from_height=msg.from_height
                )
            )
            heights = range(msg.from_height, msg.to_height + 1)
            for h, raw, body in zip(heights, raws, bodies, strict=True):
                checked = None if body is None else next(checks)
                arrival = Arrival(conn.peer, msg.chain, h, raw, msg.hops, checked, body)
                await self._receive(conn, arrival, forward=False)
        else:
            if isinstance(msg, FullHeads) and conn.authority:
                self._on_own_report(conn, dict(msg.heads).get(self.me, -1), now)
            self.dispatch(self.core.on_message(conn.peer, self._claims_we_take(conn, msg), now))

    def _claims_we_take(self, conn: Connection, msg: Message) -> Message:
        """Head claims only about authorities' chains, and only from authorities (an
        observer's blocks are refused anyway): the core keeps one claim per peer and
        chain, so a frame of 65,536 made-up chains must not reach it."""
        if not isinstance(msg, FullHeads | Heads):
            return msg
        claims = msg.heads if isinstance(msg, FullHeads) else msg.recent
        ours = tuple((c, h) for c, h in claims if conn.authority and c in self.authorities)
        if len(ours) == len(claims):
            return msg
        self.counters["claims_ignored"] += len(claims) - len(ours)
        return FullHeads(ours) if isinstance(msg, FullHeads) else replace(msg, recent=ours)

    # --- what peers say about our own chain (start-up sync) ------------------------------

    def _on_own_report(self, conn: Connection, height: int, now: float) -> None:
        """A peer says how far our own chain got.  At or below what we hold, it counts;
        above, only once the peer sends our own signed header at that height."""
        if self.synced or conn.peer in self.liars:
            return
        mine = (self.node.store.head(self.me) or (-1, b""))[0]
        if height <= mine:
            self.own_reports[conn.peer] = height
            self.own_claims.pop(conn.peer, None)
            return
        if conn.peer in self.own_claims:
            return  # one claim per peer, with one deadline (reconnecting does not renew it)
        self.own_claims[conn.peer] = (height, now + self.limits.claim_timeout_s, now + 1.0)
        self.counters["own_claims_checked"] += 1
        self.dispatch([Send(conn.peer, Pull(self.me, height, height))])

    def _check_own_claim(self, peer: bytes, height: int, header: bytes) -> None:
        """``peer`` sent a block of our chain: if it is the one its claim needs, check our
        signature on it (a claim it cannot back makes it a liar)."""
        claim = self.own_claims.get(peer)
        if claim is None or claim[0] != height:
            return
        del self.own_claims[peer]
        try:
            hdr = BlockHeader.decode(header)
            if hdr.node != self.me or hdr.height != height or hdr.network != self.node.network:
                raise InvalidBlock(
                    "not our header at the height claimed", node=self.me, height=height
                )
            hdr.verify()
        except PEER_FAULTS as exc:
            self._distrust_own_claim(peer, height, exc)
            return
        self.own_reports[peer] = height
        self.counters["own_claims_backed"] += 1
        self.dispatch(self.core.want(peer, self.me, height, time.monotonic()))

    def _distrust_own_claim(self, peer: bytes, height: int, why: object) -> None:
        self.liars.add(peer)
        self.own_reports.pop(peer, None)
        self.counters["own_claims_unbacked"] += 1
        log.warning(
            "gossip: %s says our chain reaches %d but did not back it with our header (%s): "
            "ignoring its claims",
            peer.hex()[:8],
            height,
            why,
        )
        self.core.penalise(peer, time.monotonic())

    def _expire_own_claims(self) -> None:
        """Claims not backed by their deadline make their peers liars; until then, ask
        again every second (a busy peer's reply may have been dropped)."""
        now = time.monotonic()
        for peer, (height, deadline, ask) in list(self.own_claims.items()):
            if deadline <= now:
                del self.own_claims[peer]
                self._distrust_own_claim(peer, height, "no header in time")
            elif ask <= now:
                self.own_claims[peer] = (height, deadline, now + 1.0)
                self.dispatch([Send(peer, Pull(self.me, height, height))])

    def _on_peer_list(self, conn: Connection, msg: PeerList) -> None:
        """Dial authorities we had no address for (an observer's hints are ignored)."""
        if not (conn.authority and self.peer_exchange):
            return
        known = PeerList(tuple((p, u) for p, u in msg.peers if p in self.authorities))
        for peer, url in self.core.learn_addresses(known):
            if peer not in self.conns:
                self.counters["peers_learned"] += 1
                self._dial(url)

    def _accepts(self, conn: Connection, chain: bytes) -> bool:
        """Blocks come from authorities only, and only of authorities' chains."""
        if not conn.authority or chain not in self.authorities:
            self.counters["refused_block"] += 1
            self.core.penalise(conn.peer, time.monotonic())
            return False
        return True

    @staticmethod
    def _discard(a: Arrival) -> None:
        """A block we drop: its entries' checks, if still queued, are not worth doing (and
        must not hold its entries in the verifier's queue)."""
        if a.checked is not None:
            a.checked.cancel()  # a no-op once they are done

    async def _receive(self, conn: Connection, a: Arrival, *, forward: bool) -> None:
        now, chain, height = time.monotonic(), a.chain, a.height
        if not self._accepts(conn, chain):
            self._discard(a)
            return
        if chain == self.me:
            if self.synced:
                self._discard(a)
                return  # our own chain: we are its only writer (until start-up sync, a reader)
            if forward:
                self._check_own_claim(conn.peer, height, a.raw[0])
        head = self.node.store.head(chain)
        head_h, head_hash = (-1, self.node.network) if head is None else head
        if height <= head_h:
            self._discard(a)
            self._check_equivocation(conn.peer, chain, height, a.raw[0])
            self.core.on_duplicate(conn.peer, now)
            return
        if height > head_h + 1:
            if self._hold_checked(a):
                self.dispatch(self.core.on_ahead(conn.peer, chain, height, now))
            return
        if await self._apply(a, head_hash, forward):
            await self._drain(chain)

    def _hold_checked(self, a: Arrival) -> bool:
        """Buffer a block that cannot apply yet, if it could be valid: its header must be
        signed by the chain's producer at that height, and its body must match it.  Junk
        is never buffered (its sender is penalised)."""
        try:
            check_signed_block(self.node.network, a.chain, a.height, a.raw, a.entries)
        except PEER_FAULTS as exc:
            self._discard(a)
            self._peer_fault(a.src, "invalid_block", f"block {a.chain.hex()[:8]}#{a.height}", exc)
            return False
        self._hold(a)
        return True

    def _check_equivocation(self, src: bytes, chain: bytes, height: int, other: bytes) -> None:
        """A block for a height we hold: the same block, an equivocation, or a forgery."""
        held = self.node.store.raw_header(chain, height)
        if held is None or held == other:
            return
        try:
            proof = equivocation(self.node.network, held, other)
        except RemoteError as exc:
            self.counters["invalid_block"] += 1
            log.warning(
                "gossip: forged block %s#%d from %s: %s",
                chain.hex()[:8],
                height,
                src.hex()[:8],
                exc,
            )
            self.core.penalise(src, time.monotonic())
            return
        if proof is None:
            return
        self.counters["equivocations_seen"] += 1
        if self.node.pipeline.submit_proof(proof):
            log.warning(
                "gossip: node %s signed two blocks at height %d: proof goes in our next block",
                chain.hex()[:8],
                height,
            )

    async def _apply(self, a: Arrival, prev: bytes, forward: bool) -> bool:
        """Apply one block at our head + 1, unless another copy of it is being applied.

        Pushes overlap: each block reaches a node from its producer and from
        forwarders at about the same time.  Only the first copy is checked;
        an identical one is dropped while it is in flight, and a different
        one waits in the buffer (after the first lands it is an
        equivocation, or nothing).
        """
        key = (a.chain, a.height)
        busy = self._applying.get(key)
        if busy is not None:
            if busy != a.raw[0]:
                self._hold_checked(a)
            else:
                self._discard(a)
            self.counters["duplicate_in_flight"] += 1
            self.core.on_duplicate(a.src, time.monotonic())
            return False
        self._applying[key] = a.raw[0]
        try:
            applied = await self._apply_once(a, prev, forward)
        finally:
            del self._applying[key]
        held = self.buffer.get(a.chain, {}).get(a.height)
        if not applied and (held is None or held.checked is not a.checked):
            self._discard(a)
        return applied

    async def _apply_once(self, a: Arrival, prev: bytes, forward: bool) -> bool:
        now = time.monotonic()
        src, chain, height, raw = a.src, a.chain, a.height, a.raw
        try:
            header = BlockHeader.decode(raw[0])
            if header.node != chain:
                raise InvalidBlock("block of another chain", node=chain, height=height)
            if header.prev != prev and header.height == height > 0:
                header.verify()  # a forgery is penalised below, a fork is chased
                self._chase_fork(src, chain, height - 1)
                return False
            verify_header(header, network=self.node.network, prev=prev, height=height)
            entries = list(decode_body(raw[1])) if a.entries is None else a.entries
            checked = a.checked or self.node.pipeline.verify_blocks([entries])[0]
            a = replace(a, checked=checked, entries=entries)  # kept if the block must wait
            results = await checked
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
            self._hold(a)  # with its checks
            for n, h in m.missing:
                self.dispatch(self.core.on_ahead(src, n, h + 1, now))
            return False
        except ChainOverBudget as exc:  # not the forwarder's fault: pulled again later
            self.counters["chain_over_budget"] += 1
            log.info("gossip: %s", exc)
            return False
        except PEER_FAULTS as exc:
            self._peer_fault(src, "invalid_block", f"block {chain.hex()[:8]}#{height}", exc)
            return False
        self.counters["blocks_applied"] += 1
        if chain in self._gap_since:
            self._gap_since[chain] = now  # its head moved: what waits may apply next
        self.latency.append((chain, height, time.time() * 1000 - header.ts_ms))
        self.dispatch(
            self.core.on_block_stored(src, chain, height, now, hops=a.hops, forward=forward)
        )
        return True

    def _chase_fork(self, src: bytes, chain: bytes, height: int) -> None:
        """``src`` holds a block of ``chain`` that does not follow ours: fetch its version
        of the block at ``height``, which differs from ours (see _check_equivocation)."""
        self.counters["forks_chased"] += 1
        if chain not in self.node.batcher.faulty:
            self.dispatch([Send(src, Pull(chain, height, height))])

    def _hold(self, a: Arrival) -> None:
        """Buffer a block until it applies, within the buffer's bounds: blocks in all, and
        bytes per sending peer and in total.  A block past them is dropped (counted) and
        pulled again later, when the blocks before it have applied."""
        held = self.buffer.get(a.chain, {})
        if a.height in held:
            return
        cost, lim = arrival_cost(a), self.limits
        if (
            self.buffered >= MAX_BUFFERED
            or self.buffer_blocks_by_peer[a.src] >= lim.buffer_peer_blocks
            or self.buffer_by_peer[a.src] + cost > lim.buffer_peer_bytes
            or self.buffer_bytes + cost > lim.buffer_total_bytes
        ):
            self.counters["buffer_dropped"] += 1
            self._discard(a)
            return
        self.buffer[a.chain] = held  # only a chain with a block in it has an entry
        self._gap_since.setdefault(a.chain, time.monotonic())
        held[a.height] = a
        self.buffered += 1
        self.buffer_bytes += cost
        self.buffer_by_peer[a.src] += cost
        self.buffer_blocks_by_peer[a.src] += 1

    def _take(self, chain: bytes, height: int) -> Arrival | None:
        held = self.buffer.get(chain)
        block = None if held is None else held.pop(height, None)
        if block is not None:
            self.buffered -= 1
            cost = arrival_cost(block)
            self.buffer_bytes -= cost
            self.buffer_by_peer[block.src] -= cost
            if self.buffer_by_peer[block.src] <= 0:
                del self.buffer_by_peer[block.src]
            self.buffer_blocks_by_peer[block.src] -= 1
            if self.buffer_blocks_by_peer[block.src] <= 0:
                del self.buffer_blocks_by_peer[block.src]
        if held is not None and not held:
            del self.buffer[chain]
            self._gap_since.pop(chain, None)
        return block

    async def _drain(self, chain: bytes) -> None:
        """Apply buffered blocks that have become applicable (parents and links present).

        Several connections may drain at once: every block is taken out of
        the buffer before it is awaited on, so each is applied at most once.
        """
        progress = True
        while progress:
            progress = False
            for c in list(self.buffer):
                head = self.node.store.head(c)
                head_h, head_hash = (-1, self.node.network) if head is None else head
                for stale in [h for h in self.buffer.get(c, {}) if h <= head_h]:
                    old = self._take(c, stale)
                    if old is not None:
                        self._discard(old)
                        self._check_equivocation(old.src, c, stale, old.raw[0])
                block = self._take(c, head_h + 1)
                if block is not None and await self._apply(block, head_hash, False):
                    progress = True

    def latency_summary(self) -> dict[str, float]:
        recent = [ms for _, _, ms in list(self.latency)[-2000:]]
        if len(recent) < 2:
            return {}
        q = statistics.quantiles(recent, n=100)
        return {"p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1), "samples": len(recent)}

    def missing(self) -> dict[bytes, int]:
        """The catch-up backlog: per chain, how many blocks above our head we know exist
        (a pull is heading for them, or a later one waits in the buffer) and still lack."""
        tops = self.core.wanted()
        for chain, held in self.buffer.items():
            tops[chain] = max([tops.get(chain, -1), *held])
        gaps = {chain: top - self.core.head(chain) for chain, top in tops.items()}
        return {chain: n for chain, n in gaps.items() if n > 0}

    def statistics(self) -> dict[str, Any]:
        return {
            "connections": sorted(p.hex()[:8] for p in self.conns),
            "synced": self.synced,
            "own_sync_stalled_s": None
            if self.own_stalled_since is None
            else round(time.monotonic() - self.own_stalled_since, 1),
            "buffered": self.buffered,
            "buffered_bytes": self.buffer_bytes,
            "buffered_bytes_by_peer": {p.hex()[:8]: n for p, n in self.buffer_by_peer.items()},
            "buffered_by_peer": {p.hex()[:8]: n for p, n in self.buffer_blocks_by_peer.items()},
            "send_queued_bytes": self.send_bytes,
            "limits": {
                "buffer_peer_bytes": self.limits.buffer_peer_bytes,
                "buffer_total_bytes": self.limits.buffer_total_bytes,
                "buffer_peer_blocks": self.limits.buffer_peer_blocks,
                "buffer_total_blocks": MAX_BUFFERED,
                "buffer_gap_s": self.limits.buffer_gap_s,
                "send_peer_bytes": self.limits.send_peer_bytes,
                "send_total_bytes": self.limits.send_total_bytes,
            },
            "propagation": self.latency_summary(),
            **dict(self.counters),
            "core": self.core.statistics(),
        }
