"""The command line as a newcomer uses it: real processes, real files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import lmdb
import pytest

from meshhealth.config import NodeConfig
from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.errors import ConfigError, KeyFileError


def mh(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshhealth.cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_command() -> None:
    out = mh("--help").stdout
    for cmd in ("init", "network", "patient", "node", "device", "chain", "demo", "bench", "doctor"):
        assert cmd in out
    assert "enroll-device" in mh("patient", "--help").stdout


def test_key_files_are_private_and_sealable(tmp_path: Path) -> None:
    ident = Identity.generate("patient")
    save_identity(ident, tmp_path / "plain.key")
    save_identity(ident, tmp_path / "sealed.key", passphrase="correct horse")
    for name in ("plain.key", "sealed.key"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert "seed" not in tomllib.loads((tmp_path / "sealed.key").read_text())
    assert load_identity(tmp_path / "sealed.key", passphrase="correct horse").public == ident.public
    with pytest.raises(KeyFileError, match="wrong passphrase"):
        load_identity(tmp_path / "sealed.key", passphrase="wrong")
    with pytest.raises(KeyFileError, match="already exists"):
        save_identity(ident, tmp_path / "plain.key")
    with pytest.raises(KeyFileError, match="not found"):
        load_identity(tmp_path / "missing.key")


def test_bad_configuration_names_the_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text("[ingest]\nblock_interval_s = 0\n")
    with pytest.raises(ConfigError, match="block_interval_s"):
        NodeConfig.load(cfg)
    cfg.write_text("[ingest]\nmax_entrys = 5\n")
    with pytest.raises(ConfigError, match=r"unknown key ingest\.max_entrys"):
        NodeConfig.load(cfg)
    cfg.write_text("[api]\nport = 'eighty'\n")
    with pytest.raises(ConfigError, match=r"api\.port must be a int"):
        NodeConfig.load(cfg)
    r = mh("node", "run", "--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "meshhealth init" in r.stderr


def test_init_network_patient_device_keygen(tmp_path: Path) -> None:
    r = mh("init", str(tmp_path / "n1"), "--api-port", "18701")
    assert r.returncode == 0, r.stderr
    cfg = NodeConfig.load(tmp_path / "n1" / "node.toml")
    assert cfg.api.port == 18701 and cfg.mqtt.broker == ""
    r = mh("init", str(tmp_path / "n2"), "--genesis", str(tmp_path / "n1" / "genesis.toml"))
    assert r.returncode == 0, r.stderr
    keys = [tomllib.loads((tmp_path / n / "node.key").read_text())["public"] for n in ("n1", "n2")]
    r = mh(
        "network",
        "create",
        "--name",
        "clinic",
        "--authority",
        f"a={keys[0]}",
        "--authority",
        f"b={tmp_path / 'n2' / 'node.key'}",
        "--out",
        str(tmp_path / "g.toml"),
    )
    assert r.returncode == 0, r.stderr
    g = tomllib.loads((tmp_path / "g.toml").read_text())
    assert [a["key"] for a in g["authority"]] == keys
    assert (
        mh("patient", "new", "--out", str(tmp_path / "p.key"), "--streams", "hr,spo2").returncode
        == 0
    )
    assert len(tomllib.loads((tmp_path / "p.key").read_text())["keychains"]) == 2
    assert mh("device", "keygen", "--out", str(tmp_path / "d.key")).returncode == 0


@pytest.mark.integration
def test_enroll_device_against_a_running_node(tmp_path: Path, mosquitto, node_factory) -> None:  # type: ignore[no-untyped-def]
    node = node_factory(mosquitto.url)
    assert mh("patient", "new", "--out", str(tmp_path / "p.key")).returncode == 0
    assert mh("device", "keygen", "--out", str(tmp_path / "d.key")).returncode == 0

    def enroll(*args: str) -> subprocess.CompletedProcess[str]:
        return mh(
            "patient",
            "enroll-device",
            "--key",
            str(tmp_path / "p.key"),
            "--device",
            str(tmp_path / "d.key"),
            *args,
        )

    r = enroll(
        "--streams",
        "hr,temp",
        "--node",
        "http://127.0.0.1:9",
        "--node",
        node.url,
        "--out",
        str(tmp_path / "enroll.tx"),
    )
    assert r.returncode == 0, r.stderr  # the first node is down: it fails over
    assert node.status()["enrolled_devices"] == 1
    r = enroll("--streams", "glucose", "--node", node.url)
    assert r.returncode == 2 and "glucose" in r.stderr


@pytest.mark.integration
def test_demo_leaves_verifiable_data_and_verify_catches_tampering(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    r = mh("demo", "--duration", "6", "--data-dir", str(data), "--backfill", "120", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "readings/s" in r.stdout
    ok = mh("chain", "verify", "--data-dir", str(data))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok" in ok.stdout and " 0 readings" not in ok.stdout
    show = mh("chain", "show", "--data-dir", str(data))
    assert show.returncode == 0 and "height" in show.stdout
    # flip one byte of block 0's body in the node's LMDB store
    store = data / "node-1" / "data"
    env = lmdb.open(str(store), max_dbs=8)
    bodies = env.open_db(b"bodies")
    with env.begin(write=True) as txn:
        cur = txn.cursor(db=bodies)
        assert cur.first()  # height 0
        key, body = bytes(cur.key()), bytearray(cur.value())
        body[len(body) // 2] ^= 0x01
        txn.put(key, bytes(body), db=bodies)
    env.close()
    bad = mh("chain", "verify", "--data-dir", str(data))
    assert bad.returncode != 0
    assert "block 0" in bad.stdout and "FAIL" in bad.stdout


@pytest.mark.integration
def test_device_simulate_one_connection_per_device(tmp_path: Path, mosquitto, node_factory) -> None:  # type: ignore[no-untyped-def]
    import json

    node = node_factory(mosquitto.url)
    r = mh(
        "device",
        "simulate",
        "--broker",
        mosquitto.url,
        "--node",
        node.url,
        "--genesis",
        str(node.cfg.genesis_path),
        "--patients",
        "2",
        "--devices",
        "2",
        "--streams",
        "hr,temp,bp",
        "--backfill",
        "600",
        "--duration",
        "0",
        "--no-gateway",
        "--state-dir",
        str(tmp_path / "sim"),
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["connects"] == 4  # one MQTT connection per device
    assert stats["outbox"] == 0 and stats["produced"] > 0
    assert node.status()["ingest"]["readings_committed"] == stats["produced"]
    assert len(list((tmp_path / "sim" / "patients").glob("*.key"))) == 2
