"""A malicious authority against real node processes: memory, lies and bad frames.

The test holds authority keys of the network and speaks the real handshake
(tests/netfaults.py), so everything it sends passes authentication and meets
only the node's own checks and bounds.  Bounds are configured small so each
attack runs in seconds, driven past them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from netfaults import FaultProxy, GossipPeer, GossipServer
from test_network import launch

from meshhealth.bench.procs import BrokerProcess, NodeProcess
from meshhealth.chain.block import block_hash, build_block, encode_body
from meshhealth.cli.demo import setup_network
from meshhealth.config import Genesis, NodeConfig
from meshhealth.crypto.keys import Identity, load_identity
from meshhealth.gossip import wire
from meshhealth.gossip.messages import FullHeads, Pull, Push
from meshhealth.wire import BlockHeader

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
MiB = 1024 * 1024
RSS_MARGIN = 30 * MiB  # interpreter, allocator slack and the frames being decoded


def write(cfg: NodeConfig) -> NodeConfig:
    (cfg.base / "node.toml").write_text(cfg.dumps())
    return cfg


def gossip(cfg: NodeConfig, **kw: Any) -> NodeConfig:
    return write(replace(cfg, gossip=replace(cfg.gossip, **kw)))


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(check)
        if got:
            return got
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def counter(node: NodeProcess, name: str) -> int:
    return int(node.status()["gossip"].get(name, 0))


def height(node: NodeProcess, chain: bytes) -> int:
    return int(node.status()["chains"].get(chain.hex(), {"height": -1})["height"])


def block(
    key: Identity,
    network: bytes,
    h: int,
    *,
    prev: bytes | None = None,
    entries: tuple[bytes, ...] = (),
    chain: bytes | None = None,
) -> tuple[bytes, bytes]:
    """A block of ``key``'s chain (raw header, raw body); with ``chain``, one that claims
    another chain but carries ``key``'s signature (it cannot verify)."""
    b = build_block(
        key.signing,
        network=network,
        height=h,
        prev=network if prev is None and h == 0 else (prev or os.urandom(32)),
        ts_ms=time.time_ns() // 1_000_000,
        entries=entries,
    )
    hdr = b.header if chain is None else replace(b.header, node=chain)
    return hdr.encode(), encode_body(b.entries)


def build_hash(header: bytes) -> bytes:
    return block_hash(BlockHeader.decode(header))


