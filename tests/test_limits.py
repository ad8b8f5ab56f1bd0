"""The pure limits of issue 11 #4 and #5: buckets, budgets, refusal logs, registrations."""

from __future__ import annotations

import os

import nacl.signing
import pytest
from core_helpers import T0, junk_grant, make_batcher, make_world
from test_replica import two_nodes

from meshhealth.chain.acl import AccessState
from meshhealth.chain.block import build_block
from meshhealth.config import ApiConfig
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity
from meshhealth.errors import RateLimited, Rejected
from meshhealth.ingest.replica import admit_remote
from meshhealth.ingest.verify import check_entries
from meshhealth.net.admission import STRANGERS, ApiLimits, entry_bytes, source_of
from meshhealth.net.limits import RefusalLog, TokenBuckets, hourly
from meshhealth.sharing.audit import UNSIGNED, request_status
from meshhealth.sharing.registration import registration
from meshhealth.store.lattice_view import replay_control
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import AccessLog, Grant, Revoke, decode_entry


def grant(patient: Identity, keys: int = 100) -> Grant:
    return junk_grant(patient, keys)


def test_a_bucket_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    b: TokenBuckets[str] = TokenBuckets(10.0, 100.0, max_keys=2)
    assert b.try_take("a", 100, 0.0) == 0
    assert b.try_take("a", 1, 0.0) == pytest.approx(0.1)
    assert b.try_take("b", 100, 0.0) == 0  # another key has its own
    assert b.try_take("a", 50, 5.0) == 0
    assert b.wait_s("a", 1000, 5.0) == float("inf")  # never, whatever the wait
    b.take("c", 1, 5.0)
    assert len(b) == 2  # the least recently used is dropped


def test_an_hourly_budget_lets_through_at_most_its_size_plus_the_refill() -> None:
    b: TokenBuckets[bytes] = hourly(3600.0)
    spent = sum(10 for _ in range(1000) if b.try_take(b"", 10, 0.0) == 0)
    assert spent == 3600
    assert b.try_take(b"", 10, 5.0) != 0 and b.try_take(b"", 10, 10.0) == 0


def test_strangers_share_a_budget_registered_patients_do_not() -> None:
    cfg = ApiConfig(stranger_bytes_per_hour=70_000, max_grants_per_patient=2)
    lim, access = ApiLimits(cfg), AccessState()
    a, b, reg = (Identity.generate("patient") for _ in range(3))
    authority = Identity.generate("node")
    access.registrars = frozenset({authority.public})
    g = grant(a, 1500)  # ~48 KiB
    lim.tx_admission(g, g.encode(), access, 0.0)()
    g2 = grant(b, 1500)
    with pytest.raises(RateLimited) as exc:
        lim.tx_admission(g2, g2.encode(), access, 0.0)
    assert exc.value.reason == "stranger_budget" and exc.value.retry_after_s > 0
    assert access.apply(registration(authority, b"n" * 32, reg.public, 1).verify())
    for _ in range(2):
        g3 = grant(reg, 1500)
        lim.tx_admission(g3, g3.encode(), access, 0.0)()
        access.apply(g3)
    g4 = grant(reg, 10)
    with pytest.raises(Rejected, match="grant_quota"):
        lim.tx_admission(g4, g4.encode(), access, 0.0)
    assert entry_bytes(g.encode()) == len(g.encode()) + 3


def test_a_registration_counts_only_if_an_authority_signed_it() -> None:
    authority, other = Identity.generate("node"), Identity.generate("node")
    patient = os.urandom(32)
    access = AccessState(registrars=frozenset({authority.public}))
    assert not access.apply(registration(other, b"n" * 32, patient, 1))
    assert patient not in access.registered
    assert access.apply(registration(authority, b"n" * 32, patient, 1))
    assert patient in access.registered
    assert not access.apply(registration(authority, b"n" * 32, patient, 1))  # known


