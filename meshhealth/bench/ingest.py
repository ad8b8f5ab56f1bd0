"""``meshhealth bench ingest``: one node's end-to-end ingest rate, beside its ceilings.

Phases, all in one run on this machine (publishers, broker and node share
the cores, as they would on an edge box):

1. ``ceiling_verify_per_s``: Ed25519 verifications/s on one core.
2. Prepare: enrolments and pre-signed readings for D devices, written per
   publisher process (signing is the devices' cost, not the node's).
3. ``ceiling_client_per_s``: the broker delivering the same messages to a
   consume-only subscriber on gmqtt (the node's MQTT library);
   ``ceiling_c_client_per_s`` the same to ``mosquitto_sub`` when installed.
4. Max rate: a fresh node process; publishers keep a window of unreceipted
   readings per device, so they go exactly as fast as the node commits.
5. Half rate: more readings at half the measured maximum, for the latency
   the target speaks of (publish -> receipt, which follows the commit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.signing

from device_agents.device import Device
from meshhealth.bench.procs import BrokerProcess, MemorySampler, NodeProcess, tree_peak_rss_mb
from meshhealth.bench.stats import pct
from meshhealth.cli.demo import setup_network
from meshhealth.crypto.keys import Identity
from meshhealth.sharing.enrollment import enrollment
from meshhealth.sharing.keychain import KeyChain, epoch_of
from meshhealth.wire.codec import pack


def verify_ceiling(seconds: float) -> float:
    """Ed25519 verifications per second on one core (same call the verifier makes)."""
    key = nacl.signing.SigningKey.generate()
    msgs = [os.urandom(160) for _ in range(256)]
    signed = [key.sign(m) for m in msgs]
    pk = bytes(key.verify_key)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for sm in signed:
            nacl.bindings.crypto_sign_open(bytes(sm), pk)
        n += len(signed)
    return n / (time.perf_counter() - t0)


class Workload:
    """D devices (one stream each) of P patients, producing pre-signed readings."""

    def __init__(self, devices: int, spm: int) -> None:
        self.spm = spm
        now = time.time_ns() // 1_000_000
        self.t0 = (now - 20 * 3_600_000) // 1000 * 1000
        patients = [Identity.generate("patient") for _ in range(max(1, devices // 5))]
        self.chains = {p.public: KeyChain.new("hr", epoch_of(self.t0, 3_600_000)) for p in patients}
        self.devices: list[Device] = []
        self.txs: list[bytes] = []
        for i in range(devices):
            p = patients[i % len(patients)]
            d = Device(Identity.generate("device"), p.public)
            tx = enrollment(
                p,
                {"hr": self.chains[p.public]},
                d.id,
                epoch_of(self.t0, 3_600_000),
                now,
                import_from_ms=self.t0,
            )
            d.accept_enrollment(tx)
            self.devices.append(d)
            self.txs.append(tx.encode())
        self.clock = {d.id: self.t0 for d in self.devices}

    def batch(self, per_device: int) -> list[tuple[bytes, list[tuple[int, bytes]]]]:
        out = []
        for d in self.devices:
            t = self.clock[d.id]
            samples = [(t + k * 1000, (60.0 + (k % 40),)) for k in range(per_device * self.spm)]
            self.clock[d.id] = t + per_device * self.spm * 1000
            out.append((d.id, d.readings("hr", samples, max_samples=self.spm)))
        return out


def write_inputs(
    batch: list[tuple[bytes, list[tuple[int, bytes]]]], n: int, d: Path, tag: str
) -> list[Path]:
    files = []
    for i in range(n):
        f = d / f"{tag}-{i}.msgpack"
        f.write_bytes(pack([[dev, [[s, p] for s, p in msgs]] for dev, msgs in batch[i::n]]))
        files.append(f)
    return files


def publish(
    broker: str,
    files: list[Path],
    workdir: Path,
    *,
    receipts: bool,
    rate: float = 0,
    window: int = 250,
    timeout: float = 300,
    duration: float = 0,
) -> list[dict[str, Any]]:
    procs = []
    for f in files:
        out = workdir / f"{f.stem}.out.json"
        cmd = [
            sys.executable,
            "-m",
            "meshhealth.bench.publisher",
            "--broker",
            broker,
            "--input",
            str(f),
            "--output",
            str(out),
            "--client-id",
            f"mh-bench-pub-{f.stem}",
            "--window",
            str(window),
            "--timeout",
            str(timeout),
            "--duration",
            str(duration),
        ]
        if receipts:
            cmd.append("--receipts")
        if rate:
            cmd += ["--rate", str(rate / len(files))]
        procs.append((subprocess.Popen(cmd), out))
    results = []
    for p, out in procs:
        p.wait(timeout + duration + 60)
        results.append(json.loads(out.read_text()))
    return results


def client_ceiling(
    broker: BrokerProcess, files: list[Path], count: int, workdir: Path, *, c_client: bool
) -> float | None:
    out = workdir / ("csub.json" if c_client else "sub.json")
    if c_client:
        import shutil

        exe = shutil.which("mosquitto_sub")
        if exe is None or broker.kind != "mosquitto":
            return None
        sub = subprocess.Popen(
            [
                exe,
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                "mh/v1/readings/+",
                "-C",
                str(count),
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.5)
    else:
        sub = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshhealth.bench.subscriber",
                "--broker",
                broker.url,
                "--count",
                str(count),
                "--output",
                str(out),
            ],
            stdout=subprocess.PIPE,
        )
        assert sub.stdout is not None
        sub.stdout.readline()  # "ready"
    pubs = publish(broker.url, files, workdir, receipts=False)
    t_start = min(p["t_first"] for p in pubs)
    try:
        sub.wait(120)
    except subprocess.TimeoutExpired:
        sub.kill()
        sub.wait()
        print("WARNING: the subscriber did not receive every message in time", flush=True)
    if c_client:
        return count / (time.time() - t_start) if sub.returncode == 0 else None
    res = json.loads(out.read_text())
    if res["count"] < count:
        print(f"WARNING: the subscriber got {res['count']} of {count} messages", flush=True)
    return float(res["count"] / max(res["t_last"] - t_start, 1e-9))


def window_rate(receipt_times: list[float], t_a: float, t_b: float) -> float:
    """Readings/s committed inside [t_a, t_b], counted in whole blocks.

    Receipts arrive in bursts, one per committed block; counting every burst
    after the first one in the window, over the time from the first to the
    last, measures whole blocks without quantisation error.
    """
    times = sorted(t for t in receipt_times if t_a <= t <= t_b)
    bursts: list[list[float]] = []
    for t in times:
        if bursts and t - bursts[-1][-1] < 0.05:
            bursts[-1].append(t)
        else:
            bursts.append([t])
    if len(bursts) < 2:
        return len(times) / (t_b - t_a)
    return sum(len(b) for b in bursts[1:]) / (bursts[-1][0] - bursts[0][0])


def run(
    *,
    quick: bool,
    spm: int,
    json_path: Path | None,
    publishers: int = 2,
    devices: int = 100,
    keep: Path | None = None,
) -> dict[str, Any]:
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="mh-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    warm, measure = (2.0, 5.0) if quick else (3.0, 15.0)
    broker = BrokerProcess(work / "broker")
    broker.start()
    node = None
    try:
        print(f"broker: {broker.kind} on {broker.url}", flush=True)
        ceiling_verify = verify_ceiling(0.5 if quick else 2.0)
        print(f"one-core Ed25519 verify: {ceiling_verify:,.0f}/s", flush=True)
        # enough readings that the publishers are still busy when the window closes:
        # no node here can beat 1.3x one core's verification rate while sharing two cores
        per_device = int(1.3 * ceiling_verify * (warm + measure + 2) / devices) + 1
        t_gen = time.perf_counter()
        wl = Workload(devices, spm)
        phase1 = wl.batch(per_device)
        n1 = sum(len(m) for _, m in phase1)
        files1 = write_inputs(phase1, publishers, work, "max")
        n_ceil = min(n1, 150_000)
        files_ceil = write_inputs(
            [(d, m[: n_ceil // devices]) for d, m in phase1], publishers, work, "ceil"
        )
        n_ceil = (n_ceil // devices) * devices
        print(f"prepared {n1:,} signed readings in {time.perf_counter() - t_gen:.1f} s", flush=True)
        ceiling_client = client_ceiling(broker, files_ceil, n_ceil, work, c_client=False)
        print(f"client ceiling (gmqtt consume-only): {ceiling_client:,.0f}/s", flush=True)
        ceiling_c = client_ceiling(broker, files_ceil, n_ceil, work, c_client=True)
        if ceiling_c:
            print(f"C client ceiling (mosquitto_sub): {ceiling_c:,.0f}/s", flush=True)

        cfg = setup_network(work / "net", 1, broker=broker.url)[0]
        cfg = replace(cfg, ingest=replace(cfg.ingest, verify_workers=2))
        (cfg.base / "node.toml").write_text(cfg.dumps())
        node = NodeProcess(cfg.base / "node.toml", work / "node.log", cfg.api.port)
        node.start()
        for tx in wl.txs:
            req = urllib.request.Request(f"{node.url}/v1/tx", data=tx, method="POST")
            urllib.request.urlopen(req, timeout=10).read()
        time.sleep(1.5)
        sampler = MemorySampler(node.proc.pid if node.proc else 0)
        sampler.__enter__()
        res1 = publish(broker.url, files1, work, receipts=True, duration=warm + measure + 1)
        t0 = min(r["t_first"] for r in res1)
        receipts = [x for r in res1 for x in r["receipt_times"]]
        rate = window_rate(receipts, t0 + warm, t0 + warm + measure)
        committed1 = sum(r["receipted"] for r in res1)
        sent1 = sum(r["sent"] for r in res1)
        wall_rate = committed1 / (max(r["t_done"] for r in res1) - t0)
        lat_max = [x for r in res1 for x in r["latencies_ms"]]
        print(
            f"node at max rate: {rate:,.0f} readings/s over {measure:.0f} s "
            f"({committed1:,} of {sent1:,} sent receipted)",
            flush=True,
        )
        if committed1 != sent1:
            print(
                f"WARNING: {sent1 - committed1} readings not receipted; node: "
                f"{node.status()['ingest']}",
                flush=True,
            )

        half = rate / 2
        dur = 6.0 if quick else 15.0
        per2 = max(1, int(half * dur / devices))
        # continue each device's sequence right after what it sent (a gap would, by
        # design, hold its receipts back until the gap is filled)
        last = {bytes.fromhex(k): v for r in res1 for k, v in r["last_sent"].items()}
        rest = [
            (d, [(s, p) for s, p in msgs if s > (last.get(d) or 0)][:per2]) for d, msgs in phase1
        ]
        if min(len(m) for _, m in rest) < per2:
            extra = dict(wl.batch(per2))
            rest = [(d, m + extra[d][: per2 - len(m)]) for d, m in rest]
        files2 = write_inputs(rest, publishers, work, "half")
        res2 = publish(broker.url, files2, work, receipts=True, rate=half)
        print(
            f"half rate: {sum(r['receipted'] for r in res2):,} of "
            f"{sum(r['sent'] for r in res2):,} receipted",
            flush=True,
        )
        lat_half = [x for r in res2 for x in r["latencies_ms"]]
        status = node.status()
        rss_main, rss_sum_of_peaks = tree_peak_rss_mb(node.proc.pid if node.proc else 0)
        sampler.__exit__(None, None, None)
        committed = status["ingest"]["readings_committed"]
        used = status["store"]["used_bytes"]
        cfg_interval = cfg.ingest.block_interval_s
    finally:
        if node is not None:
            node.stop()
        broker.stop()
    client_c = ceiling_client or float("nan")
    result = {
        "broker": broker.kind,
        "samples_per_message": spm,
        "messages": sent1,
        "measure_window_s": measure,
        "messages_per_s": round(rate, 1),
        "messages_per_s_wall": round(wall_rate, 1),
        "samples_per_s": round(rate * spm, 1),
        "p50_latency_ms": round(pct(lat_half, 0.5), 1),
        "p99_latency_ms": round(pct(lat_half, 0.99), 1),
        "half_rate_per_s": round(half, 1),
        "max_rate_p50_latency_ms": round(pct(lat_max, 0.5), 1),
        "max_rate_p99_latency_ms": round(pct(lat_max, 0.99), 1),
        "peak_rss_mb": round(sampler.peak_rss_kb / 1024, 1),
        "peak_pss_mb": round(sampler.peak_pss_kb / 1024, 1),
        "rss_sum_of_process_peaks_mb": round(rss_sum_of_peaks, 1),
        "peak_rss_by_process_mb": sorted(
            (round(v / 1024, 1) for v in sampler.peak_by_proc.values()), reverse=True
        ),
        "peak_rss_main_mb": round(rss_main, 1),
        "bytes_per_sample": round(used / max(1, committed * spm), 1),
        "bytes_per_message": round(used / max(1, committed), 1),
        "ceiling_client_per_s": round(client_c, 1),
        "ceiling_verify_per_s": round(ceiling_verify, 1),
        "ceiling_c_client_per_s": round(ceiling_c, 1) if ceiling_c else None,
        "ratio": round(rate / min(client_c, ceiling_verify), 3),
        "block_interval_ms": int(cfg_interval * 1000),
        "cores": os.cpu_count(),
    }
    print_table(result)
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {json_path}")
    return result


def print_table(r: dict[str, Any]) -> None:
    rows = [
        ("broker", r["broker"], ""),
        ("samples per message", r["samples_per_message"], ""),
        (
            f"node, max rate ({r['measure_window_s']:.0f} s window)",
            f"{r['messages_per_s']:,.0f} msg/s",
            f"{r['samples_per_s']:,.0f} samples/s",
        ),
        ("  whole run incl. ramp-up and drain", f"{r['messages_per_s_wall']:,.0f} msg/s", ""),
        (
            "  latency at max rate p50/p99",
            f"{r['max_rate_p50_latency_ms']:.0f} / {r['max_rate_p99_latency_ms']:.0f} ms",
            "",
        ),
        (
            f"  latency at half rate ({r['half_rate_per_s']:,.0f}/s) p50/p99",
            f"{r['p50_latency_ms']:.0f} / {r['p99_latency_ms']:.0f} ms",
            f"target <= {r['block_interval_ms'] + 250} ms",
        ),
        ("client ceiling (gmqtt)", f"{r['ceiling_client_per_s']:,.0f} msg/s", ""),
        (
            "C client ceiling (mosquitto_sub)",
            f"{r['ceiling_c_client_per_s']:,.0f} msg/s" if r["ceiling_c_client_per_s"] else "n/a",
            "",
        ),
        ("Ed25519 verify, one core", f"{r['ceiling_verify_per_s']:,.0f}/s", ""),
        ("ratio", f"{r['ratio']:.2f}", "target >= 0.8 at 1 sample/msg"),
        (
            "node peak RSS, all processes",
            f"{r['peak_rss_mb']:.0f} MB",
            f"PSS {r['peak_pss_mb']:.0f} MB; main {r['peak_rss_main_mb']:.0f} MB; target <= 150",
        ),
        ("on disk", f"{r['bytes_per_sample']:.1f} B/sample", f"{r['bytes_per_message']:.0f} B/msg"),
    ]
    w = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        print(f"{a:<{w}}  {b!s:<24} {c}")
