"""Issue 11 #6: one authority cannot empty a device's outbox.

Real Mosquitto, a real node process, a real device agent.  The test holds the
network's authority key (it plays a malicious authority) and publishes
validly signed receipts on the device's receipts topic while none of the
device's readings is stored: an A2 receipt for seq 2**62, an A1 receipt (the
old tag, which names no block) for 2**62, and an A2 receipt from a key that is
no authority.  The device keeps every reading and keeps publishing; when the
node comes up, its honest A2 receipts clear the outbox, and the device keeps
the last one, naming a block that really is on the node's chain.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiomqtt
import nacl.signing
import pytest

from device_agents.agent import RECEIPTS_TOPIC, Agent, _Track
from device_agents.outbox import Outbox
from device_agents.simulate import Simulation
from meshhealth.config import Genesis
from meshhealth.crypto.keys import load_identity
from meshhealth.errors import ConfigError
from meshhealth.ingest.mqtt import parse_broker_url
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import Receipt, ReceiptV2, decode_receipt


async def _publish(url: str, topic: str, payloads: list[bytes]) -> None:
    host, port, _ = parse_broker_url(url)
    async with aiomqtt.Client(host, port) as c:
        for p in payloads:
            await c.publish(topic, p, qos=1)


async def _until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_a_forged_receipt_for_seq_2_62_deletes_nothing(mosquitto, node_factory, tmp_path):
    node = node_factory(mosquitto.url)
    g = Genesis.load(node.cfg.genesis_path)
    authority = load_identity(node.cfg.key_path)
    sim = Simulation(
        broker_url=mosquitto.url,
        node_urls=[node.url],
        network=g.network_id,
        authorities={a.key for a in g.authorities},
        state_dir=tmp_path / "sim",
        patients=1,
        streams=("hr",),
        interval_s=1.0,
        samples_per_reading=1,
        backfill_s=30,
        resend_after=1.0,
    )
    task = None
    try:
        await sim.enroll()
        node.stop()  # nothing the device sends is stored until the node is back
        (dev,) = sim.devices
        agent = sim.agents[0]
        task = asyncio.create_task(sim.run(asyncio.Event(), duration_s=0, drain_timeout=60))
        await _until(lambda: agent.stats["published"] >= 30, 30, "the backfill to be sent")
        produced = sim.produced
        assert produced >= 30 and sim.outbox.count() == produced

        now = time.time_ns() // 1_000_000
        common = dict(network=g.network_id, device=dev.id, ts_ms=now)
        forged = ReceiptV2.create(
            authority.signing,
            seq=2**62,
            chain=authority.public,
            height=0,
            hash=b"\1" * 32,
            **common,
        )
        old = Receipt.create(authority.signing, seq=2**62, height=0, **common)
        stranger = ReceiptV2.create(
            nacl.signing.SigningKey.generate(),
            seq=5,
            chain=authority.public,
            height=0,
            hash=b"\1" * 32,
            **common,
        )
        published = agent.stats["published"]
        await _publish(
            mosquitto.url,
            RECEIPTS_TOPIC.format(device=dev.id.hex()),
            [forged.encode(), old.encode(), stranger.encode()],
        )
        await _until(
            lambda: (
                agent.stats["receipts_beyond_sent"] >= 1
                and agent.stats["old_receipts"] >= 1
                and agent.stats["bad_receipts"] >= 1
            ),
            10,
            "the forged receipts to be refused",
        )
        assert sim.outbox.count() == produced, "a forged receipt deleted unstored readings"
        assert agent.stats["acked"] == 0
        # it keeps publishing: the unreceipted readings go out again
        await _until(lambda: agent.stats["published"] > published, 15, "a re-send")

        node.start()  # the honest receipts now clear the outbox
        assert await asyncio.wait_for(task, 90), f"outbox not drained: {sim.statistics()}"
        assert sim.outbox.count() == 0 and agent.stats["acked"] == produced
        (kept,) = sim.outbox.receipts(dev.id).values()
        rc = decode_receipt(kept).verify()
        assert isinstance(rc, ReceiptV2) and rc.node == authority.public
        assert rc.seq == dev.next_seq - 1
    finally:
        if task is not None and not task.done():
            task.cancel()
        sim.close()
    node.stop()
    # the block the receipt names is on the node's chain, and holds a reading it covers
    store = Store(node.cfg.data_path, readonly=True)
    try:
        blk = store.block(rc.chain, rc.height)
        assert blk is not None and blk.hash == rc.hash
    finally:
        store.close()


def test_confirmations_need_four_authorities(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "ob")
    keys = {bytes([i]) * 32 for i in range(3)}
    try:
        with pytest.raises(ConfigError, match="at least 4"):
            Agent(
                box, [], "mqtt://127.0.0.1:1", network=b"\0" * 32, authorities=keys, confirmations=2
            )
        with pytest.raises(ConfigError):
            Agent(
                box, [], "mqtt://127.0.0.1:1", network=b"\0" * 32, authorities=keys, confirmations=0
            )
        four = keys | {b"\3" * 32}
        assert (
            Agent(
                box, [], "mqtt://127.0.0.1:1", network=b"\0" * 32, authorities=four, confirmations=3
            ).confirmations
            == 3
        )
    finally:
        box.close()


@pytest.mark.asyncio
async def test_with_confirmations_one_authority_alone_deletes_nothing(tmp_path: Path) -> None:
    """k = 2 of N = 4: a reading leaves the outbox once two distinct authorities cover it."""
    net = b"\7" * 32
    auth = [nacl.signing.SigningKey.generate() for _ in range(4)]
    dev = bytes(32)
    box = Outbox(tmp_path / "ob")
    try:
        box.put_many([(dev, s, b"r%d" % s) for s in range(1, 11)], {})
        agent = Agent(
            box,
            [],
            "mqtt://127.0.0.1:1",
            network=net,
            authorities={bytes(k.verify_key) for k in auth},
            confirmations=2,
        )
        t = agent.track[dev] = _Track()
        t.sent_max = 10

        def rc(k: nacl.signing.SigningKey, seq: int) -> bytes:
            return ReceiptV2.create(
                k,
                network=net,
                device=dev,
                seq=seq,
                chain=bytes(k.verify_key),
                height=1,
                hash=b"\1" * 32,
                ts_ms=1,
            ).encode()

        await agent._on_receipt(rc(auth[0], 10))  # one authority, however often
        await agent._on_receipt(rc(auth[0], 10))
        assert box.count(dev) == 10
        await agent._on_receipt(rc(auth[1], 6))  # a second one covers up to 6
        assert box.count(dev) == 4 and t.acked == 6
        await agent._on_receipt(rc(auth[2], 11))  # above what was sent: refused
        assert box.count(dev) == 4 and agent.stats["receipts_beyond_sent"] == 1
        await agent._on_receipt(rc(auth[2], 9))
        assert box.count(dev) == 1 and t.acked == 9
        assert set(box.receipts(dev)) == {bytes(auth[1].verify_key), bytes(auth[2].verify_key)}
    finally:
        box.close()
