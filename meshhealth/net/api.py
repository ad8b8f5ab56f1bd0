"""The node's HTTP API (aiohttp).

Control transactions arrive here already signed by the patient, so the
request itself needs no further authentication; read endpoints that reveal
anything about a patient arrive with the sharing issue and its signed
requests.  Every error is a JSON ``{"error": ..., "reason": ...}`` with a
4xx status; nothing a client sends can stop the node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from meshhealth.errors import MalformedMessage, Rejected
from meshhealth.wire import BlockHeader, EnrollDevice, Grant, decode_entry
from meshhealth.wire.codec import pack
from meshhealth.wire.types import MAX_CONTROL

NODE: web.AppKey[Any] = web.AppKey("node", Any)
MSGPACK = "application/msgpack"


def _err(status: int, reason: str, message: str) -> web.Response:
    return web.json_response({"error": message, "reason": reason}, status=status)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[..., Any]
) -> web.StreamResponse:
    request.app[NODE].api_requests[request.method] = (
        request.app[NODE].api_requests.get(request.method, 0) + 1
    )
    try:
        resp: web.StreamResponse = await handler(request)
        return resp
    except web.HTTPException:
        raise
    except MalformedMessage as exc:
        return _err(400, "malformed", str(exc))
    except Rejected as exc:
        return _err(409 if exc.reason.startswith("duplicate") else 422, exc.reason, str(exc))


async def submit_tx(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_CONTROL:
        return _err(413, "oversized", f"a transaction is at most {MAX_CONTROL} bytes")
    raw = await request.read()
    tid = request.app[NODE].pipeline.submit_tx(raw)
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
        raise web.HTTPBadRequest(text="expected a 64-hex key")
    return k


async def block(request: web.Request) -> web.Response:
    node = _key(request.match_info["node"])
    try:
        height = int(request.match_info["height"])
    except ValueError:
        return _err(400, "malformed", "height must be an integer")
    raw = request.app[NODE].store.raw_block(node, height)
    if raw is None:
        return _err(404, "not_found", "no such block")
    if request.query.get("format") == "json":
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
    """The enrolment transactions naming a device (it unseals its stream keys from them)."""
    device = _key(request.match_info["device"])
    out = [
        raw
        for raw in request.app[NODE].store.control_entries()
        if isinstance(tx := decode_entry(raw), EnrollDevice) and tx.device == device
    ]
    return web.Response(body=pack(out), content_type=MSGPACK)


def _grant_doc(access: Any, gid: bytes, g: Grant) -> dict[str, Any]:
    return {
        "id": gid.hex(),
        "patient": g.patient.hex(),
        "grantee": g.grantee.hex(),
        "streams": [s.stream for s in g.streams],
        "from_ms": g.from_ms,
        "until_ms": g.until_ms or None,
        "open": g.open,
        "pseudonymous": bool(g.pseudonymous),
        "ts_ms": g.ts_ms,
        "revoked": access.is_revoked(gid),
        "tx": g.encode().hex(),  # the signed grant: its grantee opens its keys from it
    }


async def grants(request: web.Request) -> web.Response:
    """Grants naming a patient (``/v1/patients/{key}/grants``) or a grantee
    (``/v1/grantees/{key}/grants``).  Grants sit in blocks, which every node
    replicates and serves, so this reveals nothing a block read would not."""
    who = _key(request.match_info["key"])
    access = request.app[NODE].batcher.access
    side = "patient" if request.path.startswith("/v1/patients/") else "grantee"
    out = [
        _grant_doc(access, gid, g)
        for gid, g in sorted(access.grants.items(), key=lambda kv: kv[1].ts_ms)
        if getattr(g, side) == who
    ]
    return web.json_response({"grants": out})


def make_app(node: Any) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_CONTROL + 1024)
    app[NODE] = node
    app.router.add_post("/v1/tx", submit_tx)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/chains", chains)
    app.router.add_get("/v1/chains/{node}/{height}", block)
    app.router.add_get("/v1/devices/{device}/enrollments", enrollments)
    app.router.add_get("/v1/patients/{key}/grants", grants)
    app.router.add_get("/v1/grantees/{key}/grants", grants)
    app.router.add_get("/v1/gossip", node.gossip.handle)
    app.router.add_get("/v1/gossip/latency", latency)
    app["started"] = time.time()
    return app
