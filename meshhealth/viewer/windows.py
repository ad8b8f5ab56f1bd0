"""Time windows and the JSON the viewer pages draw: pure functions of their arguments.

A window is a closed interval of Unix ms, ``(lo, hi)`` with ``lo <= hi``, the
way grants and reads are bounded.  For one stream over the window a reader
chose, the provider's active grants *cover* some parts; everything else is
*unavailable*: either a revoked grant once covered it, or nothing ever did.
Points are kept only where a grant covers them, so a page can never draw a
sample outside what the patient granted, whatever a node sends.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any

from meshhealth.sharing.export import Row
from meshhealth.sharing.grants import grant_doc as own_fields
from meshhealth.wire import Grant

Json = dict[str, Any]
Window = tuple[int, int]
FOREVER = (1 << 63) - 1  # an open grant's end
MAX_POINTS = 20_000  # per series; more are thinned to each bucket's min and max

# the names of the values of a multi-valued stream, in their order on the wire
PARTS: dict[str, tuple[str, ...]] = {"bp": ("systolic", "diastolic")}
ORDER = ("hr", "spo2", "temp", "bp", "rr", "steps")


def merge(windows: Iterable[Window]) -> list[Window]:
    """The union of ``windows`` as sorted, disjoint, non-adjacent windows."""
    out: list[Window] = []
    for lo, hi in sorted(w for w in windows if w[0] <= w[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def clip(windows: Iterable[Window], lo: int, hi: int) -> list[Window]:
    """The union of ``windows`` inside ``[lo, hi]``."""
    return [(max(a, lo), min(b, hi)) for a, b in merge(windows) if a <= hi and b >= lo]


def gaps(covered: Iterable[Window], lo: int, hi: int) -> list[Window]:
    """The parts of ``[lo, hi]`` that ``covered`` leaves out."""
    out: list[Window] = []
    at = lo
    for a, b in clip(covered, lo, hi):
        if a > at:
            out.append((at, a - 1))
        at = b + 1
    if at <= hi:
        out.append((at, hi))
    return out


def inside(t: int, merged: Sequence[Window]) -> bool:
    """Whether ``t`` lies in one of ``merged`` (the output of :func:`merge`)."""
    i = bisect_right(merged, (t, FOREVER)) - 1
    return i >= 0 and merged[i][0] <= t <= merged[i][1]


def grant_window(g: Grant) -> Window:
    return (g.from_ms, FOREVER if g.open else g.until_ms)


def active_windows(grants: Iterable[tuple[bytes, Grant, bool]], stream: str) -> list[Window]:
    """The windows of the grants (id, grant, revoked) that are not revoked and cover
    ``stream``."""
    return [
        grant_window(g)
        for _, g, revoked in grants
        if not revoked and any(s.stream == stream for s in g.streams)
    ]


def stream_order(stream: str) -> tuple[int, str]:
    """Vital signs first, in the order a clinician reads them; then the rest by name."""
    return (ORDER.index(stream) if stream in ORDER else len(ORDER), stream)


def grant_state(g: Grant, revoked: bool, now_ms: int) -> str:
    """``revoked``, ``expired`` (a bounded window that has ended) or ``active``."""
    if revoked:
        return "revoked"
    return "expired" if not g.open and g.until_ms < now_ms else "active"


def grant_doc(gid: bytes, g: Grant, revoked: bool, now_ms: int) -> Json:
    """A grant as the pages list it (from the signed transaction, not the node's JSON)."""
    return {
        **own_fields(gid, g),
        "revoked": revoked,
        "state": grant_state(g, revoked, now_ms),
    }


def thin(points: list[list[float]], limit: int = MAX_POINTS) -> list[list[float]]:
    """At most ``limit`` points: past it, each of ``limit // 2`` equal runs keeps its
    lowest and highest point, in time order, so peaks still show."""
    if len(points) <= limit:
        return points
    runs = max(1, limit // 2)
    out: list[list[float]] = []
    for i in range(runs):
        run = points[i * len(points) // runs : (i + 1) * len(points) // runs]
        if run:
            lo = min(range(len(run)), key=lambda k: run[k][1])
            hi = max(range(len(run)), key=lambda k: run[k][1])
            out.extend(run[k] for k in sorted({lo, hi}))  # in time order, once if the same
    return out


def series_of(stream: str, kept: Sequence[Row]) -> list[Json]:
    """One series per value of the stream (bp: systolic and diastolic):
    ``[{label, points: [[t_ms, value], ...]}]``."""
    names = PARTS.get(stream, ())
    width = max((len(r.value) for r in kept), default=len(names) or 1)
    if len(names) != width:
        names = (stream,) if width == 1 else tuple(f"{stream} {i + 1}" for i in range(width))
    return [
        {
            "label": name,
            "points": thin([[r.t_ms, r.value[i]] for r in kept if len(r.value) > i]),
        }
        for i, name in enumerate(names)
    ]


def unavailable(
    active: Iterable[Window], revoked: Iterable[Window], lo: int, hi: int
) -> list[Json]:
    """The parts of ``[lo, hi]`` no active grant covers, each with why: ``revoked`` where
    only a revoked grant did, else ``not_granted``."""
    out: list[Json] = []
    revoked = list(revoked)
    for a, b in gaps(active, lo, hi):
        pieces = [(w, "revoked") for w in clip(revoked, a, b)]
        pieces += [(w, "not_granted") for w in gaps(revoked, a, b)]
        out.extend({"from_ms": w[0], "to_ms": w[1], "reason": why} for w, why in sorted(pieces))
    return out
