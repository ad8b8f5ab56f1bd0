"""The sharing core: access state as a CRDT, ``decide``, rechain retirement, erasure
pruning in a real LMDB store, and the verifiable ``collect`` answer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from core_helpers import (
    EPOCH_MS,
    START_EPOCH,
    T0,
    World,
    device_readings,
    make_batcher,
    make_world,
    new_device,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agents.device import Device
from device_agents.keys import latest_rechains
from meshhealth.chain import merkle
from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import decode_body
from meshhealth.chain.verify import verify_chain
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity
from meshhealth.errors import Rejected
from meshhealth.sharing.enrollment import enrollment
from meshhealth.sharing.grants import GrantKeys, make_grant, make_rechain
from meshhealth.sharing.keychain import KeyChain
from meshhealth.sharing.serve import Decision, collect, decide
from meshhealth.store.lmdb_store import HOUR_MS, Store
from meshhealth.wire import (
    AccessLog,
    BlockHeader,
    Control,
    EnrollDevice,
    Erase,
    Grant,
    Reading,
    RemoveDevice,
    Revoke,
    decode_control,
)
from meshhealth.wire.codec import unpack

M = EPOCH_MS  # one key epoch: a minute
STREAMS = ("hr", "spo2")


def gid(g: Grant) -> bytes:
    return h(g.encode())


def fake_reading(dev: Identity, patient: bytes, stream: str, chain: bytes, t_ms: int) -> Reading:
    """A device-signed reading with a dummy ciphertext (the access state never opens it)."""
    return Reading.create(
        dev.signing,
        patient=patient,
        stream=stream,
        seq=1,
        t_ms=t_ms,
        span_ms=0,
        chain_id=chain,
        epoch=t_ms // M,
        nonce=b"\0" * 24,
        ciphertext=b"ct",
    )


def outcome(s: AccessState, r: Reading, *, ingest: bool = True) -> str:
    try:
        s.check_reading(r, ingest=ingest)
    except Rejected as exc:
        return exc.reason
    return "ok"


# --- 1. the access state is a function of the set of transactions ---------------


@dataclass
class Universe:
    patients: list[Identity]
    devices: list[Identity]
    grantees: list[Identity]
    txs: list[Control]
    chains: list[tuple[bytes, str, bytes]]  # (patient, stream, chain id)
    readings: list[Reading]
    named: dict[str, Control]


def _universe() -> Universe:
    """2 patients, 3 devices, 3 grantees; every kind of control transaction, signed once."""
    p1, p2 = (Identity.generate("patient") for _ in range(2))
    d1, d2, d3, d4 = (Identity.generate("device") for _ in range(4))
    g1, g2, g3 = (Identity.generate("provider") for _ in range(3))
    c1 = {s: KeyChain.new(s, START_EPOCH, M) for s in STREAMS}
    c2 = {s: KeyChain.new(s, START_EPOCH, M) for s in STREAMS}

    def grant(
        p: Identity,
        c: dict[str, KeyChain],
        to: Identity,
        streams: tuple[str, ...],
        a: int,
        b: int | None,
    ) -> Grant:
        return make_grant(p, c, to.public, streams=streams, from_ms=a, until_ms=b, now_ms=T0)

    n: dict[str, Any] = {
        "e_p1_d1": enrollment(p1, c1, d1.public, START_EPOCH, T0),
        "e_p1_d2": enrollment(p1, {"hr": c1["hr"]}, d2.public, START_EPOCH, T0),
        "e_p2_d3": enrollment(p2, c2, d3.public, START_EPOCH, T0),
        "e_p2_d2": enrollment(p2, {"spo2": c2["spo2"]}, d2.public, START_EPOCH, T0 + 1),
        "g_p1_g1_hr_b": grant(p1, c1, g1, ("hr",), T0 + 2 * M, T0 + 5 * M),
        "g_p1_g1_spo2_o": grant(p1, c1, g1, ("spo2",), T0 + 4 * M, None),
        "g_p1_g2_hr_o": grant(p1, c1, g2, ("hr",), T0 + M, None),
        "g_p1_g2_hr_b": grant(p1, c1, g2, ("hr",), T0 + M, T0 + 3 * M),
        "g_p2_g1_both_b": grant(p2, c2, g1, STREAMS, T0, T0 + 4 * M),
        "g_p2_g3_hr_o": grant(p2, c2, g3, ("hr",), T0 + 2 * M, None),
        "g_p1_g3_both_o": grant(p1, c1, g3, STREAMS, T0 + 3 * M, None),
    }
    outside = grant(p1, c1, g3, ("hr",), T0, T0 + M)  # never in the set, only revoked
    n |= {
        "r_p1_g2_hr_o": Revoke.create(p1.signing, grant=gid(n["g_p1_g2_hr_o"]), ts_ms=T0 + 5),
        "r_p2_g3_hr_o": Revoke.create(p2.signing, grant=gid(n["g_p2_g3_hr_o"]), ts_ms=T0 + 6),
        "r_outside": Revoke.create(p1.signing, grant=gid(outside), ts_ms=T0 + 7),
        # by the wrong patient: recorded, but revokes nothing
        "r_forged": Revoke.create(p2.signing, grant=gid(n["g_p1_g1_hr_b"]), ts_ms=T0 + 8),
        "x_p1_late": Erase.create(p1.signing, ts_ms=T0 + 2 * M + 30_000),
        "x_p1_early": Erase.create(p1.signing, ts_ms=T0 + 90_000),
        "x_p2": Erase.create(p2.signing, ts_ms=T0 + 30_000),
    }
    open_p1 = [(gid(n[k]), n[k]) for k in ("g_p1_g3_both_o", "g_p1_g1_spo2_o")]
    k0, hr_b = make_rechain(
        p1, c1["hr"], [d1.public, d2.public], open_p1, now_ms=T0, switch_ms=T0 + 6 * M
    )
    k1, hr_c = make_rechain(p1, hr_b, [d1.public], open_p1, now_ms=T0, switch_ms=T0 + 8 * M)
    k2, spo2_b = make_rechain(
        p2,
        c2["spo2"],
        [d3.public, d2.public],
        [(gid(n[k]), n[k]) for k in ("g_p2_g1_both_b", "g_p2_g3_hr_o")],
        now_ms=T0,
        switch_ms=T0 + 5 * M + 20_000,
    )
    assert len(k0.grants) == 1 and len(k1.grants) == 1 and not k2.grants
    n |= {"k_p1_hr_b": k0, "k_p1_hr_c": k1, "k_p2_spo2_b": k2}
    n |= {
        # device removals (D1): the earliest of a (device, patient) wins; one patient's
        # removal of a device does not touch another patient's use of it
        "d_p2_d2": RemoveDevice.create(p2.signing, device=d2.public, ts_ms=T0 + 6 * M),
        "d_p2_d2_late": RemoveDevice.create(p2.signing, device=d2.public, ts_ms=T0 + 8 * M),
        "d_p1_d2": RemoveDevice.create(p1.signing, device=d2.public, ts_ms=T0 + 5 * M),
        # an enrolment with an import window (E2) and a later plain one (E1): the
        # earliest floor wins
        "e2_p1_d4": enrollment(
            p1, {"hr": c1["hr"]}, d4.public, START_EPOCH, T0 + 5 * M, import_from_ms=T0 + 3 * M
        ),
        "e_p1_d4": enrollment(p1, {"hr": c1["hr"]}, d4.public, START_EPOCH, T0 + 6 * M),
    }
    P1, P2 = p1.public, p2.public
    chains = [
        (P1, "hr", c1["hr"].chain_id),
        (P1, "hr", hr_b.chain_id),
        (P1, "hr", hr_c.chain_id),
        (P1, "spo2", c1["spo2"].chain_id),
        (P2, "hr", c2["hr"].chain_id),
        (P2, "spo2", c2["spo2"].chain_id),
        (P2, "spo2", spo2_b.chain_id),
        (P1, "hr", b"\x42" * 8),
    ]
    stranger = Identity.generate("device")
    readings = [
        fake_reading(d, p.public, s, c, t)
        for d, p, s, c, t in [
            (d1, p1, "hr", c1["hr"].chain_id, T0 + M),
            (d1, p1, "hr", c1["hr"].chain_id, T0 + 3 * M),
            (d1, p1, "hr", c1["hr"].chain_id, T0 + 7 * M),
            (d1, p1, "hr", hr_b.chain_id, T0 + 7 * M),
            (d1, p1, "hr", hr_b.chain_id, T0 + 9 * M),
            (d1, p1, "hr", hr_c.chain_id, T0 + 9 * M),
            (d1, p1, "spo2", c1["spo2"].chain_id, T0 + 9 * M),
            (d2, p1, "hr", c1["hr"].chain_id, T0 + 4 * M),
            (d2, p1, "hr", hr_b.chain_id, T0 + 7 * M),
            (d2, p1, "hr", hr_c.chain_id, T0 + 9 * M),
            (d2, p1, "spo2", c1["spo2"].chain_id, T0 + 4 * M),
            (d2, p2, "spo2", c2["spo2"].chain_id, T0 + 2 * M),
            (d2, p2, "spo2", spo2_b.chain_id, T0 + 7 * M),
            (d3, p2, "hr", c2["hr"].chain_id, T0 + 10_000),
            (d3, p2, "spo2", c2["spo2"].chain_id, T0 + 5 * M + 19_999),
            (d3, p2, "spo2", c2["spo2"].chain_id, T0 + 5 * M + 20_000),
            (d3, p2, "spo2", spo2_b.chain_id, T0 + 6 * M),
            (d3, p1, "hr", c1["hr"].chain_id, T0 + 4 * M),
            (stranger, p1, "hr", c1["hr"].chain_id, T0 + 4 * M),
            (d2, p2, "spo2", spo2_b.chain_id, T0 + 9 * M),
            (d4, p1, "hr", c1["hr"].chain_id, T0 + M),
            (d4, p1, "hr", c1["hr"].chain_id, T0 + 4 * M),
            (d4, p1, "hr", c1["hr"].chain_id, T0 + 5 * M + 30_000),
        ]
    ]
    return Universe([p1, p2], [d1, d2, d3, d4], [g1, g2, g3], list(n.values()), chains, readings, n)


U = _universe()
READERS = [*(p.public for p in U.patients), *(g.public for g in U.grantees), b"\x07" * 32]
TIMES = [T0 + k * 30_000 for k in range(22)]
RANGES = [
    (T0, T0 + 10 * M),
    (T0, T0 + 20_000),
    (T0 + M, T0 + 2 * M),
    (T0 + 2 * M + 10_000, T0 + 2 * M + 40_000),
    (T0 + 3 * M, T0 + 4 * M),
    (T0 + 5 * M + 1, T0 + 9 * M),
]


def state_of(order: list[int]) -> AccessState:
    s = AccessState()
    for i in order:
        s.apply(U.txs[i])
    return s


def check_grant_answer(
    s: AccessState, reader: bytes, patient: bytes, stream: str, t: int, got: bytes
) -> None:
    """``got`` (a may_read answer that is a grant id) names an active grant covering ``t``."""
    g = s.grants[got]
    assert (g.grantee, g.patient) == (reader, patient) and g.covers(t)
    assert not s.is_revoked(got) and any(x.stream == stream for x in g.streams)


def canonical_decision(
    s: AccessState, d: Decision, reader: bytes, patient: bytes, stream: str
) -> tuple[Any, ...]:
    """A Decision, checked to name a valid grant (grants tie-break by id: see below)."""
    if d.grant:
        g = s.grants[d.grant]
        assert (g.grantee, g.patient) == (reader, patient) and not s.is_revoked(d.grant)
        assert any(x.stream == stream for x in g.streams)
    else:
        assert reader == patient or not d.allowed
    return (d.windows, d.reason, d.grant)


@st.composite
def two_orders(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    mask = draw(st.lists(st.booleans(), min_size=len(U.txs), max_size=len(U.txs)))
    subset = [i for i, keep in enumerate(mask) if keep]
    orders = []
    for _ in range(2):
        dups = draw(st.lists(st.sampled_from(subset), max_size=3)) if subset else []
        orders.append(draw(st.permutations(subset + dups)))
    return orders[0], orders[1]


@settings(max_examples=40, deadline=None)
@given(two_orders())
def test_access_state_is_a_function_of_the_set(orders: tuple[list[int], list[int]]) -> None:
    a, b = state_of(orders[0]), state_of(orders[1])
    assert a.fingerprint() == b.fingerprint()
    assert a.seen == b.seen and a.streams == b.streams and a.known_devices == b.known_devices
    assert a.erased == b.erased and a.revoked == b.revoked and a._moves == b._moves
    assert a.grants == b.grants and a.rechains == b.rechains and a.enrolments == b.enrolments
    assert a.removed == b.removed and a.floors == b.floors and a.removals == b.removals
    for reader in READERS:
        for patient in (p.public for p in U.patients):
            for stream in STREAMS:
                for t in TIMES:
                    x, y = (
                        a.may_read(reader, patient, stream, t),
                        b.may_read(reader, patient, stream, t),
                    )
                    assert (x is None, x == b"self") == (y is None, y == b"self")
                    if x not in (None, b"self"):
                        check_grant_answer(a, reader, patient, stream, t, x)  # type: ignore[arg-type]
                        check_grant_answer(b, reader, patient, stream, t, y)  # type: ignore[arg-type]
                for lo, hi in RANGES:
                    da, db = (
                        decide(a, reader, patient, stream, lo, hi),
                        decide(b, reader, patient, stream, lo, hi),
                    )
                    assert canonical_decision(a, da, reader, patient, stream) == canonical_decision(
                        b, db, reader, patient, stream
                    )
                    # decide and may_read agree on every time of the range
                    for t in TIMES:
                        if lo <= t <= hi:
                            inside = any(w0 <= t <= w1 for w0, w1 in da.windows)
                            assert inside == (a.may_read(reader, patient, stream, t) is not None)
    for patient, stream, chain in U.chains:
        assert a.retired_at(patient, stream, chain) == b.retired_at(patient, stream, chain)
    for r in U.readings:
        assert outcome(a, r) == outcome(b, r)
        assert outcome(a, r, ingest=False) == outcome(b, r, ingest=False)


def test_the_universe_reaches_every_outcome() -> None:
    """The property above is not vacuous: with every transaction, the readings hit each reason."""
    s = state_of(list(range(len(U.txs))))
    reasons = {outcome(s, r) for r in U.readings}
    assert reasons >= {
        "ok",
        "erased",
        "retired_key_chain",
        "not_enrolled",
        "unknown_device",
        "removed_device",
        "before_enrollment",
    }, reasons
    assert {outcome(s, r, ingest=False) for r in U.readings} >= {"ok", "not_enrolled"}
    P1 = U.patients[0].public
    hr_a, hr_b, hr_c = (c for p, st_, c in U.chains[:3])
    assert s.retired_at(P1, "hr", hr_a) == T0 + 6 * M
    assert s.retired_at(P1, "hr", hr_b) == T0 + 8 * M
    assert s.retired_at(P1, "hr", hr_c) is None


def test_removal_and_enrolment_floor_in_the_access_state() -> None:
    """D1 refuses at ingest every new reading of a device for its patient once the removal
    is known, whatever its time (a stolen key backdates into [enrolment, removal)), and
    only at ingest; the earliest removal is its time; E2's import window lowers the floor
    below the enrolment time, E1's is its time (less a minute of clock skew)."""
    n = U.named
    P1, P2 = (p.public for p in U.patients)
    d2, d4 = U.devices[1].public, U.devices[3].public
    full = state_of(list(range(len(U.txs))))
    assert full.removed_at(d2, P2) == T0 + 6 * M and full.removed_at(d2, P1) == T0 + 5 * M
    assert full.removed_at(U.devices[0].public, P1) is None
    assert full.floors[(d4, P1)] == T0 + 3 * M
    by = {(r.device, r.patient, r.stream, r.t_ms): r for r in U.readings}
    assert outcome(full, by[(d2, P2, "spo2", T0 + 7 * M)]) == "removed_device"
    assert outcome(full, by[(d2, P2, "spo2", T0 + 7 * M)], ingest=False) == "ok"
    # before its removal, yet new at ingest: a stolen key backdating (issue 11)
    assert outcome(full, by[(d2, P2, "spo2", T0 + 2 * M)]) == "removed_device"
    assert outcome(full, by[(d2, P2, "spo2", T0 + 2 * M)], ingest=False) == "ok"
    assert outcome(full, by[(d2, P1, "hr", T0 + 4 * M)]) == "removed_device"
    assert outcome(full, by[(d2, P1, "hr", T0 + 4 * M)], ingest=False) == "ok"
    assert outcome(full, by[(d4, P1, "hr", T0 + M)]) == "before_enrollment"
    assert outcome(full, by[(d4, P1, "hr", T0 + M)], ingest=False) == "ok"
    assert outcome(full, by[(d4, P1, "hr", T0 + 4 * M)]) == "ok"  # inside the import window
    only_late = AccessState()
    for k in ("e_p2_d2", "k_p2_spo2_b", "d_p2_d2_late"):
        only_late.apply(n[k])
    assert outcome(only_late, by[(d2, P2, "spo2", T0 + 7 * M)]) == "removed_device"
    assert only_late.removed_at(d2, P2) == T0 + 8 * M
    assert outcome(state_of([]), by[(d2, P2, "spo2", T0 + 7 * M)]) != "removed_device"
    assert outcome(only_late, by[(d2, P2, "spo2", T0 + 9 * M)]) == "removed_device"
    e1_only = AccessState()
    e1_only.apply(n["e_p1_d4"])
    assert outcome(e1_only, by[(d4, P1, "hr", T0 + 4 * M)]) == "before_enrollment"
    assert outcome(e1_only, by[(d4, P1, "hr", T0 + 5 * M + 30_000)]) == "ok"  # within the skew
    # E1 and E2 both round-trip through the control decoder and verify
    for k in ("e2_p1_d4", "e_p1_d4", "d_p2_d2"):
        assert decode_control(n[k].encode()).verify() == n[k]
    assert n["e2_p1_d4"].encode()[1:4] == b"\xa2E2" and n["e_p1_d4"].encode()[1:4] == b"\xa2E1"


