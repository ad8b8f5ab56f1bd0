"""The local viewers (``provider serve``, ``patient serve``) against a real network.

One network serves this file and ``test_viewer_browser.py`` (``viewer_net``,
session-scoped, started once however many modules ask for it): three real
node processes sharing a real Mosquitto, two simulated patients whose one
device publishes heart rate, SpO2 and blood pressure at 1 Hz for four
minutes, a bounded grant of two minutes of hr and bp to a doctor, and the
viewers as real subprocesses that print their URL.

The window math the pages rely on is tested first, without a network.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from signed_http import signed_json
from test_cli import mh
from test_network import converged, start_nodes

from device_agents.simulate import Simulation
from meshhealth.bench.procs import MOSQUITTO, BrokerProcess, NodeProcess
from meshhealth.config import Genesis
from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.sharing.export import Row, format_value
from meshhealth.viewer import windows

DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port
EPOCH = 60_000  # one-minute key epochs: a two-minute grant opens exactly its own minutes
BACKFILL_S = 240

# --- the window math, no network ------------------------------------------------


def test_gaps_and_clips_cover_the_window_exactly_once() -> None:
    covered = [(30, 40), (10, 20), (21, 25), (100, 200)]
    assert windows.merge(covered) == [(10, 25), (30, 40), (100, 200)]
    assert windows.clip(covered, 15, 35) == [(15, 25), (30, 35)]
    assert windows.gaps(covered, 0, 50) == [(0, 9), (26, 29), (41, 50)]
    assert windows.gaps([], 5, 9) == [(5, 9)]
    assert windows.gaps([(0, 100)], 5, 9) == []
    merged = windows.merge(covered)
    assert [t for t in range(60) if windows.inside(t, merged)] == [
        *range(10, 26),
        *range(30, 41),
    ]


def test_unavailable_says_revoked_where_only_a_revoked_grant_covered() -> None:
    got = windows.unavailable([(100, 199)], [(150, 300)], 0, 400)
    assert got == [
        {"from_ms": 0, "to_ms": 99, "reason": "not_granted"},
        {"from_ms": 200, "to_ms": 300, "reason": "revoked"},
        {"from_ms": 301, "to_ms": 400, "reason": "not_granted"},
    ]
    assert windows.unavailable([(0, windows.FOREVER)], [], 0, 400) == []


def test_blood_pressure_is_two_series_and_long_series_keep_their_peaks() -> None:
    rows = [Row("p", "bp", t, "mm[Hg]", (120.0 + t, 80.0), "d") for t in range(3)]
    got = windows.series_of("bp", rows)
    assert [s["label"] for s in got] == ["systolic", "diastolic"]
    assert got[0]["points"] == [[0, 120.0], [1, 121.0], [2, 122.0]]
    assert windows.series_of("bp", []) == [
        {"label": "systolic", "points": []},
        {"label": "diastolic", "points": []},
    ]
    points: list[list[float]] = [[t, float(t % 97)] for t in range(100_000)]
    thinned = windows.thin(points, 1000)
    assert len(thinned) <= 1000 and [p[0] for p in thinned] == sorted(p[0] for p in thinned)
    assert max(p[1] for p in thinned) == 96 and min(p[1] for p in thinned) == 0


# --- one network for the viewer tests ----------------------------------------------


@dataclass
class ViewerNet:
    """The running network, its people, the data window and the viewers' URLs."""

    root: Path
    nodes: list[NodeProcess]
    urls: list[str]
    pkey: Path
    dkey: Path
    patient: bytes
    doctor: Identity
    t0: int  # the first and last second of simulated data (one sample a second)
    t1: int
    lo: int  # the doctor's grant of hr and bp: [lo, hi]
    hi: int
    grant_id: str
    provider_url: str = ""
    patient_url: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)


