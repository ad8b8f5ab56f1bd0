"""A small progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, *, force: bool = False) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0
        self.enabled = force or sys.stderr.isatty()
        self._drawn = 0.0
        self._t0 = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.update(self.done + n)

    def update(self, done: int, total: int | None = None) -> None:
        """Set how much is done (and, for work that grows while it runs, the total)."""
        if total is not None:
            self.total = max(total, 1)
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or self.done >= self.total):
            self._drawn = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac)
            rate = self.done / max(now - self._t0, 1e-9)
            sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:,.0f}/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