def _tied() -> tuple[list[Control], bytes, bytes]:
    n = U.named
    return (
        [n["e_p1_d1"], n["g_p1_g2_hr_o"], n["g_p1_g2_hr_b"]],
        U.patients[0].public,
        U.grantees[1].public,
    )


def test_tied_grants_name_the_same_grant_whatever_the_apply_order() -> None:
    """Two grants with one start: every replica names the same one (ties break by id)."""
    txs, patient, reader = _tied()
    a, b = AccessState(), AccessState()
    for t in txs:
        a.apply(t)
    for t in reversed(txs):
        b.apply(t)
    assert a.fingerprint() == b.fingerprint()
    assert decide(a, reader, patient, "hr", T0, T0 + 10 * M) == decide(
        b, reader, patient, "hr", T0, T0 + 10 * M
    )
    assert a.may_read(reader, patient, "hr", T0 + 2 * M) == b.may_read(
        reader, patient, "hr", T0 + 2 * M
    )


# --- 2. decide() ------------------------------------------------------------------


@dataclass
class Shared:
    world: World
    doctor: Identity
    grant: Grant  # hr, bounded [T0 + 2M, T0 + 5M]
    access: AccessState

    @property
    def p(self) -> bytes:
        return self.world.patient.public

    @property
    def d(self) -> bytes:
        return self.doctor.public

    def grant_for(self, a: int, b: int | None, streams: tuple[str, ...] = ("hr",)) -> Grant:
        w = self.world
        return make_grant(
            w.patient, w.chains, self.d, streams=streams, from_ms=a, until_ms=b, now_ms=T0
        )


