"""What the node dashboard (``GET /``) shows, and the packaged files it is made of.

The page (``meshhealth/web/static/dashboard.*``) polls ``GET /v1/dashboard``
every few seconds.  That document holds only what ``/v1/status`` and
``/v1/chains`` already show publicly: heights, confirmation, peers,
counters and block headers' times and sizes.  A node holds no vital value
in clear, and the dashboard shows no ciphertext either.

The charts need the recent past, which counters alone do not keep, so the
node samples its ingest counters every ``SAMPLE_S`` into a :class:`History`
(a ring buffer of about ten minutes) and the document carries the rates
between consecutive samples.

:func:`chain_rows` and :func:`peer_rows` are the node's view of the
network; the Prometheus collector (:mod:`meshhealth.net.metrics`) reads
the same rows.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshhealth.node import Node

SAMPLE_S = 2.0  # how often the node samples its ingest counters
HISTORY_S = 600.0  # how far back the charts reach
RECENT_BLOCKS = 20  # newest blocks, over every chain, in the recent blocks table
PEER_STATES = ("connected", "disconnected", "faulty", "observer")

# --- the history of the ingest counters ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    t_ms: int  # wall clock, for the chart's time axis
    mono_s: float  # monotonic clock, for the rates
    readings: int  # readings committed to our own chain since start
    rejects: dict[str, int]  # rejections by reason since start


class History:
    """The last ``capacity`` samples of the node's ingest counters (pure: the caller
    passes the clocks), and the per-second rates between consecutive ones."""

    def __init__(self, capacity: int = int(HISTORY_S / SAMPLE_S)) -> None:
        if capacity < 1:
            raise ValueError("a history holds at least one rate, so two samples")
        self.capacity = capacity
        self._samples: deque[Sample] = deque(maxlen=capacity + 1)  # n rates need n + 1

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, t_ms: int, mono_s: float, readings: int, rejects: Mapping[str, int]) -> None:
        """Add a sample; the oldest falls out once ``capacity`` rates are held.  A sample
        whose monotonic time does not advance replaces the last one."""
        sample = Sample(t_ms, mono_s, readings, dict(rejects))
        if self._samples and mono_s <= self._samples[-1].mono_s:
            self._samples[-1] = sample
        else:
            self._samples.append(sample)

    def rates(self) -> dict[str, Any]:
        """``t_ms`` (the end of each interval), ``accepted_per_s`` (readings committed)
        and ``rejected_per_s`` by reason, for each reason with a rejection in the window.
        A counter that went down (it never should) counts as no change."""
        pairs = list(itertools.pairwise(self._samples))
        reasons = sorted(
            {r for a, b in pairs for r, n in b.rejects.items() if n > a.rejects.get(r, 0)}
        )

        def rate(a: Sample, b: Sample, new: int, old: int) -> float:
            return round(max(0, new - old) / (b.mono_s - a.mono_s), 3)

        return {
            "interval_s": SAMPLE_S,
            "window_s": self.capacity * SAMPLE_S,
            "t_ms": [b.t_ms for _, b in pairs],
            "accepted_per_s": [rate(a, b, b.readings, a.readings) for a, b in pairs],
            "rejected_per_s": {
                r: [rate(a, b, b.rejects.get(r, 0), a.rejects.get(r, 0)) for a, b in pairs]
                for r in reasons
            },
        }


async def sample_history(node: Node, interval_s: float = SAMPLE_S) -> None:
    """The node's sampler task: every ``interval_s``, record the ingest counters."""
    while True:
        pipe = node.pipeline
        node.history.record(
            time.time_ns() // 1_000_000,
            time.monotonic(),
            pipe.sealed_readings,
            pipe.batcher.rejects,
        )
        await asyncio.sleep(interval_s)


# --- the node's view of the network ---------------------------------------------------------


def names(node: Node) -> dict[bytes, str]:
    """Authority keys and their names from the genesis."""
    return {a.key: a.name for a in node.genesis.authorities}