def start_viewer(args: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``meshhealth <args>`` and return it with the URL it printed."""
    with log.open("wb") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshhealth.cli.main", *args],
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60  # a hang guard: it prints as soon as it listens
    seen = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            seen += line
            if b"http://" in line:
                return proc, line.decode().split()[-1]
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError(f"no URL printed: {seen!r}; log: {log.read_text()}")


def stop_viewer(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM; its exit code (killed after a 20 s hang guard)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    return proc.returncode


def node_args(*urls: str) -> list[str]:
    return [a for u in urls for a in ("--node", u)]


def get(url: str, **headers: str) -> tuple[int, Any, dict[str, str]]:
    """(status, JSON or text, headers) of a GET, whatever the status."""
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, body, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        status, body, hdrs = err.code, err.read(), dict(err.headers)
    try:
        return status, json.loads(body), hdrs
    except ValueError:
        return status, body.decode(errors="replace"), hdrs


def api(base: str, path: str, **query: Any) -> Any:
    url = base.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
    status, doc, _ = get(url)
    assert status == 200, (url, status, doc)
    return doc


def eventually(check: Any, timeout: float = 40.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.3)


def _simulate(net_root: Path, nodes: list[NodeProcess], broker: str, cfgs: Any) -> Simulation:
    g = Genesis.load(cfgs[0].genesis_path)
    sim = Simulation(
        broker_url=broker,
        node_urls=[n.url for n in nodes],
        network=g.network_id,
        authorities={a.key for a in g.authorities},
        state_dir=net_root / "sim",
        patients=2,
        devices_per_patient=1,
        streams=("hr", "spo2", "bp"),
        interval_s=1.0,
        samples_per_reading=1,
        backfill_s=BACKFILL_S,
        epoch_ms=EPOCH,
    )

    async def run() -> bool:
        await sim.enroll()
        return await asyncio.wait_for(
            sim.run(asyncio.Event(), duration_s=0, drain_timeout=120), 240
        )

    try:
        assert asyncio.run(run()), sim.statistics()
    finally:
        sim.close()
    return sim


def _start(root: Path) -> tuple[ViewerNet, BrokerProcess]:
    broker = BrokerProcess(root / "mosquitto")
    broker.start()
    nodes: list[NodeProcess] = []
    try:
        nodes, cfgs = start_nodes(root / "net", 3, broker.url)
        urls = [n.url for n in nodes]
        sim = _simulate(root, nodes, broker.url, cfgs)
        assert asyncio.run(converged(nodes, 3, 60))
        pkey = sorted((root / "sim" / "patients").glob("*.key"))[0]
        doctor = Identity.generate("provider")
        dkey = root / "doctor.key"
        save_identity(doctor, dkey)
        lo = (sim.start_ms // EPOCH + 1) * EPOCH
        hi = lo + 2 * EPOCH - 1
        r = mh(
            "patient", "grant", "--key", str(pkey), "--to", str(dkey), "--streams", "hr,bp",
            "--from", str(lo), "--until", str(hi), *node_args(urls[0]),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        net = ViewerNet(
            root, nodes, urls, pkey, dkey, load_identity(pkey).public, doctor,
            sim.start_ms, sim.sim_ms - 1, lo, hi, r.stdout.split()[1].rstrip(":"),
        )  # fmt: skip
        path = f"/v1/grantees/{doctor.public.hex()}/grants"
        assert eventually(lambda: all(signed_json(doctor, u, path)["grants"] for u in urls))
        # the doctor's first node is down: every fetch fails over to the second
        proc, net.provider_url = start_viewer(
            ["provider", "serve", "--key", str(dkey), *node_args(DEAD, urls[1])],
            root / "provider-serve.log",
        )
        net.procs.append(proc)
        proc, net.patient_url = start_viewer(
            ["patient", "serve", "--key", str(pkey), "--workers", "0", *node_args(urls[2])],
            root / "patient-serve.log",
        )
        net.procs.append(proc)
        return net, broker
    except BaseException:
        for n in nodes:
            n.stop()
        broker.stop()
        raise


_SHARED: list[tuple[ViewerNet, BrokerProcess]] = []
_USERS = [0]


def viewer_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ViewerNet]:
    """The shared network: started by the first module that asks, stopped by the last."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    if not _SHARED:
        _SHARED.append(_start(tmp_path_factory.mktemp("viewer")))
    _USERS[0] += 1
    try:
        yield _SHARED[0][0]
    finally:
        _USERS[0] -= 1
        if _USERS[0] == 0:
            net, broker = _SHARED.pop()
            codes = [stop_viewer(p) for p in net.procs]
            for n in net.nodes:
                n.stop()
            broker.stop()
            assert codes == [0] * len(codes), codes  # SIGTERM is a clean stop


viewer_net = pytest.fixture(scope="session")(viewer_network)


def fetch_csv(net: ViewerNet, key: Path, stream: str, lo: int, hi: int) -> list[dict[str, str]]:
    out = net.root / f"fetch-{os.getpid()}-{time.monotonic_ns()}.csv"
    r = mh(
        "provider", "fetch", "--key", str(key), "--patient", net.patient.hex(),
        "--stream", stream, "--from", str(lo), "--to", str(hi), "--format", "csv",
        "--out", str(out), *node_args(net.urls[0]),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return list(csv.DictReader(io.StringIO(out.read_text())))


# --- the provider's viewer ----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_series_are_what_provider_fetch_gives_inside_the_grant_only(viewer_net) -> None:
    net: ViewerNet = viewer_net
    grants = api(net.provider_url, "/api/grants")
    assert grants["error"] is None
    (p,) = grants["patients"]
    assert p["patient"] == net.patient.hex() and p["streams"] == ["hr", "bp"]
    (g,) = p["grants"]
    assert (g["id"], g["from_ms"], g["until_ms"]) == (net.grant_id, net.lo, net.hi)
    assert g["state"] == p["state"] == "expired"  # its two minutes lie in the past

    # the whole simulated span: the grant in the middle, unavailable either side
    doc = api(
        net.provider_url, "/api/series", patient=net.patient.hex(), stream="hr",
        **{"from": net.t0, "to": net.t1},
    )  # fmt: skip
    assert doc["error"] is None, doc["error"]
    assert doc["node"] == net.urls[1]  # the first node is down
    assert doc["unit"] == "/min"
    (series,) = doc["series"]
    points = series["points"]
    assert len(points) == (net.hi - net.lo) // 1000 + 1 == 120
    assert all(net.lo <= t <= net.hi for t, _ in points)
    assert doc["grants"] == [
        {"id": net.grant_id, "from_ms": net.lo, "to_ms": net.hi, "open": False}
    ]
    assert doc["unavailable"] == [
        {"from_ms": net.t0, "to_ms": net.lo - 1, "reason": "not_granted"},
        {"from_ms": net.hi + 1, "to_ms": net.t1, "reason": "not_granted"},
    ]
    v = doc["verified"]
    assert v["samples"] == v["shown"] == len(points) and v["readings"] >= len(points)

    # exactly the values `provider fetch` writes for the same window
    rows = fetch_csv(net, net.dkey, "hr", net.t0, net.t1)
    assert [(int(r["t_ms"]), r["value"]) for r in rows] == [
        (t, format_value((value,))) for t, value in points
    ]

    # blood pressure: systolic and diastolic, each inside the grant
    bp = api(
        net.provider_url, "/api/series", patient=net.patient.hex(), stream="bp",
        **{"from": net.t0, "to": net.t1},
    )  # fmt: skip
    assert bp["error"] is None and [s["label"] for s in bp["series"]] == ["systolic", "diastolic"]
    assert all(net.lo <= t <= net.hi for s in bp["series"] for t, _ in s["points"])
    bp_rows = fetch_csv(net, net.dkey, "bp", net.t0, net.t1)
    sys_, dia = bp["series"]
    assert [r["value"] for r in bp_rows] == [
        format_value((a[1], b[1])) for a, b in zip(sys_["points"], dia["points"], strict=True)
    ]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_refusal_is_a_clear_error_and_the_window_unavailable(viewer_net) -> None:
    net: ViewerNet = viewer_net
    # after the grant's end: the node refuses, the viewer says why
    doc = api(
        net.provider_url, "/api/series", patient=net.patient.hex(), stream="hr",
        **{"from": net.hi + 1, "to": net.t1},
    )  # fmt: skip
    assert doc["error"]["reason"] == "expired", doc["error"]
    assert "expired" in doc["error"]["message"]
    assert doc["series"] == [] and doc["verified"] is None
    assert doc["unavailable"] == [{"from_ms": net.hi + 1, "to_ms": net.t1, "reason": "not_granted"}]
    # a stream the patient did not grant
    doc = api(
        net.provider_url, "/api/series", patient=net.patient.hex(), stream="spo2",
        **{"from": net.t0, "to": net.t1},
    )  # fmt: skip
    assert doc["error"]["reason"] == "no_grant", doc["error"]
    assert doc["unavailable"] == [{"from_ms": net.t0, "to_ms": net.t1, "reason": "not_granted"}]

    # a stranger's viewer: nobody granted it anything
    skey = net.root / "stranger.key"
    save_identity(Identity.generate("provider"), skey)
    proc, url = start_viewer(
        ["provider", "serve", "--key", str(skey), "--workers", "0", *node_args(net.urls[0])],
        net.root / "stranger-serve.log",
    )
    try:
        assert api(url, "/api/grants") == {"patients": [], "error": None}
        doc = api(
            url, "/api/series", patient=net.patient.hex(), stream="hr",
            **{"from": net.t0, "to": net.t1},
        )  # fmt: skip
        assert doc["error"]["reason"] == "no_grant"
        assert "has granted us nothing" in doc["error"]["message"]
        assert doc["series"] == [] and doc["grants"] == []
        # its own request mistakes are 400s; a foreign Host is refused (DNS rebinding)
        status, bad, _ = get(url + "api/series?patient=xyz&stream=hr")
        assert status == 400 and bad["error"]["reason"] == "bad_request"
        status, _, _ = get(url + "api/grants", Host="evil.example:80")
        assert status == 421
    finally:
        assert stop_viewer(proc) == 0


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_revoked_grant_shows_as_revoked(viewer_net) -> None:
    net: ViewerNet = viewer_net
    nurse = Identity.generate("provider")
    nkey = net.root / "nurse.key"
    save_identity(nurse, nkey)
    r = mh(
        "patient", "grant", "--key", str(net.pkey), "--to", str(nkey), "--streams", "hr",
        "--from", str(net.t0), "--until", str(net.t1), *node_args(net.urls[0]),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    gid = r.stdout.split()[1].rstrip(":")
    r = mh(
        "patient", "revoke", "--key", str(net.pkey), "--grant", gid, "--no-rechain",
        *node_args(net.urls[0]),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    path = f"/v1/grantees/{nurse.public.hex()}/grants"

    def revoked_there() -> bool:
        listed = signed_json(nurse, net.urls[2], path)["grants"]
        return bool(listed) and all(g["revoked"] for g in listed)

    assert eventually(revoked_there)
    proc, url = start_viewer(
        ["provider", "serve", "--key", str(nkey), "--workers", "0", *node_args(net.urls[2])],
        net.root / "nurse-serve.log",
    )
    try:
        (p,) = api(url, "/api/grants")["patients"]
        assert p["state"] == "revoked" and p["grants"][0]["state"] == "revoked"
        doc = api(
            url, "/api/series", patient=net.patient.hex(), stream="hr",
            **{"from": net.t0, "to": net.t1},
        )  # fmt: skip
        assert doc["error"]["reason"] == "revoked", doc["error"]
        assert doc["unavailable"] == [{"from_ms": net.t0, "to_ms": net.t1, "reason": "revoked"}]
    finally:
        assert stop_viewer(proc) == 0


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_the_pages_and_their_scripts_are_served_locked_down(viewer_net) -> None:
    net: ViewerNet = viewer_net
    for base, page in ((net.provider_url, "viewer.js"), (net.patient_url, "patient.js")):
        status, html, headers = get(base)
        assert status == 200 and f"/static/{page}" in html and "/static/chart.js" in html
        assert headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert headers["Cache-Control"] == "no-store"
        for name in ("chart.js", "common.css", "viewer.css", "viewer.js", page):
            assert get(f"{base}static/{name}")[0] == 200, name
        # outside every route (the secret's prefix included): refused, nothing looked up
        assert get(f"{base}static/../../cli/main.py")[0] == 403
        assert get(f"{base}static/..%2F..%2Fcli%2Fmain.py")[0] == 404  # a name, not a path


# --- the patient's view --------------------------------------------------------------


def provider_read_logged(
    net: ViewerNet, lo: int, hi: int, *, since_ms: int = 0
) -> list[dict[str, Any]]:
    """The patient's audit entries of the doctor's reads of ``[lo, hi]`` logged at or after
    ``since_ms``, once the patient view has them (the node logs a read in its next block,
    then gossips it)."""

    def reads() -> list[dict[str, Any]]:
        doc = api(net.patient_url, "/api/audit")
        assert doc["error"] is None, doc["error"]
        return [
            e
            for e in doc["entries"]
            if e["reader"] == net.doctor.public.hex()
            and e["outcome"] == "read"
            and (e["from_ms"], e["to_ms"]) == (lo, hi)
            and e["ts_ms"] >= since_ms
        ]

    return eventually(reads)  # type: ignore[no-any-return]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_the_patient_view_lists_the_providers_read_and_its_grants(viewer_net) -> None:
    net: ViewerNet = viewer_net
    doc = api(
        net.provider_url, "/api/series", patient=net.patient.hex(), stream="hr",
        **{"from": net.lo, "to": net.hi},
    )  # fmt: skip
    n = len(doc["series"][0]["points"])
    mine = provider_read_logged(net, net.lo, net.hi)
    assert mine, api(net.patient_url, "/api/audit")
    assert mine[-1]["stream"] == "hr" and mine[-1]["readings"] >= n
    assert mine[-1]["grant"] == net.grant_id
    assert mine[-1]["node_name"] and mine[-1]["node"] == get(net.urls[1] + "/v1/status")[1]["node"]

    grants = api(net.patient_url, "/api/grants")
    assert grants["error"] is None
    g = next(g for g in grants["grants"] if g["id"] == net.grant_id)
    assert g["grantee"] == net.doctor.public.hex() and g["streams"] == ["bp", "hr"]

    me = api(net.patient_url, "/api/me")
    assert me["key"] == net.patient.hex() and me["streams"] == ["hr", "spo2", "bp"]
    # the patient's own stream: the whole window, nothing unavailable
    own = api(net.patient_url, "/api/series", stream="spo2", **{"from": net.t0, "to": net.t1})
    assert own["error"] is None and own["unavailable"] == [] and own["grants"] == []
    (series,) = own["series"]
    assert len(series["points"]) == (net.t1 - net.t0) // 1000 + 1
    rows = fetch_csv(net, net.pkey, "spo2", net.t0, net.t1)
    assert [(int(r["t_ms"]), r["value"]) for r in rows] == [
        (t, format_value((value,))) for t, value in series["points"]
    ]
    # nobody else's streams through the patient's view
    other = "00" * 32
    status, bad, _ = get(f"{net.patient_url}api/series?patient={other}&stream=hr")
    assert status == 400 and bad["error"]["reason"] == "bad_request"
