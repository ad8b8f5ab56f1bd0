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
whose nonce it has not seen inside that window, so a captured request
cannot be replayed to it, and, because the audience is signed, not to
another node either.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping

import nacl.exceptions
import nacl.signing

from meshhealth.crypto.hashing import h
from meshhealth.errors import RemoteError
from meshhealth.wire.codec import signing_bytes

HEADERS = ("X-MH-Key", "X-MH-Time", "X-MH-Nonce", "X-MH-Signature")
TAG = "RQ1"


class RequestAuthError(RemoteError):
    """A request whose signature is missing, malformed, stale, replayed or wrong."""


def request_bytes(
    method: str, path: str, body: bytes, t_ms: int, nonce: bytes, audience: bytes
) -> bytes:
    return signing_bytes(TAG, [method.upper(), path, h(body), t_ms, nonce, audience])


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
    """Checks signed requests for one node: clock window and nonces seen inside it."""

    def __init__(self, audience: bytes, *, window_ms: int = 30_000, max_nonces: int = 200_000):
        self.audience, self.window_ms, self.max_nonces = audience, window_ms, max_nonces
        self._seen: OrderedDict[bytes, int] = OrderedDict()  # nonce -> when it expires

    def verify(
        self, method: str, path: str, body: bytes, headers: Mapping[str, str], now_ms: int
    ) -> bytes:
        """The signer's public key, or :class:`RequestAuthError` saying what is wrong."""
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
        self._expire(now_ms)
        if nonce in self._seen:
            raise RequestAuthError("replayed request")
        try:
            nacl.signing.VerifyKey(key).verify(
                request_bytes(method, path, body, t_ms, nonce, self.audience), sig
            )
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
            raise RequestAuthError("bad request signature") from exc
        if len(self._seen) >= self.max_nonces:
            raise RequestAuthError("too many signed requests in the window; retry shortly")
        self._seen[nonce] = t_ms + 2 * self.window_ms
        return key

    def _expire(self, now_ms: int) -> None:
        while self._seen and next(iter(self._seen.values())) <= now_ms:
            self._seen.popitem(last=False)
