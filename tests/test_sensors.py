"""Tests for the simulated wearable physiology in device_agents.sensors."""

from __future__ import annotations

import dataclasses
import itertools
import statistics
from dataclasses import dataclass
from functools import cache

import pytest

from device_agents.sensors import STREAMS, PatientPhysiology, StreamSpec, samples

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
MINUTE = 60_000
HOUR = 3_600_000
DAY = 86_400_000
STEP = 30_000  # trace resolution
SEEDS = (1, 2, 3, 7)
EPISODE_SEEDS = (1, 2, 3)
HIGH_RATE = 24.0  # episodes per day


@dataclass
class Row:
    t: int
    hr: float
    spo2: float
    rr: float
    activity: float
    episode: str | None
    temp: float | None = None  # on whole minutes
    steps: float | None = None  # on whole minutes
    bp: tuple[float, ...] | None = None  # on whole 5 minutes


@cache
def trace(seed: int, rate: float = 0.0, hours: int = 48) -> tuple[Row, ...]:
    """All streams every 30 s (slower streams on their own grid) for `hours`."""
    phys = PatientPhysiology(seed, episode_rate_per_day=rate)
    rows = []
    for t in range(T0, T0 + hours * HOUR, STEP):
        hr, spo2, rr = (phys.sample(s, t)[0] for s in ("hr", "spo2", "rr"))
        row = Row(t, hr, spo2, rr, phys.activity, phys.episode)
        if t % MINUTE == 0:
            row.temp = phys.sample("temp", t)[0]
            row.steps = phys.sample("steps", t)[0]
        if t % (5 * MINUTE) == 0:
            row.bp = phys.sample("bp", t)
        rows.append(row)
    return tuple(rows)


def hour_of_day(t: int) -> float:
    return (t % DAY) / HOUR


def resting(row: Row) -> bool:
    return row.activity < 0.02 and row.episode is None


def test_stream_table() -> None:
    assert set(STREAMS) == {"hr", "spo2", "temp", "bp", "rr", "steps"}
    expected = {
        "hr": ("/min", 1000, 0, 1),
        "spo2": ("%", 1000, 0, 1),
        "temp": ("Cel", 60000, 2, 1),
        "bp": ("mm[Hg]", 300000, 0, 2),
        "rr": ("/min", 5000, 0, 1),
        "steps": ("{steps}", 60000, 0, 1),
    }
    for name, spec in STREAMS.items():
        assert isinstance(spec, StreamSpec)
        assert spec.name == name
        assert (spec.unit, spec.period_ms, spec.decimals, spec.components) == expected[name]
    with pytest.raises(dataclasses.FrozenInstanceError):
        STREAMS["hr"].period_ms = 5  # type: ignore[misc]


@pytest.mark.parametrize("seed", SEEDS)
def test_ranges_over_48h(seed: int) -> None:
    rows = trace(seed)
    assert all(row.episode is None for row in rows)
    rest = [row for row in rows if resting(row)]
    assert len(rest) > len(rows) / 2, "patients are mostly at rest"
    assert all(35 <= row.hr <= 200 for row in rows)
    assert all(40 <= row.hr <= 100 for row in rest)
    assert max(row.hr for row in rows) >= 90, "activity raises HR"
    assert all(95 <= row.spo2 <= 99 for row in rows)
    assert all(10 <= row.rr <= 32 for row in rows)
    assert all(12 <= row.rr <= 18 for row in rest)
    temps = [row.temp for row in rows if row.temp is not None]
    assert len(temps) == 48 * 60
    assert all(36.1 <= temp <= 37.3 for temp in temps)
    assert max(temps) - min(temps) >= 0.4, "circadian temperature swing"
    for row in rows:
        if row.bp is None:
            continue
        systolic, diastolic = row.bp
        assert 90 <= systolic <= 180
        assert 50 <= diastolic <= 100
        assert diastolic < systolic - 20
        if resting(row):
            assert 95 <= systolic <= 145


