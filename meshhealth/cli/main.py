"""``meshhealth``: run and inspect a MeshHealth node, patients and devices.

Start with ``meshhealth demo`` (nothing else needed), then see
``meshhealth <command> --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from meshhealth.cli import passphrase
from meshhealth.cli.logs import FORMATS, setup_logging
from meshhealth.cli.netutil import stop_on_signals
from meshhealth.config import Authority, Genesis, NodeConfig
from meshhealth.crypto.keys import Identity, load_identity, parse_public, save_identity
from meshhealth.errors import MeshHealthError, NetworkError
from meshhealth.net.tls import CA_ENV, cli_context

log = logging.getLogger("meshhealth")


# --- identities and networks ------------------------------------------------


def cmd_init(a: argparse.Namespace) -> int:
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    ident = Identity.generate("node")
    save_identity(ident, d / "node.key", passphrase=a.passphrase)
    genesis_file = "genesis.toml"
    if a.genesis:
        genesis_file = str(Path(a.genesis).resolve())
    else:
        g = Genesis(a.network, time.time_ns() // 1_000_000, (Authority(a.name, ident.public),))
        (d / "genesis.toml").write_text(g.dumps())
    cfg = NodeConfig(genesis_file=genesis_file)
    from dataclasses import replace

    cfg = replace(
        cfg, api=replace(cfg.api, port=a.api_port), mqtt=replace(cfg.mqtt, broker=a.broker or "")
    )
    if not a.broker:
        cfg = replace(cfg, mqtt=replace(cfg.mqtt, embedded_port=embedded_port(a.embedded_port)))
    (d / "node.toml").write_text(cfg.dumps())
    print(
        f"node {ident.short} initialised in {d}\n  key     {d / 'node.key'} (mode 0600)\n"
        f"  config  {d / 'node.toml'}\n  network {genesis_file}\n"
        f"run it with: meshhealth node run --config {d / 'node.toml'}"
    )
    return 0


def embedded_port(wanted: int) -> int:
    """``wanted`` if the embedded broker can listen there now, else a free port (said on
    stderr, with the other way out: use the broker that holds the port)."""
    from meshhealth.cli.doctor import port_free
    from meshhealth.cli.netutil import free_port

    if port_free("127.0.0.1", wanted):
        return wanted
    port = free_port()
    print(
        f"note: port {wanted} is in use (a local Mosquitto?): the embedded broker will listen "
        f"on 127.0.0.1:{port} (mqtt.embedded_port); to use the broker on {wanted} instead, "
        f'set mqtt.broker = "mqtt://127.0.0.1:{wanted}"',
        file=sys.stderr,
    )
    return port


def cmd_network_create(a: argparse.Namespace) -> int:
    auths: list[Authority] = []
    for spec in a.authority:
        name, _, key = spec.partition("=")
        if not key:
            name, key = f"node-{len(auths) + 1}", name
        auths.append(Authority(name, parse_public(key)))
    g = Genesis(a.name, time.time_ns() // 1_000_000, tuple(auths), a.max_future_skew_ms)
    Path(a.out).write_text(g.dumps())
    print(f"network {a.name!r} ({len(auths)} authorities) id {g.network_id.hex()} -> {a.out}")
    return 0


def cmd_keygen(a: argparse.Namespace, kind: str) -> int:
    ident = Identity.generate(kind)
    extra = None
    if kind == "patient":
        from meshhealth.sharing.keychain import KeyChain, epoch_of

        now = time.time_ns() // 1_000_000
        chains = [
            KeyChain.new(s, epoch_of(now, a.epoch_ms), a.epoch_ms).to_doc()
            for s in a.streams.split(",")
        ]
        extra = {"keychains": chains}
    save_identity(ident, Path(a.out), passphrase=a.passphrase, extra=extra)
    print(f"{kind} {ident.public.hex()} -> {a.out} (mode 0600)")
    return 0


async def _enroll(a: argparse.Namespace) -> int:
    from meshhealth.cli.patient_cmds import load_patient, parse_time
    from meshhealth.net.client import client_session, post_tx
    from meshhealth.sharing.enrollment import enrollment
    from meshhealth.sharing.keychain import epoch_of

    patient, chains = load_patient(a.key, a.passphrase)
    wanted = a.streams.split(",") if a.streams else list(chains)
    missing = [s for s in wanted if s not in chains]
    if missing:
        print(f"error: {a.key} has no key chain for {missing}", file=sys.stderr)
        return 2
    device = parse_public(a.device)
    now = time.time_ns() // 1_000_000
    sel = {s: chains[s] for s in wanted}
    key_epoch = epoch_of(now, next(iter(sel.values())).epoch_ms)
    since = parse_time(a.import_from) if a.import_from else None
    if since is not None:
        if since > now:
            print("error: --import-from is in the future", file=sys.stderr)
            return 2
        # the device must hold the keys of the epochs it imports into
        key_epoch = epoch_of(since, next(iter(sel.values())).epoch_ms)
    tx = enrollment(patient, sel, device, key_epoch, now, import_from_ms=since)
    async with client_session(10) as session:
        tid = await post_tx(session, a.node, tx.encode())
    if a.out:
        Path(a.out).write_bytes(tx.encode())
    print(f"enrolled device {device.hex()[:8]} for {','.join(wanted)}: tx {tid}")
    return 0


def cmd_network_status(a: argparse.Namespace) -> int:
    """Every chain's height and confirmed height on every node, the lag, and proven faults."""
    import json as _json
    import urllib.request

    rows: list[tuple[str, dict[str, Any] | None, str]] = []
    chains: set[str] = set()
    for url in a.node:
        try:
            with urllib.request.urlopen(
                f"{url.rstrip('/')}/v1/status", timeout=5, context=cli_context()
            ) as r:
                st = _json.loads(r.read())
        except OSError as exc:
            rows.append((url, None, str(exc)))
            continue
        rows.append((url, st, ""))
        chains |= set(st["chains"])
    best = {
        c: max(
            (st["chains"].get(c, {"height": -1})["height"] for _, st, _ in rows if st is not None),
            default=-1,
        )
        for c in chains
    }
    order = sorted(chains)
    print(
        f"{'node':<10} {'url':<28} "
        + " ".join(f"{c[:8]:>13}" for c in order)
        + f" {'max lag':>8} {'peers':>5}"
    )
    down = 0
    faults: dict[str, int] = {}
    for url, st, err in rows:
        if st is None:
            down += 1
            print(f"{'?':<10} {url:<28} unreachable: {err}")
            continue
        cells, lag = [], 0
        for c in order:
            ch = st["chains"].get(c, {"height": -1, "confirmed": -1})
            lag = max(lag, best[c] - ch["height"])
            cells.append(f"{ch['height']}/{ch.get('confirmed', -1)}")
        for n in st.get("faulty", {}):
            faults[n] = faults.get(n, 0) + 1
        print(
            f"{st['node'][:8]:<10} {url:<28} "
            + " ".join(f"{x:>13}" for x in cells)
            + f" {lag:>8} {len(st['gossip']['connections']):>5}"
        )
    print("cells: height/confirmed height of each chain (-1: none)")
    for n, seen_by in sorted(faults.items()):
        print(f"FAULTY {n[:8]}: equivocation proven (held by {seen_by} of {len(rows)} nodes)")
    return 1 if down else 0


