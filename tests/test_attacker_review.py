"""Issue 11, the attacker review of the API and audit code (fix4): each test drives one
attack to about twice the bound it tests."""

from __future__ import annotations

import json
import os
import time
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from conftest import NodeProcess
from core_helpers import junk_grant, make_rogue
from yarl import URL

from meshhealth.bench.procs import MOSQUITTO, BrokerProcess
from meshhealth.chain.acl import AccessState
from meshhealth.cli.demo import setup_network
from meshhealth.config import ApiConfig
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity
from meshhealth.errors import MalformedMessage, RateLimited, Rejected
from meshhealth.net.admission import CUT_ERASES_PER_HOUR, STRANGERS, ApiLimits
from meshhealth.net.api import _grant_doc, key_txs
from meshhealth.net.limits import NonceCache, NonceFull, RefusalLog, nonce_source
from meshhealth.net.signed_request import ReplayGuard, SignedRequest, sign_request, signed_target
from meshhealth.node import Node
from meshhealth.sharing.audit import VERIFIED, request_status
from meshhealth.sharing.listing import device_txs
from meshhealth.sharing.serve import decide
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import (
    AccessLogV2,
    Erase,
    Grant,
    Rechain,
    RegisterPatient,
    RemoveDevice,
    SealedKey,
)
from meshhealth.wire.types import MAX_QUERY_MS


def _fake_node(cfg: ApiConfig) -> types.SimpleNamespace:
    """Node's read-logging methods on a stand-in: what it would put on chain."""
    n = types.SimpleNamespace(
        batcher=types.SimpleNamespace(access=types.SimpleNamespace(registered=set())),
        limits=ApiLimits(cfg),
        refusals=RefusalLog(
            int(cfg.refusal_period_s * 1000), cfg.refusal_logs_per_patient, cfg.refusal_logs_total
        ),
        logged=[],
    )

    def log_access(req, patient, stream, lo, hi, outcome, reason, grant, readings, count=1):
        n.logged.append((req.key, patient, outcome, reason, readings, count))

    n.log_access = log_access
    for f in ("log_read", "log_refusal", "flush_refusals"):
        setattr(n, f, types.MethodType(getattr(Node, f), n))
    return n


def _req(key: bytes) -> SignedRequest:
    return SignedRequest(key, "GET", "/p", b"\0" * 32, 0, os.urandom(16), b"\0" * 64)


def test_served_reads_of_an_unregistered_patient_are_never_dropped_from_the_audit() -> None:
    cfg = ApiConfig(
        refusal_logs_per_patient=4,
        refusal_logs_total=8,
        unregistered_read_logs_per_key_hour=3,
        unregistered_read_logs_per_hour=5,
    )
    n = _fake_node(cfg)
    p, grantee = os.urandom(32), os.urandom(32)
    for _ in range(2 * cfg.refusal_logs_total):  # strangers fill every refusal cap
        n.log_refusal(_req(os.urandom(32)), p, "hr", 0, 1, "denied", "no_grant", b"")
        n.log_refusal(_req(os.urandom(32)), os.urandom(32), "hr", 0, 1, "denied", "no_grant", b"")
    strangers = len(n.logged)
    assert strangers == cfg.refusal_logs_total  # their caps held
    # throwaway grantees of other patients use up the node's one-by-one read logs
    for _ in range(2 * cfg.unregistered_read_logs_per_hour):
        n.log_read(_req(os.urandom(32)), os.urandom(32), "hr", 0, 1, b"g" * 32, 1)
    reads = 20
    for _ in range(reads):
        n.log_read(_req(grantee), p, "hr", 0, 1, b"g" * 32, 500)
    mine = [x for x in n.logged if x[0] == grantee]
    assert mine, "the grantee's reads are not crowded out by strangers' refusals"
    n.flush_refusals(10 * 3_600_000 + int(time.time() * 1000))
    mine = [x for x in n.logged if x[0] == grantee]
    assert sum(x[5] for x in mine) == reads  # every served read is on chain, counted
    assert sum(x[4] for x in mine) == reads * 500
    assert len(mine) <= 2  # one log, then one summary: bounded per reader key and period
    assert n.refusals.unlogged > 0  # strangers' refusals past their caps were dropped


