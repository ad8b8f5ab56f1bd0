"""Signed requests: who signed, for which node, when, and only once (pure core)."""

from __future__ import annotations

import nacl.signing
import pytest

from meshhealth.errors import RateLimited
from meshhealth.net.signed_request import ReplayGuard, RequestAuthError, sign_request

NODE, OTHER = b"\1" * 32, b"\2" * 32
T = 1_800_000_000_000


def signed(key: nacl.signing.SigningKey, **kw: object) -> dict[str, str]:
    args: dict = {"audience": NODE, "t_ms": T} | kw  # type: ignore[type-arg]
    return sign_request(key, "GET", "/v1/patients/ab/readings?stream=hr", b"", **args)


def test_a_signed_request_names_its_signer_once() -> None:
    key = nacl.signing.SigningKey.generate()
    guard = ReplayGuard(NODE)
    hdrs = signed(key)
    path = "/v1/patients/ab/readings?stream=hr"
    assert guard.verify("GET", path, b"", hdrs, T + 5) == bytes(key.verify_key)
    with pytest.raises(RequestAuthError, match="replayed"):
        guard.verify("GET", path, b"", hdrs, T + 6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"method": "POST"}, "bad request signature"),
        ({"path": "/v1/patients/ab/readings?stream=spo2"}, "bad request signature"),
        ({"body": b"x"}, "bad request signature"),
        ({"now": T + 31_000}, "away from our clock"),
        ({"now": T - 31_000}, "away from our clock"),
    ],
)
def test_anything_changed_or_late_is_refused(change: dict, reason: str) -> None:  # type: ignore[type-arg]
    key = nacl.signing.SigningKey.generate()
    hdrs = signed(key)
    req = {"method": "GET", "path": "/v1/patients/ab/readings?stream=hr", "body": b"", "now": T}
    req |= change
    with pytest.raises(RequestAuthError, match=reason):
        ReplayGuard(NODE).verify(req["method"], req["path"], req["body"], hdrs, req["now"])


def test_a_request_for_another_node_or_with_bad_headers_is_refused() -> None:
    key = nacl.signing.SigningKey.generate()
    path = "/v1/patients/ab/readings?stream=hr"
    with pytest.raises(RequestAuthError, match="bad request signature"):
        ReplayGuard(NODE).verify("GET", path, b"", signed(key, audience=OTHER), T)
    with pytest.raises(RequestAuthError, match="missing"):
        ReplayGuard(NODE).verify("GET", path, b"", {}, T)
    for k, v in (("X-MH-Key", "zz"), ("X-MH-Nonce", "00"), ("X-MH-Time", "soon")):
        with pytest.raises(RequestAuthError, match="malformed"):
            ReplayGuard(NODE).verify("GET", path, b"", signed(key) | {k: v}, T)


def test_nonces_expire_with_the_window_and_the_cache_is_bounded() -> None:
    key = nacl.signing.SigningKey.generate()
    path = "/v1/patients/ab/readings?stream=hr"
    guard = ReplayGuard(NODE, window_ms=1_000, max_nonces=2)
    for i in range(2):
        guard.verify("GET", path, b"", signed(key, t_ms=T + i), T + i)
    with pytest.raises(RateLimited, match="too many"):
        guard.verify("GET", path, b"", signed(key, t_ms=T + 2), T + 2)
    # past twice the window the old nonces are forgotten: room again (a replay of them is
    # refused by the clock check instead)
    guard.verify("GET", path, b"", signed(key, t_ms=T + 2_500), T + 2_500)


def test_one_key_filling_the_nonce_cache_does_not_lock_out_another() -> None:
    """Issue 11 #5: the cache once refused everyone when full; now only the heavy key."""
    flood, other = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    path = "/v1/patients/ab/readings?stream=hr"
    guard = ReplayGuard(NODE, window_ms=1_000, max_nonces=10, per_key=4, per_source=8)
    refused = 0
    for i in range(16):  # twice the whole cache, from one key
        try:
            guard.verify("GET", path, b"", signed(flood, t_ms=T + i), T + i, "10.0.0.1")
        except RateLimited:
            refused += 1
    assert refused == 12 and len(guard.nonces) == 4
    for i in range(4):  # another key, even from the same source, is still served
        guard.verify("GET", path, b"", signed(other, t_ms=T + 20 + i), T + 20 + i, "10.0.0.1")
    # many keys from one source stop at the source's share; other sources go on
    for _ in range(8):
        k = nacl.signing.SigningKey.generate()
        try:
            guard.verify("GET", path, b"", signed(k, t_ms=T + 30), T + 30, "10.0.0.1")
        except RateLimited as exc:
            assert "source" in str(exc)
    newcomer = nacl.signing.SigningKey.generate()
    guard.verify("GET", path, b"", signed(newcomer, t_ms=T + 40), T + 40, "10.0.0.2")
    assert len(guard.nonces) == 9 and guard.nonces.bytes_held <= 10 * 256  # never past the total