# --- running --------------------------------------------------------------------


async def _node_run(a: argparse.Namespace) -> int:
    from meshhealth.node import Node

    cfg = NodeConfig.load(Path(a.config))
    node = Node(cfg, identity=load_identity(cfg.key_path, passphrase=a.passphrase))
    await node.run(stop_on_signals())
    return 0


async def _simulate(a: argparse.Namespace) -> int:
    import os

    from device_agents.simulate import Simulation
    from meshhealth.errors import ConfigError
    from meshhealth.net.tls import CA_ENV, cli_context, client_context

    g = Genesis.load(Path(a.genesis))
    ca = a.ca or os.environ.get(CA_ENV, "")
    if a.cert and not a.broker.startswith("mqtts://"):
        raise ConfigError("--cert needs an mqtts:// --broker (TLS to the broker)")
    mqtt_tls = None
    if a.broker.startswith("mqtts://") and (ca or a.cert):
        mqtt_tls = client_context(
            Path(ca) if ca else None,
            Path(a.cert) if a.cert else None,
            Path(a.key) if a.key else None,
            what="--ca/--cert/--key",
        )
    sim = Simulation(
        broker_url=a.broker,
        node_urls=a.node,
        network=g.network_id,
        authorities={x.key for x in g.authorities},
        state_dir=Path(a.state_dir),
        patients=a.patients,
        devices_per_patient=a.devices,
        streams=tuple(a.streams.split(",")),
        interval_s=a.interval,
        samples_per_reading=a.samples_per_reading,
        backfill_s=a.backfill,
        gateway=a.gateway,
        seed=a.seed,
        mqtt_tls=mqtt_tls,
        http_tls=cli_context(ca),
        confirmations=a.confirmations,
    )
    try:
        await sim.enroll()
        stop = stop_on_signals()
        ok = await sim.run(stop, duration_s=a.duration, drain_timeout=a.drain_timeout)
        # a gateway service (--duration inf) ends by signal; its outbox waits in --state-dir
        ok = ok or (a.duration == float("inf") and stop.is_set())
        print(json.dumps(sim.statistics()))
        return 0 if ok else 1
    finally:
        sim.close()


