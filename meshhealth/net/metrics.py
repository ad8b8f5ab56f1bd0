"""Prometheus metrics of a node (``GET /metrics``), read from its state at scrape time.

The node already counts what an operator watches (``/v1/status``), so
nothing here keeps a counter of its own: :class:`NodeCollector` reads the
pipeline, batcher, store, gossip shell and API counters when scraped and
turns them into metric families.  Each node has its own
:class:`~prometheus_client.CollectorRegistry` (never the global one), so
several nodes in one process each export their own numbers.

:data:`FAMILIES` is the list of what is exported: names in base units,
counters ending in ``_total``.  Per-chain families carry two labels:
``node``, the chain's node key as full lowercase hex (the key
``/v1/chains`` uses, so the two can be joined), and ``name``, its
authority name in the genesis.  Counters start at zero when the node
process starts; ``rate()`` handles the reset.

Samples inside a reading are *not* counted: their number is inside the
ciphertext, which a node cannot open (the ciphertext length only bounds it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from meshhealth.net.dashboard import PEER_STATES, chain_rows, names, peer_rows

if TYPE_CHECKING:
    from meshhealth.node import Node

CONTENT_TYPE = CONTENT_TYPE_LATEST
Labels = tuple[str, ...]
CHAIN = ("node", "name")


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # as exposed: a counter's ends in _total
    kind: Literal["counter", "gauge"]
    help: str
    labels: Labels = ()

    def empty(self) -> CounterMetricFamily | GaugeMetricFamily:
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)


def _c(name: str, help: str, *labels: str) -> Family:
    return Family(f"meshhealth_{name}_total", "counter", help, labels)


def _g(name: str, help: str, *labels: str) -> Family:
    return Family(f"meshhealth_{name}", "gauge", help, labels)


FAMILIES = (
    _g("node_info", "This node: its key, name and network (value 1).", *CHAIN, "network"),
    _g("mqtt_connected", "1 while the node's MQTT client is connected to its broker."),
    # ingest
    _c("ingest_received", "MQTT messages received from devices."),
    _c("ingest_readings", "Readings committed to this node's own chain."),
    _c(
        "ingest_entries_accepted",
        "Entries admitted to this node's blocks (readings, "
        "control transactions, access logs, equivocation proofs).",
    ),
    _c("ingest_rejected", "Readings and transactions refused, by reason.", "reason"),
    _g("ingest_backlog_messages", "Received messages waiting for the verifier processes."),
    _g("ingest_pending_entries", "Entries admitted to the block being built."),
    _c("blocks_sealed", "Blocks this node sealed and committed to its own chain."),
    _c("commit_seconds", "Seconds spent sealing and committing this node's own blocks."),
    _c("erased_readings", "Readings erased (pruned to their leaf hash) on patients' request."),
    # chains
    _g("chain_height", "Height of the chain's head block in this node's replica.", *CHAIN),
    _g("chain_confirmed_height", "Highest confirmed height of the chain (-1: none).", *CHAIN),
    _g("chain_unconfirmed_blocks", "Blocks of the chain above its confirmed height.", *CHAIN),
    _g(
        "chain_confirmation_lag_seconds",
        "Age of the chain's oldest unconfirmed block (0 when every block is confirmed).",
        *CHAIN,
    ),
    _g(
        "chain_missing_blocks",
        "Blocks of the chain known to exist that the replica still lacks (the catch-up backlog).",
        *CHAIN,
    ),
    _g("chain_faulty", "1 once the chain's node is proven to have equivocated.", *CHAIN),
    # gossip
    _g(
        "peers",
        "Peers by state: authorities connected, disconnected or proven faulty, "
        "and observers connected.",
        "state",
    ),
    _g("gossip_peer_liveness", "Peers by what the gossip core makes of them.", "status"),
    _c("gossip_received_bytes", "Bytes of gossip frames received."),
    _c("gossip_sent_bytes", "Bytes of gossip frames queued for sending."),
    _c("gossip_sent_messages", "Gossip messages queued for sending."),
    _c("gossip_dropped_messages", "Gossip messages dropped because a peer's queue was full."),
    _c("gossip_blocks_applied", "Peers' blocks admitted to the replica."),
    _c("gossip_invalid_blocks", "Peers' blocks refused as invalid."),
    _g("gossip_buffered_blocks", "Peers' blocks waiting in the buffer for a parent or link."),
    _g("gossip_buffered_bytes", "Bytes those blocks hold (bounded per peer and in total)."),
    _g("gossip_send_queued_bytes", "Bytes queued to peers (bounded per peer and in total)."),
    _g("gossip_catchup_missing_blocks", "Blocks a catch-up still has to bring, all chains."),
    # store
    _g("store_used_bytes", "Bytes of the LMDB map in use."),
    _g("store_map_size_bytes", "Size of the LMDB map (it doubles when full)."),
    _g("store_map_used_ratio", "Fraction of the LMDB map in use."),
    _g("store_readings", "Readings stored in the replica, over every chain."),
    # API
    _c("api_requests", "HTTP API requests answered, by method and status code.", "method", "code"),
    _c("api_auth_failures", "Signed requests refused as unauthenticated."),
    _c("access_logs", "Reads and refused reads this node logged to the audit trail."),
    _c("api_limited", "API requests refused 429 by a limit, by reason.", "reason"),
    _c(
        "access_refusals_unlogged",
        "Refused reads not logged on chain: past a patient's or the node's cap per period.",
    ),
    _g("api_nonces", "Signed-request nonces held (each about 256 bytes)."),
)


def read(node: Node) -> Iterator[tuple[str, Labels, float]]:
    """Every sample, as (family name, label values, value), from the node's state now."""
    now = time.time_ns() // 1_000_000
    pipe, batcher, shell = node.pipeline, node.batcher, node.gossip
    me = node.identity.public
    m = "meshhealth_"
    chains = chain_rows(node, now)
    name = names(node).get(me, "")  # from the genesis, before our first block too
    yield m + "node_info", (me.hex(), name, node.network.hex()), 1
    yield m + "mqtt_connected", (), int(node.mqtt.connected.is_set())

    yield m + "ingest_received_total", (), pipe.received
    yield m + "ingest_readings_total", (), pipe.sealed_readings
    yield m + "ingest_entries_accepted_total", (), batcher.accepted
    for reason, n in sorted(batcher.rejects.items()):
        yield m + "ingest_rejected_total", (reason,), n
    yield m + "ingest_backlog_messages", (), pipe.statistics()["backlog"]
    yield m + "ingest_pending_entries", (), batcher.pending
    yield m + "blocks_sealed_total", (), pipe.blocks
    yield m + "commit_seconds_total", (), pipe.commit_seconds
    yield m + "erased_readings_total", (), pipe.pruned

    for r in chains:
        labels = (r["node"], r["name"])
        yield m + "chain_height", labels, r["height"]
        yield m + "chain_confirmed_height", labels, r["confirmed"]
        yield m + "chain_unconfirmed_blocks", labels, r["unconfirmed"]
        yield m + "chain_confirmation_lag_seconds", labels, r["confirmation_lag_s"]
        yield m + "chain_missing_blocks", labels, r["missing"]
        yield m + "chain_faulty", labels, int(r["faulty"])

    states = dict.fromkeys(PEER_STATES, 0)
    for p in peer_rows(node):
        states[p["state"]] += 1
    for state, n in states.items():
        yield m + "peers", (state,), n
    core = shell.core.statistics()["peers"]
    assert isinstance(core, dict)
    for status in ("alive", "suspect", "dead"):
        yield m + "gossip_peer_liveness", (status,), core.get(status, 0)
    counters = shell.counters
    yield m + "gossip_received_bytes_total", (), counters["bytes_in"]
    yield m + "gossip_sent_bytes_total", (), counters["bytes_out"]
    yield m + "gossip_sent_messages_total", (), counters["sent"]
    yield m + "gossip_dropped_messages_total", (), counters["dropped_slow_peer"]
    yield m + "gossip_blocks_applied_total", (), counters["blocks_applied"]
    yield m + "gossip_invalid_blocks_total", (), counters["invalid_block"]
    yield m + "gossip_buffered_blocks", (), shell.buffered
    yield m + "gossip_buffered_bytes", (), shell.buffer_bytes
    yield m + "gossip_send_queued_bytes", (), shell.send_bytes
    # every chain a catch-up is after, also those not yet in the replica
    yield m + "gossip_catchup_missing_blocks", (), sum(shell.missing().values())

    store = node.store.statistics()
    yield m + "store_used_bytes", (), store["used_bytes"]
    yield m + "store_map_size_bytes", (), store["map_size"]
    yield m + "store_map_used_ratio", (), store["used_bytes"] / max(1, store["map_size"])
    yield m + "store_readings", (), store["readings"]

    for (method, code), n in sorted(node.api_requests.items()):
        yield m + "api_requests_total", (method, str(code)), n
    yield m + "api_auth_failures_total", (), node.auth_failures
    yield m + "access_logs_total", (), node.access_logs
    limited = node.limits.limited
    for reason in sorted({"rate_limited", "stranger_budget", "patient_budget", *limited}):
        yield m + "api_limited_total", (reason,), limited[reason]
    yield m + "access_refusals_unlogged_total", (), node.refusals.unlogged
    yield m + "api_nonces", (), len(node.guard.nonces)


class NodeCollector(Collector):
    """Reads a node's state into :data:`FAMILIES` whenever the registry is scraped."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return [f.empty() for f in FAMILIES]

    def collect(self) -> Iterable[Metric]:
        families = {f.name: f.empty() for f in FAMILIES}
        for name, labels, value in read(self.node):
            families[name].add_metric(labels, value)
        return list(families.values())


def node_registry(node: Node) -> CollectorRegistry:
    """A registry of its own for one node: its metrics and its process's (``process_*``)."""
    registry = CollectorRegistry()
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of everything in ``registry``."""
    return generate_latest(registry)
