"""``meshhealth demo``: a node, an embedded broker and simulated patients, live.

Everything runs in this one process on loopback ports picked at random, and
the node's data stays in ``--data-dir`` (``DIR/node-1/data``) for
``meshhealth chain verify --data-dir DIR`` afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshhealth.cli.netutil import free_port, stop_on_signals
from meshhealth.config import Authority, Genesis, NodeConfig
from meshhealth.crypto.keys import Identity, save_identity


def setup_network(
    root: Path, n: int, *, broker: str = "", shared_group: str = ""
) -> list[NodeConfig]:
    """Keys, one genesis and a config per node under ``root/node-i``."""
    root.mkdir(parents=True, exist_ok=True)
    idents = [Identity.generate("node") for _ in range(n)]
    g = Genesis(
        "meshhealth-demo",
        time.time_ns() // 1_000_000,
        tuple(Authority(f"node-{i + 1}", x.public) for i, x in enumerate(idents)),
    )
    (root / "genesis.toml").write_text(g.dumps())
    cfgs = []
    ports = [free_port() for _ in idents]
    for i, ident in enumerate(idents):
        d = root / f"node-{i + 1}"
        d.mkdir(parents=True)
        save_identity(ident, d / "node.key")
        base = NodeConfig(base=d, genesis_file=str((root / "genesis.toml").resolve()))
        peers = [f"http://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
        cfg = replace(
            base,
            api=replace(base.api, port=ports[i]),
            mqtt=replace(
                base.mqtt, broker=broker, embedded_port=free_port(), shared_group=shared_group
            ),
            ingest=replace(base.ingest, verify_workers=1),
            gossip=replace(base.gossip, peers=peers),
        )
        (d / "node.toml").write_text(cfg.dumps())
        cfgs.append(cfg)
    return cfgs


async def register_patients(nodes: list[Any], sims: list[Any]) -> None:
    """Each node registers the patients of its simulation (an operator would run
    ``meshhealth patient register``): their transactions get their own budget, not the
    strangers' shared one."""
    from meshhealth.net.client import client_session, post_tx
    from meshhealth.sharing.registration import registration

    async with client_session(10) as session:
        for nd, sim in zip(nodes, sims, strict=True):
            for p in sim.patients:
                tx = registration(
                    nd.identity, nd.network, p.identity.public, time.time_ns() // 1_000_000
                )
                await post_tx(session, [nd.api_url], tx.encode())


