"""``meshhealth bench gossip`` writes the documented JSON keys (a small run: a hang guard,
not a speed check; the figures themselves are the benchmark's business)."""

from __future__ import annotations

import json

import pytest

from meshhealth.bench.gossip import run


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_bench_gossip_writes_the_documented_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "g.json"
    run(quick=True, json_path=out, real_nodes=3, real_phases=((1_000, 2_000), (1_500, 1_000)))
    data = json.loads(out.read_text())
    assert [r["nodes"] for r in data["sim"]] == [10, 100, 1000]
    for r in data["sim"]:
        for key in (
            "log2_nodes",
            "rounds_p50",
            "rounds_p99",
            "messages_per_node_per_block",
            "bytes_per_node_per_block",
        ):
            assert key in r
        assert r["rounds_p99"] <= 2 * r["log2_nodes"] + 1
        assert r["messages_per_node_per_block"] <= r["fanout"] * r["rounds_max"]
    assert [r["load_readings_per_s"] for r in data["real"]] == [1_000, 1_500]
    for real in data["real"]:
        assert real["nodes"] == 2  # the third node is the one that catches up
        assert 0 < real["p50_ms"] <= real["p99_ms"]
        assert real["blocks"] > 0
    assert data["catchup_readings"] == 3_000  # every reading the live nodes held
    assert data["catchup_readings_per_s"] > 0
    assert data["catchup_ceiling_verify_per_s"] > 0
    assert data["catchup_invalid_blocks"] == 0
