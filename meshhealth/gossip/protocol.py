"""The gossip protocol core: a pure state machine (no sockets, no clock, no RNG of its own).

Theory of operation
-------------------
Every node holds a replica of every chain.  ``heads[chain]`` is the highest
height held *contiguously* from 0.  Two mechanisms move blocks:

* **Eager push.**  When a node stores a new block (its own, or one pushed to
  it), it pushes the block to ``fanout`` random live peers, except the one
  it came from.  Pushes carry a hop count.  A node forwards a block once, so a
  block costs about ``fanout`` messages per node, and it reaches most nodes
  in O(log N) hops.
* **Anti-entropy.**  Every ``tick_s`` a node sends a :class:`Heads` digest to
  one random peer.  The digest has the heads that advanced recently
  (bounded) and an order-independent hash of the whole vector.  The peer
  answers with its own digest, and each side pulls, in bounded batches,
  what the other has and it lacks.  If the hashes differ but the recent
  lists explain nothing, the full vector is requested.  This repairs
  everything push missed: lost messages, partitions, crashed or new nodes.

When a connection comes up, both sides ask for each other's full head
vector (:meth:`Gossip.on_connected`), so a node that restarts, or starts
with a wiped data dir, learns at once how far every chain got, its own
included.  Nodes also swap the addresses they know (peer exchange), so a
node configured with one bootstrap peer finds the rest.

Liveness (SWIM-like suspicion): a peer that fails to answer a digest
becomes *suspect*, then *dead* after ``dead_after`` consecutive failures.
Hearing anything from it makes it *alive* again.  Dead peers are left out
of fanout and probed only now and then, with a growing back-off.  A peer
the shell catches sending invalid data is penalised: it gets the same
back-off and is avoided.

The shell owns block bytes and validation.  It calls
:meth:`Gossip.on_block_stored` after it commits a block,
:meth:`Gossip.on_ahead` when a block arrives whose parent is missing (it
keeps that block in a bounded buffer), :meth:`Gossip.on_message` for
control messages and :meth:`Gossip.on_tick` on the timer.  Every call
returns the :class:`Send` actions to perform.
"""

from __future__ import annotations

import hashlib
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum

from meshhealth.gossip.messages import (
    Blocks,
    FullHeads,
    FullHeadsRequest,
    Heads,
    Message,
    NodeId,
    PeerList,
    Pull,
    Push,
    Send,
)


@dataclass(frozen=True)
class GossipParams:
    fanout: int = 4
    tick_s: float = 0.2
    recent_window_s: float = 30.0
    max_recent: int = 64
    pull_batch: int = 64
    reply_timeout_s: float = 1.0
    dead_after: int = 3  # consecutive unanswered digests
    max_backoff_s: float = 30.0
    pull_timeout_s: float = 2.0
    # a peer whose pull for a chain went unanswered: its claims about that chain are
    # ignored this long, and the catch-up goes on from the other peers' claims
    distrust_s: float = 10.0
    # ... doubled for each further pull of that chain it leaves without progress, up to this
    # (a new connection to it starts it afresh: a partition that healed is no lie)
    max_distrust_s: float = 120.0


