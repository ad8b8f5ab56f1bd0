"""Exports for a provider: readings as a table, CSV and FHIR R4; grants and access logs as FHIR.

The provider has already fetched, verified and decrypted the readings; this
module only reshapes them.  Everything here is a pure function of its
arguments (the writers write to the stream they are given; a bundle's
``timestamp`` is the clock unless ``now_ms`` is passed).

One sample is a ``Row``.  The table and the CSV format values the same way
(``format_value``: ``120/80`` for blood pressure, integers without ``.0``,
at most three decimals), so the two always agree, row for row, in input order.

FHIR: each stream the ``LOINC`` table knows becomes an Observation with its
LOINC coding(s), its category (``vital-signs``; steps: ``activity``) and its
UCUM unit.  A row whose unit is not the one LOINC expects is refused
(``ValueError``): a mislabelled stream must not be exported under that code.
Any other stream becomes an Observation with only ``code.text`` (the stream
name), no LOINC coding and no category, since nothing says what it measures.

Identifiers are deterministic, so exporting the same data twice gives the
same resources: an Observation's id is a UUIDv5 of (subject, stream, t_ms,
device), which is what identifies a sample; an AuditEvent's id is a UUIDv5
of the digest of the request it logs; a Consent's id is the grant id.

Under a pseudonymous grant (:class:`Pseudonyms`) an export names no key a
node could map back to the patient: the patient, each device and the grant
itself (the Consent's id and identifier) are keyed BLAKE2b pseudonyms under
a secret only the grantee holds (derived from its own key and the grant's
sealed keys, :attr:`meshhealth.sharing.grants.GrantKeys.pseudonym_key`).
Grant ids and device keys are on chain beside the patient's key, so a
pseudonym keyed by a public value (the grant id) could be recomputed by
anyone who holds the grants; these cannot.
"""

from __future__ import annotations

import csv
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TextIO

import nacl.encoding
import nacl.hash

from meshhealth.sharing.audit import request_status
from meshhealth.wire import Grant
from meshhealth.wire.types import AccessLogV2, AnyAccessLog

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
CATEGORY_SYSTEM = "http://terminology.hl7.org/CodeSystem/observation-category"
KEY_SYSTEM = "urn:meshhealth:key"
PSEUDONYM_SYSTEM = "urn:meshhealth:pseudonym"
NODE_SYSTEM = "urn:meshhealth:node"
GRANT_SYSTEM = "urn:meshhealth:grant"

_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:meshhealth:export")
_EPOCH = datetime(1970, 1, 1)
_LAST_MS = (datetime(9999, 12, 31, 23, 59, 59) - _EPOCH) // timedelta(milliseconds=1)

Json = dict[str, Any]
Code = tuple[str, str]  # a LOINC (code, display)


@dataclass(frozen=True, slots=True)
class Row:
    """One decrypted sample, as exported."""

    subject: str  # patient public key (64 hex) or, under a pseudonymous grant, the pseudonym
    stream: str
    t_ms: int  # sample time, Unix ms (UTC)
    unit: str  # UCUM unit, as the device wrote it
    value: tuple[float, ...]  # one value; bp has two: (systolic, diastolic)
    device: str  # device public key, 64 hex, or, under a pseudonymous grant, its pseudonym


@dataclass(frozen=True, slots=True)
class StreamCode:
    """How a stream is coded in FHIR: LOINC codings (the first is the main one), unit, parts."""

    codes: tuple[Code, ...]
    unit: str
    category: tuple[str, str] = ("vital-signs", "Vital Signs")
    components: tuple[Code, ...] = ()  # one code per value, when a row has several


LOINC: dict[str, StreamCode] = {
    "hr": StreamCode((("8867-4", "Heart rate"),), "/min"),
    "spo2": StreamCode(
        (
            ("2708-6", "Oxygen saturation in Arterial blood"),
            ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
        ),
        "%",
    ),
    "temp": StreamCode((("8310-5", "Body temperature"),), "Cel"),
    "bp": StreamCode(
        (("85354-9", "Blood pressure panel with all children optional"),),
        "mm[Hg]",
        components=(
            ("8480-6", "Systolic blood pressure"),
            ("8462-4", "Diastolic blood pressure"),
        ),
    ),
    "rr": StreamCode((("9279-1", "Respiratory rate"),), "/min"),
    "steps": StreamCode(
        (("55423-8", "Number of steps in unspecified time Pedometer"),),
        "{steps}",
        category=("activity", "Activity"),
    ),
}


def iso(t_ms: int) -> str:
    """Unix ms as ISO 8601 UTC with milliseconds: ``2026-11-21T10:00:00.000Z`` (clamped to
    the years 1970..9999, which is all a FHIR dateTime can say)."""
    t_ms = min(max(t_ms, 0), _LAST_MS)
    return (_EPOCH + timedelta(milliseconds=t_ms)).isoformat(timespec="milliseconds") + "Z"


def _number(v: float) -> str:
    text = f"{v:.3f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def format_value(value: tuple[float, ...]) -> str:
    """``120/80`` for several values; integers without ``.0``; else up to 3 decimals."""
    return "/".join(_number(v) for v in value)


