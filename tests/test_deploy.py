"""The secure deployment in deploy/: certificates, the shipped Mosquitto TLS/ACL
configuration, TLS between nodes, the systemd units and the local cluster script.

Everything runs on loopback: a real Mosquitto with the shipped configuration (only
its directories, ports and user substituted), real node processes, real openssl.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest

from device_agents.simulate import Simulation
from meshhealth.bench.procs import MOSQUITTO, NodeProcess, wait_port
from meshhealth.cli.demo import setup_network
from meshhealth.cli.netutil import free_port
from meshhealth.config import Genesis, NodeConfig
from meshhealth.crypto.keys import Identity
from meshhealth.errors import ConfigError
from meshhealth.ingest.mqtt import MqttIngest
from meshhealth.net.tls import client_context, node_tls

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
needs_mosquitto = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (deploy/dev-setup.sh installs it)"
)


def certs(pki: Path, *args: str) -> str:
    out = subprocess.run(
        ["bash", str(DEPLOY / "certs.sh"), "-d", str(pki), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@dataclass(frozen=True)
class Pki:
    """A site CA with what the tests need, and a second, unrelated CA."""

    dir: Path
    rogue: Path
    dev_a: str  # device ids (the CN of their certificates)
    dev_b: str

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def pair(self, kind: str, name: str, *, rogue: bool = False) -> tuple[Path, Path]:
        base = (self.rogue if rogue else self.dir) / kind / name
        return base.with_suffix(".crt"), base.with_suffix(".key")

    def client(self, kind: str, name: str, *, rogue: bool = False) -> ssl.SSLContext:
        cert, key = self.pair(kind, name, rogue=rogue)
        return client_context(self.ca, cert, key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    root = tmp_path_factory.mktemp("pki")
    keyfile = root / "dev-a.key"
    out = subprocess.run(
        [sys.executable, "-m", "meshhealth.cli.main", "device", "keygen", "--out", str(keyfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    dev_a = tomllib.loads(keyfile.read_text())["public"]
    dev_b = Identity.generate("device").public.hex()
    site, rogue = root / "site", root / "rogue"
    certs(site, "ca")
    certs(site, "broker", "localhost", "127.0.0.1")
    for name in ("n1", "n2"):
        certs(site, "node", name, "127.0.0.1", "localhost")
    certs(site, "device", str(keyfile), dev_b)  # from the key file, and as hex
    certs(site, "gateway", "gw")  # no device list: may publish for any device
    certs(rogue, "ca")
    certs(rogue, "device", dev_a)  # the same CN, from a CA the broker does not know
    certs(rogue, "node", "n3", "127.0.0.1", "localhost")
    return Pki(site, rogue, dev_a, dev_b)


# --- certs.sh -------------------------------------------------------------------------


@needs_openssl
def test_certs_sh_issues_private_keys_and_is_idempotent(pki: Pki) -> None:
    for key in [pki.dir / "ca.key", *pki.dir.glob("*/*.key")]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    node_crt, _ = pki.pair("nodes", "n1")
    text = subprocess.run(
        [str(OPENSSL), "x509", "-in", str(node_crt), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "CN = mh-node-n1" in text or "CN=mh-node-n1" in text
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    assert (pki.dir / "devices" / f"{pki.dev_a}.crt").exists()  # CN read from the key file
    verify = subprocess.run(
        [str(OPENSSL), "verify", "-CAfile", str(pki.ca), str(node_crt)],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr

    before = {p: p.read_bytes() for p in pki.dir.rglob("*") if p.is_file()}
    again = certs(pki.dir, "node", "n1", "127.0.0.1", "localhost")
    assert "kept" in again
    assert {p: p.read_bytes() for p in pki.dir.rglob("*") if p.is_file()} == before

    acl = (pki.dir / "meshhealth.acl").read_text()
    for name in ("n1", "n2"):
        assert f"user mh-node-{name}\ntopic deny mh/v1/readings/mh-node-{name}\n" in acl
    assert "user mh-gw-gw\n" in acl

    bad = subprocess.run(
        ["bash", str(DEPLOY / "certs.sh"), "-d", str(pki.dir), "device", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "neither a 64-hex device id nor a key file" in bad.stderr
    usage = subprocess.run(["bash", str(DEPLOY / "certs.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "node NAME HOST" in usage.stderr


# --- the shipped Mosquitto configuration ------------------------------------------------


def mosquitto_password(user: str, password: str) -> str:
    """A Mosquitto 2 password-file line (PBKDF2-SHA512, what mosquitto_passwd writes)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    b64 = base64.b64encode
    return f"{user}:$7$101${b64(salt).decode()}${b64(digest).decode()}\n"


