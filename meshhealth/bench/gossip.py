"""``meshhealth bench gossip``: block dissemination in the seeded simulator.

For each network size N, after a warm-up, one node produces a block and
the simulator runs until every node holds it.  Reported per size:

* ``rounds_*``: the gossip hop at which nodes first got the block (push hops,
  or the pulling node's hop + 1 for anti-entropy), p50/p99/max, beside log2 N;
* virtual time until every node has it;
* block-related messages and bytes per node per block (pushes, pulls and
  pulled blocks; the periodic digests are reported separately, per node per
  second, because they do not depend on how many blocks there are).

The real-process half (propagation between node processes under ingest
load, and the catch-up rate of a node that missed every reading) is in
:mod:`meshhealth.bench.gossip_real`; ``--sim-only`` skips it.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from meshhealth.bench.stats import pct
from meshhealth.gossip.protocol import GossipParams
from meshhealth.gossip.sim import Simulation

BLOCK_KINDS = ("Push", "Pull", "Blocks")


def measure(n: int, *, seed: int, blocks: int, fanout: int, loss: float) -> dict[str, Any]:
    params = GossipParams(fanout=fanout)
    sim = Simulation(n, seed=seed, params=params, loss=loss)
    sim.run_until(2 * params.tick_s)
    rounds: list[float] = []
    times: list[float] = []
    block_msgs = block_bytes = 0
    digest_msgs = digest_bytes = 0
    digest_time = 0.0
    for k in range(blocks):
        before = sim.counters.snapshot()
        t0 = sim.now
        producer = sim.rng.randrange(n)
        blk = sim.produce(producer)
        if not sim.run_until_quiet(partial(sim.everyone_has, blk), limit_s=60, step_s=0.01):
            raise RuntimeError(f"N={n}: block {k} did not reach every node in 60 virtual s")
        after = sim.counters.snapshot()
        for kind, (m, b) in after.items():
            dm, db = m - before.get(kind, [0, 0])[0], b - before.get(kind, [0, 0])[1]
            if kind in BLOCK_KINDS:
                block_msgs, block_bytes = block_msgs + dm, block_bytes + db
            else:
                digest_msgs, digest_bytes = digest_msgs + dm, digest_bytes + db
        digest_time += sim.now - t0
        got = [nd.received_at[blk] for nd in sim.nodes]
        rounds += [h for _, h in got]
        times.append(max(t for t, _ in got) - t0)
    return {
        "nodes": n,
        "log2_nodes": round(math.log2(n), 2),
        "fanout": fanout,
        "loss": loss,
        "blocks": blocks,
        "rounds_p50": pct(rounds, 0.5),
        "rounds_p99": pct(rounds, 0.99),
        "rounds_max": max(rounds),
        "virtual_ms_p50": round(1000 * pct(times, 0.5), 1),
        "virtual_ms_max": round(1000 * max(times), 1),
        "messages_per_node_per_block": round(block_msgs / (n * blocks), 2),
        "bytes_per_node_per_block": round(block_bytes / (n * blocks), 1),
        "digest_messages_per_node_per_s": round(digest_msgs / (n * max(digest_time, 1e-9)), 2),
    }


def run(
    *,
    quick: bool,
    json_path: Path | None,
    fanout: int = 4,
    loss: float = 0.01,
    seed: int = 1,
    real: bool = True,
    real_nodes: int = 5,
    real_phases: tuple[tuple[float, int], ...] | None = None,
    keep: Path | None = None,
) -> dict[str, Any]:
    sizes = (10, 100, 1000) if quick else (10, 100, 1000, 10_000)
    rows = []
    for n in sizes:
        t = time.perf_counter()
        blocks = 5 if n <= 1000 else 2
        row = measure(n, seed=seed, blocks=blocks, fanout=fanout, loss=loss)
        row["wall_s"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(
            f"N={n:>6}: rounds p50/p99/max {row['rounds_p50']}/{row['rounds_p99']}/"
            f"{row['rounds_max']} (log2 N = {row['log2_nodes']}), "
            f"{row['messages_per_node_per_block']} msg and "
            f"{row['bytes_per_node_per_block']:,.0f} B per node per block, "
            f"all nodes in {row['virtual_ms_max']:.0f} ms virtual",
            flush=True,
        )
    result: dict[str, Any] = {"sim": rows}
    if real:
        from meshhealth.bench.gossip_real import run_real

        with tempfile.TemporaryDirectory(prefix="mh-bench-gossip-") as tmp:
            work = keep or Path(tmp)
            work.mkdir(parents=True, exist_ok=True)
            result |= run_real(
                work,
                nodes=real_nodes,
                phases=real_phases
                or (
                    ((1_000, 8_000), (2_000, 12_000))
                    if quick
                    else ((1_000, 30_000), (2_000, 70_000))
                ),
            )
    else:
        result |= {"real": None, "catchup_readings_per_s": None}
        result["catchup_ceiling_verify_per_s"] = None
    print()
    print(
        f"{'nodes':>7} {'log2N':>6} {'rounds p50':>10} {'p99':>5} {'max':>5} "
        f"{'2·log2N':>8} {'msg/node/blk':>13} {'fanout·rounds':>14} {'B/node/blk':>11}"
    )
    for r in rows:
        print(
            f"{r['nodes']:>7} {r['log2_nodes']:>6} {r['rounds_p50']:>10} {r['rounds_p99']:>5} "
            f"{r['rounds_max']:>5} {2 * r['log2_nodes']:>8.1f} "
            f"{r['messages_per_node_per_block']:>13} {fanout * r['rounds_max']:>14} "
            f"{r['bytes_per_node_per_block']:>11,.0f}"
        )
    if result["real"]:
        print()
        for r in result["real"]:
            print(
                f"real: {r['nodes']} node processes, {r['load_readings_per_s']:,.0f} readings/s: "
                f"propagation p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms over {r['blocks']} "
                f"blocks (target p99 <= 500 ms)"
            )
        print(
            f"catch-up: {result['catchup_readings_per_s']:,.0f} readings/s = "
            f"{result['catchup_ratio']:.2f} x the all-core verify ceiling "
            f"{result['catchup_ceiling_verify_per_s']:,.0f}/s (target >= 0.8)"
        )
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    return result
