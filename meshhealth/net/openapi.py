"""The OpenAPI 3.1 description of the node's HTTP API (:mod:`meshhealth.net.api`).

:func:`document` builds it as plain data; ``GET /v1/openapi.json`` serves it, and
``tests/test_openapi.py`` checks that it names exactly the routes ``make_app`` registers.
"""

from __future__ import annotations

from typing import Any

import meshhealth
from meshhealth.net.metrics import CONTENT_TYPE as METRICS_TYPE
from meshhealth.net.metrics import FAMILIES
from meshhealth.net.signed_request import HEADERS, TAG
from meshhealth.wire.codec import DOMAIN
from meshhealth.wire.types import MAX_CONTROL, MAX_QUERY_MS

JSON, MSGPACK, TEXT = "application/json", "application/msgpack", "text/plain"
SIGNED = "signedRequest"  # the security scheme of the signed reads
MAX_MS = (1 << 63) - 1
MAX_U64 = (1 << 64) - 1

Doc = dict[str, Any]

SIGNING = f"""\
Reading a patient's readings or audit trail, the grants naming a patient or a grantee,
a patient's enrolments, and (for authorities only) raw blocks and proofs needs a request
signed with the reader's Ed25519 key. Four headers carry the signature (an `apiKey`
scheme cannot express it, so each signed operation also declares them as header
parameters):

| header | value |
|---|---|
| `X-MH-Key` | the reader's Ed25519 public key, 64 hex |
| `X-MH-Time` | Unix ms when the request was signed, decimal |
| `X-MH-Nonce` | 16 random bytes, 32 hex, fresh for every request |
| `X-MH-Signature` | the Ed25519 signature, 128 hex |

The signed message is the domain tag `{DOMAIN.decode()}{TAG}`, a zero byte, then the
canonical msgpack (str for text, bin for bytes, smallest integer forms) of the array
`[method, target, digest, time, nonce, audience]`:

* `method`: the HTTP method in upper case;
* `target`: the path *with its query string*, exactly as sent (percent-encoding kept);
* `digest`: BLAKE2b-256 (32 bytes) of the request body (of the empty body for a GET);
* `time`: the `X-MH-Time` value, as an integer;
* `nonce`: the 16 nonce bytes;
* `audience`: the 32-byte public key of the node addressed (`node` in `GET /v1/status`),
  so a request signed for one node is refused by every other.

A node answers 401 (reason `unauthenticated`) when a header is missing or malformed,
when the request was signed more than 30 s away from its clock, when the nonce was
already used (a nonce is never accepted twice), when the signature does not verify,
or when it holds too many nonces of the current window (retry shortly). A request
signed correctly but not allowed by the access state is answered 403. Every signed read
of readings or of an audit trail the node answers, allowed or refused with 403, is
recorded as an AccessLog (`L1`) in its next block; the listings and raw blocks are not
logged (they are refused to everyone but the party concerned and the authorities)."""

OVERVIEW = """\
The HTTP API of a MeshHealth node: one edge node of a peer-to-peer network that
stores patients' wearable vital signs, end-to-end encrypted, in signed hash-linked
blocks, and shares them only as the patient's signed grants allow.

Binary bodies are msgpack arrays whose first element is a type tag: `R1` Reading,
`E1` EnrollDevice, `G1` Grant, `V1` Revoke, `X1` Erase, `K1` Rechain, `L1` AccessLog,
`B1` BlockHeader. Keys and hashes are 32 bytes, written as 64 lowercase hex in JSON and
paths. Times are Unix milliseconds. Every error the API itself returns is JSON
`{"error": message, "reason": label}`, except that a malformed key or time in the URL
is refused with a plain-text 400.

## Signed requests

"""


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict[str, str]:
    return _ref("schemas", name)


def _object(properties: dict[str, Any], description: str = "") -> Doc:
    """A JSON object schema with every listed property required."""
    doc: Doc = {"type": "object", "required": list(properties), "properties": properties}
    if description:
        doc["description"] = description
    return doc


