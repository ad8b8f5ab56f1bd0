"""Stateless checks of raw reading payloads, run in worker processes.

Ed25519 verification dominates the cost of a reading (~40 µs), and in one
process the MQTT event loop would wait on the GIL, so the node ships chunks
of raw payloads to a process pool.  A worker returns, per payload, either
``(reason,)`` or the validated field tuple that rebuilds the
:class:`Reading` in the parent without decoding again.
"""

from __future__ import annotations

from typing import Any

import nacl.bindings
import nacl.exceptions

from meshhealth.chain.merkle import is_pruned
from meshhealth.errors import MalformedMessage, RemoteError
from meshhealth.wire import Reading, decode_entry
from meshhealth.wire.codec import peek_tag
from meshhealth.wire.types import MAX_READING

Result = tuple[Any, ...]


def check_one(payload: bytes) -> Result:
    if len(payload) > MAX_READING:
        return ("oversized",)
    try:
        r = Reading.decode(payload)
    except MalformedMessage:
        return ("malformed",)
    try:
        nacl.bindings.crypto_sign_open(r.sig + r.signing_bytes(), r.device)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
        return ("bad_signature",)
    return (
        None,
        r.device,
        r.patient,
        r.stream,
        r.seq,
        r.t_ms,
        r.span_ms,
        r.chain_id,
        r.epoch,
        r.nonce,
        r.ciphertext,
        r.sig,
    )


def check_chunk(payloads: list[bytes]) -> list[Result]:
    return [check_one(p) for p in payloads]


def rebuild(result: Result) -> Reading:
    return Reading(*result[1:])


def check_block_entry(raw: bytes) -> Result:
    """A block entry, checked: ``(reason,)``; ``(None, *fields)`` for a valid reading (as
    :func:`check_one`, so the parent rebuilds it without decoding); ``(None,)`` for any
    other valid entry."""
    if is_pruned(raw):
        return (None,)  # erased: only its leaf hash is left, which the Merkle root covers
    try:
        if peek_tag(raw) == "R1":
            return check_one(raw)
        decode_entry(raw).verify()
    except MalformedMessage:
        return ("malformed",)
    except RemoteError:
        return ("bad_signature",)
    return (None,)


def check_entries(entries: list[bytes]) -> list[Result]:
    return [check_block_entry(e) for e in entries]