async def run_demo(a: argparse.Namespace) -> int:
    from device_agents.simulate import Simulation
    from meshhealth.node import Node

    root = Path(a.data_dir)
    if root.exists() and any(root.iterdir()):
        if not a.fresh:
            print(f"{root} is not empty; pass --fresh to wipe it or pick another --data-dir")
            return 2
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    # one embedded broker per node (a clinic with its own wearables); with --broker,
    # every node shares that Mosquitto through a shared subscription
    cfgs = setup_network(
        root, a.nodes, broker=a.broker or "", shared_group="demo" if a.broker else ""
    )
    nodes = [Node(c) for c in cfgs]
    stop = stop_on_signals()
    node_stop = asyncio.Event()
    t_end = time.monotonic() + a.duration if a.duration else None
    async with asyncio.TaskGroup() as tg:
        for nd in nodes:
            ready = asyncio.Event()
            tg.create_task(nd.run(node_stop, ready))
            await ready.wait()
            print(
                f"node {nd.identity.short}  dashboard {nd.api_url}/  broker {nd.broker_url}  "
                f"data {nd.cfg.data_path}"
            )
        authorities = {nd.identity.public for nd in nodes}
        sims = []
        for i, nd in enumerate(nodes):
            # the patients are spread over the nodes' brokers (at least one per node)
            share = max(1, a.patients // len(nodes) + (i < a.patients % len(nodes)))
            sims.append(
                Simulation(
                    broker_url=nd.broker_url,
                    node_urls=[nd.api_url],
                    network=nd.network,
                    authorities=authorities,
                    state_dir=root / "devices" / f"node-{i + 1}",
                    patients=share,
                    devices_per_patient=a.devices,
                    interval_s=10.0,
                    backfill_s=a.backfill,
                    seed=a.seed + i,
                )
            )
        await register_patients(nodes, sims)
        for sim in sims:
            await sim.enroll()
        await share_with_demo_provider(root, sims[0], a.backfill)
        sim_stop = asyncio.Event()
        sim_tasks = [
            tg.create_task(sim.run(sim_stop, duration_s=10**9, drain_timeout=5)) for sim in sims
        ]
        print(
            f"{sum(len(s.patients) for s in sims)} patients x {a.devices} devices on "
            f"{len(nodes)} node(s), 6 streams, {a.backfill:.0f} s backfill"
        )
        print(
            f"{'time':>6} {'readings/s':>10} {'committed':>10} {'heights':>12} "
            f"{'replicas':>8} {'rejects':>7} {'outbox':>6} {'episode'}"
        )
        t0 = t_last = time.monotonic()
        last_total = 0
        while not stop.is_set() and (t_end is None or time.monotonic() < t_end):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            sts = [nd.status() for nd in nodes]
            total = sum(st["ingest"]["readings_committed"] for st in sts)
            now = time.monotonic()
            rate = (total - last_total) / (now - t_last)
            last_total, t_last = total, now
            heights = "/".join(str(st["ingest"]["height"]) for st in sts)
            replicas = min(len(st["chains"]) for st in sts)
            rejects = sum(st["ingest"]["rejected"] for st in sts)
            outbox = sum(sim.outbox.count() for sim in sims)
            episodes = {
                e for sim in sims for p in sim.patients if (e := p.phys.episode) is not None
            }
            print(
                f"{now - t0:6.0f} {rate:10.0f} {total:10d} {heights:>12} {replicas:>8} "
                f"{rejects:7d} {outbox:6d} {','.join(sorted(episodes)) or '-'}",
                flush=True,
            )
        reasons: dict[str, int] = {}
        for nd in nodes:
            for k, v in nd.status()["ingest"]["rejects"].items():
                reasons[k] = reasons.get(k, 0) + v
        if reasons:
            print("rejected, by reason:", ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())))
        sim_stop.set()
        for t in sim_tasks:
            await t
        for sim in sims:
            sim.close()
        node_stop.set()
    print(f"stopped; verify with: meshhealth chain verify --data-dir {root}")
    return 0


async def share_with_demo_provider(root: Path, sim: Any, backfill_s: float) -> None:
    """Give a demo clinician an open grant to the first patient, and say how to look."""
    from meshhealth.net.client import client_session, post_tx
    from meshhealth.sharing.grants import make_grant

    patient = sim.patients[0]
    provider = Identity.generate("provider")
    save_identity(provider, root / "provider.key")
    now = time.time_ns() // 1_000_000
    grant = make_grant(
        patient.identity,
        patient.chains,
        provider.public,
        streams=list(patient.chains),
        from_ms=now - int(backfill_s * 1000),
        until_ms=None,
        now_ms=now,
    )
    async with client_session(10) as session:
        await post_tx(session, sim.node_urls, grant.encode())
    node = sim.node_urls[0]
    key = sim.state_dir / "patients" / f"{patient.identity.short}.key"
    print(
        f"patient {patient.identity.short} shares every stream with a demo clinician; "
        f"in another terminal:\n"
        f"  meshhealth provider serve --key {root / 'provider.key'} --node {node}\n"
        f"  meshhealth patient serve --key {key} --node {node}"
    )


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "demo", help="gossiping nodes + embedded brokers + simulated wearables, live"
    )
    s.add_argument("--duration", type=float, default=0, help="seconds to run (default: until ^C)")
    s.add_argument("--data-dir", default="demo-data", help="one data dir per node is left here")
    s.add_argument("--fresh", action="store_true", help="wipe --data-dir first if not empty")
    s.add_argument("--nodes", type=int, default=3, help="authority nodes (gossiping)")
    s.add_argument("--patients", type=int, default=6)
    s.add_argument("--devices", type=int, default=2, help="devices per patient")
    s.add_argument(
        "--backfill",
        type=float,
        default=900.0,
        help="seconds of history the wearables sync at start",
    )
    s.add_argument("--broker", help="use this Mosquitto (mqtt://host:port) instead of embedded")
    s.add_argument("--seed", type=int, default=1)
    s.set_defaults(fn=lambda a: asyncio.run(run_demo(a)))
