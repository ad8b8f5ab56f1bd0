"""``meshhealth patient grant | revoke | grants | erase | serve``: the patient's side.

Each builds and signs the transaction locally with the patient's key file
(which holds the key chains), then submits it to the first ``--node`` that
accepts it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from meshhealth.cli import passphrase
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import (
    Identity,
    KeyFile,
    load_identity,
    parse_public,
    read_key_file,
    save_identity,
)
from meshhealth.errors import AccessDenied, ConfigError, KeyFileError, NetworkError
from meshhealth.net.client import client_session, post_tx
from meshhealth.sharing.grants import make_grant, make_rechain
from meshhealth.sharing.keychain import KeyChain, epoch_of
from meshhealth.sharing.provider import PARALLEL_FROM, signed_get
from meshhealth.wire import (
    EnrollDevice,
    Erase,
    Grant,
    Rechain,
    RemoveDevice,
    Revoke,
    decode_control,
)
from meshhealth.wire.codec import unpack

DAY_MS = 86_400_000


def load_patient(path: str, passphrase: str | None) -> tuple[Identity, dict[str, KeyChain]]:
    """The patient's identity and each stream's current key chain (the last in the file)."""
    kf = open_key_file(path, passphrase)
    chains = {c.stream: c for c in all_chains(path, passphrase)}
    if not chains:
        raise ConfigError(f"{path} holds no key chains: create it with `meshhealth patient new`")
    return kf.identity, chains


# a sealed file is unsealed (and its passphrase asked for) once per run, not per use
_opened: dict[str, tuple[int, KeyFile]] = {}


def open_key_file(path: str, passphrase: str | None) -> KeyFile:
    try:
        stamp = Path(path).stat().st_mtime_ns
    except OSError:
        stamp = -1  # read_key_file says what is wrong
    got = _opened.get(path)
    if got is None or got[0] != stamp:
        got = (stamp, read_key_file(Path(path), passphrase=passphrase))
        _opened[path] = got
    return got[1]


def all_chains(path: str, passphrase: str | None = None) -> list[KeyChain]:
    """Every key chain the key file holds, old ones too (they still open older readings)."""
    kf = open_key_file(path, passphrase)
    try:
        return [KeyChain.from_doc(c) for c in kf.extra.get("keychains", [])]
    except (KeyError, ValueError, TypeError) as exc:
        raise KeyFileError(f"key file {path}: a malformed key chain: {exc}") from exc


def add_chains(path: str, patient: Identity, passphrase: str | None, new: list[KeyChain]) -> None:
    """Append new key chains to the patient's key file (the last per stream is current)."""
    write_chains(path, patient, passphrase, all_chains(path, passphrase) + new)


