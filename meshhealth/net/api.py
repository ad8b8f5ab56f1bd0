"""The node's HTTP API (aiohttp); ``/v1/openapi.json`` describes it.

Control transactions arrive already signed by the patient, so submitting
one needs no further authentication; what it may cost is bounded per source,
per patient key and by the hourly budgets of :mod:`meshhealth.net.admission`
(a registration, ``P1``, must be signed by an authority of the network).
Reading a patient's readings or audit trail needs a request signed by the
reader (:mod:`meshhealth.net.signed_request`), rate-limited per source and
per reader key: the node checks it, decides what the access state allows
(:mod:`meshhealth.sharing.serve`), answers or refuses with 403, and records
an :class:`AccessLogV2` carrying the reader's signed request in its next
block (refusals and empty answers once per reader, patient and reason per
period, then as one summary with their count).  Raw blocks and proofs (every
patient's readings, grants and access logs) answer only a request signed by
an authority of the network; the grant and patient-enrolment listings only
the patient or grantee they name (or an authority); these are signed reads
too (same limits) but not logged.  What stays public: the device enrolments
(a device polls them before it can sign anything), the genesis, the chains'
heads, status, dashboard and metrics (counts, heights and keys of
authorities; nothing about a patient).  Every error is a JSON
``{"error": ..., "reason": ...}`` with a 4xx status (429 with ``Retry-After``
past a limit); nothing a client sends can stop the node.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from meshhealth.chain import merkle
from meshhealth.chain.block import decode_body
from meshhealth.errors import MalformedMessage, RateLimited, Rejected, RemoteError
from meshhealth.net.admission import source_of
from meshhealth.net.dashboard import dashboard_doc
from meshhealth.net.metrics import CONTENT_TYPE as METRICS_TYPE
from meshhealth.net.metrics import node_registry, render
from meshhealth.net.signed_request import RequestAuthError, SignedRequest, signed_target
from meshhealth.sharing.grants import grant_doc
from meshhealth.sharing.listing import device_txs
from meshhealth.sharing.serve import collect, decide
from meshhealth.web import static_file
from meshhealth.wire import (
    BlockHeader,
    EnrollDevice,
    Grant,
    Rechain,
    RegisterPatient,
    RemoveDevice,
    decode_control,
)
from meshhealth.wire.codec import name_str, pack
from meshhealth.wire.types import MAX_CONTROL, MAX_QUERY_MS, MAX_REQUEST_PATH

NODE: web.AppKey[Any] = web.AppKey("node", Any)
REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)  # this node's, not the global one
MSGPACK = "application/msgpack"
# request methods counted by name; anything else is counted as "other" (bounded labels)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def _err(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[..., Any]
) -> web.StreamResponse:
    """Answers the errors every handler may raise, and counts every request by method and
    status: answered, raised as an HTTP exception (a 404 from the router too), or a 500."""
    counts = request.app[NODE].api_requests
    method = request.method if request.method in METHODS else "other"
    try:
        resp = await _answer(request, handler)
    except web.HTTPException as exc:
        counts[method, exc.status] += 1
        raise
    except asyncio.CancelledError:
        raise  # the client went away before any answer
    except Exception:
        counts[method, 500] += 1  # aiohttp answers a handler's bug with a 500
        raise
    counts[method, resp.status] += 1
    return resp


async def _answer(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except MalformedMessage as exc:
        return _err(400, "malformed", str(exc))
    except RequestAuthError as exc:
        request.app[NODE].auth_failures += 1
        return _err(401, "unauthenticated", str(exc))
    except Rejected as exc:
        if exc.reason == "busy":  # the next blocks are full: nothing was taken in
            resp = _err(503, exc.reason, str(exc))
            resp.headers["Retry-After"] = "1"
            return resp
        return _err(409 if exc.reason.startswith("duplicate") else 422, exc.reason, str(exc))
    except RateLimited as exc:
        request.app[NODE].limits.limited[exc.reason] += 1
        resp = _err(429, exc.reason, str(exc))
        resp.headers["Retry-After"] = str(max(1, math.ceil(min(exc.retry_after_s, 86_400))))
        return resp


async def submit_tx(request: web.Request) -> web.Response:
    """Admit a control transaction within its source's, its patient's and the budgets'
    shares (:mod:`meshhealth.net.admission`): refused ones are counted and not written."""
    if request.content_length is not None and request.content_length > MAX_CONTROL:
        return _err(413, "oversized", f"a transaction is at most {MAX_CONTROL} bytes")
    raw = await request.read()
    node = request.app[NODE]
    now = time.monotonic()
    b = node.batcher
    try:
        node.limits.tx_source_charge(source_of(request.remote), len(raw), now)
        try:
            tx = decode_control(raw)
        except MalformedMessage:
            b.reject("malformed_tx")
            raise
        try:
            tx.verify()
        except RemoteError as exc:
            raise Rejected("bad_signature", str(exc)) from exc
        if isinstance(tx, RegisterPatient) and (
            tx.network != node.network or tx.authority not in node.authorities
        ):
            raise Rejected("not_authority", "a registration is signed by an authority")
        charge = node.limits.tx_admission(tx, raw, b.access, now)
    except (Rejected, RateLimited) as exc:
        b.reject(exc.reason)
        raise
    tid = node.pipeline.submit_tx(raw)
    charge()
    return web.json_response({"tx": tid.hex(), "status": "accepted"}, status=202)


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[NODE].status())


async def chains(request: web.Request) -> web.Response:
    chains = request.app[NODE].chains()
    return web.json_response({"chains": [{"node": n, **c} for n, c in chains.items()]})


async def latency(request: web.Request) -> web.Response:
    """Per remote block: ms from its producer's seal to its commit here (benchmarks)."""
    samples = list(request.app[NODE].gossip.latency)
    return web.json_response({"samples": [[c.hex(), h, round(ms, 2)] for c, h, ms in samples]})