@pytest.fixture
def sh() -> Shared:
    w = make_world(streams=STREAMS)
    doctor = Identity.generate("provider")
    _, tx = new_device(w)
    s = Shared(
        w,
        doctor,
        make_grant(
            w.patient,
            w.chains,
            doctor.public,
            streams=["hr"],
            from_ms=T0 + 2 * M,
            until_ms=T0 + 5 * M,
            now_ms=T0,
        ),
        AccessState(),
    )
    s.access.apply(tx)
    s.access.apply(s.grant)
    return s


def test_decide_patient_reads_the_whole_range(sh: Shared) -> None:
    d = decide(sh.access, sh.p, sh.p, "spo2", T0, T0 + 99 * M)
    assert d == Decision(((T0, T0 + 99 * M),), b"", "") and d.allowed


def test_decide_bounded_grant_gives_exactly_the_intersection(sh: Shared) -> None:
    g = gid(sh.grant)
    assert decide(sh.access, sh.d, sh.p, "hr", T0, T0 + 3 * M) == Decision(
        ((T0 + 2 * M, T0 + 3 * M),), g, ""
    )
    assert decide(sh.access, sh.d, sh.p, "hr", T0 + 3 * M, T0 + 9 * M).windows == (
        (T0 + 3 * M, T0 + 5 * M),
    )
    assert decide(sh.access, sh.d, sh.p, "hr", T0 + 5 * M, T0 + 5 * M).windows == (
        (T0 + 5 * M, T0 + 5 * M),
    )


