"""Issue 11 #20: a taken embedded-broker port is one line naming the fix (exit 75), ``init``
steers around it, and the demo stops its nodes without "mqtt connection lost"."""

from __future__ import annotations

import socket
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from test_cli import mh

from meshhealth.cli.demo import setup_network
from meshhealth.cli.doctor import port_free


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else listens on (as a local Mosquitto holds 1883)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.integration
def test_node_run_on_a_taken_embedded_port_is_one_line_naming_the_fix(
    tmp_path: Path, taken_port: int
) -> None:
    cfg = setup_network(tmp_path / "net", 1, broker="")[0]
    cfg = replace(cfg, mqtt=replace(cfg.mqtt, embedded_port=taken_port))
    (cfg.base / "node.toml").write_text(cfg.dumps())
    r = mh("node", "run", "--config", str(cfg.base / "node.toml"), timeout=60)
    assert r.returncode == 75, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: embedded MQTT port 127.0.0.1:{taken_port} is in use")
    assert "set mqtt.embedded_port" in lines[0] and "mqtt.broker" in lines[0]


def test_init_picks_a_free_embedded_port_when_the_default_is_taken(
    tmp_path: Path, taken_port: int
) -> None:
    r = mh("init", str(tmp_path / "n"), "--embedded-port", str(taken_port))
    assert r.returncode == 0, r.stderr
    port = tomllib.loads((tmp_path / "n" / "node.toml").read_text())["mqtt"]["embedded_port"]
    assert port != taken_port and port_free("127.0.0.1", port)
    assert f"port {taken_port} is in use" in r.stderr and "mqtt.broker" in r.stderr
    # a free one is kept as asked
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    r = mh("init", str(tmp_path / "m"), "--embedded-port", str(free))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    kept = tomllib.loads((tmp_path / "m" / "node.toml").read_text())["mqtt"]["embedded_port"]
    assert kept == free


@pytest.mark.integration
def test_demo_stops_its_nodes_without_connection_lost_warnings(tmp_path: Path) -> None:
    r = mh("demo", "--duration", "1", "--data-dir", str(tmp_path / "d"), "--backfill", "10")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stopped" in r.stdout
    assert "connection lost" not in r.stderr and "Traceback" not in r.stderr, r.stderr
