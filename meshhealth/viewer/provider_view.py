"""``meshhealth provider serve``: the provider's local viewer of what patients granted it.

``GET /api/me`` → ``{role: "provider", key, nodes}``

``GET /api/grants`` → ``{patients: [{patient, subject, streams, state, grants:
[grant]}], error}``: every grant made to this provider, its signed transaction
checked, grouped by patient (``state``: the best of its grants' states:
``active``, ``expired``, ``revoked``).

``GET /api/series?patient=&stream=&from=&to=`` → ``{patient, subject, stream,
from_ms, to_ms, unit, series: [{label, points: [[t_ms, value], ...]}], grants:
[{id, from_ms, to_ms, open}], unavailable: [{from_ms, to_ms, reason}],
verified: {readings, samples, shown, blocks, pages, bytes, undecryptable},
node, error}`` (see :meth:`Reader.series`).
"""

from __future__ import annotations

from aiohttp import web

from meshhealth.sharing.grants import GrantKeys
from meshhealth.sharing.provider import access_of, grants_to
from meshhealth.viewer import windows
from meshhealth.viewer.server import (
    NODE_TROUBLE,
    READER,
    Reader,
    frame,
    make_app,
    now_ms,
    problem,
    query_key,
    query_stream,
    query_window,
)
from meshhealth.viewer.windows import Json

routes = web.RouteTableDef()


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    reader = request.app[READER]
    return web.json_response(
        {"role": "provider", "key": reader.me.public.hex(), "nodes": reader.urls}
    )


@routes.get("/api/grants")
async def grants(request: web.Request) -> web.Response:
    reader = request.app[READER]
    try:
        mine = await grants_to(reader.session, reader.urls, reader.me)
    except NODE_TROUBLE as exc:
        return web.json_response({"patients": [], "error": problem(exc)})
    return web.json_response({"patients": patients_doc(mine, now_ms()), "error": None})


def patients_doc(mine: list[tuple[GrantKeys, bool]], now: int) -> list[Json]:
    """The grants, grouped by patient in the order their first grant was made."""
    by_patient: dict[bytes, list[tuple[GrantKeys, bool]]] = {}
    for keys, revoked in sorted(mine, key=lambda kr: kr[0].grant.ts_ms):
        by_patient.setdefault(keys.grant.patient, []).append((keys, revoked))
    out = []
    for patient, held in by_patient.items():
        docs = [windows.grant_doc(k.id, k.grant, r, now) for k, r in held]
        streams = sorted(
            {s.stream for k, _ in held for s in k.grant.streams}, key=windows.stream_order
        )
        out.append(
            {
                "patient": patient.hex(),
                "subject": access_of(patient, held).subject,
                "streams": streams,
                "state": patient_state(docs),
                "grants": docs,
            }
        )
    return out


def patient_state(grants: list[Json]) -> str:
    """``active`` if any grant is; else ``expired`` if any ran out unrevoked; else
    ``revoked``."""
    states = {g["state"] for g in grants}
    return next(s for s in ("active", "expired", "revoked") if s in states)


@routes.get("/api/series")
async def series(request: web.Request) -> web.Response:
    reader = request.app[READER]
    patient, stream = query_key(request, "patient"), query_stream(request)
    lo, hi = query_window(request)
    try:
        mine = [
            (k, r)
            for k, r in await grants_to(reader.session, reader.urls, reader.me)
            if k.grant.patient == patient
        ]
        access = access_of(patient, mine)  # Refused no_grant if there are none
    except NODE_TROUBLE as exc:
        return web.json_response(frame(patient, patient.hex(), stream, lo, hi, [], problem(exc)))
    held = [(k.id, k.grant, r) for k, r in mine]
    return web.json_response(await reader.series(patient, stream, lo, hi, access, held))


def app(reader: Reader) -> web.Application:
    return make_app(reader, "viewer.html", routes)
