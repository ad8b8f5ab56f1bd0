"""The node dashboard in real headless Chromium, served by a node of a real running
three-node network (real Mosquitto, node processes) while simulated wearables stream.

It loads with no console error, lists every chain, draws the ingest and
reject charts from the node's own history, lists recent blocks with their
confirmation, and shows no ciphertext; a screenshot is saved as
``test-artifacts/dashboard.png`` (see ``tests/browser.py``).
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from browser import browser_page, chart_max, chart_points
from test_network import hr_sim, start_nodes

from meshhealth.config import Genesis

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

ROWS = "document.querySelectorAll('#network tbody tr').length === 3"
INGEST_DRAWN = """() => {
  const svg = document.querySelector('#ingest-chart svg.mh-chart');
  return svg !== null && Number(svg.getAttribute('data-points')) >= 5;
}"""
REJECT_DRAWN = """() => {
  const svg = document.querySelector('#rejects-chart svg.mh-chart');
  return svg !== null && svg.textContent.includes('malformed_tx');
}"""
RATES = """async () => {
  const d = await (await fetch('/v1/dashboard')).json();
  return d.history.accepted_per_s;
}"""


def post_tx(url: str, body: bytes) -> tuple[int, str, bytes]:
    req = urllib.request.Request(f"{url}/v1/tx", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.mark.timeout(300)
async def test_dashboard_shows_the_network_and_live_ingest(mosquitto: Any, tmp_path: Path) -> None:
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=60)
    stop = asyncio.Event()
    try:
        await sim.enroll()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(sim.run(stop, duration_s=180, drain_timeout=30))
            try:
                async with browser_page("dashboard") as (page, errors):
                    await page.goto(f"{nodes[0].url}/")
                    await page.wait_for_function(ROWS, timeout=60_000)
                    await page.wait_for_function(INGEST_DRAWN, timeout=60_000)
                    assert await chart_points(page, "#ingest-chart") >= 5
                    assert max(await page.evaluate(RATES)) > 0  # what the chart plots moved
                    # a rejected transaction shows as its reason's line in the rejects chart
                    code, _, _ = await asyncio.to_thread(post_tx, nodes[0].url, b"\x93garbage")
                    assert code == 400
                    await page.wait_for_function(REJECT_DRAWN, timeout=30_000)
                    assert await chart_max(page, "#rejects-chart") > 0  # a non-zero rate

                    network = await page.inner_text("#network tbody")
                    genesis = Genesis.load(cfgs[0].genesis_path)
                    for a in genesis.authorities:  # every chain: its genesis name, short key
                        assert f"{a.name} · {a.key.hex()[:8]}" in network, network
                    assert "this node" in network and "FAULTY" not in network
                    assert network.count("connected") == 2

                    await page.wait_for_function(
                        "document.querySelectorAll('#blocks tbody tr').length > 0"
                    )
                    blocks = await page.inner_text("#blocks tbody")
                    assert "confirmed" in blocks or "pending" in blocks
                    title = await page.inner_text("header.mh-top")
                    assert "MeshHealth node" in title and "network" in title
                    assert await page.inner_text("#error") == ""

                    text = await page.inner_text("body")
                    assert not re.search(r"[0-9a-f]{65,}", text)  # no ciphertext, no payload
                    assert errors == []
            finally:
                stop.set()
    finally:
        sim.close()
        for n in nodes:
            n.stop()


@pytest.mark.timeout(120)
async def test_an_authority_that_never_wrote_a_block_still_has_a_row(
    mosquitto: Any, tmp_path: Path
) -> None:
    """Two authorities, only one of them ever started: the other is listed, not hidden."""
    from test_network import launch

    from meshhealth.cli.demo import setup_network

    cfgs = setup_network(tmp_path / "net", 2, broker=mosquitto.url)
    (node,) = launch(cfgs[:1], tmp_path / "net")
    try:
        async with browser_page("dashboard-silent-peer") as (page, errors):
            await page.goto(f"{node.url}/")
            await page.wait_for_function(
                "document.querySelectorAll('#network tbody tr').length === 2"
            )
            silent = page.locator("#network tbody tr", has_text="node-2")
            cells = await silent.locator("td").all_inner_texts()
            assert cells[1] == "no blocks" and cells[6].startswith("disconnected"), cells
            assert errors == []
    finally:
        node.stop()
