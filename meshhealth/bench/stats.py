"""The one percentile every benchmark reports."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]); NaN for no samples."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]