@dataclass(frozen=True, slots=True)
class Pseudonyms:
    """What an export under one pseudonymous grant calls the patient, its devices and the
    grant: stable for the grant, unlinkable across grants, and not computable without
    ``key`` (a per-grant secret only the grantee holds), so no node, and no one who has
    read the grants and enrolments on chain, can map one back to a key."""

    key: bytes  # 32 secret bytes

    def __post_init__(self) -> None:
        if len(self.key) != 32:
            raise ValueError("a pseudonym key is 32 bytes")

    def _of(self, person: bytes, value: bytes) -> str:
        digest = nacl.hash.blake2b(
            value, digest_size=16, key=self.key, person=person, encoder=nacl.encoding.HexEncoder
        )
        return "pseud-" + digest.decode()

    def patient(self, patient: bytes) -> str:
        return self._of(b"mh/pseud/patient", patient)

    def device(self, device: bytes) -> str:
        return self._of(b"mh/pseud/device", device)

    def grant(self, grant_id: bytes) -> str:
        return self._of(b"mh/pseud/grant", grant_id)


_TABLE = (("time", 24), ("stream", 6), ("value", 9), ("unit", 7), ("device", 8), ("subject", 16))


def _line(cells: Iterable[str]) -> str:
    return "  ".join(c.ljust(w) for c, (_, w) in zip(cells, _TABLE, strict=True)).rstrip() + "\n"


def write_table(rows: Iterable[Row], out: TextIO) -> int:
    """A fixed-width table for people, one line per row after a header; returns the rows.

    A cell wider than its column (a long stream name or value) shifts the rest of its own
    line only; columns stay at least two spaces apart.
    """
    out.write(_line(name for name, _ in _TABLE))
    n = 0
    for r in rows:
        cells = (iso(r.t_ms), r.stream, format_value(r.value), r.unit, r.device[:8], r.subject[:16])
        out.write(_line(cells))
        n += 1
    return n


CSV_FIELDS = ("time", "t_ms", "subject", "stream", "value", "unit", "device")


def write_csv(rows: Iterable[Row], out: TextIO) -> int:
    """CSV with a ``CSV_FIELDS`` header (open files with ``newline=""``); returns the rows."""
    w = csv.writer(out)
    w.writerow(CSV_FIELDS)
    n = 0
    for r in rows:
        w.writerow(
            (iso(r.t_ms), r.t_ms, r.subject, r.stream, format_value(r.value), r.unit, r.device)
        )
        n += 1
    return n


def _loinc(code: Code) -> Json:
    return {"system": LOINC_SYSTEM, "code": code[0], "display": code[1]}


def _concept(stream: str) -> Json:
    known = LOINC.get(stream)
    if known is None:
        return {"text": stream}
    return {"coding": [_loinc(c) for c in known.codes], "text": known.codes[0][1]}


def _quantity(v: float, unit: str) -> Json:
    return {"value": v, "unit": unit, "system": UCUM_SYSTEM, "code": unit}


def _identifier(system: str, key: bytes) -> Json:
    return {"identifier": {"system": system, "value": key.hex()}}


def observation(row: Row, *, id: str) -> Json:
    """The row as a FHIR R4 Observation; ValueError if its unit or value count is wrong."""
    known = LOINC.get(row.stream)
    values = len(known.components) if known and known.components else 1
    if len(row.value) != values:
        raise ValueError(f"stream {row.stream!r}: {len(row.value)} values, expected {values}")
    if known and row.unit != known.unit:
        raise ValueError(f"stream {row.stream!r}: unit {row.unit!r}, LOINC expects {known.unit!r}")
    obs: Json = {"resourceType": "Observation", "id": id, "status": "final"}
    if known:
        code, display = known.category
        obs["category"] = [
            {"coding": [{"system": CATEGORY_SYSTEM, "code": code, "display": display}]}
        ]
    obs |= {
        "code": _concept(row.stream),
        "subject": {"reference": f"Patient/{row.subject}"},
        "effectiveDateTime": iso(row.t_ms),
        "device": {"reference": f"Device/{row.device}"},
    }
    if known and known.components:
        obs["component"] = [
            {"code": {"coding": [_loinc(c)], "text": c[1]}, "valueQuantity": _quantity(v, row.unit)}
            for c, v in zip(known.components, row.value, strict=True)
        ]
    else:
        obs["valueQuantity"] = _quantity(row.value[0], row.unit)
    return obs


def _bundle(resources: Iterable[Json], now_ms: int | None) -> Json:
    bundle: Json = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": iso(time.time_ns() // 1_000_000 if now_ms is None else now_ms),
    }
    entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]
    if entries:  # FHIR JSON has no empty arrays
        bundle["entry"] = entries
    return bundle


def observation_id(row: Row) -> str:
    """The Observation id of a sample: a UUIDv5 of what identifies it."""
    return str(uuid.uuid5(_IDS, f"obs/{row.subject}/{row.stream}/{row.t_ms}/{row.device}"))


