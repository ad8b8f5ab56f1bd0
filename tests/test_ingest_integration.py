"""End to end on loopback: simulated devices -> real Mosquitto -> real node process -> LMDB."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from device_agents.simulate import Simulation
from meshhealth.chain.verify import verify_chain
from meshhealth.config import Genesis
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import Reading, decode_entry

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


def make_sim(
    node: Any,
    broker_url: str,
    state: Path,
    *,
    patients: int,
    devices: int,
    backfill_s: float,
    resend_after: float = 5.0,
) -> Simulation:
    g = Genesis.load(node.cfg.genesis_path)
    return Simulation(
        broker_url=broker_url,
        node_urls=[node.url],
        network=g.network_id,
        authorities={a.key for a in g.authorities},
        state_dir=state,
        patients=patients,
        devices_per_patient=devices,
        streams=("hr",),
        interval_s=1.0,
        samples_per_reading=1,
        backfill_s=backfill_s,
        resend_after=resend_after,
    )


def stored_readings(node: Any) -> tuple[list[tuple[bytes, int]], int]:
    """Every (device, seq) on the node's chain, after verifying the whole chain."""
    g = Genesis.load(node.cfg.genesis_path)
    store = Store(node.cfg.data_path, readonly=True)
    try:
        ((chain, head),) = store.heads().items()
        rep = verify_chain(
            chain,
            store.iter_raw_chain(chain),
            network=g.network_id,
            authorities={a.key for a in g.authorities},
            expected_head=head,
        )
        keys = []
        for h in range(head[0] + 1):
            blk = store.block(chain, h)
            assert blk is not None
            for raw in blk.entries:
                e = decode_entry(raw)
                if isinstance(e, Reading):
                    keys.append((e.device, e.seq))
        assert rep.readings == len(keys)
        return keys, rep.blocks
    finally:
        store.close()


def assert_exactly_once(sim: Simulation, keys: list[tuple[bytes, int]]) -> None:
    produced = {(d.id, s) for d in sim.devices for s in range(1, d.next_seq)}
    assert len(produced) == sim.produced
    assert len(keys) == len(set(keys)), "a reading was stored twice"
    assert set(keys) == produced, f"missing {len(produced - set(keys))} readings"


async def wait_committed(node: Any, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await asyncio.to_thread(node.status))["ingest"]["readings_committed"] >= n:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"node did not commit {n} readings")


@pytest.mark.timeout(300)
async def test_100_devices_20k_readings_committed_exactly_once(mosquitto, node_factory, tmp_path):
    node = node_factory(mosquitto.url)
    sim = make_sim(node, mosquitto.url, tmp_path / "sim", patients=50, devices=2, backfill_s=201)
    try:
        await sim.enroll()
        drained = await asyncio.wait_for(
            sim.run(asyncio.Event(), duration_s=0, drain_timeout=180), 240
        )
        stats = sim.statistics()
    finally:
        sim.close()
    assert sim.produced >= 20_000
    assert len(sim.devices) == 100
    assert drained, f"outboxes not emptied: {stats}"
    assert stats["outbox"] == 0 and stats["receipts"] > 0 and stats["bad_receipts"] == 0
    status = node.status()
    assert status["ingest"]["readings_committed"] == sim.produced
    assert status["ingest"]["rejected"] == status["ingest"]["rejects"].get("duplicate", 0)
    node.stop()
    keys, blocks = stored_readings(node)
    assert blocks >= 2
    assert_exactly_once(sim, keys)


async def crash_mid_ingest(node: Any, broker_url: str, state: Path, fault: Any) -> dict[str, Any]:
    """40 devices sync 150 s of 1 Hz readings; ``fault()`` strikes after 1,500 commits.

    Afterwards every produced reading must be stored exactly once in a verifying chain.
    """
    sim = make_sim(
        node, broker_url, state, patients=20, devices=2, backfill_s=150, resend_after=2.0
    )
    try:
        await sim.enroll()
        task = asyncio.create_task(sim.run(asyncio.Event(), duration_s=0, drain_timeout=180))
        try:
            await wait_committed(node, 1500, 120)
            await asyncio.to_thread(fault)
            drained = await asyncio.wait_for(task, 240)
        finally:
            if not task.done():
                task.cancel()
        stats = sim.statistics()
        assert drained, f"outboxes not emptied after the fault: {stats}"
        node.stop()
        keys, _ = stored_readings(node)
        assert_exactly_once(sim, keys)
        return stats
    finally:
        sim.close()


@pytest.mark.timeout(400)
async def test_kill9_node_mid_ingest_loses_nothing(mosquitto, node_factory, tmp_path):
    node = node_factory(mosquitto.url)
    restarted = []

    def crash() -> None:
        node.kill9()
        time.sleep(1.0)
        node.start()
        restarted.append(node.status()["ingest"]["readings_committed"])

    await crash_mid_ingest(node, mosquitto.url, tmp_path / "sim", crash)
    assert restarted and restarted[0] >= 1500, "the restarted node lost committed readings"


@pytest.mark.timeout(400)
async def test_broker_restart_mid_ingest_loses_nothing(mosquitto, node_factory, tmp_path):
    node = node_factory(mosquitto.url)
    stats = await crash_mid_ingest(
        node, mosquitto.url, tmp_path / "sim", lambda: mosquitto.restart(1.0)
    )
    assert stats["connects"] >= 2, "the agent should have reconnected after the restart"


@pytest.mark.timeout(300)
async def test_a_restarted_gateway_resumes_its_devices_and_resends_its_outbox(
    mosquitto, node_factory, tmp_path
):
    """A gateway whose broker was unreachable is stopped with a full outbox; started
    again on the same state dir it is the same patients and devices, sends what the
    outbox held, produces the time it was down, and every reading is stored once."""
    node = node_factory(mosquitto.url)
    state = tmp_path / "gateway"
    first = make_sim(node, "mqtt://127.0.0.1:9", state, patients=3, devices=1, backfill_s=20)
    try:
        await first.enroll()
        assert not first.resumed
        assert not await first.run(asyncio.Event(), duration_s=0, drain_timeout=1)
        produced, held = first.produced, first.outbox.count()
        ids = sorted(d.id for d in first.devices)
        clock = first.sim_ms
    finally:
        first.close()
    assert produced >= 3 * 20 and held == produced  # nothing reached the dead broker

    await asyncio.sleep(1.5)  # "down" for a while: the restart produces that time too
    again = make_sim(node, mosquitto.url, state, patients=3, devices=1, backfill_s=20)
    try:
        assert again.resumed and sorted(d.id for d in again.devices) == ids
        assert again.start_ms == clock  # no window produced twice, none skipped
        await again.enroll()  # a no-op: the nodes know these devices
        assert await again.run(asyncio.Event(), duration_s=0, drain_timeout=120)
        assert again.produced > 0 and again.outbox.count() == 0
        node.stop()
        keys, _ = stored_readings(node)
        assert len(keys) == len(set(keys)) == produced + again.produced
        assert {(d.id, s) for d in again.devices for s in range(1, d.next_seq)} == set(keys)
    finally:
        again.close()
