"""``meshhealth bench ...``: benchmarks that print a table and, with --json, write JSON."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _ingest(a: argparse.Namespace) -> int:
    from meshhealth.bench.ingest import run

    run(
        quick=a.quick,
        spm=a.samples_per_message,
        json_path=Path(a.json) if a.json else None,
        publishers=a.publishers,
        devices=a.devices,
        keep=Path(a.keep) if a.keep else None,
    )
    return 0


def _gossip(a: argparse.Namespace) -> int:
    from meshhealth.bench.gossip import run

    run(
        quick=a.quick,
        json_path=Path(a.json) if a.json else None,
        fanout=a.fanout,
        loss=a.loss,
        seed=a.seed,
        real=not a.sim_only,
        real_nodes=a.nodes,
        keep=Path(a.keep) if a.keep else None,
    )
    return 0


def _query(a: argparse.Namespace) -> int:
    from meshhealth.bench.query import run

    run(
        quick=a.quick,
        json_path=Path(a.json) if a.json else None,
        keep=Path(a.keep) if a.keep else None,
    )
    return 0


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="benchmarks (table on stdout, --json for machines)")
    bs = b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    s = bs.add_parser("ingest", help="broker -> one node -> LMDB, beside the ceilings")
    s.add_argument("--json", help="write the results here")
    s.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    s.add_argument("--samples-per-message", type=int, default=1)
    s.add_argument("--publishers", type=int, default=2, help="publisher processes")
    s.add_argument("--devices", type=int, default=100)
    s.add_argument("--keep", help="work directory to keep (default: a temp dir)")
    s.set_defaults(fn=_ingest)
    s = bs.add_parser(
        "gossip", help="dissemination in the simulator, then real node processes on loopback"
    )
    s.add_argument("--json", help="write the results here")
    s.add_argument("--quick", action="store_true", help="N up to 1,000 (default up to 10,000)")
    s.add_argument("--fanout", type=int, default=4)
    s.add_argument("--loss", type=float, default=0.01, help="message loss probability")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--nodes", type=int, default=5, help="node processes in the real part")
    s.add_argument("--sim-only", action="store_true", help="skip the real-process part")
    s.add_argument("--keep", help="real part: keep node data and logs in this directory")
    s.set_defaults(fn=_gossip)
    s = bs.add_parser(
        "query", help="a provider fetches, verifies and decrypts a day of 1 Hz heart rate"
    )
    s.add_argument("--json", help="write the results here")
    s.add_argument("--quick", action="store_true", help="two hours of data instead of 24")
    s.add_argument("--keep", help="keep the node's data and log in this directory")
    s.set_defaults(fn=_query)