@pytest.mark.parametrize("seed", SEEDS)
def test_steps_are_counts_driven_by_activity(seed: int) -> None:
    minutes = [row for row in trace(seed) if row.steps is not None]
    steps = [row.steps for row in minutes if row.steps is not None]
    assert all(s >= 0 and float(s).is_integer() and s <= 200 for s in steps)
    assert sum(s == 0 for s in steps) > 0.6 * len(steps), "mostly at rest"
    assert sum(60 <= s <= 130 for s in steps) >= 30, "walking bouts"
    moving = [row for row in minutes if row.steps]
    still = [row for row in minutes if not row.steps]
    assert statistics.mean(r.activity for r in moving) > 0.2
    assert statistics.mean(r.activity for r in still) < 0.05
    assert statistics.correlation(steps, [row.hr for row in minutes]) > 0.5
    assert statistics.correlation(steps, [row.rr for row in minutes]) > 0.5
    night = [row.steps for row in minutes if 1 <= hour_of_day(row.t) < 5]
    assert sum(s > 0 for s in night if s is not None) < 0.1 * len(night), "asleep"


@pytest.mark.parametrize("seed", SEEDS)
def test_circadian_rhythm(seed: int) -> None:
    rows = trace(seed)
    night = [row for row in rows if 1 <= hour_of_day(row.t) < 5]
    afternoon = [row for row in rows if 13 <= hour_of_day(row.t) < 18]
    assert statistics.mean(r.hr for r in night) < statistics.mean(r.hr for r in afternoon)
    # also with activity taken out: the baseline itself swings
    rest_night = statistics.mean(r.hr for r in night if resting(r))
    rest_afternoon = statistics.mean(r.hr for r in afternoon if resting(r))
    assert rest_night + 5 < rest_afternoon
    early = [r.temp for r in rows if r.temp is not None and 3 <= hour_of_day(r.t) < 7]
    late = [r.temp for r in rows if r.temp is not None and 15 <= hour_of_day(r.t) < 19]
    assert statistics.mean(early) + 0.2 < statistics.mean(late)
    sys_night = [r.bp[0] for r in night if r.bp is not None]
    sys_afternoon = [r.bp[0] for r in afternoon if r.bp is not None]
    assert statistics.mean(sys_night) < statistics.mean(sys_afternoon)


def test_same_seed_same_values_different_seed_different_values() -> None:
    def run(seed: int) -> list[tuple[float, ...]]:
        phys = PatientPhysiology(seed)
        times = [T0 + k * 7_919 for k in range(2_000)] + [T0 + 3 * DAY, T0 + 100]
        return [phys.sample(s, t) for t in times for s in STREAMS]

    assert run(11) == run(11)
    assert run(11) != run(12)
    hr_a = [row.hr for row in trace(1)[:600]]
    hr_b = [row.hr for row in trace(2)[:600]]
    assert hr_a != hr_b