def shipped_broker_conf(pki_dir: Path, state: Path, cert_port: int, pw_port: int) -> str:
    """deploy/mosquitto/mosquitto.conf with only what its header says to substitute."""
    text = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    subs = [
        (r"/etc/mosquitto/meshhealth", str(pki_dir)),
        (r"/var/lib/mosquitto", str(state)),
        (r"(?m)^listener 8883$", f"listener {cert_port} 127.0.0.1"),
        (r"(?m)^listener 8884$", f"listener {pw_port} 127.0.0.1"),
        (r"(?m)^user mosquitto$", f"user {getpass.getuser()}"),
    ]
    for pattern, value in subs:
        text, n = re.subn(pattern, value, text)
        assert n >= 1, f"the shipped mosquitto.conf no longer has {pattern!r}"
    return text


@dataclass
class TlsBroker:
    cert_port: int
    pw_port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.cert_port}"


@pytest.fixture
def tls_broker(pki: Pki, tmp_path: Path) -> Iterator[TlsBroker]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (deploy/dev-setup.sh installs it)")
    (pki.dir / "passwd").write_text(mosquitto_password(pki.dev_b, "correct horse"))
    state = tmp_path / "mosquitto-state"
    state.mkdir()
    cert_port, pw_port = free_port(), free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(shipped_broker_conf(pki.dir, state, cert_port, pw_port))
    log = open(tmp_path / "mosquitto.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(cert_port)
        wait_port(pw_port)
        yield TlsBroker(cert_port, pw_port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def mqtt_client(port: int, tls: ssl.SSLContext | None, **kw: Any) -> aiomqtt.Client:
    return aiomqtt.Client("127.0.0.1", port, tls_context=tls, timeout=5, **kw)


@contextlib.asynccontextmanager
async def node_subscriber(
    broker: TlsBroker, tls: ssl.SSLContext, topic: str
) -> AsyncIterator[list[tuple[str, bytes]]]:
    """The node's own MQTT client (gmqtt over TLS with its certificate), collecting."""
    got: list[tuple[str, bytes]] = []
    ingest = MqttIngest(
        f"test-node-{os.urandom(3).hex()}", topic, lambda t, p: got.append((t, p)), tls=tls
    )
    await ingest.start(broker.url)
    await asyncio.wait_for(ingest.connected.wait(), 10)
    await asyncio.sleep(0.3)  # the SUBACK
    try:
        yield got
    finally:
        await ingest.stop()


async def wait_for(cond: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_device_publishes_on_its_own_topic_and_on_no_other(
    pki: Pki, tls_broker: TlsBroker
) -> None:
    a, b = pki.dev_a, pki.dev_b
    shared = "$share/mh/mh/v1/readings/+"
    async with (
        node_subscriber(tls_broker, pki.client("nodes", "n1"), shared) as got,
        mqtt_client(tls_broker.cert_port, pki.client("devices", a)) as dev,
    ):
        await dev.subscribe(f"mh/v1/receipts/{a}", qos=1)  # would see a forged receipt
        await asyncio.sleep(0.2)
        await dev.publish(f"mh/v1/readings/{a}", b"mine-1", qos=1)
        await dev.publish(f"mh/v1/readings/{b}", b"forged-for-b", qos=1)
        await dev.publish("mh/v1/receipts/" + a, b"forged-receipt", qos=1)
        await dev.publish(f"mh/v1/readings/{a}", b"mine-2", qos=1)
        # one client's messages are routed in order: once mine-2 is here, the denied
        # ones would have been delivered before it
        await wait_for(lambda: any(p == b"mine-2" for _, p in got), 10)
        with pytest.raises(TimeoutError):  # the receipt was dropped, not delivered
            await asyncio.wait_for(anext(aiter(dev.messages)), 1.0)
    assert got == [(f"mh/v1/readings/{a}", b"mine-1"), (f"mh/v1/readings/{a}", b"mine-2")]


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_node_publishes_receipts_but_no_readings_and_devices_read_their_own(
    pki: Pki, tls_broker: TlsBroker
) -> None:
    a, b = pki.dev_a, pki.dev_b
    port = tls_broker.cert_port
    async with (
        node_subscriber(tls_broker, pki.client("nodes", "n2"), "mh/v1/readings/+") as got,
        mqtt_client(port, pki.client("devices", a)) as dev,
        mqtt_client(port, pki.client("nodes", "n1")) as node,
    ):
        await dev.subscribe("mh/v1/receipts/+", qos=1)  # asks for all; gets its own
        await asyncio.sleep(0.2)
        await node.publish(f"mh/v1/readings/{a}", b"node-forged", qos=1)
        await node.publish("mh/v1/readings/mh-node-n1", b"node-own-name", qos=1)
        await node.publish(f"mh/v1/receipts/{b}", b"receipt-b", qos=1)
        await node.publish(f"mh/v1/receipts/{a}", b"receipt-a", qos=1)
        msg = await asyncio.wait_for(anext(aiter(dev.messages)), 10)
        assert (str(msg.topic), msg.payload) == (f"mh/v1/receipts/{a}", b"receipt-a")
        # the node's publishes were routed (or dropped) before their PUBACKs: a reading
        # the device sends now arrives after anything they let through
        await dev.publish(f"mh/v1/readings/{a}", b"marker", qos=1)
        await wait_for(lambda: any(p == b"marker" for _, p in got), 10)
    assert got == [(f"mh/v1/readings/{a}", b"marker")]


def _utf8(s: str) -> bytes:
    return len(s.encode()).to_bytes(2, "big") + s.encode()


async def mqtt_connect(
    port: int, tls: ssl.SSLContext | None, username: str = "", password: str = ""
) -> str:
    """One bare MQTT 3.1.1 CONNECT: "accepted", or why not (TLS alert, reset, CONNACK code).

    Written out by hand so that every refused attempt closes its socket, whatever
    stage the broker refuses it at (a TLS 1.3 server checks the client's certificate
    after the client thinks the handshake is done).
    """
    flags = 0x02 | (0x80 if username else 0) | (0x40 if password else 0)
    body = _utf8("MQTT") + bytes([4, flags]) + (30).to_bytes(2, "big")
    body += _utf8(f"probe-{os.urandom(3).hex()}")
    body += (_utf8(username) if username else b"") + (_utf8(password) if password else b"")
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls), 5
        )
        writer.write(bytes([0x10, len(body)]) + body)
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 5)
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
    return "accepted" if connack[:2] == b"\x20\x02" and connack[3] == 0 else f"CONNACK {connack!r}"


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(90)
async def test_clients_without_valid_credentials_cannot_connect(
    pki: Pki, tls_broker: TlsBroker
) -> None:
    port, a = tls_broker.cert_port, pki.dev_a
    # the control: a device with a certificate of the site CA gets in
    assert await mqtt_connect(port, pki.client("devices", a)) == "accepted"
    ca_only = client_context(pki.ca)
    rogue = client_context(pki.ca, *pki.pair("devices", a, rogue=True))
    pw = tls_broker.pw_port
    outcomes = {
        "no certificate": await mqtt_connect(port, ca_only),
        "another CA's certificate": await mqtt_connect(port, rogue),
        "no TLS at all": await mqtt_connect(port, None),
        "not trusting the broker": await mqtt_connect(port, ssl.create_default_context()),
        "password listener, no password": await mqtt_connect(pw, ca_only),
        "password listener, wrong password": await mqtt_connect(pw, ca_only, pki.dev_b, "x"),
        "password listener, no TLS": await mqtt_connect(pw, None, pki.dev_b, "correct horse"),
    }
    assert "accepted" not in outcomes.values(), outcomes
    assert await mqtt_connect(pw, ca_only, pki.dev_b, "correct horse") == "accepted"
    # the optional password path: a device whose user name is its id, over TLS
    async with (
        node_subscriber(tls_broker, pki.client("nodes", "n1"), "mh/v1/readings/+") as got,
        mqtt_client(
            tls_broker.pw_port, ca_only, username=pki.dev_b, password="correct horse"
        ) as dev,
    ):
        await dev.publish(f"mh/v1/readings/{a}", b"not-its-own", qos=1)
        await dev.publish(f"mh/v1/readings/{pki.dev_b}", b"its-own", qos=1)
        await wait_for(lambda: bool(got), 10)
    assert got == [(f"mh/v1/readings/{pki.dev_b}", b"its-own")]