def observations_bundle(rows: Iterable[Row], *, now_ms: int | None = None) -> Json:
    """A FHIR ``collection`` Bundle of one Observation per row, in input order."""
    return _bundle((observation(r, id=observation_id(r)) for r in rows), now_ms)


def consent(
    grant: Grant,
    grant_id: bytes,
    *,
    revoked: bool,
    subject: str,
    names: Pseudonyms | None = None,
) -> Json:
    """The grant as a FHIR R4 Consent: ``grantee`` may read these streams in this period.
    With ``names`` (a pseudonymous export) it is identified by the grant's pseudonym, not
    by the grant id, which every node maps to the patient."""
    period = {"start": iso(grant.from_ms)}
    if not grant.open:
        period["end"] = iso(grant.until_ms)
    system, gid = (
        (GRANT_SYSTEM, grant_id.hex())
        if names is None
        else (
            PSEUDONYM_SYSTEM,
            names.grant(grant_id),
        )
    )
    return {
        "resourceType": "Consent",
        "id": gid,
        "identifier": [{"system": system, "value": gid}],
        "status": "inactive" if revoked else "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                    "display": "Privacy Consent",
                }
            ]
        },
        "category": [{"coding": [_loinc(("59284-0", "Patient Consent"))]}],
        "patient": {"reference": f"Patient/{subject}"},
        "dateTime": iso(grant.ts_ms),
        "policyRule": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                    "code": "OPTIN",
                    "display": "opt-in",
                }
            ]
        },
        "provision": {
            "type": "permit",
            "period": period,
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "IRCP",
                                "display": "information recipient",
                            }
                        ]
                    },
                    "reference": _identifier(KEY_SYSTEM, grant.grantee),
                }
            ],
            "code": [_concept(s.stream) for s in grant.streams],
        },
    }


def audit_event(log: AnyAccessLog, *, id: str | None = None) -> Json:
    """The access log as a FHIR R4 AuditEvent: who searched whose stream, and what came of it."""
    details = [
        ("stream", log.stream),
        ("window", f"{iso(log.from_ms)}/{iso(log.to_ms)}"),
        ("readings", str(log.readings)),
    ]
    if isinstance(log, AccessLogV2):
        # verified: the reader's own signature on the request is in the log; forged: it
        # does not verify (an L1 log carries none: the node's word alone)
        details.append(("request", request_status(log)))
        if log.count > 1:
            details.append(("count", str(log.count)))
    if log.grant:
        details.append(("grant", log.grant.hex()))
    event: Json = {
        "resourceType": "AuditEvent",
        "id": id or str(uuid.uuid5(_IDS, f"audit/{log.request.hex()}")),
        "type": {
            "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "code": "rest",
            "display": "RESTful Operation",
        },
        "subtype": [
            {
                "system": "http://hl7.org/fhir/restful-interaction",
                "code": "search-type",
                "display": "search-type",
            }
        ],
        "action": "R",
        "recorded": iso(log.ts_ms),
        "outcome": "0" if log.outcome == "read" else "4",
    }
    if log.reason:  # FHIR strings are never empty
        event["outcomeDesc"] = log.reason.decode("utf-8", errors="replace")
    event |= {
        "agent": [
            {"who": _identifier(KEY_SYSTEM, log.reader), "requestor": True},
            {"who": _identifier(NODE_SYSTEM, log.node), "requestor": False},
        ],
        "source": {"observer": _identifier(NODE_SYSTEM, log.node)},
        "entity": [
            {
                "what": {"reference": f"Patient/{log.patient.hex()}"},
                "detail": [{"type": t, "valueString": v} for t, v in details],
            }
        ],
    }
    return event


def access_log_doc(log: AnyAccessLog) -> Json:
    """The access log as plain JSON (``patient audit --format json``, the patient view);
    ``request`` says whether the reader's signed request in it verifies
    (:func:`meshhealth.sharing.audit.request_status`), ``count`` how many refusals a
    summary stands for."""
    return {
        "ts_ms": log.ts_ms,
        "reader": log.reader.hex(),
        "stream": log.stream,
        "from_ms": log.from_ms,
        "to_ms": log.to_ms,
        "outcome": log.outcome,
        "reason": log.reason.decode(errors="replace"),
        "grant": log.grant.hex() or None,
        "readings": log.readings,
        "node": log.node.hex(),
        "request": request_status(log),
        "count": getattr(log, "count", 1),
    }


def audit_bundle(logs: Iterable[AnyAccessLog], *, now_ms: int | None = None) -> Json:
    """A FHIR ``collection`` Bundle of one AuditEvent per access log, in input order."""
    return _bundle((audit_event(log) for log in logs), now_ms)


__all__ = [
    "LOINC",
    "Pseudonyms",
    "Row",
    "StreamCode",
    "access_log_doc",
    "audit_bundle",
    "audit_event",
    "consent",
    "format_value",
    "iso",
    "observation",
    "observation_id",
    "observations_bundle",
    "write_csv",
    "write_table",
]