def _key(text: str) -> bytes:
    try:
        k = bytes.fromhex(text)
    except ValueError:
        k = b""
    if len(k) != 32:
        raise MalformedMessage("expected a 64-hex key")
    return k


MAX_HEIGHT = (1 << 64) - 1  # heights are stored as 8-byte big-endian integers


def _height(text: str, name: str = "height") -> int:
    """A path segment as a block height or entry index: a decimal integer in [0, 2^64)."""
    try:
        v = int(text)
    except ValueError:
        raise MalformedMessage(f"{name} must be an integer") from None
    if not 0 <= v <= MAX_HEIGHT:
        raise MalformedMessage(f"{name} must be in [0, 2^64)")
    return v


async def _signed_by_one_of(
    request: web.Request, *parties: bytes, what: str
) -> web.Response | None:
    """None if the request is signed by one of ``parties`` or by an authority of the
    network; else the 403 answer.  An unsigned or badly signed request raises
    :class:`RequestAuthError` (401).  These reads reveal metadata, not readings, and are
    not written on chain as AccessLogs."""
    reader = (await _signed_by(request)).key
    if reader in parties or request.app[NODE].genesis.is_authority(reader):
        return None
    return _err(403, "not_allowed", f"{reader.hex()[:8]} may not read {what}")


async def block(request: web.Request) -> web.Response:
    """A block as stored, for authorities only: it holds every patient's readings, grants
    and access logs, which everyone else reads through the signed, logged API."""
    node = _key(request.match_info["node"])
    height = _height(request.match_info["height"])
    fmt = request.query.get("format")
    if fmt not in (None, "json"):
        raise MalformedMessage("format: only json")
    if (refused := await _signed_by_one_of(request, what="raw blocks")) is not None:
        return refused
    raw = request.app[NODE].store.raw_block(node, height)
    if raw is None:
        return _err(404, "not_found", "no such block")
    if fmt == "json":
        hdr = BlockHeader.decode(raw[0])
        return web.json_response(
            {
                "node": hdr.node.hex(),
                "height": hdr.height,
                "prev": hdr.prev.hex(),
                "ts_ms": hdr.ts_ms,
                "root": hdr.root.hex(),
                "count": hdr.count,
            }
        )
    return web.Response(body=pack(list(raw)), content_type=MSGPACK)


async def enrollments(request: web.Request) -> web.Response:
    """``/v1/devices/{device}/enrollments[?patient=]``: the device's enrolments and the
    latest rechain per (patient, stream) naming it, newest first, bounded in bytes
    (:mod:`meshhealth.sharing.listing`); ``X-MH-Truncated: 1`` if some were left out."""
    device = _key(request.match_info["device"])
    who = request.query.get("patient")
    patient = None if who is None else _key(who)
    out, truncated = device_txs(request.app[NODE].batcher.access, device, patient)
    resp = web.Response(body=pack(out), content_type=MSGPACK)
    if truncated:
        resp.headers["X-MH-Truncated"] = "1"
    return resp


def key_txs(access: Any, patient: bytes) -> list[bytes]:
    """A patient's enrolments, rechains and device removals: which device may write which
    key chain, and which no longer writes (a rechain must not seal to it)."""
    txs = [tx for tx in access.patient_txs(patient) if not isinstance(tx, Grant)]
    kinds = (EnrollDevice, Rechain, RemoveDevice)  # the order they were always listed in
    return [tx.encode() for kind in kinds for tx in txs if isinstance(tx, kind)]