# --- TLS between nodes ------------------------------------------------------------------


class TlsNode(NodeProcess):
    """A real node process serving HTTPS; we check it against the site CA."""

    def __init__(self, cfg: NodeConfig, log: Path, ca: Path) -> None:
        super().__init__(cfg.base / "node.toml", log, cfg.api.port)
        self.cfg = cfg
        self.ctx = ssl.create_default_context(cafile=str(ca))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/v1/status", timeout=5, context=self.ctx) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


def with_tls(
    cfg: NodeConfig, pair: tuple[Path, Path], ca: Path, *, mqtt: bool, **gossip: Any
) -> NodeConfig:
    cert, key = (str(p) for p in pair)
    peers = [u.replace("http://", "https://") for u in cfg.gossip.peers]
    m = cfg.mqtt
    cfg = replace(
        cfg,
        tls=replace(cfg.tls, cert_file=cert, key_file=key, ca_file=str(ca)),
        gossip=replace(cfg.gossip, peers=peers, **gossip),
        mqtt=replace(m, ca_file=str(ca), cert_file=cert, key_file=key)
        if mqtt
        else replace(m, broker="", shared_group=""),
    )
    (cfg.base / "node.toml").write_text(cfg.dumps())
    return NodeConfig.load(cfg.base / "node.toml")


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_tls_nodes_ingest_gossip_and_refuse_a_peer_of_another_ca(
    pki: Pki, tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """Devices -> Mosquitto (TLS, ACL) -> two nodes (MQTT client certificates) -> gossip
    over WSS, each side checked against the CA; a third authority whose certificate
    comes from another CA is refused by both, in both directions."""
    cfgs = setup_network(tmp_path / "net", 3, broker=tls_broker.url, shared_group="mh")
    cfgs = [
        with_tls(cfgs[0], pki.pair("nodes", "n1"), pki.ca, mqtt=True, startup_sync_s=3.0),
        with_tls(cfgs[1], pki.pair("nodes", "n2"), pki.ca, mqtt=True, startup_sync_s=3.0),
        with_tls(
            cfgs[2], pki.pair("nodes", "n3", rogue=True), pki.ca, mqtt=False, startup_sync_s=1.0
        ),
    ]
    cas = [pki.ca, pki.ca, pki.rogue / "ca.crt"]  # how the test reaches each one's API
    nodes = [
        TlsNode(c, tmp_path / f"node{i}.log", ca)
        for i, (c, ca) in enumerate(zip(cfgs, cas, strict=True))
    ]
    try:
        for nd in nodes:
            nd.start(until="api")
        for nd in nodes:
            nd.wait_ingesting()
        good, impostor = nodes[:2], nodes[2]
        g = Genesis.load(cfgs[0].genesis_path)
        sim = Simulation(
            broker_url=tls_broker.url,
            node_urls=[n.url for n in good],
            network=g.network_id,
            authorities={a.key for a in g.authorities},
            state_dir=tmp_path / "sim",
            patients=3,
            streams=("hr",),
            interval_s=1.0,
            samples_per_reading=1,
            backfill_s=20,
            mqtt_tls=pki.client("gateways", "gw"),
            http_tls=client_context(pki.ca),
        )
        try:
            await sim.enroll()
            drained = await asyncio.wait_for(
                sim.run(asyncio.Event(), duration_s=0, drain_timeout=60), 120
            )
            stats = sim.statistics()
        finally:
            sim.close()
        assert drained and stats["acked"] == stats["produced"] > 0, stats

        # the two nodes converge over WSS on every chain either wrote
        deadline = time.monotonic() + 60
        while True:
            heads = [await asyncio.to_thread(n.heads) for n in good]
            if heads[0] == heads[1] and len(heads[0]) == 2:
                break
            assert time.monotonic() < deadline, heads
            await asyncio.sleep(0.3)
        committed = sum(n.status()["ingest"]["readings_committed"] for n in good)
        assert committed >= stats["produced"]

        gossip = [n.status()["gossip"] for n in nodes]
        assert len(gossip[0]["connections"]) == len(gossip[1]["connections"]) == 1, gossip
        assert gossip[2]["connections"] == [], gossip[2]  # nobody took the impostor
        # each good node refused the impostor's server certificate when dialing it...
        assert gossip[0].get("tls_refused", 0) >= 1 and gossip[1].get("tls_refused", 0) >= 1
        # ...and its client certificate when it dialed them: the TLS handshake failed,
        # so the signed gossip handshake never started
        assert all(s.get("handshake_refused", 0) == 0 for s in gossip[:2]), gossip
        assert "certificate" in (tmp_path / "node0.log").read_text()
        await check_https_api(good[0], pki)
        await check_cli_over_https(good[0], pki, next((tmp_path / "sim" / "patients").glob("*")))
        assert impostor.proc is not None and impostor.proc.poll() is None
    finally:
        for n in nodes:
            n.stop()


async def check_https_api(node: TlsNode, pki: Pki) -> None:
    """HTTPS only, checked against the CA; /v1/gossip wants a node certificate."""
    host_port = node.url.removeprefix("https://")
    with pytest.raises(OSError):  # plain HTTP on the TLS port
        urllib.request.urlopen(f"http://{host_port}/v1/status", timeout=5)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{node.url}/v1/status", timeout=5)  # system roots only
    ca_only = client_context(pki.ca)
    connector = aiohttp.TCPConnector(ssl=ca_only)
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.get(f"{node.url}/v1/status") as r:
            assert r.status == 200
        with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
            await s.ws_connect(f"{node.url}/v1/gossip")
        assert exc.value.status == 403
    # the CLI trusts the CA through SSL_CERT_FILE
    env = dict(os.environ, SSL_CERT_FILE=str(pki.ca))
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshhealth.cli.main", "network", "status", "--node", node.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr


async def check_cli_over_https(node: TlsNode, pki: Pki, patient_key: Path) -> None:
    """``meshhealth --ca`` reaches a TLS node; ``doctor`` sees its TLS, API and broker."""

    def mh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshhealth.cli.main", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"},
        )

    for args in (
        ["network", "status", "--node", node.url],
        ["patient", "grants", "--key", str(patient_key), "--node", node.url],
    ):
        without = await asyncio.to_thread(mh, *args)
        assert without.returncode != 0  # the system roots do not know our CA
        out = await asyncio.to_thread(mh, "--ca", str(pki.ca), *args)
        assert out.returncode == 0, out.stdout + out.stderr

    conf = node.cfg.base / "node.toml"
    out = await asyncio.to_thread(mh, "doctor", "--config", str(conf), "--json")
    checks = {c["name"]: c for c in json.loads(out.stdout)}
    assert checks["tls"]["status"] == "ok" and "HTTPS" in checks["tls"]["detail"], checks
    assert "client certificate" in checks["tls"]["detail"]
    assert checks["api"]["status"] == "ok" and "running" in checks["api"]["detail"], checks
    assert checks["broker"]["status"] == "ok", checks