def test_refusals_are_logged_once_per_period_then_summarised_within_caps() -> None:
    log: RefusalLog[int] = RefusalLog(1000, per_patient=2, total=3)
    r1, r2, r3, p, q = (os.urandom(32) for _ in range(5))
    assert log.note(r1, p, "no_grant", 1, 0)
    assert not log.note(r1, p, "no_grant", 2, 10)  # counted
    assert not log.note(r1, p, "no_grant", 3, 20)
    assert log.note(r2, p, "no_grant", 4, 30)
    assert not log.note(r3, p, "no_grant", 5, 40)  # past the patient's cap: unlogged
    assert log.note(r3, q, "no_grant", 6, 50)
    assert not log.note(os.urandom(32), os.urandom(32), "x", 7, 60)  # past the total
    assert log.unlogged == 2
    assert log.due(999) == []
    assert log.due(1000) == [((r1, p, "no_grant"), 2, 2, 0)]  # the first counted: evidence
    assert log.due(1000) == [] and len(log) == 0
    assert log.note(r3, p, "no_grant", 8, 1000)  # a new period


def test_sources_are_addresses_and_ipv6_slash_64s() -> None:
    assert source_of("10.1.2.3") == "10.1.2.3"
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff") == "2001:db8::/64"
    assert source_of("::ffff:10.1.2.3") == "10.1.2.3"
    assert source_of(None) == "?"


def test_an_old_l1_log_still_decodes_and_verifies_but_is_marked_unsigned() -> None:
    node = nacl.signing.SigningKey.generate()
    log = AccessLog.create(
        node,
        network=b"n" * 32,
        reader=b"r" * 32,
        patient=b"p" * 32,
        stream="hr",
        from_ms=0,
        to_ms=1,
        ts_ms=2,
        outcome="read",
        reason=b"",
        grant=b"",
        readings=3,
        request=b"q" * 32,
    )
    again = decode_entry(log.encode())
    assert again == log and again.verify() and request_status(again) == UNSIGNED


def test_a_replica_applies_an_authoritys_registration_and_ignores_anyone_elses() -> None:
    """Issue 11 #4: P1 travels in blocks; replicas count it only from an authority."""
    world, a, b = two_nodes()
    patient, stranger_patient = os.urandom(32), os.urandom(32)
    b.access.registrars = frozenset(world.authorities | {bytes(b.key.verify_key)})
    a.access.registrars = b.access.registrars
    p1 = registration(world.authority, world.network, patient, T0)
    forged = registration(Identity.generate("node"), world.network, stranger_patient, T0)
    # the API refuses a registration not signed by an authority; a bad node might not
    entries = [p1.encode(), forged.encode()]
    block = build_block(
        world.authority.signing,
        network=world.network,
        height=0,
        prev=world.network,
        ts_ms=T0 + 2,
        entries=entries,
        links=(),
    )
    admit_remote(
        b,
        block.header,
        entries,
        check_entries(entries),
        block_hash_at=lambda n, h: None,
        now_ms=T0 + 3,
    )
    assert b.access.registered == {patient}


def test_what_strangers_make_the_access_state_hold_is_bounded_for_good() -> None:
    cfg = ApiConfig(max_stranger_held_bytes=70_000)
    lim, authority = ApiLimits(cfg), Identity.generate("node")
    access = AccessState(registrars=frozenset({authority.public}))
    a, b, reg = (Identity.generate("patient") for _ in range(3))
    g = grant(a, 1500)
    lim.tx_admission(g, g.encode(), access, 0.0)()
    access.apply(g)
    assert access.held_by_strangers == len(g.encode())
    g2 = grant(b, 1500)
    with pytest.raises(Rejected, match="stranger_quota"):
        lim.tx_admission(g2, g2.encode(), access, 3600.0)  # an hour later: budget, no room
    access.apply(registration(authority, b"n" * 32, reg.public, 1))
    g3 = grant(reg, 1500)
    lim.tx_admission(g3, g3.encode(), access, 3600.0)()
    access.apply(g3)
    # a stranger registered later takes their bytes out of the strangers' share
    access.apply(registration(authority, b"n" * 32, a.public, 2))
    assert access.held_by_strangers == 0


