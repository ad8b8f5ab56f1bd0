"""The provider and patient pages in a real headless Chromium, against a real network.

The network and the two viewers are ``test_viewer``'s: one network for both
files, which sort next to each other so that it is up only while they run.
Each page must load with no console error and no uncaught exception, draw
its heart-rate chart from the nodes' data, and leave a screenshot in
``$MESHHEALTH_ARTIFACTS`` (``viewer.png``, ``patient.png``).
"""

from __future__ import annotations

import time
import urllib.parse

import pytest
from browser import browser_page, chart_max, chart_points
from test_viewer import ViewerNet, api, provider_read_logged, viewer_network

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

viewer_net = pytest.fixture(scope="session")(viewer_network)
HR = 'section[data-stream="hr"]'


async def wait_drawn(page, selector: str) -> int:  # type: ignore[no-untyped-def]
    """Wait until the chart in ``selector`` has drawn points; how many it drew."""
    await page.wait_for_function(
        "(sel) => { const s = document.querySelector(sel + ' svg.mh-chart');"
        " return s !== null && Number(s.dataset.points) > 0; }",
        arg=selector,
    )
    return await chart_points(page, selector)


@pytest.mark.timeout(300)
async def test_the_provider_page_plots_the_grant_and_greys_out_the_rest(viewer_net) -> None:
    net: ViewerNet = viewer_net
    async with browser_page("viewer") as (page, errors):
        # the default window: the grant's own
        await page.goto(net.provider_url)
        assert await wait_drawn(page, HR) == 120
        assert await page.input_value("#patient") == net.patient.hex()
        # the whole simulated span: the grant band, and unavailable either side of it
        query = urllib.parse.urlencode({"patient": net.patient.hex(), "from": net.t0, "to": net.t1})
        await page.goto(f"{net.provider_url}?{query}")
        assert await wait_drawn(page, HR) == 120
        plot = f"{HR} svg.mh-chart > rect"
        assert await page.locator(f"{plot}.mh-band-grant").count() == 1
        assert await page.locator(f"{plot}.mh-band-unavailable").count() == 2
        kinds = await page.locator(f"{HR} li.vw-band").evaluate_all(
            "items => items.map(li => li.dataset.kind)"
        )
        assert kinds == ["grant", "unavailable", "unavailable"]
        # blood pressure is granted too, as two series
        await page.wait_for_selector('section[data-stream="bp"] svg.mh-chart[data-series="2"]')
        assert "120 samples shown" in await page.locator(f"{HR} .vw-meta").inner_text()
        assert await page.locator(f"{HR} .mh-error").inner_text() == ""
        assert errors == []

        # after the grant ended: the node's refusal, said plainly; nothing drawn
        query = urllib.parse.urlencode(
            {"patient": net.patient.hex(), "from": net.hi + 1, "to": net.t1}
        )
        await page.goto(f"{net.provider_url}?{query}")
        await page.wait_for_selector(f'{HR}[data-error="expired"]')
        said = await page.locator(f"{HR} .mh-error").inner_text()
        assert "grant has expired" in said, said
        assert await chart_points(page, HR) == 0
        assert await page.locator(f"{HR} svg.mh-chart > rect.mh-band-unavailable").count() == 1
        # the last view is the one in the screenshot: go back to the whole span
        query = urllib.parse.urlencode({"patient": net.patient.hex(), "from": net.t0, "to": net.t1})
        await page.goto(f"{net.provider_url}?{query}")
        assert await wait_drawn(page, HR) == 120
        assert errors == []


@pytest.mark.timeout(300)
async def test_the_patient_page_shows_who_read_what(viewer_net) -> None:
    net: ViewerNet = viewer_net
    # make sure the doctor has just read hr, and the patient's nodes logged it: the audit
    # table is newest first, so that read is the doctor's first row (an earlier test's
    # read of the same window must not stand in for it)
    since = time.time_ns() // 1_000_000
    api(
        net.provider_url, "/api/series", patient=net.patient.hex(), stream="hr",
        **{"from": net.lo, "to": net.hi},
    )  # fmt: skip
    assert provider_read_logged(net, net.lo, net.hi, since_ms=since)
    async with browser_page("patient") as (page, errors):
        query = urllib.parse.urlencode({"from": net.t0, "to": net.t1})
        await page.goto(f"{net.patient_url}?{query}")
        row = page.locator(
            f'#audit tbody tr[data-reader="{net.doctor.public.hex()}"][data-outcome="read"]'
        )
        await row.first.wait_for()
        cells = await row.first.locator("td").all_inner_texts()
        assert cells[1] == net.doctor.public.hex()[:8] and cells[2] == "hr"
        assert cells[4] == "read" and int(cells[5]) > 0
        assert await wait_drawn(page, "#audit-chart") > 0
        assert await chart_max(page, "#audit-chart") >= 1  # at least one read in a bucket
        # the doctor's grant in the grants table
        grant = page.locator("#grants tbody tr", has_text=net.grant_id[:8])
        assert await grant.count() == 1
        assert "expired" in await grant.inner_text()
        # the patient's own heart rate: every sample of the span
        assert await wait_drawn(page, HR) >= (net.t1 - net.t0) // 1000
        assert await page.locator(f"{HR} svg.mh-chart > rect.mh-band-unavailable").count() == 0
        assert errors == []
