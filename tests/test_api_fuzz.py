"""An OpenAPI-driven fuzzer against a real, fresh node process (issue 11 #17).

Schemathesis reads the node's own ``/v1/openapi.json`` and throws generated
requests, valid and invalid, at every operation: no answer may be a 5xx,
every status must be documented for its operation, and every documented
body must conform to its schema.  A fresh node matters: its ``/v1/status``
has no block yet.  Requests that carry all four signature headers are
re-signed, exactly as sent, with the node's own authority key, so the
fuzzer reaches the signed handlers past their signature check (an authority
may read raw blocks; it is refused a patient's readings); the rest answer
401, which every signed operation documents.  Bounded: a few examples per
operation and phase.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import ignored_auth, positive_data_acceptance

from meshhealth.bench.procs import BrokerProcess, NodeProcess
from meshhealth.cli.demo import setup_network
from meshhealth.config import NodeConfig
from meshhealth.crypto.keys import Identity, load_identity
from meshhealth.net.signed_request import HEADERS, sign_request

pytestmark = pytest.mark.integration
UNDESCRIBED = {"POST /v1/tx", "GET /v1/gossip"}
EXAMPLES = 15  # per operation and phase, twice (unsigned, signed): well under a minute


@schemathesis.serializer("application/msgpack")
def _msgpack(_ctx: object, value: object) -> bytes:
    """A generated body as msgpack (bytes as they are): the node must refuse it cleanly."""
    if isinstance(value, bytes):
        return value
    try:
        return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError):
        return repr(value).encode()


MAX_MS = (1 << 63) - 1
WELL_FORMED = {  # the generated signature headers, as the schema describes them
    "X-MH-Key": re.compile("[0-9a-f]{64}"),
    "X-MH-Time": re.compile("[0-9]{1,19}"),
    "X-MH-Nonce": re.compile("[0-9a-f]{32}"),
    "X-MH-Signature": re.compile("[0-9a-f]{128}"),
}


def _well_formed(headers: Any) -> bool:
    if not all(WELL_FORMED[n].fullmatch(str(headers.get(n, ""))) for n in HEADERS):
        return False
    return int(headers["X-MH-Time"]) <= MAX_MS


class SigningSession(requests.Session):
    """Signs, as ``key``, every request whose four signature headers are well formed (a
    request the fuzzer made malformed there stays as it is: it must be refused)."""

    def __init__(self, key: Identity, audience: bytes) -> None:
        super().__init__()
        self.key, self.audience, self.signed = key, audience, 0

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        if _well_formed(request.headers):
            body = request.body or b""
            body = body.encode() if isinstance(body, str) else body
            assert isinstance(body, bytes)
            request.headers.update(
                sign_request(
                    self.key.signing,
                    request.method or "GET",
                    request.path_url,
                    body,
                    audience=self.audience,
                    t_ms=time.time_ns() // 1_000_000,
                )
            )
            self.signed += 1
        return super().send(request, **kwargs)


@pytest.fixture(scope="module")
def fresh_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root: Path = tmp_path_factory.mktemp("fuzz")
    broker = BrokerProcess(root / "broker")
    broker.start()
    cfg = setup_network(root / "net", 1, broker=broker.url)[0]
    node = NodeProcess(cfg.base / "node.toml", root / "node.log", cfg.api.port)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        broker.stop()


@pytest.fixture(scope="module")
def api_schema(fresh_node: NodeProcess) -> schemathesis.BaseSchema:
    loaded = schemathesis.openapi.from_url(f"{fresh_node.url}/v1/openapi.json")
    loaded.config.generation.update(modes=list(schemathesis.GenerationMode))  # valid and not
    return loaded


@pytest.fixture(scope="module")
def authority_session(fresh_node: NodeProcess) -> Iterator[SigningSession]:
    key = load_identity(NodeConfig.load(fresh_node.config_path).key_path)
    with SigningSession(key, bytes.fromhex(fresh_node.status()["node"])) as session:
        yield session


schema = schemathesis.pytest.from_fixture("api_schema")
fuzz_settings = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)


def _excluded(case: schemathesis.Case) -> list[Any]:
    """A body can match the (empty) msgpack schema of POST /v1/tx without being a signed
    transaction, and a GET of /v1/gossip without the WebSocket headers is no upgrade: the
    schema cannot say what a valid request is there, so "valid data is accepted" is not
    checked for them (every other check is)."""
    return [positive_data_acceptance] if case.operation.label in UNDESCRIBED else []


def _ordered_window(case: schemathesis.Case) -> None:
    """OpenAPI cannot say ``from <= to``; an inverted window is a 400, so a generated one
    is put the right way round (a negative case stays as wrong as it was otherwise)."""
    q = case.query
    digits = isinstance(q, dict) and all(str(q.get(k, "")).isdigit() for k in ("from", "to"))
    if digits and int(q["from"]) > int(q["to"]):
        q["from"], q["to"] = q["to"], q["from"]


@pytest.mark.timeout(120)
@schema.parametrize()
@fuzz_settings
def test_the_api_answers_the_fuzzer_as_it_documents(case: schemathesis.Case) -> None:
    """Unsigned: every signed operation answers 401 (or 400 for a malformed path)."""
    _ordered_window(case)
    case.call_and_validate(excluded_checks=_excluded(case))


@pytest.mark.timeout(120)
@schema.parametrize()
@fuzz_settings
def test_the_api_answers_an_authority_fuzzer_as_it_documents(
    case: schemathesis.Case, authority_session: SigningSession
) -> None:
    """Signed as the node's authority when the generated signature headers are well formed:
    the handlers behind the signature check meet the fuzzer too.  (The "unauthenticated is
    refused" check is the unsigned test's: here the session makes the generated
    credentials valid.)"""
    _ordered_window(case)
    case.call_and_validate(
        session=authority_session, excluded_checks=[*_excluded(case), ignored_auth]
    )


def test_the_fuzzer_reached_past_the_signature_checks(authority_session: SigningSession) -> None:
    """Runs after the fuzzers (same module): some of their requests were signed."""
    assert authority_session.signed > 0
