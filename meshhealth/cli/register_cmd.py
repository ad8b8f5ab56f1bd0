"""``meshhealth patient register``: an operator registers a patient key with its node's key."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from meshhealth.config import Genesis, NodeConfig
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import load_identity, parse_public
from meshhealth.net.client import client_session, post_tx
from meshhealth.sharing.registration import registration


async def register(a: argparse.Namespace) -> int:
    cfg = NodeConfig.load(Path(a.config))
    node = load_identity(cfg.key_path)
    genesis = Genesis.load(cfg.genesis_path)
    if not genesis.is_authority(node.public):
        print(f"error: {cfg.key_path} is not an authority of {genesis.name!r}", file=sys.stderr)
        return 2
    patient = parse_public(a.patient)
    tx = registration(node, genesis.network_id, patient, time.time_ns() // 1_000_000)
    urls = a.node or [f"{cfg.api_scheme}://{cfg.api.host}:{cfg.api.port}"]
    async with client_session(10) as session:
        await post_tx(session, urls, tx.encode())
    print(f"patient {patient.hex()[:8]} registered by {node.short}: tx {h(tx.encode()).hex()}")
    return 0


def add_parser(pat: Any, sync: Any) -> None:
    s = pat.add_parser(
        "register",
        help="(operator) register a patient key with this node's key: its transactions get "
        "their own budget instead of the strangers' shared one",
    )
    s.add_argument("--config", required=True, help="the node's config (its key signs)")
    s.add_argument("--patient", required=True, help="the patient's public key (64 hex) or key file")
    s.add_argument("--node", action="append", help="node API URL (default: this node's)")
    s.set_defaults(fn=sync(register))
