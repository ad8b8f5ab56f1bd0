"""The patient's per-stream key chain, AEAD of readings, and the sample plaintext."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
import nacl.exceptions
import nacl.public
import pytest
from core_helpers import EPOCH_MS, T0, device_readings, make_world, new_device
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agents.sensors import PatientPhysiology, samples
from meshhealth.errors import MalformedMessage
from meshhealth.sharing import keychain
from meshhealth.sharing.keychain import (
    ChainCursor,
    KeyChain,
    decode_samples,
    decrypt,
    encode_samples,
    encrypt,
    message_key,
    ratchet,
)
from meshhealth.wire import Reading
from meshhealth.wire.codec import pack, unpack

SETTINGS = settings(max_examples=60, deadline=None)
KEYS = st.binary(min_size=32, max_size=32)


def ref_ratchet(key: bytes, steps: int) -> bytes:
    """Independent BLAKE2b-256 ratchet (hashlib pads ``person`` to 16 bytes, like libsodium)."""
    for _ in range(steps):
        key = hashlib.blake2b(key, digest_size=32, person=b"mh/ratchet").digest()
    return key


def ref_message_key(key: bytes) -> bytes:
    return hashlib.blake2b(key, digest_size=32, person=b"mh/message").digest()


# --- ratchet ----------------------------------------------------------------


@SETTINGS
@given(key=KEYS, a=st.integers(0, 40), b=st.integers(0, 40))
def test_ratchet_is_deterministic_and_composes(key: bytes, a: int, b: int) -> None:
    assert ratchet(key, a) == ratchet(key, a) == ref_ratchet(key, a)
    assert ratchet(ratchet(key, a), b) == ratchet(key, a + b)
    assert message_key(key) == ref_message_key(key)
    assert message_key(key) != ratchet(key)  # personalisation separates the two
    if a != b:
        assert ratchet(key, a) != ratchet(key, b)


def test_ratchet_bounds() -> None:
    key = b"\1" * 32
    assert ratchet(key, 0) == key
    assert ratchet(key) == ratchet(key, 1) != key
    with pytest.raises(ValueError):
        ratchet(key, -1)
    with pytest.raises(ValueError):
        ratchet(key, keychain.MAX_RATCHET_STEPS + 1)


@SETTINGS
@given(seed=KEYS, start=st.integers(0, 10**7), offset=st.integers(0, 50))
def test_keychain_key_is_the_ratcheted_seed(seed: bytes, start: int, offset: int) -> None:
    chain = KeyChain("hr", b"\0" * 8, seed, start, 60_000)
    assert chain.key(start) == seed
    assert chain.key(start + offset) == ref_ratchet(seed, offset)
    with pytest.raises(KeyError):
        chain.key(start - 1)
    assert KeyChain.from_doc(chain.to_doc()) == chain


@SETTINGS
@given(
    seed=KEYS,
    start=st.integers(0, 10**6),
    a=st.integers(0, 30),
    later=st.lists(st.integers(0, 60), max_size=6),
)
def test_cursor_matches_chain_forward_only(
    seed: bytes, start: int, a: int, later: list[int]
) -> None:
    chain = KeyChain("hr", b"\0" * 8, seed, start, 60_000)
    cur = chain.cursor(start + a)
    assert cur.key == chain.key(start + a)
    for i in range(start, start + a):  # nothing before the cursor's epoch
        with pytest.raises(KeyError):
            cur.key_at(i)
    pos = start + a
    for step in sorted(later):
        i = start + a + step
        assert (
            cur.message_key(i)
            == message_key(chain.key(i))
            == ref_message_key(ref_ratchet(seed, i - start))
        )
        assert cur.key_at(i) == chain.key(i)
        pos = i
        if i > start + a:  # having moved on, the cursor forgot the earlier keys
            with pytest.raises(KeyError):
                cur.key_at(i - 1)
    assert cur.epoch == pos


def test_keychain_new_is_random_and_well_formed() -> None:
    a, b = KeyChain.new("hr", 5), KeyChain.new("hr", 5)
    assert len(a.seed) == 32 and len(a.chain_id) == 8
    assert a.seed != b.seed and a.chain_id != b.chain_id
    assert a.epoch_ms == keychain.DEFAULT_EPOCH_MS and a.start_epoch == 5


def test_seal_unseal_round_trip() -> None:
    priv = nacl.public.PrivateKey.generate()
    key = b"\x42" * 32
    sealed = keychain.seal(key, priv.public_key)
    assert len(sealed) == 80
    assert keychain.unseal(sealed, priv) == key
    with pytest.raises(nacl.exceptions.CryptoError):
        keychain.unseal(sealed, nacl.public.PrivateKey.generate())


# --- AEAD -------------------------------------------------------------------


@SETTINGS
@given(
    seed=KEYS,
    epoch=st.integers(0, 100),
    plain=st.binary(max_size=300),
    aad=st.binary(max_size=100),
    other_aad=st.binary(max_size=100),
)
def test_encrypt_decrypt_round_trip(
    seed: bytes, epoch: int, plain: bytes, aad: bytes, other_aad: bytes
) -> None:
    chain = KeyChain("hr", b"\0" * 8, seed, 0, 60_000)
    mk = message_key(chain.key(epoch))
    nonce, ct = encrypt(mk, plain, aad)
    assert len(nonce) == 24
    assert len(ct) == len(plain) + 16
    assert decrypt(mk, nonce, ct, aad) == plain
    if other_aad != aad:
        with pytest.raises(nacl.exceptions.CryptoError):
            decrypt(mk, nonce, ct, other_aad)
    for wrong in (message_key(chain.key(epoch + 1)), chain.key(epoch)):
        with pytest.raises(nacl.exceptions.CryptoError):
            decrypt(wrong, nonce, ct, aad)
    with pytest.raises(nacl.exceptions.CryptoError):
        decrypt(mk, bytes([nonce[0] ^ 1]) + nonce[1:], ct, aad)
    with pytest.raises(nacl.exceptions.CryptoError):
        decrypt(mk, nonce, ct[:-1] + bytes([ct[-1] ^ 1]), aad)


def test_fresh_nonce_per_encryption() -> None:
    mk = message_key(b"\3" * 32)
    n1, c1 = encrypt(mk, b"same", b"aad")
    n2, c2 = encrypt(mk, b"same", b"aad")
    assert n1 != n2 and c1 != c2
    assert encrypt(mk, b"same", b"aad", b"\0" * 24) == encrypt(mk, b"same", b"aad", b"\0" * 24)


def test_device_reading_decrypts_with_the_patients_chain() -> None:
    world = make_world()
    dev, _tx = new_device(world)
    phys_samples = samples(PatientPhysiology(7), "hr", T0, T0 + 150_000)
    raws = device_readings(dev, "hr", T0, T0 + 150_000)
    got: list[tuple[int, tuple[float, ...]]] = []
    for _, raw in raws:
        r = Reading.decode(raw)
        chain = world.chains["hr"]
        mk = message_key(chain.key(r.epoch))
        assert r.epoch == r.t_ms // EPOCH_MS == r.t_last_ms // EPOCH_MS
        plain = decrypt(mk, r.nonce, r.ciphertext, r.associated_data())
        unit, out = decode_samples(plain, r.t_ms)
        assert unit == "/min"
        got += out
        # the clear header is bound: any other epoch's key, or another header, fails
        with pytest.raises(nacl.exceptions.CryptoError):
            decrypt(message_key(chain.key(r.epoch + 1)), r.nonce, r.ciphertext, r.associated_data())
        moved = dataclasses.replace(r, seq=r.seq + 1)
        with pytest.raises(nacl.exceptions.CryptoError):
            decrypt(mk, r.nonce, r.ciphertext, moved.associated_data())
    assert len({Reading.decode(raw).epoch for _, raw in raws}) == 3
    assert [t for t, _ in got] == [t for t, _ in phys_samples]
    for (_, v), (_, w) in zip(got, phys_samples, strict=True):
        assert v == pytest.approx(w, abs=1)


# --- sample plaintext -------------------------------------------------------


def _close(
    got: list[tuple[int, tuple[float, ...]]],
    want: list[tuple[int, tuple[float, ...]]],
    decimals: int,
) -> None:
    assert [t for t, _ in got] == [t for t, _ in want]
    tol = 10.0**-decimals
    for (_, g), (_, w) in zip(got, want, strict=True):
        assert len(g) == len(w)
        for x, y in zip(g, w, strict=True):
            assert abs(x - y) <= tol


values_1 = st.floats(-5000, 5000, allow_nan=False).map(lambda x: (x,))
values_2 = st.tuples(st.floats(0, 300, allow_nan=False), st.floats(0, 300, allow_nan=False))


@SETTINGS
@given(
    decimals=st.integers(0, 3),
    t0=st.integers(0, 2**50),
    period=st.integers(1, 600_000),
    vals=st.lists(values_1 | values_2, min_size=1, max_size=50),
)
def test_samples_round_trip_regular(
    decimals: int, t0: int, period: int, vals: list[tuple[float, ...]]
) -> None:
    ss = [(t0 + i * period, v) for i, v in enumerate(vals)]
    plain = encode_samples("u", decimals, t0, ss)
    unit, exp, dt, _ = unpack(plain, max_len=1 << 16)
    assert (unit, exp) == ("u", -decimals)
    if len(ss) > 1:
        assert dt == period  # a regular series costs one integer
    unit, got = decode_samples(plain, t0)
    assert unit == "u"
    _close(got, ss, decimals)


@SETTINGS
@given(
    decimals=st.integers(0, 3),
    t0=st.integers(0, 2**50),
    first=st.integers(0, 10**6),
    gaps=st.lists(st.integers(0, 10**6), max_size=50),
    data=st.data(),
)
def test_samples_round_trip_irregular(
    decimals: int, t0: int, first: int, gaps: list[int], data: st.DataObject
) -> None:
    times = [t0 + first]
    for g in gaps:
        times.append(times[-1] + g)
    vals = data.draw(st.lists(values_1, min_size=len(times), max_size=len(times)))
    ss = list(zip(times, vals, strict=True))
    unit, got = decode_samples(encode_samples("mm[Hg]", decimals, t0, ss), t0)
    assert unit == "mm[Hg]"
    _close(got, ss, decimals)


def test_samples_special_cases() -> None:
    t0 = T0
    # single sample at t0, single sample later
    for ss in ([(t0, (36.6,))], [(t0 + 5, (36.6,))]):
        _close(decode_samples(encode_samples("Cel", 1, t0, ss), t0)[1], ss, 1)
    # blood pressure, two components, regular period
    bp = [(t0 + i * 300_000, (120.0 + i, 80.0 - i)) for i in range(4)]
    unit, got = decode_samples(encode_samples("mm[Hg]", 0, t0, bp), t0)
    assert unit == "mm[Hg]"
    assert got == bp
    # negative and rounded values
    ss = [(t0, (-1.234,)), (t0 + 1, (2.345,)), (t0 + 7, (0.0,))]
    _close(decode_samples(encode_samples("x", 2, t0, ss), t0)[1], ss, 2)
    with pytest.raises(ValueError):
        encode_samples("x", 0, t0, [])
    with pytest.raises(ValueError):
        encode_samples("x", 0, t0, [(t0 + 5, (1.0,)), (t0 + 4, (1.0,))])
    with pytest.raises(ValueError):
        encode_samples("x", 0, t0, [(t0 - 1, (1.0,))])


@pytest.mark.parametrize(
    "plain",
    [
        b"",
        b"\xc1",
        pack(["x", 0, 1]),
        pack(["x", 0, 1, [1], 5]),
        pack(["x", 0, [1], [1, 2]]),
        pack(["x", 0, [1, 2], [1]]),
        pack(["x", 0, 1, None]),
        pack(["x", 0, 1, [None]]),
        pack(["x", 0, 1, ["ab"]]),
        pack(["x", 0, 1.5, [1]]),
        pack(7),
        pack(["x", 0, 1, [[1, "a"]]]),
    ],
)
def test_decode_samples_rejects_bad_plaintext(plain: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_samples(plain, 0)


samples_garbage = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda c: st.lists(c, max_size=5),
    max_leaves=15,
)


@settings(max_examples=150, deadline=None)
@given(
    unit=samples_garbage,
    exp=st.integers(-20, 20) | st.none() | st.floats(-5, 5),
    dt=samples_garbage,
    vals=samples_garbage,
)
def test_decode_samples_only_raises_malformed(unit: Any, exp: Any, dt: Any, vals: Any) -> None:
    plain = msgpack.packb([unit, exp, dt, vals], use_bin_type=True)
    try:
        _, out = decode_samples(plain, 0)
    except MalformedMessage:
        return
    assert isinstance(out, list)


@pytest.mark.parametrize("exp", [400, 2**64 - 1])
def test_decode_samples_huge_exponent_is_malformed(exp: int) -> None:
    with pytest.raises(MalformedMessage):
        decode_samples(pack(["x", exp, 1, [1]]), 0)


def test_cursor_dataclass_fields() -> None:
    # ChainCursor is what a device persists: it must carry exactly what it needs
    cur = ChainCursor(b"\0" * 8, 60_000, 3, b"\1" * 32)
    assert cur.message_key(3) == message_key(b"\1" * 32)
    assert cur.message_key(5) == message_key(ratchet(b"\1" * 32, 2))
    with pytest.raises(KeyError):
        cur.message_key(4)
