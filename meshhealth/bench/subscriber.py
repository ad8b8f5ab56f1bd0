"""A consume-only subscriber on the node's MQTT library: the client ceiling.

``python -m meshhealth.bench.subscriber --broker URL --count N --output F``
prints ``ready`` once subscribed, exits after N messages (or the timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from gmqtt import Client
from gmqtt.mqtt.constants import MQTTv311

from meshhealth.ingest.mqtt import parse_broker_url


async def run(a: argparse.Namespace) -> dict[str, Any]:
    n = 0
    t_first = t_last = 0.0
    done = asyncio.Event()

    def on_message(client: Any, topic: str, payload: bytes, qos: int, props: Any) -> int:
        nonlocal n, t_first, t_last
        n += 1
        t_last = time.time()
        if n == 1:
            t_first = t_last
        if n >= a.count:
            done.set()
        return 0

    host, port, _ = parse_broker_url(a.broker)
    client = Client(a.client_id, clean_session=True)
    client.on_message = on_message
    await client.connect(host, port, version=MQTTv311)
    client.subscribe(a.topic, qos=1)
    await asyncio.sleep(0.3)
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), a.timeout)
    await client.disconnect()
    return {"count": n, "t_first": t_first, "t_last": t_last}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--broker", required=True)
    p.add_argument("--topic", default="mh/v1/readings/+")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--client-id", default="mh-bench-sub")
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    Path(a.output).write_text(json.dumps(asyncio.run(run(a))))
    sys.exit(0)


if __name__ == "__main__":
    main()