async def patient_enrollments(request: web.Request) -> web.Response:
    """``/v1/patients/{key}/enrollments``, signed by the patient (or an authority): the
    patient's enrolments and rechains (msgpack); they name every device of the patient."""
    patient = _key(request.match_info["key"])
    refused = await _signed_by_one_of(request, patient, what="this patient's enrolments")
    if refused is not None:
        return refused
    return web.Response(
        body=pack(key_txs(request.app[NODE].batcher.access, patient)), content_type=MSGPACK
    )


def _grant_doc(access: Any, gid: bytes, g: Grant) -> dict[str, Any]:
    return {
        **grant_doc(gid, g),
        "revoked": access.is_revoked(gid),
        "tx": g.encode().hex(),  # the signed grant: its grantee opens its keys from it
        # rechains that sealed a new chain's key to this grant (an open grant follows them)
        "rechains": [
            tx.encode().hex()
            for tx in access.rechains_to(gid).values()
            if any(k.to == gid for k in tx.grants)
        ],
    }


async def grants(request: web.Request) -> web.Response:
    """Grants naming a patient (``/v1/patients/{key}/grants``) or a grantee
    (``/v1/grantees/{key}/grants``), signed by that patient or grantee (or an authority):
    who shares with whom is itself health information (a stranger must not learn which
    patients a clinic sees, nor which clinics a patient sees)."""
    who = _key(request.match_info["key"])
    side = "patient" if request.path.startswith("/v1/patients/") else "grantee"
    if (refused := await _signed_by_one_of(request, who, what=f"this {side}'s grants")) is not None:
        return refused
    access = request.app[NODE].batcher.access
    mine = access.grants_of(who) if side == "patient" else access.grants_to(who)
    out = [
        _grant_doc(access, gid, g)
        for gid, g in sorted(mine.items(), key=lambda kv: kv[1].ts_ms)
        if getattr(g, side) == who
    ]
    return web.json_response({"grants": out})


# --- signed reads -----------------------------------------------------------


async def _signed_by(request: web.Request) -> SignedRequest:
    """The reader's checked request (a bad signature raises :class:`RequestAuthError`,
    answered 401; a source or key over its share :class:`RateLimited`, answered 429).
    The source is charged before the signature is checked, the key after."""
    node = request.app[NODE]
    if len(request.raw_path.encode()) > MAX_REQUEST_PATH:
        raise MalformedMessage(f"a signed read's path is at most {MAX_REQUEST_PATH} bytes")
    # what we serve is what the patient's verifier will read from the signed path
    segs, query = signed_target(request.raw_path)
    if segs != request.path.split("/") or query != dict(request.query):
        raise MalformedMessage("a signed request's path must parse one way only")
    source = source_of(request.remote)
    now = time.monotonic()
    node.limits.read_source_charge(source, now)
    body = await request.read()
    now_ms = int(time.time() * 1000)
    req: SignedRequest = node.guard.check(
        request.method, request.raw_path, body, request.headers, now_ms
    )
    node.limits.read_key_charge(req.key, now)
    node.guard.remember(req, source, now_ms)
    return req


def _ms(request: web.Request, name: str, default: int | None = None) -> int:
    text = request.query.get(name)
    if text is None and default is not None:
        return default
    try:
        v = int(text or "")
    except ValueError:
        raise MalformedMessage(f"query parameter {name!r}: Unix ms expected") from None
    if not 0 <= v <= MAX_QUERY_MS:
        raise MalformedMessage(f"query parameter {name!r}: Unix ms in [0, {MAX_QUERY_MS}]")
    return v


async def readings(request: web.Request) -> web.Response:
    """``GET /v1/patients/{key}/readings?stream=&from=&to=[&after=]``, signed."""
    node = request.app[NODE]
    req = await _signed_by(request)
    reader = req.key
    patient = _key(request.match_info["key"])
    try:
        stream = name_str(request.query.get("stream"))
    except MalformedMessage:
        return _err(400, "malformed", "stream: a short lowercase name")
    lo, hi, after = _ms(request, "from"), _ms(request, "to"), _ms(request, "after", 0)
    if lo > hi:
        return _err(400, "malformed", "from is after to")
    access = node.batcher.access
    d = decide(access, reader, patient, stream, lo, hi)
    if not d.allowed:
        node.log_refusal(req, patient, stream, lo, hi, "denied", d.reason, b"")
        return _err(403, d.reason, f"{reader.hex()[:8]} may not read this ({d.reason})")
    enrolments = key_txs(access, patient)
    body, n = await asyncio.to_thread(
        collect, node.store, enrolments, patient, stream, d, after=after
    )
    if n:
        node.log_read(req, patient, stream, lo, hi, d.grant, n)
    else:  # an answer with nothing in it is logged like a refusal: once, then counted
        node.log_refusal(req, patient, stream, lo, hi, "read", "", d.grant)
    return web.Response(body=body, content_type=MSGPACK)