def _counts(*names: str, **more: Doc) -> Doc:
    """An object of non-negative integer counters, and ``more`` properties."""
    return _object({n: {"type": "integer", "minimum": 0} for n in names} | more)


def _described(schema: Doc, description: str) -> Doc:
    return schema | {"description": description}


def _hex(digits: int) -> Doc:
    return {"type": "string", "pattern": f"^[0-9a-f]{{{digits}}}$"}


# --- parameters and responses ------------------------------------------------------------


def _param(where: str, name: str, schema: Doc, description: str, required: bool) -> Doc:
    return {
        "name": name,
        "in": where,
        "required": required,
        "description": description,
        "schema": schema,
    }


def _path(name: str, schema: Doc, description: str) -> Doc:
    return _param("path", name, schema, description, True)


def _key_path(name: str, description: str) -> Doc:
    return _path(name, _schema("Hex32"), description)


def _query(name: str, schema: Doc, description: str, required: bool = False) -> Doc:
    return _param("query", name, schema, description, required)


def _ms_query(name: str, description: str, required: bool = False) -> Doc:
    schema = {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_QUERY_MS}
    return _query(name, schema, description + " Unix ms, at most year 9999.", required)


def _json(description: str, schema: Doc) -> Doc:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _msgpack(description: str) -> Doc:
    """A binary answer: no schema can describe msgpack, so the description gives the layout."""
    return {"description": description, "content": {MSGPACK: {}}}


def _error(description: str) -> Doc:
    return _json(description, _schema("Error"))


