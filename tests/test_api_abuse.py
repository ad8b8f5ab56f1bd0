"""Issue 11 #4, #5, #13 against a real node process: what a stranger can make a node write.

* #4: throwaway patient keys submitting twice the strangers' hourly budget of
  Grants are refused 429 past it and nothing of theirs is written; a patient an
  authority registered (``patient register``) still submits, within their own
  quota of grants.
* #5: one key flooding signed reads hits its own rate limit and nonce share while
  another key's reads go on; refusals of a patient flood at most the stated number
  of access logs into their trail (the rest become one summary with a count).
* #13: every logged read carries the reader's signed request, which verifies
  back to the reader's key; a log whose request is forged is flagged.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import NodeProcess
from core_helpers import junk_grant
from test_cli import mh

from meshhealth.bench.procs import MOSQUITTO, BrokerProcess
from meshhealth.chain.block import decode_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.cli.demo import setup_network
from meshhealth.crypto.keys import Identity, load_identity
from meshhealth.net.signed_request import sign_request
from meshhealth.sharing.audit import FORGED, VERIFIED, request_status
from meshhealth.sharing.export import access_log_doc
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import AccessLogV2, Grant, decode_entry
from meshhealth.wire.codec import peek_tag, unpack
from meshhealth.wire.types import ACCESS_LOGS

pytestmark = pytest.mark.integration


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[BrokerProcess]:
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (.ci/run installs it)")
    m = BrokerProcess(tmp_path / "mosquitto")
    m.start()
    yield m
    m.stop()


@pytest.fixture
def limited_node(broker: BrokerProcess, tmp_path: Path) -> Iterator[Any]:
    """A factory: one real node whose ``[api]`` limits are set small."""
    nodes: list[NodeProcess] = []

    def make(**api: Any) -> NodeProcess:
        cfg = setup_network(tmp_path / f"net{len(nodes)}", 1, broker=broker.url)[0]
        cfg = replace(cfg, api=replace(cfg.api, **api))
        (cfg.base / "node.toml").write_text(cfg.dumps())
        n = NodeProcess(cfg, tmp_path / f"node{len(nodes)}.log")
        nodes.append(n)
        n.start()
        return n

    yield make
    for n in nodes:
        n.stop()


def post_tx(url: str, raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(f"{url}/v1/tx", data=raw, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def big_grant(patient: Identity, keys: int, now: int) -> bytes:
    """A bounded grant of ``keys`` one-second epochs: about ``32 * keys`` bytes."""
    return junk_grant(patient, keys, ts_ms=now, until_ms=keys * 1000 - 1).encode()


def chain_entries(node: NodeProcess) -> list[bytes]:
    """Every entry of every chain in the node's LMDB file, straight from disk."""
    store = Store(node.cfg.data_path, readonly=True)
    try:
        return [
            e
            for chain in store.heads()
            for _, _, body in store.iter_raw_chain(chain)
            for e in decode_body(body or b"\x90")
            if not is_pruned(e)
        ]
    finally:
        store.close()


