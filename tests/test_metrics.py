"""Prometheus metrics and the dashboard's data.

Fast tests: the history ring buffer behind the dashboard's charts, the
static-file lookup, the metric names.  Integration: a real three-node
network with a real Mosquitto and simulated wearables, scraped over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_network import converged, hr_sim, start_nodes
from test_sharing_read import eventually

from meshhealth.net.dashboard import History
from meshhealth.net.metrics import FAMILIES
from meshhealth.net.openapi import document
from meshhealth.web import static_file

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# --- the history ring buffer (pure) ---------------------------------------------------------


def test_history_rates_are_per_second_between_consecutive_samples() -> None:
    h = History(capacity=10)
    assert h.rates()["t_ms"] == [] and h.rates()["accepted_per_s"] == []
    h.record(1_000, 10.0, 0, {})
    assert h.rates()["t_ms"] == []  # one sample: no interval yet
    h.record(3_000, 12.0, 20, {"malformed": 1})
    h.record(5_000, 14.0, 20, {"malformed": 1, "duplicate": 4})
    h.record(6_000, 15.0, 35, {"malformed": 1, "duplicate": 4})
    r = h.rates()
    assert r["t_ms"] == [3_000, 5_000, 6_000]
    assert r["accepted_per_s"] == [10.0, 0.0, 15.0]
    assert r["rejected_per_s"] == {"duplicate": [0.0, 2.0, 0.0], "malformed": [0.5, 0.0, 0.0]}
    assert r["interval_s"] > 0 and r["window_s"] == 10 * r["interval_s"]


def test_history_keeps_only_its_capacity_and_forgets_old_reasons() -> None:
    h = History(capacity=3)
    h.record(0, 0.0, 0, {"overload": 0})
    h.record(1_000, 1.0, 0, {"overload": 5})  # the only rejections, soon out of the window
    for i in range(2, 12):
        h.record(i * 1_000, float(i), i * 10, {"overload": 5})
    r = h.rates()
    assert len(h) == 4 and r["t_ms"] == [9_000, 10_000, 11_000]
    assert r["accepted_per_s"] == [10.0, 10.0, 10.0]
    assert r["rejected_per_s"] == {}


def test_history_survives_a_stalled_clock_and_a_counter_going_down() -> None:
    h = History(capacity=5)
    h.record(0, 5.0, 100, {})
    h.record(0, 5.0, 110, {})  # no time passed: replaces the last sample, no division by 0
    h.record(2_000, 7.0, 90, {})  # a counter never goes down; if it did, it counts as 0
    h.record(4_000, 9.0, 100, {})
    assert h.rates()["accepted_per_s"] == [0.0, 5.0]
    with pytest.raises(ValueError):
        History(capacity=0)


# --- names and files ------------------------------------------------------------------------


def test_metric_families_follow_prometheus_conventions() -> None:
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    for f in FAMILIES:
        assert f.name.startswith("meshhealth_") and f.help
        assert f.name.endswith("_total") == (f.kind == "counter"), f.name
        assert not f.name.endswith(("_ms", "_kb", "_mb", "_milliseconds")), f.name


def test_static_files_are_served_by_bare_name_only() -> None:
    for name in ("dashboard.html", "dashboard.js", "dashboard.css", "chart.js", "common.css"):
        found = static_file(name)
        assert found is not None and found[0], name
    kinds = {
        n: (static_file(n) or (b"", ""))[1] for n in ("chart.js", "common.css", "dashboard.html")
    }
    assert kinds == {
        "chart.js": "text/javascript",
        "common.css": "text/css",
        "dashboard.html": "text/html",
    }
    for bad in ("", "../metrics.py", "..", ".hidden.js", "x/chart.js", "nope.js", "chart"):
        assert static_file(bad) is None, bad


# --- a real network -------------------------------------------------------------------------


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def scrape(url: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, every sample by name and labels) of one node's /metrics."""
    code, kind, body = get(f"{url}/metrics")
    assert code == 200 and kind.startswith("text/plain; version="), kind
    types, samples = {}, {}
    for fam in text_string_to_metric_families(body.decode()):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` that carry (at least) ``labels``."""
    want = set(labels.items())
    return sum(v for (n, k), v in samples.items() if n == name and want <= k)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(k)[label]: v for (n, k), v in samples.items() if n == name}


def dashboard_schema_errors(doc: Any) -> list[str]:
    """The live /v1/dashboard against its schema in the OpenAPI document."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$ref": "#/components/schemas/Dashboard", "components": document()["components"]}
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(doc)]


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_metrics_of_a_running_network(mosquitto: Any, tmp_path: Path) -> None:
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    urls = [n.url for n in nodes]
    try:
        types, before = scrape(urls[0])
        documented = {f.name.removesuffix("_total"): f.kind for f in FAMILIES}
        assert {n: types.get(n) for n in documented} == documented  # every family, even idle
        assert value(before, "meshhealth_ingest_readings_total") == 0

        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=60)
        try:
            await sim.enroll()
            drained = await asyncio.wait_for(
                sim.run(asyncio.Event(), duration_s=0, drain_timeout=120), 180
            )
        finally:
            sim.close()
        assert drained, sim.statistics()
        assert await converged(nodes, 3, 60)

        # garbage over MQTT (one node of the shared subscription takes it) and over HTTP
        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
            await client.publish(f"mh/v1/readings/{'00' * 32}", b"not a reading", qos=1)
        assert get(f"{urls[0]}/v1/no-such-route")[0] == 404
        assert get(f"{urls[0]}/static/no-such-file.js")[0] == 404  # answered by the handler
        assert get(f"{urls[0]}/v1/chains/{'00' * 32}/0")[0] == 401  # unsigned: authorities only
        assert get(f"{urls[0]}/v1/status")[0] == 200
        req = urllib.request.Request(f"{urls[0]}/v1/status", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 405

        def malformed_counted() -> bool:
            rejects = "meshhealth_ingest_rejected_total"
            return sum(value(scrape(u)[1], rejects, reason="malformed") for u in urls) >= 1

        assert await eventually(malformed_counted)

        scraped = [scrape(u)[1] for u in urls]
        readings = [value(s, "meshhealth_ingest_readings_total") for s in scraped]
        assert sum(readings) >= sim.produced  # failover duplicates may add a few
        assert sum(1 for n in readings if n > 0) >= 2, readings  # the broker split them
        for s, nd in zip(scraped, nodes, strict=True):
            st = nd.status()
            received = value(s, "meshhealth_ingest_received_total")
            assert (
                received == st["ingest"]["received"] >= value(s, "meshhealth_ingest_readings_total")
            )
            assert value(s, "meshhealth_blocks_sealed_total") > 0
            assert value(s, "meshhealth_store_readings") == st["store"]["readings"] > 0
            assert value(s, "meshhealth_peers", state="connected") == 2
            assert value(s, "meshhealth_peers", state="disconnected") == 0
            assert value(s, "meshhealth_gossip_received_bytes_total") > 0
            assert value(s, "meshhealth_gossip_sent_bytes_total") > 0
            assert value(s, "meshhealth_gossip_blocks_applied_total") > 0
            assert value(s, "meshhealth_gossip_catchup_missing_blocks") == 0
            assert value(s, "meshhealth_store_used_bytes") > 0
            assert 0 < value(s, "meshhealth_store_map_used_ratio") <= 1
            assert value(s, "meshhealth_mqtt_connected") == 1

        s0 = scraped[0]
        assert value(s0, "meshhealth_api_requests_total", method="GET", code="404") >= 2
        assert value(s0, "meshhealth_api_requests_total", method="GET", code="200") >= 1
        assert value(s0, "meshhealth_api_requests_total", method="GET", code="401") >= 1
        assert value(s0, "meshhealth_api_requests_total", method="DELETE", code="405") == 1
        assert value(s0, "meshhealth_api_requests_total", method="POST", code="202") >= 10  # enrol
        me = nodes[0].status()["node"]
        assert by_label(s0, "meshhealth_node_info", "node") == {me: 1.0}

        def heights_match() -> bool:
            _, s = scrape(urls[0])
            _, _, body = get(f"{urls[0]}/v1/chains")
            chains = {c["node"]: c for c in json.loads(body)["chains"]}
            heights = by_label(s, "meshhealth_chain_height", "node")
            confirmed = by_label(s, "meshhealth_chain_confirmed_height", "node")
            return len(chains) == 3 and all(
                heights[n] == c["height"] and confirmed[n] == c["confirmed"]
                for n, c in chains.items()
            )

        assert await eventually(heights_match)
        _, s0 = scrape(urls[0])
        for n, height in by_label(s0, "meshhealth_chain_height", "node").items():
            confirmed = value(s0, "meshhealth_chain_confirmed_height", node=n)
            assert value(s0, "meshhealth_chain_unconfirmed_blocks", node=n) == height - confirmed
            assert confirmed <= height
            assert value(s0, "meshhealth_chain_confirmation_lag_seconds", node=n) >= 0
            assert value(s0, "meshhealth_chain_faulty", node=n) == 0
        names = set(by_label(s0, "meshhealth_chain_height", "name"))
        assert len(names) == 3 and "" not in names  # each chain has its authority name

        # the dashboard's data: as documented, and its ingest history has moved
        _, _, body = get(f"{urls[0]}/v1/dashboard")
        doc = json.loads(body)
        assert dashboard_schema_errors(doc) == []
        assert len(doc["chains"]) == 3 and sum(c["mine"] for c in doc["chains"]) == 1
        assert {p["state"] for p in doc["peers"]} == {"connected"}
        assert doc["history"]["t_ms"] and max(doc["history"]["accepted_per_s"]) > 0
        assert doc["recent_blocks"] and all(b["count"] >= 0 for b in doc["recent_blocks"])
    finally:
        for n in nodes:
            n.stop()


def test_a_full_gossip_buffer_leaves_the_catchup_backlog_computable():
    """A block refused by a full buffer must not leave an empty entry behind (the backlog
    computation, which the dashboard, /metrics and the catch-up log all call, failed on it)."""
    from collections import Counter
    from types import SimpleNamespace

    from meshhealth.net import gossip_shell as gs

    shell = gs.GossipShell.__new__(gs.GossipShell)
    shell.buffer, shell.buffered = {}, 0
    shell.buffer_bytes, shell.buffer_by_peer, shell.limits = 0, Counter(), gs.GossipLimits()
    shell.buffer_blocks_by_peer, shell._gap_since = Counter(), {}
    shell.counters = Counter()
    shell.core = SimpleNamespace(wanted=dict, head=lambda chain: {b"a": 3}.get(chain, -1))
    shell._hold(gs.Arrival(b"p", b"a", 7, (b"", b""), 0))
    assert shell.missing() == {b"a": 4}
    shell.buffered = gs.MAX_BUFFERED  # full: the next block is dropped (pulled again later)
    shell._hold(gs.Arrival(b"p", b"b", 2, (b"", b""), 0))
    assert b"b" not in shell.buffer
    assert shell.missing() == {b"a": 4}
