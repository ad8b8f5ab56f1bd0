"""Issue 11 #19: a node's worker processes (verifiers, their forkserver, the resource
tracker) die with the node, whether it is killed with ``kill -9`` or stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from meshhealth.bench.procs import NodeProcess, tree_pids
from meshhealth.cli.demo import setup_network

pytestmark = pytest.mark.integration


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], fields[19]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def alive(procs: dict[int, str]) -> list[str]:
    """The processes of ``procs`` (pid -> start time) still running (a zombie is gone)."""
    out = []
    for pid, started in procs.items():
        st = _stat(pid)
        if st is not None and st[1] == started and st[0] != "Z":
            out.append(f"{pid} {_cmdline(pid)[:120]}")
    return out


def descendants(pid: int) -> dict[int, str]:
    out = {}
    for p in tree_pids(pid):
        st = _stat(p)
        if p != pid and st is not None:
            out[p] = st[1]
    return out


def eventually_gone(procs: dict[int, str], timeout: float = 5.0) -> list[str]:
    """What is still running after ``timeout``; that is then killed (it is ours), so a
    failing run leaves no orphans either."""
    deadline = time.monotonic() + timeout
    while (left := alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for line in left:
        with contextlib.suppress(OSError):
            os.kill(int(line.split()[0]), signal.SIGKILL)
    return left


@pytest.fixture
def node(tmp_path: Path) -> Callable[[], NodeProcess]:
    """A fresh one-node network with two verifier workers and its embedded broker."""
    cfg = setup_network(tmp_path / "net", 1, broker="")[0]
    cfg = replace(
        cfg,
        ingest=replace(cfg.ingest, verify_workers=2),
        gossip=replace(cfg.gossip, startup_sync_s=0.2),
    )
    (cfg.base / "node.toml").write_text(cfg.dumps())
    started: list[NodeProcess] = []

    def start() -> NodeProcess:
        n = NodeProcess(cfg.base / "node.toml", tmp_path / f"node{len(started)}.log", cfg.api.port)
        started.append(n)
        n.start()
        return n

    yield start  # type: ignore[misc]
    for n in started:
        n.stop()


def _workers(n: NodeProcess) -> dict[int, str]:
    assert n.proc is not None
    kids = descendants(n.proc.pid)
    lines = [_cmdline(p) for p in kids]
    # the forkserver, the two verifiers it forked, and the resource tracker
    assert sum("forkserver" in c for c in lines) >= 3, lines
    assert any("resource_tracker" in c for c in lines), lines
    return kids


def test_kill_9_takes_every_worker_with_the_node(node: Callable[[], NodeProcess]) -> None:
    n = node()
    kids = _workers(n)
    n.kill9()
    assert eventually_gone(kids) == []


def test_stopping_a_node_leaves_no_process_behind(node: Callable[[], NodeProcess]) -> None:
    n = node()
    kids = _workers(n)
    n.stop()
    assert n.proc is not None and n.proc.returncode == 0
    assert eventually_gone(kids) == []
