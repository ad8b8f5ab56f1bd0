"""A seeded, in-process network of gossip cores: virtual clock, lossy links, partitions, crashes.

The simulator plays the I/O shell for every node: it delivers messages after
a random latency (or drops them), stores the blocks a node accepts, buffers
out-of-order ones and fires each node's timer.  Blocks are abstract (a
chain and a height): validation is not what is simulated here.  A message's
size is modelled so that bytes per node per block can be reported.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from meshhealth.gossip.messages import (
    Blocks,
    FullHeads,
    Heads,
    Message,
    NodeId,
    Pull,
    Push,
    Send,
)
from meshhealth.gossip.protocol import Gossip, GossipParams

HEADER_BYTES = 256  # a signed block header with a few links, on the wire


def message_bytes(msg: Message, block_bytes: int) -> int:
    if isinstance(msg, Push):
        return 16 + HEADER_BYTES + block_bytes
    if isinstance(msg, Blocks):
        return 24 + (msg.to_height - msg.from_height + 1) * (HEADER_BYTES + block_bytes)
    if isinstance(msg, Heads):
        return 24 + 44 * len(msg.recent)
    if isinstance(msg, FullHeads):
        return 8 + 44 * len(msg.heads)
    if isinstance(msg, Pull):
        return 56
    return 8


@dataclass
class SimNode:
    id: NodeId
    core: Gossip
    up: bool = True
    buffer: dict[tuple[NodeId, int], int] = field(default_factory=dict)  # (chain, h) -> hops
    received_at: dict[tuple[NodeId, int], tuple[float, int]] = field(default_factory=dict)


@dataclass
class Counters:
    messages: int = 0
    bytes: int = 0
    dropped: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [messages, bytes]

    def snapshot(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.by_kind.items()}


def node_id(i: int) -> NodeId:
    return i.to_bytes(32, "big")


class Simulation:
    def __init__(
        self,
        n: int,
        *,
        seed: int = 1,
        params: GossipParams | None = None,
        latency_s: tuple[float, float] = (0.005, 0.025),
        loss: float = 0.0,
        block_bytes: int = 1024,
        peers_per_node: int | None = 64,
    ) -> None:
        self.rng = random.Random(seed)
        self.params = params or GossipParams()
        self.latency, self.loss, self.block_bytes = latency_s, loss, block_bytes
        self.now = 0.0
        self.nodes = [
            SimNode(node_id(i), Gossip(node_id(i), random.Random(self.rng.random()), self.params))
            for i in range(n)
        ]
        self.index = {nd.id: i for i, nd in enumerate(self.nodes)}
        for i, nd in enumerate(self.nodes):
            if peers_per_node is None or peers_per_node >= n - 1:
                for j in range(n):
                    if j != i:
                        nd.core.add_peer(node_id(j), 0.0)
            else:
                for j in self.rng.sample(range(n), peers_per_node + 1):
                    if j != i:
                        nd.core.add_peer(node_id(j), 0.0)
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self.counters = Counters()
        self.can_talk: Callable[[int, int], bool] = lambda a, b: True
        for i in range(n):
            self._at(self.rng.random() * self.params.tick_s, self._tick_fn(i))

    # --- scheduling -------------------------------------------------------------------

    def _at(self, t: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, fn))

    def run_until(self, t: float) -> None:
        while self._events and self._events[0][0] <= t:
            when, _, fn = heapq.heappop(self._events)
            self.now = when
            fn()
        self.now = t

    def run_until_quiet(
        self, pred: Callable[[], bool], *, limit_s: float, step_s: float = 0.05
    ) -> bool:
        end = self.now + limit_s
        while self.now < end:
            if pred():
                return True
            self.run_until(self.now + step_s)
        return pred()

    def _tick_fn(self, i: int) -> Callable[[], None]:
        def tick() -> None:
            nd = self.nodes[i]
            if nd.up:
                self._send(i, nd.core.on_tick(self.now))
            self._at(self.now + self.params.tick_s, tick)

        return tick

    # --- the shell's part -----------------------------------------------------------------

    def _send(self, src: int, sends: list[Send]) -> None:
        for s in sends:
            dst = self.index[s.peer]
            size = message_bytes(s.message, self.block_bytes)
            self.counters.messages += 1
            self.counters.bytes += size
            kind = self.counters.by_kind.setdefault(type(s.message).__name__, [0, 0])
            kind[0] += 1
            kind[1] += size
            if not self.can_talk(src, dst) or self.rng.random() < self.loss:
                self.counters.dropped += 1
                continue
            delay = self.rng.uniform(*self.latency)
            self._at(self.now + delay, self._deliver_fn(src, dst, s.message))

    def _deliver_fn(self, src: int, dst: int, msg: Message) -> Callable[[], None]:
        def deliver() -> None:
            nd = self.nodes[dst]
            if not nd.up:
                return
            sid = self.nodes[src].id
            if isinstance(msg, Push):
                self._receive_block(dst, sid, msg.chain, msg.height, msg.hops, forward=True)
            elif isinstance(msg, Blocks):
                for h in range(msg.from_height, msg.to_height + 1):
                    hops = self.nodes[src].received_at.get((msg.chain, h), (0, 0))[1] + 1
                    self._receive_block(dst, sid, msg.chain, h, hops, forward=False)
            else:
                self._send(dst, nd.core.on_message(sid, msg, self.now))

        return deliver

    def _receive_block(
        self, i: int, src: NodeId, chain: NodeId, height: int, hops: int, *, forward: bool
    ) -> None:
        nd = self.nodes[i]
        core = nd.core
        if height <= core.head(chain):
            core.on_duplicate(src, self.now)
            return
        if height > core.head(chain) + 1:
            if len(nd.buffer) < 4096:
                nd.buffer[(chain, height)] = hops
            self._send(i, core.on_ahead(src, chain, height, self.now))
            return
        self._store(i, src, chain, height, hops, forward)
        nxt = height + 1
        while (chain, nxt) in nd.buffer:  # the gap is filled: apply what was waiting
            self._store(i, src, chain, nxt, nd.buffer.pop((chain, nxt)), False)
            nxt += 1

    def _store(
        self, i: int, src: NodeId | None, chain: NodeId, height: int, hops: int, forward: bool
    ) -> None:
        nd = self.nodes[i]
        nd.received_at[(chain, height)] = (self.now, hops)
        self._send(
            i, nd.core.on_block_stored(src, chain, height, self.now, hops=hops, forward=forward)
        )

    # --- what tests and benchmarks do -------------------------------------------------------

    def produce(self, i: int) -> tuple[NodeId, int]:
        """Node ``i`` seals a new block of its own chain."""
        nd = self.nodes[i]
        h = nd.core.head(nd.id) + 1
        nd.received_at[(nd.id, h)] = (self.now, 0)
        self._send(i, nd.core.on_block_stored(None, nd.id, h, self.now, hops=0))
        return nd.id, h

    def holders(self, block: tuple[NodeId, int]) -> int:
        chain, h = block
        return sum(1 for nd in self.nodes if nd.up and nd.core.head(chain) >= h)

    def live(self) -> int:
        return sum(1 for nd in self.nodes if nd.up)

    def everyone_has(self, block: tuple[NodeId, int]) -> bool:
        return self.holders(block) == self.live()

    def crash(self, i: int) -> None:
        self.nodes[i].up = False

    def recover(self, i: int) -> None:
        self.nodes[i].up = True

    def partition(self, groups: list[set[int]]) -> None:
        where = {i: g for g, members in enumerate(groups) for i in members}
        self.can_talk = lambda a, b: where.get(a, -1) == where.get(b, -2)

    def heal(self) -> None:
        self.can_talk = lambda a, b: True
