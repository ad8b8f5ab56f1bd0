"""Exports: table and CSV agree with the rows; FHIR resources validate against the R4B models."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.consent import Consent
from fhir.resources.R4B.observation import Observation
from hypothesis import given
from hypothesis import strategies as st

from meshhealth.crypto.hashing import h
from meshhealth.crypto.keys import Identity
from meshhealth.sharing.export import (
    Pseudonyms,
    Row,
    audit_bundle,
    audit_event,
    consent,
    format_value,
    observation,
    observations_bundle,
    write_csv,
    write_table,
)
from meshhealth.sharing.grants import GrantKeys, make_grant
from meshhealth.sharing.keychain import KeyChain
from meshhealth.wire import AccessLog, Grant

T = 1_795_255_200_000  # 2026-11-21T10:00:00Z
PATIENT = "ab" * 32
DEVICE = "cd" * 32
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"

# stream -> (LOINC codes, UCUM unit, category, a value): written out here, not read from the module
EXPECTED: dict[str, tuple[list[str], str, str, tuple[float, ...]]] = {
    "hr": (["8867-4"], "/min", "vital-signs", (72.0,)),
    "spo2": (["2708-6", "59408-5"], "%", "vital-signs", (97.5,)),
    "temp": (["8310-5"], "Cel", "vital-signs", (36.65,)),
    "bp": (["85354-9"], "mm[Hg]", "vital-signs", (121.0, 79.0)),
    "rr": (["9279-1"], "/min", "vital-signs", (14.0,)),
    "steps": (["55423-8"], "{steps}", "activity", (312.0,)),
}


def rows() -> list[Row]:
    out = [
        Row(PATIENT, s, T + i * 1000, unit, value, DEVICE)
        for i, (s, (_, unit, _, value)) in enumerate(EXPECTED.items())
    ]
    return [*out, Row(PATIENT, "glucose", T + 9000, "mmol/L", (5.4,), DEVICE)]


def ms(text: str) -> int:
    """An ISO 8601 UTC time (``...Z``) back to Unix ms, exactly."""
    assert text.endswith("Z")
    since = datetime.fromisoformat(text) - datetime(1970, 1, 1, tzinfo=UTC)
    return since // timedelta(milliseconds=1)


def codes(concept: dict[str, Any]) -> list[str]:
    return [c["code"] for c in concept.get("coding", [])]


def test_every_stream_exports_as_valid_fhir_with_its_loinc_code_and_unit() -> None:
    bundle = observations_bundle(rows(), now_ms=T)
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection" and bundle["timestamp"] == "2026-11-21T10:00:00.000Z"
    by_stream = {e["resource"]["code"].get("text"): e for e in bundle["entry"]}
    assert len(bundle["entry"]) == len(EXPECTED) + 1
    for entry in bundle["entry"]:
        obs = entry["resource"]
        Observation.model_validate(obs)
        assert entry["fullUrl"] == f"urn:uuid:{obs['id']}"
        assert obs["status"] == "final"
        assert obs["subject"] == {"reference": f"Patient/{PATIENT}"}
        assert obs["device"] == {"reference": f"Device/{DEVICE}"}
    for row, entry in zip(rows(), bundle["entry"], strict=True):
        obs = entry["resource"]
        assert ms(obs["effectiveDateTime"]) == row.t_ms
        if row.stream not in EXPECTED:
            continue
        loinc, unit, category, value = EXPECTED[row.stream]
        assert codes(obs["code"]) == loinc
        assert {c["system"] for c in obs["code"]["coding"]} == {LOINC}
        assert codes(obs["category"][0]) == [category]
        if row.stream != "bp":
            assert obs["valueQuantity"] == {
                "value": value[0],
                "unit": unit,
                "system": UCUM,
                "code": unit,
            }
    bp = by_stream["Blood pressure panel with all children optional"]["resource"]
    assert "valueQuantity" not in bp
    assert [codes(c["code"]) for c in bp["component"]] == [["8480-6"], ["8462-4"]]
    assert [c["valueQuantity"]["value"] for c in bp["component"]] == [121.0, 79.0]
    assert {c["valueQuantity"]["code"] for c in bp["component"]} == {"mm[Hg]"}
    # a stream LOINC does not know: code text only, and no claim of a category
    other = by_stream["glucose"]["resource"]
    assert other["code"] == {"text": "glucose"} and "category" not in other
    assert other["valueQuantity"]["code"] == "mmol/L"


def test_export_is_deterministic_but_for_the_bundle_timestamp() -> None:
    a, b = observations_bundle(rows()), observations_bundle(rows())
    assert a["entry"] == b["entry"]
    assert len({e["fullUrl"] for e in a["entry"]}) == len(a["entry"])
    assert observations_bundle(rows(), now_ms=T) == observations_bundle(rows(), now_ms=T)
    empty = observations_bundle([], now_ms=T)
    Bundle.model_validate(empty)
    assert "entry" not in empty


def test_a_mislabelled_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="unit"):
        observation(Row(PATIENT, "hr", T, "%", (72.0,), DEVICE), id="x")
    with pytest.raises(ValueError, match="unit"):
        observations_bundle([Row(PATIENT, "temp", T, "[degF]", (98.6,), DEVICE)])
    with pytest.raises(ValueError, match="values"):
        observation(Row(PATIENT, "bp", T, "mm[Hg]", (120.0,), DEVICE), id="x")
    with pytest.raises(ValueError, match="values"):
        observation(Row(PATIENT, "hr", T, "/min", (72.0, 73.0), DEVICE), id="x")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ((72.0,), "72"),
        ((36.65,), "36.65"),
        ((1 / 3,), "0.333"),
        ((2.0004,), "2"),  # rounds to an integer: no trailing "."
        ((120.0, 80.0), "120/80"),
        ((-0.0001,), "0"),
        ((-3.5,), "-3.5"),
    ],
)
def test_format_value(value: tuple[float, ...], text: str) -> None:
    assert format_value(value) == text


def export_text(rs: list[Row]) -> tuple[list[dict[str, str]], list[list[str]]]:
    """CSV rows (as dicts) and table lines (split), checking both counts."""
    c, t = io.StringIO(newline=""), io.StringIO()
    assert write_csv(rs, c) == len(rs) == write_table(rs, t)
    lines = t.getvalue().splitlines()
    assert lines[0].split() == ["time", "stream", "value", "unit", "device", "subject"]
    assert len(lines) - 1 == len(rs)
    parsed = list(csv.DictReader(io.StringIO(c.getvalue(), newline="")))
    assert len(parsed) == len(rs)
    return parsed, [line.split() for line in lines[1:]]


def check_agree(rs: list[Row], parsed: list[dict[str, str]], table: list[list[str]]) -> None:
    for r, p, cells in zip(rs, parsed, table, strict=True):
        assert int(p["t_ms"]) == r.t_ms
        assert ms(p["time"]) == r.t_ms
        assert (p["subject"], p["stream"], p["unit"], p["device"]) == (
            r.subject,
            r.stream,
            r.unit,
            r.device,
        )
        got = [float(v) for v in p["value"].split("/")]
        assert len(got) == len(r.value)
        assert all(abs(g - v) <= 0.0005 + 1e-9 * abs(v) for g, v in zip(got, r.value, strict=True))
        expected = [p["time"], r.stream, p["value"], r.unit, r.device[:8], r.subject[:16]]
        assert cells == expected


def test_csv_and_table_agree_with_the_rows() -> None:
    rs = rows()
    parsed, table = export_text(rs)
    check_agree(rs, parsed, table)
    assert parsed[0]["time"] == "2026-11-21T10:00:00.000Z"
    assert [p["value"] for p in parsed] == ["72", "97.5", "36.65", "121/79", "14", "312", "5.4"]


UNITS = ("/min", "%", "Cel", "mm[Hg]", "{steps}", "kg", "mmol/L")
HEX = "0123456789abcdef"
row_strategy = st.builds(
    Row,
    subject=st.one_of(
        st.text(HEX, min_size=64, max_size=64),
        st.text(HEX, min_size=32, max_size=32).map("pseud-".__add__),
    ),
    stream=st.from_regex(r"[a-z][a-z0-9_]{0,15}", fullmatch=True),
    t_ms=st.integers(0, 4_102_444_800_000),  # up to 2100
    unit=st.sampled_from(UNITS),
    value=st.lists(
        st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=2
    ).map(tuple),
    device=st.text(HEX, min_size=64, max_size=64),
)


@given(st.lists(row_strategy, max_size=20))
def test_csv_round_trips_and_matches_the_table(rs: list[Row]) -> None:
    parsed, table = export_text(rs)
    check_agree(rs, parsed, table)


def grant(until_ms: int | None) -> tuple[Grant, bytes, Identity]:
    patient, doctor = Identity.generate("patient"), Identity.generate("provider")
    chains = {s: KeyChain.new(s, T // 60_000, 60_000) for s in ("bp", "hr", "glucose")}
    g = make_grant(
        patient,
        chains,
        doctor.public,
        streams=["hr", "bp", "glucose"],
        from_ms=T,
        until_ms=until_ms,
        now_ms=T - 5000,
    )
    assert g.verify() is g
    return g, h(g.encode()), doctor


@pytest.mark.parametrize("until_ms", [None, T + 3_600_000])
def test_consent_for_open_and_bounded_grants(until_ms: int | None) -> None:
    g, gid, doctor = grant(until_ms)
    c = consent(g, gid, revoked=False, subject=g.patient.hex())
    Consent.model_validate(c)
    assert c["status"] == "active"
    assert c["patient"] == {"reference": f"Patient/{g.patient.hex()}"}
    assert c["dateTime"] == "2026-11-21T09:59:55.000Z"
    assert c["identifier"] == [{"system": "urn:meshhealth:grant", "value": gid.hex()}]
    assert codes(c["scope"]) == ["patient-privacy"] and codes(c["category"][0]) == ["59284-0"]
    assert codes(c["policyRule"]) == ["OPTIN"]
    p = c["provision"]
    assert p["type"] == "permit"
    assert p["period"]["start"] == "2026-11-21T10:00:00.000Z"
    if until_ms is None:
        assert "end" not in p["period"]
    else:
        assert p["period"]["end"] == "2026-11-21T11:00:00.000Z"
    (actor,) = p["actor"]
    assert codes(actor["role"]) == ["IRCP"]
    assert actor["reference"]["identifier"] == {
        "system": "urn:meshhealth:key",
        "value": doctor.public.hex(),
    }
    # the grant's streams (sorted by make_grant): bp, glucose (text only), hr
    assert [codes(x) for x in p["code"]] == [["85354-9"], [], ["8867-4"]]
    assert p["code"][1] == {"text": "glucose"}


def test_consent_of_a_revoked_pseudonymous_grant() -> None:
    g, gid, _ = grant(T + 60_000)
    names = Pseudonyms(os.urandom(32))
    subject = names.patient(g.patient)
    c = consent(g, gid, revoked=True, subject=subject, names=names)
    Consent.model_validate(c)
    assert c["status"] == "inactive"
    assert c["patient"] == {"reference": f"Patient/{subject}"}
    # identified by the grant's pseudonym: the grant id maps back to the patient on chain
    assert c["id"] == names.grant(gid) != gid.hex()
    assert c["identifier"] == [{"system": "urn:meshhealth:pseudonym", "value": c["id"]}]
    assert gid.hex() not in json.dumps(c) and g.patient.hex() not in json.dumps(c)


def test_pseudonym_is_per_grant_and_hides_the_patient() -> None:
    patient, other = os.urandom(32), os.urandom(32)
    k1, k2 = Pseudonyms(os.urandom(32)), Pseudonyms(os.urandom(32))
    p = k1.patient(patient)
    assert p == Pseudonyms(k1.key).patient(patient)
    assert p.startswith("pseud-") and len(p) == len("pseud-") + 32
    int(p.removeprefix("pseud-"), 16)
    assert k2.patient(patient) != p
    assert k1.patient(other) != p
    assert patient.hex() not in p and patient.hex()[:16] not in p
    # a device and a grant id get names of their own, none equal to another kind's
    assert len({k1.patient(patient), k1.device(patient), k1.grant(patient)}) == 3
    with pytest.raises(ValueError):
        Pseudonyms(b"short")


def test_the_pseudonym_key_is_the_grantees_secret() -> None:
    """Only the grantee derives it: not from the grant (public on chain) alone."""
    g, _, doctor = grant(T + 60_000)
    k = GrantKeys.open(g, doctor).pseudonym_key
    assert len(k) == 32 and k == GrantKeys.open(g, doctor).pseudonym_key
    assert k not in g.encode() and h(g.encode()) != k
    g2, _, doctor2 = grant(T + 60_000)
    assert GrantKeys.open(g2, doctor2).pseudonym_key != k


def access_log(outcome: str, *, reason: bytes = b"", grant_id: bytes = b"") -> AccessLog:
    node = Identity.generate("node")
    log = AccessLog.create(
        node.signing,
        network=os.urandom(32),
        reader=Identity.generate("provider").public,
        patient=Identity.generate("patient").public,
        stream="hr",
        from_ms=T,
        to_ms=T + 60_000,
        ts_ms=T + 120_000,
        outcome=outcome,
        reason=reason,
        grant=grant_id,
        readings=12 if outcome == "read" else 0,
        request=os.urandom(32),
    )
    assert log.verify() is log and log.node == node.public
    return log


def details(event: dict[str, Any]) -> dict[str, str]:
    (entity,) = event["entity"]
    return {d["type"]: d["valueString"] for d in entity["detail"]}


def test_audit_event_of_a_read() -> None:
    gid = os.urandom(32)
    log = access_log("read", grant_id=gid)
    e = audit_event(log)
    AuditEvent.model_validate(e)
    assert e["outcome"] == "0" and "outcomeDesc" not in e
    assert e["action"] == "R" and e["recorded"] == "2026-11-21T10:02:00.000Z"
    assert e["type"]["code"] == "rest" and codes({"coding": e["subtype"]}) == ["search-type"]
    reader, node = e["agent"]
    assert reader == {
        "who": {"identifier": {"system": "urn:meshhealth:key", "value": log.reader.hex()}},
        "requestor": True,
    }
    assert node["who"]["identifier"]["value"] == log.node.hex() and node["requestor"] is False
    assert e["source"]["observer"]["identifier"]["value"] == log.node.hex()
    assert e["entity"][0]["what"] == {"reference": f"Patient/{log.patient.hex()}"}
    assert details(e) == {
        "stream": "hr",
        "window": "2026-11-21T10:00:00.000Z/2026-11-21T10:01:00.000Z",
        "readings": "12",
        "grant": gid.hex(),
    }
    assert audit_event(log)["id"] == e["id"]  # deterministic, from the request digest
    assert audit_event(log, id="given")["id"] == "given"


def test_audit_event_of_a_denial() -> None:
    log = access_log("denied", reason="no grant covers hr ✗".encode())
    e = audit_event(log)
    AuditEvent.model_validate(e)
    assert e["outcome"] == "4" and e["outcomeDesc"] == "no grant covers hr ✗"
    assert "grant" not in details(e) and details(e)["readings"] == "0"


def test_audit_bundle() -> None:
    logs = [access_log("read", grant_id=os.urandom(32)), access_log("denied", reason=b"revoked")]
    b = audit_bundle(logs, now_ms=T)
    Bundle.model_validate(b)
    assert [e["resource"]["outcome"] for e in b["entry"]] == ["0", "4"]
    assert [e["fullUrl"] for e in b["entry"]] == [
        f"urn:uuid:{audit_event(log)['id']}" for log in logs
    ]
