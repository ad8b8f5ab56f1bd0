"""Reading shared data across a real three-node network with a real broker.

A simulated patient's heart rate flows in over MQTT; the patient grants a
provider a bounded window through one node; the provider fetches through
another (its first node is down), verifies and decrypts; a stranger and an
out-of-window request are refused; every read and refusal shows in the
patient's audit trail on every node; a replayed request is refused; the raw
ciphertext in every node's LMDB opens only inside the window.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fhir.resources.R4B.bundle import Bundle
from signed_http import signed_json, signed_raw
from test_cli import mh
from test_network import converged, hr_sim, start_nodes

from meshhealth.chain.block import decode_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.cli.chain_cmds import verify_stores
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.net.signed_request import sign_request
from meshhealth.sharing.grants import GrantKeys
from meshhealth.sharing.provider import my_grants
from meshhealth.store.lmdb_store import Store
from meshhealth.wire import Grant, Reading, Rechain, decode_control
from meshhealth.wire.codec import peek_tag, unpack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]
DEAD = "http://127.0.0.1:9"  # nothing listens on the discard port
EPOCH = 300_000  # five-minute key epochs, so a half hour holds several


def nodes_args(*urls: str) -> list[str]:
    return [a for u in urls for a in ("--node", u)]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def eventually(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await asyncio.to_thread(check)
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.3)


def raw_readings(data_dir: Path, patient: bytes) -> list[Reading]:
    """Every reading of ``patient`` straight from a node's LMDB file, no API in between."""
    store = Store(data_dir, readonly=True)
    try:
        out = []
        for node in store.heads():
            for _, _, body in store.iter_raw_chain(node):
                for e in decode_body(body or b"\x90"):
                    if not is_pruned(e) and peek_tag(e) == "R1":
                        r = Reading.decode(e)
                        if r.patient == patient:
                            out.append(r)
        return out
    finally:
        store.close()


def signed(who: Identity, node: Any, path: str) -> dict[str, str]:
    node_id = bytes.fromhex(node.status()["node"])
    return sign_request(
        who.signing, "GET", path, b"", audience=node_id, t_ms=time.time_ns() // 10**6
    )


def refusal(url: str, headers: dict[str, str]) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
    return err.value.code, json.loads(err.value.read())["reason"]


