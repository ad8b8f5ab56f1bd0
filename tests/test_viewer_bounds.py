"""A hostile web page against the local viewers (issue 11 #15), on ``test_viewer``'s
network: without the run's secret in the URL nothing is answered and nothing signed;
with it, a window past the bound is refused at once and the viewer's memory stays put;
a flood of requests gets 503s beyond the queue, not a pile of fetches."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import pytest
from test_viewer import ViewerNet, get, start_viewer, stop_viewer, viewer_network

pytestmark = pytest.mark.integration

viewer_net = pytest.fixture(scope="session")(viewer_network)
DAY = 86_400_000


def reads_at(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/v1/status", timeout=10) as r:
        return json.loads(r.read())["reads"]  # type: ignore[no-any-return]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def root_of(url: str) -> str:
    """The viewer's address without the secret path."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.netloc}"


@pytest.mark.timeout(120)
def test_without_the_secret_nothing_is_answered_or_signed(viewer_net) -> None:
    net: ViewerNet = viewer_net
    assert "/s/" in net.provider_url and net.provider_url.endswith("/")
    root = root_of(net.provider_url)
    series = urllib.parse.urlencode(
        {"patient": net.patient.hex(), "stream": "hr", "from": net.lo, "to": net.hi}
    )
    before = reads_at(net.urls[1])  # the doctor's viewer reads through the second node
    wrong = "/s/" + "A" * len(net.provider_url.split("/s/")[1].rstrip("/"))
    for path in (
        f"/api/series?{series}",
        "/api/grants",
        "/",
        f"{wrong}/api/series?{series}",
        f"{wrong}/",
        "/s//api/grants",
    ):
        status, doc, headers = get(root + path, Origin="http://evil.example")
        assert status == 403, (path, status, doc)
        assert doc["error"]["reason"] == "forbidden"
        assert "Content-Security-Policy" in headers
    status, _, _ = get(root + "/static/viewer.js")  # the scripts need no secret: no data
    assert status == 200
    time.sleep(1.5)  # a read the node logged would be counted by now
    assert reads_at(net.urls[1]) == before  # no signed request reached the node

    # the control: the printed URL reads, and the node logs it
    status, doc, _ = get(net.provider_url + f"api/series?{series}")
    assert status == 200 and doc["error"] is None and doc["series"], doc
    assert reads_at(net.urls[1])["access_logs"] > before["access_logs"]
    status, page, _ = get(net.provider_url)
    assert status == 200 and "<html" in page.lower()
    status, _, _ = get(net.provider_url.rstrip("/"))  # redirected to the page
    assert status == 200


@pytest.mark.timeout(120)
def test_a_huge_window_is_refused_at_once_and_memory_stays_bounded(viewer_net) -> None:
    net: ViewerNet = viewer_net
    proc = net.procs[1]  # the patient viewer: its own key chains, no grant in between
    base = net.patient_url
    rss0 = rss_kb(proc.pid)
    now = int(time.time() * 1000)
    for lo, hi in (
        (0, 10**15),  # the reproduction: far-future `to`
        (now - 14 * DAY, now),  # twice the 7-day bound
        (10**15 - 3_600_000, 10**15),  # one hour, in the far future
    ):
        t0 = time.monotonic()
        status, doc, _ = get(base + f"api/series?stream=hr&from={lo}&to={hi}")
        assert status == 400 and doc["error"]["reason"] == "bad_request", (lo, hi, doc)
        assert time.monotonic() - t0 < 2.0
    status, doc, _ = get(base + f"api/series?stream=hr&from={now - 7 * DAY}&to={now}")
    assert status == 200 and doc["error"] is None, doc  # the bound itself is allowed
    assert proc.poll() is None
    assert rss_kb(proc.pid) < rss0 + 100_000  # under 100 MB more than before


@pytest.mark.timeout(120)
def test_a_flood_of_requests_gets_503_beyond_the_queue(viewer_net) -> None:
    """A viewer whose node accepts connections and never answers: the one request in
    flight hangs until the time limit, 16 wait behind it, the rest are refused at once."""
    net: ViewerNet = viewer_net
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)  # the kernel completes the handshakes; nobody ever answers
    proc, url = start_viewer(
        ["provider", "serve", "--key", str(net.dkey), "--workers", "0",
         "--request-timeout", "3", "--node", f"http://127.0.0.1:{hole.getsockname()[1]}"],
        net.root / "blackhole-serve.log",
    )  # fmt: skip
    try:

        async def flood(n: int) -> list[int]:
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as s:

                async def one() -> int:
                    async with s.get(url + "api/grants") as r:
                        await r.read()
                        return r.status

                return list(await asyncio.gather(*(one() for _ in range(n))))

        t0 = time.monotonic()
        statuses = asyncio.run(flood(34))  # twice one in flight + 16 waiting
        took = time.monotonic() - t0
        assert sorted(statuses) == [503] * 17 + [504] * 17, statuses
        assert took < 15, took  # cut off at the 3 s limit, not at the client's 120 s
        status, doc, _ = get(url + "api/me")  # and it answers again once they are over
        assert status == 200 and doc["role"] == "provider"
    finally:
        assert stop_viewer(proc) == 0
        hole.close()
