"""The OpenAPI document: valid, complete, and true of the running server.

schemathesis generates requests from the document, valid and invalid ones, for
every operation, and sends them to a real server; no answer may be a 5xx, and
each must have a status, a content type and a body the document declares.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.internal.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from substantial.http._api import Api

from .conftest import Served

# schemathesis 3 (a test tool) uses jsonschema names jsonschema deprecated; not our code.
pytestmark = [
    pytest.mark.filterwarnings("ignore:jsonschema.RefResolver is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:schemathesis"),
]

EXAMPLES = 60  # per operation and generation method: the whole fuzz stays well under a minute


def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx on any input."""
    assert response.status_code < 500, f"server error {response.status_code}: {response.text}"
    return None


CHECKS = (
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
)
ROUTES = {
    ("GET", "/healthz"),
    ("GET", "/api/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/api/workflows"),
    ("GET", "/api/runs"),
    ("POST", "/api/runs"),
    ("GET", "/api/runs/{run_id}"),
    ("GET", "/api/runs/{run_id}/history"),
    ("GET", "/api/runs/{run_id}/logs"),
    ("POST", "/api/runs/{run_id}/events/{name}"),
    ("POST", "/api/runs/{run_id}/cancel"),
    ("POST", "/api/runs/{run_id}/resume"),
    ("POST", "/api/runs/{run_id}/fork"),
    ("GET", "/api/workers"),
}


async def document(api: Served) -> dict[str, Any]:
    r = await api.client.get("/api/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc: dict[str, Any] = r.json()
    return doc


async def test_the_document_is_valid_and_names_every_route(api: Served) -> None:
    doc = await document(api)
    validate(doc)
    found = {(m.upper(), path) for path, ops in doc["paths"].items() for m in ops}
    assert found == ROUTES
    served = Api(api.conductor, None).routes()
    routes = {(m, r.path) for r in served for m in r.methods or () if m != "HEAD"}
    assert routes == ROUTES  # the document and the app name the same routes


def fuzz(doc: dict[str, Any], base_url: str) -> int:
    """Every operation, positive and negative cases; returns how many were sent."""
    methods = [
        schemathesis.DataGenerationMethod.positive,
        schemathesis.DataGenerationMethod.negative,
    ]
    schema = schemathesis.from_dict(doc, base_url=base_url, data_generation_methods=methods)
    sent = 0
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def check(case: Any) -> None:
            nonlocal sent
            response = case.call(base_url=base_url, timeout=30)
            sent += 1
            case.validate_response(response, checks=CHECKS)

        check()
    return sent


async def test_fuzzing_every_route_gets_no_server_error(any_api: Served) -> None:
    api = any_api
    for body in ({"workflow": "approval", "run_id": "r-1"}, {"workflow": "double"}):
        assert (await api.client.post("/api/runs", json=body)).status_code == 201
    doc = await document(api)
    sent = await asyncio.to_thread(fuzz, doc, api.url)
    assert sent >= len(ROUTES) * 5
    assert (await api.client.get("/healthz")).status_code == 200


def test_with_a_token_the_document_says_so() -> None:
    from substantial.http._openapi import document as build

    doc = build(root_path="/ops", secured=True)
    validate(doc)
    assert doc["servers"] == [{"url": "/ops"}]
    assert doc["security"] == [{"bearer": []}]
    assert doc["paths"]["/healthz"]["get"]["security"] == []
    assert doc["paths"]["/metrics"]["get"]["security"] == []
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert ("401" in op["responses"]) == (path not in ("/healthz", "/metrics"))
