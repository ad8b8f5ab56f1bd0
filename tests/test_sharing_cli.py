"""``meshhealth patient grant | grants | revoke | erase`` against a real node."""

from __future__ import annotations

import time

import pytest
from signed_http import signed_json, signed_raw
from test_cli import mh

from meshhealth.crypto.keys import Identity, load_identity, save_identity
from meshhealth.sharing.grants import GrantKeys
from meshhealth.wire import Grant

pytestmark = pytest.mark.integration


def _wait_grants(node_url: str, patient: Identity, n: int) -> list[dict]:  # type: ignore[type-arg]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        path = f"/v1/patients/{patient.public.hex()}/grants"
        got = signed_json(patient, node_url, path)["grants"]
        if len(got) >= n:
            return got  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError("grants did not show up")


def test_patient_grants_revokes_and_the_grantee_opens_its_keys(  # type: ignore[no-untyped-def]
    tmp_path, mosquitto, node_factory
) -> None:
    node = node_factory(mosquitto.url)
    pkey, dkey = tmp_path / "patient.key", tmp_path / "doctor.key"
    assert mh("patient", "new", "--out", str(pkey), "--streams", "hr,spo2").returncode == 0
    doctor = Identity.generate("provider")
    save_identity(doctor, dkey)
    patient = load_identity(pkey)

    def grant(to: str, *window: str, nodes: tuple[str, ...] = (node.url,)):  # type: ignore[no-untyped-def]
        node_args = [a for u in nodes for a in ("--node", u)]
        return mh("patient", "grant", "--key", str(pkey), "--to", to, *window, *node_args)

    r = grant(str(dkey), "--streams", "hr", "--days", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    bounded_id = r.stdout.split()[1].rstrip(":")
    # the first node is down: the grant fails over to the next
    r = grant(doctor.public.hex(), "--open", nodes=("http://127.0.0.1:9", node.url))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "open" in r.stdout

    listed = _wait_grants(node.url, patient, 2)
    path = f"/v1/patients/{patient.public.hex()}/grants"
    assert signed_raw(None, node.url, path)[0] == 401
    assert signed_raw(doctor, node.url, path)[0] == 403  # not even a grantee lists them
    assert {g["id"] for g in listed} >= {bounded_id}
    assert all(not g["revoked"] for g in listed)
    out = mh("patient", "grants", "--key", str(pkey), "--node", node.url)
    assert out.returncode == 0 and out.stdout.count("active") == 2, out.stdout

    # the grantee finds its grants on the node and opens the sealed keys with its own key
    path = f"/v1/grantees/{doctor.public.hex()}/grants"
    mine = signed_json(doctor, node.url, path)["grants"]
    # nobody else learns which patients the doctor sees: not unsigned, not a stranger
    assert signed_raw(None, node.url, path)[0] == 401
    assert signed_raw(Identity.generate("provider"), node.url, path)[0] == 403
    assert len(mine) == 2
    for g in mine:
        keys = GrantKeys.open(Grant.decode(bytes.fromhex(g["tx"])), doctor)
        assert keys.bounded or keys.cursors

    r = mh("patient", "revoke", "--key", str(pkey), "--grant", bounded_id, "--node", node.url)
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        state = {g["id"]: g["revoked"] for g in _wait_grants(node.url, patient, 2)}
        if state[bounded_id]:
            break
        time.sleep(0.2)
    assert state[bounded_id] and list(state.values()).count(True) == 1
    assert "revoked" in mh("patient", "grants", "--key", str(pkey), "--node", node.url).stdout

    bad = mh("patient", "revoke", "--key", str(pkey), "--grant", "nothex", "--node", node.url)
    assert bad.returncode == 2 and "64-hex" in bad.stderr
    unconfirmed = mh("patient", "erase", "--key", str(pkey), "--node", node.url)
    assert unconfirmed.returncode == 2 and "--yes" in unconfirmed.stderr
    erased = mh("patient", "erase", "--key", str(pkey), "--yes", "--node", node.url)
    assert erased.returncode == 0, erased.stderr
    assert node.status()["ingest"]["rejected"] == 0