def _limited(description: str) -> Doc:
    """A 429: the JSON error and the seconds to wait in ``Retry-After``."""
    doc = _error(description)
    doc["headers"] = {
        "Retry-After": {
            "description": "Seconds until the request would pass.",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    return doc


def _bad_request(description: str) -> Doc:
    """A 400: JSON from the handler, or plain text for a malformed key or query value."""
    doc = _error(description)
    doc["content"][TEXT] = {"schema": {"type": "string"}}
    return doc


def _operation(
    op_id: str,
    tag: str,
    summary: str,
    description: str,
    responses: dict[str, Doc],
    parameters: list[Doc] | None = None,
    *,
    body: Doc | None = None,
    signed: bool = False,
) -> Doc:
    """One operation; a signed one also gets the signing headers and the 401 answer."""
    params = list(parameters or [])
    if signed:
        params += [_ref("parameters", name) for name in HEADERS]
        responses = responses | {
            "401": _error(
                "The request signature is missing, malformed, stale, replayed or wrong "
                "(reason `unauthenticated`)."
            ),
            "429": _limited(
                "Too many signed requests from this address or by this key, or its share of "
                "the nonce cache is full (reason `rate_limited`)."
            ),
        }
    doc: Doc = {
        "operationId": op_id,
        "tags": [tag],
        "summary": summary,
        "description": description,
        "responses": dict(sorted(responses.items())),
    }
    if params:
        doc["parameters"] = params
    if body:
        doc["requestBody"] = body
    if signed:
        doc["security"] = [{SIGNED: []}]
    return doc


# --- schemas -----------------------------------------------------------------------------


def _schemas() -> dict[str, Doc]:
    hex32, ms = _schema("Hex32"), _schema("UnixMs")
    count = {"type": "integer", "minimum": 0}
    return {
        "Hex32": _described(_hex(64), "32 bytes (a key or a BLAKE2b-256 hash) as lowercase hex."),
        "Hex": {"type": "string", "pattern": "^([0-9a-f]{2})*$", "description": "Bytes as hex."},
        "UnixMs": {
            "type": "integer",
            "format": "int64",
            "minimum": 0,
            "maximum": MAX_MS,
            "description": "Unix time in milliseconds.",
        },
        "StreamName": {
            "type": "string",
            "pattern": "^[a-z][a-z0-9_]{0,15}$",
            "description": "A stream name such as `heart_rate`.",
        },
        "Error": _object(
            {
                "error": {"type": "string", "description": "What went wrong, for people."},
                "reason": {"type": "string", "description": "A short machine-readable label."},
            },
            "Every error the API answers itself.",
        ),
        "TxAccepted": _object(
            {
                "tx": _described(hex32, "BLAKE2b-256 of the transaction (a grant's id)."),
                "status": {"const": "accepted"},
            }
        ),
        "ChainState": _object(
            {
                "height": _described(count, "Height of the chain's head block."),
                "hash": _described(hex32, "Hash of the head block."),
                "confirmed": {
                    "type": "integer",
                    "minimum": -1,
                    "description": "Highest height the authorities confirm (-1: none yet).",
                },
                "faulty": {"type": "boolean", "description": "Its node has equivocated."},
            },
            "One chain of this node's replica.",
        ),
        "Chains": _object(
            {
                "chains": {
                    "type": "array",
                    "items": {
                        "$ref": "#/components/schemas/ChainState",
                        "required": ["node"],
                        "properties": {"node": _described(hex32, "The chain's node.")},
                    },
                }
            }
        ),
        "Status": _object(
            {
                "node": _described(hex32, "This node's public key (the signing audience)."),
                "network": _described(hex32, "The network id."),
                "network_name": {"type": "string"},
                "uptime_s": {"type": "number", "minimum": 0},
                "broker": {"type": "string", "description": "The MQTT broker URL."},
                "mqtt_connected": {"type": "boolean"},
                "ingest": _counts(
                    "received",
                    "accepted",
                    "rejected",
                    "backlog",
                    "backlog_bytes",
                    "pending",
                    "blocks_sealed",
                    "readings_committed",
                    "erased_readings",
                    rejects={
                        "type": "object",
                        "additionalProperties": count,
                        "description": "Rejections by reason.",
                    },
                    commit_seconds={"type": "number", "minimum": 0},
                    height={
                        "type": "integer",
                        "minimum": -1,
                        "description": "Height of this node's own head block (-1: none yet).",
                    },
                ),
                "store": _counts(
                    "map_size",
                    "used_bytes",
                    "readings",
                    "compactions",
                    compact_seconds={"type": "number", "minimum": 0},
                ),
                "enrolled_devices": count,
                "reads": _counts(
                    "access_logs", "auth_failures", "rate_limited", "refusals_unlogged", "nonces"
                ),
                "chains": {
                    "type": "object",
                    "propertyNames": hex32,
                    "additionalProperties": _schema("ChainState"),
                    "description": "Every chain held, by node key.",
                },
                "faulty": {
                    "type": "object",
                    "propertyNames": hex32,
                    "additionalProperties": count,
                    "description": "Nodes caught equivocating, with the height.",
                },
                "gossip": {
                    "type": "object",
                    "description": "Gossip connections (short peer ids), sync state, "
                    "propagation percentiles and counters.",
                },
                "peak_rss_mb": {"type": "number"},
                "pid": {"type": "integer"},
            }
        ),
        "BlockHeader": _object(
            {
                "node": hex32,
                "height": count,
                "prev": _described(hex32, "Hash of the previous block."),
                "ts_ms": ms,
                "root": _described(hex32, "Merkle root of the entries (RFC 9162)."),
                "count": _described(count, "Number of entries."),
            },
            "The main fields of a B1 block header (links and signature omitted).",
        ),
        "Proof": _object(
            {
                "header": _described(_schema("Hex"), "The encoded, signed B1 header."),
                "index": count,
                "size": _described(count, "Number of entries in the block."),
                "entry": {
                    "oneOf": [_schema("Hex"), {"type": "null"}],
                    "description": "The entry as stored; null once erased.",
                },
                "leaf": _described(hex32, "The entry's leaf hash."),
                "path": {"type": "array", "items": hex32, "description": "The audit path."},
            },
            "An entry, its block header and its RFC 9162 inclusion proof.",
        ),
        "Grant": _object(
            {
                "id": _described(hex32, "BLAKE2b-256 of the grant transaction."),
                "patient": hex32,
                "grantee": hex32,
                "streams": {"type": "array", "items": _schema("StreamName")},
                "from_ms": ms,
                "until_ms": {"oneOf": [ms, {"type": "null"}], "description": "null: open."},
                "open": {"type": "boolean"},
                "pseudonymous": {"type": "boolean"},
                "ts_ms": ms,
                "revoked": {"type": "boolean"},
                "tx": _described(_schema("Hex"), "The signed G1 transaction."),
            }
        ),
        "Grants": _object({"grants": {"type": "array", "items": _schema("Grant")}}),
        "Dashboard": _dashboard_schema(),
        "Latency": _object(
            {
                "samples": {
                    "type": "array",
                    "description": "`[chain, height, ms from its seal to its commit here]`",
                    "items": {
                        "type": "array",
                        "prefixItems": [hex32, count, {"type": "number"}],
                        "items": False,
                        "minItems": 3,
                    },
                }
            }
        ),
    }


def _dashboard_schema() -> Doc:
    hex32, ms, count = _schema("Hex32"), _schema("UnixMs"), {"type": "integer", "minimum": 0}
    number, name = {"type": "number", "minimum": 0}, {"type": "string"}
    rates = {"type": "array", "items": number}
    confirmed = {"type": "integer", "minimum": -1}
    return _object(
        {
            "node": _described(hex32, "This node's public key."),
            "name": _described(name, "This node's authority name in the genesis."),
            "network": _object({"id": hex32, "name": name}),
            "now_ms": ms,
            "uptime_s": number,
            "mqtt_connected": {"type": "boolean"},
            "ingest": _counts("received", "readings", "rejected", "backlog", "pending"),
            "store": _counts("used_bytes", "map_size", "readings"),
            "chains": {
                "type": "array",
                "items": _object(
                    {
                        "node": hex32,
                        "name": name,
                        "mine": _described({"type": "boolean"}, "This node's own chain."),
                        "height": count,
                        "confirmed": _described(confirmed, "-1: none yet."),
                        "unconfirmed": _described(count, "Blocks above the confirmed height."),
                        "confirmation_lag_s": _described(
                            number, "Age of the oldest unconfirmed block."
                        ),
                        "missing": _described(count, "Blocks a catch-up still has to bring."),
                        "faulty": {"type": "boolean"},
                    }
                ),
            },
            "peers": {
                "type": "array",
                "items": _object(
                    {
                        "node": hex32,
                        "name": name,
                        "state": {"enum": ["connected", "disconnected", "faulty", "observer"]},
                        "liveness": {"enum": ["alive", "suspect", "dead", "unknown"]},
                    }
                ),
            },
            "history": _object(
                {
                    "interval_s": number,
                    "window_s": number,
                    "t_ms": {
                        "type": "array",
                        "items": ms,
                        "description": "The end of each sampling interval.",
                    },
                    "accepted_per_s": _described(rates, "Readings committed per second."),
                    "rejected_per_s": {
                        "type": "object",
                        "additionalProperties": rates,
                        "description": "Rejections per second, by reason (reasons with "
                        "rejections in the window).",
                    },
                },
                "Ingest rates over the last minutes, one value per sampling interval.",
            ),
            "recent_blocks": {
                "type": "array",
                "description": "The newest blocks over every chain, newest first.",
                "items": _object(
                    {
                        "node": hex32,
                        "name": name,
                        "height": count,
                        "ts_ms": ms,
                        "count": _described(count, "Entries."),
                        "links": _described(count, "Links to other chains' heads."),
                        "confirmed": {"type": "boolean"},
                    }
                ),
            },
        },
        "The node dashboard's data: only what /v1/status and /v1/chains show publicly.",
    )


def _signing_headers() -> dict[str, Doc]:
    """The four ``X-MH-*`` request headers, in :data:`HEADERS` order."""
    headers = [
        (_hex(64), "The reader's Ed25519 public key."),
        (_schema("UnixMs"), "Unix ms when signed; refused over 30 s away from the node's clock."),
        (_hex(32), "16 fresh random bytes; a nonce is never accepted twice."),
        (_hex(128), "Ed25519 signature of the request (see the `signedRequest` scheme)."),
    ]
    return {
        name: _param("header", name, schema, description, True)
        for name, (schema, description) in zip(HEADERS, headers, strict=True)
    }


# --- paths -------------------------------------------------------------------------------


def _paths() -> dict[str, Doc]:
    node = _key_path("node", "The public key of the node whose chain it is.")
    height = _path("height", {"type": "integer", "minimum": 0, "maximum": MAX_U64}, "Height.")
    _not_authority = _error("The signer is not an authority of the network (`not_allowed`).")
    patient = _key_path("key", "The patient's public key.")
    bad_read = "A key is not 64 hex or a time not a Unix ms integer (plain text)"
    return {
        "/v1/tx": {
            "post": _operation(
                "submitTx",
                "transactions",
                "Submit a patient-signed control transaction",
                "Accepted control transactions: `E1` EnrollDevice, `E2` EnrollDevice with an "
                "import window, `G1` Grant, `V1` Revoke, `X1` Erase, `K1` Rechain and `D1` "
                "RemoveDevice, signed by the patient, and `P1` RegisterPatient, signed by an "
                "authority of the network. The signature is the authority, so "
                "the request itself is not signed. The node verifies the transaction, puts "
                "it in its next block and gossips it. What lands on chain is limited in "
                "encoded bytes per source address and per patient key, and by an hourly "
                "budget: one per registered patient, one shared by all unregistered keys "
                "(429 with `Retry-After`).",
                {
                    "202": _json("Accepted for the next block.", _schema("TxAccepted")),
                    "400": _error(
                        "Not a well-formed, canonical control transaction (reason `malformed`)."
                    ),
                    "409": _error("Already known (reason `duplicate_tx`)."),
                    "413": _error(f"Over {MAX_CONTROL} bytes (reason `oversized`)."),
                    "422": _error(
                        "Refused by policy: reason `bad_signature`, `future_timestamp`, "
                        "`bad_tx`, `not_authority` (a `P1` not signed by an authority), "
                        "`grant_quota` or `held_quota` (the patient holds too much)."
                    ),
                    "429": _limited(
                        "Over a limit: reason `rate_limited` (this address or patient key), "
                        "`stranger_budget` (all unregistered keys' hourly budget) or "
                        "`patient_budget` (this registered patient's)."
                    ),
                    "503": _error(
                        "The node's next blocks are full (reason `busy`): nothing was taken "
                        "in; retry after `Retry-After` seconds."
                    ),
                },
                body={
                    "required": True,
                    "description": f"The encoded transaction, at most {MAX_CONTROL} bytes: "
                    "a msgpack array `[tag, ...fields, signature]`.",
                    "content": {MSGPACK: {}},
                },
            )
        },
        "/v1/status": {
            "get": _operation(
                "getStatus",
                "node",
                "Node status",
                "Identity, uptime, ingest, store and gossip counters, and the chains held.",
                {"200": _json("The status.", _schema("Status"))},
            )
        },
        "/v1/chains": {
            "get": _operation(
                "listChains",
                "chains",
                "Chains held",
                "Head, hash and confirmed height of every chain in this node's replica.",
                {"200": _json("The chains.", _schema("Chains"))},
            )
        },
        "/v1/chains/{node}/{height}": {
            "get": _operation(
                "getBlock",
                "chains",
                "One block (authorities only)",
                "A block exactly as stored, or its header's main fields as JSON. Blocks hold "
                "every patient's readings, grants and access logs, so only a request signed "
                "by an authority of the network is answered; everyone else reads through "
                "the signed, logged reads.",
                {
                    "200": {
                        "description": "msgpack `[header, body]`: the encoded `B1` header and "
                        "the encoded body, a msgpack array of the encoded entries (an erased "
                        "entry is kept as its leaf hash). With `format=json`: the header.",
                        "content": {MSGPACK: {}, JSON: {"schema": _schema("BlockHeader")}},
                    },
                    "400": _error(
                        "The key is not 64 hex, the height not an integer in [0, 2^64), or "
                        "`format` not `json` (reason `malformed`)."
                    ),
                    "403": _not_authority,
                    "404": _error("No such block (reason `not_found`)."),
                },
                [
                    node,
                    height,
                    _query("format", {"enum": ["json"]}, "`json` for the header as JSON."),
                ],
                signed=True,
            )
        },
        "/v1/chains/{node}/{height}/proof/{index}": {
            "get": _operation(
                "getProof",
                "chains",
                "Inclusion proof of one entry (authorities only)",
                "An entry, its block header and its RFC 9162 audit path; an erased entry "
                "comes as its leaf hash alone. Only a request signed by an authority of the "
                "network is answered, as for the block itself.",
                {
                    "200": _json("The proof.", _schema("Proof")),
                    "400": _error(
                        "The key is not 64 hex, or a number not an integer in [0, 2^64) "
                        "(reason `malformed`)."
                    ),
                    "403": _not_authority,
                    "404": _error("No such block, or no entry at that index (`not_found`)."),
                },
                [
                    node,
                    height,
                    _path("index", {"type": "integer", "minimum": 0, "maximum": MAX_U64}, "Entry."),
                ],
                signed=True,
            )
        },
        "/v1/patients/{key}/readings": {
            "get": _operation(
                "getReadings",
                "sharing",
                "A patient's readings (signed)",
                "Every reading of one stream whose start time lies in [from, to] and in what "
                "the reader may see: all of it for the patient, the windows of its active "
                "grants for a grantee, nothing up to the patient's erasure. Each reading "
                "comes exactly as stored, with its block header and a Merkle multiproof, so "
                "the reader verifies everything and decrypts locally.",
                {
                    "200": _msgpack(
                        'msgpack `["RS1", next, enrolments, blocks]`: `next` is the `after` '
                        "cursor of the following page (integer) or nil when done; "
                        "`enrolments` the patient's encoded `E1` transactions; `blocks` "
                        "`[[header, [[index, entry], ...], proof], ...]` with the encoded `B1` "
                        "header, the encoded `R1` readings at their indexes, and the "
                        "multiproof hashes."
                    ),
                    "400": _bad_request(
                        f"{bad_read}; the stream not a name, or from after to (reason `malformed`)."
                    ),
                    "403": _error(
                        "Nothing in the range may be read: reason `no_grant`, `revoked`, "
                        "`expired`, `outside_grant` or `erased`."
                    ),
                },
                [
                    patient,
                    _query("stream", _schema("StreamName"), "The stream.", required=True),
                    _ms_query("from", "Start of the range (inclusive).", required=True),
                    _ms_query("to", "End of the range (inclusive).", required=True),
                    _query(
                        "after",
                        {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_MS, "default": 0},
                        "Page cursor: the `next` of the previous answer.",
                    ),
                ],
                signed=True,
            )
        },
        "/v1/patients/{key}/audit": {
            "get": _operation(
                "getAudit",
                "sharing",
                "A patient's audit trail (signed by the patient)",
                "Every access log about the patient logged in [from, to], from every chain "
                "this node holds.",
                {
                    "200": _msgpack(
                        'msgpack `["AU1", [[entry, node, height, index], ...]]`: each '
                        "encoded `L2` AccessLog (carrying the reader's signed request; `L1` "
                        "on older chains) with the chain, height and index of its block "
                        "(an authority checks it with the proof endpoint)."
                    ),
                    "400": _bad_request(f"{bad_read}."),
                    "403": _error("The signer is not the patient (reason `not_patient`)."),
                },
                [
                    patient,
                    _ms_query("from", "Earliest log time (default 0)."),
                    _ms_query("to", "Latest log time (default: no limit)."),
                ],
                signed=True,
            )
        },
        "/v1/patients/{key}/grants": {"get": _grants("listPatientGrants", "patient")},
        "/v1/grantees/{key}/grants": {"get": _grants("listGranteeGrants", "grantee")},
        "/v1/devices/{device}/enrollments": {
            "get": _operation(
                "getEnrollments",
                "sharing",
                "Enrolments of a device",
                "The EnrollDevice transactions naming the device and, per (patient, stream), "
                "the latest Rechain naming it: it unseals its stream keys from them, and "
                "switches to its patient's new key chain. Newest first, at most 1 MiB; "
                "the header `X-MH-Truncated: 1` says some were left out. With `patient`, "
                "only that patient's transactions (what a device asks for: nobody else's "
                "can crowd them out).",
                {
                    "200": _msgpack("msgpack array of the encoded `E1` and `K1` transactions."),
                    "400": _bad_request("A key is not 64 hex."),
                },
                [
                    _key_path("device", "The device's public key."),
                    {
                        "name": "patient",
                        "in": "query",
                        "required": False,
                        "description": "Only this patient's transactions (64 hex).",
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    },
                ],
            )
        },
        "/v1/patients/{key}/enrollments": {
            "get": _operation(
                "getPatientEnrollments",
                "sharing",
                "A patient's enrolments, rechains and device removals (signed by the patient)",
                "Every EnrollDevice, Rechain and RemoveDevice transaction of the patient: "
                "which device may write which key chain, and which no longer writes (the "
                "patient's client reads it to re-seal a new chain to the right devices). It "
                "names every device of the patient, so only the patient (or an authority) "
                "may read it.",
                {
                    "200": _msgpack(
                        "msgpack array of the encoded `E1`/`E2`, `K1` and `D1` transactions."
                    ),
                    "400": _error("The key is not 64 hex (reason `malformed`)."),
                    "403": _error(
                        "The signer is neither the patient nor an authority (`not_allowed`)."
                    ),
                },
                [_key_path("key", "The patient's public key.")],
                signed=True,
            )
        },
        "/v1/network": {
            "get": _operation(
                "getNetwork",
                "node",
                "The network's genesis",
                "Network name, creation time, clock skew bound and authorities; pin it with "
                "`provider fetch --genesis`.",
                {
                    "200": {
                        "description": "The genesis, as TOML.",
                        "content": {"application/toml": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
        "/v1/openapi.json": {
            "get": _operation(
                "getOpenApi",
                "node",
                "This API description",
                "This OpenAPI 3.1 document.",
                {"200": _json("The document.", {"type": "object"})},
            )
        },
        "/v1/gossip": {
            "get": _operation(
                "gossip",
                "gossip",
                "Gossip connection (between nodes only)",
                "A WebSocket upgrade. Both ends then run a mutual handshake (hellos with "
                "fresh challenges, then proofs over both, signed with their authority keys) "
                "and exchange binary gossip frames; a peer failing the handshake is "
                "disconnected.",
                {
                    "101": {"description": "Switched to the WebSocket protocol."},
                    "400": {
                        "description": "Not a WebSocket upgrade request.",
                        "content": {TEXT: {"schema": {"type": "string"}}},
                    },
                },
            )
        },
        "/v1/gossip/latency": {
            "get": _operation(
                "getGossipLatency",
                "gossip",
                "Propagation latency samples",
                "Per remote block: milliseconds from its producer's seal to its commit here "
                "(for benchmarks).",
                {"200": _json("The samples, oldest first.", _schema("Latency"))},
            )
        },
        **_monitoring_paths(),
    }


def _metrics_description() -> str:
    rows = "\n".join(
        f"| `{f.name}` | {f.kind} | {', '.join(f'`{x}`' for x in f.labels)} | {f.help} |"
        for f in FAMILIES
    )
    return (
        "Prometheus text exposition of this node's metrics, read from its state when "
        "scraped, and the usual `process_*` metrics of its process. Counters restart at "
        "zero with the process. Per-chain families are labelled with the chain's node "
        "key (`node`, 64 hex) and its authority name (`name`). The number of samples "
        "inside readings is not counted: it is inside the ciphertext.\n\n"
        "| family | type | labels | meaning |\n|---|---|---|---|\n" + rows
    )


def _monitoring_paths() -> dict[str, Doc]:
    def text(kind: str, description: str) -> Doc:
        return {"description": description, "content": {kind: {"schema": {"type": "string"}}}}

    return {
        "/metrics": {
            "get": _operation(
                "getMetrics",
                "monitoring",
                "Prometheus metrics",
                _metrics_description(),
                {"200": text(METRICS_TYPE, "The metrics, in the Prometheus text format.")},
            )
        },
        "/": {
            "get": _operation(
                "getDashboardPage",
                "monitoring",
                "The node dashboard (a web page)",
                "The network as this node sees it (every chain's height, confirmation and "
                "faults, the peers), its ingest and rejection rates over the last ten "
                "minutes, and the newest blocks with their confirmation. It polls "
                "`GET /v1/dashboard` and shows no vital value and no ciphertext.",
                {"200": text("text/html", "The page.")},
            )
        },
        "/static/{name}": {
            "get": _operation(
                "getStaticFile",
                "monitoring",
                "A file of the web pages",
                "The scripts and style sheets the pages load, packaged with the node.",
                {
                    "200": {
                        "description": "The file.",
                        "content": {
                            k: {"schema": {"type": "string"}}
                            for k in ("text/javascript", "text/css", "text/html")
                        },
                    },
                    "404": _error("No such file (reason `not_found`)."),
                },
                [
                    _path(
                        "name",
                        {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"},
                        "A file name such as `chart.js`.",
                    )
                ],
            )
        },
        "/v1/dashboard": {
            "get": _operation(
                "getDashboard",
                "monitoring",
                "What the dashboard shows",
                "This node's view of the network, its recent ingest rates (sampled every "
                "2 s, ten minutes back) and the newest blocks over every chain.",
                {"200": _json("The dashboard's data.", _schema("Dashboard"))},
            )
        },
    }


def _grants(op_id: str, side: str) -> Doc:
    return _operation(
        op_id,
        "sharing",
        f"Grants naming a {side} (signed by the {side})",
        f"Every grant whose {side} is the key, oldest first. Who shares with whom is itself "
        f"health information, so only the {side} (or an authority) may read it.",
        {
            "200": _json("The grants.", _schema("Grants")),
            "400": _error("The key is not 64 hex (reason `malformed`)."),
            "403": _error(f"The signer is neither the {side} nor an authority (`not_allowed`)."),
        },
        [_key_path("key", f"The {side}'s public key.")],
        signed=True,
    )


def document() -> dict[str, Any]:
    """The OpenAPI 3.1.0 document of every route :func:`meshhealth.net.api.make_app` serves."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MeshHealth node API",
            "version": meshhealth.__version__,
            "description": OVERVIEW + SIGNING,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "transactions", "description": "Patient-signed control transactions."},
            {"name": "node", "description": "This node and its network."},
            {"name": "chains", "description": "Blocks and proofs of the replicated chains."},
            {"name": "sharing", "description": "Readings, audit trails, grants, enrolments."},
            {"name": "gossip", "description": "Node-to-node replication."},
            {"name": "monitoring", "description": "Prometheus metrics and the node dashboard."},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": _signing_headers(),
            "securitySchemes": {
                SIGNED: {
                    "type": "apiKey",
                    "in": "header",
                    "name": "X-MH-Signature",
                    "description": SIGNING,
                }
            },
        },
    }
