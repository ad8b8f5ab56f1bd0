"""A device's enrolment listing stays bounded and useful under strangers' rechains
(issue 11 #14; the real-node half is in test_adversary_ingest.py)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from core_helpers import T0, make_world, new_device, stranger_rechain

from device_agents.keys import latest_rechains
from meshhealth.chain.acl import AccessState
from meshhealth.errors import NetworkError
from meshhealth.net.client import get_first, post_tx
from meshhealth.sharing.grants import make_rechain
from meshhealth.sharing.listing import device_txs
from meshhealth.wire import Rechain, decode_control
from meshhealth.wire.codec import pack


def test_the_listing_holds_the_latest_rechain_and_a_bounded_rest() -> None:
    w = make_world(streams=("hr",))
    dev, enrol = new_device(w)
    access = AccessState()
    access.apply(enrol)
    chain, ours = w.chains["hr"], []
    for i in range(3):  # the patient rechains three times: only the last matters
        rc, chain = make_rechain(
            w.patient, chain, [dev.id], [], now_ms=T0 + i, switch_ms=T0 + 1_000 * (i + 1)
        )
        access.apply(rc)
        ours.append(rc)
    bound = 64 * 1024
    strangers = [stranger_rechain(dev.id, T0 + 10**6) for _ in range(2 * bound // 15_000)]
    for rc in strangers:
        access.apply(rc)
    # what the device asks for: its patient's, in full, however many strangers write
    txs, truncated = device_txs(access, dev.id, w.patient.public, max_bytes=bound)
    assert not truncated
    assert txs == [ours[-1].encode(), enrol.encode()]
    assert latest_rechains(txs, w.patient.public) == {"hr": ours[-1]}
    # unfiltered: one rechain per (patient, stream), newest first, cut at the bound
    txs, truncated = device_txs(access, dev.id, max_bytes=bound)
    assert truncated and len(pack(txs)) <= bound
    decoded = [decode_control(t) for t in txs]
    keys = [(t.patient, t.stream) for t in decoded if isinstance(t, Rechain)]
    assert len(keys) == len(set(keys))
    assert all(t.ts_ms == T0 + 10**6 for t in decoded)  # the strangers' are the newest
    # and nothing at all for a device no transaction names
    assert device_txs(access, b"\1" * 32) == ([], False)


async def _serve(handler: Any) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.asyncio
async def test_clients_retry_a_busy_node_and_skip_an_oversized_answer() -> None:
    calls = []

    async def handler(request: web.Request) -> web.Response:
        calls.append(request.path)
        if request.path == "/v1/tx":
            if len(calls) < 3:
                return web.json_response(
                    {"error": "full", "reason": "busy"}, status=503, headers={"Retry-After": "0"}
                )
            return web.json_response({"tx": "ab", "status": "accepted"}, status=202)
        return web.Response(body=b"\0" * 5000)

    runner, url = await _serve(handler)
    try:
        async with aiohttp.ClientSession() as session:
            assert await post_tx(session, [url], b"tx") == "ab"
            assert calls == ["/v1/tx"] * 3
            with pytest.raises(NetworkError, match="over 4096 bytes"):
                await get_first(session, [url], "/big", max_bytes=4096)
            assert len(await get_first(session, [url], "/big", max_bytes=5000)) == 5000
    finally:
        await runner.cleanup()
