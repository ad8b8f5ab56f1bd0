"""Issue 11 #18 (core): every derived database is recomputed from the blocks; any damage
is named by database and key; an erase is not mistaken for damage; a rebuild repairs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from core_helpers import T0, build_chain

from meshhealth.ingest.seqmarks import SeqMark
from meshhealth.store import derived
from meshhealth.store.lmdb_store import Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    yield s
    s.close()


def problems(store: Store) -> list[str]:
    return derived.check(store, derived.scan(store))


def edit(store: Store, db: str, fn: Callable[[dict[bytes, bytes]], None]) -> None:
    """Apply ``fn`` to a copy of one database's records and write the result back."""
    records = store.raw_items(db)
    fn(records)

    def write(txn: object) -> None:
        txn.drop(store.db[db], delete=False)  # type: ignore[attr-defined]
        for k, v in records.items():
            txn.put(k, v, db=store.db[db])  # type: ignore[attr-defined]

    store._write(write)


def first(records: dict[bytes, bytes]) -> bytes:
    return sorted(records)[0]


def flip(records: dict[bytes, bytes]) -> None:
    k = first(records)
    records[k] = records[k][:-1] + bytes([records[k][-1] ^ 1])


DAMAGE: dict[str, Callable[[dict[bytes, bytes]], None]] = {
    "flip": flip,
    "delete": lambda r: r.pop(first(r)),
    "extra": lambda r: r.__setitem__(b"\xfe" * len(first(r)), r[first(r)]),
}


@pytest.mark.parametrize("db", ["heads", "readings", "names", "seqmarks", "acl", "meta"])
@pytest.mark.parametrize("how", list(DAMAGE))
def test_any_damage_to_a_derived_database_is_named_and_rebuilt(
    store: Store, db: str, how: str
) -> None:
    world = build_chain(store).world

    def query() -> list[object]:
        return [store.reading_blocks(world.patient.public, s, 0, 2**50) for s in ("hr", "bp")]

    assert problems(store) == []
    before = query()
    assert before[0] and before[1]
    if db == "meta":  # the readings counter (genesis is checked by verifying the chains)
        edit(store, "meta", lambda r: r.__setitem__(b"readings", (10**6).to_bytes(8, "big")))
    else:
        edit(store, db, DAMAGE[how])
    found = problems(store)
    assert any(p.startswith(f"{db}: ") for p in found), found
    # damaged names also leave readings records pointing nowhere; nothing else is blamed
    blamed = {db, "readings"} if db == "names" else {db}
    assert {p.split(":")[0] for p in found} <= blamed, found
    derived.rebuild(store, derived.scan(store))
    assert problems(store) == []
    assert query() == before


def test_links_and_audit_are_recomputed(store: Store) -> None:
    built = build_chain(store)
    sc = derived.scan(store)
    assert sc.links == {} and sc.audit == {}  # one chain, no reads: nothing to link or log
    assert set(sc.acl) == {tx for c in built.commits for tx, _ in c.txs}
    edit(store, "links", lambda r: r.__setitem__(b"\x01" * 64, b"\0" * 8))
    edit(store, "audit", lambda r: r.__setitem__(b"\x02" * 48, b"\0" * 44))
    found = problems(store)
    assert any(p.startswith("links: ") for p in found)
    assert any(p.startswith("audit: ") for p in found)


def test_an_erase_is_not_damage_and_a_rebuild_keeps_the_erased_seqs(store: Store) -> None:
    built = build_chain(store)
    marks = store.seqmarks()
    assert store.prune_patient(built.world.patient.public, T0 + 90_000) > 0
    assert problems(store) == []  # the pruned readings left the index and the blocks alike
    derived.rebuild(store, derived.scan(store))
    assert problems(store) == []
    # the seq marks still cover the erased readings' seqs: their re-sends stay duplicates
    assert {d: (m.contiguous, m.above) for d, m in store.seqmarks().items()} == {
        d: (m.contiguous, m.above) for d, m in marks.items()
    }
    # and a mark that lost seqs still in the blocks is caught even after an erase
    device = first(store.raw_items("seqmarks"))
    edit(store, "seqmarks", lambda r: r.__setitem__(device, SeqMark().encode()))
    assert any(p.startswith("seqmarks: ") and "misses" in p for p in problems(store))


def test_every_database_of_the_store_is_verified() -> None:
    """A new database must say how ``chain verify`` checks it (here, in store/derived)."""
    from meshhealth.store.lmdb_store import _DBS

    assert sorted(_DBS) == sorted(derived.PRIMARY + derived.DERIVED)


def test_a_readings_record_for_readings_no_block_holds_is_extra(store: Store) -> None:
    build_chain(store)

    def forge(r: dict[bytes, bytes]) -> None:  # valid ids, a block height that holds no such
        k = first(r)
        r[k[:11] + (99).to_bytes(4, "big")] = r[k]

    edit(store, "readings", forge)
    (found,) = problems(store)
    assert found.startswith("readings: ") and "extra record" in found and "#99" in found
