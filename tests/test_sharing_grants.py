"""Grants, revocations and erasures: the key material and the convergent access state."""

from __future__ import annotations

import pytest
from core_helpers import EPOCH_MS, T0, device_readings, make_world, new_device
from hypothesis import given, settings
from hypothesis import strategies as st

from meshhealth.chain.acl import AccessState
from meshhealth.crypto.keys import Identity
from meshhealth.errors import MalformedMessage
from meshhealth.sharing.grants import GrantKeys, make_grant
from meshhealth.wire import Erase, Grant, Reading, Revoke, decode_control, decode_entry


def world_with_readings():  # type: ignore[no-untyped-def]
    w = make_world()
    dev, tx = new_device(w)
    raws = [raw for _, raw in device_readings(dev, "hr", T0, T0 + 10 * EPOCH_MS)]
    return w, tx, [Reading.decode(r) for r in raws]


def test_bounded_grant_decrypts_its_window_and_nothing_outside() -> None:
    w, _, readings = world_with_readings()
    doctor = Identity.generate("provider")
    a, b = T0 + 3 * EPOCH_MS, T0 + 5 * EPOCH_MS + 10_000  # epochs 3..5
    g = make_grant(
        w.patient, w.chains, doctor.public, streams=["hr"], from_ms=a, until_ms=b, now_ms=T0
    )
    assert decode_control(g.encode()) == g and g.verify() is g
    keys = GrantKeys.open(g, doctor)
    got = [(r, keys.decrypt(r)) for r in readings]
    inside = [r for r, plain in got if plain is not None]
    assert inside and len(inside) < len(readings)
    epochs = {r.epoch for r in inside}
    assert epochs == {T0 // EPOCH_MS + k for k in (3, 4, 5)}  # whole epochs, exactly those
    unit, samples = got[[r for r, _ in got].index(inside[0])][1]  # type: ignore[index, misc]
    assert unit == "/min" and samples
    # another key cannot open the grant at all
    with pytest.raises(ValueError, match="someone else"):
        GrantKeys.open(g, Identity.generate("provider"))


def test_open_grant_follows_the_chain_forward_but_not_back() -> None:
    w, _, readings = world_with_readings()
    doctor = Identity.generate("provider")
    g = make_grant(
        w.patient,
        w.chains,
        doctor.public,
        streams=["hr", "bp"],
        from_ms=T0 + 4 * EPOCH_MS,
        until_ms=None,
        now_ms=T0,
    )
    assert g.open and all(s.open for s in g.streams)
    keys = GrantKeys.open(g, doctor)
    for r in readings:
        plain = keys.decrypt(r)
        assert (plain is not None) == (r.epoch >= T0 // EPOCH_MS + 4)


def test_grant_checks_its_own_shape() -> None:
    w, _, _ = world_with_readings()
    doctor = Identity.generate("provider")
    with pytest.raises(ValueError, match="no key chain"):
        make_grant(
            w.patient, w.chains, doctor.public, streams=["x"], from_ms=T0, until_ms=None, now_ms=T0
        )
    with pytest.raises(ValueError, match="shorter window"):
        make_grant(
            w.patient,
            w.chains,
            doctor.public,
            streams=["hr", "bp"],
            from_ms=T0,
            until_ms=T0 + 5000 * EPOCH_MS,
            now_ms=T0,
        )
    g = make_grant(
        w.patient,
        w.chains,
        doctor.public,
        streams=["hr"],
        from_ms=T0,
        until_ms=T0 + EPOCH_MS,
        now_ms=T0,
    )
    s = g.streams[0]
    import dataclasses

    for bad in (
        dict(until_ms=T0 - 1),  # ends before it starts
        dict(grantee=w.patient.public),  # a grant to oneself
        dict(streams=(dataclasses.replace(s, sealed=s.sealed[:-32]),)),  # keys != epochs
        dict(streams=(s, s)),  # a stream twice
    ):
        with pytest.raises(MalformedMessage):
            dataclasses.replace(g, **bad)


def test_revocation_wins_in_any_order_and_erasure_covers_up_to_its_time() -> None:
    w, tx, _ = world_with_readings()
    doctor = Identity.generate("provider")
    g = make_grant(
        w.patient, w.chains, doctor.public, streams=["hr"], from_ms=T0, until_ms=None, now_ms=T0
    )
    from meshhealth.crypto.hashing import h

    gid = h(g.encode())
    rv = Revoke.create(w.patient.signing, grant=gid, ts_ms=T0 + 1)
    forged = Revoke.create(Identity.generate("patient").signing, grant=gid, ts_ms=T0 + 1)
    for order in ((tx, g, rv), (rv, tx, g)):
        s = AccessState()
        for t in order:
            s.apply(t)
        assert s.is_revoked(gid)
        assert s.may_read(doctor.public, w.patient.public, "hr", T0 + 10) is None
    s = AccessState()
    for t in (tx, g, forged):
        s.apply(t)
    assert not s.is_revoked(gid)  # only the granting patient can revoke
    assert s.may_read(doctor.public, w.patient.public, "hr", T0 + 10) == gid
    assert s.may_read(doctor.public, w.patient.public, "spo2", T0 + 10) is None
    assert s.may_read(w.patient.public, w.patient.public, "spo2", T0) == b"self"
    s.apply(Erase.create(w.patient.signing, ts_ms=T0 + 100))
    assert s.may_read(w.patient.public, w.patient.public, "hr", T0 + 50) is None
    assert s.may_read(doctor.public, w.patient.public, "hr", T0 + 200) == gid
    assert decode_entry(rv.encode()) == rv


def _txs():  # type: ignore[no-untyped-def]
    w, tx, _ = world_with_readings()
    docs = [Identity.generate("provider") for _ in range(2)]
    grants = [
        make_grant(
            w.patient,
            w.chains,
            d.public,
            streams=["hr"],
            from_ms=T0 + k * EPOCH_MS,
            until_ms=None if k else T0 + 3 * EPOCH_MS,
            now_ms=T0,
        )
        for k, d in enumerate(docs)
    ]
    from meshhealth.crypto.hashing import h

    return [
        tx,
        new_device(w)[1],
        *grants,
        Revoke.create(w.patient.signing, grant=h(grants[0].encode()), ts_ms=T0 + 5),
        Erase.create(w.patient.signing, ts_ms=T0 + 7),
        Erase.create(w.patient.signing, ts_ms=T0 + 3),
    ]


TXS = _txs()


@settings(max_examples=60, deadline=None)
@given(st.permutations(range(len(TXS))), st.lists(st.integers(0, len(TXS) - 1), max_size=4))
def test_access_state_is_the_same_for_every_order_and_repetition(
    order: list[int], repeats: list[int]
) -> None:
    ref = AccessState()
    for t in TXS:
        ref.apply(t)
    s = AccessState()
    for i in [*order, *repeats]:
        s.apply(TXS[i])
    assert s.fingerprint() == ref.fingerprint()
    assert s.erased == ref.erased and s.revoked == ref.revoked and s.grants == ref.grants


def test_every_control_type_round_trips_and_nothing_else_is_control() -> None:
    for t in TXS:
        assert decode_control(t.encode()) == t
    assert isinstance(TXS[2], Grant)
    with pytest.raises(MalformedMessage):
        decode_control(b"\x92\xa2R1\x00")
    with pytest.raises(MalformedMessage):
        decode_control(b"\x00" * 70_000)
