"""Small helpers shared by the demo, the benchmarks and the tests."""

from __future__ import annotations

import asyncio
import signal
import socket


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