def wait_until(check: Any, timeout: float = 20.0, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


# --- #4 ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_strangers_share_one_byte_budget_and_a_registered_patient_keeps_theirs(
    limited_node: Any,
) -> None:
    budget = 100_000
    node = limited_node(stranger_bytes_per_hour=budget, max_grants_per_patient=3)
    t = now_ms()
    size = len(big_grant(Identity.generate("patient"), 250, t))
    answers = [
        post_tx(node.url, big_grant(Identity.generate("patient"), 250, t))
        for _ in range(2 * budget // size + 1)
    ]  # twice the budget, each from a fresh throwaway key
    accepted = [b["tx"] for code, b, _ in answers if code == 202]
    refused = [(b, h) for code, b, h in answers if code == 429]
    assert len(accepted) + len(refused) == len(answers), answers
    assert 0 < len(accepted) * (size + 3) <= budget
    assert len(accepted) >= budget // (size + 3) - 1  # the budget is usable, not just closed
    assert all(b["reason"] == "stranger_budget" for b, _ in refused)
    assert all(int(h["Retry-After"]) >= 1 for _, h in refused)

    # an authority registers a patient: their grants are admitted from their own budget
    patient = Identity.generate("patient")
    r = mh("patient", "register", "--config", str(node.config_path), "--patient",
           patient.public.hex())  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    mine = [post_tx(node.url, big_grant(patient, 250, t + i)) for i in range(4)]
    assert [c for c, _, _ in mine[:3]] == [202, 202, 202], mine
    # ...up to the access state's quota of grants per patient (it holds them in memory)
    assert mine[3][0] == 422 and mine[3][1]["reason"] == "grant_quota"
    # a stranger is still refused
    code, body, _ = post_tx(node.url, big_grant(Identity.generate("patient"), 250, t))
    assert code == 429 and body["reason"] == "stranger_budget"

    # what is on chain: the accepted strangers' grants and the registered patient's, no more
    def sealed() -> list[bytes] | None:
        grants = [e for e in chain_entries(node) if peek_tag(e) == "G1"]
        return grants if len(grants) == len(accepted) + 3 else None

    grants = wait_until(sealed)
    assert grants, "the accepted grants were not sealed"
    strangers = [g for g in grants if Grant.decode(g).patient != patient.public]
    assert sum(len(g) + 3 for g in strangers) <= budget
    assert any(peek_tag(e) == "P1" for e in chain_entries(node))
    rejects = node.status()["ingest"]["rejects"]
    assert rejects["stranger_budget"] == len(refused) + 1
    assert rejects["grant_quota"] == 1


# --- #5 and #13 --------------------------------------------------------------------------


def signed_get(node: NodeProcess, key: Identity, path: str, audience: bytes) -> tuple[int, Any]:
    hdrs = sign_request(key.signing, "GET", path, b"", audience=audience, t_ms=now_ms())
    req = urllib.request.Request(node.url + path, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def audit_logs(node: NodeProcess, patient: Identity, audience: bytes) -> list[Any]:
    code, body = signed_get(node, patient, f"/v1/patients/{patient.public.hex()}/audit", audience)
    assert code == 200, body
    tag, items = unpack(body, max_len=1 << 26)
    assert tag == "AU1"
    return [decode_entry(raw) for raw, _, _, _ in items]


@pytest.mark.timeout(120)
def test_a_flooding_reader_locks_out_nobody_and_refusals_flood_no_trail(
    limited_node: Any,
) -> None:
    period_s, per_patient = 3.0, 2
    node = limited_node(
        read_key_per_s=0.2,
        read_key_burst=12,
        nonces_per_key=8,
        refusal_period_s=period_s,
        refusal_logs_per_patient=per_patient,
    )
    audience = bytes.fromhex(node.status()["node"])
    victim, flood = Identity.generate("patient"), Identity.generate("provider")
    # start just after a period begins, so the whole flood falls in one period
    period_ms = int(period_s * 1000)
    time.sleep((period_ms - now_ms() % period_ms) / 1000 + 0.05)
    t = now_ms()
    path = f"/v1/patients/{victim.public.hex()}/readings?stream=hr&from={t - 60_000}&to={t}"

    # one key, twice its burst: refused 403 (no grant) until its nonce share and its
    # bucket are spent, then 429; the victim's own reads still pass
    codes = []
    for _ in range(24):
        code, body = signed_get(node, flood, path, audience)
        codes.append((code, body["reason"] if code != 200 else ""))
    assert codes[:8] == [(403, "no_grant")] * 8, codes
    assert set(codes[8:]) == {(429, "rate_limited")}, codes
    assert signed_get(node, victim, path, audience)[0] == 200
    # throwaway keys refused for the same patient: twice the per-patient bound
    for _ in range(2 * 2 * per_patient):
        assert signed_get(node, Identity.generate("provider"), path, audience)[0] == 403
    status = node.status()["reads"]
    assert status["rate_limited"] >= 16 and status["refusals_unlogged"] >= 2 * per_patient

    # after the period: the flooder's summary; in all at most 2 * per_patient refusal logs
    def trail() -> list[Any] | None:
        logs = audit_logs(node, victim, audience)
        summary = [x for x in logs if x.reader == flood.public and getattr(x, "count", 1) > 1]
        return logs if summary else None

    time.sleep(period_s + 1)  # (the victim's key, too, has only 8 nonces in a window)
    logs = wait_until(trail, 10, every=2)
    assert logs, audit_logs(node, victim, audience)
    refusals = [x for x in logs if x.outcome == "denied"]
    assert len(refusals) <= 2 * per_patient, refusals
    by_flood = [x for x in refusals if x.reader == flood.public]
    assert sorted(x.count for x in by_flood) == [1, 7]  # 8 refusals: the first, then 7
    bound = 2 * per_patient * AccessLogV2.MAX_LEN
    assert sum(len(x.encode()) for x in refusals) <= bound
    # the victim's own (empty) read, and the audit reads, are logged too, all verifiable
    assert all(isinstance(x, ACCESS_LOGS) and request_status(x) == VERIFIED for x in logs)


@pytest.mark.timeout(120)
def test_a_logged_read_verifies_back_to_its_reader_and_a_forged_one_is_flagged(
    limited_node: Any,
) -> None:
    node = limited_node()
    audience = bytes.fromhex(node.status()["node"])
    patient, stranger = Identity.generate("patient"), Identity.generate("provider")
    t = now_ms()
    path = f"/v1/patients/{patient.public.hex()}/readings?stream=hr&from={t - 1000}&to={t}"
    assert signed_get(node, stranger, path, audience)[0] == 403

    def logged() -> list[Any]:
        return [x for x in audit_logs(node, patient, audience) if x.reader == stranger.public]

    (log,) = wait_until(logged)
    assert isinstance(log, AccessLogV2) and log.path == path and log.reason == b"no_grant"
    assert request_status(log) == VERIFIED
    # what a malicious authority could write: the reader's name on a read it never asked
    # for (signed by the node, so the node signature verifies; the request does not)
    node_key = load_identity(node.cfg.key_path)
    fields = {f: getattr(log, f) for f, _ in AccessLogV2.FIELDS if f != "node"}
    invented = AccessLogV2.create(
        node_key.signing, **fields | {"outcome": "read", "reason": b"", "readings": 4242}
    ).verify()
    # the reader did ask this node for this window, so it verifies: a node can misreport
    # what it answered, never invent that a reader asked
    assert request_status(invented) == VERIFIED
    wider = AccessLogV2.create(node_key.signing, **fields | {"to_ms": t + 86_400_000})
    assert request_status(wider) == FORGED  # not for another window
    resigned = AccessLogV2.create(node_key.signing, **fields | {"req_sig": os.urandom(64)})
    assert request_status(resigned) == FORGED
    other = AccessLogV2.create(node_key.signing, **fields | {"reader": patient.public})
    assert request_status(other) == FORGED
    # what `patient audit --format json` and the patient view show
    assert access_log_doc(resigned)["request"] == "forged"
    assert access_log_doc(log)["request"] == "verified"
