"""Checking an access log against the reader's own signed request (pure).

An ``L2`` access log carries the request its reader signed
(:class:`meshhealth.wire.AccessLogV2`).  :func:`request_status` checks that
the reader's key signed it for the node that logged it, and that it asked
for what the log says: the patient in the path, and the stream and window
in the query.  A node that invents "reader X read this" cannot produce that
signature; what it can still misreport is what it answered (the count of
readings), never that the reader asked.

* ``verified``: the reader signed exactly this request for this node;
* ``forged``: the request does not verify or does not match the log;
* ``unsigned``: an ``L1`` log, from before logs carried the request (kept
  verifying on old chains, but only the node's word).
"""

from __future__ import annotations

from meshhealth.errors import MalformedMessage
from meshhealth.net.signed_request import SignedRequest, signed_target
from meshhealth.wire.types import AccessLog, AccessLogV2, AnyAccessLog

VERIFIED, FORGED, UNSIGNED = "verified", "forged", "unsigned"


def request_of(log: AccessLogV2) -> SignedRequest:
    return SignedRequest(
        log.reader, log.method, log.path, log.body_hash, log.req_ts_ms, log.req_nonce, log.req_sig
    )


def _matches(log: AccessLogV2) -> bool:
    try:  # the same derivation as the node's (a path it would have refused: forged)
        segs, q = signed_target(log.path)
    except MalformedMessage:
        return False
    if log.method != "GET" or len(segs) != 5 or segs[:3] != ["", "v1", "patients"]:
        return False
    try:
        if bytes.fromhex(segs[3]) != log.patient:
            return False
    except ValueError:
        return False
    window = (("from", log.from_ms), ("to", log.to_ms))
    if segs[4] == "audit":
        return log.stream == "audit" and all(k not in q or _int(q[k]) == v for k, v in window)
    return (
        segs[4] == "readings"
        and q.get("stream") == log.stream
        and all(k in q and _int(q[k]) == v for k, v in window)
    )


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def request_status(log: AnyAccessLog) -> str:
    """``verified``, ``forged`` or ``unsigned`` (see the module's docstring)."""
    if isinstance(log, AccessLog):
        return UNSIGNED
    if not _matches(log) or not request_of(log).valid_for(log.node):
        return FORGED
    return VERIFIED
