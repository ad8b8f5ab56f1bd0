"""``meshhealth chain verify`` and ``chain show``: read a node's store directly."""

from __future__ import annotations

import datetime as dt
import struct
from pathlib import Path

from meshhealth.chain.verify import verify_chain
from meshhealth.cli.progress import Progress
from meshhealth.config import Genesis
from meshhealth.errors import ConfigError, InvalidBlock
from meshhealth.store import derived
from meshhealth.store.lattice_view import confirmed_heights, replay_control
from meshhealth.store.lmdb_store import Store


def find_stores(root: Path) -> list[Path]:
    """Every LMDB node store at or under ``root``."""
    if (root / "data.mdb").exists():
        return [root]
    found = sorted(p.parent for p in root.rglob("data.mdb") if "outbox" not in p.parts)
    if not found:
        raise ConfigError(f"no node store (data.mdb) at or under {root}")
    return found


def _genesis(store: Store, path: Path | None) -> Genesis:
    if path is not None:
        return Genesis.load(path)
    raw = store.meta("genesis")
    if raw is None:
        raise ConfigError("store has no genesis recorded; pass --genesis FILE")
    return Genesis.load_text(raw.decode())


MAX_LISTED = 20  # derived-database problems printed per store; the rest are counted


def verify_stores(root: Path, genesis_path: Path | None = None, *, progress: bool = False) -> int:
    """Print a report; 0 when every chain of every store verifies and every derived
    database (readings index, seq marks, heads, ...) matches its blocks, 1 otherwise."""
    status = 0
    for path in find_stores(root):
        store = Store(path, readonly=True)
        try:
            g = _genesis(store, genesis_path)
            if not verify_chains(store, path, g, progress=progress):
                status = 1
        finally:
            store.close()
    return status


def verify_chains(store: Store, path: Path, g: Genesis, *, progress: bool = False) -> bool:
    """Verify every chain stored (from the headers, whatever ``heads`` says), then every
    derived database against the blocks; print one line per chain and per problem."""
    ok = True
    sc = derived.scan(store)  # the access state too, from the blocks, not from the acl index
    heads = store.raw_items("heads")
    nodes = sorted(sc.heads.keys() | heads.keys())
    total = sum(struct.unpack(">Q", v[:8])[0] + 1 for v in sc.heads.values())
    bar = Progress(total, f"verify {path.name}", force=progress)
    for node in nodes:
        raw = heads.get(node)
        head = None
        if raw is not None and len(raw) == 40:
            head = (struct.unpack(">Q", raw[:8])[0], raw[8:])
        try:
            rep = verify_chain(
                node,
                store.iter_raw_chain(node),
                network=g.network_id,
                authorities={a.key for a in g.authorities},
                expected_head=head,
                progress=bar.advance,
                lattice=sc.access if len(nodes) > 1 else None,
            )
        except InvalidBlock as exc:
            bar.close()
            print(f"FAIL {path}: chain {node.hex()[:8]} block {exc.height}: {exc}")
            ok = False
            continue
        bar.close()
        print(
            f"ok   {path}: chain {node.hex()[:8]} {rep.blocks} blocks, "
            f"{rep.readings} readings, {rep.txs} control txs, {rep.logs} access logs, "
            f"{rep.pruned} erased, head {rep.head.hex()[:16]}"
        )
    problems = derived.check(store, sc)
    for line in problems[:MAX_LISTED]:
        print(f"FAIL {path}: {line}")
    if len(problems) > MAX_LISTED:
        print(f"FAIL {path}: ... and {len(problems) - MAX_LISTED} more derived-database problems")
    if problems:
        print(f"     rebuild them from the blocks: meshhealth store reindex --data-dir {path}")
        return False
    print(f"ok   {path}: {', '.join(derived.DERIVED)} match the blocks")
    return ok


def _confirmed(height: int) -> str:
    return "none" if height < 0 else f"#{height}"


def show_store(root: Path, *, last: int = 10) -> int:
    for path in find_stores(root):
        store = Store(path, readonly=True)
        try:
            g = _genesis(store, None)
            print(
                f"store {path}  network {g.name} ({g.network_id.hex()[:16]})  "
                f"readings {store.reading_count()}  used {store.disk_bytes() / 1e6:.1f} MB"
            )
            _, faulty = replay_control(store)
            authorities = {a.key for a in g.authorities}
            confirmed = confirmed_heights(store, authorities, faulty)
            for node, (height, head) in sorted(store.heads().items()):
                mark = f"  FAULTY (equivocated at {faulty[node]})" if node in faulty else ""
                print(
                    f"  chain {node.hex()[:8]}  height {height}  confirmed "
                    f"{_confirmed(confirmed[node])}  head {head.hex()[:16]}{mark}"
                )
                for hgt in range(max(0, height - last + 1), height + 1):
                    hdr = store.header(node, hgt)
                    if hdr is None:
                        continue
                    ts = dt.datetime.fromtimestamp(hdr.ts_ms / 1000, dt.UTC).strftime(
                        "%H:%M:%S.%f"
                    )[:-3]
                    state = "confirmed" if hgt <= confirmed[node] else "pending"
                    print(
                        f"    #{hdr.height:<6} {ts}  {hdr.count:>6} entries  {len(hdr.links):>3} "
                        f"links  {state:<9}  root {hdr.root.hex()[:12]}  prev {hdr.prev.hex()[:12]}"
                    )
        finally:
            store.close()
    return 0
