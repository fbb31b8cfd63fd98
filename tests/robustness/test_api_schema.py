"""The HTTP API, property-based from its own OpenAPI document (schemathesis on hypothesis).

Thousands of requests generated from ``GET /v1/openapi.json``, both schema-valid and schema-violating
(schemathesis' positive and negative modes), sent with the right token, another endpoint's token, or
whatever the generator made up, and aimed now and then at real calls (scheduled, queued, final; this
endpoint's and another's). Every answer must be:

* a status the document lists for that operation, never 500;
* the JSON envelope ``{"data": {..., "code": <status>, "code_desc": ...}}`` (never HTML), except the
  raw documents (metrics, media, recordings);
* valid against the document's response schema and headers (``Retry-After``, ``Allow``, ...);
* 404 when one endpoint's token names another endpoint's call.

The quick run goes through Flask's WSGI interface; the slow one through the real gevent server.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from daemon.config import Settings, load_settings
from daemon.store import Call
from tests.conftest import LiveServer, create, data_of
from tests.robustness.helpers import FIGURES

pytestmark = pytest.mark.timeout(900)  # a hang guard: 2,500 requests over HTTP took 195 s on a loaded machine

RAW = {"/metrics", "/media/{name}.wav", "/v1/calls/{callid}/recording", "/v1/openapi.json"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """As tests/conftest.py's, without the per-address limit on failed tokens: thousands of requests
    with made-up tokens come from one address here (test_access.py covers the limit)."""
    return load_settings(environ={}, state_dir=str(tmp_path / "state"), auth_failures_per_minute=0,
                         database_url=f"sqlite:///{tmp_path / 'state' / 'callbridge.db'}")


class World:
    """Two endpoints and calls of each in every kind of state."""

    def __init__(self, client: FlaskClient, make_endpoint: Callable[..., Any]) -> None:
        _, self.mine = make_endpoint(name="mine")
        _, self.other = make_endpoint(name="other")
        self.calls: dict[str, list[str]] = {"mine": [], "other": []}
        for who, token in (("mine", self.mine), ("other", self.other)):
            for i in range(6):
                call_date = f"2026-06-{20 + i} 10:00" if i % 2 else None  # None: immediate
                self.calls[who].append(data_of(create(client, token, call_date=call_date))["callid"])
        # Some final ones: the cancel of a final call answers 409.
        for callid in self.calls["mine"][:2] + self.calls["other"][:2]:
            Call.update(status="completed", ended_at=dt.datetime(2026, 6, 15, 12, 1)).where(
                Call.callid == callid).execute()

    def owner_of(self, callid: str) -> str | None:
        return next((who for who, ids in self.calls.items() if callid in ids), None)


@pytest.fixture
def world(client: FlaskClient, make_endpoint: Callable[..., Any]) -> World:
    return World(client, make_endpoint)


def case_strategy(schema: Any) -> st.SearchStrategy[Any]:
    operations = [result.ok() for result in schema.get_all_operations()]  # type: ignore[union-attr]
    assert {op.path for op in operations} >= {"/v1/calls", "/v1/scheduled/{callid}", "/readyz"}
    return st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])


def check_answer(case: Any, response: Any, world: World, who: str) -> None:
    """Our own checks on top of schemathesis' (envelope, no HTML, another's call is 404)."""
    path = case.operation.path
    status = response.status_code
    content_type = response.headers.get("Content-Type", "")
    assert "html" not in content_type.lower(), (case.method, case.formatted_path, status)
    assert status != 500, response.text[:300]
    enveloped = path not in RAW or content_type.startswith("application/json")
    if enveloped and path != "/v1/openapi.json":
        body = json.loads(response.content)
        assert set(body) == {"data"}, body
        assert body["data"]["code"] == status and isinstance(body["data"]["code_desc"], str), body
        assert (body["data"]["code_desc"] == "") == (status == 200), body
    callid = (case.path_parameters or {}).get("callid")
    owner = world.owner_of(callid) if isinstance(callid, str) else None
    if owner is not None and who in ("mine", "other") and owner != who:
        # Never served: not found, or refused before the app looked (414: a generated query made the
        # request line 8 KiB or more).
        assert status in (404, 405, 400, 413, 414, 415), (case.method, path, status, "another endpoint's call")


def run_schema_requests(schema: Any, world: World, examples: int, send: Callable[[Any], Any],
                        label: str) -> Counter[tuple[str, str, int]]:
    seen: Counter[tuple[str, str, int]] = Counter()
    cases = case_strategy(schema)
    known = world.calls["mine"] + world.calls["other"]

    @hsettings(max_examples=examples, deadline=None, database=None, derandomize=False,
               suppress_health_check=list(HealthCheck))
    @given(case=cases, who=st.sampled_from(["mine", "mine", "mine", "other", "generated", "generated"]),
           aim=st.one_of(st.none(), st.sampled_from(known)), valid_numbers=st.booleans())
    def one(case: Any, who: str, aim: str | None, valid_numbers: bool) -> None:
        if valid_numbers and isinstance(case.body, dict) and case.operation.path == "/v1/calls":
            # Random text is never a phone number: keep the other generated fields, make the numbers
            # dialable so that the rest of the request is judged too (and calls get created).
            case.body = {k: v for k, v in case.body.items() if k != "call_date"}
            case.body.update(phone_a="15550001001", phone_b="15550002002")
        if who in ("mine", "other"):
            token = world.mine if who == "mine" else world.other
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
        if aim is not None and case.path_parameters and "callid" in case.path_parameters:
            case.path_parameters = {**case.path_parameters, "callid": aim}
        response = send(case)
        FIGURES[f"API requests generated from the OpenAPI document ({label})"] += 1
        seen[(case.method.upper(), case.operation.path, response.status_code)] += 1
        checks = CHECKS if who in ("mine", "other") else [*CHECKS, ignored_auth]
        case.validate_response(response, checks=checks)
        check_answer(case, response, world, who)

    one()
    return seen


def assert_coverage(seen: Counter[tuple[str, str, int]], examples: int) -> None:
    assert sum(seen.values()) >= examples * 0.9
    statuses = {status for (_, _, status) in seen}
    # Successes, field errors, bad tokens, unknown calls and refused cancels were all reached.
    assert {200, 400, 401, 404, 409} <= statuses, sorted(statuses)
    canceled = seen[("DELETE", "/v1/scheduled/{callid}", 200)] + seen[("POST", "/v1/scheduled/{callid}/cancel", 200)]
    assert seen[("POST", "/v1/calls", 200)] > 0 and canceled > 0, seen


def test_thousands_of_generated_requests_get_documented_answers(app: Flask, world: World) -> None:
    schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", app)
    examples = 2500
    seen = run_schema_requests(schema, world, examples, lambda case: case.call(), "WSGI")
    assert_coverage(seen, examples)


@pytest.mark.slow
def test_generated_requests_over_real_http(app: Flask, world: World, live_server: LiveServer) -> None:
    client = app.test_client()
    document = client.get("/v1/openapi.json").get_json()
    schema = schemathesis.openapi.from_dict(document)
    examples = 2500
    seen = run_schema_requests(schema, world, examples, lambda case: case.call(base_url=live_server.url),
                               "real HTTP")
    assert_coverage(seen, examples)


def iter_paths(document: dict[str, Any]) -> Iterator[str]:
    yield from document["paths"]


def test_the_document_describes_what_is_generated(app: Flask) -> None:
    """The generator covers every documented operation (a route missing from the document is untested)."""
    document = app.test_client().get("/v1/openapi.json").get_json()
    schema = schemathesis.openapi.from_dict(document)
    found = [r.ok() for r in schema.get_all_operations()]  # type: ignore[union-attr]
    operations = {(op.method.upper(), op.path) for op in found}
    documented = {(method.upper(), path) for path in iter_paths(document) for method in document["paths"][path]}
    assert documented - operations <= {("GET", "/v1/openapi.json")}, documented - operations
