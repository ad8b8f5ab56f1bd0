"""``meshhealth doctor``: check a node's set-up before (or while) it runs.

Each check prints one line: ``ok``, ``warn`` or ``FAIL``, what it saw, and
for anything not ok the fix.  A check that needs an earlier one (the key
needs the config) is skipped when that one failed.  The exit status is 1
when any check failed, so a deploy script or a systemd ``ExecStartPre`` can
gate on it.  Nothing here writes: the store is opened read-only, the broker
sees one short connection under its own client id, peers see one GET.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import ssl
import stat
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from meshhealth.cli import passphrase
from meshhealth.config import Genesis, NodeConfig
from meshhealth.crypto.keys import Identity, load_identity
from meshhealth.errors import MeshHealthError
from meshhealth.net.tls import node_tls

MIB = 1024 * 1024
MAP_WARN, MAP_FAIL = 0.80, 0.95  # fraction of the LMDB map in use


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail" | "skip"
    detail: str
    fix: str = ""


class Doctor:
    def __init__(self, config: Path, passphrase: str | None, timeout: float) -> None:
        self.config_path = config
        self.passphrase = passphrase
        self.timeout = timeout
        self.checks: list[Check] = []
        self.cfg: NodeConfig | None = None
        self.ident: Identity | None = None
        self.genesis: Genesis | None = None
        self.running: dict[str, Any] | None = None  # our own node's /v1/status, if it runs
        self.map_use: tuple[int, int] | None = None  # LMDB bytes used, map size

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, detail, fix))

    async def run(self) -> list[Check]:
        self.check_config()
        if self.cfg is None:
            for name in ("key", "network", "tls", "data", "disk", "api", "broker", "peers"):
                self.add(name, "skip", "needs a readable config")
            return self.checks
        self.check_key()
        self.check_network()
        self.check_tls()
        self.check_data()
        self.check_disk()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:  # dial https:// peers as the node does: against its CA, with its certificate
            peers_tls = node_tls(self.cfg).peers
        except MeshHealthError:
            peers_tls = None  # the tls check above already failed and said why
        connector = None if peers_tls is None else aiohttp.TCPConnector(ssl=peers_tls)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await self.check_api(session)
            await self.check_broker()
            await self.check_peers(session)
        return self.checks

    # --- local files ----------------------------------------------------------

    def check_config(self) -> None:
        try:
            self.cfg = NodeConfig.load(self.config_path)
        except MeshHealthError as exc:
            self.add(
                "config", "fail", str(exc), "fix the file, or create one with `meshhealth init`"
            )
            return
        self.add("config", "ok", str(self.config_path))

    def check_key(self) -> None:
        assert self.cfg is not None
        path = self.cfg.key_path
        try:
            self.ident = load_identity(path, passphrase=self.passphrase)
        except MeshHealthError as exc:
            self.add("key", "fail", str(exc), "set node.key_file, or run `meshhealth init`")
            return
        if self.ident.kind != "node":
            self.add(
                "key",
                "fail",
                f"{path} holds a {self.ident.kind} key, not a node key",
                "point node.key_file at the node's own key",
            )
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            self.add(
                "key",
                "warn",
                f"node {self.ident.short}; {path} is readable by others (mode {mode:o})",
                f"chmod 600 {path}",
            )
        else:
            self.add("key", "ok", f"node {self.ident.short} ({path}, mode {mode:o})")

    def check_network(self) -> None:
        assert self.cfg is not None
        try:
            self.genesis = Genesis.load(self.cfg.genesis_path)
        except MeshHealthError as exc:
            self.add("network", "fail", str(exc), "set node.genesis_file to the network's file")
            return
        g = self.genesis
        about = f"{g.name!r} id {g.network_id.hex()[:16]}, {len(g.authorities)} authorities"
        if self.ident is None:
            self.add("network", "warn", about + "; membership unchecked (no key)")
        elif not g.is_authority(self.ident.public):
            self.add(
                "network",
                "fail",
                f"{about}; node {self.ident.short} is not one of them",
                f"add this node's key to {self.cfg.genesis_path} on every node (network create)",
            )
        else:
            name = next(a.name for a in g.authorities if a.key == self.ident.public)
            self.add("network", "ok", f"{about}; this node is {name!r}")

    def check_tls(self) -> None:
        assert self.cfg is not None
        t, m = self.cfg.tls, self.cfg.mqtt
        if not (t.cert_file or t.ca_file or m.ca_file or m.cert_file):
            self.add("tls", "ok", "off: plain HTTP and MQTT (fine on loopback)")
            return
        try:
            ctx = node_tls(self.cfg)
        except MeshHealthError as exc:
            self.add("tls", "fail", str(exc), "issue the files with deploy/certs.sh")
            return
        parts = []
        if ctx.server is not None:
            parts.append(f"API and gossip serve HTTPS with {t.cert_file}")
        if t.ca_file:
            parts.append(f"peers checked against {t.ca_file}")
        if ctx.mqtt is not None:
            parts.append("broker over TLS" + (" with a client certificate" if m.cert_file else ""))
        self.add("tls", "ok", "; ".join(parts))

    def check_data(self) -> None:
        assert self.cfg is not None
        path = self.cfg.data_path
        if not (path / "data.mdb").exists():
            self.add("data", "ok", f"{path} is empty: the node starts a fresh replica there")
            return
        from meshhealth.store.lmdb_store import Store

        try:
            store = Store(path, map_size_mb=self.cfg.storage.map_size_mb, readonly=True)
        except Exception as exc:  # lmdb.Error and OSError: report, never crash the doctor
            self.add("data", "fail", f"cannot open {path}: {exc}", "check its permissions")
            return
        try:
            stored = store.meta("genesis")
            heads = store.heads()
            readings = store.reading_count()
            used, size = store.disk_bytes(), int(store.env.info()["map_size"])
        finally:
            store.close()
        self.map_use = (used, size)
        if stored is not None and self.genesis is not None:
            other = Genesis.load_text(stored.decode())
            if other.network_id != self.genesis.network_id:
                self.add(
                    "data",
                    "fail",
                    f"{path} holds network {other.name!r}'s data, not {self.genesis.name!r}",
                    "point node.data_dir at an empty directory (or the right network file)",
                )
                return
        self.add("data", "ok", f"{path}: {len(heads)} chains, {readings:,} readings")

    def check_disk(self) -> None:
        assert self.cfg is not None
        probe = self.cfg.data_path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        want = self.cfg.storage.map_size_mb * MIB
        parts = [f"{free / MIB:,.0f} MiB free on {probe}"]
        status, fix = "ok", ""
        if self.map_use is not None:
            used, size = self.map_use
            frac = used / size
            parts.append(f"LMDB map {used / MIB:,.1f} of {size / MIB:,.0f} MiB ({frac:.0%})")
            if frac >= MAP_WARN:
                status = "fail" if frac >= MAP_FAIL else "warn"
                fix = "raise storage.map_size_mb (the node grows it on restart)"
        if free < want - (self.map_use[0] if self.map_use else 0):
            status = "warn" if status == "ok" else status
            fix = fix or "free disk space or lower storage.map_size_mb"
            parts.append(f"map size {want / MIB:,.0f} MiB exceeds what is free")
        self.add("disk", status, "; ".join(parts), fix)

    # --- the network ----------------------------------------------------------------

    async def check_api(self, session: aiohttp.ClientSession) -> None:
        assert self.cfg is not None
        host, port = self.cfg.api.host, self.cfg.api.port
        scheme = self.cfg.api_scheme
        url = f"{scheme}://{host}:{port}/v1/status"
        try:
            async with session.get(url, ssl=False) as r:
                st = await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, ValueError):
            st = None
        if st is not None and self.ident is not None and st.get("node") == self.ident.public.hex():
            self.running = st
            heights = [c["height"] for c in st.get("chains", {}).values()]
            self.add(
                "api",
                "ok",
                f"this node is running at {scheme}://{host}:{port} "
                f"(up {st.get('uptime_s', 0):.0f} s, {len(heights)} chains)",
            )
            return
        if st is not None:
            self.add(
                "api",
                "fail",
                f"{host}:{port} is served by another node ({str(st.get('node'))[:8]})",
                "set api.port to a free port",
            )
            return
        if port_free(host, port):
            self.add("api", "ok", f"{host}:{port} is free: the node can listen there")
        else:
            self.add(
                "api",
                "fail",
                f"{host}:{port} is in use by another program",
                "stop it or set api.port",
            )

    async def check_broker(self) -> None:
        assert self.cfg is not None
        m = self.cfg.mqtt
        if not m.broker:
            if self.running is not None:
                self.add("broker", "ok", f"embedded broker on port {m.embedded_port} (node runs)")
            elif port_free("0.0.0.0", m.embedded_port):
                self.add("broker", "ok", f"embedded broker: port {m.embedded_port} is free")
            else:
                self.add(
                    "broker",
                    "fail",
                    f"embedded broker: port {m.embedded_port} is in use",
                    "set mqtt.embedded_port, or mqtt.broker to use the broker already there",
                )
            return
        err = await mqtt_connect(self.cfg, self.timeout)
        if err is None:
            self.add("broker", "ok", f"connected to {m.broker}")
        else:
            self.add(
                "broker",
                "fail",
                f"cannot connect to {m.broker}: {err}",
                "start the broker, check mqtt.broker and its credentials, "
                "or leave mqtt.broker empty for the embedded one",
            )

    async def check_peers(self, session: aiohttp.ClientSession) -> None:
        assert self.cfg is not None
        peers = self.cfg.gossip.peers
        if not peers:
            alone = self.genesis is not None and len(self.genesis.authorities) == 1
            if alone:
                self.add("peers", "ok", "none configured (the network has one node)")
            else:
                self.add(
                    "peers", "warn", "none configured", "list other nodes' URLs in gossip.peers"
                )
            return
        results = await asyncio.gather(*(self.peer(session, url) for url in peers))
        bad = [r for r in results if r[0] != "ok"]
        detail = "; ".join(r[1] for r in results)
        if not bad:
            self.add("peers", "ok", detail)
        elif any(r[0] == "fail" for r in bad):
            self.add("peers", "fail", detail, "a peer in another network: fix gossip.peers")
        else:
            self.add("peers", "warn", detail, "start the unreachable peers or fix their URLs")

    async def peer(self, session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
        try:
            async with session.get(f"{url.rstrip('/')}/v1/status") as r:
                if r.status != 200:
                    return "warn", f"{url}: HTTP {r.status}"
                st = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return "warn", f"{url}: unreachable ({exc.__class__.__name__}: {exc})"
        if self.genesis is not None and st.get("network") != self.genesis.network_id.hex():
            return "fail", f"{url}: in network {st.get('network_name')!r}, not ours"
        return "ok", f"{url}: node {str(st.get('node'))[:8]} up"


def port_free(host: str, port: int) -> bool:
    """Whether we could listen on ``host:port`` now (what the node will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


async def mqtt_connect(cfg: NodeConfig, timeout: float) -> str | None:
    """Connect and disconnect once under a throwaway client id; the error text, or None."""
    import aiomqtt

    from meshhealth.ingest.mqtt import parse_broker_url

    host, port, tls = parse_broker_url(cfg.mqtt.broker)
    m = cfg.mqtt
    kwargs: dict[str, Any] = {
        "identifier": f"mh-doctor-{uuid.uuid4().hex[:8]}",
        "username": m.username or None,
        "password": m.password or None,
        "timeout": timeout,
    }
    if tls:
        kwargs["tls_context"] = node_tls(cfg).mqtt or ssl.create_default_context()
    try:
        async with asyncio.timeout(timeout + 1), aiomqtt.Client(host, port, **kwargs):
            return None
    except (aiomqtt.MqttError, OSError, TimeoutError) as exc:
        return str(exc) or exc.__class__.__name__


MARK = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "skip": "skip"}


def cmd_doctor(a: argparse.Namespace) -> int:
    checks = asyncio.run(Doctor(Path(a.config), a.passphrase, a.timeout).run())
    if a.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{MARK[c.status]}  {c.name:<{width}}  {c.detail}")
            if c.fix and c.status != "ok":
                print(f"{'':6}{'':<{width}}  fix: {c.fix}")
        failed = sum(c.status == "fail" for c in checks)
        warned = sum(c.status == "warn" for c in checks)
        print(f"{failed} failed, {warned} warnings, {len(checks)} checks", file=sys.stderr)
    return 1 if any(c.status == "fail" for c in checks) else 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("doctor", help="check a node's configuration, keys, broker, peers and disk")
    s.add_argument("--config", default="node.toml")
    passphrase.add_args(s)
    s.add_argument("--timeout", type=float, default=3.0, help="seconds per network check")
    s.add_argument("--json", action="store_true", help="the checks as a JSON list")
    s.set_defaults(fn=cmd_doctor)