# --- configuration ---------------------------------------------------------------------


def test_tls_settings_are_checked_with_the_fix_named(tmp_path: Path) -> None:
    def load(doc: dict[str, Any]) -> NodeConfig:
        return NodeConfig.from_doc(doc, base=tmp_path, source="node.toml")

    with pytest.raises(ConfigError, match=r"tls.cert_file and tls.key_file.*certs.sh"):
        load({"tls": {"cert_file": "node.crt"}})
    with pytest.raises(ConfigError, match=r"mqtt.broker to mqtts://"):
        load({"mqtt": {"broker": "mqtt://127.0.0.1:1883", "ca_file": "ca.crt"}})
    with pytest.raises(ConfigError, match=r"mqtt.cert_file and mqtt.key_file"):
        load({"mqtt": {"broker": "mqtts://b:8883", "cert_file": "n.crt"}})
    with pytest.raises(ConfigError, match=r"advertise_url must be https://"):
        load(
            {
                "tls": {"cert_file": "n.crt", "key_file": "n.key"},
                "gossip": {"advertise_url": "http://10.0.0.1:8700"},
            }
        )
    with pytest.raises(ConfigError, match=r"tls.bogus"):
        load({"tls": {"bogus": ""}})
    cfg = load({"tls": {"cert_file": "n.crt", "key_file": "n.key", "ca_file": "ca.crt"}})
    assert cfg.api_scheme == "https"
    assert NodeConfig.from_doc(tomllib.loads(cfg.dumps()), base=tmp_path).tls == cfg.tls
    with pytest.raises(ConfigError, match=r"tls.cert_file/tls.key_file: .*n.crt not found"):
        node_tls(cfg)