def test_served_reads_past_the_caps_are_folded_into_a_summary_not_dropped() -> None:
    log: RefusalLog[int] = RefusalLog(1000, per_patient=1, total=1)
    p, g = os.urandom(32), os.urandom(32)
    assert log.note(os.urandom(32), p, "denied:no_grant", 0, 0)
    assert not log.note(os.urandom(32), p, "denied:no_grant", 1, 0)  # strangers' cap: dropped
    assert log.note(g, p, "read:", 2, 1, pool="readers")  # a separate pool
    assert not log.note(os.urandom(32), p, "read:", 3, 2, pool="readers")  # dropped: empty
    assert not log.note(g2 := os.urandom(32), p, "read:", 4, 3, pool="readers", served=True)
    assert not log.note(g2, p, "read:", 5, 4, pool="readers", served=True, amount=7)
    assert ((g2, p, "read:"), 2, 4, 7) in log.due(1000)
    assert log.unlogged == 2


# --- item 2: one signed path, one reading ------------------------------------------------


def _honest_log(raw_path: str) -> AccessLogV2:
    """What an honest node logs for ``raw_path``, read the way aiohttp reads it."""
    node, reader = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    now = int(time.time() * 1000)
    hdrs = sign_request(reader, "GET", raw_path, b"", audience=bytes(node.verify_key), t_ms=now)
    req = ReplayGuard(bytes(node.verify_key)).check("GET", raw_path, b"", hdrs, now)
    u = URL(raw_path, encoded=True)
    return AccessLogV2.create(
        node,
        network=b"\0" * 32,
        reader=req.key,
        patient=bytes.fromhex(u.path.split("/")[3]),
        stream=u.query["stream"],
        from_ms=int(u.query["from"]),
        to_ms=int(u.query["to"]),
        ts_ms=now,
        outcome="read",
        reason=b"",
        grant=b"\1" * 32,
        readings=1,
        count=1,
        method=req.method,
        path=req.path,
        body_hash=req.body_hash,
        req_ts_ms=req.t_ms,
        req_nonce=req.nonce,
        req_sig=req.sig,
    )


def test_a_signed_path_has_one_reading_for_the_server_and_the_verifier() -> None:
    p = os.urandom(32).hex()
    good = f"/v1/patients/{p}/readings?stream=hr&from=0&to=1000"
    assert request_status(_honest_log(good)) == VERIFIED
    assert request_status(_honest_log(good.replace("stream=hr", "stream=%68r"))) == VERIFIED
    two_ways = [
        good + "&stream=zz",
        good + "&from=7",
        f"/v1/patients/%{ord(p[0]):02x}{p[1:]}/readings?stream=hr&from=0&to=1000",
    ]
    for raw in two_ways:
        with pytest.raises(MalformedMessage):  # what the node now refuses (400)
            signed_target(raw)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    tmp = tmp_path_factory.mktemp("review")
    broker = BrokerProcess(tmp / "mosquitto")
    broker.start()
    cfg = setup_network(tmp / "net", 1, broker=broker.url)[0]
    n = NodeProcess(cfg, tmp / "node.log")
    n.start()
    yield n
    n.stop()
    broker.stop()


