"""The MQTT inbox is bounded in bytes as well as payloads (issue 11: every buffer)."""

from __future__ import annotations

from pathlib import Path

import pytest
from core_helpers import make_batcher, make_world

from meshhealth.ingest.pipeline import Pipeline
from meshhealth.store.lmdb_store import Store
from meshhealth.wire.types import MAX_READING


@pytest.mark.asyncio
async def test_the_inbox_holds_at_most_its_bytes_and_no_oversized_payload(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    try:
        b = make_batcher(make_world())
        bound = 1024 * 1024
        pipe = Pipeline(
            b,
            store,
            workers=0,
            chunk_size=64,
            max_backlog=10**6,
            max_backlog_bytes=bound,
            receipts_topic="r/{device}",
            publish=lambda t, p: None,
        )
        pipe.on_payload("mh/v1/readings/x", b"\0" * (MAX_READING + 1))
        assert b.rejects["oversized"] == 1 and pipe.statistics()["backlog"] == 0
        for _ in range(2 * bound // MAX_READING):  # twice the bound in maximal payloads
            pipe.on_payload("mh/v1/readings/x", b"\0" * MAX_READING)
        st = pipe.statistics()
        assert st["backlog_bytes"] <= bound and st["backlog"] == bound // MAX_READING
        assert b.rejects["overload"] == bound // MAX_READING
    finally:
        store.close()
