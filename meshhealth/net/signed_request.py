"""Signed HTTP requests, in the spirit of RFC 9421 (pure: no aiohttp here).

A reader proves who it is by signing, with its Ed25519 key, the request
method, the path with its query, a digest of the body, the time, a fresh
nonce and the node it is talking to (the audience), under a domain tag of
its own. Four headers carry it::

    X-MH-Key        the signer's public key (64 hex)
    X-MH-Time       Unix ms when it was signed
    X-MH-Nonce      32 hex characters, fresh per request
    X-MH-Signature  the Ed25519 signature (128 hex)

A node accepts a request signed within ``window_ms`` of its own clock
whose nonce its signer has not used inside that window, so a captured
request cannot be replayed to it, and, because the audience is signed, not
to another node either.  The nonces are kept per signer, and a signer or a
source address over its share is refused, never everyone
(:class:`meshhealth.net.limits.NonceCache`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import nacl.exceptions
import nacl.signing

from meshhealth.crypto.hashing import h
from meshhealth.errors import MalformedMessage, RemoteError
from meshhealth.net.limits import NonceCache
from meshhealth.wire.codec import signing_bytes

HEADERS = ("X-MH-Key", "X-MH-Time", "X-MH-Nonce", "X-MH-Signature")


def signed_target(raw_path: str) -> tuple[list[str], dict[str, str]]:
    """The path segments and the query of a signed request's raw path, derived one way
    for the node that serves it and the patient who later verifies its log: a ``%`` in
    the path or a query key given twice is refused (:class:`MalformedMessage`), so no
    two parsers (the server's: first value, decoded path; another's: last value, raw
    path) can read the one signed path two ways."""
    parts = urlsplit(raw_path)
    if "%" in parts.path:
        raise MalformedMessage("a signed request's path may not be %-encoded")
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = dict(pairs)
    if len(query) != len(pairs):
        raise MalformedMessage("a signed request may not repeat a query parameter")
    return parts.path.split("/"), query


TAG = "RQ1"


class RequestAuthError(RemoteError):
    """A request whose signature is missing, malformed, stale, replayed or wrong."""


def request_bytes(
    method: str, path: str, body: bytes, t_ms: int, nonce: bytes, audience: bytes
) -> bytes:
    return digest_request_bytes(method, path, h(body), t_ms, nonce, audience)


def digest_request_bytes(
    method: str, path: str, body_hash: bytes, t_ms: int, nonce: bytes, audience: bytes
) -> bytes:
    """What a reader signs, from the body's digest (an access log keeps only that)."""
    return signing_bytes(TAG, [method.upper(), path, body_hash, t_ms, nonce, audience])


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A checked signed request: everything its signature covers but the audience."""

    key: bytes
    method: str
    path: str
    body_hash: bytes
    t_ms: int
    nonce: bytes
    sig: bytes

    def valid_for(self, audience: bytes) -> bool:
        """True if ``key`` signed this request for the node ``audience``."""
        try:
            nacl.signing.VerifyKey(self.key).verify(
                digest_request_bytes(
                    self.method, self.path, self.body_hash, self.t_ms, self.nonce, audience
                ),
                self.sig,
            )
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError):
            return False
        return True


def sign_request(
    key: nacl.signing.SigningKey,
    method: str,
    path: str,
    body: bytes,
    *,
    audience: bytes,
    t_ms: int,
    nonce: bytes | None = None,
) -> dict[str, str]:
    """The headers that sign this request for the node ``audience``."""
    nonce = nonce or os.urandom(16)
    sig = key.sign(request_bytes(method, path, body, t_ms, nonce, audience)).signature
    return dict(
        zip(
            HEADERS,
            (bytes(key.verify_key).hex(), str(t_ms), nonce.hex(), sig.hex()),
            strict=True,
        )
    )


class ReplayGuard:
    """Checks signed requests for one node: clock window and nonces seen inside it
    (a :class:`~meshhealth.net.limits.NonceCache`: per key and per source, bounded)."""

    def __init__(
        self,
        audience: bytes,
        *,
        window_ms: int = 30_000,
        max_nonces: int = 65_536,
        per_key: int = 4_096,
        per_source: int = 8_192,
    ):
        self.audience, self.window_ms = audience, window_ms
        self.nonces = NonceCache(
            window_ms, total=max_nonces, per_key=per_key, per_source=per_source
        )

    def verify(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        now_ms: int,
        source: str = "",
    ) -> bytes:
        """The signer's public key, or :class:`RequestAuthError` saying what is wrong
        (:class:`~meshhealth.errors.RateLimited` when its key or source is over its share)."""
        req = self.check(method, path, body, headers, now_ms)
        self.remember(req, source, now_ms)
        return req.key

    def check(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str], now_ms: int
    ) -> SignedRequest:
        """The checked request (not yet remembered: call :meth:`remember` to accept it)."""
        try:
            key_hex, t_text, nonce_hex, sig_hex = (headers[k] for k in HEADERS)
        except KeyError as exc:
            raise RequestAuthError(f"unsigned request: header {exc.args[0]} missing") from exc
        try:
            key, nonce, sig = (
                bytes.fromhex(key_hex),
                bytes.fromhex(nonce_hex),
                bytes.fromhex(sig_hex),
            )
            t_ms = int(t_text)
        except ValueError as exc:
            raise RequestAuthError("malformed signature headers") from exc
        if len(key) != 32 or len(nonce) != 16 or len(sig) != 64:
            raise RequestAuthError("malformed signature headers")
        if abs(now_ms - t_ms) > self.window_ms:
            raise RequestAuthError(f"signed {abs(now_ms - t_ms)} ms away from our clock")
        if self.nonces.seen(key, nonce, now_ms):
            raise RequestAuthError("replayed request")
        req = SignedRequest(key, method.upper(), path, h(body), t_ms, nonce, sig)
        if not req.valid_for(self.audience):
            raise RequestAuthError("bad request signature")
        return req

    def remember(self, req: SignedRequest, source: str, now_ms: int) -> None:
        """Accept a checked request: its nonce is refused from now on, until its time has
        left the window (raises :class:`~meshhealth.net.limits.NonceFull` past a share)."""
        if self.nonces.seen(req.key, req.nonce, now_ms):
            raise RequestAuthError("replayed request")
        self.nonces.add(req.key, req.nonce, req.t_ms, source, now_ms)