def _signed_get(node: NodeProcess, key: Identity, path: str) -> tuple[int, Any]:
    audience = bytes.fromhex(node.status()["node"])
    hdrs = sign_request(
        key.signing, "GET", path, b"", audience=audience, t_ms=int(time.time() * 1000)
    )
    req = urllib.request.Request(node.url + path, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.integration
def test_the_node_refuses_a_signed_read_its_audit_would_read_another_way(
    node: NodeProcess,
) -> None:
    patient, reader = Identity.generate("patient"), Identity.generate("provider")
    p = patient.public.hex()
    good = f"/v1/patients/{p}/readings?stream=hr&from=0&to=1000"
    assert _signed_get(node, reader, good)[0] == 403  # no grant: refused, logged
    for raw in (
        good + "&stream=zz",
        good + "&to=7",
        f"/v1/patients/%{ord(p[0]):02x}{p[1:]}/readings?stream=hr&from=0&to=1000",
    ):
        code, body = _signed_get(node, reader, raw)
        assert code == 400 and body["reason"] == "malformed", (raw, code, body)


# --- item 5: far-future windows ----------------------------------------------------------


def test_a_far_future_window_is_empty_in_the_store_not_an_error(tmp_path: Path) -> None:
    s = Store(tmp_path / "s", map_size_mb=8)
    try:
        patient = os.urandom(32)
        with s.env.begin(write=True) as txn:  # what a stored reading of (patient, hr) leaves
            txn.put(b"p" + patient, b"\0\0\0\1", db=s.db["names"])
            txn.put(b"shr", b"\1", db=s.db["names"])
        for t in (MAX_QUERY_MS, 2**62, 2**63 - 1, 2**64):
            assert s.reading_blocks(patient, "hr", t, t) == []
    finally:
        s.close()


@pytest.mark.integration
def test_the_api_bounds_a_reads_window_to_year_9999(node: NodeProcess) -> None:
    patient, reader = Identity.generate("patient"), Identity.generate("provider")
    base = f"/v1/patients/{patient.public.hex()}"
    assert (
        _signed_get(node, reader, f"{base}/readings?stream=hr&from=0&to={MAX_QUERY_MS}")[0] == 403
    )
    for t in (MAX_QUERY_MS + 1, 2**62):
        for path in (f"{base}/readings?stream=hr&from={t}&to={t}", f"{base}/audit?from={t}"):
            code, body = _signed_get(node, reader, path)
            assert code == 400 and body["reason"] == "malformed", (path, code, body)
    doc = json.loads(urllib.request.urlopen(node.url + "/v1/openapi.json", timeout=10).read())
    params = doc["paths"]["/v1/patients/{key}/readings"]["get"]["parameters"]
    assert {x.get("name"): x.get("schema", {}).get("maximum") for x in params}[
        "from"
    ] == MAX_QUERY_MS


# --- item 3: registering an honest patient again ------------------------------------------


def test_an_authority_registering_a_patient_again_cannot_lock_it_out() -> None:
    net = os.urandom(32)
    # M's key sorts lower: the registrar the lowest-key rule would charge
    m, a = sorted(
        (nacl.signing.SigningKey.generate() for _ in range(2)), key=lambda k: bytes(k.verify_key)
    )
    p = nacl.signing.SigningKey.generate()
    acc = AccessState(registrars=frozenset({bytes(a.verify_key), bytes(m.verify_key)}))

    def reg(auth: nacl.signing.SigningKey, t: int) -> RegisterPatient:
        return RegisterPatient.create(auth, network=net, patient=bytes(p.verify_key), ts_ms=t)

    budget = 4096
    lim = ApiLimits(ApiConfig(registrar_bytes_per_hour=budget))
    now = 10.0
    assert acc.apply(reg(a, 1))
    assert acc.apply(reg(m, 2))  # M registers P too (whichever key sorts lower)
    lim.registrars.take(bytes(m.verify_key), 2 * budget, now)  # and keeps its budget empty
    tx = Erase.create(p, patient=bytes(p.verify_key), ts_ms=5)
    lim.tx_admission(tx, tx.encode(), acc, now)()  # charged to A, who has room
    assert lim.registrars.wait_s(bytes(a.verify_key), budget, now) > 0  # A paid
    # only when every authority that registered P is spent is P refused
    lim.registrars.take(bytes(a.verify_key), 2 * budget, now)
    with pytest.raises(RateLimited):
        lim.tx_admission(tx, tx.encode(), acc, now)


# --- item 4: the nonce cache's fair share ---------------------------------------------------


def _flood(c: NonceCache, source: str, now: int, tries: int) -> int:
    """A source signing each request with a fresh key until refused; how many it got in."""
    got = 0
    for _ in range(tries):
        try:
            c.add(os.urandom(32), os.urandom(16), now + 1_000, source, now)
            got += 1
        except NonceFull:
            pass
    return got


def test_a_fresh_key_flood_from_fewer_sources_than_the_bound_locks_no_reader_out() -> None:
    total, per_source = 1024, 128  # the bound: total / per_source = 8 sources
    c = NonceCache(1_000, total=total, per_key=64, per_source=per_source)
    now = 1_000_000
    held = sum(_flood(c, f"10.0.0.{s}", now, 2 * per_source) for s in range(7))
    assert held > c.soft  # past the soft limit: shares apply
    honest = os.urandom(32)
    for _ in range(16):  # one reader key, many requests: never down to one nonce a key
        c.add(honest, os.urandom(16), now, "198.51.100.7", now)
    # sixteen /64s of one /48 are one source: together at most its cap
    c2 = NonceCache(1_000, total=total, per_key=64, per_source=per_source)
    assert sum(_flood(c2, f"2001:db8:0:{s:x}::/64", now, 2 * per_source) for s in range(16)) == (
        per_source
    )
    c2.add(honest, os.urandom(16), now, "2001:db8:1::/64", now)  # another /48: served
    assert nonce_source("2001:db8:0:5::/64") == "2001:db8::/48"
    assert nonce_source("10.0.0.1") == "10.0.0.1"


# --- item 6: erasing and rechaining whatever strangers spent -------------------------------


def test_a_drained_strangers_budget_stops_no_erase_nor_the_rechain_after_a_cut() -> None:
    cut = 40_000  # each patient's allowance; strangers' budget: one transaction's worth
    lim = ApiLimits(ApiConfig(stranger_bytes_per_hour=70_000, cut_bytes_per_patient_hour=cut))
    acc, now = AccessState(), 10.0
    rogue = make_rogue(1)  # an unregistered patient with a device on "hr"
    assert acc.apply(rogue.enrolment)
    lim.strangers.take(STRANGERS, 2 * 70_000, now)  # a stranger drained the shared budget

    def rechain(ts: int) -> Rechain:
        return Rechain.create(
            rogue.patient.signing,
            ts_ms=ts,
            stream="hr",
            chain_id=os.urandom(8),
            start_epoch=0,
            epoch_ms=60_000,
            devices=(SealedKey(rogue.device.public, 0, os.urandom(80)),),
            grants=(),
        )

    def admit(tx: Any) -> None:
        lim.tx_admission(tx, tx.encode(), acc, now)()
        assert acc.apply(tx)

    early = rechain(5)
    with pytest.raises(RateLimited):  # no cut yet: an ordinary write, on the spent budget
        lim.tx_admission(early, early.encode(), acc, now)
    remove = RemoveDevice.create(
        rogue.patient.signing, patient=rogue.patient.public, device=os.urandom(32), ts_ms=10
    )
    acc.apply(remove)  # a cut (held here from another node)
    admit(rechain(20))  # the rechain after it: let through
    again = rechain(30)  # a second one of the same stream, no new cut: the spent budget
    with pytest.raises(RateLimited):
        lim.tx_admission(again, again.encode(), acc, now)
    admit(Erase.create(rogue.patient.signing, patient=rogue.patient.public, ts_ms=40))
    admit(rechain(50))  # and the rechain after the erasure
    # a patient erasing over and over is held to its own allowance (twice it: refused)
    refused = 0
    for ts in range(60, 60 + 2 * cut // 100):
        e = Erase.create(rogue.patient.signing, patient=rogue.patient.public, ts_ms=ts)
        try:
            admit(e)
        except RateLimited:
            refused += 1
    assert refused >= 2 * cut // 100 - CUT_ERASES_PER_HOUR  # a few an hour, no more


def test_throwaway_patients_cuts_share_one_pool_so_they_cannot_multiply_it() -> None:
    """Each throwaway key holding a transaction has a cut allowance of its own; their sum is
    held to one strangers' pool, else a stranger's bytes per hour would grow with the
    number of keys it made (the lead's review of the item-6 exemption)."""
    pool = 70_000  # the strangers' cut pool, and their ordinary budget: ~450 erasures each
    lim = ApiLimits(ApiConfig(stranger_cut_bytes_per_hour=pool, stranger_bytes_per_hour=pool))
    acc, now = AccessState(), 10.0
    admitted = refused = spent = 0
    for _ in range(4 * pool // 150):  # twice what both hold, one erasure per fresh patient
        rogue = make_rogue(1)
        assert acc.apply(rogue.enrolment)  # it holds something here (from another node)
        e = Erase.create(rogue.patient.signing, patient=rogue.patient.public, ts_ms=40)
        try:
            lim.tx_admission(e, e.encode(), acc, now)()
        except RateLimited:
            refused += 1
            continue
        admitted += 1
        spent += len(e.encode())
    assert admitted > 0 and refused > 0
    assert spent <= 2 * pool  # the two full buckets (no time passes), however many keys


# --- item 7: other chains' strangers do not use up this node's stranger quota ---------------


def _grant(patient: Identity, keys: int = 60) -> Grant:
    return junk_grant(patient, keys)


def test_a_bad_authoritys_stranger_grants_do_not_lock_strangers_out_of_this_node() -> None:
    quota = 20_000
    lim = ApiLimits(ApiConfig(max_stranger_held_bytes=quota))
    acc, now = AccessState(), 10.0
    held = 0
    while held < 2 * quota:  # a bad authority's own blocks: throwaway keys' grants, held here
        g = _grant(Identity.generate("patient"))
        assert acc.apply(g)
        held += len(g.encode())
    assert acc.held_by_strangers > quota
    admitted = 0
    for _ in range(2 * quota // len(_grant(Identity.generate("patient")).encode())):
        g = _grant(Identity.generate("patient"))  # strangers asking THIS node
        try:
            lim.tx_admission(g, g.encode(), acc, now)()
        except Rejected as exc:
            assert exc.reason == "stranger_quota"
            break
        acc.apply(g)
        admitted += len(g.encode())
    assert admitted > quota // 2  # the quota is ours to give, not the bad authority's
    assert lim.stranger_held_total <= quota  # and it still holds for what we admit
    g = _grant(Identity.generate("patient"))
    with pytest.raises(Rejected):
        lim.tx_admission(g, g.encode(), acc, now)


# --- item 8: listings and reads cost what they return, not every transaction held ----------


class _NoWalk(dict):  # type: ignore[type-arg]
    """A dict that refuses to be walked: what a per-request O(all transactions) scan hits."""

    def _walked(self, *_: Any) -> Any:
        raise AssertionError("walked every transaction held")

    items = values = keys = __iter__ = _walked  # type: ignore[assignment]


def test_listings_and_reads_use_indexes_not_a_walk_of_every_transaction() -> None:
    acc = AccessState()
    rogue = make_rogue(1)
    acc.apply(rogue.enrolment)
    mine = _grant(rogue.patient)
    acc.apply(mine)
    gid = h(mine.encode())
    rc = Rechain.create(
        rogue.patient.signing,
        ts_ms=5,
        stream="hr",
        chain_id=os.urandom(8),
        start_epoch=0,
        epoch_ms=60_000,
        devices=(SealedKey(rogue.device.public, 0, os.urandom(80)),),
        grants=(SealedKey(gid, 0, os.urandom(80)),),
    )
    acc.apply(rc)
    for _ in range(40):  # others' grants: what a listing must not walk
        acc.apply(_grant(Identity.generate("patient")))
    for name in ("grants", "rechains", "enrolments", "removals"):
        setattr(acc, name, _NoWalk(getattr(acc, name)))
    assert acc.may_read(mine.grantee, rogue.patient.public, "hr", 500) == gid
    d = decide(acc, mine.grantee, rogue.patient.public, "hr", 0, 1000)
    assert d.allowed and d.grant == gid
    assert set(acc.grants_of(rogue.patient.public)) == {gid}
    assert set(acc.grants_to(mine.grantee)) == {gid}
    assert key_txs(acc, rogue.patient.public) == [rogue.enrolment.encode(), rc.encode()]
    assert _grant_doc(acc, gid, mine)["rechains"] == [rc.encode().hex()]
    txs, cut = device_txs(acc, rogue.device.public)
    assert txs == [rc.encode(), rogue.enrolment.encode()] and not cut


def test_a_reader_seen_in_the_window_keeps_a_floor_behind_a_flooding_address() -> None:
    c = NonceCache(1_000, total=64, per_key=64, per_source=64, key_floor=4)  # soft: 52
    now = 1_000_000
    reader = os.urandom(32)
    c.add(reader, os.urandom(16), now, "10.0.0.1", now)  # seen before the flood
    assert _flood(c, "10.0.0.1", now, 49) == 49  # its address floods with fresh keys
    assert _flood(c, "10.0.0.2", now, 4) == 4  # another source: past the soft limit
    assert c.soft < len(c) < c.total
    with pytest.raises(NonceFull):  # the flooding address is past its share: fresh keys no
        c.add(os.urandom(32), os.urandom(16), now, "10.0.0.1", now)
    for _ in range(3):  # the reader it already held keeps up to its floor
        c.add(reader, os.urandom(16), now, "10.0.0.1", now)
    with pytest.raises(NonceFull):  # and no more
        c.add(reader, os.urandom(16), now, "10.0.0.1", now)
