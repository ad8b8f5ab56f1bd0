"""Issue 11, the attacker review of the API and audit code (fix4): each test drives one
attack to about twice the bound it tests."""

from __future__ import annotations

import os
import types

from meshhealth.config import ApiConfig
from meshhealth.net.admission import ApiLimits
from meshhealth.net.limits import RefusalLog
from meshhealth.net.signed_request import SignedRequest
from meshhealth.node import Node


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
    n.flush_refusals(10 * 3_600_000 + int(__import__("time").time() * 1000))
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