@needs_openssl
def test_a_key_that_is_not_the_certificates_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    cert, _ = pki.pair("nodes", "n1")
    _, other_key = pki.pair("nodes", "n2")
    doc = {"tls": {"cert_file": str(cert), "key_file": str(other_key), "ca_file": str(pki.ca)}}
    with pytest.raises(ConfigError, match="is the key the certificate's"):
        node_tls(NodeConfig.from_doc(doc, base=tmp_path))
    doc["tls"]["key_file"] = str(pki.pair("nodes", "n1")[1])
    doc["mqtt"] = {"broker": "mqtts://127.0.0.1:8883", "ca_file": str(tmp_path / "none.crt")}
    with pytest.raises(ConfigError, match=r"mqtt.ca_file: .*none.crt not found"):
        node_tls(NodeConfig.from_doc(doc, base=tmp_path))


# --- systemd ---------------------------------------------------------------------------

UNITS = ("meshhealth-node.service", "meshhealth-gateway.service")
HARDENING = (
    "DynamicUser=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "NoNewPrivileges=yes",
    "Restart=on-failure",
    "SystemCallFilter=@system-service",
    "MemoryDenyWriteExecute=yes",
)


def analyzer() -> str:
    """systemd-analyze, if it can verify a trivial unit here (else the test skips)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


def test_systemd_units_are_sandboxed_and_verify(tmp_path: Path) -> None:
    for name in UNITS:
        text = (DEPLOY / "systemd" / name).read_text()
        for line in (*HARDENING, "StateDirectory=meshhealth"):
            assert re.search(rf"(?m)^{re.escape(line)}", text), (name, line)
    tool = analyzer()
    probe = tmp_path / "probe" / "mh-probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nExecStart=/bin/true\n")
    ok = subprocess.run([tool, "verify", str(probe)], capture_output=True, text=True, timeout=60)
    if ok.returncode != 0:
        pytest.skip(f"systemd-analyze verify does not work here: {ok.stderr.strip()[:200]}")
    exe = shutil.which("meshhealth") or str(Path(sys.executable).with_name("meshhealth"))
    assert Path(exe).exists(), "the meshhealth entry point is not installed (pip install -e .)"
    for name in UNITS:
        unit = tmp_path / name  # the unit names its binary in /opt/meshhealth (see its header)
        text = (DEPLOY / "systemd" / name).read_text()
        assert "/opt/meshhealth/bin/meshhealth" in text
        unit.write_text(text.replace("/opt/meshhealth/bin/meshhealth", exe))
        out = subprocess.run(
            [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and not out.stderr.strip(), (name, out.stderr)
        sec = subprocess.run(
            [tool, "security", "--offline=true", str(unit)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        score = re.search(r"Overall exposure level for \S+: ([0-9.]+)", sec.stdout)
        if sec.returncode == 0 and score:  # systemd >= 250
            assert float(score.group(1)) <= 2.0, sec.stdout[-2000:]


MDWE_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.integration
@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_node_runs_without_writable_executable_memory(
    tmp_path: Path, pki: Pki, tls_broker: TlsBroker
) -> None:
    """What MemoryDenyWriteExecute=yes in the units relies on, checked with the kernel's
    own switch (Linux >= 6.3): a node over TLS, verifier processes included, ingests."""
    wx = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # a writable, executable page
    probe = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", wx],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert "Permission denied" in probe.stderr  # the switch works: W+X memory is refused
    (cfg,) = setup_network(tmp_path / "net", 1, broker=tls_broker.url)
    cfg = with_tls(cfg, pki.pair("nodes", "n1"), pki.ca, mqtt=True)
    log = tmp_path / "node.log"

    class MdweNode(TlsNode):
        def start(self, timeout: float = 30.0, *, until: str = "ingest") -> None:
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [
                        *(sys.executable, "-c", MDWE_EXEC, sys.executable, "-m"),
                        *("meshhealth.cli.main", "node", "run", "--config", str(self.config_path)),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, log.read_text()[-2000:]
                with contextlib.suppress(OSError):
                    if self.status()["mqtt_connected"]:
                        return
                time.sleep(0.1)
            raise TimeoutError(log.read_text()[-2000:])

    node = MdweNode(cfg, log, pki.ca)
    node.start()
    try:
        assert node.proc is not None and node.status()["pid"] == node.proc.pid  # exec'd
        # the gateway as its unit runs it: the CLI, TLS to the broker with its certificate
        gw_cert, gw_key = pki.pair("gateways", "gw")
        sim = await asyncio.to_thread(
            subprocess.run,
            [
                *(sys.executable, "-m", "meshhealth.cli.main", "device", "simulate"),
                *("--broker", tls_broker.url, "--node", node.url),
                *("--genesis", str(cfg.genesis_path), "--ca", str(pki.ca)),
                *("--cert", str(gw_cert), "--key", str(gw_key)),
                *("--patients", "2", "--streams", "hr", "--interval", "1"),
                *("--samples-per-reading", "1", "--backfill", "10", "--duration", "0"),
                *("--drain-timeout", "60", "--state-dir", str(tmp_path / "sim")),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert sim.returncode == 0, sim.stdout + sim.stderr  # 0: every reading receipted
        stats = json.loads(sim.stdout.strip().splitlines()[-1])
        assert stats["acked"] == stats["produced"] > 0, stats
        assert node.status()["ingest"]["readings_committed"] >= stats["produced"]
    finally:
        node.stop()


# --- cluster.sh ------------------------------------------------------------------------


def running(pid: int) -> bool:
    """Alive and not a zombie (a node outlives cluster.sh, so nobody may reap it here)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def cluster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / "cluster.sh"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHON=sys.executable),
    )