def write_chains(
    path: str, patient: Identity, passphrase: str | None, chains: list[KeyChain]
) -> None:
    """Rewrite the patient's key file with exactly these key chains, sealed whole under
    the passphrase it was opened with (or the one given: an old or clear file is sealed
    whole when rewritten with a passphrase)."""
    kf = open_key_file(path, passphrase)
    secret = kf.passphrase or passphrase
    extra = kf.extra | {"keychains": [c.to_doc() for c in chains]}
    tmp = Path(path).with_name(Path(path).name + ".new")
    tmp.unlink(missing_ok=True)
    save_identity(patient, tmp, passphrase=secret, extra=extra)
    os.replace(tmp, path)  # atomic: the old file or the new one, never half of one
    _opened[path] = (Path(path).stat().st_mtime_ns, KeyFile(kf.identity, extra, secret))


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
    async with client_session(10) as session:
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
    """Revoke a grant; if the grantee holds keys for data not yet written (an open grant,
    or a window reaching into the future), also move each of its streams to a new key
    chain, sealed to the patient's devices and remaining open grantees only."""
    patient, chains = load_patient(a.key, a.passphrase)
    try:
        grant_id = bytes.fromhex(a.grant)
    except ValueError:
        grant_id = b""
    if len(grant_id) != 32:
        print("error: --grant takes the 64-hex grant id `patient grant` printed", file=sys.stderr)
        return 2
    now = time.time_ns() // 1_000_000
    async with client_session(10) as session:
        path = f"/v1/patients/{patient.public.hex()}/grants"
        doc = json.loads(await signed_get(session, a.node, patient, path))
        grants = {
            bytes.fromhex(g["id"]): (Grant.decode(bytes.fromhex(g["tx"])).verify(), g["revoked"])
            for g in doc["grants"]
        }
        if grant_id not in grants:
            print(f"error: no node knows grant {a.grant[:16]} of this patient", file=sys.stderr)
            return 2
        target, _ = grants[grant_id]
        tx = Revoke.create(patient.signing, grant=grant_id, ts_ms=now)
        await post_tx(session, a.node, tx.encode())
        print(f"revoked grant {a.grant[:16]}")
        if a.no_rechain or not (target.open or target.until_ms > now):
            return 0
        path = f"/v1/patients/{patient.public.hex()}/enrollments"
        raw = await signed_get(session, a.node, patient, path)
        devices = devices_by_stream(patient.public, unpack(raw, max_len=1 << 24))
        keep = [
            (gid, g)
            for gid, (g, revoked) in grants.items()
            if gid != grant_id and not revoked and g.open
        ]
        switch = now + int(a.switch_after * 1000)
        moves = [
            make_rechain(
                patient, chains[s.stream], devices[s.stream], keep, now_ms=now, switch_ms=switch
            )
            for s in target.streams
            if s.stream in chains and devices.get(s.stream)
        ]
        # the new seeds go to the key file before any device can start using them
        add_chains(a.key, patient, a.passphrase, [chain for _, chain in moves])
        for rc, chain in moves:
            await post_tx(session, a.node, rc.encode())
            print(
                f"stream {rc.stream}: new key chain {chain.chain_id.hex()} from {_iso(switch)}, "
                f"sealed to {len(rc.devices)} device(s) and {len(rc.grants)} open grant(s)"
            )
    return 0


def devices_by_stream(
    patient: bytes, raws: list[bytes], *, removed: bool = False
) -> dict[str, set[bytes]]:
    """Which devices publish which of the patient's streams, from their signed enrolments
    and rechains, leaving out the devices the patient removed (``removed``: keep them).
    A node could only leave some out, never add one (or hide a removal: the patient's
    own removal goes out in the same run)."""
    out: dict[str, set[bytes]] = {}
    gone: set[bytes] = set()
    for raw in raws:
        tx = decode_control(raw)
        if tx.patient != patient:
            continue
        tx.verify()
        if isinstance(tx, EnrollDevice):
            for sk in tx.streams:
                out.setdefault(sk.stream, set()).add(tx.device)
        elif isinstance(tx, Rechain):
            out.setdefault(tx.stream, set()).update(k.to for k in tx.devices)
        elif isinstance(tx, RemoveDevice):
            gone.add(tx.device)
    if removed:
        return out
    return {s: ds - gone for s, ds in out.items()}


