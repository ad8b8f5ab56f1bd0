"""What a node operator sees: one-line errors naming the fix, JSON logs, ``doctor``.

Every case runs the real ``meshhealth`` command line against real files, a
real Mosquitto and a real node process on loopback.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from test_cli import mh

from meshhealth.cli.demo import setup_network
from meshhealth.cli.logs import JsonFormatter
from meshhealth.config import NodeConfig
from meshhealth.store.lmdb_store import Store

pytestmark = pytest.mark.integration


def write(cfg: NodeConfig) -> Path:
    path = cfg.base / "node.toml"
    path.write_text(cfg.dumps())
    return path


def one_line_error(args: list[str], *needles: str, code: int = 2) -> str:
    """Run a command that must fail with ``code`` (2: fix the configuration; 75: try
    again later), and stderr is one line holding every needle."""
    r = mh(*args, timeout=60)
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_bad_configuration_gives_one_line_naming_the_fix(tmp_path, mosquitto):
    cfg = setup_network(tmp_path / "net", 1, broker=mosquitto.url)[0]
    conf = write(cfg)

    missing = replace(cfg, key_file="nowhere.key")
    one_line_error(
        ["node", "run", "--config", str(write(missing))], "nowhere.key", "meshhealth init"
    )
    write(cfg)

    unreachable = replace(cfg, mqtt=replace(cfg.mqtt, broker="mqtt://127.0.0.1:9"))
    one_line_error(
        ["node", "run", "--config", str(write(unreachable))],
        "cannot reach the MQTT broker at mqtt://127.0.0.1:9",
        "start it",
        code=75,  # the broker may come back: systemd restarts the node, unlike on a 2
    )
    write(cfg)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = replace(cfg, api=replace(cfg.api, port=port))
        one_line_error(
            ["node", "run", "--config", str(write(busy))], "in use", "set api.port", code=75
        )
    write(cfg)

    other = setup_network(tmp_path / "other", 1, broker=mosquitto.url)[0]
    stamped = Store(other.data_path)  # a data dir that belongs to another network
    stamped.set_meta("genesis", other.genesis_path.read_text().encode())
    stamped.close()
    foreign = replace(cfg, data_dir=str(other.data_path))
    one_line_error(["node", "run", "--config", str(write(foreign))], "another network", "data_dir")

    one_line_error(["node", "run", "--config", str(tmp_path / "none.toml")], "meshhealth init")
    assert conf.exists()


def test_json_log_format_writes_one_object_per_line(tmp_path):
    cfg = setup_network(tmp_path / "net", 1, broker="mqtt://127.0.0.1:9")[0]
    r = mh("--log-format", "json", "node", "run", "--config", str(write(cfg)), timeout=60)
    assert r.returncode == 75
    docs = [json.loads(line) for line in r.stderr.strip().splitlines()]
    last = docs[-1]
    assert last["level"] == "error" and last["error"] == "NetworkError"
    assert "cannot reach the MQTT broker" in last["msg"]
    assert {"ts", "logger"} <= set(last)


def test_json_formatter_keeps_extra_fields_and_exceptions():
    import logging

    rec = logging.LogRecord("meshhealth.x", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    rec.peer = "ab12"
    doc = json.loads(JsonFormatter().format(rec))
    assert doc["msg"] == "a b" and doc["peer"] == "ab12" and doc["level"] == "warning"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        rec.exc_info = sys.exc_info()
    assert "ValueError: boom" in json.loads(JsonFormatter().format(rec))["exc"]


def doctor(conf: Path) -> tuple[int, dict[str, dict[str, str]]]:
    r = mh("doctor", "--config", str(conf), "--json", timeout=60)
    return r.returncode, {c["name"]: c for c in json.loads(r.stdout)}


@pytest.mark.timeout(180)
def test_doctor_passes_a_running_node_and_names_each_broken_part(tmp_path, mosquitto):
    from test_network import launch

    cfgs = setup_network(tmp_path / "net", 2, broker=mosquitto.url)
    nodes = launch(cfgs[:1], tmp_path / "net")  # node 2 stays down
    try:
        rc, checks = doctor(cfgs[0].base / "node.toml")
        assert checks["api"]["status"] == "ok" and "running" in checks["api"]["detail"]
        assert checks["broker"]["status"] == "ok"
        assert checks["key"]["status"] == "ok" and checks["network"]["status"] == "ok"
        assert checks["tls"]["status"] == "ok" and checks["tls"]["detail"].startswith("off")
        assert checks["disk"]["status"] == "ok" and "LMDB map" in checks["disk"]["detail"]
        assert checks["peers"]["status"] == "warn"  # its one peer is down
        assert "unreachable" in checks["peers"]["detail"]
        assert rc == 0, checks

        human = mh("doctor", "--config", str(cfgs[0].base / "node.toml"), timeout=60)
        assert human.returncode == 0
        assert any(line.startswith("warn  peers") for line in human.stdout.splitlines())
        assert "fix: " in human.stdout
    finally:
        for n in nodes:
            n.stop()

    cfg = cfgs[1]
    broken = replace(cfg, mqtt=replace(cfg.mqtt, broker="mqtt://127.0.0.1:9"))
    rc, checks = doctor(write(broken))
    assert rc == 1
    assert checks["broker"]["status"] == "fail" and checks["broker"]["fix"]
    assert checks["peers"]["status"] == "warn"  # node 1 is down now

    stranger = setup_network(tmp_path / "other", 1, broker=mosquitto.url)[0]
    wrong = replace(cfg, genesis_file=str(stranger.genesis_path))
    rc, checks = doctor(write(wrong))
    assert rc == 1
    assert checks["network"]["status"] == "fail"
    assert "not one of them" in checks["network"]["detail"]

    no_cert = replace(cfg, tls=replace(cfg.tls, cert_file="no.crt", key_file="no.key"))
    rc, checks = doctor(write(no_cert))
    assert rc == 1 and checks["tls"]["status"] == "fail" and "no.crt" in checks["tls"]["detail"]

    (cfg.base / "node.key").chmod(0o644)
    rc, checks = doctor(write(cfg))
    assert checks["key"]["status"] == "warn" and "chmod 600" in checks["key"]["fix"]

    rc, checks = doctor(tmp_path / "missing.toml")
    assert rc == 1 and checks["config"]["status"] == "fail"
    assert {c["status"] for n, c in checks.items() if n != "config"} == {"skip"}


def test_progress_bar_tracks_work_that_grows(capsys):
    from meshhealth.cli.progress import Progress

    bar = Progress(10, "catch-up blocks", force=True)
    bar.update(10)  # the last step is always drawn
    assert "catch-up blocks [" in capsys.readouterr().err
    bar.update(20, total=40)
    bar._drawn = 0.0  # past the redraw interval
    bar.update(40)
    err = capsys.readouterr().err
    assert "40/40" in err and "#" * 30 in err
    bar.close()
    assert Progress(5, "quiet").enabled is False  # stderr is not a terminal under pytest


class FakeBar:
    """Records what a catch-up report draws (the real bar is tested above)."""

    def __init__(self, total: int, label: str) -> None:
        self.calls: list[tuple[int, int]] = [(0, total)]
        self.closed = False

    def update(self, done: int, total: int | None = None) -> None:
        self.calls.append((done, total or 0))

    def close(self) -> None:
        self.closed = True


def test_catchup_report_logs_the_backlog_then_once_that_it_caught_up():
    from meshhealth.net.catchup import CatchupReport

    r = CatchupReport()
    assert r.observe(0, 7, now=0.0) is None  # nothing to catch up: silent
    assert r.observe(50, 7, now=1.0) == "catching up: 50 blocks behind, 0 pulled so far"
    assert r.observe(20, 37, now=2.0) == "catching up: 20 blocks behind, 30 pulled so far"
    assert r.observe(0, 57, now=4.5) == "caught up: 50 blocks pulled from peers in 3.5 s"
    assert r.observe(0, 57, now=5.0) is None  # said once

    bars: list[FakeBar] = []
    r = CatchupReport(lambda total, label: bars.append(FakeBar(total, label)) or bars[-1])
    assert r.observe(10, 0, now=0.0) is None
    assert r.observe(30, 5, now=1.0) is None  # peers announced more: the total grows
    assert bars[0].calls[-1] == (5, 35)
    assert r.observe(0, 40, now=2.0) == "caught up: 40 blocks pulled from peers in 2.0 s"
    assert bars[0].calls[-1] == (40, 40) and bars[0].closed


def test_the_viewers_refuse_to_listen_beyond_loopback(tmp_path):
    for cmd, new in (("provider", "keygen"), ("patient", "new")):
        key = tmp_path / f"{cmd}.key"
        assert mh(cmd, new, "--out", str(key)).returncode == 0
        one_line_error(
            [cmd, "serve", "--key", str(key), "--node", "http://127.0.0.1:9", "--host", "0.0.0.0"],
            "loopback only",
            "SSH tunnel",
        )
