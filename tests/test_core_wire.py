"""Wire codec: canonical round trips, robustness on hostile bytes, signatures."""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from meshhealth.errors import InvalidSignature, MalformedMessage
from meshhealth.wire import (
    BlockHeader,
    EnrollDevice,
    Link,
    Reading,
    Receipt,
    ReceiptV2,
    StreamKey,
    codec,
    decode_entry,
)
from meshhealth.wire.codec import DOMAIN, MAX_U32, MAX_U64, pack, peek_tag
from meshhealth.wire.types import (
    MAX_EPOCH_MS,
    MAX_HEADER,
    MAX_READING,
    MAX_SPAN_MS,
    MAX_TX,
    MIN_EPOCH_MS,
)

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies -------------------------------------------------------------

KEY = st.binary(min_size=32, max_size=32)
SIG = st.binary(min_size=64, max_size=64)
CHAIN = st.binary(min_size=8, max_size=8)
NAME = st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True)
U64 = st.integers(0, MAX_U64)
U32 = st.integers(0, MAX_U32)
SIGNING_KEYS = st.binary(min_size=32, max_size=32).map(nacl.signing.SigningKey)

# field strategies by name, shared by every type
FIELD = {
    "device": KEY,
    "patient": KEY,
    "node": KEY,
    "network": KEY,
    "prev": KEY,
    "root": KEY,
    "stream": NAME,
    "seq": st.integers(1, MAX_U64),
    "t_ms": U64,
    "span_ms": st.integers(0, MAX_SPAN_MS),
    "chain_id": CHAIN,
    "epoch": U32,
    "nonce": st.binary(min_size=24, max_size=24),
    "ciphertext": st.binary(max_size=600),
    "ts_ms": U64,
    "height": U64,
    "count": U32,
}

stream_keys = st.builds(
    lambda stream, chain_id, epochs, epoch_ms, sealed: StreamKey(
        stream, chain_id, min(epochs), epoch_ms, max(epochs), sealed
    ),
    NAME,
    CHAIN,
    st.tuples(U32, U32),
    st.integers(MIN_EPOCH_MS, MAX_EPOCH_MS),
    st.binary(min_size=80, max_size=80),
)
stream_key_lists = st.lists(stream_keys, min_size=1, max_size=32, unique_by=lambda s: s.stream).map(
    tuple
)
links = st.builds(Link, KEY, U64, KEY)
link_lists = st.lists(links, max_size=40).map(tuple)

FIELD_EXTRA = {"streams": stream_key_lists, "links": link_lists, "chain": KEY, "hash": KEY}


def strategy_for(name: str) -> st.SearchStrategy[Any]:
    return FIELD_EXTRA[name] if name in FIELD_EXTRA else FIELD[name]


def fields_of(cls: Any) -> dict[str, st.SearchStrategy[Any]]:
    return {name: strategy_for(name) for name, _ in cls.FIELDS}


readings = st.builds(Reading, sig=SIG, **fields_of(Reading))
enrolments = st.builds(EnrollDevice, sig=SIG, **fields_of(EnrollDevice))
headers = st.builds(BlockHeader, sig=SIG, **fields_of(BlockHeader))
receipts = st.builds(Receipt, sig=SIG, **fields_of(Receipt))
receipts_v2 = st.builds(ReceiptV2, sig=SIG, **fields_of(ReceiptV2))
any_value = st.one_of(readings, enrolments, headers, receipts, receipts_v2)

ALL_TYPES = (Reading, EnrollDevice, BlockHeader, Receipt, ReceiptV2)


def decoders() -> list[Any]:
    return [*(c.decode for c in ALL_TYPES), decode_entry]


def assert_only_malformed_or_canonical(data: bytes) -> int:
    """Every decoder either raises MalformedMessage or returns a value that re-encodes to
    exactly ``data``.  Returns how many decoders accepted."""
    ok = 0
    for dec in decoders():
        try:
            v = dec(data)
        except MalformedMessage:
            continue
        assert v.encode() == data
        ok += 1
    return ok


# --- round trips ------------------------------------------------------------


@SETTINGS
@given(v=any_value)
def test_round_trip(v: Any) -> None:
    data = v.encode()
    assert len(data) <= type(v).MAX_LEN
    back = type(v).decode(data)
    assert back == v
    assert type(back) is type(v)
    assert back.encode() == data