async def audit(request: web.Request) -> web.Response:
    """``GET /v1/patients/{key}/audit[?from=&to=]``, signed by the patient: every access
    log about them, from every chain this node holds."""
    node = request.app[NODE]
    req = await _signed_by(request)
    patient = _key(request.match_info["key"])
    lo, hi = (
        _ms(request, "from", 0),
        _ms(request, "to", min(MAX_QUERY_MS, int(time.time() * 1000) + 86_400_000)),
    )
    if req.key != patient:
        node.log_refusal(req, patient, "audit", lo, hi, "denied", "not_patient", b"")
        return _err(403, "not_patient", "only the patient may read their audit trail")
    trail = await asyncio.to_thread(node.store.audit_trail, patient, lo, hi)
    return web.Response(body=pack(["AU1", trail]), content_type=MSGPACK)


async def proof(request: web.Request) -> web.Response:
    """``GET /v1/chains/{node}/{height}/proof/{index}``, for authorities only: an entry,
    its block header and its RFC 9162 audit path (an erased entry comes as its leaf hash
    alone)."""
    node = _key(request.match_info["node"])
    height = _height(request.match_info["height"])
    index = _height(request.match_info["index"], "index")
    if (refused := await _signed_by_one_of(request, what="raw entries")) is not None:
        return refused
    raw = request.app[NODE].store.raw_block(node, height)
    if raw is None:
        return _err(404, "not_found", "no such block")
    body = decode_body(raw[1])
    if index >= len(body):
        return _err(404, "not_found", f"block {height} has {len(body)} entries")
    leaves = [merkle.leaf_of(e) for e in body]
    entry = body[index]
    return web.json_response(
        {
            "header": raw[0].hex(),
            "index": index,
            "size": len(body),
            "entry": None if merkle.is_pruned(entry) else entry.hex(),
            "leaf": leaves[index].hex(),
            "path": [p.hex() for p in merkle.inclusion_proof(leaves, index)],
        }
    )


async def network(request: web.Request) -> web.Response:
    """The network's genesis (authorities): pin it with ``provider fetch --genesis``."""
    return web.Response(text=request.app[NODE].genesis.dumps(), content_type="application/toml")


async def openapi(request: web.Request) -> web.Response:
    from meshhealth.net.openapi import document

    return web.json_response(document())


# --- monitoring: Prometheus metrics and the dashboard -----------------------------------

# the page is never framed by another site (it writes every value as text, not markup)
PAGE_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def metrics(request: web.Request) -> web.Response:
    body = render(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": METRICS_TYPE})


async def dashboard_page(request: web.Request) -> web.Response:
    return _static("dashboard.html")


async def static(request: web.Request) -> web.Response:
    return _static(request.match_info["name"])


def _static(name: str) -> web.Response:
    """A packaged file of the web pages (small: read on each request, so never stale)."""
    found = static_file(name)
    if found is None:
        return _err(404, "not_found", f"no static file {name!r}")
    body, kind = found
    return web.Response(body=body, content_type=kind, charset="utf-8", headers=PAGE_HEADERS)


async def dashboard(request: web.Request) -> web.Response:
    """The node's view of its network and its recent ingest, for the dashboard page."""
    return web.json_response(dashboard_doc(request.app[NODE]))


def make_app(node: Any) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_CONTROL + 1024)
    app[NODE] = node
    app[REGISTRY] = node_registry(node)
    app.router.add_post("/v1/tx", submit_tx)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/chains", chains)
    app.router.add_get("/v1/chains/{node}/{height}", block)
    app.router.add_get("/v1/chains/{node}/{height}/proof/{index}", proof)
    app.router.add_get("/v1/patients/{key}/readings", readings)
    app.router.add_get("/v1/patients/{key}/audit", audit)
    app.router.add_get("/v1/network", network)
    app.router.add_get("/v1/openapi.json", openapi)
    app.router.add_get("/v1/devices/{device}/enrollments", enrollments)
    app.router.add_get("/v1/patients/{key}/grants", grants)
    app.router.add_get("/v1/patients/{key}/enrollments", patient_enrollments)
    app.router.add_get("/v1/grantees/{key}/grants", grants)
    app.router.add_get("/v1/gossip", node.gossip.handle)
    app.router.add_get("/v1/gossip/latency", latency)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", dashboard_page)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/v1/dashboard", dashboard)
    return app
