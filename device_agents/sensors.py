"""Simulated wearable sensors: a small, seeded model of one patient's physiology.

Theory of operation
-------------------
A :class:`PatientPhysiology` draws per-patient constants from ``random.Random(seed)``
(resting heart rate, blood-pressure set points, a chronotype shift of up to +-1 h, ...)
and then runs two independent latent processes, each with its own child RNG so that
neither depends on how the caller interleaves its calls:

* **Activity** is a piecewise-constant Markov chain of *segments*: rest, walk or
  exercise.  Awake, rest lasts ~30 min (exponential) and is followed by a walk
  (2-30 min) or, rarely, exercise (10-45 min); asleep (23:00-06:30 local, UTC
  shifted by the chronotype) rest segments are long and walks are rare and short.
  Each segment has a target *activity level* (rest 0, walk 0.25-0.5, exercise
  0.75-1.0) and a step cadence.  The level the vitals see follows the target as a
  first-order lag (fast rise, slower recovery), evaluated analytically, so the state
  at any instant costs one ``exp`` and a jump of hours only creates the few segments
  it spans.
* **Episodes** (tachycardia, desaturation, fever) start as a Poisson process with
  ``episode_rate_per_day`` events per day, counted in episode-free time (episodes
  never overlap).  Each has a smooth onset/offset envelope ``e(t)`` in [0, 1] and a
  peak drawn per episode.

Each vital at time ``t`` = baseline + circadian cosine (HR, BP, RR lowest ~03:00,
temperature ~05:00) + activity gain + episode effect + slow ultradian "wander" (two
sinusoids) + noise.  The noise is a hash of (seed, channel, t), not an RNG draw, so a
value depends only on the seed, the first call's time (the simulation origin) and
``t``: re-reading an earlier instant within ``HISTORY_MS`` gives the same value.
Steps are the integral of the cadence over the minute *ending* at ``t``.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["HISTORY_MS", "STREAMS", "PatientPhysiology", "StreamSpec", "samples"]


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """Static description of one vital-sign stream."""

    name: str
    unit: str  # UCUM code
    period_ms: int  # native sampling period
    decimals: int  # values are rounded to this many decimals
    components: int  # values per sample (bp: systolic, diastolic)


STREAMS: dict[str, StreamSpec] = {
    spec.name: spec
    for spec in (
        StreamSpec("hr", "/min", 1_000, 0, 1),
        StreamSpec("spo2", "%", 1_000, 0, 1),
        StreamSpec("temp", "Cel", 60_000, 2, 1),
        StreamSpec("bp", "mm[Hg]", 300_000, 0, 2),
        StreamSpec("rr", "/min", 5_000, 0, 1),
        StreamSpec("steps", "{steps}", 60_000, 0, 1),
    )
}

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
HISTORY_MS = 2 * DAY_MS  # how far back from the newest time values stay exact

_Reader = Callable[[int], tuple[float, ...]]
_MASK64 = (1 << 64) - 1
_TAU_UP_MS = 40_000.0  # activity level rise time constant
_TAU_DOWN_MS = 120_000.0  # recovery time constant
_REST, _WALK, _EXERCISE = 0, 1, 2
_HR, _SPO2, _TEMP, _SYS, _DIA, _RR, _STEPS = range(7)  # noise / wander channels
_WANDER_AMPLITUDE = (2.0, 0.4, 0.05, 3.0, 2.0, 0.5, 0.0)
_TURN = 2 * math.pi
# ranges of (omega, phase) of the two wander sinusoids: periods 40-90 and 100-240 min
_WANDER_RANGES = (
    (_TURN / (90.0 * MINUTE_MS), _TURN / (40.0 * MINUTE_MS)),
    (0.0, _TURN),
    (_TURN / (240.0 * MINUTE_MS), _TURN / (100.0 * MINUTE_MS)),
    (0.0, _TURN),
)


def _noise(key: int, t_ms: int) -> float:
    """Deterministic triangular noise in [-1, 1) for (key, t_ms) (splitmix64 hash)."""
    z = (key + t_ms * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return ((z & 0xFFFFFFFF) + (z >> 32)) / 4294967296.0 - 1.0


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _spec(stream: str) -> StreamSpec:
    try:
        return STREAMS[stream]
    except KeyError:
        raise ValueError(f"unknown stream {stream!r}; one of {sorted(STREAMS)}") from None


@dataclass(slots=True)
class _Segment:
    """One activity bout: constant target level and cadence over [start, end)."""

    start: int
    end: int
    kind: int
    target: float
    level0: float  # lagged level at `start`
    tau_ms: float
    cadence: float  # steps per minute

    def level(self, t_ms: int) -> float:
        dt = t_ms - self.start
        if dt <= 0:
            return self.level0
        return self.target + (self.level0 - self.target) * math.exp(-dt / self.tau_ms)


_Range = tuple[float, float]
# kind: (weight, duration, rise, fall (all minutes), peak HR bpm / SpO2 nadir % / temp Cel)
_EPISODE_KINDS: dict[str, tuple[float, _Range, _Range, _Range, _Range]] = {
    "tachycardia": (0.4, (3.0, 10.0), (0.3, 0.5), (0.5, 1.5), (125.0, 165.0)),
    "desaturation": (0.4, (4.0, 15.0), (0.5, 1.5), (1.0, 2.0), (85.0, 90.5)),
    "fever": (0.2, (240.0, 600.0), (45.0, 90.0), (60.0, 120.0), (38.7, 39.3)),
}


@dataclass(frozen=True, slots=True)
class _Episode:
    kind: str
    start: int
    end: int
    rise_ms: int
    fall_ms: int
    peak: float

    def envelope(self, t_ms: int) -> float:
        """0 outside the episode, smoothstep ramps to 1 at the plateau."""
        if t_ms < self.start or t_ms >= self.end:
            return 0.0
        x = min(1.0, (t_ms - self.start) / self.rise_ms, (self.end - t_ms) / self.fall_ms)
        return x * x * (3.0 - 2.0 * x)


class PatientPhysiology:
    """Seeded, stateful simulator of one patient's physiology."""

    def __init__(self, seed: int, *, episode_rate_per_day: float = 2.0) -> None:
        if not (math.isfinite(episode_rate_per_day) and episode_rate_per_day >= 0):
            raise ValueError(f"episode_rate_per_day must be >= 0, got {episode_rate_per_day}")
        rng = random.Random(seed)
        self._hr_base = rng.uniform(55.0, 80.0)
        self._hr_circ = rng.uniform(5.0, 8.0)
        self._spo2_base = rng.uniform(96.5, 98.0)
        self._temp_base = rng.uniform(36.5, 36.75)
        self._sys_base = rng.uniform(108.0, 128.0)
        self._dia_base = rng.uniform(66.0, 80.0)
        self._rr_base = rng.uniform(14.0, 15.5)
        self._shift_ms = int(rng.uniform(-1.0, 1.0) * HOUR_MS)  # chronotype
        self._wander = [
            (amp, *(rng.uniform(lo, hi) for lo, hi in _WANDER_RANGES)) for amp in _WANDER_AMPLITUDE
        ]
        self._keys = [rng.getrandbits(64) for _ in _WANDER_AMPLITUDE]
        self._act_rng = random.Random(rng.getrandbits(64))
        self._epi_rng = random.Random(rng.getrandbits(64))
        self._rate = episode_rate_per_day
        self._t: int | None = None
        self._segs: list[_Segment] = []
        self._seg_starts: list[int] = []
        self._episodes: list[_Episode] = []
        self._ep_starts: list[int] = []
        self._pending: _Episode | None = None
        # stream name -> value function (self._hr, self._spo2, ...)
        self._dispatch: dict[str, _Reader] = {n: getattr(self, "_" + n) for n in STREAMS}

    def advance(self, t_ms: int) -> None:
        """Move activity and episodes forward to wall time t_ms (unix ms).

        Monotone: a time earlier than the newest one seen is a no-op.  The first call
        fixes the simulation origin (patient at rest, no episode).
        """
        if self._t is None:
            self._t = t_ms
            self._segs.append(self._make_segment(t_ms, 0.0, _WALK))  # starts at rest
            self._seg_starts.append(t_ms)
            self._pending = self._draw_episode(t_ms)
        elif t_ms <= self._t:
            return
        self._t = t_ms
        segs = self._segs
        while segs[-1].end <= t_ms:
            last = segs[-1]
            segs.append(self._make_segment(last.end, last.level(last.end), last.kind))
            self._seg_starts.append(last.end)
        pending = self._pending
        while pending is not None and pending.start <= t_ms:
            self._episodes.append(pending)
            self._ep_starts.append(pending.start)
            pending = self._pending = self._draw_episode(pending.end)
        if segs[0].end < t_ms - HISTORY_MS and len(segs) > 64:
            self._prune(t_ms - HISTORY_MS)

    @property
    def episode(self) -> str | None:
        """The episode in progress at the newest time: tachycardia, desaturation, fever."""
        ep = None if self._t is None else self._episode_at(self._t)
        return None if ep is None else ep.kind

    @property
    def activity(self) -> float:
        """Lagged activity level (0 rest .. 1 hard exercise) at the newest time."""
        return 0.0 if self._t is None else self._segs[-1].level(self._t)

    def sample(self, stream: str, t_ms: int) -> tuple[float, ...]:
        """Value(s) of `stream` at t_ms, rounded to the stream's decimals.

        A 1-tuple, except bp: (systolic, diastolic).  Calls advance(t_ms) itself.
        Raises ValueError for an unknown stream.
        """
        try:
            fn = self._dispatch[stream]
        except KeyError:
            raise ValueError(f"unknown stream {stream!r}") from None
        self.advance(t_ms)
        return fn(t_ms)

    def _asleep(self, t_ms: int) -> bool:
        hour = ((t_ms - self._shift_ms) % DAY_MS) / HOUR_MS
        return hour >= 23.0 or hour < 6.5

    def _make_segment(self, start: int, level0: float, prev_kind: int) -> _Segment:
        rng = self._act_rng
        asleep = self._asleep(start)
        if prev_kind != _REST:
            kind = _REST
        elif asleep:
            kind = _WALK if rng.random() < 0.05 else _REST
        else:
            kind = _EXERCISE if rng.random() < 0.06 else _WALK
        if kind == _REST:
            mean, lo, hi = (90.0, 10.0, 240.0) if asleep else (30.0, 1.0, 150.0)
            minutes = _clamp(rng.expovariate(1.0 / mean), lo, hi)
            target = cadence = 0.0
        elif kind == _WALK:
            minutes = rng.uniform(1.0, 4.0) if asleep else min(30.0, 2.0 + rng.expovariate(1 / 6))
            target = rng.uniform(0.25, 0.5)
            cadence = 64.0 + (target - 0.25) * 232.0  # 64..122 steps/min
        else:
            minutes = rng.uniform(10.0, 45.0)
            target = rng.uniform(0.75, 1.0)
            cadence = 140.0 + (target - 0.75) * 120.0  # 140..170 steps/min
        tau = _TAU_UP_MS if target > level0 else _TAU_DOWN_MS
        end = start + max(1_000, int(minutes * MINUTE_MS))
        return _Segment(start, end, kind, target, level0, tau, cadence)

    def _draw_episode(self, after_ms: int) -> _Episode | None:
        if self._rate <= 0:
            return None
        rng = self._epi_rng
        start = after_ms + int(rng.expovariate(self._rate) * DAY_MS)
        names = list(_EPISODE_KINDS)
        kind = rng.choices(names, [_EPISODE_KINDS[n][0] for n in names])[0]
        _, duration, rise, fall, peak = _EPISODE_KINDS[kind]
        length = int(rng.uniform(*duration) * MINUTE_MS)
        rise_ms = int(rng.uniform(*rise) * MINUTE_MS)
        fall_ms = int(rng.uniform(*fall) * MINUTE_MS)
        return _Episode(kind, start, start + length, rise_ms, fall_ms, rng.uniform(*peak))

    def _prune(self, horizon: int) -> None:
        """Forget segments and episodes that ended before the one in progress at horizon."""
        k = max(0, bisect_right(self._seg_starts, horizon) - 1)
        del self._segs[:k], self._seg_starts[:k]
        k = max(0, bisect_right(self._ep_starts, horizon) - 1)
        del self._episodes[:k], self._ep_starts[:k]

    def _segment_index(self, t_ms: int) -> int:
        starts = self._seg_starts
        return len(starts) - 1 if t_ms >= starts[-1] else max(0, bisect_right(starts, t_ms) - 1)

    def _episode_at(self, t_ms: int) -> _Episode | None:
        eps = self._episodes
        if not eps:
            return None
        i = len(eps) - 1 if t_ms >= eps[-1].start else bisect_right(self._ep_starts, t_ms) - 1
        return eps[i] if i >= 0 and t_ms < eps[i].end else None

    def _state(self, t_ms: int) -> tuple[float, _Episode | None, float]:
        """(activity level, episode or None, episode envelope) at t_ms."""
        seg = self._segs[-1]
        if t_ms < seg.start:
            seg = self._segs[self._segment_index(t_ms)]
        ep = self._episode_at(t_ms)
        return seg.level(t_ms), ep, 0.0 if ep is None else ep.envelope(t_ms)

    def _circadian(self, t_ms: int, peak_hour: float) -> float:
        """Cosine in [-1, 1] peaking at `peak_hour` local time."""
        phase = (t_ms - self._shift_ms - peak_hour * HOUR_MS) / DAY_MS
        return math.cos(2 * math.pi * phase)

    def _wobble(self, channel: int, t_ms: int) -> float:
        amp, w1, p1, w2, p2 = self._wander[channel]
        return amp * (0.6 * math.sin(w1 * t_ms + p1) + 0.4 * math.sin(w2 * t_ms + p2))

    def _hr(self, t: int) -> tuple[float, ...]:
        level, ep, e = self._state(t)
        hr = self._hr_base + self._hr_circ * self._circadian(t, 15.0) + 60.0 * level
        hr += self._wobble(_HR, t)
        if ep is not None:
            if ep.kind == "tachycardia":
                hr += max(0.0, ep.peak - hr) * e
            elif ep.kind == "desaturation":
                hr += 12.0 * e
            else:  # fever: ~10 bpm per degree
                hr += 10.0 * (ep.peak - self._temp_base) * e
        hr += 2.0 * _noise(self._keys[_HR], t)
        return (round(_clamp(hr, 35.0, 200.0), 0),)

    def _spo2(self, t: int) -> tuple[float, ...]:
        level, ep, e = self._state(t)
        spo2 = self._spo2_base - 0.4 * level + self._wobble(_SPO2, t)
        if ep is not None and ep.kind == "desaturation":
            spo2 -= (spo2 - ep.peak) * e
        spo2 += 0.8 * _noise(self._keys[_SPO2], t)
        return (round(_clamp(spo2, 70.0, 100.0), 0),)

    def _temp(self, t: int) -> tuple[float, ...]:
        level, ep, e = self._state(t)
        temp = self._temp_base + 0.25 * self._circadian(t, 17.0) + 0.15 * level
        temp += self._wobble(_TEMP, t)
        if ep is not None and ep.kind == "fever":
            temp += (ep.peak - self._temp_base) * e
        temp += 0.03 * _noise(self._keys[_TEMP], t)
        return (round(_clamp(temp, 34.0, 42.0), 2),)

    def _bp(self, t: int) -> tuple[float, ...]:
        level, ep, e = self._state(t)
        circ = self._circadian(t, 15.0)
        sys_ = self._sys_base + 6.0 * circ + 35.0 * level + self._wobble(_SYS, t)
        dia = self._dia_base + 4.0 * circ + 8.0 * level + self._wobble(_DIA, t)
        if ep is not None and ep.kind != "fever":
            sys_ += 6.0 * e
            dia += 3.0 * e
        sys_ = round(_clamp(sys_ + 4.0 * _noise(self._keys[_SYS], t), 70.0, 230.0), 0)
        dia = round(_clamp(dia + 3.0 * _noise(self._keys[_DIA], t), 40.0, 140.0), 0)
        return (sys_, min(dia, sys_ - 21.0))

    def _rr(self, t: int) -> tuple[float, ...]:
        level, ep, e = self._state(t)
        rr = self._rr_base + 0.7 * self._circadian(t, 15.0) + 14.0 * level
        rr += self._wobble(_RR, t)
        if ep is not None:
            rr += {"desaturation": 6.0, "fever": 3.0}.get(ep.kind, 2.0) * e
        rr += 0.9 * _noise(self._keys[_RR], t)
        return (round(_clamp(rr, 8.0, 40.0), 0),)

    def _steps(self, t: int) -> tuple[float, ...]:
        """Steps taken in [t - 60 s, t)."""
        lo = t - MINUTE_MS
        total = 0.0
        i = self._segment_index(t - 1)
        while i >= 0:
            seg = self._segs[i]
            if seg.end <= lo:
                break
            overlap = min(seg.end, t) - max(seg.start, lo)
            if overlap > 0:
                total += seg.cadence * overlap
            i -= 1
        count = total / MINUTE_MS
        if count > 0:
            count *= 1.0 + 0.05 * _noise(self._keys[_STEPS], t)
        return (float(max(0, round(count))),)


def samples(
    phys: PatientPhysiology, stream: str, start_ms: int, end_ms: int
) -> list[tuple[int, tuple[float, ...]]]:
    """(t_ms, value) for each native sample time t, start_ms <= t < end_ms.

    Sample times are the multiples of the stream's period_ms (aligned to the epoch).
    """
    period = _spec(stream).period_ms
    first = -(-start_ms // period) * period
    return [(t, phys.sample(stream, t)) for t in range(first, end_ms, period)]
