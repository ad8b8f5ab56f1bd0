"""``meshhealth patient grant | revoke | erase``: the patient's control transactions.

Each builds and signs the transaction locally with the patient's key file
(which holds the key chains), then submits it to the first ``--node`` that
accepts it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp

from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity, load_identity, parse_public
from meshhealth.errors import ConfigError
from meshhealth.net.client import post_tx
from meshhealth.sharing.grants import make_grant
from meshhealth.sharing.keychain import KeyChain
from meshhealth.wire import Erase, Revoke

DAY_MS = 86_400_000


def load_patient(path: str, passphrase: str | None) -> tuple[Identity, dict[str, KeyChain]]:
    patient = load_identity(Path(path), passphrase=passphrase)
    doc = tomllib.loads(Path(path).read_text())
    chains = {c["stream"]: KeyChain.from_doc(c) for c in doc.get("keychains", [])}
    if not chains:
        raise ConfigError(f"{path} holds no key chains: create it with `meshhealth patient new`")
    return patient, chains


def parse_time(text: str) -> int:
    """Unix ms, or an ISO 8601 date/time (UTC unless it says otherwise)."""
    if text.isdigit():
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"{text!r} is neither Unix ms nor an ISO 8601 time") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


async def _submit(nodes: list[str], raw: bytes) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        return await post_tx(session, nodes, raw)


async def grant(a: argparse.Namespace) -> int:
    patient, chains = load_patient(a.key, a.passphrase)
    now = time.time_ns() // 1_000_000
    start = parse_time(a.start) if a.start else now
    if a.open:
        until = None
    elif a.until:
        until = parse_time(a.until)
    else:
        until = start + int(a.days * DAY_MS)
    streams = a.streams.split(",") if a.streams else list(chains)
    try:
        tx = make_grant(
            patient,
            chains,
            parse_public(a.to),
            streams=streams,
            from_ms=start,
            until_ms=until,
            now_ms=now,
            pseudonymous=a.pseudonymous,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    await _submit(a.node, tx.encode())
    window = "open" if until is None else f"until {_iso(until)}"
    print(
        f"grant {h(tx.encode()).hex()}: {tx.grantee.hex()[:8]} may read "
        f"{','.join(s.stream for s in tx.streams)} from {_iso(start)}, {window}"
    )
    return 0


async def revoke(a: argparse.Namespace) -> int:
    patient, _ = load_patient(a.key, a.passphrase)
    try:
        grant_id = bytes.fromhex(a.grant)
    except ValueError:
        grant_id = b""
    if len(grant_id) != 32:
        print("error: --grant takes the 64-hex grant id `patient grant` printed", file=sys.stderr)
        return 2
    tx = Revoke.create(patient.signing, grant=grant_id, ts_ms=time.time_ns() // 1_000_000)
    await _submit(a.node, tx.encode())
    print(f"revoked grant {a.grant[:16]}")
    return 0


async def erase(a: argparse.Namespace) -> int:
    patient, _ = load_patient(a.key, a.passphrase)
    if not a.yes:
        print("error: erasure cannot be undone; pass --yes to confirm", file=sys.stderr)
        return 2
    tx = Erase.create(patient.signing, ts_ms=time.time_ns() // 1_000_000)
    tid = await _submit(a.node, tx.encode())
    print(f"erasure of patient {patient.public.hex()[:8]} submitted: tx {tid}")
    return 0


def grants(a: argparse.Namespace) -> int:
    """List the patient's grants as the first reachable node knows them."""
    import json
    import urllib.request

    patient = load_identity(Path(a.key), passphrase=a.passphrase)
    last = ""
    for url in a.node:
        try:
            with urllib.request.urlopen(
                f"{url.rstrip('/')}/v1/patients/{patient.public.hex()}/grants", timeout=10
            ) as r:
                doc = json.loads(r.read())
            break
        except OSError as exc:
            last = f"{url}: {exc}"
    else:
        print(f"error: no node answered ({last})", file=sys.stderr)
        return 1
    print(f"{'grant':<16} {'grantee':<10} {'streams':<20} {'from':<25} {'until':<25} state")
    for g in doc["grants"]:
        until = "open" if g["open"] else _iso(g["until_ms"])
        state = "revoked" if g["revoked"] else "active"
        print(
            f"{g['id'][:16]:<16} {g['grantee'][:8]:<10} {','.join(g['streams']):<20} "
            f"{_iso(g['from_ms']):<25} {until:<25} {state}"
        )
    return 0


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def add_parsers(pat: Any, sync: Any) -> None:
    """Add the sharing commands to the ``patient`` sub-parser."""
    s = pat.add_parser("grant", help="let a provider read chosen streams for a time window")
    s.add_argument("--key", required=True, help="the patient's key file")
    s.add_argument("--to", required=True, help="the grantee's public key (64 hex) or key file")
    s.add_argument("--streams", help="comma-separated (default: all of the patient's)")
    s.add_argument("--from", dest="start", help="start: Unix ms or ISO 8601 (default: now)")
    w = s.add_mutually_exclusive_group()
    w.add_argument("--until", help="end: Unix ms or ISO 8601")
    w.add_argument("--days", type=float, default=7.0, help="window length (default 7)")
    w.add_argument("--open", action="store_true", help="no end: until revoked")
    s.add_argument("--pseudonymous", action="store_true", help="exports carry a pseudonym")
    s.add_argument("--node", action="append", required=True, help="node API URL (repeatable)")
    s.add_argument("--passphrase")
    s.set_defaults(fn=sync(grant))
    s = pat.add_parser("revoke", help="end a grant")
    s.add_argument("--key", required=True)
    s.add_argument("--grant", required=True, help="the grant id `patient grant` printed")
    s.add_argument("--node", action="append", required=True)
    s.add_argument("--passphrase")
    s.set_defaults(fn=sync(revoke))
    s = pat.add_parser("grants", help="list this patient's grants and whether each is active")
    s.add_argument("--key", required=True)
    s.add_argument("--node", action="append", required=True)
    s.add_argument("--passphrase")
    s.set_defaults(fn=grants)
    s = pat.add_parser("erase", help="delete every payload of this patient (irreversible)")
    s.add_argument("--key", required=True)
    s.add_argument("--node", action="append", required=True)
    s.add_argument("--yes", action="store_true", help="confirm")
    s.add_argument("--passphrase")
    s.set_defaults(fn=sync(erase))