@pytest.mark.parametrize(
    ("who", "stream", "lo", "hi", "reason"),
    [
        ("doctor", "hr", T0 + 5 * M + 1, T0 + 9 * M, "expired"),
        ("doctor", "hr", T0, T0 + 2 * M - 1, "outside_grant"),
        ("stranger", "hr", T0, T0 + 9 * M, "no_grant"),
        ("doctor", "spo2", T0, T0 + 9 * M, "no_grant"),
    ],
)
def test_decide_refusals(sh: Shared, who: str, stream: str, lo: int, hi: int, reason: str) -> None:
    reader = sh.d if who == "doctor" else Identity.generate("provider").public
    d = decide(sh.access, reader, sh.p, stream, lo, hi)
    assert d == Decision((), b"", reason) and not d.allowed


@pytest.mark.parametrize("revoke_first", [False, True])
def test_decide_revoked_in_either_order(sh: Shared, revoke_first: bool) -> None:
    rv = Revoke.create(sh.world.patient.signing, grant=gid(sh.grant), ts_ms=T0 + 1)
    s = AccessState()
    for t in (rv, sh.grant) if revoke_first else (sh.grant, rv):
        s.apply(t)
    assert decide(s, sh.d, sh.p, "hr", T0, T0 + 9 * M) == Decision((), b"", "revoked")