async def remove_device(a: argparse.Namespace) -> int:
    """Cut a device off (lost, stolen, retired): nodes refuse its readings from the removal
    time on, and every stream it wrote moves to a new key chain sealed to the remaining
    devices and open grantees only, so its key opens nothing written from then on."""
    patient, chains = load_patient(a.key, a.passphrase)
    device = parse_public(a.device)
    now = time.time_ns() // 1_000_000
    since = parse_time(a.since) if a.since else now
    if since > now:
        print("error: --since is in the future", file=sys.stderr)
        return 2
    async with client_session(10) as session:
        path = f"/v1/patients/{patient.public.hex()}/enrollments"
        txs = unpack(await signed_get(session, a.node, patient, path), max_len=1 << 24)
        wrote = sorted(
            s
            for s, ds in devices_by_stream(patient.public, txs, removed=True).items()
            if device in ds
        )
        if not wrote:
            print(
                f"error: no node knows device {device.hex()[:8]} as one of this patient's",
                file=sys.stderr,
            )
            return 2
        tx = RemoveDevice.create(patient.signing, device=device, ts_ms=since)
        await post_tx(session, a.node, tx.encode())
        print(f"removed device {device.hex()[:8]}: its readings from {_iso(since)} on are refused")
        if a.no_rechain:
            return 0
        devices = devices_by_stream(patient.public, [*txs, tx.encode()])
        path = f"/v1/patients/{patient.public.hex()}/grants"
        doc = json.loads(await signed_get(session, a.node, patient, path))
        keep = [
            (bytes.fromhex(g["id"]), Grant.decode(bytes.fromhex(g["tx"])).verify())
            for g in doc["grants"]
            if not g["revoked"]
        ]
        keep = [(gid, g) for gid, g in keep if g.open and g.patient == patient.public]
        switch = now + int(a.switch_after * 1000)
        moves, orphaned = [], []
        for stream in wrote:
            if stream not in chains:
                continue
            if not devices.get(stream):
                orphaned.append(stream)
                continue
            moves.append(
                make_rechain(
                    patient, chains[stream], devices[stream], keep, now_ms=now, switch_ms=switch
                )
            )
        # a stream no device writes any more: a fresh chain in the key file only (a rechain
        # names at least one device), so the next device enrolled gets a key it never held
        fresh = [
            KeyChain.new(s, epoch_of(switch, chains[s].epoch_ms), chains[s].epoch_ms)
            for s in orphaned
        ]
        add_chains(a.key, patient, a.passphrase, [chain for _, chain in moves] + fresh)
        for rc, chain in moves:
            await post_tx(session, a.node, rc.encode())
            print(
                f"stream {rc.stream}: new key chain {chain.chain_id.hex()} from {_iso(switch)}, "
                f"sealed to {len(rc.devices)} device(s) and {len(rc.grants)} open grant(s)"
            )
        for s in orphaned:
            print(
                f"stream {s}: no device left to write it; the key file holds a new chain for "
                "the next device you enrol (open grants of it need granting again)"
            )
    return 0


async def erase(a: argparse.Namespace) -> int:
    """Erase everything up to now, and move every stream to a new key chain: the key
    file then keeps no seed from which an erased epoch's key derives (see erased_chains)."""
    patient, chains = load_patient(a.key, a.passphrase)
    if not a.yes:
        print("error: erasure cannot be undone; pass --yes to confirm", file=sys.stderr)
        return 2
    now = time.time_ns() // 1_000_000
    tx = Erase.create(patient.signing, ts_ms=now)
    async with client_session(10) as session:
        path = f"/v1/patients/{patient.public.hex()}/grants"
        doc = json.loads(await signed_get(session, a.node, patient, path))
        keep = [
            (bytes.fromhex(g["id"]), Grant.decode(bytes.fromhex(g["tx"])).verify())
            for g in doc["grants"]
            if not g["revoked"] and g["open"]
        ]
        path = f"/v1/patients/{patient.public.hex()}/enrollments"
        raw = await signed_get(session, a.node, patient, path)
        devices = devices_by_stream(patient.public, unpack(raw, max_len=1 << 24))
        switch = now + int(a.switch_after * 1000)
        moves = [
            make_rechain(patient, chain, devices[s], keep, now_ms=now, switch_ms=switch)
            for s, chain in chains.items()
            if devices.get(s)
        ]
        # a stream no device publishes needs no transaction: only a new seed in the file
        quiet = [
            KeyChain.new(s, epoch_of(switch, c.epoch_ms), c.epoch_ms)
            for s, c in chains.items()
            if not devices.get(s)
        ]
        # the new seeds go to the key file before anything can be sealed under them
        add_chains(a.key, patient, a.passphrase, [chain for _, chain in moves] + quiet)
        tid = await post_tx(session, a.node, tx.encode())
        print(f"erasure of patient {patient.public.hex()[:8]} submitted: tx {tid}")
        for rc, chain in moves:
            await post_tx(session, a.node, rc.encode())
            print(
                f"stream {rc.stream}: new key chain {chain.chain_id.hex()} from {_iso(switch)}, "
                f"sealed to {len(rc.devices)} device(s) and {len(rc.grants)} open grant(s)"
            )
    fresh = frozenset(c.chain_id for c in [chain for _, chain in moves] + quiet)
    kept = erased_chains(all_chains(a.key, a.passphrase), now, fresh)
    write_chains(a.key, patient, a.passphrase, kept)
    print(f"key file {a.key}: {len(kept)} key chain(s) kept, none reaching erased data")
    return 0


