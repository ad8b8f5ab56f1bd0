"""What one client may cost this node: token buckets, the nonce cache and refusal logs.

Pure: no clock, no I/O. Every entry point takes ``now`` (seconds for the
buckets, Unix ms for the nonce cache and the refusal log), so tests drive
time by hand.

Theory of operation
-------------------
* :class:`TokenBuckets` keeps one bucket per key (a source address, a
  signer's key): ``burst`` units, refilled at ``rate`` units/s.  A request
  that costs more than the bucket holds is refused with the seconds after
  which it would pass (the ``Retry-After``).  The table holds at most
  ``max_keys`` buckets; past that the least recently used is dropped (it
  has had the longest to refill, so dropping it changes least).  An hourly
  *budget* is a bucket with ``burst = X`` and ``rate = X / 3600``: over any
  interval of ``t`` seconds it lets through at most ``X + X * t / 3600``.
* :class:`NonceCache` remembers each accepted signed request's nonce until
  its signed time has left the clock window (after that the window check
  refuses a replay anyway).  Nonces are kept per signer key and counted per
  source (an IPv6 source by its /48); a key or a source at its own cap is
  refused (429), never anyone else.  Past 80 % of the total, only a source
  holding less than an equal share of the total (counting the newcomer) is
  still taken, up to the total, or a key already holding one but fewer than
  ``key_floor`` (8) nonces (a reader sharing an address with a flood);
  fresh keys buy nothing, and no source passes its own cap.  To lock a new
  source out, a flood must hold the whole total: at least
  ``total / min(per_source, what one source may hold live)`` sources, each
  at its cap (a nonce lives at most two clock windows: its signed time may
  be one window ahead), and the lockout ends at most two windows after the
  flood stops.
* :class:`RefusalLog` decides which refused reads become an access log on
  chain.  The first refusal of a (reader, patient, reason) in a period is
  logged at once; the rest of that period are counted, and one log with
  their count (and the first of them as evidence) is written when the
  period ends.  At most ``per_patient`` keys per patient and ``total`` keys
  in all are logged per period; refusals beyond are only counted
  (``unlogged``), except a read that served data, which past the caps is
  folded into its reader's summary for the period (one log per reader key
  and period: bounded by the reader keys the per-key and per-source rate
  limits let in).  The caps are kept per pool: strangers refused
  ``no_grant`` fill only their own, never those of the patient's grantees.
  So strangers grow a patient's trail by at most ``2 * per_patient``
  refusal logs per period, however many and however often.  Readers a
  registered patient knows (itself, its grantees) are outside the caps, so
  strangers cannot crowd them out: their kinds are bounded by that
  patient's grants.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from meshhealth.errors import RateLimited

K = TypeVar("K")
E = TypeVar("E")


class TokenBuckets(Generic[K]):
    """One token bucket per key: ``burst`` units, refilled at ``rate`` units per second."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 65_536) -> None:
        if rate <= 0 or burst <= 0 or max_keys < 1:
            raise ValueError("a token bucket needs a positive rate, burst and table size")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._b: OrderedDict[K, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def _level(self, key: K, now: float) -> float:
        tokens, at = self._b.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def wait_s(self, key: K, cost: float, now: float) -> float:
        """0 if ``key`` may spend ``cost`` now, else the seconds until it may (takes nothing;
        a cost above the burst never passes: ``inf``)."""
        if cost > self.burst:
            return math.inf
        lack = cost - self._level(key, now)
        return 0.0 if lack <= 0 else lack / self.rate

    def take(self, key: K, cost: float, now: float) -> None:
        """Spend ``cost`` (may go below zero: the caller already decided)."""
        self._b[key] = (self._level(key, now) - cost, now)
        self._b.move_to_end(key)
        while len(self._b) > self.max_keys:
            self._b.popitem(last=False)

    def try_take(self, key: K, cost: float, now: float) -> float:
        """Spend ``cost`` and return 0, or spend nothing and return the wait in seconds."""
        wait = self.wait_s(key, cost, now)
        if wait == 0:
            self.take(key, cost, now)
        return wait

    def __len__(self) -> int:
        return len(self._b)


def hourly(budget: float, *, max_keys: int = 65_536) -> TokenBuckets[K]:
    """A budget of ``budget`` units per hour per key (burst: one hour's worth)."""
    return TokenBuckets(budget / 3600.0, budget, max_keys=max_keys)


# what one remembered nonce costs in memory, roughly (CPython dict slot, heap tuple, bytes)
NONCE_BYTES = 256


class NonceFull(RateLimited):
    """The nonce cache refuses this key or source for now (the API answers 429)."""

    def __init__(self, who: str, retry_after_s: float) -> None:
        super().__init__(
            "rate_limited",
            f"too many signed requests from this {who} in the window; retry shortly",
            retry_after_s,
        )
        self.who = who


def nonce_source(source: str) -> str:
    """What the nonce cache counts as one source: an IPv6 address or /64 is counted by
    its /48 (one site's allocation: a /48 holds 65,536 /64s), anything else as it is."""
    if ":" not in source:
        return source
    try:
        net = ipaddress.ip_network(source, strict=False)
    except ValueError:
        return source
    if net.version != 6 or net.prefixlen <= 48:
        return source
    return str(net.supernet(new_prefix=48))


class NonceCache:
    """Nonces of accepted signed requests, per signer key, until their window is over."""

    def __init__(
        self,
        window_ms: int,
        *,
        total: int = 65_536,
        per_key: int = 4_096,
        per_source: int = 8_192,
        key_floor: int = 8,
    ) -> None:
        self.window_ms, self.total, self.key_floor = window_ms, total, key_floor
        self.per_key, self.per_source = min(per_key, total), min(per_source, total)
        self.soft = total - total // 5  # past this, only light keys and sources
        self._keys: dict[bytes, dict[bytes, int]] = {}  # key -> nonce -> expiry ms
        self._sources: Counter[str] = Counter()
        self._heap: list[tuple[int, bytes, bytes, str]] = []  # (expiry, key, nonce, source)
        self.refused: Counter[str] = Counter()  # "key" / "source" / "full"

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def bytes_held(self) -> int:
        return len(self._heap) * NONCE_BYTES

    def seen(self, key: bytes, nonce: bytes, now_ms: int) -> bool:
        self._expire(now_ms)
        return nonce in self._keys.get(key, {})

    def add(self, key: bytes, nonce: bytes, t_ms: int, source: str, now_ms: int) -> None:
        """Remember a checked request's nonce, or raise :class:`NonceFull`."""
        self._expire(now_ms)
        source = nonce_source(source)
        mine = self._keys.get(key, {})
        retry = (self._heap[0][0] - now_ms) / 1000 if self._heap else 1.0
        if len(mine) >= self.per_key:
            self._refuse("key", max(0.001, (min(mine.values()) - now_ms) / 1000))
        if self._sources[source] >= self.per_source:
            self._refuse("source", max(0.001, retry))
        n = len(self._heap)
        if n >= self.soft:
            # shared by source only: fresh keys are free to make, sources are not (a share
            # by key let a flood of fresh keys drive every key's share down to one nonce)
            # by source only, with a floor for a key seen in the window (a reader behind
            # the same address as a flood keeps a few requests in flight)
            sources = len(self._sources) + (source not in self._sources)
            over = self._sources[source] >= self.total // sources
            if n >= self.total or (over and not 0 < len(mine) < self.key_floor):
                self._refuse("full", max(0.001, retry))
        expiry = t_ms + self.window_ms
        self._keys.setdefault(key, {})[nonce] = expiry
        self._sources[source] += 1
        heapq.heappush(self._heap, (expiry, key, nonce, source))

    def _refuse(self, who: str, retry_s: float) -> None:
        self.refused[who] += 1
        raise NonceFull({"full": "source or key"}.get(who, who), retry_s)

    def _expire(self, now_ms: int) -> None:
        heap = self._heap
        while heap and heap[0][0] < now_ms:
            _, key, nonce, source = heapq.heappop(heap)
            mine = self._keys.get(key)
            if mine is not None:
                mine.pop(nonce, None)
                if not mine:
                    del self._keys[key]
            self._sources[source] -= 1
            if self._sources[source] <= 0:
                del self._sources[source]


@dataclass
class _Refusals(Generic[E]):
    period: int
    pending: int = 0  # refusals after the logged first one
    amount: int = 0  # what they add up to (readings served, for reads)
    evidence: E | None = None  # the first of them


@dataclass
class RefusalLog(Generic[E]):
    """Which refused reads are logged on chain: see the module's theory of operation."""

    period_ms: int = 3_600_000
    per_patient: int = 16
    total: int = 4_096
    unlogged: int = 0
    _open: dict[tuple[bytes, bytes, str], _Refusals[E]] = field(default_factory=dict)
    _per_patient: Counter[tuple[bytes, str]] = field(default_factory=Counter)
    _logged: Counter[str] = field(default_factory=Counter)  # keys logged this period, per pool
    _period: int = -1

    def note(
        self,
        reader: bytes,
        patient: bytes,
        reason: str,
        evidence: E,
        now_ms: int,
        *,
        capped: bool = True,
        amount: int = 0,
        pool: str = "strangers",
        served: bool = False,
    ) -> bool:
        """A refusal happened: True if it is to be logged now (the first of its kind this
        period); else it is counted for the period's summary, or dropped past the caps.
        ``capped=False``: a reader a registered patient knows (itself, a grantee), whose
        kinds are bounded by the patient's grants, is logged whatever strangers did.
        ``pool``: whose caps this counts against (strangers refused ``no_grant`` must not
        use up the caps of an unregistered patient's grantees).  ``served=True``: a read
        that served data, never dropped: past the caps it is folded into the period's
        summary of its (reader, patient, reason), however many there are."""
        period = now_ms // self.period_ms
        if period != self._period:
            self._period = period
            self._per_patient.clear()
            self._logged.clear()
        key = (reader, patient, reason)
        r = self._open.get(key)
        if r is not None and r.period == period:
            r.pending += 1
            r.amount += amount
            if r.evidence is None:
                r.evidence = evidence
            return False
        if capped and (
            self._per_patient[patient, pool] >= self.per_patient or self._logged[pool] >= self.total
        ):
            if not served:
                self.unlogged += 1
                return False
            if r is not None:
                self.unlogged += r.pending
            self._open[key] = _Refusals(period, 1, amount, evidence)  # summarised, not dropped
            return False
        if r is not None:  # an older period's, not flushed (the caller flushes first)
            self.unlogged += r.pending
        self._open[key] = _Refusals(period)
        if capped:
            self._per_patient[patient, pool] += 1
            self._logged[pool] += 1
        return True

    def due(self, now_ms: int) -> list[tuple[tuple[bytes, bytes, str], int, E, int]]:
        """The summaries of periods that are over: ((reader, patient, reason), count, the
        first counted refusal's evidence, the sum of their amounts); each returned once."""
        period = now_ms // self.period_ms
        out = []
        for key, r in list(self._open.items()):
            if r.period < period:
                del self._open[key]
                if r.pending and r.evidence is not None:
                    out.append((key, r.pending, r.evidence, r.amount))
        return out

    def __len__(self) -> int:
        return len(self._open)
