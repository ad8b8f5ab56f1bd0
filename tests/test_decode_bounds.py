"""Issue 11 fix1 #2: decoding is bounded in objects, not only in bytes (pure core).

A 2 MB frame of empty arrays once decoded to ~140 MB of Python lists before any
check ran; every decoder entry point now refuses it having walked it, not built it.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from meshhealth.chain.block import MAX_BLOCK_ENTRIES, decode_body, encode_body
from meshhealth.errors import MalformedMessage
from meshhealth.gossip import wire as gossip_wire
from meshhealth.gossip.messages import FullHeads
from meshhealth.sharing.provider import _unpack_answer
from meshhealth.wire.codec import pack, unpack

SIZE = 2 * 1024 * 1024


def flat() -> bytes:
    return msgpack.packb([[]] * SIZE)  # one byte per empty array


def nested() -> bytes:  # every array within any per-array length bound
    return msgpack.packb([[[]] * 60_000 for _ in range(SIZE // 60_000)])


def tagged() -> bytes:  # the shape of a gossip message, its payload all empty arrays
    return msgpack.packb(["GF", [[]] * (SIZE - 16)])


ENTRY_POINTS: dict[str, Callable[[bytes], Any]] = {
    "unpack": lambda d: unpack(d, max_len=1 << 24),
    "decode_body": decode_body,
    "gossip": gossip_wire.decode,
    "provider_answer": _unpack_answer,
}


@pytest.mark.parametrize("payload", [flat, nested, tagged])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_a_frame_of_empty_arrays_is_refused_without_building_it(entry, payload) -> None:  # type: ignore[no-untyped-def]
    data = payload()
    assert len(data) >= SIZE - 100_000
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessage):
            ENTRY_POINTS[entry](data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(data), f"{entry}: peak {peak} bytes for {len(data)} input"


@pytest.mark.parametrize("bad", [b"\x81\xa1a\x01", b"\xc7\x01\x05x", b"\xd4\x01\x00", b"\x80"])
def test_maps_and_ext_types_are_refused(bad: bytes) -> None:
    for data in (bad, b"\x92" + pack(b"x" * 70_000) + bad):  # small, and past the walk threshold
        with pytest.raises(MalformedMessage):
            unpack(data, max_len=1 << 20)


def test_the_largest_honest_messages_still_decode() -> None:
    body = encode_body([b"e" * 100] * MAX_BLOCK_ENTRIES)
    assert len(decode_body(body)) == MAX_BLOCK_ENTRIES
    heads = tuple((bytes([i % 256]) * 32, i) for i in range(gossip_wire.MAX_HEADS))
    msg, _ = gossip_wire.decode(gossip_wire.encode(FullHeads(heads)))
    assert isinstance(msg, FullHeads) and len(msg.heads) == gossip_wire.MAX_HEADS
    with pytest.raises(MalformedMessage):  # one head more is over the message's bound
        gossip_wire.decode(pack(["GF", [[b"k" * 32, 1]] * (gossip_wire.MAX_HEADS + 5)]))
