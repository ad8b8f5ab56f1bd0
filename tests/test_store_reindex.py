"""Issue 11 #18: ``chain verify`` checks every derived LMDB database against the blocks,
and ``store reindex`` rebuilds them (refusing a store a running node holds open)."""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import replace
from pathlib import Path

import lmdb
import pytest
from test_cli import mh

from meshhealth.bench.procs import NodeProcess
from meshhealth.config import NodeConfig
from meshhealth.crypto.keys import load_identity
from meshhealth.store.lmdb_store import open_by

pytestmark = pytest.mark.integration


def fetch(node: NodeProcess, key: Path, patient: str, out: Path) -> list[dict[str, str]]:
    now = time.time_ns() // 1_000_000
    r = mh(
        "provider", "fetch", "--key", str(key), "--patient", patient, "--stream", "hr",
        "--from", str(now - 2 * 3_600_000), "--to", str(now), "--format", "csv",
        "--out", str(out), "--node", node.url,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return list(csv.DictReader(io.StringIO(out.read_text())))


def tamper(store: Path) -> None:
    """Damage four derived databases of a real node's store in four ways."""
    env = lmdb.open(str(store), max_dbs=16)
    with env.begin(write=True) as txn:
        readings = env.open_db(b"readings", txn=txn)
        cur = txn.cursor(db=readings)
        assert cur.first()
        k, v = bytes(cur.key()), bytearray(cur.value())
        v[-1] ^= 0x01  # a flipped byte: the last entry index of the first bucket changes
        txn.put(k, bytes(v), db=readings)
        assert cur.last()
        txn.delete(bytes(cur.key()), db=readings)  # a whole bucket gone: readings hidden
        acl = env.open_db(b"acl", txn=txn)
        cur = txn.cursor(db=acl)
        assert cur.first()
        txn.delete(bytes(cur.key()), db=acl)  # an enrolment or grant forgotten at start-up
        marks = env.open_db(b"seqmarks", txn=txn)
        txn.put(b"\x07" * 32, b"\x92\x05\x90", db=marks)  # a mark for a device no block has
        links = env.open_db(b"links", txn=txn)
        cur = txn.cursor(db=links)
        assert cur.first()
        lk, lv = bytes(cur.key()), bytearray(cur.value())
        lv[-1] ^= 0x01
        txn.put(lk, bytes(lv), db=links)
    env.close()


def test_verify_catches_damaged_indexes_and_reindex_repairs_them(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    r = mh("demo", "--duration", "3", "--data-dir", str(data), "--backfill", "240", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    key = Path(re.search(r"patient serve --key (\S+)", r.stdout).group(1))  # type: ignore[union-attr]
    patient = load_identity(key).public.hex()
    cfg = NodeConfig.load(data / "node-1" / "node.toml")
    # alone now (its demo peers are gone): no start-up wait for them
    cfg = replace(cfg, gossip=replace(cfg.gossip, peers=[], startup_sync_s=0.2))
    (cfg.base / "node.toml").write_text(cfg.dumps())
    store = cfg.data_path
    assert mh("chain", "verify", "--data-dir", str(store)).returncode == 0

    node = NodeProcess(cfg.base / "node.toml", tmp_path / "node.log", cfg.api.port)
    node.start(until="api")
    try:
        before = fetch(node, key, patient, tmp_path / "before.csv")
        assert len(before) > 100
        # a running node holds the store: reindex refuses, naming the process
        assert node.proc is not None and open_by(store) == node.proc.pid
        busy = mh("store", "reindex", "--data-dir", str(store))
        assert busy.returncode == 2, busy.stdout + busy.stderr
        assert f"open by process {node.proc.pid}" in busy.stderr
    finally:
        node.stop()
    assert open_by(store) is None

    tamper(store)
    bad = mh("chain", "verify", "--data-dir", str(store))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    for db in ("readings", "acl", "seqmarks", "links"):
        assert re.search(rf"FAIL .*: {db}: ", bad.stdout), (db, bad.stdout)
    assert "altered" in bad.stdout and "missing" in bad.stdout and "extra record" in bad.stdout
    assert "store reindex" in bad.stdout

    fixed = mh("store", "reindex", "--data-dir", str(store))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    ok = mh("chain", "verify", "--data-dir", str(store))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "match the blocks" in ok.stdout

    node.start(until="api")
    try:
        after = fetch(node, key, patient, tmp_path / "after.csv")
    finally:
        node.stop()
    assert after == before