def test_values_do_not_depend_on_call_interleaving() -> None:
    start, end = T0 + 5 * HOUR, T0 + 9 * HOUR
    per_stream = PatientPhysiology(4, episode_rate_per_day=HIGH_RATE)
    per_stream.advance(start)
    batch = {s: samples(per_stream, s, start, end) for s in STREAMS}
    interleaved = PatientPhysiology(4, episode_rate_per_day=HIGH_RATE)
    interleaved.advance(start)
    for t in range(start, end, 1_000):
        for s, spec in STREAMS.items():
            if t % spec.period_ms == 0:
                assert interleaved.sample(s, t) == batch[s][(t - start) // spec.period_ms][1]


def test_rereading_the_past_gives_the_same_value() -> None:
    phys = PatientPhysiology(9, episode_rate_per_day=HIGH_RATE)
    t = T0 + 10 * MINUTE
    before = [phys.sample(s, t) for s in STREAMS]
    phys.advance(T0 + 20 * HOUR)
    activity, episode = phys.activity, phys.episode
    phys.advance(T0)  # earlier: no-op
    assert (phys.activity, phys.episode) == (activity, episode)
    assert [phys.sample(s, t) for s in STREAMS] == before


def episode_runs(rows: tuple[Row, ...]) -> list[tuple[str, list[Row]]]:
    """Consecutive rows of one episode, leaving out one cut off by the end of the trace."""
    runs = []
    for kind, group in itertools.groupby(rows, key=lambda row: row.episode):
        run = list(group)
        if kind is not None and run[-1] is not rows[-1]:
            runs.append((kind, run))
    return runs


def test_episodes_show_their_signature() -> None:
    runs = [run for seed in EPISODE_SEEDS for run in episode_runs(trace(seed, HIGH_RATE))]
    assert {kind for kind, _ in runs} == {"tachycardia", "desaturation", "fever"}
    assert len(runs) >= 20
    for kind, rows in runs:
        if kind == "tachycardia" and len(rows) >= 6:
            assert 120 <= max(r.hr for r in rows) <= 172
        elif kind == "desaturation" and len(rows) >= 8:
            assert 84 <= min(r.spo2 for r in rows) < 92
        elif kind == "fever":
            assert len(rows) * STEP >= 4 * HOUR
            temps = [r.temp for r in rows if r.temp is not None]
            assert 38.4 <= max(temps) <= 39.6
    calm = [row for seed in EPISODE_SEEDS for row in trace(seed, HIGH_RATE) if not row.episode]
    assert all(row.spo2 >= 94 for row in calm)
    # breathing and heart rate respond at rest, beyond the calm resting level
    calm_rest = [row for row in calm if row.activity < 0.02]
    desat_rest = [r for k, rows in runs if k == "desaturation" for r in rows if r.activity < 0.02]
    tachy = [r for k, rows in runs if k == "tachycardia" for r in rows]
    assert statistics.mean(r.rr for r in desat_rest) > statistics.mean(r.rr for r in calm_rest) + 2
    assert statistics.mean(r.hr for r in tachy) > statistics.mean(r.hr for r in calm_rest) + 40
    assert all(row.bp[1] < row.bp[0] - 20 for row in calm if row.bp is not None)


def test_episode_rate_is_poisson_per_day() -> None:
    for rate, low, high in ((0.0, 0, 0), (2.0, 30, 75)):
        phys = PatientPhysiology(21, episode_rate_per_day=rate)
        labels = []
        for t in range(T0, T0 + 30 * DAY, MINUTE):
            phys.advance(t)
            labels.append(phys.episode)
        count = sum(1 for kind, _ in itertools.groupby(labels) if kind is not None)
        assert low <= count <= high


def test_samples_alignment_and_half_open_bounds() -> None:
    phys = PatientPhysiology(5)
    rr = samples(phys, "rr", T0 + 1, T0 + MINUTE)
    assert [t for t, _ in rr] == [T0 + k * 5_000 for k in range(1, 12)]
    bp = samples(phys, "bp", T0, T0 + 15 * MINUTE)
    assert [t for t, _ in bp] == [T0, T0 + 5 * MINUTE, T0 + 10 * MINUTE]
    assert all(len(value) == 2 for _, value in bp)
    assert samples(phys, "temp", T0 + 1, T0 + MINUTE) == []
    assert samples(phys, "hr", T0 + MINUTE, T0) == []
    hr = samples(phys, "hr", T0 + 999, T0 + 10_001)
    assert [t for t, _ in hr] == [T0 + k * 1_000 for k in range(1, 11)]
    assert all(value == phys.sample("hr", t) for t, value in hr)
    for stream, spec in STREAMS.items():
        got = samples(phys, stream, T0 - 7, T0 + HOUR)
        assert all(t % spec.period_ms == 0 and T0 - 7 <= t < T0 + HOUR for t, _ in got)
        assert len(got) == HOUR // spec.period_ms


def test_values_are_rounded_to_stream_decimals() -> None:
    phys = PatientPhysiology(6, episode_rate_per_day=HIGH_RATE)
    for stream, spec in STREAMS.items():
        values = [v for _, value in samples(phys, stream, T0, T0 + 12 * HOUR) for v in value]
        assert all(isinstance(v, float) and round(v, spec.decimals) == v for v in values)
        assert all(len(value) == spec.components for value in [phys.sample(stream, T0)])
    temps = [value[0] for _, value in samples(phys, "temp", T0, T0 + 12 * HOUR)]
    assert any(round(v, 1) != v for v in temps), "temperature keeps two decimals"


def test_unknown_stream_and_bad_rate_are_rejected() -> None:
    phys = PatientPhysiology(1)
    with pytest.raises((KeyError, ValueError)):
        phys.sample("glucose", T0)
    with pytest.raises((KeyError, ValueError)):
        samples(phys, "glucose", T0, T0 + HOUR)
    with pytest.raises(ValueError):
        PatientPhysiology(1, episode_rate_per_day=-1.0)
    assert phys.episode is None


def test_large_time_jump_keeps_a_plausible_state() -> None:
    phys = PatientPhysiology(8, episode_rate_per_day=2.0)
    phys.sample("hr", T0)
    phys.advance(T0 + 365 * DAY)
    values = samples(phys, "hr", T0 + 365 * DAY, T0 + 365 * DAY + 10 * MINUTE)
    assert len(values) == 600
    assert all(35 <= value[0] <= 200 for _, value in values)