class PeerStatus(Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass
class Peer:
    id: NodeId
    status: PeerStatus = PeerStatus.ALIVE
    last_heard: float = 0.0
    failures: int = 0
    awaiting_since: float | None = None  # a digest sent, reply pending
    backoff_until: float = 0.0
    backoff_s: float = 0.0
    penalties: int = 0


@dataclass(slots=True)
class _Pull:
    """The batch of one chain in flight: asked of ``src``, heights ``start..end``."""

    start: int
    end: int
    deadline: float
    src: NodeId
    # a block of this chain from ``src`` was stored since this pull was sent: only that
    # counts as an answer (a reply of blocks we hold, or of junk, is no answer at all)
    progressed: bool = False


def _entry_hash(chain: NodeId, height: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(chain + height.to_bytes(8, "big"), digest_size=16).digest(), "big"
    )


@dataclass
class Statistics:
    pushes_sent: int = 0
    duplicates: int = 0
    pulls_sent: int = 0
    pull_timeouts: int = 0
    claims_dropped: int = 0
    digests_sent: int = 0
    full_heads_sent: int = 0
    full_heads_requested: int = 0


@dataclass
class Gossip:
    me: NodeId
    rng: random.Random
    params: GossipParams = field(default_factory=GossipParams)
    heads: dict[NodeId, int] = field(default_factory=dict)
    peers: dict[NodeId, Peer] = field(default_factory=dict)
    stats: Statistics = field(default_factory=Statistics)
    _advanced: OrderedDict[NodeId, float] = field(default_factory=OrderedDict)
    _digest: int = 0
    # chain -> the batch in flight
    _pulls: dict[NodeId, _Pull] = field(default_factory=dict)
    # chain -> {peer: the head it claims for that chain}; one claim per peer and chain, so
    # one peer's lie cannot hide another's truth (catch-up asks the others when it stalls)
    _want: dict[NodeId, dict[NodeId, int]] = field(default_factory=dict)
    # (peer, chain) -> until when that peer's claims about that chain are ignored
    _distrust: dict[tuple[NodeId, NodeId], float] = field(default_factory=dict)
    # (peer, chain) -> pulls in a row it left without progress (cleared by progress)
    _strikes: dict[tuple[NodeId, NodeId], int] = field(default_factory=dict)
    _alive_cache: list[NodeId] | None = None
    _cache_until: float = 0.0
    # peer exchange: where each known peer can be dialed
    addresses: dict[NodeId, str] = field(default_factory=dict)

    # --- membership -------------------------------------------------------------

    def add_peer(self, peer: NodeId, now: float) -> None:
        if peer != self.me and peer not in self.peers:
            self.peers[peer] = Peer(peer, last_heard=now)
            self._alive_cache = None

    def forget(self, peer: NodeId) -> None:
        """Drop a peer (an observer that left) and its claims."""
        if self.peers.pop(peer, None) is not None:
            self._alive_cache = None
        self.addresses.pop(peer, None)
        for chain, claims in list(self._want.items()):
            claims.pop(peer, None)
            if not claims:
                del self._want[chain]
        self._distrust = {k: t for k, t in self._distrust.items() if k[0] != peer}
        self._strikes = {k: n for k, n in self._strikes.items() if k[0] != peer}

    def on_connected(self, peer: NodeId, now: float, *, fresh: bool = True) -> list[Send]:
        """A connection to ``peer`` came up: compare full head vectors at once.

        This is how a restarted or wiped node learns, before it seals
        anything, how far its own chain (and every other) already got.
        ``fresh``: no other connection to ``peer`` was up (it was cut off, or
        partitioned away), so its pulls that went unanswered are forgiven.
        """
        self._heard(peer, now)
        if fresh:
            self._distrust = {k: t for k, t in self._distrust.items() if k[0] != peer}
            self._strikes = {k: n for k, n in self._strikes.items() if k[0] != peer}
        self.stats.full_heads_requested += 1
        return [Send(peer, FullHeadsRequest())]

    # --- peer exchange -----------------------------------------------------------

    def note_address(self, peer: NodeId, url: str) -> None:
        if peer != self.me:
            self.addresses[peer] = url

    def peer_list(self, my_url: str, limit: int = 256) -> PeerList:
        """Our own address first, then the addresses we know."""
        entries = [(self.me, my_url)] if my_url else []
        entries += list(self.addresses.items())[: limit - len(entries)]
        return PeerList(tuple(entries))

    def learn_addresses(self, msg: PeerList) -> list[tuple[NodeId, str]]:
        """Addresses of peers we had none for: the shell dials these."""
        new = [(p, url) for p, url in msg.peers if p != self.me and p not in self.addresses]
        for p, url in new:
            self.addresses[p] = url
        return new

    def _heard(self, peer: NodeId, now: float) -> Peer:
        p = self.peers.get(peer)
        if p is None:
            self.add_peer(peer, now)
            p = self.peers[peer]
        if p.status is not PeerStatus.ALIVE:
            self._alive_cache = None
        p.status, p.last_heard, p.failures, p.awaiting_since = PeerStatus.ALIVE, now, 0, None
        if p.penalties == 0:
            p.backoff_s, p.backoff_until = 0.0, 0.0
        return p

    def penalise(self, peer: NodeId, now: float) -> None:
        """The shell caught ``peer`` sending invalid data: avoid it for a growing while."""
        p = self.peers.get(peer)
        if p is None:
            return
        p.penalties += 1
        p.backoff_s = min(self.params.max_backoff_s, max(1.0, p.backoff_s * 2))
        p.backoff_until = now + p.backoff_s
        p.status = PeerStatus.SUSPECT
        self._alive_cache = None

    def _live(self, now: float) -> list[NodeId]:
        """Peers eligible for fanout: not dead, not backing off (cached between changes)."""
        if self._alive_cache is None or now >= self._cache_until:
            live, until = [], float("inf")
            for p in self.peers.values():
                if p.status is PeerStatus.DEAD:
                    continue
                if p.backoff_until > now:
                    until = min(until, p.backoff_until)
                    continue
                live.append(p.id)
            self._alive_cache, self._cache_until = live, until
        return self._alive_cache

    def _sample(self, k: int, now: float, exclude: NodeId | None = None) -> list[NodeId]:
        live = self._live(now)
        if len(live) <= k + 1:
            return [p for p in live if p != exclude][:k]
        out: list[NodeId] = []
        while len(out) < k:
            p = live[self.rng.randrange(len(live))]
            if p != exclude and p not in out:
                out.append(p)
        return out

    # --- heads ------------------------------------------------------------------

    def head(self, chain: NodeId) -> int:
        return self.heads.get(chain, -1)

    def _advance(self, chain: NodeId, height: int, now: float) -> None:
        old = self.heads.get(chain, -1)
        if old >= 0:
            self._digest ^= _entry_hash(chain, old)
        self._digest ^= _entry_hash(chain, height)
        self.heads[chain] = height
        self._advanced[chain] = now
        self._advanced.move_to_end(chain)
        pull = self._pulls.get(chain)
        if pull is not None and height >= pull.end:
            del self._pulls[chain]

    def restore(self, heads: dict[NodeId, int]) -> None:
        """Start from the heads a replica already holds (not announced as recent)."""
        for chain, height in heads.items():
            old = self.heads.get(chain, -1)
            if old >= 0:
                self._digest ^= _entry_hash(chain, old)
            self._digest ^= _entry_hash(chain, height)
            self.heads[chain] = height

    def digest(self) -> bytes:
        return self._digest.to_bytes(16, "big")

    def _recent(self, now: float) -> tuple[tuple[NodeId, int], ...]:
        out: list[tuple[NodeId, int]] = []
        for chain in reversed(self._advanced):
            if (
                now - self._advanced[chain] > self.params.recent_window_s
                or len(out) >= self.params.max_recent
            ):
                break
            out.append((chain, self.heads[chain]))
        return tuple(out)

    # --- blocks -------------------------------------------------------------------

    def on_block_stored(
        self,
        src: NodeId | None,
        chain: NodeId,
        height: int,
        now: float,
        *,
        hops: int = 0,
        forward: bool = True,
    ) -> list[Send]:
        """The shell committed block ``(chain, height)``; it must be contiguous."""
        if src is not None:
            self._heard(src, now)
        if height <= self.head(chain):
            self.stats.duplicates += 1
            return []
        if height != self.head(chain) + 1:
            raise ValueError(f"block {height} stored above head {self.head(chain)}: not contiguous")
        pull = self._pulls.get(chain)
        if pull is not None and src == pull.src:
            pull.progressed = True  # it moved our head: the one answer that counts
            self._strikes.pop((src, chain), None)
        self._advance(chain, height, now)
        sends = self._continue_pull(chain, now)
        if forward:
            pushes = [
                Send(p, Push(chain, height, hops + 1))
                for p in self._sample(self.params.fanout, now, src)
            ]
            self.stats.pushes_sent += len(pushes)
            sends += pushes
        return sends

    def on_duplicate(self, src: NodeId, now: float) -> None:
        self._heard(src, now)
        self.stats.duplicates += 1

    def on_ahead(self, src: NodeId, chain: NodeId, height: int, now: float) -> list[Send]:
        """A block above our head arrived (the shell buffers it): pull the gap from ``src``."""
        self._heard(src, now)
        return self._pull(src, chain, height - 1, now)

    def _pull(self, src: NodeId, chain: NodeId, upto: int, now: float) -> list[Send]:
        """Remember ``src`` claims ``chain`` reaches ``upto``; one batch in flight per chain.

        Claims about our own chain are not taken here: only the shell can check them
        (against our own signed header), and it calls :meth:`want` once one is backed.
        """
        if chain == self.me or upto <= self.head(chain):
            return []
        until = self._distrust.get((src, chain))
        if until is not None:
            if until > now:
                return []
            del self._distrust[(src, chain)]
        return self.want(src, chain, upto, now)

    def want(self, src: NodeId, chain: NodeId, upto: int, now: float) -> list[Send]:
        """Pull ``chain`` up to ``upto`` from ``src`` (a claim the caller accepts)."""
        if upto <= self.head(chain):
            return []
        until = self._distrust.get((src, chain))
        if until is not None and until > now:
            return []  # it was asked and did not deliver: the others' turn (see _expire_pulls)
        claims = self._want.setdefault(chain, {})
        if upto > claims.get(src, -1):
            claims[src] = upto
        pending = self._pulls.get(chain)
        if pending is None:
            return self._issue_pull(chain, now)
        if pending.deadline > now:
            return []
        # past its deadline, before the tick saw it: expire it here, as the tick would (a
        # claim renewed every tick must not re-issue an unanswered pull to its liar)
        return self._expire(chain, pending, now)

    def wanted(self) -> dict[NodeId, int]:
        """Per chain, the highest head a peer claims that we have not reached."""
        return {c: max(claims.values()) for c, claims in self._want.items() if claims}

    def on_blocks_arrived(
        self,
        src: NodeId,
        chain: NodeId,
        to_height: int,
        now: float,
        *,
        from_height: int | None = None,
    ) -> list[Send]:
        """A pull reply arrived (its blocks are still to be checked).

        During a catch-up, ask for the next batch right away, from where this
        reply ends (a reply may be shorter than asked), so it is on its way
        while this one is verified and applied.  Only a reply to the pull in
        flight does this: from the peer asked, starting where it was asked
        and within its range (the shell passes ``from_height``).  Anything
        else (a Blocks frame nobody asked for) changes nothing here: the
        pull stays with the peer it was sent to.  Arriving is no answer
        either: only a block that moves our head does (:class:`_Pull`), and
        the next batch keeps this one's deadline until one has.
        """
        self._heard(src, now)
        pending = self._pulls.get(chain)
        if pending is None or pending.src != src:
            return []
        if from_height is not None and from_height != pending.start:
            return []
        if to_height > pending.end or to_height <= self.head(chain):
            return []
        claims = self._want.get(chain)
        if not claims or claims.get(src, -1) <= to_height:
            return []
        deadline = now + self.params.pull_timeout_s if pending.progressed else pending.deadline
        return self._issue_pull(chain, now, start=to_height + 1, src=src, deadline=deadline)

    def _source(
        self, chain: NodeId, prefer: NodeId | None = None, avoid: NodeId | None = None
    ) -> NodeId | None:
        """Whom to pull ``chain`` from: ``prefer`` if its claim is still ahead of us, else
        the peer with the lowest claim ahead of us (the least a liar can make us wait),
        other than ``avoid`` if there is another."""
        head = self.head(chain)
        claims = self._want.get(chain, {})
        for peer in [p for p, upto in claims.items() if upto <= head]:
            del claims[peer]
        if not claims:
            self._want.pop(chain, None)
            return None
        if prefer is not None and prefer in claims:
            return prefer
        others = [p for p in claims if p != avoid] or list(claims)
        return min(others, key=lambda p: (claims[p], p))

    def _issue_pull(
        self,
        chain: NodeId,
        now: float,
        start: int | None = None,
        src: NodeId | None = None,
        *,
        avoid: NodeId | None = None,
        deadline: float | None = None,
    ) -> list[Send]:
        src = self._source(chain, src, avoid)
        if src is None:
            self._pulls.pop(chain, None)
            return []
        upto = self._want[chain][src]
        start = self.head(chain) + 1 if start is None else start
        end = min(upto, start + self.params.pull_batch - 1)
        deadline = now + self.params.pull_timeout_s if deadline is None else deadline
        self._pulls[chain] = _Pull(start, end, deadline, src)
        self.stats.pulls_sent += 1
        return [Send(src, Pull(chain, start, end))]

    def _continue_pull(self, chain: NodeId, now: float) -> list[Send]:
        """After a stored block: finish, or ask for the next batch of a catch-up."""
        if chain not in self._want:
            return []
        if self._source(chain) is None:
            self._pulls.pop(chain, None)
            return []
        if chain in self._pulls:
            return []
        return self._issue_pull(chain, now)

    def _expire_pulls(self, now: float) -> list[Send]:
        """Pulls past their deadline.  A peer that did not move our head (no reply, or a
        reply of blocks we hold, or of junk) loses its claim about that chain for
        ``distrust_s``; one that did, but not all the way, keeps it.  Either way the next
        batch goes to another peer claiming that chain, if there is one, so a peer that
        answers slowly or not at all cannot keep the catch-up to itself."""
        out: list[Send] = []
        for chain, pull in list(self._pulls.items()):
            if pull.deadline <= now:
                out += self._expire(chain, pull, now)
        if len(self._distrust) > 1024 or len(self._strikes) > 1024:
            self._distrust = {k: t for k, t in self._distrust.items() if t > now}
            self._strikes = {k: n for k, n in self._strikes.items() if k in self._distrust}
        return out

    def _expire(self, chain: NodeId, pull: _Pull, now: float) -> list[Send]:
        self.stats.pull_timeouts += 1
        del self._pulls[chain]
        if not pull.progressed:
            claims = self._want.get(chain, {})
            if claims.pop(pull.src, None) is not None:
                self.stats.claims_dropped += 1
            key = (pull.src, chain)
            strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
            hold = self.params.distrust_s * 2 ** min(strikes - 1, 32)
            self._distrust[key] = now + min(self.params.max_distrust_s, hold)
        return self._issue_pull(chain, now, avoid=pull.src)

    # --- control messages ---------------------------------------------------------

    def on_message(self, src: NodeId, msg: Message, now: float) -> list[Send]:
        self._heard(src, now)
        if isinstance(msg, Heads):
            return self._on_heads(src, msg, now)
        if isinstance(msg, FullHeadsRequest):
            self.stats.full_heads_sent += 1
            return [Send(src, FullHeads(tuple(self.heads.items())))]
        if isinstance(msg, FullHeads):
            out: list[Send] = []
            for chain, h in msg.heads:
                out += self._pull(src, chain, h, now)
            return out
        if isinstance(msg, Pull):
            top = min(
                msg.to_height, self.head(msg.chain), msg.from_height + self.params.pull_batch - 1
            )
            if top < msg.from_height:
                return []
            return [Send(src, Blocks(msg.chain, msg.from_height, top, 0))]
        raise TypeError(f"the shell handles {type(msg).__name__} itself")

    def _on_heads(self, src: NodeId, msg: Heads, now: float) -> list[Send]:
        out: list[Send] = []
        explained = False
        for chain, h in msg.recent:
            mine = self.head(chain)
            explained |= h != mine
            if h > mine:
                out += self._pull(src, chain, h, now)
        if not msg.reply:
            out.append(Send(src, Heads(self._recent(now), self.digest(), reply=True)))
            self.stats.digests_sent += 1
        elif msg.digest != self.digest() and not explained:
            # the difference is in a chain that did not advance recently: compare everything
            out.append(Send(src, FullHeadsRequest()))
        return out

    # --- timer ----------------------------------------------------------------------

    def on_tick(self, now: float) -> list[Send]:
        """Liveness bookkeeping, then one anti-entropy digest to a random peer."""
        for p in self.peers.values():
            if (
                p.awaiting_since is not None
                and now - p.awaiting_since > self.params.reply_timeout_s
            ):
                p.awaiting_since = None
                p.failures += 1
                new = (
                    PeerStatus.DEAD if p.failures >= self.params.dead_after else PeerStatus.SUSPECT
                )
                if new is not p.status:
                    p.status = new
                    self._alive_cache = None
                if new is PeerStatus.DEAD:
                    p.backoff_s = min(self.params.max_backoff_s, max(1.0, p.backoff_s * 2))
                    p.backoff_until = now + p.backoff_s
        out = self._expire_pulls(now)
        target = self._anti_entropy_target(now)
        if target is None:
            return out
        peer = self.peers[target]
        if peer.awaiting_since is None:
            peer.awaiting_since = now
        self.stats.digests_sent += 1
        return [*out, Send(target, Heads(self._recent(now), self.digest(), reply=False))]

    def _anti_entropy_target(self, now: float) -> NodeId | None:
        """Mostly a live peer; now and then a dead one whose back-off expired (recovered?)."""
        if self.rng.random() < 0.1:
            dead = [
                p
                for p in self.peers.values()
                if p.status is PeerStatus.DEAD and p.backoff_until <= now
            ]
            if dead:
                p = dead[self.rng.randrange(len(dead))]
                p.backoff_s = min(self.params.max_backoff_s, max(1.0, p.backoff_s * 2))
                p.backoff_until = now + p.backoff_s
                return p.id
        live = self._sample(1, now)
        return live[0] if live else None

    def statistics(self) -> dict[str, object]:
        by_status: dict[str, int] = {}
        for p in self.peers.values():
            by_status[p.status.value] = by_status.get(p.status.value, 0) + 1
        return {"heads": len(self.heads), "peers": by_status, **self.stats.__dict__}
