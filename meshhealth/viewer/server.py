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

A web page in the same browser can still *send* it a GET (an image, a form).
So the pages and every API route live under ``/s/SECRET/``, a random secret
made at start and printed in the URL: without it (compared in constant time)
the answer is 403 and no request is signed.  Only ``/static/`` (the packaged
scripts and styles, no data) is outside it.  And the work one request may
cause is bounded (:class:`Limits`): the window it asks for, the bytes and
samples a fetch may take in, its time, and one request at a time doing it
with a short queue behind (the rest 503).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
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
    FetchTooLarge,
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


DAY_MS = 86_400_000


@dataclass(frozen=True)
class Limits:
    """What one request to a viewer may cause (each a CLI flag of ``serve``)."""

    window_ms: int = 7 * DAY_MS  # the longest from..to a request may ask for
    future_ms: int = DAY_MS  # how far past now ``to`` may lie (nothing is stored there)
    max_bytes: int = 32 << 20  # node answer bytes one fetch takes in (plus one page)
    max_samples: int = 200_000  # samples one answer carries
    timeout_s: float = 60.0  # one request's whole work
    queue: int = 16  # requests waiting behind the one in flight (a page sends ~8 at once)


class Reader:
    """The reader's key and nodes, and what it fetches with while the server runs."""

    def __init__(
        self,
        me: Identity,
        urls: list[str],
        *,
        genesis: Path | None,
        workers: int | None,
        limits: Limits | None = None,
    ) -> None:
        if not urls:
            raise ConfigError("no --node given: name at least one node API URL")
        self.me, self.urls, self.workers = me, urls, workers
        self.limits = limits or Limits()
        self.secret = secrets.token_urlsafe(24)  # the run's secret: in every URL it serves
        self.slot = asyncio.Semaphore(1)  # one request at a time fetches and verifies
        self.waiting = 0
        self.refused: dict[str, int] = {"forbidden": 0, "busy": 0, "timeout": 0}
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
                self.client(),
                await self.genesis(),
                keys_for=access.keys_for,
                pool=self.pool,
                max_bytes=self.limits.max_bytes,
            )
            res = await fetcher.fetch(patient, stream, lo, hi)
        except FetchTooLarge as exc:
            doc["error"] = {"reason": "too_large", "message": str(exc)}
            return doc
        except NODE_TROUBLE as exc:
            doc["error"] = problem(exc)
            return doc
        if sum(len(o.samples) for o in res.readings) > self.limits.max_samples:
            doc["error"] = {
                "reason": "too_large",
                "message": f"more than {self.limits.max_samples:,} samples",
            }
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
    """``from`` and ``to`` in Unix ms; by default the last hour; at most
    ``Limits.window_ms`` long and ending at most ``Limits.future_ms`` after now."""
    limits = request.app[READER].limits

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
    if hi - lo > limits.window_ms:
        raise BadRequest(f"the window is longer than {limits.window_ms / DAY_MS:g} days")
    if hi > now_ms() + limits.future_ms:
        raise BadRequest("to: too far in the future")
    return lo, hi


# --- the application -------------------------------------------------------------

READER = web.AppKey("reader", Reader)
HOSTS: web.AppKey[set[str]] = web.AppKey("hosts")  # Host values it answers; empty: any
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusal(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": {"reason": reason, "message": message}}, status=status)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    hosts = request.app[HOSTS]
    if hosts and request.host not in hosts:
        return web.Response(status=421, text="this viewer answers only on its own address\n")
    reader = request.app[READER]
    if request.path.startswith("/static/"):  # the packaged scripts and styles: no data
        resp = await handler(request)
    elif not hmac.compare_digest(
        request.match_info.get("secret", "").encode(), reader.secret.encode()
    ):
        reader.refused["forbidden"] += 1
        resp = _refusal(403, "forbidden", "open the URL the viewer printed (it holds a secret)")
    else:
        resp = await _bounded(reader, request, handler)
    resp.headers.update(SECURITY_HEADERS)
    return resp


async def _bounded(reader: Reader, request: web.Request, handler: Handler) -> web.StreamResponse:
    """One request at a time does the work (fetches, verifies, decrypts); ``queue`` wait
    behind it, the rest are refused at once; each is cut off after ``timeout_s``."""
    if not request.path.startswith(f"/s/{reader.secret}/api/"):
        return await _answer(request, handler)  # a page or a redirect: no work
    if reader.waiting >= reader.limits.queue + 1:
        reader.refused["busy"] += 1
        return _refusal(503, "busy", "the viewer is busy with other requests")
    reader.waiting += 1
    try:
        async with asyncio.timeout(reader.limits.timeout_s):
            async with reader.slot:
                return await _answer(request, handler)
    except TimeoutError:
        reader.refused["timeout"] += 1
        return _refusal(504, "timeout", f"no answer within {reader.limits.timeout_s:g} s")
    finally:
        reader.waiting -= 1


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadRequest as exc:
        return _refusal(400, "bad_request", str(exc))


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

    async def to_index(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.path + "/")  # the page's API paths are relative

    app.router.add_get("/s/{secret}/", index)
    app.router.add_get("/s/{secret}", to_index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/s/{secret}/static/{name}", static)
    for route in routes:  # every API route under the secret prefix
        assert isinstance(route, web.RouteDef)
        app.router.add_route(route.method, "/s/{secret}" + route.path, route.handler)
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
        secret = app[READER].secret
        print(f"{label}: http://{_url_host(host)}:{real}/s/{secret}/", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0