def chain_rows(node: Node, now_ms: int) -> list[dict[str, Any]]:
    """Every chain in the replica: height, confirmed height, the blocks above it and
    how long the oldest of them has waited, the blocks a catch-up still lacks, faults."""
    named = names(node)
    missing = node.gossip.missing()
    rows = []
    for hexkey, c in sorted(node.chains().items()):
        key = bytes.fromhex(hexkey)
        height, confirmed = c["height"], c["confirmed"]
        lag_s = 0.0
        if height > confirmed:
            oldest = node.store.header(key, confirmed + 1)
            if oldest is not None:
                lag_s = max(0.0, (now_ms - oldest.ts_ms) / 1000)
        rows.append(
            {
                "node": hexkey,
                "name": named.get(key, ""),
                "mine": key == node.identity.public,
                "height": height,
                "confirmed": confirmed,
                "unconfirmed": height - confirmed,
                "confirmation_lag_s": round(lag_s, 3),
                "missing": missing.get(key, 0),
                "faulty": c["faulty"],
            }
        )
    return rows


def peer_rows(node: Node) -> list[dict[str, Any]]:
    """Every other authority, and every observer connected: its state (one of
    :data:`PEER_STATES`) and what the gossip core makes of its liveness."""
    named, shell = names(node), node.gossip
    me, faulty = node.identity.public, node.batcher.faulty
    rows = []
    for key in sorted(node.authorities - {me}):
        state = "faulty" if key in faulty else "connected" if key in shell.conns else "disconnected"
        rows.append((key, named[key], state))
    rows += [(k, "", "observer") for k, c in sorted(shell.conns.items()) if not c.authority]
    liveness = {k: p.status.value for k, p in shell.core.peers.items()}
    return [
        {"node": k.hex(), "name": name, "state": state, "liveness": liveness.get(k, "unknown")}
        for k, name, state in rows
    ]


def recent_blocks(node: Node, chains: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The ``n`` newest blocks over every chain, newest first, read header by header from
    each chain's head down (a k-way merge reads about ``n + chains`` headers)."""
    store = node.store

    def newest_first(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        key = bytes.fromhex(row["node"])
        for height in range(row["height"], -1, -1):
            hdr = store.header(key, height)
            if hdr is None:
                return
            yield {
                "node": row["node"],
                "name": row["name"],
                "height": height,
                "ts_ms": hdr.ts_ms,
                "count": hdr.count,
                "links": len(hdr.links),
                "confirmed": height <= row["confirmed"],
            }

    merged = heapq.merge(*(newest_first(r) for r in chains), key=lambda b: -b["ts_ms"])
    return list(itertools.islice(merged, n))


def dashboard_doc(node: Node) -> dict[str, Any]:
    """The document behind the dashboard (``GET /v1/dashboard``)."""
    now = time.time_ns() // 1_000_000
    ingest = node.pipeline.statistics()
    store = node.store.statistics()
    chains = chain_rows(node, now)
    me = node.identity.public
    return {
        "node": me.hex(),
        "name": names(node).get(me, ""),
        "network": {"id": node.network.hex(), "name": node.genesis.name},
        "now_ms": now,
        "uptime_s": round(time.time() - node.started, 1),
        "mqtt_connected": node.mqtt.connected.is_set(),
        "ingest": {
            "received": ingest["received"],
            "readings": node.pipeline.sealed_readings,
            "rejected": ingest["rejected"],
            "backlog": ingest["backlog"],
            "pending": ingest["pending"],
        },
        "store": {
            "used_bytes": store["used_bytes"],
            "map_size": store["map_size"],
            "readings": store["readings"],
        },
        "chains": chains,
        "peers": peer_rows(node),
        "history": node.history.rates(),
        "recent_blocks": recent_blocks(node, chains, RECENT_BLOCKS),
    }
