"""Tools for network tests: a fault-injecting TCP proxy and a hand-driven gossip peer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from meshhealth.crypto.keys import Identity
from meshhealth.gossip import handshake as hs
from meshhealth.gossip import wire


class FaultProxy:
    """Relays 127.0.0.1:``port`` to ``target_port``; :meth:`cut` drops every connection
    and refuses new ones until :meth:`heal` (a network partition on one path)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.is_cut = False
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.is_cut = True
        for w in list(self._open):
            w.transport.abort()
        self._open.clear()

    def heal(self) -> None:
        self.is_cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._open |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


class GossipPeer:
    """A gossip connection to a node, driven by hand: handshake as ``identity``,
    then send any frame (forged blocks, garbage) and read what comes back."""

    def __init__(self, url: str, identity: Identity, network: bytes) -> None:
        self.url, self.identity, self.network = url, identity, network
        self._session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._deaf = False

    async def __aenter__(self) -> GossipPeer:
        self._session = aiohttp.ClientSession()
        self.ws = await self._session.ws_connect(
            f"{self.url}/v1/gossip", max_msg_size=wire.MAX_GOSSIP
        )
        mine = hs.Hello(self.network, self.identity.public, os.urandom(hs.CHALLENGE_LEN))
        await self.ws.send_bytes(mine.encode())
        msg = await asyncio.wait_for(self.ws.receive(), 10)
        if msg.type is not aiohttp.WSMsgType.BINARY:
            await self.__aexit__()
            raise hs.HandshakeError("the node closed the connection: refused")
        theirs = hs.Hello.decode(msg.data)
        proof = hs.Proof.decode(await asyncio.wait_for(self.ws.receive_bytes(), 10))
        hs.check_proof(proof, theirs.node, "HR", self.network, mine, theirs)
        await self.ws.send_bytes(
            hs.prove(self.identity.signing, "HI", self.network, mine, theirs).encode()
        )
        return self

    async def send(self, frame: bytes) -> None:
        assert self.ws is not None
        await self.ws.send_bytes(frame)

    def stop_reading(self) -> None:
        """Read nothing more from the socket (a peer that stopped reading: the node's
        frames pile up in the kernel's buffers, then in the node)."""
        assert self.ws is not None
        conn = self.ws._response.connection  # aiohttp has no public handle on it
        assert conn is not None and conn.transport is not None
        conn.transport.pause_reading()
        self._deaf = True

    async def __aexit__(self, *exc: object) -> None:
        conn = None if self.ws is None else self.ws._response.connection
        if self._deaf and conn is not None and conn.transport is not None:
            conn.transport.abort()  # a close handshake would wait for a reply it cannot read
        elif self.ws is not None:
            await self.ws.close()
        if self._session is not None:
            await self._session.close()


class GossipServer:
    """A hand-driven gossip peer that a node *dials* (put :attr:`url` in its peers): it
    answers the handshake as ``identity``, then runs ``script(ws)`` on the connection."""

    def __init__(
        self,
        identity: Identity,
        network: bytes,
        script: Callable[[web.WebSocketResponse], Awaitable[None]],
    ) -> None:
        self.identity, self.network, self.script = identity, network, script
        self.port = 0
        self.connections = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/v1/gossip", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = port

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=wire.MAX_GOSSIP)
        await ws.prepare(request)
        theirs = hs.Hello.decode(await ws.receive_bytes(timeout=10))
        mine = hs.Hello(self.network, self.identity.public, os.urandom(hs.CHALLENGE_LEN))
        await ws.send_bytes(mine.encode())
        await ws.send_bytes(
            hs.prove(self.identity.signing, "HR", self.network, theirs, mine).encode()
        )
        proof = hs.Proof.decode(await ws.receive_bytes(timeout=10))
        hs.check_proof(proof, theirs.node, "HI", self.network, theirs, mine)
        self.connections += 1
        with contextlib.suppress(Exception):
            await self.script(ws)
        await ws.close()
        return ws