def test_decide_erasure_clips_the_window(sh: Shared) -> None:
    sh.access.apply(Erase.create(sh.world.patient.signing, ts_ms=T0 + 3 * M))
    after = T0 + 3 * M + 1
    assert decide(sh.access, sh.d, sh.p, "hr", T0, T0 + 9 * M).windows == ((after, T0 + 5 * M),)
    assert decide(sh.access, sh.p, sh.p, "hr", T0, T0 + 9 * M).windows == ((after, T0 + 9 * M),)
    for reader in (sh.d, sh.p):
        d = decide(sh.access, reader, sh.p, "hr", T0 + 2 * M, T0 + 3 * M)
        assert d == Decision((), b"", "erased")


def test_decide_two_grants_give_both_windows(sh: Shared) -> None:
    later, open_ = sh.grant_for(T0 + 7 * M, T0 + 8 * M), sh.grant_for(T0 + 9 * M, None)
    sh.access.apply(open_)
    sh.access.apply(later)
    d = decide(sh.access, sh.d, sh.p, "hr", T0, T0 + 20 * M)
    assert d.windows == (
        (T0 + 2 * M, T0 + 5 * M),
        (T0 + 7 * M, T0 + 8 * M),
        (T0 + 9 * M, T0 + 20 * M),
    )
    assert d.grant == gid(sh.grant) and d.reason == ""
    # only the later grant reaches this range: it names that one
    assert decide(sh.access, sh.d, sh.p, "hr", T0 + 6 * M, T0 + 7 * M + 5) == Decision(
        ((T0 + 7 * M, T0 + 7 * M + 5),), gid(later), ""
    )


# --- 3. rechain retirement ----------------------------------------------------------


def test_rechain_retires_the_old_chain_at_ingest_only_and_cuts_out_the_left_out() -> None:
    w = make_world(streams=("hr",))
    dev, enrol = new_device(w)
    left_out, kept = Identity.generate("provider"), Identity.generate("provider")
    g_out, g_kept = (
        make_grant(
            w.patient, w.chains, d.public, streams=["hr"], from_ms=T0, until_ms=None, now_ms=T0
        )
        for d in (left_out, kept)
    )
    switch = T0 + 5 * M + 20_000  # inside an epoch: the new chain starts at that epoch
    rv = Revoke.create(w.patient.signing, grant=gid(g_out), ts_ms=switch - 1)
    tx, new = make_rechain(
        w.patient, w.chains["hr"], [dev.id], [(gid(g_kept), g_kept)], now_ms=T0, switch_ms=switch
    )
    assert new.start_epoch == START_EPOCH + 5
    s = AccessState()
    for t in (enrol, g_out, g_kept, rv, tx):
        s.apply(t)
    assert s.retired_at(w.patient.public, "hr", w.chains["hr"].chain_id) == switch
    assert s.retired_at(w.patient.public, "hr", new.chain_id) is None

    stale = Device.from_state(dev.state())  # has not taken up the rechain (yet)
    assert dev.accept_rechain(tx)
    old = [Reading.decode(raw) for _, raw in device_readings(stale, "hr", T0 + 5 * M, T0 + 6 * M)]
    fresh = [Reading.decode(raw) for _, raw in device_readings(dev, "hr", T0 + 5 * M, T0 + 7 * M)]
    assert {r.chain_id for r in old} == {w.chains["hr"].chain_id}
    assert {r.chain_id for r in fresh} == {new.chain_id}
    assert any(r.t_ms < switch for r in old) and any(r.t_ms >= switch for r in old)
    for r in old:
        assert outcome(s, r) == ("retired_key_chain" if r.t_ms >= switch else "ok")
        assert outcome(s, r, ingest=False) == "ok"  # a peer's earlier block stays valid
    assert {outcome(s, r) for r in fresh} == {"ok"}

    out_keys, kept_keys = GrantKeys.open(g_out, left_out), GrantKeys.open(g_kept, kept)
    assert all(out_keys.decrypt(r) is not None for r in old)  # what it held, it keeps
    assert not out_keys.follow(tx, left_out)
    assert all(out_keys.decrypt(r) is None for r in fresh)
    assert all(kept_keys.decrypt(r) is None for r in fresh)  # not before following
    assert kept_keys.follow(tx, kept)
    for r in fresh:
        got = kept_keys.decrypt(r)
        assert got is not None and got[0] == "/min" and got[1]