@SETTINGS
@given(v=st.one_of(readings, enrolments))
def test_decode_entry_dispatches_readings_and_enrolments(v: Any) -> None:
    got = decode_entry(v.encode())
    assert type(got) is type(v)
    assert got == v


@SETTINGS
@given(v=st.one_of(headers, receipts, receipts_v2))
def test_decode_entry_refuses_non_entries(v: Any) -> None:
    with pytest.raises(MalformedMessage):
        decode_entry(v.encode())


@SETTINGS
@given(v=any_value)
def test_each_type_refuses_the_others(v: Any) -> None:
    data = v.encode()
    for cls in ALL_TYPES:
        if cls is type(v):
            continue
        with pytest.raises(MalformedMessage):
            cls.decode(data)


def test_round_trip_at_field_bounds() -> None:
    r = Reading(
        b"\xff" * 32,
        b"\0" * 32,
        "a" + "z9_" * 5,
        MAX_U64,
        MAX_U64,
        MAX_SPAN_MS,
        b"\0" * 8,
        MAX_U32,
        b"\1" * 24,
        b"",
        b"\2" * 64,
    )
    assert Reading.decode(r.encode()) == r
    h = BlockHeader(
        b"\0" * 32,
        b"\1" * 32,
        MAX_U64,
        b"\2" * 32,
        0,
        b"\3" * 32,
        MAX_U32,
        (Link(b"\4" * 32, MAX_U64, b"\5" * 32),) * 3,
        b"\6" * 64,
    )
    assert BlockHeader.decode(h.encode()) == h
    sk = StreamKey("x", b"\0" * 8, MAX_U32, MAX_EPOCH_MS, MAX_U32, b"\0" * 80)
    e = EnrollDevice(b"\0" * 32, b"\1" * 32, MAX_U64, (sk,), b"\0" * 64)
    assert EnrollDevice.decode(e.encode()) == e


def test_peek_tag() -> None:
    r = Reading(b"\1" * 32, b"\2" * 32, "hr", 1, 0, 0, b"\0" * 8, 0, b"\0" * 24, b"", b"\0" * 64)
    assert peek_tag(r.encode()) == "R1"
    for bad in (b"", b"\x9c", b"\x9c\xa2R", b"\x80\xa2R1", b"\x9c\xd9\x02R1"):
        with pytest.raises(MalformedMessage):
            peek_tag(bad)


# --- hostile bytes ----------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_malformed(data: bytes) -> None:
    assert_only_malformed_or_canonical(data)


@FUZZ
@given(tag=st.sampled_from(["R1", "E1", "B1", "A1", "Z9"]), data=st.binary(max_size=200))
def test_random_bytes_behind_a_valid_tag_only_raise_malformed(tag: str, data: bytes) -> None:
    for n in (0x9C, 0x95, 0x99, 0x97):
        assert_only_malformed_or_canonical(bytes([n]) + pack(tag) + data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), MAX_U64)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=90)
    | st.sampled_from(["R1", "E1", "hr"]),
    lambda c: st.lists(c, max_size=8) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=20,
)


@SETTINGS
@given(v=any_value, data=st.data())
def test_one_field_replaced_by_any_msgpack_value(v: Any, data: st.DataObject) -> None:
    raw = msgpack.unpackb(v.encode(), raw=False)
    i = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[i] = data.draw(msgpack_values, label="value")
    out = msgpack.packb(raw, use_bin_type=True)
    assert_only_malformed_or_canonical(out)
    try:
        back = type(v).decode(out)
    except MalformedMessage:
        return
    assert (back == v) == (out == v.encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tag=st.sampled_from(["R1", "E1", "B1", "A1"]), rest=st.lists(msgpack_values, max_size=12))
def test_structured_garbage_only_raises_malformed(tag: str, rest: list[Any]) -> None:
    assert_only_malformed_or_canonical(msgpack.packb([tag, *rest], use_bin_type=True))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, x in ops:
        if not b:
            break
        p = pos % (len(b) + (op == "insert"))
        if op == "flip":
            b[p] ^= x
        elif op == "insert":
            b.insert(p, x)
        elif op == "delete":
            del b[p]
        else:
            del b[p:]
    return bytes(b)


