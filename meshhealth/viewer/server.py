"""The shell both local viewers share: the reader, static pages, ``/api/series``, listening.

Theory of operation.  A viewer is one aiohttp application on the reader's
own machine.  Its :class:`Reader` holds the reader's key, the node URLs, one
HTTP session and (optionally) a pool of verifier processes, for the life of
the server (``cleanup_ctx``).  Each API request fetches afresh from the nodes
through ``sharing/provider.py``: signed requests with failover, every header,
proof and signature checked, decryption with the reader's keys.  Nothing is
cached, so a revocation shows on the next request.

What went wrong at a node (a refusal with its reason, no node reachable, an
answer that fails verification) is part of the answer: ``"error": {reason,
message}`` with status 200, so the page shows it as a message (a 4xx would
also put a console error in the browser).  Only a malformed request to the
viewer itself is a 400.

The server listens on loopback only: it shows decrypted health data and
has no login, so a non-loopback ``--host`` is refused (reach it from
another machine through an SSH tunnel).  It answers only requests whose
``Host`` names it (a web page elsewhere cannot reach it by rebinding a DNS
name to 127.0.0.1).  Pages load nothing but their own static
files (a ``Content-Security-Policy`` of ``'self'``); nothing is cached.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path

import aiohttp
from aiohttp import web

from meshhealth.cli.netutil import stop_on_signals
from meshhealth.config import Genesis
from meshhealth.crypto.keys import Identity
from meshhealth.errors import ConfigError, MalformedMessage, NetworkError, RemoteError
from meshhealth.net.client import client_session
from meshhealth.sharing.provider import (
    Access,
    Fetcher,
    NodeClient,
    Refused,
    make_pool,
    network_genesis,
)
from meshhealth.viewer import windows
from meshhealth.viewer.windows import Json
from meshhealth.web import static_file
from meshhealth.wire import Grant
from meshhealth.wire.codec import name_str

TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=5)
HOUR_MS = 3_600_000
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# what a node (or the way to it) can do wrong: shown on the page, never a crash
NODE_TROUBLE = (RemoteError, NetworkError, aiohttp.ClientError, TimeoutError, KeyError, ValueError)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Reader:
    """The reader's key and nodes, and what it fetches with while the server runs."""

    def __init__(
        self, me: Identity, urls: list[str], *, genesis: Path | None, workers: int | None
    ) -> None:
        if not urls:
            raise ConfigError("no --node given: name at least one node API URL")
        self.me, self.urls, self.workers = me, urls, workers
        self._genesis = Genesis.load(genesis) if genesis is not None else None
        self._genesis_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.pool: Executor | None = None
        self.ids: dict[str, bytes] = {}  # each node URL's key, shared by every client

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``: the session and the verifier processes live as long as the app."""
        self._session = client_session(TIMEOUT)
        try:
            if self.workers != 0:
                self.pool = await asyncio.to_thread(make_pool, self.workers)
            yield
        finally:
            await self._session.close()
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("the viewer has not started")
        return self._session

    async def genesis(self) -> Genesis:
        """The pinned network (``--genesis``), else the first node's, fetched once."""
        async with self._genesis_lock:
            if self._genesis is None:
                self._genesis = await network_genesis(self.session, self.urls)
            return self._genesis

    def client(self) -> NodeClient:
        return NodeClient(self.session, self.urls, self.me, ids=self.ids)

    async def series(
        self,
        patient: bytes,
        stream: str,
        lo: int,
        hi: int,
        access: Access,
        grants: list[tuple[bytes, Grant, bool]] | None,
    ) -> Json:
        """``/api/series``: the stream over ``[lo, hi]``, fetched, verified and opened.

        ``grants`` (id, grant, revoked) bound what is shown: points only inside an active
        grant of this stream, the rest of the window reported unavailable.  ``None``: the
        patient, who may see everything.
        """
        doc = frame(patient, access.subject, stream, lo, hi, grants)
        covered = windows.clip(
            [(lo, hi)] if grants is None else windows.active_windows(grants, stream), lo, hi
        )
        try:
            fetcher = Fetcher(
                self.client(), await self.genesis(), keys_for=access.keys_for, pool=self.pool
            )
            res = await fetcher.fetch(patient, stream, lo, hi)
        except NODE_TROUBLE as exc:
            doc["error"] = problem(exc)
            return doc
        rows = res.rows(access.subject, lo, hi)
        shown = [r for r in rows if windows.inside(r.t_ms, covered)]
        doc |= {
            "unit": rows[0].unit if rows else None,
            "series": windows.series_of(stream, shown),
            "verified": {
                "readings": len(res.readings),
                "samples": len(rows),  # what `provider fetch` gives for this window
                "shown": len(shown),  # of those, inside an active grant
                "blocks": res.blocks,
                "pages": res.pages,
                "bytes": res.bytes_transferred,
                "undecryptable": res.undecryptable,
                "skipped": len(res.skipped),  # signed, but they did not decrypt
            },
            "node": res.node_url,
        }
        return doc