# --- 4 and 5. erasure pruning and collect() on a real LMDB store ----------------------


@dataclass
class Built:
    store: Store
    world: World
    p1: Identity
    p2: Identity
    readings: dict[tuple[int, int], Reading]  # (height, index) -> reading
    enrolments: dict[bytes, list[EnrollDevice]]
    log: AccessLog
    log_at: tuple[int, int]
    erase: Erase
    bodies: list[tuple[bytes, ...]]  # as sealed, before any pruning

    @property
    def node(self) -> bytes:
        return self.world.node

    def of(self, patient: Identity, stream: str | None = None) -> dict[tuple[int, int], Reading]:
        return {
            k: r
            for k, r in self.readings.items()
            if r.patient == patient.public and (stream is None or r.stream == stream)
        }


UPTO = T0 + HOUR_MS + 20_000  # inside block 3, in the second hour's bucket


def build(path: Path) -> Built:
    """Six blocks of two patients' readings, one minute each, across an hour boundary, an
    access log in block 2, and p1's erasure up to UPTO in the last block."""
    w = make_world(streams=STREAMS)
    p1 = w.patient
    p2 = Identity.generate("patient")
    w2 = World(w.genesis, w.authority, p2, {"hr": KeyChain.new("hr", START_EPOCH, M)})
    dev1, e1 = new_device(w)
    dev2, e2 = new_device(w2)
    store = Store(path)
    b = make_batcher(w, interval_ms=1_000, max_entries=1_000)
    readings: dict[tuple[int, int], Reading] = {}
    log_at = (-1, -1)
    log = AccessLog.create(
        w.authority.signing,
        network=w.network,
        reader=Identity.generate("provider").public,
        patient=p1.public,
        stream="hr",
        from_ms=T0,
        to_ms=T0 + HOUR_MS,
        ts_ms=T0 + 58 * M,
        outcome="read",
        reason=b"",
        grant=b"\x01" * 32,
        readings=3,
        request=h(b"request"),
    )
    erase = Erase.create(p1.signing, ts_ms=UPTO)
    for height in range(6):
        lo = T0 + (57 + height) * M
        now = lo + M + 5_000
        if height == 0:
            for tx in (e1, e2):
                b.admit_tx(tx.encode(), tx, now)
        if height == 2:
            b.admit_log(log, now)
            log_at = (height, b.pending - 1)
        for dev, stream in ((dev1, "hr"), (dev1, "spo2"), (dev2, "hr")):
            for _, raw in device_readings(dev, stream, lo, lo + M):
                r = Reading.decode(raw)
                b.admit_reading(raw, r, now)
                readings[(height, b.pending - 1)] = r
        if height == 5:
            b.admit_tx(erase.encode(), erase, now)
        c = b.seal(now + 1_000)
        store.commit_block(c)
    assert b.erasures_due == [(p1.public, UPTO)]
    bodies = []
    for height in range(6):
        raw = store.raw_block(w.node, height)
        assert raw is not None
        bodies.append(merkle_body(raw[1]))
    return Built(
        store, w, p1, p2, readings, {p1.public: [e1], p2.public: [e2]}, log, log_at, erase, bodies
    )


def merkle_body(raw: bytes) -> tuple[bytes, ...]:
    return decode_body(raw)


@pytest.fixture
def built(tmp_path: Path) -> Iterator[Built]:
    bt = build(tmp_path / "node")
    yield bt
    bt.store.close()


def indexed(store: Store, patient: Identity, stream: str) -> set[tuple[int, int]]:
    return {
        (height, i)
        for node, height, idx in store.reading_blocks(patient.public, stream, 0, 2**62)
        for i in idx
    }


def verify(bt: Built) -> Any:
    with contextlib.closing(bt.store.iter_raw_chain(bt.node)) as blocks:
        return verify_chain(
            bt.node,
            blocks,
            network=bt.world.network,
            authorities={bt.node},
            expected_head=bt.store.head(bt.node),
        )