def test_a_patient_can_revoke_a_grant_when_strangers_spent_the_budget() -> None:
    lim, access = ApiLimits(ApiConfig(stranger_bytes_per_hour=70_000)), AccessState()
    a = Identity.generate("patient")
    g = grant(a, 1500)
    lim.tx_admission(g, g.encode(), access, 0.0)()
    access.apply(g)
    lim.strangers.take(STRANGERS, 70_000, 0.0)  # strangers spent the rest of the hour's
    flood = grant(Identity.generate("patient"), 10)
    with pytest.raises(RateLimited):
        lim.tx_admission(flood, flood.encode(), access, 0.0)
    gid = h(g.encode())
    rv = Revoke.create(a.signing, grant=gid, ts_ms=2)
    lim.tx_admission(rv, rv.encode(), access, 0.0)()
    access.apply(rv)
    again = Revoke.create(a.signing, grant=gid, ts_ms=3)  # a second one is no exception
    with pytest.raises(RateLimited):
        lim.tx_admission(again, again.encode(), access, 0.0)


def test_the_patients_one_authority_registered_share_its_budget() -> None:
    cfg = ApiConfig(registered_bytes_per_hour=70_000, registrar_bytes_per_hour=80_000)
    lim, bad, good = ApiLimits(cfg), Identity.generate("node"), Identity.generate("node")
    access = AccessState(registrars=frozenset({bad.public, good.public}))
    throwaway = [Identity.generate("patient") for _ in range(3)]
    honest = Identity.generate("patient")
    for p in throwaway:
        access.apply(registration(bad, b"n" * 32, p.public, 1))
    access.apply(registration(good, b"n" * 32, honest.public, 1))
    g = grant(throwaway[0], 1500)
    lim.tx_admission(g, g.encode(), access, 0.0)()
    g = grant(throwaway[1], 1500)  # its own budget has room; the registrar's does not
    with pytest.raises(RateLimited, match="budget"):
        lim.tx_admission(g, g.encode(), access, 0.0)
    g = grant(honest, 1500)
    lim.tx_admission(g, g.encode(), access, 0.0)()


def test_registrations_and_held_bytes_are_rebuilt_from_the_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    world = make_world()
    b = make_batcher(world)
    b.access.registrars = frozenset(world.authorities)
    patient = Identity.generate("patient")
    p1 = registration(world.authority, world.network, patient.public, T0)
    g = grant(patient, 10)
    b.admit_tx(p1.encode(), p1, T0 + 1)
    b.admit_tx(g.encode(), g, T0 + 1)
    store = Store(tmp_path / "node")
    try:
        store.commit_block(b.seal(T0 + 2))
        access, _ = replay_control(store, registrars=world.authorities)
        assert access.registered == {patient.public}
        assert access.held_bytes[patient.public] == len(g.encode())
        assert access.held_by_strangers == 0 and access.held_grants[patient.public] == 1
        assert replay_control(store)[0].registered == set()  # no registrars: none counts
    finally:
        store.close()


def test_strangers_cannot_crowd_a_known_readers_refusals_out_of_the_trail() -> None:
    log: RefusalLog[int] = RefusalLog(1000, per_patient=2, total=2)
    p, doctor = os.urandom(32), os.urandom(32)
    for i in range(4):  # strangers fill the patient's and the node's caps
        log.note(os.urandom(32), p, "denied:no_grant", i, 0)
    assert log.note(doctor, p, "denied:expired", 9, 1, capped=False)
    assert not log.note(doctor, p, "denied:expired", 10, 2, capped=False)  # then counted
    assert not log.note(doctor, p, "denied:expired", 11, 3, capped=False, amount=5)
    assert log.due(1000) == [((doctor, p, "denied:expired"), 2, 10, 5)]


def test_reads_of_an_unregistered_patient_are_logged_one_by_one_only_up_to_a_count() -> None:
    lim = ApiLimits(
        ApiConfig(unregistered_read_logs_per_key_hour=2, unregistered_read_logs_per_hour=3)
    )
    a, b = os.urandom(32), os.urandom(32)
    assert [lim.read_log(a, 0.0) for _ in range(3)] == [True, True, False]
    assert [lim.read_log(b, 0.0) for _ in range(2)] == [True, False]  # the node's count
    assert lim.read_log(a, 3600.0)  # an hour later
