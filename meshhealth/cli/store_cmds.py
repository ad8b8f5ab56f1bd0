"""``meshhealth store reindex``: rebuild a stopped node's derived databases from its blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshhealth.cli.chain_cmds import _genesis, find_stores, verify_chains
from meshhealth.errors import StorageError
from meshhealth.store import derived
from meshhealth.store.lmdb_store import Store, open_by


def reindex_stores(root: Path) -> int:
    """0 when every store under ``root`` was rebuilt and verifies, 1 when its blocks
    themselves fail (reindex cannot repair those); refuses a store a process has open."""
    paths = find_stores(root)
    for path in paths:
        pid = open_by(path)
        if pid is not None:
            raise StorageError(
                f"store {path} is open by process {pid} (a running node?); stop it, then reindex"
            )
    status = 0
    for path in paths:
        store = Store(path)
        try:
            g = _genesis(store, None)
            sc = derived.scan(store)
            problems = derived.check(store, sc)
            counts = derived.rebuild(store, sc)
            print(
                f"reindexed {path}: {len(problems)} problem(s) found; rebuilt "
                + ", ".join(f"{db} {n}" for db, n in counts.items())
            )
            if not verify_chains(store, path, g):
                print(f"FAIL {path}: its blocks do not verify; reindex rebuilds only the indexes")
                status = 1
        finally:
            store.close()
    return status


def add_parser(sub: Any) -> None:
    st = sub.add_parser("store", help="maintain a stopped node's store").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    s = st.add_parser(
        "reindex",
        help="rebuild the derived databases (readings index, seq marks, heads, ...) from the "
        "blocks; the node must be stopped",
    )
    s.add_argument("--data-dir", required=True, help="a node's data dir (or a dir holding several)")
    s.set_defaults(fn=lambda a: reindex_stores(Path(a.data_dir)))
