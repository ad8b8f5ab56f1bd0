"""Five real node processes under faults: a partition, a wiped node, forgers and a liar."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace
from typing import Any

import pytest
from netfaults import FaultProxy, GossipPeer
from test_network import converged, hr_sim, launch, network_status

from meshhealth.bench.procs import NodeProcess
from meshhealth.chain.block import block_hash, build_block
from meshhealth.cli.chain_cmds import verify_stores
from meshhealth.cli.demo import setup_network
from meshhealth.config import Genesis, NodeConfig
from meshhealth.crypto.keys import Identity, load_identity
from meshhealth.gossip import handshake as hs
from meshhealth.gossip import wire
from meshhealth.gossip.messages import Push
from meshhealth.store.lmdb_store import Store

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
N = 5


def write(cfg: NodeConfig) -> NodeConfig:
    (cfg.base / "node.toml").write_text(cfg.dumps())
    return cfg


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(check):
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def chain_of(node: NodeProcess, producer: NodeProcess) -> int:
    """``node``'s replica height of ``producer``'s chain (-1 if it holds none)."""
    me = producer.status()["node"]
    return int(node.status()["chains"].get(me, {"height": -1})["height"])


@pytest.mark.timeout(420)
async def test_partitioned_node_and_wiped_node_converge_without_equivocating(mosquitto, tmp_path):
    cfgs = setup_network(tmp_path / "net", N, broker=mosquitto.url, shared_group="mh")
    # the last node reaches the others, and they reach it, only through proxies we can cut
    iso = N - 1
    inbound = FaultProxy(cfgs[iso].api.port)
    outbound = [FaultProxy(c.api.port) for c in cfgs[:iso]]
    for p in (inbound, *outbound):
        await p.start()
    direct = f"http://127.0.0.1:{cfgs[iso].api.port}"
    for i, c in enumerate(cfgs[:iso]):
        peers = [inbound.url if u == direct else u for u in c.gossip.peers]
        cfgs[i] = write(replace(c, gossip=replace(c.gossip, peers=peers)))
    cfgs[iso] = write(
        replace(
            cfgs[iso],
            gossip=replace(
                cfgs[iso].gossip,
                peers=[p.url for p in outbound],
                advertise_url=inbound.url,
                peer_exchange=False,  # else it would learn the others' direct addresses
            ),
        )
    )
    nodes = launch(cfgs, tmp_path)
    try:
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=30)
        try:
            await sim.enroll()
            live = asyncio.create_task(sim.run(asyncio.Event(), duration_s=45, drain_timeout=150))
            await asyncio.sleep(3)
            for p in (inbound, *outbound):
                p.cut()
            cut_at = [await asyncio.to_thread(chain_of, nodes[0], nodes[iso])]
            await asyncio.sleep(30)
            # both sides kept ingesting and sealing; neither saw the other's new blocks
            own = nodes[iso].status()["ingest"]["height"]
            seen = chain_of(nodes[0], nodes[iso])
            assert seen == cut_at[0] < own, (seen, cut_at, own)
            assert chain_of(nodes[iso], nodes[0]) < nodes[0].status()["ingest"]["height"]
            for p in (inbound, *outbound):
                p.heal()
            drained = await asyncio.wait_for(live, 240)
        finally:
            sim.close()
        assert drained, sim.statistics()
        assert await converged(nodes, N, 90), [n.heads() for n in nodes]

        # a node restarted on a wiped data dir fetches its own chain back before sealing
        victim = 2
        before = chain_of(nodes[0], nodes[victim])
        nodes[victim].stop()
        shutil.rmtree(cfgs[victim].data_path)
        nodes[victim].start()
        st = nodes[victim].status()
        assert st["gossip"]["synced"] and st["gossip"].get("startup_sync_ok") == 1, st["gossip"]
        assert st["ingest"]["height"] >= before
        # its next block follows the recovered chain: enrol one more device through it
        sim2 = hr_sim(cfgs, [nodes[victim]], mosquitto.url, tmp_path / "sim2", backfill_s=5)
        try:
            await sim2.enroll()
        finally:
            sim2.close()
        await wait_for(lambda: chain_of(nodes[0], nodes[victim]) > before, 30, "a new block")
        assert await converged(nodes, N, 60), [n.heads() for n in nodes]
        for nd in nodes:
            assert nd.status()["faulty"] == {}  # nobody saw two blocks at one height
    finally:
        for nd in nodes:
            nd.stop()
        for p in (inbound, *outbound):
            await p.close()
    for c in cfgs:
        assert verify_stores(c.data_path) == 0


@pytest.mark.timeout(300)
async def test_forgers_outsiders_and_an_equivocating_node_are_caught(mosquitto, tmp_path):
    cfgs = setup_network(tmp_path / "net", N, broker=mosquitto.url, shared_group="mh")
    hub = f"http://127.0.0.1:{cfgs[0].api.port}"
    for i in range(1, N):  # everyone knows only the hub: peer exchange finds the rest
        cfgs[i] = write(replace(cfgs[i], gossip=replace(cfgs[i].gossip, peers=[hub])))
    nodes = launch(cfgs, tmp_path)
    g = Genesis.load(cfgs[0].genesis_path)
    keys = [load_identity(c.key_path) for c in cfgs]
    try:
        await wait_for(
            lambda: all(len(n.status()["gossip"]["connections"]) == N - 1 for n in nodes),
            60,
            "a full mesh through peer exchange",
        )
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=20)
        try:
            await sim.enroll()
            assert await asyncio.wait_for(
                sim.run(asyncio.Event(), duration_s=0, drain_timeout=120), 150
            )
        finally:
            sim.close()
        assert await converged(nodes, N, 60)
        hub_node = nodes[0]

        # an outsider's key is refused at the handshake
        refused = hub_node.status()["gossip"].get("handshake_refused", 0)
        with pytest.raises(hs.HandshakeError):
            async with GossipPeer(hub, Identity.generate("node"), g.network_id):
                pass
        assert hub_node.status()["gossip"]["handshake_refused"] == refused + 1

        # an authority relaying garbage and a block with a forged signature: counted, ignored
        liar = keys[1]
        store_copy = tmp_path / "copy"
        shutil.copytree(cfgs[0].data_path, store_copy)
        s = Store(store_copy, readonly=True)
        try:
            target = keys[2].public
            top, top_hash = s.head(target)  # type: ignore[misc]
            held = s.header(target, top)
            assert held is not None
            equivocator = keys[3].public
            e_top, _ = s.head(equivocator)  # type: ignore[misc]
            e_held = s.header(equivocator, e_top)
            assert e_held is not None
        finally:
            s.close()
        forged = build_block(
            liar.signing,
            network=g.network_id,
            height=top + 1,
            prev=top_hash,
            ts_ms=1,
            entries=(),
        )
        forged_hdr = replace(forged.header, node=target)  # claims chain 2, signed by node 1
        before = hub_node.status()["gossip"]
        async with GossipPeer(hub, liar, g.network_id) as peer:
            await peer.send(b"\x91\xa2GZ")
            await peer.send(wire.encode(Push(target, top + 1, 0), [(forged_hdr.encode(), b"\x90")]))
            await wait_for(
                lambda: (
                    hub_node.status()["gossip"].get("invalid_block", 0)
                    > before.get("invalid_block", 0)
                ),
                20,
                "the forged block to be rejected",
            )
        after = hub_node.status()
        assert after["gossip"]["malformed"] == before.get("malformed", 0) + 1
        assert after["chains"][target.hex()]["height"] == top  # nothing was added

        # node 3 signs a second block at a height the network already holds
        twin = build_block(
            keys[3].signing,
            network=g.network_id,
            height=e_top,
            prev=e_held.prev,
            ts_ms=e_held.ts_ms + 1,
            entries=(),
        )
        assert twin.hash != block_hash(e_held)
        async with GossipPeer(hub, keys[1], g.network_id) as peer:
            await peer.send(
                wire.encode(Push(equivocator, e_top, 0), [(twin.header.encode(), b"\x90")])
            )
            await wait_for(
                lambda: all(equivocator.hex() in n.status()["faulty"] for n in nodes),
                60,
                "every node to hold the equivocation proof",
            )
        for n in nodes:  # the branch we had is the branch we keep
            assert n.status()["chains"][equivocator.hex()]["faulty"]
        assert hub_node.status()["chains"][equivocator.hex()]["height"] >= e_top
        out = await asyncio.to_thread(network_status, [n.url for n in nodes])
        assert f"FAULTY {equivocator.hex()[:8]}" in out.stdout, out.stdout
        assert f"held by {N} of {N} nodes" in out.stdout
    finally:
        for nd in nodes:
            nd.stop()
    for c in cfgs:
        assert verify_stores(c.data_path) == 0  # proofs verify along with everything else
