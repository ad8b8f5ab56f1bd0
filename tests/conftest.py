"""Fixtures that start real parts: a Mosquitto broker and node processes on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshhealth.cli.demo import setup_network
from meshhealth.cli.netutil import free_port
from meshhealth.config import NodeConfig

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class Mosquitto:
    """A private Mosquitto on a free loopback port; ``restart()`` keeps the port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 200000\n"
            "max_inflight_messages 200\n"
            "log_dest none\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    if not os.path.exists(MOSQUITTO):
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    m = Mosquitto(tmp_path / "mosquitto")
    m.start()
    yield m
    m.stop()


class NodeProcess:
    """A real ``meshhealth node run`` process."""

    def __init__(self, cfg: NodeConfig, log: Path) -> None:
        self.cfg = cfg
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.api.port}"

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshhealth.cli.main", "--log-level", "INFO", "node", "run",
                 "--config", str(self.cfg.base / "node.toml")],
                stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-2000:]}")
            try:
                if self.status()["mqtt_connected"]:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"node did not come up: {self.log.read_text()[-2000:]}")

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/v1/status", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    nodes: list[NodeProcess] = []

    def make(broker_url: str, **ingest: Any) -> NodeProcess:
        from dataclasses import replace

        cfg = setup_network(tmp_path / f"net{len(nodes)}", 1, broker=broker_url)[0]
        if ingest:
            cfg = replace(cfg, ingest=replace(cfg.ingest, **ingest))
            (cfg.base / "node.toml").write_text(cfg.dumps())
        n = NodeProcess(cfg, tmp_path / f"node{len(nodes)}.log")
        nodes.append(n)
        n.start()
        return n

    yield make
    for n in nodes:
        n.stop()
