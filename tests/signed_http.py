"""Signed GETs to a real node from a test, as :class:`NodeClient` makes them (urllib)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from meshhealth.crypto.keys import Identity
from meshhealth.net.signed_request import sign_request


def node_id(base: str) -> bytes:
    with urllib.request.urlopen(f"{base.rstrip('/')}/v1/status", timeout=10) as r:
        return bytes.fromhex(json.loads(r.read())["node"])


def signed_headers(who: Identity, base: str, path: str) -> dict[str, str]:
    return sign_request(
        who.signing, "GET", path, b"", audience=node_id(base), t_ms=time.time_ns() // 10**6
    )


def signed_raw(who: Identity | None, base: str, path: str) -> tuple[int, bytes]:
    """(status, body) of ``GET path`` signed by ``who`` (unsigned if None), whatever the status."""
    headers = {} if who is None else signed_headers(who, base, path)
    req = urllib.request.Request(base.rstrip("/") + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def signed_json(who: Identity, base: str, path: str) -> Any:
    """The JSON answer of a signed GET that must succeed."""
    status, body = signed_raw(who, base, path)
    assert status == 200, (status, body[:300])
    return json.loads(body)
