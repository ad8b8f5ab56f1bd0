"""A benchmark publisher process: pre-signed readings out, receipts in.

``python -m meshhealth.bench.publisher --broker URL --input F --output F``

The input holds pre-encoded readings per device (signing is not part of
what the node benchmark measures).  With ``--receipts`` it keeps at most
``--window`` unreceipted readings per device in flight — "as fast as the
node takes them" — and records, per reading, the time from its publish to
the receipt that covers it.  ``--rate`` caps the total messages/s.
Times are wall-clock (``time.time()``), comparable across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv311

from meshhealth.ingest.mqtt import parse_broker_url
from meshhealth.wire import decode_receipt
from meshhealth.wire.codec import unpack


async def run(a: argparse.Namespace) -> dict[str, Any]:
    data = unpack(Path(a.input).read_bytes(), max_len=1 << 31)
    devices = [(bytes(d), [(s, bytes(p)) for s, p in msgs]) for d, msgs in data]
    acked = {d: (msgs[0][0] - 1 if msgs else 0) for d, msgs in devices}
    sent_at: dict[bytes, dict[int, float]] = {d: {} for d, _ in devices}
    latencies: list[float] = []
    receipt_times: list[float] = []
    done = asyncio.Event()
    total = sum(len(m) for _, m in devices)
    target = total  # how many receipts end the run (less if --duration stops us early)
    t_done = 0.0
    room = asyncio.Event()

    def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        nonlocal t_done
        rc = decode_receipt(payload)
        now = time.time()
        sent = sent_at.get(rc.device)
        if sent is None or rc.seq <= acked[rc.device]:
            return 0
        for s in range(acked[rc.device] + 1, rc.seq + 1):
            t = sent.pop(s, None)
            if t is not None:
                latencies.append((now - t) * 1000)
                receipt_times.append(now)
        acked[rc.device] = rc.seq
        room.set()
        if len(latencies) >= target:
            t_done = now
            done.set()
        return 0

    host, port, _ = parse_broker_url(a.broker)
    client = Client(a.client_id, clean_session=True)
    client.on_message = on_message
    await client.connect(host, port, version=MQTTv311, keepalive=60)
    if a.receipts:
        for i in range(0, len(devices), 100):
            for d, _ in devices[i : i + 100]:
                client.subscribe(f"mh/v1/receipts/{d.hex()}", qos=1)
        await asyncio.sleep(0.5)
    pos = [0] * len(devices)
    sent = 0
    t_first = time.time()
    budget_t = time.monotonic()
    stop_at = time.monotonic() + a.duration if a.duration else float("inf")
    give_up = time.monotonic() + a.duration + a.timeout
    while sent < total and time.monotonic() < stop_at:
        progressed = False
        for i, (d, msgs) in enumerate(devices):
            if pos[i] >= len(msgs):
                continue
            if a.receipts and msgs[pos[i]][0] - acked[d] > a.window:
                continue
            seq, payload = msgs[pos[i]]
            sent_at[d][seq] = time.time()
            client.publish(f"mh/v1/readings/{d.hex()}", payload, qos=1)
            pos[i] += 1
            sent += 1
            progressed = True
            if a.rate:
                budget_t += 1.0 / a.rate
                delay = budget_t - time.monotonic()
                if delay > 0.002:
                    await asyncio.sleep(delay)
            if sent % 200 == 0:
                await asyncio.sleep(0)
                if time.monotonic() >= stop_at:
                    break
        if not progressed:
            if time.monotonic() > give_up:
                break
            room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.wait(), 5)
    t_last = time.time()
    target = sent
    if len(latencies) >= target:
        done.set()
    if a.receipts:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), a.timeout)
    else:
        # every QoS 1 publish acknowledged by the broker before we hang up
        # (gmqtt keeps unacknowledged messages in its storage until PUBACK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client._persistent_storage.wait_empty(), a.timeout)
    await client.disconnect()
    return {
        "sent": sent,
        "t_first": t_first,
        "t_last": t_last,
        "t_done": t_done or time.time(),
        "receipted": len(latencies),
        "latencies_ms": latencies,
        "receipt_times": receipt_times,
        "last_sent": {
            d.hex(): (msgs[pos[i] - 1][0] if pos[i] else None)
            for i, (d, msgs) in enumerate(devices)
        },
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--client-id", default="")
    p.add_argument("--receipts", action="store_true")
    p.add_argument("--window", type=int, default=1000)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--duration", type=float, default=0.0, help="stop publishing after this")
    a = p.parse_args()
    out = asyncio.run(run(a))
    Path(a.output).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
