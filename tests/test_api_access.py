"""Who may read what through a real node's API (issue 11 #8).

Raw blocks and proofs hold every patient's readings, grants and access logs:
only an authority of the network reads them (replication data); everyone
else, a revoked provider and the patient included, reads through the signed
and logged reads.  The grant and enrolment listings answer the party they
name (and authorities) only; the device enrolments stay public (a device
polls them before it has anything to sign with).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from signed_http import signed_json, signed_raw
from test_cli import mh

from meshhealth.chain.block import decode_body
from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.wire.codec import unpack

pytestmark = pytest.mark.integration


def _until(check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_raw_blocks_and_proofs_are_for_authorities_only(tmp_path, mosquitto, node_factory):  # type: ignore[no-untyped-def]
    node = node_factory(mosquitto.url)
    url = node.url
    authority = load_identity(node.cfg.key_path)
    pkey, dkey = tmp_path / "patient.key", tmp_path / "doctor.key"
    assert mh("patient", "new", "--out", str(pkey), "--streams", "hr").returncode == 0
    patient = load_identity(pkey)
    doctor, stranger = Identity.generate("provider"), Identity.generate("provider")
    save_identity(doctor, dkey)
    r = mh("patient", "grant", "--key", str(pkey), "--to", str(dkey), "--streams", "hr",
           "--days", "1", "--node", url)  # fmt: skip
    assert r.returncode == 0, r.stderr
    gid = r.stdout.split()[1].rstrip(":")
    r = mh("patient", "revoke", "--key", str(pkey), "--grant", gid, "--no-rechain", "--node", url)
    assert r.returncode == 0, r.stderr
    grants_path = f"/v1/patients/{patient.public.hex()}/grants"

    def revoked() -> bool:
        listed = signed_json(patient, url, grants_path)["grants"]
        return bool(listed) and all(g["revoked"] for g in listed)

    assert _until(revoked)

    # the authority finds the grant in its chain, block by block (once it is sealed)
    me = node.status()["node"]

    def find_grant() -> tuple[int, int] | None:
        chain = node.status()["chains"].get(me)
        for height in range(chain["height"] + 1 if chain else 0):
            status, body = signed_raw(authority, url, f"/v1/chains/{me}/{height}")
            assert status == 200, body
            _, raw_body = unpack(body, max_len=1 << 24)
            for i, entry in enumerate(decode_body(raw_body)):
                if h(entry).hex() == gid:
                    return height, i
        return None

    found = _until(find_grant)
    assert found is not None, "the grant is in no block"
    height, index = found
    block, proof = f"/v1/chains/{me}/{height}", f"/v1/chains/{me}/{height}/proof/{index}"
    doc = signed_json(authority, url, proof)
    assert h(bytes.fromhex(doc["entry"])).hex() == gid and doc["index"] == index
    assert signed_json(authority, url, block + "?format=json")["height"] == height
    assert signed_raw(authority, url, block + "?format=xml")[0] == 400  # not the raw block
    assert signed_raw(authority, url, f"/v1/chains/{me}/-1")[0] == 400  # was a 500
    assert signed_raw(authority, url, f"/v1/chains/{me}/{1 << 64}/proof/0")[0] == 400
    assert signed_raw(authority, url, f"/v1/chains/{me}/{height}/proof/-1")[0] == 400
    assert signed_raw(authority, url, f"/v1/chains/{me}/{height}/proof/99999")[0] == 404

    # nobody else: unsigned, a stranger, the revoked provider, even the patient
    for path in (block, proof, block + "?format=json"):
        status, body = signed_raw(None, url, path)
        assert status == 401 and json.loads(body)["reason"] == "unauthenticated"
        for who in (stranger, doctor, patient):
            status, body = signed_raw(who, url, path)
            assert status == 403 and json.loads(body)["reason"] == "not_allowed", (path, body)

    # the listings: the party named, or an authority; not a stranger, not unsigned
    listings = {
        grants_path: patient,
        f"/v1/patients/{patient.public.hex()}/enrollments": patient,
        f"/v1/grantees/{doctor.public.hex()}/grants": doctor,
    }
    for path, party in listings.items():
        assert signed_raw(None, url, path)[0] == 401
        assert signed_raw(stranger, url, path)[0] == 403
        assert signed_raw(party, url, path)[0] == 200
        assert signed_raw(authority, url, path)[0] == 200
    assert signed_raw(patient, url, f"/v1/grantees/{doctor.public.hex()}/grants")[0] == 403
    # a device polls its enrolments unsigned, as before
    assert signed_raw(None, url, f"/v1/devices/{'ab' * 32}/enrollments")[0] == 200
    # nothing here reached the audit trail as a read of the patient's data
    assert node.status()["reads"]["access_logs"] == 0
