"""The OpenAPI document: it names every route the app registers, and is valid 3.1."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

import meshhealth
from meshhealth.net.api import make_app
from meshhealth.net.openapi import document
from meshhealth.net.signed_request import HEADERS
from meshhealth.wire.types import CONTROL_TYPES

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
SIGNED = [
    "/v1/patients/{key}/readings",
    "/v1/patients/{key}/audit",
    "/v1/patients/{key}/grants",
    "/v1/grantees/{key}/grants",
    "/v1/patients/{key}/enrollments",
    "/v1/chains/{node}/{height}",
    "/v1/chains/{node}/{height}/proof/{index}",
]


async def _never(_request: object) -> None:  # make_app only registers it
    raise AssertionError


def operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): op
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def resolve(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_registered_route_is_documented_and_nothing_else() -> None:
    app = make_app(SimpleNamespace(gossip=SimpleNamespace(handle=_never)))
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    assert routes == set(operations(document()))


def test_the_document_is_valid_openapi_3_1() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    doc = document()
    validator.validate(doc, cls=validator.OpenAPIV31SpecValidator)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["version"] == meshhealth.__version__
    assert json.loads(json.dumps(doc)) == doc  # served as-is by GET /v1/openapi.json


def test_every_operation_answers_something_and_has_an_id() -> None:
    ops = operations(document())
    assert all(op["responses"] for op in ops.values())
    ids = [op["operationId"] for op in ops.values()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("path", SIGNED)
def test_signed_reads_declare_the_signature_headers_and_refusals(path: str) -> None:
    doc = document()
    op = doc["paths"][path]["get"]
    params = [resolve(doc, p["$ref"]) if "$ref" in p else p for p in op["parameters"]]
    headers = {p["name"] for p in params if p["in"] == "header" and p["required"]}
    assert headers == set(HEADERS)
    assert {"200", "400", "401", "403"} <= set(op["responses"])
    scheme = next(iter(op["security"][0]))
    assert "X-MH-Nonce" in doc["components"]["securitySchemes"][scheme]["description"]


def test_only_the_signed_reads_and_raw_blocks_need_a_signature() -> None:
    signed = {path for (_, path), op in operations(document()).items() if op.get("security")}
    assert signed == set(SIGNED)


def test_submitting_names_every_control_transaction() -> None:
    description = document()["paths"]["/v1/tx"]["post"]["description"]
    for tag in {*CONTROL_TYPES, "K1"}:  # K1 Rechain: being added
        assert f"`{tag}`" in description
