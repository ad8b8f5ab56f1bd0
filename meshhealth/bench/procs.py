"""Processes the benchmarks (and the tests) start: a private Mosquitto, a node, RSS.

Everything listens on 127.0.0.1 on free ports and is stopped by PID.
"""

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
from pathlib import Path
from typing import Any

from meshhealth.cli.netutil import free_port

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


class BrokerProcess:
    """Mosquitto when installed, else the embedded amqtt broker, in its own process."""

    def __init__(self, workdir: Path, *, prefer_mosquitto: bool = True) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.kind = "mosquitto" if (prefer_mosquitto and MOSQUITTO) else "amqtt"
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            "log_dest none\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.kind == "mosquitto":
            cmd = [str(MOSQUITTO), "-c", str(self.conf)]
        else:
            cmd = [
                sys.executable,
                "-c",
                "import asyncio,sys;from meshhealth.ingest.broker import EmbeddedBroker\n"
                "async def m():\n async with EmbeddedBroker(port=int(sys.argv[1])):\n"
                "  await asyncio.Event().wait()\nasyncio.run(m())",
                str(self.port),
            ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


class NodeProcess:
    """A real ``meshhealth node run`` process for a prepared node directory."""

    def __init__(self, config_path: Path, log: Path, api_port: int) -> None:
        self.config_path, self.log, self.api_port = config_path, log, api_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self, timeout: float = 30.0, *, until: str = "ingest") -> None:
        """Start, and wait until the API answers (``until="api"``) or, by default, until
        the node also ingests (which waits for its start-up sync with its peers)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshhealth.cli.main",
                    "--log-level",
                    "INFO",
                    "node",
                    "run",
                    "--config",
                    str(self.config_path),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-2000:]}")
            try:
                if self.status()["mqtt_connected"] or until == "api":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"node did not come up: {self.log.read_text()[-2000:]}")

    def wait_ingesting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.status()["mqtt_connected"]:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"node does not ingest: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def heads(self) -> dict[str, int]:
        """This node's replica: chain (hex) -> height."""
        return {k: v["height"] for k, v in self.status()["chains"].items()}

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


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def tree_peak_rss_mb(pid: int) -> tuple[float, float]:
    """(peak RSS of ``pid`` alone, sum of peak RSS over it and its descendants), in MB."""
    kids = _children()
    todo, total, own = [pid], 0.0, 0.0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    mb = int(line.split()[1]) / 1024
                    total += mb
                    if p == pid:
                        own = mb
        except OSError:
            continue
    return own, total


def _field_kb(path: str, name: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pids(pid: int) -> list[int]:
    kids, todo, out = _children(), [pid], []
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


class MemorySampler:
    """Samples the RSS and PSS of a process tree in a background thread."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import threading

        self.pid, self.interval = pid, interval
        self.peak_rss_kb = self.peak_pss_kb = 0
        self.peak_by_proc: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = pss = 0
            for p in tree_pids(self.pid):
                r = _field_kb(f"/proc/{p}/status", "VmRSS:")
                rss += r
                pss += _field_kb(f"/proc/{p}/smaps_rollup", "Pss:")
                self.peak_by_proc[p] = max(self.peak_by_proc.get(p, 0), r)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.peak_pss_kb = max(self.peak_pss_kb, pss)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