def erased_chains(
    chains: list[KeyChain], upto_ms: int, fresh: frozenset[bytes] = frozenset()
) -> list[KeyChain]:
    """The key chains after an erasure up to ``upto_ms``: each (but the ``fresh`` ones the
    erasure made, which opened nothing erased) cut to start at the first epoch wholly
    after it, so no kept seed derives an erased epoch's key; a chain whose readings all
    fall before that (a successor starts earlier: nodes refuse a retired chain's readings
    after its successor's switch) goes entirely.  Readings of the epoch the erasure cuts
    through from after it can no longer be opened from the key file: at most one epoch."""
    out: list[KeyChain] = []
    for i, c in enumerate(chains):
        first = epoch_of(upto_ms, c.epoch_ms) + 1
        later = [n.start_epoch for n in chains[i + 1 :] if n.stream == c.stream]
        if c.chain_id in fresh or c.start_epoch >= first:
            out.append(c)
        elif not later or min(later) >= first:
            out.append(
                KeyChain(c.stream, c.chain_id, c.key(first), first, c.epoch_ms)
            )  # K(first) opens epochs from first on, nothing before
    return out


async def grants(a: argparse.Namespace) -> int:
    """List the patient's grants as the first reachable node knows them."""
    patient = load_identity(Path(a.key), passphrase=a.passphrase)
    async with client_session(10) as session:
        try:
            path = f"/v1/patients/{patient.public.hex()}/grants"
            body = await signed_get(session, a.node, patient, path)
        except (NetworkError, AccessDenied) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    doc = json.loads(body)
    print(f"{'grant':<16} {'grantee':<10} {'streams':<20} {'from':<25} {'until':<25} state")
    for g in doc["grants"]:
        until = "open" if g["open"] else _iso(g["until_ms"])
        state = "revoked" if g["revoked"] else "active"
        print(
            f"{g['id'][:16]:<16} {g['grantee'][:8]:<10} {','.join(g['streams']):<20} "
            f"{_iso(g['from_ms']):<25} {until:<25} {state}"
        )
    return 0


async def serve(a: argparse.Namespace) -> int:
    """The patient's local web page: audit trail, grants, and their own streams."""
    from meshhealth.viewer import patient_view
    from meshhealth.viewer.server import Reader
    from meshhealth.viewer.server import serve as listen

    patient, _ = load_patient(a.key, a.passphrase)  # says so if the file holds no key chain
    genesis = Path(a.genesis) if a.genesis else None
    reader = Reader(patient, a.node, genesis=genesis, workers=a.workers, limits=limits_of(a))
    chains = all_chains(a.key, a.passphrase)
    return await listen(patient_view.app(reader, chains), a.host, a.port, "patient")


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="seconds")


def add_serve_args(s: Any) -> None:
    """The flags ``provider serve`` and ``patient serve`` share."""
    s.add_argument(
        "--host", default="127.0.0.1", help="loopback address to listen on (127.0.0.1, ::1)"
    )
    s.add_argument("--port", type=int, default=0, help="listen port (default 0: a free one)")
    s.add_argument(
        "--max-window-days",
        type=float,
        default=7.0,
        help="the longest window one request may ask for (default 7)",
    )
    s.add_argument(
        "--max-fetch-mb",
        type=float,
        default=32.0,
        help="node answer bytes one request may take in (default 32 MiB)",
    )
    s.add_argument(
        "--request-timeout",
        type=float,
        default=60.0,
        help="seconds one request may take (default 60)",
    )
    add_reader_args(s)