def test_prune_patient_erases_exactly_up_to_its_time(built: Built) -> None:
    bt, store = built, built.store
    p1_all = bt.of(bt.p1)
    gone = {k for k, r in p1_all.items() if r.t_ms <= UPTO}
    assert gone and len(gone) < len(p1_all)  # the erasure cuts through p1's data
    assert {k[0] for k in gone} == {0, 1, 2, 3}  # ... and through block 3's hour bucket
    assert any(k[0] == 3 and k not in gone for k in p1_all)
    before_p2 = {s: indexed(store, bt.p2, s) for s in STREAMS}
    assert verify(bt).pruned == 0

    assert store.prune_patient(bt.p1.public, UPTO) == len(gone)

    for height, orig in enumerate(bt.bodies):
        raw = store.raw_block(bt.node, height)
        assert raw is not None
        body, hdr = merkle_body(raw[1]), BlockHeader.decode(raw[0])
        assert len(body) == len(orig) == hdr.count
        for i, (now, was) in enumerate(zip(body, orig, strict=True)):
            if (height, i) in gone:
                assert merkle.is_pruned(now) and now == merkle.pruned(was)
                assert merkle.leaf_of(now) == merkle.leaf_hash(was)
            else:
                assert now == was
        assert merkle.root(body) == hdr.root
    for s in STREAMS:
        left = {k for k, r in bt.of(bt.p1, s).items() if r.t_ms > UPTO}
        assert indexed(store, bt.p1, s) == left
        assert indexed(store, bt.p2, s) == before_p2[s]
    assert before_p2["hr"] == set(bt.of(bt.p2, "hr"))
    rep = verify(bt)
    assert rep.pruned == len(gone) and rep.blocks == 6
    assert rep.readings == len(bt.readings) - len(gone)
    assert store.prune_patient(bt.p1.public, UPTO) == 0
    assert store.prune_patient(Identity.generate("patient").public, UPTO) == 0

    # the audit trail survives the erasure
    ((entry, node, height, index),) = store.audit_trail(bt.p1.public)
    assert (node, height, index) == (bt.node, *bt.log_at)
    raw = store.raw_block(node, height)
    assert raw is not None and merkle_body(raw[1])[index] == entry == bt.log.encode()
    assert store.audit_trail(bt.p2.public) == []
    assert store.audit_trail(bt.p1.public, T0 + 59 * M) == []


def files_holding(root: Path, needles: list[bytes]) -> set[bytes]:
    """Which of ``needles`` occur anywhere in any file under ``root``."""
    blobs = [f.read_bytes() for f in root.rglob("*") if f.is_file()]
    return {n for n in needles if any(n in b for b in blobs)}


def test_compaction_after_prune_leaves_no_erased_byte_in_any_file(built: Built) -> None:
    bt, store = built, built.store
    nonce_ct = {k: r.ciphertext for k, r in bt.readings.items()}  # msgpack splits nonce, ct
    gone = [nonce_ct[k] for k, r in bt.of(bt.p1).items() if r.t_ms <= UPTO]
    kept = [nonce_ct[k] for k in bt.of(bt.p2)]
    assert store.prune_patient(bt.p1.public, UPTO) == len(gone)
    store.env.sync(True)
    assert files_holding(store.path, gone) == set(gone)  # LMDB freed the pages, kept the bytes
    assert store.compact_due()
    store.compact()
    assert not store.compact_due() and store.statistics()["compactions"] == 1
    assert files_holding(store.path, gone) == set()
    assert files_holding(store.path, kept) == set(kept)  # the control: the rest is all there
    assert sorted(p.name for p in store.path.iterdir()) == ["data.mdb", "lock.mdb"]
    rep = verify(bt)  # the reopened store serves, and the chain still verifies
    assert rep.pruned == len(gone) and rep.blocks == 6
    assert indexed(store, bt.p2, "hr") == set(bt.of(bt.p2, "hr"))
    assert store.prune_patient(bt.p1.public, UPTO) == 0 and not store.compact_due()
    store.set_meta("after", b"1")  # and takes writes
    assert store.meta("after") == b"1"


def test_a_compaction_a_crash_cut_short_is_done_on_the_next_start(built: Built) -> None:
    bt, store = built, built.store
    gone = [r.ciphertext for r in bt.of(bt.p1).values() if r.t_ms <= UPTO]
    assert store.prune_patient(bt.p1.public, UPTO) == len(gone)
    path = store.path
    store.close()  # the crash: pruned, not yet compacted, a half-written copy left behind
    (path / "data.mdb.compact").write_bytes(b"half a copy")
    again = Store(path)
    try:
        assert not (path / "data.mdb.compact").exists()
        assert again.compact_due()  # what Node start-up checks, then compacts
        again.compact()
        assert files_holding(path, gone) == set() and not again.compact_due()
    finally:
        again.close()
    bt.store = Store(path)  # the fixture closes this one


def answer_readings(bt: Built, data: bytes) -> tuple[int | None, list[Reading]]:
    """Check an RS1 answer as a reader would; its next page and readings."""
    tag, nxt, enrolments, blocks = unpack(data, max_len=1 << 26)
    assert tag == "RS1"
    assert [EnrollDevice.decode(e) for e in enrolments] == bt.enrolments[bt.p1.public]
    out = []
    for header, picked, proof in blocks:
        hdr = BlockHeader.decode(header).verify()
        assert hdr.node == bt.node and picked
        leaves = {i: merkle.leaf_hash(e) for i, e in picked}
        assert len(leaves) == len(picked)
        assert merkle.verify_multiproof(leaves, hdr.count, proof, hdr.root)
        # one entry swapped for another breaks the proof
        i0, e0 = picked[0]
        forged = {**leaves, i0: merkle.leaf_hash(e0 + b"x")}
        assert not merkle.verify_multiproof(forged, hdr.count, proof, hdr.root)
        out += [Reading.decode(e).verify() for _, e in picked]
    return nxt, out