@needs_openssl
@pytest.mark.integration
@pytest.mark.timeout(240)
def test_cluster_sh_starts_three_tls_nodes_and_stops_exactly_them(tmp_path: Path) -> None:
    root = tmp_path / "cluster"
    out = cluster("--tls", "3", str(root))
    pidfile = root / "cluster.pids"
    rows = [line.split() for line in pidfile.read_text().splitlines()] if pidfile.exists() else []
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert len(rows) == 3
        pids = [int(r[0]) for r in rows]
        assert all(running(p) for p in pids)
        ctx = ssl.create_default_context(cafile=str(root / "pki" / "ca.crt"))
        for _, name, url in rows:
            assert url.startswith("https://127.0.0.1:") and url in out.stdout
            deadline = time.monotonic() + 30
            while True:  # every node finds its two peers over WSS
                with urllib.request.urlopen(f"{url}/v1/status", timeout=5, context=ctx) as r:
                    peers = json.loads(r.read())["gossip"]["connections"]
                if len(peers) == 2:
                    break
                assert time.monotonic() < deadline, (name, peers)
                time.sleep(0.3)
        again = cluster("3", str(root))
        assert again.returncode == 2 and "still runs" in again.stderr

        # a PID file naming a process that is not one of our nodes: stop leaves it alone
        stop = cluster("stop", str(root))
        assert stop.returncode == 0, stop.stderr
        assert stop.stdout.count("stopped") == 3
        deadline = time.monotonic() + 10
        while any(running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(running(p) for p in pids)
        assert not pidfile.exists()
    finally:
        for r in rows:  # only if the test failed half-way: our own nodes, by PID
            with contextlib.suppress(ProcessLookupError, ValueError):
                if running(int(r[0])):
                    os.kill(int(r[0]), 15)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        pidfile.write_text(f"{bystander.pid} node-1 https://127.0.0.1:1\n")
        stop = cluster("stop", str(root))
        assert stop.returncode == 0 and "is not running" in stop.stdout
        assert bystander.poll() is None  # not one of ours: left alone
    finally:
        bystander.kill()
        bystander.wait(5)


def test_device_simulate_refuses_a_client_certificate_without_mqtts(tmp_path: Path) -> None:
    (cfg,) = setup_network(tmp_path / "net", 1)
    out = subprocess.run(
        [
            *(sys.executable, "-m", "meshhealth.cli.main", "device", "simulate"),
            *("--broker", "mqtt://127.0.0.1:1", "--node", "https://127.0.0.1:1"),
            *("--genesis", str(cfg.genesis_path), "--cert", "gw.crt", "--key", "gw.key"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--cert needs an mqtts:// --broker" in out.stderr