def limits_of(a: argparse.Namespace) -> Any:
    """The viewer's bounds from ``serve``'s flags."""
    from meshhealth.viewer.server import DAY_MS, Limits

    if a.max_window_days <= 0 or a.max_fetch_mb <= 0 or a.request_timeout <= 0:
        raise ConfigError("--max-window-days, --max-fetch-mb and --request-timeout must be > 0")
    return Limits(
        window_ms=int(a.max_window_days * DAY_MS),
        max_bytes=int(a.max_fetch_mb * (1 << 20)),
        timeout_s=a.request_timeout,
    )


def add_reader_args(s: Any) -> None:
    """The flags of every command that fetches and verifies readings from nodes."""
    s.add_argument("--node", action="append", required=True, help="node API URL (failover order)")
    s.add_argument("--genesis", help="the network file to trust (default: the first node's)")
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"verifier processes (default: one per core; 0: none; used from {PARALLEL_FROM} "
        "readings on)",
    )
    passphrase.add_args(s)


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
    passphrase.add_args(s)
    s.set_defaults(fn=sync(grant))
    s = pat.add_parser("revoke", help="end a grant")
    s.add_argument("--key", required=True)
    s.add_argument("--grant", required=True, help="the grant id `patient grant` printed")
    s.add_argument("--node", action="append", required=True)
    s.add_argument(
        "--no-rechain",
        action="store_true",
        help="only revoke: keep the key chains (the grantee keeps keys it already holds)",
    )
    s.add_argument(
        "--switch-after",
        type=float,
        default=10.0,
        help="seconds until the new key chains take over (devices need that long to pick "
        "them up; default 10)",
    )
    passphrase.add_args(s)
    s.set_defaults(fn=sync(revoke))
    s = pat.add_parser(
        "remove-device",
        help="cut a device off (lost, stolen): refuse its readings, rechain what it wrote",
    )
    s.add_argument("--key", required=True, help="the patient's key file")
    s.add_argument("--device", required=True, help="the device's public key (64 hex) or key file")
    s.add_argument("--node", action="append", required=True, help="node API URL (repeatable)")
    s.add_argument(
        "--since",
        help="refuse its readings from this time on (Unix ms or ISO 8601; e.g. when it was "
        "lost; default: now)",
    )
    s.add_argument(
        "--no-rechain",
        action="store_true",
        help="only remove: keep the key chains (the device's key keeps opening new data)",
    )
    s.add_argument(
        "--switch-after",
        type=float,
        default=10.0,
        help="seconds until the new key chains take over (the other devices need that long "
        "to pick them up; default 10)",
    )
    passphrase.add_args(s)
    s.set_defaults(fn=sync(remove_device))
    s = pat.add_parser("grants", help="list this patient's grants and whether each is active")
    s.add_argument("--key", required=True)
    s.add_argument("--node", action="append", required=True)
    passphrase.add_args(s)
    s.set_defaults(fn=sync(grants))
    s = pat.add_parser("erase", help="delete every payload of this patient (irreversible)")
    s.add_argument("--key", required=True)
    s.add_argument("--node", action="append", required=True)
    s.add_argument("--yes", action="store_true", help="confirm")
    s.add_argument(
        "--switch-after",
        type=float,
        default=10.0,
        help="seconds until the new key chains take over (default 10)",
    )
    passphrase.add_args(s)
    s.set_defaults(fn=sync(erase))
    s = pat.add_parser(
        "serve", help="a local web page: who read my data, my grants, my streams (verified here)"
    )
    s.add_argument("--key", required=True, help="the patient's key file")
    add_serve_args(s)
    s.set_defaults(fn=sync(serve))
