"""The shared chart module, drawn in real headless Chromium from the packaged file."""

from __future__ import annotations

from importlib import resources

import pytest
from aiohttp import web
from browser import browser_page

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

PAGE = """<!doctype html><html><head><meta charset="utf-8">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/static/common.css">
<title>chart</title></head><body>
<div id="a"></div><div id="b"></div><div id="c"></div>
<script src="/static/chart.js"></script>
<script>
const t0 = Date.UTC(2026, 10, 21, 12, 0, 0);
const hr = [];
for (let i = 0; i < 120; i++) hr.push([t0 + i * 1000, i === 60 ? null : 60 + (i % 7)]);
MHChart.line(document.getElementById("a"), {
  series: [{label: "heart rate", points: hr}],
  bands: [{from: t0 + 20000, to: t0 + 90000, kind: "grant", label: "grant"},
          {from: t0, to: t0 + 20000, kind: "unavailable", label: "no grant"}],
  xRange: [t0, t0 + 120000], yLabel: "/min"});
MHChart.line(document.getElementById("b"), {series: []});
MHChart.line(document.getElementById("c"), {
  series: [{label: "one", points: [[t0, 5]]}, {label: "none", points: [[t0, null]]}]});
</script></body></html>"""


async def test_chart_draws_points_bands_gaps_and_empty_charts(unused_tcp_port):
    static = resources.files("meshhealth") / "web" / "static"
    app = web.Application()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app.router.add_get("/", index)
    app.router.add_static("/static", str(static))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    try:
        async with browser_page("chart") as (page, errors):
            await page.goto(f"http://127.0.0.1:{unused_tcp_port}/")
            a = page.locator("#a svg.mh-chart")
            assert await a.get_attribute("data-points") == "119"  # one null breaks the line
            assert await a.locator("path.mh-line").count() == 1
            assert await a.locator("rect.mh-band-grant").count() >= 1
            assert await a.locator("rect.mh-band-unavailable").count() >= 1
            d = await a.locator("path.mh-line").get_attribute("d")
            assert d is not None and d.count("M") == 2  # the gap starts a new stroke
            assert await a.get_attribute("data-max") == "66"
            assert await page.get_attribute("#b svg.mh-chart", "data-points") == "0"
            assert await page.get_attribute("#b svg.mh-chart", "data-max") == ""
            c = page.locator("#c svg.mh-chart")
            assert await c.get_attribute("data-points") == "1"
            assert await c.locator("circle").count() == 1  # a lone point is still visible
            assert errors == []
    finally:
        await runner.cleanup()
