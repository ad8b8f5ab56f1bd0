"""A pseudonymous export names nothing a node maps back to the patient (issue 11 #9).

A real node ingests a patient's two devices; the patient grants a researcher
a pseudonymous window; ``provider fetch`` writes FHIR and CSV.  Neither may
hold the patient's key, a device key, the grant id, or the hash of any entry
or block the node holds (each is on chain beside the patient's key), and the
FHIR stays valid.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest
from fhir.resources.R4B.bundle import Bundle
from signed_http import signed_raw
from test_cli import mh

from device_agents.simulate import Simulation
from meshhealth.chain.block import decode_body
from meshhealth.chain.merkle import is_pruned
from meshhealth.config import Genesis
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.wire.codec import unpack

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]


def chain_hexes(url: str, authority: Identity) -> set[str]:
    """The hex of every entry hash, block hash and key in the node's chains (read as the
    authority: raw blocks are for authorities only)."""
    status, body = signed_raw(None, url, "/v1/chains")
    out: set[str] = set()
    for chain in json.loads(body)["chains"]:
        out.add(chain["node"])
        for height in range(chain["height"] + 1):
            status, raw = signed_raw(authority, url, f"/v1/chains/{chain['node']}/{height}")
            assert status == 200, raw
            header, entries = unpack(raw, max_len=1 << 24)
            out.add(h(header).hex())
            out.update(h(e).hex() for e in decode_body(entries) if not is_pruned(e))
    return out


@pytest.mark.timeout(180)
async def test_a_pseudonymous_export_names_no_key_grant_or_hash(mosquitto, node_factory, tmp_path):
    node = node_factory(mosquitto.url)
    g = Genesis.load(node.cfg.genesis_path)
    sim = Simulation(
        broker_url=mosquitto.url,
        node_urls=[node.url],
        network=g.network_id,
        authorities={a.key for a in g.authorities},
        state_dir=tmp_path / "sim",
        patients=1,
        devices_per_patient=2,
        streams=("hr",),
        interval_s=1.0,
        samples_per_reading=1,
        backfill_s=40,
    )
    try:
        await sim.enroll()
        drained = await asyncio.wait_for(
            sim.run(asyncio.Event(), duration_s=0, drain_timeout=60), 90
        )
    finally:
        sim.close()
    assert drained, sim.statistics()
    (p,) = sim.patients
    patient, devices = p.identity.public, [d.identity.public for d in p.devices]
    pkey = next((tmp_path / "sim" / "patients").glob("*.key"))
    assert load_identity(pkey).public == patient
    researcher = Identity.generate("provider")
    rkey = tmp_path / "researcher.key"
    save_identity(researcher, rkey)
    t0, t1 = sim.start_ms, sim.sim_ms
    r = mh(
        "patient", "grant", "--key", str(pkey), "--to", str(rkey), "--streams", "hr",
        "--from", str(t0), "--until", str(t1 + 3_600_000), "--pseudonymous", "--node", node.url,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    gid = r.stdout.split()[1].rstrip(":")

    fhir, table = tmp_path / "export.json", tmp_path / "export.csv"
    common = [
        "provider", "fetch", "--key", str(rkey), "--patient", patient.hex(), "--stream", "hr",
        "--from", str(t0), "--to", str(t1), "--node", node.url, "--workers", "0",
    ]  # fmt: skip
    for _ in range(50):  # until the grant is in a block
        r = mh(*common, "--format", "fhir", "--out", str(fhir))
        if r.returncode == 0:
            break
        await asyncio.sleep(0.3)
    assert r.returncode == 0, r.stderr
    assert mh(*common, "--format", "csv", "--out", str(table)).returncode == 0
    text, rows_text = fhir.read_text(), table.read_text()
    bundle = json.loads(text)
    Bundle.model_validate(bundle)
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds.count("Consent") == 1 and kinds.count("Observation") >= 40
    rows = list(csv.DictReader(io.StringIO(rows_text)))
    assert len(rows) == kinds.count("Observation")
    # every device is there, under its own pseudonym
    named = {
        e["resource"]["device"]["reference"] for e in bundle["entry"] if "device" in e["resource"]
    }
    assert len(named) == 2 and all(d.startswith("Device/pseud-") for d in named)
    assert {x["device"] for x in rows} == {d.removeprefix("Device/") for d in named}
    (subject,) = {x["subject"] for x in rows}
    assert subject.startswith("pseud-")

    secrets = {patient.hex(), gid, *(d.hex() for d in devices)}
    secrets |= chain_hexes(node.url, load_identity(node.cfg.key_path))
    assert gid in secrets and len(secrets) > 40  # the grant, enrolments, readings, blocks
    for out in (text, rows_text):
        low = out.lower()
        leaked = sorted(s for s in secrets if s[:16] in low)
        assert not leaked, leaked
