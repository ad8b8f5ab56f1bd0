"""``meshhealth bench query --quick`` writes the documented JSON keys, and what it timed was
a complete, verified fetch (a hang guard, not a speed check)."""

from __future__ import annotations

import json

import pytest
from test_cli import mh

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_bench_query_writes_the_documented_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "q.json"
    r = mh("bench", "query", "--quick", "--json", str(out), timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    # two hours of 1 Hz, every sample verified and decrypted (the bench refuses less)
    assert data["samples"] == 7_200
    assert 700 <= data["readings"] < 7_200  # the default sending packs ten samples a reading
    assert data["seconds"] > 0 and data["samples_per_s"] > 0
    assert data["bytes_transferred"] > 0
    single = data["single"]
    assert single["readings"] == 7_200
    assert single["seconds"] > 0 and single["readings_per_s"] > 0
    assert single["ceiling_verify_per_s"] > 0
    assert "default (10/reading)" in r.stdout and "one sample a reading" in r.stdout
