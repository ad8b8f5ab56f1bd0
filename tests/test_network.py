"""Several real node processes gossiping over loopback: every node ends with every chain."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from device_agents.simulate import Simulation
from meshhealth.bench.procs import NodeProcess
from meshhealth.cli.chain_cmds import verify_stores
from meshhealth.cli.demo import setup_network
from meshhealth.config import Genesis, NodeConfig

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


def launch(cfgs: list[NodeConfig], root: Path) -> list[NodeProcess]:
    """Start a node process per config; each waits for its peers before it ingests."""
    nodes = [
        NodeProcess(c.base / "node.toml", root / f"node{i}.log", c.api.port)
        for i, c in enumerate(cfgs)
    ]
    try:
        for nd in nodes:
            nd.start(until="api")
        for nd in nodes:
            nd.wait_ingesting()
    except BaseException:
        for nd in nodes:
            nd.stop()
        raise
    return nodes


def start_nodes(root: Path, n: int, broker_url: str) -> tuple[list[NodeProcess], Any]:
    cfgs = setup_network(root, n, broker=broker_url, shared_group="mh")
    return launch(cfgs, root), cfgs


def hr_sim(
    cfgs: Any,
    nodes: list[NodeProcess],
    broker_url: str,
    state: Path,
    *,
    backfill_s: float,
    resend_after: float = 5.0,
    epoch_ms: int = 3_600_000,
) -> Simulation:
    """10 patients, one 1 Hz heart-rate device each, enrolling through any of the nodes."""
    g = Genesis.load(cfgs[0].genesis_path)
    return Simulation(
        broker_url=broker_url,
        node_urls=[n.url for n in nodes],
        network=g.network_id,
        authorities={a.key for a in g.authorities},
        state_dir=state,
        patients=10,
        devices_per_patient=1,
        streams=("hr",),
        interval_s=1.0,
        samples_per_reading=1,
        backfill_s=backfill_s,
        resend_after=resend_after,
        epoch_ms=epoch_ms,
    )


def network_status(urls: list[str]) -> subprocess.CompletedProcess[str]:
    args = [a for u in urls for a in ("--node", u)]
    return subprocess.run(
        [sys.executable, "-m", "meshhealth.cli.main", "network", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def converged(nodes: list[NodeProcess], n_chains: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hs = [await asyncio.to_thread(nd.heads) for nd in nodes]
        if len(hs[0]) == n_chains and all(h == hs[0] for h in hs):
            return True
        await asyncio.sleep(0.3)
    return False


@pytest.mark.timeout(300)
async def test_three_nodes_share_a_broker_and_converge_on_every_chain(mosquitto, tmp_path):
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    try:
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=100)
        try:
            await sim.enroll()
            drained = await asyncio.wait_for(
                sim.run(asyncio.Event(), duration_s=0, drain_timeout=120), 180
            )
        finally:
            sim.close()
        assert drained, sim.statistics()
        # the shared subscription split the readings: more than one chain carries them
        assert await converged(nodes, 3, 60), [n.heads() for n in nodes]
        per_node = [n.status()["ingest"]["readings_committed"] for n in nodes]
        assert sum(1 for c in per_node if c > 0) >= 2, per_node
        assert sum(per_node) >= sim.produced  # failover duplicates may add a few
        for n in nodes:
            st = n.status()["gossip"]
            assert st.get("invalid_block", 0) == 0
            assert len(st["connections"]) == 2
        out = await asyncio.to_thread(network_status, [n.url for n in nodes])
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.strip().splitlines()
        table = lines[1:4]  # header, 3 nodes, then the legend
        assert all(line.split()[-2] == "0" for line in table), out.stdout  # converged: no lag
        assert not any(line.startswith("FAULTY") for line in lines), out.stdout
    finally:
        for n in nodes:
            n.stop()
    for c in cfgs:
        assert verify_stores(c.data_path) == 0  # every replica verifies, all chains


@pytest.mark.timeout(300)
async def test_killed_node_catches_up_and_outsiders_are_refused(mosquitto, tmp_path):
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    outsider_root = tmp_path / "outsider"
    try:
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=150, resend_after=2.0)
        try:
            await sim.enroll()
            task = asyncio.create_task(sim.run(asyncio.Event(), duration_s=0, drain_timeout=150))
            await asyncio.sleep(1.0)
            nodes[2].kill9()  # its share of the devices fails over to the others
            drained = await asyncio.wait_for(task, 200)
        finally:
            sim.close()
        assert drained
        nodes[2].start()
        assert await converged(nodes, 3, 90), [n.heads() for n in nodes]

        # a node of another network, pointed at ours, is refused at the handshake
        (other,) = setup_network(outsider_root, 1, broker=mosquitto.url)
        from dataclasses import replace

        other = replace(other, gossip=replace(other.gossip, peers=[nodes[0].url]))
        (other.base / "node.toml").write_text(other.dumps())
        intruder = NodeProcess(other.base / "node.toml", tmp_path / "intruder.log", other.api.port)
        intruder.start()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if nodes[0].status()["gossip"].get("handshake_refused", 0) >= 1:
                    break
                await asyncio.sleep(0.3)
            assert nodes[0].status()["gossip"].get("handshake_refused", 0) >= 1
            assert len(intruder.status()["chains"]) <= 1  # it learned nothing of ours
        finally:
            intruder.stop()
    finally:
        for n in nodes:
            n.stop()
    for c in cfgs:
        assert verify_stores(c.data_path) == 0