@FUZZ
@given(v=any_value, ops=st.lists(mutation, min_size=1, max_size=4))
def test_mutated_encodings_only_raise_malformed(v: Any, ops: list[tuple[str, int, int]]) -> None:
    data = mutate(v.encode(), ops)
    assume(data != v.encode())
    assert_only_malformed_or_canonical(data)
    # the original type never accepts different bytes as the same value
    try:
        back = type(v).decode(data)
    except MalformedMessage:
        return
    assert back != v


# --- non-canonical encodings ------------------------------------------------


def _sample_reading() -> Reading:
    return Reading(
        b"\1" * 32, b"\2" * 32, "hr", 5, 300, 0, b"\3" * 8, 7, b"\4" * 24, b"ct", b"\5" * 64
    )


def _items(r: Reading) -> list[bytes]:
    return [pack(x) for x in [r.TAG, *r.body(), r.sig]]


def _array(items: list[bytes]) -> bytes:
    assert len(items) < 16
    return bytes([0x90 | len(items)]) + b"".join(items)


def test_manual_encoding_matches_packer() -> None:
    r = _sample_reading()
    assert _array(_items(r)) == r.encode()
    assert Reading.decode(_array(_items(r))) == r


SEQ, T_MS, DEVICE, STREAM, TAG = 4, 5, 1, 3, 0


@pytest.mark.parametrize(
    ("index", "encoded"),
    [
        # seq = 5 (canonically a positive fixint) in every wider integer form
        (SEQ, b"\xcc\x05"),
        (SEQ, b"\xcd\x00\x05"),
        (SEQ, b"\xce\x00\x00\x00\x05"),
        (SEQ, b"\xcf" + (5).to_bytes(8, "big")),
        (SEQ, b"\xd0\x05"),
        (SEQ, b"\xd1\x00\x05"),
        (SEQ, b"\xd2\x00\x00\x00\x05"),
        (SEQ, b"\xd3" + (5).to_bytes(8, "big")),
        # t_ms = 300 (canonically uint16)
        (T_MS, b"\xce\x00\x00\x01\x2c"),
        (T_MS, b"\xcf" + (300).to_bytes(8, "big")),
        # a float and a bool where an integer belongs
        (SEQ, b"\xcb" + struct.pack(">d", 5.0)),
        (SEQ, b"\xca" + struct.pack(">f", 5.0)),
        (SEQ, b"\xc3"),
        # a 32-byte key as bin16 / bin32 instead of bin8, or as a str
        (DEVICE, b"\xc5\x00\x20" + b"\1" * 32),
        (DEVICE, b"\xc6\x00\x00\x00\x20" + b"\1" * 32),
        (DEVICE, b"\xd9\x20" + b"\1" * 32),
        # the stream name as str8 instead of fixstr, or as bin
        (STREAM, b"\xd9\x02hr"),
        (STREAM, b"\xc4\x02hr"),
        # the tag in a wider str form, as bin, or another tag
        (TAG, b"\xd9\x02R1"),
        (TAG, b"\xc4\x02R1"),
        (TAG, pack("R2")),
        (TAG, pack("A1")),
        (TAG, pack("r1")),
        (TAG, b"\xc0"),
    ],
)
def test_non_canonical_field_encodings_rejected(index: int, encoded: bytes) -> None:
    items = _items(_sample_reading())
    items[index] = encoded
    data = _array(items)
    with pytest.raises(MalformedMessage):
        Reading.decode(data)
    with pytest.raises(MalformedMessage):
        decode_entry(data)


