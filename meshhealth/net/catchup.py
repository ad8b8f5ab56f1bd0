"""Telling the operator how a catch-up goes: a progress bar in a terminal, log lines else.

A node that was down, or starts on a wiped data dir, pulls the blocks it
lacks from its peers (``GossipShell.missing()`` is that backlog).  While the
backlog is not empty this task reports it every ``interval_s``: on a
terminal as a bar over the blocks pulled so far (the total grows as peers
announce more), otherwise as one INFO line, which is what journald or a
``--log-format json`` collector wants.  It says once when the node has
caught up and how long that took.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshhealth.node import Node

log = logging.getLogger(__name__)


class CatchupReport:
    """The state between two looks at the backlog (pure: tested without a node)."""

    def __init__(self, bar_factory: Any = None) -> None:
        self.bar_factory = bar_factory  # Progress-like (update, close), or None: log lines
        self.bar: Any = None
        self.started: float | None = None
        self.pulled = 0  # blocks applied since the catch-up began
        self._base = 0  # the applied-blocks counter when it began

    def observe(self, backlog: int, applied_total: int, now: float) -> str | None:
        """Feed the backlog and the node's applied-blocks counter; returns a log line or None."""
        if self.started is None:
            if backlog == 0:
                return None
            self.started, self._base = now, applied_total
            if self.bar_factory is not None:
                self.bar = self.bar_factory(backlog, "catch-up blocks")
        self.pulled = applied_total - self._base
        if backlog == 0:
            took = now - self.started
            line = f"caught up: {self.pulled:,} blocks pulled from peers in {took:.1f} s"
            if self.bar is not None:
                self.bar.update(self.pulled, total=self.pulled)
                self.bar.close()
            self.started, self.bar = None, None
            return line
        if self.bar is not None:
            self.bar.update(self.pulled, total=self.pulled + backlog)
            return None
        return f"catching up: {backlog:,} blocks behind, {self.pulled:,} pulled so far"


async def report_catchup(node: Node, interval_s: float = 5.0) -> None:
    """The node's task: report the catch-up backlog while there is one."""
    bar_factory = None
    if sys.stderr.isatty():
        from meshhealth.cli.progress import Progress

        bar_factory = Progress
    report = CatchupReport(bar_factory)
    while True:
        backlog = sum(node.gossip.missing().values())
        applied = node.gossip.counters["blocks_applied"]
        line = report.observe(backlog, applied, time.monotonic())
        if line:
            log.info("%s", line, extra={"backlog": backlog, "pulled": report.pulled})
        await asyncio.sleep(interval_s if report.bar is None else 0.5)