def junk_entries(n_bytes: int) -> tuple[bytes, ...]:
    return tuple(os.urandom(64 * 1024) for _ in range(n_bytes // (64 * 1024)))


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


# --- issue 11 #7: one authority exhausts an honest node's memory -------------------------

BUFFER_PEER, BUFFER_TOTAL = 10 * MiB, 16 * MiB
SEND_PEER, SEND_TOTAL = 9 * MiB, 12 * MiB


@pytest.fixture(scope="module")
def memnet(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Victim A (small memory bounds) and honest B, real processes; the test holds the
    keys of authorities C and D."""
    root = tmp_path_factory.mktemp("memnet")
    cfgs = setup_network(root / "net", 4, broker=broker.url, shared_group="mh")
    a_url, b_url = (f"http://127.0.0.1:{c.api.port}" for c in cfgs[:2])
    cfgs[0] = gossip(
        cfgs[0],
        peers=[b_url],
        peer_exchange=False,
        buffer_peer_mb=BUFFER_PEER / MiB,
        buffer_total_mb=BUFFER_TOTAL / MiB,
        send_peer_mb=SEND_PEER / MiB,
        send_total_mb=SEND_TOTAL / MiB,
        slow_peer_s=3.0,
    )
    cfgs[1] = gossip(cfgs[1], peers=[a_url], peer_exchange=False)
    nodes = launch(cfgs[:2], root)
    keys = [load_identity(c.key_path) for c in cfgs]
    try:
        yield nodes, keys, Genesis.load(cfgs[0].genesis_path).network_id
    finally:
        for n in nodes:
            n.stop()


async def test_junk_and_out_of_order_blocks_are_held_within_bytes_per_peer_and_total(memnet):
    (a, b), keys, net = memnet
    c, d = keys[2], keys[3]
    pid = a.status()["pid"]
    before = a.status()["gossip"]
    async with GossipPeer(a.url, c, net) as pc, GossipPeer(a.url, d, net) as pd:
        await asyncio.sleep(1.0)
        base = rss(pid)
        # junk that cannot be valid (signed by D, claiming C's chain), twice the total bound:
        # refused before it is buffered
        for i in range(2 * BUFFER_TOTAL // MiB):
            raw = block(d, net, 100 + i, entries=junk_entries(MiB), chain=c.public)
            await pc.send(wire.encode(Push(c.public, 100 + i, 0), [raw]))
        # validly signed blocks far above the head, from two peers: twice the per-peer
        # bound each, so 2.5 times the total
        for peer, key in ((pc, c), (pd, d)):
            for i in range(2 * BUFFER_PEER // MiB):
                raw = block(key, net, 200 + i, entries=junk_entries(MiB))
                await peer.send(wire.encode(Push(key.public, 200 + i, 0), [raw]))
        signed = 2 * 2 * BUFFER_PEER // MiB

        def settled() -> dict[str, Any] | None:
            g = a.status()["gossip"]
            held = g["buffered"] - before.get("buffered", 0)
            dropped = g.get("buffer_dropped", 0) - before.get("buffer_dropped", 0)
            junk = g.get("invalid_block", 0) - before.get("invalid_block", 0)
            return g if junk >= 2 * BUFFER_TOTAL // MiB and held + dropped >= signed else None

        g = await eventually(settled, 60, "the node to take every block")
        grown = rss(pid) - base
    assert g["buffered_bytes"] <= BUFFER_TOTAL, g
    assert g["buffered_bytes"] >= BUFFER_TOTAL - 2 * MiB, g  # it did fill up to the bound
    for short in (c.public.hex()[:8], d.public.hex()[:8]):
        assert g["buffered_bytes_by_peer"].get(short, 0) <= BUFFER_PEER, g
    assert g["buffer_dropped"] > before.get("buffer_dropped", 0)
    assert grown < BUFFER_TOTAL + RSS_MARGIN, (grown, g)
    # the node still syncs with its honest peer: a real block of D reaches B through A
    async with GossipPeer(a.url, d, net) as pd:
        await pd.send(wire.encode(Push(d.public, 0, 0), [block(d, net, 0)]))
        await eventually(lambda: height(b, d.public) == 0, 30, "B to get D's block via A")
    assert a.proc is not None and a.proc.poll() is None


async def test_a_peer_that_stops_reading_is_bounded_in_bytes_and_cut_off(memnet):
    (a, b), keys, net = memnet
    c, d = keys[2], keys[3]
    pid = a.status()["pid"]
    # give A something worth pulling: three 1 MiB blocks of C's chain, valid entries
    # signed by C (access logs), applied in order
    from meshhealth.wire import AccessLog

    now = time.time_ns() // 1_000_000
    prev = net
    async with GossipPeer(a.url, c, net) as pc:
        for h in range(3):
            logs = tuple(
                AccessLog.create(
                    c.signing,
                    network=net,
                    node=c.public,
                    reader=os.urandom(32),
                    patient=os.urandom(32),
                    stream="hr",
                    from_ms=now - 1000,
                    to_ms=now,
                    ts_ms=now,
                    outcome="denied",
                    reason=b"x" * 64,
                    grant=b"",
                    readings=0,
                    request=os.urandom(32),
                ).encode()
                for _ in range(3000)
            )
            bk = build_block(c.signing, network=net, height=h, prev=prev, ts_ms=now, entries=logs)
            prev = bk.hash
            await pc.send(
                wire.encode(Push(c.public, h, 0), [(bk.header.encode(), encode_body(logs))])
            )
        await eventually(lambda: height(a, c.public) >= 2, 60, "A to store C's blocks")
    before = a.status()["gossip"]
    base = rss(pid)
    peak = 0
    async with GossipPeer(a.url, c, net) as slow_c, GossipPeer(a.url, d, net) as slow_d:
        # each Pull is answered with ~3 MiB; neither peer reads a byte of it
        slow_c.stop_reading()
        slow_d.stop_reading()
        for _ in range(20):
            for peer in (slow_c, slow_d):
                await peer.send(wire.encode(Pull(c.public, 0, 2)))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            g = a.status()["gossip"]
            peak = max(peak, g["send_queued_bytes"])
            if g.get("slow_peer_disconnected", 0) > before.get("slow_peer_disconnected", 0):
                break
            await asyncio.sleep(0.2)
        grown = rss(pid) - base
    g = a.status()["gossip"]
    assert peak <= SEND_TOTAL, (peak, g)
    assert g["dropped_slow_peer"] > before.get("dropped_slow_peer", 0), g
    # the peer whose frames filled its share was cut (the other's fit in the kernel's
    # socket buffers: it is slow only once those are full)
    assert g.get("slow_peer_disconnected", 0) >= before.get("slow_peer_disconnected", 0) + 1, g
    assert grown < SEND_TOTAL + RSS_MARGIN, (grown, g)
    assert g["send_queued_bytes"] < SEND_PEER  # the cut-off peers' queues were freed
    # and A goes on replicating to its honest peer
    await eventually(lambda: height(b, c.public) >= 2, 30, "B to get C's blocks from A")


async def test_unproven_handshakes_and_connections_per_peer_are_bounded(memnet):
    """Before its proof a connection can hold a 16 MiB frame: few may be open at once;
    after it, one peer keeps at most one connection each way."""
    import aiohttp

    from meshhealth.net import gossip_shell as gs

    (a, _), keys, net = memnet
    before = a.status()["gossip"]
    async with aiohttp.ClientSession() as session:
        idle = []
        for _ in range(gs.MAX_HANDSHAKES_PER_SOURCE):  # they never say Hello
            idle.append(await session.ws_connect(f"{a.url}/v1/gossip"))
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{a.url}/v1/gossip")
        assert refused.value.status == 503
        for ws in idle:
            await ws.close()
    peers = [GossipPeer(a.url, keys[2], net) for _ in range(gs.MAX_LINKS_PER_PEER + 2)]
    try:
        for p in peers:
            await p.__aenter__()
        g = await eventually(
            lambda: (
                (
                    (g := a.status()["gossip"]).get("connections_replaced", 0)
                    >= before.get("connections_replaced", 0) + 2
                )
                and g
            ),
            20,
            "older connections of the same peer to be closed",
        )
        assert g["handshake_busy"] > before.get("handshake_busy", 0)
    finally:
        for p in peers:
            await p.__aexit__()
    # head claims about chains that are no authority's are not kept (one per peer and
    # chain would be): a full vector of made-up chains changes nothing
    made_up = tuple((os.urandom(32), 5) for _ in range(wire.MAX_HEADS))
    async with GossipPeer(a.url, keys[3], net) as p:
        await p.send(wire.encode(FullHeads(made_up)))
        await eventually(
            lambda: counter(a, "claims_ignored") >= before.get("claims_ignored", 0) + len(made_up),
            20,
            "the claims to be ignored",
        )
    assert a.status()["gossip"]["core"]["heads"] <= 4


# --- issue 11 #12: a lying peer stalls a restarting node -----------------------------------


async def listen_forever(ws: Any) -> None:
    async for _ in ws:  # reads what it is sent, answers nothing
        pass


def node_process(cfg: NodeConfig, log: Path) -> NodeProcess:
    return NodeProcess(cfg.base / "node.toml", log, cfg.api.port)


def stop_within(node: NodeProcess, grace: float) -> float:
    """SIGTERM the node; the seconds it took to exit (it must, within ``grace``)."""
    assert node.proc is not None
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    try:
        node.proc.wait(grace)
    except subprocess.TimeoutExpired:
        node.proc.kill()
        node.proc.wait(5)
        raise AssertionError(f"the node ignored SIGTERM for {grace} s") from None
    return time.monotonic() - t0


async def test_a_lie_about_our_own_chain_neither_stalls_start_up_nor_deafens_sigterm(
    broker, tmp_path
):
    cfgs = setup_network(tmp_path / "net", 2, broker=broker.url)
    net = Genesis.load(cfgs[0].genesis_path).network_id
    victim, liar = (load_identity(c.key_path) for c in cfgs)
    lie = wire.encode(FullHeads(((victim.public, 1_000_000),)))

    async def say_our_chain_is_long(ws: Any) -> None:
        await ws.send_bytes(lie)
        await listen_forever(ws)

    server = GossipServer(liar, net, say_our_chain_is_long)
    await server.start(cfgs[1].api.port)
    sync_s = 3.0
    cfg = gossip(
        cfgs[0], peers=[server.url], peer_exchange=False, startup_sync_s=sync_s, claim_timeout_s=2
    )
    node = node_process(cfg, tmp_path / "victim.log")
    try:
        t0 = time.monotonic()
        await asyncio.to_thread(node.start, sync_s + 15)  # returns once it ingests
        took = time.monotonic() - t0
        g = node.status()["gossip"]
        assert server.connections >= 1
        assert g["synced"] and g.get("own_claims_unbacked", 0) >= 1, g
        assert took < sync_s + 10, took
        assert node.status()["ingest"]["height"] < 1_000_000
        assert await asyncio.to_thread(stop_within, node, 10) < 10

        # restarted with a claim it would wait a minute to see backed: SIGTERM still stops it
        cfg = gossip(cfg, startup_sync_s=60, claim_timeout_s=60)
        await asyncio.to_thread(node.start, 30, until="api")
        await eventually(lambda: server.connections >= 2, 20, "the node to dial the liar again")
        await eventually(
            lambda: node.status()["gossip"].get("own_claims_checked", 0) >= 1, 20, "the claim"
        )
        assert not node.status()["gossip"]["synced"]
        assert await asyncio.to_thread(stop_within, node, 10) < 10
    finally:
        node.stop()
        await server.close()


async def test_a_lie_about_another_chain_does_not_stall_catch_up_from_honest_peers(
    broker, tmp_path
):
    cfgs = setup_network(tmp_path / "net", 4, broker=broker.url)
    net = Genesis.load(cfgs[0].genesis_path).network_id
    keys = [load_identity(c.key_path) for c in cfgs]
    liar, producer = keys[2], keys[3]
    honest_cfg = gossip(cfgs[1], peers=[], peer_exchange=False)
    honest = node_process(honest_cfg, tmp_path / "honest.log")
    proxy = FaultProxy(honest_cfg.api.port)  # the victim reaches the honest node only later
    await proxy.start()
    proxy.cut()
    lie = wire.encode(FullHeads(((producer.public, 1_000_000),)))

    async def say_its_chain_is_long(ws: Any) -> None:
        await ws.send_bytes(lie)
        await listen_forever(ws)

    server = GossipServer(liar, net, say_its_chain_is_long)
    await server.start(cfgs[2].api.port)
    victim_cfg = gossip(
        cfgs[0], peers=[proxy.url, server.url], peer_exchange=False, startup_sync_s=1
    )
    victim = node_process(victim_cfg, tmp_path / "victim.log")
    try:
        await asyncio.to_thread(honest.start, 30)
        top = 19
        async with GossipPeer(honest.url, producer, net) as p:
            prev = net
            for h in range(top + 1):
                raw = block(producer, net, h, prev=prev)
                prev = build_hash(raw[0])
                await p.send(wire.encode(Push(producer.public, h, 0), [raw]))
            await eventually(
                lambda: height(honest, producer.public) == top, 30, "the honest node's copy"
            )
        await asyncio.to_thread(victim.start, 30)
        # the victim believes the liar first, and asks it for the chain
        await eventually(lambda: victim.status()["gossip"]["core"]["pulls_sent"] >= 1, 20, "a pull")
        assert height(victim, producer.public) == -1
        proxy.heal()
        await eventually(
            lambda: height(victim, producer.public) == top, 40, "catch-up from the honest peer"
        )
        core = victim.status()["gossip"]["core"]
        assert core["claims_dropped"] >= 1, core  # the liar lost its standing on that chain
        # a node with a peer connected to it stops promptly too (its API server waited for
        # the open gossip websocket before: 13-15 s)
        assert len(honest.status()["gossip"]["connections"]) == 1
        assert await asyncio.to_thread(stop_within, honest, 5) < 5
    finally:
        victim.stop()
        honest.stop()
        await proxy.close()
        await server.close()


# --- issue 11 #2 (the gossip shell's half): nothing a peer sends escapes the hierarchy ----


def far_future_block(producer: Identity, network: bytes) -> tuple[bytes, bytes]:
    """Block 0 of ``producer``'s chain: a patient enrols a device, and the device's reading
    is dated t = 10^17 ms (its hour overflowed the 32-bit readings index: a struct.error)."""
    from device_agents.device import Device
    from device_agents.sensors import PatientPhysiology, samples
    from meshhealth.sharing.enrollment import enrollment
    from meshhealth.sharing.keychain import KeyChain

    t, epoch_ms = 10**17, 7 * 24 * 3600 * 1000
    patient = Identity.generate("patient")
    chains = {"hr": KeyChain.new("hr", t // epoch_ms, epoch_ms)}
    dev = Device(Identity.generate("device"), patient.public)
    tx = enrollment(patient, chains, dev.id, t // epoch_ms, time.time_ns() // 1_000_000)
    dev.accept_enrollment(tx)
    (_, reading), *_ = dev.readings("hr", samples(PatientPhysiology(7), "hr", t, t + 5000))
    entries = (tx.encode(), reading)
    b = build_block(
        producer.signing, network=network, height=0, prev=network, ts_ms=t + 60_000, entries=entries
    )
    return b.header.encode(), encode_body(entries)


async def test_a_block_that_breaks_admission_on_an_outbound_connection_does_not_kill_the_node(
    broker, tmp_path
):
    cfgs = setup_network(tmp_path / "net", 2, broker=broker.url)
    net = Genesis.load(cfgs[0].genesis_path).network_id
    bad = load_identity(cfgs[1].key_path)
    frame = wire.encode(Push(bad.public, 0, 0), [far_future_block(bad, net)])

    async def send_it(ws: Any) -> None:
        await ws.send_bytes(frame)
        await listen_forever(ws)

    server = GossipServer(bad, net, send_it)
    await server.start(cfgs[1].api.port)
    cfg = gossip(cfgs[0], peers=[server.url], peer_exchange=False, startup_sync_s=1)
    node = node_process(cfg, tmp_path / "victim.log")  # it dials the bad authority
    try:
        await asyncio.to_thread(node.start, 30)
        await eventually(lambda: counter(node, "invalid_block") >= 1, 20, "the block to be refused")
        await asyncio.sleep(2)  # the node dials the bad authority again: still up
        assert node.proc is not None and node.proc.poll() is None, node.log.read_text()[-3000:]
        st = node.status()
        assert st["chains"].get(bad.public.hex(), {"height": -1})["height"] == -1
        peers = st["gossip"]["core"]["peers"]
        assert peers.get("suspect", 0) + peers.get("dead", 0) >= 1  # penalised
        # and the same frame on a connection it accepted: refused and counted the same way
        refused = counter(node, "invalid_block")
        async with GossipPeer(node.url, bad, net) as p:
            await p.send(frame)
            await eventually(
                lambda: counter(node, "invalid_block") > refused, 20, "the inbound copy refused"
            )
        assert node.proc.poll() is None
    finally:
        node.stop()
        await server.close()


async def test_checks_of_a_dropped_block_are_not_run(tmp_path, monkeypatch):
    """issue 11 #7: the shell cancels the entry checks of a block it drops (refused, a
    duplicate, no room in the buffer); the verifier queue skips them instead of holding
    their entries until it gets to them (it used to check every one)."""
    from concurrent.futures import ThreadPoolExecutor

    from core_helpers import make_batcher, make_world

    from meshhealth.ingest import pipeline as pl
    from meshhealth.store.lmdb_store import Store

    calls: list[int] = []
    real = pl.verify.check_entries

    def counted(entries: list[bytes]) -> Any:
        calls.append(len(entries))
        time.sleep(0.05)
        return real(entries)

    monkeypatch.setattr(pl.verify, "check_entries", counted)
    store = Store(tmp_path / "store")
    try:
        p = pl.Pipeline(
            make_batcher(make_world()),
            store,
            workers=1,
            chunk_size=64,
            max_backlog=1000,
            receipts_topic="r/{device}",
            publish=lambda t, b: None,
        )
        p._pool = ThreadPoolExecutor(1)
        body = [os.urandom(40) for _ in range(20 * pl.VERIFY_PART)]
        (fut,) = p.verify_blocks([body])
        fut.cancel()  # what GossipShell._discard does
        (kept,) = p.verify_blocks([body[: pl.VERIFY_PART]])
        await asyncio.wait_for(kept, 10)
        await asyncio.sleep(0.3)
        assert len(calls) <= 3, calls  # the parts in flight when it was cancelled, and ours
        assert not p._verify_queue and p._verifying == 0
        p._pool.shutdown()
    finally:
        store.close()


# --- attacker review: thousands of tiny signed blocks above a gap nobody fills ------------

PEER_BLOCKS, GAP_S = 32, 3.0


@pytest.fixture(scope="module")
def gapnet(broker: BrokerProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One victim node, A (a small per-peer block count and gap time); the test holds the
    keys of authorities C and D."""
    root = tmp_path_factory.mktemp("gapnet")
    cfgs = setup_network(root / "net", 4, broker=broker.url, shared_group="mh")
    cfgs[0] = gossip(
        cfgs[0], peers=[], peer_exchange=False, buffer_peer_blocks=PEER_BLOCKS, buffer_gap_s=GAP_S
    )
    nodes = launch(cfgs[:1], root)
    keys = [load_identity(c.key_path) for c in cfgs]
    try:
        yield nodes[0], keys, Genesis.load(cfgs[0].genesis_path).network_id
    finally:
        for n in nodes:
            n.stop()


async def test_tiny_blocks_above_an_unfilled_gap_are_counted_per_peer_and_evicted(gapnet):
    """An authority pushes twice its per-peer block count of tiny signed blocks of its own
    chain at head+2.. and never head+1: it holds at most ``buffer_peer_blocks`` of them,
    another peer's out-of-order block is still held, and after ``buffer_gap_s`` without
    the gap filling every waiting block is evicted (counted)."""
    a, keys, net = gapnet
    c, d = keys[2], keys[3]
    cs, ds = c.public.hex()[:8], d.public.hex()[:8]
    async with GossipPeer(a.url, c, net) as pc, GossipPeer(a.url, d, net) as pd:
        for h in range(2, 2 + 2 * PEER_BLOCKS):
            await pc.send(wire.encode(Push(c.public, h, 0), [block(c, net, h)]))

        def settled() -> dict[str, Any] | None:
            g = a.status()["gossip"]
            held = g["buffered_by_peer"].get(cs, 0)
            return g if held + g.get("buffer_dropped", 0) >= 2 * PEER_BLOCKS else None

        g = await eventually(settled, 30, "A to take C's blocks")
        assert g["buffered_by_peer"][cs] == PEER_BLOCKS, g
        assert g["buffer_dropped"] >= PEER_BLOCKS, g
        # an honest peer's out-of-order block still finds room
        await pd.send(wire.encode(Push(d.public, 1, 0), [block(d, net, 1)]))
        g = await eventually(
            lambda: (s := a.status()["gossip"])["buffered_by_peer"].get(ds) and s,
            10,
            "A to hold D's block",
        )
        assert g["buffered_by_peer"][ds] == 1, g
        # neither gap is filled: after buffer_gap_s both chains' waiting blocks are gone
        g = await eventually(
            lambda: (s := a.status()["gossip"])["buffered"] == 0 and s,
            GAP_S + 10,
            "the waiting blocks to be evicted",
        )
    assert g["buffer_evicted"] == PEER_BLOCKS + 1, g
    assert g["buffered_bytes"] == 0 and g["buffered_by_peer"] == {}, g
    assert a.proc is not None and a.proc.poll() is None


async def test_a_liar_answering_pulls_with_blocks_we_hold_does_not_keep_the_catch_up(
    broker, tmp_path
):
    """Attacker review of issue 11 #12: the liar claims head+2 of a chain, sends head+1 (a
    true block) unsolicited, then answers every pull with a block the victim holds.  Such
    a reply is no answer: the victim drops the liar's claim and catches up from the honest
    node (on main it asked the liar forever and stayed at height 0)."""
    from meshhealth.gossip.messages import Blocks

    cfgs = setup_network(tmp_path / "net", 4, broker=broker.url)
    net = Genesis.load(cfgs[0].genesis_path).network_id
    keys = [load_identity(c.key_path) for c in cfgs]
    liar, producer = keys[2], keys[3]
    top, raws, prev = 19, [], net
    for h in range(top + 1):
        raws.append(block(producer, net, h, prev=prev))
        prev = build_hash(raws[-1][0])
    honest_cfg = gossip(cfgs[1], peers=[], peer_exchange=False)
    honest = node_process(honest_cfg, tmp_path / "honest.log")
    proxy = FaultProxy(honest_cfg.api.port)  # the victim reaches the honest node only later
    await proxy.start()
    proxy.cut()
    first = wire.encode(Blocks(producer.public, 0, 0, 0), [raws[0]])
    pulls = []

    async def lie_and_stall(ws: Any) -> None:
        await ws.send_bytes(wire.encode(FullHeads(((producer.public, 1),))))
        await ws.send_bytes(first)  # unsolicited, and true

        async def keep_claiming() -> None:
            while True:
                await asyncio.sleep(0.5)
                await ws.send_bytes(wire.encode(FullHeads(((producer.public, 1),))))

        task = asyncio.create_task(keep_claiming())
        try:
            async for frame in ws:
                msg, _ = wire.decode(frame.data)
                if isinstance(msg, Pull) and msg.chain == producer.public:
                    pulls.append(msg)
                    await ws.send_bytes(first)  # a block it holds: no progress
        finally:
            task.cancel()

    server = GossipServer(liar, net, lie_and_stall)
    await server.start(cfgs[2].api.port)
    victim_cfg = gossip(
        cfgs[0], peers=[proxy.url, server.url], peer_exchange=False, startup_sync_s=1
    )
    victim = node_process(victim_cfg, tmp_path / "victim.log")
    try:
        await asyncio.to_thread(honest.start, 30)
        async with GossipPeer(honest.url, producer, net) as p:
            for h, raw in enumerate(raws):
                await p.send(wire.encode(Push(producer.public, h, 0), [raw]))
            await eventually(
                lambda: height(honest, producer.public) == top, 30, "the honest node's copy"
            )
        await asyncio.to_thread(victim.start, 30)
        await eventually(lambda: height(victim, producer.public) == 0, 20, "the liar's block")
        await eventually(lambda: pulls, 20, "a pull to the liar")
        proxy.heal()
        await eventually(
            lambda: height(victim, producer.public) == top, 30, "catch-up from the honest peer"
        )
        core = victim.status()["gossip"]["core"]
        assert core["pull_timeouts"] >= 1, core  # the liar's pull expired: no progress
    finally:
        victim.stop()
        honest.stop()
        await proxy.close()
        await server.close()