def frame(
    patient: bytes,
    subject: str,
    stream: str,
    lo: int,
    hi: int,
    grants: list[tuple[bytes, Grant, bool]] | None,
    error: Json | None = None,
) -> Json:
    """A ``/api/series`` answer before anything is fetched: the window, the grant bands
    and the unavailable ranges (the whole window when ``grants`` is empty)."""
    if grants is None:
        bands: list[Json] = []
        unavailable: list[Json] = []
    else:
        mine = [(gid, g, r) for gid, g, r in grants if stream in {s.stream for s in g.streams}]
        bands = [
            {"id": gid.hex(), "from_ms": w[0], "to_ms": w[1], "open": g.open}
            for gid, g, r in mine
            if not r
            for w in windows.clip([windows.grant_window(g)], lo, hi)
        ]
        unavailable = windows.unavailable(
            windows.active_windows(mine, stream),
            [windows.grant_window(g) for _, g, r in mine if r],
            lo,
            hi,
        )
    return {
        "patient": patient.hex(),
        "subject": subject,
        "stream": stream,
        "from_ms": lo,
        "to_ms": hi,
        "unit": None,
        "series": [],
        "grants": bands,
        "unavailable": unavailable,
        "verified": None,
        "node": None,
        "error": error,
    }


def problem(exc: BaseException) -> Json:
    """What went wrong at the nodes, for the page: a short reason and the whole message."""
    if isinstance(exc, Refused):
        reason = exc.reason
    elif isinstance(exc, RemoteError | KeyError | ValueError):
        reason = "verification_failed"
    else:
        reason = "unreachable"
    return {"reason": reason, "message": str(exc) or type(exc).__name__}


# --- query parameters ----------------------------------------------------------


class BadRequest(Exception):
    """A request to the viewer itself that makes no sense (a 400)."""


def query_key(request: web.Request, name: str) -> bytes:
    text = request.query.get(name, "")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BadRequest(f"{name}: a 64-hex public key expected")
    return key


def query_stream(request: web.Request) -> str:
    try:
        return name_str(request.query.get("stream"))
    except MalformedMessage:
        raise BadRequest("stream: a short lowercase name expected") from None


def query_window(request: web.Request) -> tuple[int, int]:
    """``from`` and ``to`` in Unix ms; by default the last hour."""

    def ms(name: str, default: int) -> int:
        text = request.query.get(name)
        if not text:
            return default
        try:
            v = int(text)
        except ValueError:
            raise BadRequest(f"{name}: Unix ms expected") from None
        if not 0 <= v < windows.FOREVER:
            raise BadRequest(f"{name}: out of range")
        return v

    hi = ms("to", now_ms())
    lo = ms("from", max(0, hi - HOUR_MS))
    if lo > hi:
        raise BadRequest("from is after to")
    return lo, hi


# --- the application -------------------------------------------------------------

READER = web.AppKey("reader", Reader)
HOSTS: web.AppKey[set[str]] = web.AppKey("hosts")  # Host values it answers; empty: any
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    hosts = request.app[HOSTS]
    if hosts and request.host not in hosts:
        return web.Response(status=421, text="this viewer answers only on its own address\n")
    try:
        resp = await handler(request)
    except BadRequest as exc:
        resp = web.json_response(
            {"error": {"reason": "bad_request", "message": str(exc)}}, status=400
        )
    resp.headers.update(SECURITY_HEADERS)
    return resp


def _page_file(name: str) -> web.Response:
    """A packaged file of the pages, by bare name (the node's dashboard serves them alike)."""
    found = static_file(name)
    if found is None:
        return web.Response(status=404, text=f"no static file {name!r}\n")
    body, kind = found
    return web.Response(body=body, content_type=kind, charset="utf-8")


def make_app(reader: Reader, page: str, routes: web.RouteTableDef) -> web.Application:
    """An app serving ``page`` at ``/``, the static files, and ``routes``."""
    app = web.Application(middlewares=[guard])
    app[READER] = reader
    app[HOSTS] = set()
    app.cleanup_ctx.append(reader.lifetime)

    async def index(_: web.Request) -> web.Response:
        return _page_file(page)

    async def static(request: web.Request) -> web.Response:
        return _page_file(request.match_info["name"])

    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_routes(routes)
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve(app: web.Application, host: str, port: int, label: str) -> int:
    """Listen, print ``label: URL`` (flushed) at once, and run until SIGINT or SIGTERM."""
    if not _is_loopback(host):
        raise ConfigError(
            f"--host {host}: the viewer shows decrypted health data and has no login, so it "
            "listens on loopback only; from another machine use an SSH tunnel "
            "(ssh -L PORT:127.0.0.1:PORT this-host)"
        )
    stop = stop_on_signals()
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): "
                "pick another --port, or --port 0 for a free one"
            ) from exc
        real = int(runner.addresses[0][1])
        names = {host, "localhost", "127.0.0.1", "::1"}
        app[HOSTS].update(f"{_url_host(n)}:{real}" for n in names)
        print(f"{label}: http://{_url_host(host)}:{real}/", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
