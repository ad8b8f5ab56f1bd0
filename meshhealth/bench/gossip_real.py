"""``meshhealth bench gossip``, real half: node processes gossiping over loopback.

One run, on this machine, in this order:

1. **Ceiling.**  Ed25519 verifications per second with every core busy (one
   process per core, the same call the verifier makes).  Nothing else runs yet.
2. **Propagation under load.**  A private Mosquitto and N-1 node processes
   sharing its readings through an MQTT shared subscription; publishers
   feed pre-signed readings at a fixed rate.  Every node records, per block
   it receives, the time from the producer's seal (the header's ``ts_ms``)
   to its own commit.  A block's propagation time is the slowest of its
   receivers; we report p50/p99 over blocks.
3. **Catch-up.**  The N-th node was down for the whole load, so it missed
   every reading.  It starts on an empty data dir and we time how long,
   from its API answering, until its replica holds every chain up to the
   heads the others had when the load stopped.  Every reading's device
   signature is checked on the way in, as in live ingest.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from meshhealth.bench.ingest import Workload, publish, verify_ceiling, write_inputs
from meshhealth.bench.procs import BrokerProcess, NodeProcess
from meshhealth.bench.stats import pct
from meshhealth.cli.demo import setup_network
from meshhealth.cli.progress import Progress


def all_cores_verify_ceiling(seconds: float) -> float:
    cores = os.cpu_count() or 1
    with ProcessPoolExecutor(cores) as pool:
        list(pool.map(verify_ceiling, [0.05] * cores))  # start every worker first
        return sum(pool.map(verify_ceiling, [seconds] * cores))


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def latencies(nodes: list[NodeProcess]) -> dict[tuple[str, int], list[float]]:
    """Per remote block, the ms from its seal to its commit on each node that has it."""
    per_block: dict[tuple[str, int], list[float]] = {}
    for nd in nodes:
        for chain, height, ms in _get(f"{nd.url}/v1/gossip/latency")["samples"]:
            per_block.setdefault((chain, height), []).append(ms)
    return per_block


def propagation(per_block: dict[tuple[str, int], list[float]], receivers: int) -> list[float]:
    """Per block that reached every receiver: ms until the last of them had it."""
    return [max(v) for v in per_block.values() if len(v) == receivers]


def run_real(
    work: Path,
    *,
    nodes: int = 5,
    phases: tuple[tuple[float, int], ...] = ((1_000, 30_000), (2_000, 70_000)),
    devices: int = 100,
) -> dict[str, Any]:
    """``phases``: (readings/s, readings) of ingest load, one propagation row each; the
    late node misses all of them."""
    ceiling = all_cores_verify_ceiling(2.0)
    print(f"Ed25519 verify, all {os.cpu_count()} cores: {ceiling:,.0f}/s", flush=True)
    broker = BrokerProcess(work / "broker")
    broker.start()
    procs: list[NodeProcess] = []
    try:
        cfgs = setup_network(work / "net", nodes, broker=broker.url, shared_group="bench")
        for i, c in enumerate(cfgs):
            cfgs[i] = replace(c, ingest=replace(c.ingest, verify_workers=2))
            (c.base / "node.toml").write_text(cfgs[i].dumps())
        procs = [
            NodeProcess(c.base / "node.toml", work / f"node{i}.log", c.api.port)
            for i, c in enumerate(cfgs)
        ]
        live, late = procs[:-1], procs[-1]
        for nd in live:
            nd.start(until="api")
        for nd in live:
            nd.wait_ingesting()
        wl = Workload(devices, 1)
        for tx in wl.txs:
            req = urllib.request.Request(f"{live[0].url}/v1/tx", data=tx, method="POST")
            urllib.request.urlopen(req, timeout=10).read()
        time.sleep(1.5)
        rows, seen = [], set(latencies(live))
        for k, (rate, count) in enumerate(phases):
            files = write_inputs(wl.batch(count // devices), 2, work, f"load{k}")
            t_load = time.monotonic()
            res = publish(broker.url, files, work, receipts=True, rate=rate, timeout=600)
            load_s = time.monotonic() - t_load
            time.sleep(2.0)  # the phase's last blocks propagate
            per_block = {b: v for b, v in latencies(live).items() if b not in seen}
            seen |= set(per_block)
            blocks = propagation(per_block, len(live) - 1)
            row = {
                "nodes": len(live),
                "load_readings_per_s": rate,
                "readings": sum(r["receipted"] for r in res),
                "blocks": len(blocks),
                "p50_ms": round(pct(blocks, 0.5), 1),
                "p99_ms": round(pct(blocks, 0.99), 1),
                "max_ms": round(max(blocks), 1) if blocks else None,
            }
            rows.append(row)
            print(
                f"load {rate:,.0f} readings/s over {len(live)} nodes ({row['readings']:,} in "
                f"{load_s:.1f} s): propagation to every node over {len(blocks)} blocks "
                f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms",
                flush=True,
            )
        target = live[0].heads()
        held = live[0].status()["store"]["readings"]

        t_start = time.monotonic()
        late.start(until="api")
        t_api = time.monotonic()
        bar = Progress(sum(h + 1 for h in target.values()), "catch-up blocks")
        while True:
            got = late.heads()
            bar.update(sum(min(got.get(c, -1), h) + 1 for c, h in target.items()))
            if all(got.get(c, -1) >= h for c, h in target.items()):
                bar.close()
                break
            if time.monotonic() - t_api > 600:
                raise TimeoutError(f"catch-up stalled at {got} of {target}")
            time.sleep(0.05)
        t_done = time.monotonic()
        caught = late.status()
        rate_api = held / (t_done - t_api)
        print(
            f"catch-up: {held:,} readings in {t_done - t_api:.1f} s after the API answered "
            f"({t_done - t_start:.1f} s from process start): {rate_api:,.0f} readings/s, "
            f"{rate_api / ceiling:.2f} x the all-core verify ceiling",
            flush=True,
        )
        return {
            "real": rows,
            "catchup_readings": held,
            "catchup_s": round(t_done - t_api, 2),
            "catchup_s_from_process_start": round(t_done - t_start, 2),
            "catchup_readings_per_s": round(rate_api, 1),
            "catchup_ceiling_verify_per_s": round(ceiling, 1),
            "catchup_ratio": round(rate_api / ceiling, 3),
            "catchup_invalid_blocks": caught["gossip"].get("invalid_block", 0),
        }
    finally:
        for nd in procs:
            nd.stop()
        broker.stop()
