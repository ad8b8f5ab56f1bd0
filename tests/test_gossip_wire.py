"""Gossip messages: canonical round trips; anything else is MalformedMessage."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshhealth.chain.block import build_block, encode_body
from meshhealth.crypto.keys import Identity
from meshhealth.errors import MalformedMessage, RemoteError
from meshhealth.gossip.messages import Blocks, FullHeads, FullHeadsRequest, Heads, Pull, Push
from meshhealth.gossip.wire import decode, encode
from meshhealth.net.gossip_shell import check_signed_block

key = st.binary(min_size=32, max_size=32)
height = st.integers(0, 2**40)
head = st.tuples(key, height)
raw_block = st.tuples(st.binary(max_size=300), st.binary(max_size=600))


@st.composite
def messages(draw):  # type: ignore[no-untyped-def]
    kind = draw(st.sampled_from(["push", "heads", "req", "full", "pull", "blocks"]))
    if kind == "push":
        return Push(draw(key), draw(height), draw(st.integers(0, 50))), [draw(raw_block)]
    if kind == "heads":
        return Heads(
            tuple(draw(st.lists(head, max_size=8))),
            draw(st.binary(min_size=16, max_size=16)),
            draw(st.booleans()),
        ), []
    if kind == "req":
        return FullHeadsRequest(), []
    if kind == "full":
        return FullHeads(tuple(draw(st.lists(head, max_size=20)))), []
    a = draw(height)
    b = a + draw(st.integers(0, 5))
    if kind == "pull":
        return Pull(draw(key), a, b), []
    return Blocks(draw(key), a, b, draw(st.integers(0, 50))), [
        draw(raw_block) for _ in range(b - a + 1)
    ]


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(mb) -> None:  # type: ignore[no-untyped-def]
    msg, blocks = mb
    assert decode(encode(msg, blocks)) == (msg, blocks)


@settings(max_examples=500, deadline=None)
@given(messages(), st.data())
def test_mutations_never_raise_anything_but_malformed(mb, data) -> None:  # type: ignore[no-untyped-def]
    raw = bytearray(encode(*mb))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        msg, blocks = decode(bytes(raw))
    except MalformedMessage:
        return
    assert encode(msg, blocks) == bytes(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_malformed(data: bytes) -> None:
    try:
        msg, blocks = decode(data)
    except MalformedMessage:
        return
    assert encode(msg, blocks) == data  # it happened to be a canonical message


def test_bounds() -> None:
    import pytest

    from meshhealth.wire.codec import pack

    with pytest.raises(MalformedMessage):
        decode(pack(["GL", b"\1" * 32, 0, 10_000]))  # pull range too large
    with pytest.raises(MalformedMessage):
        decode(pack(["GB", b"\1" * 32, 0, 1, 0, [[b"h", b"b"]]]))  # range without its blocks
    with pytest.raises(MalformedMessage):
        decode(b"\x00" * (16 * 1024 * 1024 + 1))


NODE = Identity.generate("node")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=4), st.data())
def test_a_block_checked_for_the_buffer_raises_only_remote_errors(entries, data) -> None:  # type: ignore[no-untyped-def]
    """issue 11 #2/#7: the check a peer's block passes before it may wait in the buffer
    (signature of its chain's producer, body against header) raises nothing but
    RemoteError on any byte flipped in header or body."""
    net = b"\x05" * 32
    b = build_block(NODE.signing, network=net, height=7, prev=net, ts_ms=1, entries=entries)
    raw = [bytearray(b.header.encode()), bytearray(encode_body(entries))]
    check_signed_block(net, NODE.public, 7, (bytes(raw[0]), bytes(raw[1])), None)
    part = data.draw(st.integers(0, 1))
    i = data.draw(st.integers(0, len(raw[part]) - 1))
    raw[part][i] ^= data.draw(st.integers(1, 255))
    try:
        check_signed_block(net, NODE.public, 7, (bytes(raw[0]), bytes(raw[1])), None)
    except RemoteError:
        return
    assert part == 1  # a signed header does not survive a flipped byte; a body may
