"""``meshhealth patient serve``: the patient's local view of who read their data, and it.

``GET /api/me`` → ``{role: "patient", key, streams, nodes}``

``GET /api/audit?from=&to=`` → ``{node, entries: [{ts_ms, reader, stream, from_ms,
to_ms, outcome, reason, grant, readings, node, node_name}], error}``: the audit
trail (by default of the last ``Limits.window_ms``) from the first node that
serves it, oldest first, each access log's node
signature checked and its node one of the network's authorities.

``GET /api/grants`` → ``{grants: [grant], error}``: the patient's grants, each
signed transaction checked (``state``: ``active``, ``expired`` or ``revoked``,
the last as the node reports it).

``GET /api/series?stream=&from=&to=`` → as the provider's, opened with the
patient's own key chains (no grant bands: the patient may read everything).
"""

from __future__ import annotations

import json

from aiohttp import web

from meshhealth.crypto.hashing import h
from meshhealth.sharing.export import access_log_doc
from meshhealth.sharing.keychain import KeyChain
from meshhealth.sharing.provider import VerificationError, audit_trail, own_access
from meshhealth.viewer import windows
from meshhealth.viewer.server import (
    NODE_TROUBLE,
    READER,
    BadRequest,
    Reader,
    make_app,
    now_ms,
    problem,
    query_key,
    query_stream,
    query_window,
)
from meshhealth.wire import Grant

CHAINS: web.AppKey[list[KeyChain]] = web.AppKey("chains")
routes = web.RouteTableDef()


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    reader = request.app[READER]
    streams = sorted({c.stream for c in request.app[CHAINS]}, key=windows.stream_order)
    return web.json_response(
        {"role": "patient", "key": reader.me.public.hex(), "streams": streams, "nodes": reader.urls}
    )


@routes.get("/api/audit")
async def audit(request: web.Request) -> web.Response:
    reader = request.app[READER]
    if "from" in request.query:
        lo, hi = query_window(request)
    else:  # the last window a request may ask for (a flooded trail is not fetched whole)
        hi = now_ms()
        lo = max(0, hi - reader.limits.window_ms)
    try:
        genesis = await reader.genesis()
        names = {a.key: a.name for a in genesis.authorities}
        url, logs = await audit_trail(reader.client(), from_ms=lo, to_ms=hi)
        if any(x.node not in names for x in logs):
            raise VerificationError("the audit trail holds a log of a node outside our network")
    except NODE_TROUBLE as exc:
        return web.json_response({"node": None, "entries": [], "error": problem(exc)})
    entries = [access_log_doc(x) | {"node_name": names[x.node]} for x in logs]
    return web.json_response({"node": url, "entries": entries, "error": None})


@routes.get("/api/grants")
async def grants(request: web.Request) -> web.Response:
    reader = request.app[READER]
    patient = reader.me.public
    try:
        _, body = await reader.client().first(f"/v1/patients/{patient.hex()}/grants")
        out = []
        now = now_ms()
        for g in json.loads(body)["grants"]:
            raw = bytes.fromhex(g["tx"])
            tx = Grant.decode(raw)
            if tx.patient != patient:
                raise VerificationError("a node listed a grant of someone else")
            tx.verify()
            out.append(windows.grant_doc(h(raw), tx, bool(g["revoked"]), now))
    except NODE_TROUBLE as exc:
        return web.json_response({"grants": [], "error": problem(exc)})
    return web.json_response({"grants": out, "error": None})


@routes.get("/api/series")
async def series(request: web.Request) -> web.Response:
    reader = request.app[READER]
    patient = reader.me.public
    if "patient" in request.query and query_key(request, "patient") != patient:
        raise BadRequest("this view shows only the patient's own streams")
    stream = query_stream(request)
    lo, hi = query_window(request)
    chains = request.app[CHAINS]
    access = own_access(patient, chains)
    return web.json_response(await reader.series(patient, stream, lo, hi, access, None))


def app(reader: Reader, chains: list[KeyChain]) -> web.Application:
    application = make_app(reader, "patient.html", routes)
    application[CHAINS] = chains
    return application