def keys(rs: list[Reading]) -> list[tuple[bytes, int]]:
    return sorted((r.device, r.seq) for r in rs)


def test_collect_answers_every_unpruned_reading_once_with_proofs(built: Built) -> None:
    bt, store = built, built.store
    assert store.prune_patient(bt.p1.public, UPTO) > 0
    enrol = [e.encode() for e in bt.enrolments[bt.p1.public]]
    p1 = bt.p1.public
    lo, hi = T0 + 58 * M, T0 + HOUR_MS + 90_000
    want = [r for r in bt.of(bt.p1, "hr").values() if lo <= r.t_ms <= hi and r.t_ms > UPTO]
    assert want

    access = AccessState()
    for e in store.control_entries():
        access.apply(decode_control(e))
    d = decide(access, p1, p1, "hr", lo, hi)
    assert d.windows == ((UPTO + 1, hi),)
    full = Decision(((lo, hi),), b"", "")  # even unclipped, what is pruned is not served
    for dec in (d, full):
        data, n = collect(store, enrol, p1, "hr", dec)
        nxt, got = answer_readings(bt, data)
        assert nxt is None and n == len(got)
        assert keys(got) == keys(want)
        assert {r.encode() for r in got} == {r.encode() for r in want}

    # a grantee's window: exactly the readings that start inside it
    win = Decision(((UPTO + 1, T0 + HOUR_MS + 45_000), (T0 + HOUR_MS + 80_000, hi)), b"g", "")
    data, n = collect(store, enrol, p1, "hr", win)
    inside = [r for r in want if any(a <= r.t_ms <= b for a, b in win.windows)]
    assert keys(answer_readings(bt, data)[1]) == keys(inside) and n == len(inside)

    # nothing of p2 leaks into p1's answer, and p2's data is whole
    data, _ = collect(store, [], bt.p2.public, "hr", Decision(((0, 2**62),), b"", ""))
    got = unpack(data, max_len=1 << 26)[3]
    assert sorted(Reading.decode(e).seq for _, es, _ in got for _, e in es) == sorted(
        r.seq for r in bt.of(bt.p2, "hr").values()
    )


def test_collect_paginates_and_the_pages_add_up(built: Built) -> None:
    bt, store = built, built.store
    store.prune_patient(bt.p1.public, UPTO)
    enrol = [e.encode() for e in bt.enrolments[bt.p1.public]]
    p1 = bt.p1.public
    dec = Decision(((T0, T0 + 2 * HOUR_MS),), b"", "")
    data, n = collect(store, enrol, p1, "spo2", dec)
    nxt, whole = answer_readings(bt, data)
    assert nxt is None and len(whole) == n
    assert keys(whole) == keys([r for r in bt.of(bt.p1, "spo2").values() if r.t_ms > UPTO])

    pages: list[list[Reading]] = []
    after: int | None = 0
    while after is not None:
        assert len(pages) < 50
        data, n = collect(store, enrol, p1, "spo2", dec, after=after, page_bytes=1)
        nxt, got = answer_readings(bt, data)
        assert n == len(got)
        assert nxt is None or (isinstance(nxt, int) and nxt > after)
        pages.append(got)
        after = nxt
    assert len(pages) > 1
    flat = [r for page in pages for r in page]
    assert keys(flat) == keys(whole)  # same readings, none twice


def test_a_device_is_given_only_each_streams_latest_rechain() -> None:
    """After a restart a device sees every rechain naming it again; the older ones name
    chains since retired, and a forged later one must not hide the real latest."""
    n, p1 = U.named, U.patients[0]
    k0, k1 = n["k_p1_hr_b"], n["k_p1_hr_c"]
    assert k1.ts_ms > k0.ts_ms
    forged = replace(k1, ts_ms=k1.ts_ms + 1)  # k1's signature no longer fits
    raws = [k1.encode(), forged.encode(), k0.encode(), n["k_p2_spo2_b"].encode()]
    for order in (raws, raws[::-1]):
        assert latest_rechains(order, p1.public) == {"hr": k1}
    assert set(latest_rechains(raws, U.patients[1].public)) == {"spo2"}


def test_a_removed_devices_reading_is_dropped_by_time_or_by_its_blocks_seal() -> None:
    """Issue 11: what a replica prunes and a provider skips of a removed device: a reading
    timed at or after the removal, or any reading in a block sealed REMOVAL_GRACE_MS or
    more after it (a stolen key backdating into [enrolment, removal))."""
    from meshhealth.chain.acl import REMOVAL_GRACE_MS, removed_reading

    d2, P2 = U.devices[1].public, U.patients[1].public
    by = {(r.device, r.patient, r.stream, r.t_ms): r for r in U.readings}
    early = by[(d2, P2, "spo2", T0 + 2 * M)]
    cut = T0 + 6 * M
    assert not removed_reading(None, early, cut + 10 * REMOVAL_GRACE_MS)
    assert not removed_reading(cut, early, cut + REMOVAL_GRACE_MS - 1)  # A had not seen it
    assert removed_reading(cut, early, cut + REMOVAL_GRACE_MS)
    assert removed_reading(cut, by[(d2, P2, "spo2", T0 + 7 * M)], T0 + 7 * M)