def test_non_canonical_containers_rejected() -> None:
    r = _sample_reading()
    items = _items(r)
    wide_array16 = b"\xdc\x00" + bytes([len(items)]) + b"".join(items)
    wide_array32 = b"\xdd\x00\x00\x00" + bytes([len(items)]) + b"".join(items)
    as_map = pack({"tag": r.TAG, "body": r.body(), "sig": r.sig})
    as_map2 = msgpack.packb(
        {name: getattr(r, name) for name, _ in Reading.FIELDS}, use_bin_type=True
    )
    bad = [
        wide_array16,
        wide_array32,
        as_map,
        as_map2,
        r.encode() + b"\x00",  # trailing bytes
        r.encode() + r.encode(),
        _array(items[:-1]),  # a field missing
        _array([*items, pack(0)]),  # an extra field
        pack([r.TAG, r.body(), r.sig]),  # nested instead of flat
    ]
    for data in bad:
        for dec in (Reading.decode, decode_entry):
            with pytest.raises(MalformedMessage):
                dec(data)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("seq", 0),
        ("stream", "HR"),
        ("stream", ""),
        ("stream", "a" * 17),
        ("stream", "9a"),
        ("stream", "hr\n"),
        ("span_ms", MAX_SPAN_MS + 1),
        ("epoch", MAX_U32 + 1),
        ("chain_id", b"\0" * 7),
        ("chain_id", b"\0" * 9),
        ("nonce", b"\0" * 23),
        ("device", b"\0" * 31),
        ("ciphertext", "text"),
        ("t_ms", -1),
    ],
)
def test_out_of_bound_fields_rejected(name: str, value: Any) -> None:
    r = _sample_reading()
    fields = [r.TAG, *r.body(), r.sig]
    fields[1 + [n for n, _ in Reading.FIELDS].index(name)] = value
    with pytest.raises(MalformedMessage):
        Reading.decode(msgpack.packb(fields, use_bin_type=True))


def _enrol_wire(streams: list[list[Any]]) -> bytes:
    return pack(["E1", b"\1" * 32, b"\2" * 32, 10, streams, b"\0" * 64])


def test_enrolment_field_rules() -> None:
    good = ["hr", b"\0" * 8, 3, 60_000, 3, b"\0" * 80]
    assert len(EnrollDevice.decode(_enrol_wire([good])).streams) == 1
    bad_streams = [
        [],  # no stream
        [good, good],  # a stream twice
        [["hr", b"\0" * 8, 4, 60_000, 3, b"\0" * 80]],  # key epoch before the chain's start
        [["hr", b"\0" * 8, 3, MIN_EPOCH_MS - 1, 3, b"\0" * 80]],
        [["hr", b"\0" * 8, 3, MAX_EPOCH_MS + 1, 3, b"\0" * 80]],
        [["hr", b"\0" * 8, 3, 60_000, 3, b"\0" * 79]],
        [["hr", b"\0" * 8, 3, 60_000, 3]],  # a short record
        [[f"s{i}", b"\0" * 8, 3, 60_000, 3, b"\0" * 80] for i in range(33)],  # > 32 streams
    ]
    for streams in bad_streams:
        with pytest.raises(MalformedMessage):
            EnrollDevice.decode(_enrol_wire(streams))
        with pytest.raises(MalformedMessage):
            decode_entry(_enrol_wire(streams))


def _reading_of_size(size: int) -> Reading:
    base = dataclasses.replace(_sample_reading(), ciphertext=b"")
    overhead = len(base.encode()) - 2 + 3  # c4 00 for b"", a bin16 header for the payload
    r = dataclasses.replace(base, ciphertext=b"\x00" * (size - overhead))
    assert len(r.encode()) == size
    return r


@pytest.mark.parametrize(
    ("cls", "limit"),
    [(Reading, MAX_READING), (EnrollDevice, MAX_TX), (BlockHeader, MAX_HEADER), (Receipt, 1024)],
)
def test_oversized_input_rejected_before_decoding(
    monkeypatch: pytest.MonkeyPatch, cls: Any, limit: int
) -> None:
    calls: list[int] = []
    real = codec.msgpack.unpackb

    def spy(data: Any, **kw: Any) -> Any:
        calls.append(len(data))
        return real(data, **kw)

    monkeypatch.setattr(codec.msgpack, "unpackb", spy)
    with pytest.raises(MalformedMessage, match="exceeds"):
        cls.decode(b"\x9c" + b"\x00" * limit)
    assert calls == []
    with pytest.raises(MalformedMessage):
        cls.decode(b"\x9c" + b"\x00" * (limit - 1))  # within bound: it is decoded (and fails)
    assert calls == [limit]


def test_reading_size_bound_is_exact() -> None:
    r = _reading_of_size(MAX_READING)
    assert Reading.decode(r.encode()) == r
    assert decode_entry(r.encode()) == r
    big = _reading_of_size(MAX_READING + 1)
    with pytest.raises(MalformedMessage, match="exceeds"):
        Reading.decode(big.encode())
    with pytest.raises(MalformedMessage):
        decode_entry(big.encode())


# --- signatures -------------------------------------------------------------


