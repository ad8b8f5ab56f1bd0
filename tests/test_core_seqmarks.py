"""SeqMark: exactly-once bookkeeping without in-order arrival."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshhealth.ingest import seqmarks
from meshhealth.ingest.seqmarks import SeqMark


def contiguous_of(added: set[int]) -> int:
    k = 0
    while k + 1 in added:
        k += 1
    return k


@settings(max_examples=80, deadline=None)
@given(data=st.data(), n=st.integers(0, 200))
def test_any_arrival_order_with_duplicates(data: st.DataObject, n: int) -> None:
    seqs = list(range(1, n + 1))
    dups = data.draw(st.lists(st.sampled_from(seqs), max_size=n), label="dups") if n else []
    order = data.draw(st.permutations(seqs + dups), label="order")
    mark, added = SeqMark(), set()
    for i, s in enumerate(order):
        assert mark.has(s) == (s in added)
        mark.add(s)
        added.add(s)
        c = contiguous_of(added)
        assert mark.contiguous == c
        assert mark.above == {x for x in added if x > c}
        if i % 17 == 0 or i == len(order) - 1:
            for probe in range(1, n + 3):
                assert mark.has(probe) == (probe in added)
            back = SeqMark.decode(mark.encode())
            assert back == mark
            assert back.encode() == mark.encode()
    assert mark.contiguous == n
    assert mark.above == set()
    assert not mark.has(n + 1)
    assert SeqMark.decode(mark.encode()) == mark


@settings(max_examples=60, deadline=None)
@given(seqs=st.sets(st.integers(1, 10**12), max_size=60))
def test_encoding_round_trip_with_gaps(seqs: set[int]) -> None:
    mark = SeqMark()
    for s in seqs:
        mark.add(s)
    back = SeqMark.decode(mark.encode())
    assert back == mark
    assert all(back.has(s) for s in seqs)
    assert back.encode() == mark.encode()  # canonical: the above set is sorted


def test_copy_is_independent() -> None:
    mark = SeqMark()
    for s in (1, 2, 5):
        mark.add(s)
    cp = mark.copy()
    assert cp == mark
    mark.add(3)
    mark.add(9)
    assert cp == SeqMark(2, {5})
    assert mark == SeqMark(3, {5, 9})
    mark.add(4)
    assert mark == SeqMark(5, {9})


def test_room_for_bounds_the_gap_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seqmarks, "MAX_ABOVE", 3)
    mark = SeqMark()
    for s in (3, 5, 7):
        assert mark.room_for(s)
        mark.add(s)
    assert not mark.room_for(9)
    assert mark.room_for(1)  # the next contiguous seq always fits
    mark.add(1)
    assert not mark.room_for(4)
    assert mark.room_for(2)
    mark.add(2)
    assert mark == SeqMark(3, {5, 7})
    assert mark.room_for(100)
