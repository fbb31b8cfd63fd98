"""Hostile and random requests: every answer is the JSON envelope with a status the document lists.

A quick in-suite version of the property-based API suite (issue 9 runs thousands against the OpenAPI
document); this one stays under a few seconds.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.config import Settings
from tests.conftest import data_of
from webapi.openapi import openapi_document

PATHS = ["/v1/calls", "/v1/calls/", "/v1/calls/{id}", "/v1/calls/{id}/recording", "/v1/scheduled",
         "/v1/scheduled/{id}", "/v1/scheduled/{id}/cancel", "/healthz", "/readyz", "/media/{id}.wav",
         "/{id}", "/v1/{id}"]
FIELDS = ["token", "phone_a", "phone_b", "call_date", "play_url", "msg", "msg_lang", "dialtone_url", "limit",
          "cursor", "status", "from", "to"]
NASTY = st.sampled_from(["", " ", "\x00", "\r\nX-Injected: 1", "${system(ls)}", "%0A",
                         "'; DROP TABLE call;--", "\ud800", "１２３", "9" * 5000, "2026-03-08 02:30",
                         "http://127.0.0.1/a.wav", "en-US",
                         "15550001001", "null", "{}", "[]", "<html>", "../../etc/passwd", "é" * 600])
VALUE = st.one_of(NASTY, st.text(max_size=50))
JSON_VALUE = st.one_of(VALUE, st.integers(), st.floats(), st.booleans(), st.none(),
                       st.lists(st.integers(), max_size=3),
                       st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _path(template: str, segment: str) -> str:
    safe = "".join(ch for ch in segment if ch.isalnum())[:64] or "x"
    return template.replace("{id}", safe)


@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]),
       template=st.sampled_from(PATHS), segment=VALUE,
       form=st.dictionaries(st.sampled_from(FIELDS), VALUE, max_size=6),
       json_body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUE, max_size=6),
       kind=st.sampled_from(["form", "json", "raw-json", "text", "none"]),
       use_token=st.booleans(), key=st.one_of(st.none(), VALUE.filter(lambda v: v.isascii() and "\n" not in v
                                                                             and "\r" not in v)))
@hsettings(max_examples=300, deadline=None, database=None,
           suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_requests_answer_documented_statuses_in_the_envelope(
        app: Flask, client: FlaskClient, make_endpoint: Any, settings: Settings, method: str, template: str,
        segment: str, form: dict[str, str], json_body: dict[str, Any], kind: str, use_token: bool,
        key: str | None) -> None:
    if "tok" not in app.extensions:
        app.extensions["tok"] = make_endpoint()[1]
    token: str = app.extensions["tok"]
    headers: dict[str, str] = {}
    if use_token:
        headers["Authorization"] = f"Bearer {token}"
    if key is not None:
        headers["Idempotency-Key"] = key
    path = _path(template, segment)
    query = {k: v for k, v in form.items() if "\ud800" not in v}
    kwargs: dict[str, Any] = {"headers": headers,
                              "query_string": query if method in ("GET", "DELETE") else None}
    if kind == "form":
        kwargs["data"] = {k: v.encode("utf-8", "surrogatepass") for k, v in form.items()}
    elif kind == "json":
        kwargs["json"] = json_body
    elif kind == "raw-json":
        kwargs["data"] = json.dumps(json_body)[:-1].encode()
        kwargs["content_type"] = "application/json"
    elif kind == "text":
        kwargs["data"] = b"phone_a=1"
        kwargs["content_type"] = "text/plain"
    response = client.open(path, method=method, **kwargs)
    status = response.status_code
    assert status != 500, response.get_data(as_text=True)
    if method == "HEAD":
        return
    if response.mimetype != "application/json" or path == "/v1/openapi.json":
        assert status == 200 and template in ("/media/{id}.wav", "/v1/calls/{id}/recording")
        return
    data = data_of(response)
    doc_path = template.rstrip("/") if template != "/" else template
    doc_path = doc_path.replace("{id}", "{callid}").replace("/media/{callid}.wav", "/media/{name}.wav")
    operation = openapi_document(settings)["paths"].get(doc_path, {}).get(method.lower())
    if operation is None:
        assert status in (404, 405), (method, path, status, data)
    else:
        assert str(status) in operation["responses"], (method, path, status, data)