def _create(cls: Any, key: nacl.signing.SigningKey, values: dict[str, Any]) -> Any:
    fields = {k: v for k, v in values.items() if k != cls.SIGNER}
    return cls.create(key, **fields)


def signed_values(cls: Any) -> st.SearchStrategy[Any]:
    return st.builds(
        lambda key, fields: _create(cls, key, fields),
        SIGNING_KEYS,
        st.fixed_dictionaries(fields_of(cls)),
    )


any_signed = st.one_of(*(signed_values(c) for c in ALL_TYPES))


@SETTINGS
@given(v=any_signed)
def test_created_values_verify_and_survive_the_wire(v: Any) -> None:
    assert v.verify() is v
    assert type(v).decode(v.encode()).verify() == v
    assert v.signing_bytes().startswith(DOMAIN + v.TAG.encode() + b"\0")


@SETTINGS
@given(v=any_signed, data=st.data())
def test_changing_any_field_breaks_the_signature(v: Any, data: st.DataObject) -> None:
    cls = type(v)
    name = data.draw(st.sampled_from([n for n, _ in cls.FIELDS] + ["sig"]), label="field")
    strat = SIG if name == "sig" else strategy_for(name)
    new = data.draw(strat.filter(lambda x: x != getattr(v, name)), label="new value")
    changed = dataclasses.replace(v, **{name: new})
    with pytest.raises(InvalidSignature):
        changed.verify()
    # and through the wire
    with pytest.raises(InvalidSignature):
        cls.decode(changed.encode()).verify()


@SETTINGS
@given(v=any_signed, ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutations_that_still_decode_never_verify(v: Any, ops: list[tuple[str, int, int]]) -> None:
    data = mutate(v.encode(), ops)
    assume(data != v.encode())
    try:
        other = type(v).decode(data)
    except MalformedMessage:
        return
    with pytest.raises(InvalidSignature):
        other.verify()


@SETTINGS
@given(
    r=signed_values(Reading),
    node=st.fixed_dictionaries(fields_of(Receipt)),
    hdr=st.fixed_dictionaries(fields_of(BlockHeader)),
)
def test_domain_separation(r: Reading, node: dict[str, Any], hdr: dict[str, Any]) -> None:
    signer = r.device
    receipt = Receipt(**dict(node, node=signer), sig=r.sig)
    header = BlockHeader(**dict(hdr, node=signer), sig=r.sig)
    # the same fields, re-labelled as another type, with the reading's own bytes where possible
    receipt2 = Receipt(r.patient, signer, r.device, r.seq, r.t_ms, r.span_ms, r.sig)
    for other in (receipt, header, receipt2):
        with pytest.raises(InvalidSignature):
            other.verify()


def test_signature_is_over_domain_separated_bytes() -> None:
    key = nacl.signing.SigningKey(b"\7" * 32)
    r = Reading.create(
        key,
        patient=b"\2" * 32,
        stream="hr",
        seq=1,
        t_ms=1,
        span_ms=0,
        chain_id=b"\0" * 8,
        epoch=0,
        nonce=b"\0" * 24,
        ciphertext=b"",
    )
    # a signature over the bare body (no domain / tag) is not accepted
    bare = key.sign(pack(r.body())).signature
    with pytest.raises(InvalidSignature):
        dataclasses.replace(r, sig=bare).verify()
    # a receipt signed by the same key over a tag-swapped message is not a reading signature
    rc = Receipt.create(
        key, network=b"\2" * 32, device=key.verify_key.encode(), seq=1, height=1, ts_ms=1
    )
    with pytest.raises(InvalidSignature):
        dataclasses.replace(r, sig=rc.sig).verify()
    assert r.verify() is r


def test_header_with_max_links_round_trips() -> None:
    from meshhealth.chain.block import build_block
    from meshhealth.wire.types import MAX_LINKS

    key = nacl.signing.SigningKey(b"\3" * 32)
    links = [Link(bytes([i]) * 32, 0, bytes([i]) * 32) for i in range(MAX_LINKS)]
    blk = build_block(
        key, network=b"\0" * 32, height=1, prev=b"\1" * 32, ts_ms=0, entries=[], links=links
    )
    assert len(blk.header.links) == MAX_LINKS
    assert BlockHeader.decode(blk.header.encode()) == blk.header