def _sync(fn: Any) -> Any:
    return lambda a: asyncio.run(fn(a))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meshhealth", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default)")
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line on stderr",
    )
    p.add_argument(
        "--ca",
        metavar="FILE",
        help="CA certificate to check https:// node URLs against (sets $MESHHEALTH_CA)",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="create a node directory: key, config, single-node network")
    s.add_argument("dir", help="directory to create the node in")
    s.add_argument("--name", default="node-1", help="this node's name in the network file")
    s.add_argument("--network", default="meshhealth-local", help="network name (new network)")
    s.add_argument("--genesis", help="join an existing network file instead of creating one")
    s.add_argument("--api-port", type=int, default=8700)
    s.add_argument("--broker", help="mqtt://host:port of Mosquitto (default: embedded broker)")
    s.add_argument(
        "--embedded-port",
        type=int,
        default=1883,
        help="port of the embedded broker (a free one is picked if this one is taken)",
    )
    passphrase.add_args(s, create=True)
    s.set_defaults(fn=cmd_init)

    net = sub.add_parser("network", help="network (genesis) files").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = net.add_parser("create", help="write a genesis file naming the authority nodes")
    s.add_argument("--name", required=True)
    s.add_argument(
        "--authority",
        action="append",
        required=True,
        help="NAME=KEY (64 hex or a key file); repeat per node",
    )
    s.add_argument("--max-future-skew-ms", type=int, default=30_000)
    s.add_argument("--out", default="genesis.toml")
    s.set_defaults(fn=cmd_network_create)
    s = net.add_parser(
        "status", help="every chain's height and confirmation on every node, lag, faults"
    )
    s.add_argument("--node", action="append", required=True, help="node API URL (repeatable)")
    s.set_defaults(fn=cmd_network_status)

    pat = sub.add_parser("patient", help="patient keys and control transactions").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = pat.add_parser("new", help="create a patient key with one key chain per stream")
    s.add_argument("--out", required=True)
    s.add_argument("--streams", default="hr,spo2,temp,bp,rr,steps")
    s.add_argument("--epoch-ms", type=int, default=3_600_000, help="key epoch (default 1 h)")
    passphrase.add_args(s, create=True)
    s.set_defaults(fn=lambda a: cmd_keygen(a, "patient"))
    s = pat.add_parser("enroll-device", help="let a device publish streams for this patient")
    s.add_argument("--key", required=True, help="the patient's key file")
    s.add_argument("--device", required=True, help="device public key (64 hex) or key file")
    s.add_argument("--streams", help="comma-separated (default: all of the patient's)")
    s.add_argument("--node", action="append", required=True, help="node API URL (repeatable)")
    s.add_argument("--out", help="also write the signed transaction here (for the device)")
    s.add_argument(
        "--import-from",
        help="also take in its readings from this time on (Unix ms or ISO 8601), to import "
        "older data; default: only readings from the enrolment on",
    )
    passphrase.add_args(s)
    s.set_defaults(fn=_sync(_enroll))
    from meshhealth.cli import patient_cmds

    patient_cmds.add_parsers(pat, _sync)
    from meshhealth.cli import register_cmd

    register_cmd.add_parser(pat, _sync)
    from meshhealth.cli import provider_cmds

    provider_cmds.add_parsers(sub, pat, _sync)

    nd = sub.add_parser("node", help="run a node").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = nd.add_parser("run", help="run a node until SIGINT/SIGTERM")
    s.add_argument("--config", default="node.toml")
    passphrase.add_args(s)
    s.set_defaults(fn=_sync(_node_run))

    dev = sub.add_parser("device", help="device keys and simulated wearables").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = dev.add_parser("keygen", help="create a device key")
    s.add_argument("--out", required=True)
    passphrase.add_args(s, create=True)
    s.set_defaults(fn=lambda a: cmd_keygen(a, "device"))
    s = dev.add_parser("simulate", help="N patients x M devices publishing over MQTT")
    s.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    s.add_argument("--node", action="append", required=True, help="node API URL for enrolments")
    s.add_argument("--genesis", required=True, help="the network file (to check receipts)")
    s.add_argument("--patients", type=int, default=3)
    s.add_argument("--devices", type=int, default=1, help="devices per patient")
    s.add_argument("--streams", default="hr,spo2,temp,bp,rr,steps")
    s.add_argument("--interval", type=float, default=10.0, help="seconds of samples per reading")
    s.add_argument(
        "--samples-per-reading",
        type=int,
        default=0,
        help="split windows into readings of N samples (1 = real time; 0 = whole window)",
    )
    s.add_argument(
        "--backfill",
        type=float,
        default=0.0,
        help="start this many seconds in the past and catch up (an offline sync)",
    )
    s.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds of live data after now (inf: until SIGINT/SIGTERM)",
    )
    s.add_argument(
        "--gateway",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one MQTT connection for all devices (default) or one per device",
    )
    s.add_argument("--state-dir", default="sim-state", help="outbox and patient keys")
    s.add_argument(
        "--confirmations",
        type=int,
        default=1,
        help="delete a reading only once receipts of this many distinct authorities cover it "
        "(default 1; more needs N >= 4 authorities and nodes with mqtt.receipt_replicated)",
    )
    s.add_argument(
        "--ca",
        default=argparse.SUPPRESS,  # else it would hide a global `meshhealth --ca FILE`
        help="CA file the broker (mqtts://) and https:// nodes are checked against "
        "(default: the global --ca, $MESHHEALTH_CA, else the system roots)",
    )
    s.add_argument("--cert", help="client certificate for the mqtts:// broker (deploy/certs.sh)")
    s.add_argument("--key", help="the client certificate's private key")
    s.add_argument("--drain-timeout", type=float, default=60.0)
    s.add_argument("--seed", type=int, default=1)
    s.set_defaults(fn=_sync(_simulate))

    ch = sub.add_parser("chain", help="verify and inspect stored chains").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = ch.add_parser("verify", help="recompute every hash, Merkle root and signature")
    s.add_argument("--data-dir", required=True, help="a node's data dir (or a dir holding several)")
    s.add_argument("--genesis", help="check against this network file instead of the stored one")
    s.add_argument(
        "--progress", action="store_true", help="draw the progress bar even if not a tty"
    )
    s.set_defaults(
        fn=lambda a: __import__("meshhealth.cli.chain_cmds", fromlist=["x"]).verify_stores(
            Path(a.data_dir), Path(a.genesis) if a.genesis else None, progress=a.progress
        )
    )
    s = ch.add_parser("show", help="heads and the latest blocks of every chain")
    s.add_argument("--data-dir", required=True)
    s.add_argument("--last", type=int, default=10)
    s.set_defaults(
        fn=lambda a: __import__("meshhealth.cli.chain_cmds", fromlist=["x"]).show_store(
            Path(a.data_dir), last=a.last
        )
    )

    from meshhealth.cli import bench, demo, doctor, store_cmds

    store_cmds.add_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    doctor.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.ca:
        os.environ[CA_ENV] = str(Path(args.ca).resolve())  # read by every client session
    try:
        passphrase.resolve(args)
        return int(args.fn(args) or 0)
    except MeshHealthError as exc:
        return fail(exc, args.log_format)
    except BaseExceptionGroup as group:  # raised inside a TaskGroup
        ours, _rest = group.split(MeshHealthError)
        if ours is None:
            raise
        return fail(first_leaf(ours), args.log_format)
    except KeyboardInterrupt:
        return 130


def first_leaf(group: BaseExceptionGroup[Any]) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


EXIT_CONFIG = 2  # fix the configuration first: systemd units do not restart on it
EXIT_TEMPFAIL = 75  # sysexits' EX_TEMPFAIL: a broker, port or peer may be back later


def fail(exc: BaseException, log_format: str) -> int:
    """One line on stderr naming the problem and its fix; exit status 2 for a bad
    configuration, 75 for what may pass by itself (an unreachable broker, a busy port)."""
    if log_format == "json":
        log.error("%s", exc, extra={"error": exc.__class__.__name__})
    else:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_TEMPFAIL if isinstance(exc, NetworkError) else EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