def audit_of(url: str, key: Path) -> list[dict[str, Any]]:
    r = mh("patient", "audit", "--key", str(key), "--node", url, "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(400)
async def test_a_bounded_grant_reads_its_window_and_nothing_else(mosquitto, tmp_path):
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    urls = [n.url for n in nodes]
    try:
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=1800, epoch_ms=EPOCH)
        try:
            await sim.enroll()
            assert await asyncio.wait_for(
                sim.run(asyncio.Event(), duration_s=0, drain_timeout=120), 240
            ), sim.statistics()
        finally:
            sim.close()
        assert await converged(nodes, 3, 60)
        pkey = next((tmp_path / "sim" / "patients").glob("*.key"))
        patient = load_identity(pkey).public
        doctor, stranger = Identity.generate("provider"), Identity.generate("provider")
        dkey, skey = tmp_path / "doctor.key", tmp_path / "stranger.key"
        save_identity(doctor, dkey)
        save_identity(stranger, skey)
        t0, t1 = sim.start_ms, sim.sim_ms
        # two whole key epochs inside the half hour: a key is all or nothing for its epoch
        lo = (t0 // EPOCH + 2) * EPOCH
        hi = lo + 2 * EPOCH - 1

        r = mh(
            "patient", "grant", "--key", str(pkey), "--to", str(dkey), "--streams", "hr",
            "--from", str(lo), "--until", str(hi), *nodes_args(urls[0]),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        grant_id = bytes.fromhex(r.stdout.split()[1].rstrip(":"))

        def granted_everywhere() -> bool:
            path = f"/v1/grantees/{doctor.public.hex()}/grants"
            return all(signed_json(doctor, u, path)["grants"] for u in urls)

        assert await eventually(granted_everywhere)

        # the provider's first node is down: it fails over, verifies, decrypts
        csv_out, table_out, fhir_out = (tmp_path / f"out.{x}" for x in ("csv", "txt", "json"))
        common = [
            "provider", "fetch", "--key", str(dkey), "--patient", patient.hex(),
            "--stream", "hr", "--from", str(t0), "--to", str(t1), *nodes_args(DEAD, urls[1]),
        ]  # fmt: skip
        r = mh(*common, "--format", "csv", "--out", str(csv_out))
        assert r.returncode == 0, r.stderr
        rows = list(csv.DictReader(io.StringIO(csv_out.read_text())))
        # 1 Hz for the ten granted minutes
        assert len(rows) == (hi - lo) // 1000 + 1 == 600, (len(rows), r.stderr)
        assert all(lo <= int(x["t_ms"]) <= hi for x in rows)
        assert all(x["unit"] == "/min" and 30 <= float(x["value"]) <= 220 for x in rows)
        assert mh(*common, "--format", "table", "--out", str(table_out)).returncode == 0
        lines = table_out.read_text().splitlines()[1:]
        assert len(lines) == len(rows)
        for line, row in zip(lines, rows, strict=True):  # the table and the CSV agree
            assert line.split()[:3] == [row["time"], "hr", row["value"]]
        assert mh(*common, "--format", "fhir", "--out", str(fhir_out)).returncode == 0
        bundle = json.loads(fhir_out.read_text())
        Bundle.model_validate(bundle)
        kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
        assert kinds.count("Observation") == len(rows) and kinds.count("Consent") == 1
        obs = bundle["entry"][0]["resource"]
        assert obs["code"]["coding"][0]["code"] == "8867-4"
        assert obs["valueQuantity"]["code"] == "/min"

        # the same values as the patient reads with their own seeds
        own = tmp_path / "own.csv"
        r = mh(
            "provider", "fetch", "--key", str(pkey), "--patient", patient.hex(), "--stream", "hr",
            "--from", str(lo), "--to", str(hi), "--format", "csv", "--out", str(own),
            *nodes_args(urls[2]),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        mine = list(csv.DictReader(io.StringIO(own.read_text())))
        assert [(x["t_ms"], x["value"]) for x in mine] == [(x["t_ms"], x["value"]) for x in rows]

        # outside the window: refused, as is a stranger
        late = mh(
            "provider", "fetch", "--key", str(dkey), "--patient", patient.hex(),
            "--stream", "hr", "--from", str(hi + 1), "--to", str(t1), *nodes_args(urls[0]),
        )  # fmt: skip
        assert late.returncode != 0 and "expired" in late.stderr, late.stderr
        nosy = mh(
            "provider", "fetch", "--key", str(skey), "--patient", patient.hex(),
            "--stream", "hr", "--from", str(t0), "--to", str(t1), *nodes_args(urls[0]),
        )  # fmt: skip
        assert nosy.returncode != 0 and "granted us nothing" in nosy.stderr
        path = f"/v1/patients/{patient.hex()}/readings?stream=hr&from={t0}&to={t1}"
        headers = signed(stranger, nodes[0], path)
        assert refusal(urls[0] + path, headers) == (403, "no_grant")
        # the same signed request again is a replay
        assert refusal(urls[0] + path, headers) == (401, "unauthenticated")
        # only the patient reads the audit trail
        path = f"/v1/patients/{patient.hex()}/audit"
        assert refusal(urls[0] + path, signed(doctor, nodes[0], path)) == (403, "not_patient")

        # every read and every refusal is in the patient's audit trail, on every node
        def audited_everywhere() -> list[list[dict[str, Any]]] | None:
            trails = [audit_of(u, pkey) for u in urls]
            ok = all(
                sum(x["outcome"] == "denied" for x in t) >= 3
                and sum(x["outcome"] == "read" for x in t) >= 4
                for t in trails
            )
            return trails if ok else None

        trails = await eventually(audited_everywhere, 40)
        assert trails, [audit_of(u, pkey) for u in urls]
        trail = trails[0]
        reads = [x for x in trail if x["outcome"] == "read" and x["reader"] == doctor.public.hex()]
        assert {x["grant"] for x in reads} == {grant_id.hex()}
        assert reads[0]["readings"] > 0 and reads[0]["node"] == nodes[1].status()["node"]
        denied = {(x["reader"], x["reason"]) for x in trail if x["outcome"] == "denied"}
        assert (doctor.public.hex(), "expired") in denied
        assert (stranger.public.hex(), "no_grant") in denied
        r = mh("patient", "audit", "--key", str(pkey), "--node", urls[2], "--format", "fhir")
        assert r.returncode == 0
        Bundle.model_validate(json.loads(r.stdout))
        assert (doctor.public.hex(), "not_patient") in denied
    finally:
        for n in nodes:
            n.stop()

    # the raw ciphertext in every node's store opens inside the window only
    keys = GrantKeys.open(grant_in_store(cfgs[0].data_path, grant_id), doctor)
    for c in cfgs:
        stored = raw_readings(c.data_path, patient)
        assert len(stored) >= 1800  # half an hour at 1 Hz, a sample a reading
        opened = {r.t_ms for r in stored if keys.decrypt(r) is not None}
        assert opened == {r.t_ms for r in stored if lo <= r.t_ms <= hi}


def grant_in_store(data_dir: Path, grant_id: bytes) -> Grant:
    store = Store(data_dir, readonly=True)
    try:
        for raw in store.control_entries():
            if h(raw) == grant_id:
                return Grant.decode(raw)
    finally:
        store.close()
    raise AssertionError("the grant is not in the store")


def rechains_of(url: str, patient: Identity) -> list[Rechain]:
    """The patient's rechains, as the patient lists them (a stranger may not)."""
    path = f"/v1/patients/{patient.public.hex()}/enrollments"
    assert signed_raw(None, url, path)[0] == 401
    assert signed_raw(Identity.generate("provider"), url, path)[0] == 403
    status, body = signed_raw(patient, url, path)
    assert status == 200, body
    txs = [decode_control(raw) for raw in unpack(body, max_len=1 << 24)]
    return [tx for tx in txs if isinstance(tx, Rechain)]


def grant_keys_of(url: str, who: Identity, patient: bytes) -> GrantKeys:
    """The grantee's keys exactly as ``provider fetch`` assembles them (rechains followed)."""

    async def go() -> GrantKeys:
        async with aiohttp.ClientSession() as session:
            ((keys, _),) = await my_grants(session, [url], who, patient)
            return keys

    return asyncio.run(go())


@pytest.mark.timeout(400)
async def test_revoke_rechain_and_erase_across_the_network(mosquitto, tmp_path):
    nodes, cfgs = start_nodes(tmp_path / "net", 3, mosquitto.url)
    urls = [n.url for n in nodes]
    try:
        sim = hr_sim(cfgs, nodes, mosquitto.url, tmp_path / "sim", backfill_s=60, epoch_ms=EPOCH)
        try:
            await sim.enroll()
            live = asyncio.create_task(
                sim.run(asyncio.Event(), duration_s=40, drain_timeout=30)
            )  # the devices keep publishing in real time for 40 s
            pkey = next((tmp_path / "sim" / "patients").glob("*.key"))
            patient = load_identity(pkey).public
            other = next(p.identity.public for p in sim.patients if p.identity.public != patient)
            doctor, nurse = Identity.generate("provider"), Identity.generate("provider")
            ids = {}
            for who in (doctor, nurse):
                save_identity(who, tmp_path / f"{who.short}.key")
                r = mh(
                    "patient", "grant", "--key", str(pkey), "--to", who.public.hex(),
                    "--streams", "hr", "--from", str(sim.start_ms), "--open",
                    *nodes_args(urls[0]),
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                ids[who.public] = r.stdout.split()[1].rstrip(":")
            await asyncio.sleep(8)
            r = mh(
                "patient", "revoke", "--key", str(pkey), "--grant", ids[doctor.public],
                "--switch-after", "5", *nodes_args(DEAD, urls[1]),
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            assert "sealed to 1 device(s) and 1 open grant(s)" in r.stdout, r.stdout
            await asyncio.wait_for(live, 120)
        finally:
            sim.close()
        assert sim.rechained == 1, sim.statistics()  # the device took up the new chain
        assert await converged(nodes, 3, 60)
        (rc,) = rechains_of(urls[2], load_identity(pkey))
        switch = rc.ts_ms

        doctor_keys = await asyncio.to_thread(grant_keys_of, urls[0], doctor, patient)
        nurse_keys = await asyncio.to_thread(grant_keys_of, urls[0], nurse, patient)
        assert rc.chain_id in nurse_keys.cursors and rc.chain_id not in doctor_keys.cursors
        for c in cfgs:
            stored = raw_readings(c.data_path, patient)
            before = [r for r in stored if r.t_ms < switch]
            after = [r for r in stored if r.t_ms >= switch]
            assert len(after) >= 10 and before, (len(before), len(after))
            assert all(r.chain_id == rc.chain_id for r in after)  # no node took the old chain
            assert all(doctor_keys.decrypt(r) is None for r in after)  # revoked: nothing new
            assert all(
                doctor_keys.decrypt(r) is not None for r in before if r.chain_id != rc.chain_id
            )
            assert all(nurse_keys.decrypt(r) is not None for r in stored)  # still granted
        late = mh(
            "provider", "fetch", "--key", str(tmp_path / f"{doctor.short}.key"),
            "--patient", patient.hex(), "--stream", "hr", "--from", str(sim.start_ms),
            "--to", str(sim.sim_ms), *nodes_args(urls[2]),
        )  # fmt: skip
        assert late.returncode != 0 and "revoked" in late.stderr, late.stderr

        # erasure: the payloads go from every store; the chains still verify
        r = mh("patient", "erase", "--key", str(pkey), "--yes", *nodes_args(urls[0]))
        assert r.returncode == 0, r.stderr

        def erased_everywhere() -> bool:
            return all(not raw_readings(c.data_path, patient) for c in cfgs)

        assert await eventually(erased_everywhere, 40)
        assert all(raw_readings(c.data_path, other) for c in cfgs)  # nobody else's
        for who, key in ((nurse, tmp_path / f"{nurse.short}.key"), (None, pkey)):
            r = mh(
                "provider", "fetch", "--key", str(key), "--patient", patient.hex(),
                "--stream", "hr", "--from", str(sim.start_ms), "--to", str(sim.sim_ms),
                *nodes_args(urls[1]),
            )  # fmt: skip
            assert r.returncode != 0 and "erased" in r.stderr, (who, r.stderr)
        assert all(n.status()["ingest"]["erased_readings"] > 0 for n in nodes)
    finally:
        for n in nodes:
            n.stop()
    for c in cfgs:
        assert verify_stores(c.data_path) == 0
