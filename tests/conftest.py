"""Fixtures that start real parts: a Mosquitto broker and node processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshhealth.bench.procs import MOSQUITTO, BrokerProcess
from meshhealth.bench.procs import NodeProcess as BaseNodeProcess
from meshhealth.cli.demo import setup_network
from meshhealth.config import NodeConfig


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[BrokerProcess]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    m = BrokerProcess(tmp_path / "mosquitto")  # Mosquitto: the fixture skips without it
    m.start()
    yield m
    m.stop()


class NodeProcess(BaseNodeProcess):
    """A real ``meshhealth node run`` process, remembering its config."""

    def __init__(self, cfg: NodeConfig, log: Path) -> None:
        super().__init__(cfg.base / "node.toml", log, cfg.api.port)
        self.cfg = cfg


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
