"""The envelope on every error (404, 405, 413, 415, 429, 500), health, readiness, metrics, media, OpenAPI."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from daemon.config import Settings
from daemon.ops.metrics import Metrics
from daemon.store import database_file
from tests.conftest import create, data_of
from tests.fakes import FakeMedia
from webapi.app import create_app, route_rules
from webapi.openapi import openapi_document
from webapi.ratelimit import AuthFailureLimiter, client_key


@pytest.mark.parametrize(("method", "path", "status", "desc"), [
    ("GET", "/nothing-here", 404, "path: no such route"),  # "/" leads to the web pages
    ("GET", "/v2/calls", 404, "path: no such route"),
    ("GET", "/v1//calls", 404, "path: no such route"),
    ("GET", "/media/abc.mp3", 404, "path: no such route"),
    ("PUT", "/v1/calls", 405, "method: PUT not allowed here; use "),
    ("DELETE", "/v1/calls", 405, "method: DELETE not allowed here; use "),
    ("PATCH", "/v1/scheduled/abc", 405, "method: PATCH not allowed here; use DELETE"),
    ("GET", "/v1/scheduled/abc/cancel", 405, "method: GET not allowed here; use POST"),
    ("POST", "/healthz", 405, "method: POST not allowed here; use "),
    ("OPTIONS", "/v1/calls", 405, "method: OPTIONS not allowed here; use "),
])
def test_routing_errors_in_the_envelope(client: FlaskClient, method: str, path: str, status: int,
                                        desc: str) -> None:
    response = client.open(path, method=method)
    assert response.status_code == status
    assert data_of(response)["code_desc"].startswith(desc)
    if status == 405:
        assert "Allow" in response.headers


def test_trailing_slash_needs_no_redirect(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    for path in ("/v1/calls/", "/v1/scheduled/", "/healthz/"):
        response = client.get(path, query_string={"token": token})
        assert response.status_code == 200, path


def test_unsupported_content_type_is_415(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    for ctype in ("text/plain", "multipart/form-data; boundary=x", "application/xml"):
        response = client.post("/v1/calls", data=b"token=" + token.encode(), content_type=ctype)
        assert response.status_code == 415, ctype
        assert data_of(response)["code_desc"].startswith("Content-Type: ")
    response = client.post("/v1/calls", data=b"phone_a=1", headers={"Content-Type": ""})
    assert response.status_code == 415


@pytest.mark.parametrize(("body", "desc"), [
    (b"{", "body: not valid JSON"),
    (b"[1, 2]", "body: must be a JSON object"),
    (b'"token"', "body: must be a JSON object"),
    (b"\xff\xfe\x00", "body: not valid JSON"),
    (b"[" * 100_00 + b"]" * 100_00, "body: not valid JSON"),
])
def test_bad_json_is_400(client: FlaskClient, body: bytes, desc: str) -> None:
    response = client.post("/v1/calls", data=body[:60_000], content_type="application/json")
    assert response.status_code == 400
    assert data_of(response)["code_desc"] == desc


def test_a_field_given_twice_is_400_and_nothing_is_stored(client: FlaskClient, make_endpoint: Any) -> None:
    # Which of two values counts would be a guess: a proxy or validator in front of us may read the
    # first where we would read the other. The client is told, and no call is made.
    _, token = make_endpoint()
    json_body = (f'{{"token": "{token}", "phone_a": "15550001001", "phone_b": "15550002002", '
                 '"phone_b": "15550009999"}').encode()
    answers = [
        client.post("/v1/calls", data=json_body, content_type="application/json"),
        client.post("/v1/calls", data=f"token={token}&phone_a=15550001001&phone_a=15550009999&phone_b=15550002002",
                    content_type="application/x-www-form-urlencoded"),
    ]
    for response in answers:
        assert response.status_code == 400
        assert data_of(response)["code_desc"] == f"{'phone_b' if response is answers[0] else 'phone_a'}: " \
            "given more than once; send each field once"
    # A key no field could have is not quoted back.
    response = client.post("/v1/calls", data=b'{"\\u001b[2J": 1, "\\u001b[2J": 2}', content_type="application/json")
    assert data_of(response)["code_desc"] == "body: given more than once; send each field once"
    assert data_of(client.get("/v1/calls", query_string={"token": token}))["calls"] == []


def test_a_form_body_is_read_as_utf8_or_its_declared_charset_and_anything_else_is_400(
        client: FlaskClient, make_endpoint: Any) -> None:
    """The seed's client is PHP's http_build_query: a site in Latin-1 sends ``caf%E9``. It must not be
    spoken as "caf%E9", and a raw byte that is not text must not lose the whole form (a 401 for a token
    that was there)."""
    _, token = make_endpoint()
    form = "application/x-www-form-urlencoded"
    fields = f"token={token}&phone_a=15550001001&phone_b=15550002002&msg_lang=fr-FR&msg="
    for body, ctype in ((fields + "caf%E9", form), ((fields + "caf\xe9").encode("latin-1"), form)):
        response = client.post("/v1/calls", data=body, content_type=ctype)
        assert response.status_code == 400, response.get_json()
        assert data_of(response)["code_desc"].startswith("body: not utf-8 text; percent-encode each field as UTF-8")
    response = client.post("/v1/calls", data=fields + "caf%E9", content_type=form + "; charset=ISO-8859-1")
    assert response.status_code == 200 and data_of(response)["msg"] == "caf\xe9"
    response = client.post("/v1/calls", data=fields + "caf%C3%A9+au+lait", content_type=form)
    assert response.status_code == 200 and data_of(response)["msg"] == "caf\xe9 au lait"
    response = client.post("/v1/calls", data=fields + "x", content_type=form + "; charset=klingon")
    assert response.status_code == 415 and "charset 'klingon' unknown" in data_of(response)["code_desc"]
    assert len(data_of(client.get("/v1/calls", query_string={"token": token}))["calls"]) == 2


def test_large_body_is_413(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    response = client.post("/v1/calls", data={"token": token, "phone_a": "1" * 70_000})
    assert response.status_code == 413
    assert data_of(response)["code_desc"] == "body: larger than 65536 bytes"
    response = client.post("/v1/calls", json={"token": token, "msg": "x" * 70_000})
    assert response.status_code == 413


def test_auth_failures_per_address_answer_429_but_never_to_a_valid_token(client: FlaskClient, make_endpoint: Any,
                                                                         settings: Settings) -> None:
    _, token = make_endpoint()
    here = {"REMOTE_ADDR": "192.0.2.7"}
    for _ in range(settings.auth_failures_per_minute):
        response = client.get("/v1/calls", query_string={"token": "cb_guess"}, environ_base=here)
        assert response.status_code == 401
    # Over the limit: bad and missing tokens are refused without a look at the fields...
    for response in (client.get("/v1/calls", query_string={"token": "cb_guess"}, environ_base=here),
                     client.get("/v1/calls", environ_base=here),
                     client.post("/v1/calls", data={"token": "cb_guess"}, environ_base=here)):
        assert response.status_code == 429
        assert data_of(response)["code_desc"].startswith("token: too many failed attempts")
        assert 1 <= int(response.headers["Retry-After"]) <= 60
    # ...while the valid token from the very same address is served as usual, on every route.
    assert client.get("/v1/calls", query_string={"token": token}, environ_base=here).status_code == 200
    created = client.post("/v1/calls", data={"token": token, "phone_a": "15550001001", "phone_b": "15550002002"},
                          environ_base=here)
    assert created.status_code == 200, created.get_json()
    callid = data_of(created)["callid"]
    assert client.get(f"/v1/calls/{callid}", headers={"Authorization": f"Bearer {token}"},
                      environ_base=here).status_code == 200
    # Another address is not affected; the health routes need no token and are not limited.
    assert client.get("/v1/calls", query_string={"token": "cb_guess"},
                      environ_base={"REMOTE_ADDR": "192.0.2.8"}).status_code == 401
    assert client.get("/healthz", environ_base=here).status_code == 200


def test_limiter_burst_then_rate() -> None:
    """A burst of ``per_window`` failures, then one every ``window / per_window`` seconds."""
    now = [1000.0]
    limiter = AuthFailureLimiter(3, 60, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.retry_after("a") is None
        limiter.fail("a")
    assert limiter.retry_after("a") == 20  # the budget grows back by one failure every 20 s
    now[0] = 1019.5
    assert limiter.retry_after("a") == 1
    now[0] = 1020.0
    assert limiter.retry_after("a") is None
    limiter.fail("a")
    assert limiter.retry_after("a") == 20  # one allowed, then spent again
    now[0] = 1080.0
    assert limiter.retry_after("a") is None and len(limiter) == 0  # whole again: forgotten
    assert limiter.retry_after("b") is None
    assert AuthFailureLimiter(0).retry_after("x") is None


def test_limiter_keeps_one_float_per_address_and_forgets_the_least_recent() -> None:
    now = [0.0]
    limiter = AuthFailureLimiter(1, 60, clock=lambda: now[0], max_addresses=2)
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limiter.fail(address)
    assert len(limiter) == 2
    assert limiter.retry_after("192.0.2.1") is None  # the oldest was forgotten beyond two
    assert limiter.retry_after("192.0.2.3") == 60


def test_limiter_counts_ipv6_per_64_and_mapped_ipv4_as_ipv4() -> None:
    limiter = AuthFailureLimiter(1, 60, clock=lambda: 0.0)
    limiter.fail("2001:db8:1:2::1")
    assert limiter.retry_after("2001:db8:1:2:ffff::9") == 60  # same /64
    assert limiter.retry_after("2001:db8:1:3::1") is None  # another /64
    limiter.fail("::ffff:192.0.2.9")
    assert limiter.retry_after("192.0.2.9") == 60
    assert client_key("not an address") == "not an address"


def test_unexpected_exception_is_500_in_the_envelope_without_details(
        settings: Settings, db: Any, media: FakeMedia, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings, media=media)

    def boom() -> str:
        raise RuntimeError("secret detail")

    app.add_url_rule("/boom", view_func=boom)
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    data = data_of(response)
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in data["code_desc"]
    assert "secret detail" in caplog.text


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200 and data_of(response)["status"] == "ok"


@pytest.mark.stores("sqlite", "postgresql")
def test_readyz(client: FlaskClient, readiness_checks: dict[str, bool]) -> None:
    data = data_of(client.get("/readyz"))
    assert data["ready"] is True and data["checks"] == {"esl": True, "database": True}
    readiness_checks["esl"] = False
    response = client.get("/readyz")
    assert response.status_code == 503
    data = data_of(response)
    assert data["ready"] is False and data["code_desc"] == "not ready: esl"


def test_readyz_fails_when_the_database_is_locked(client: FlaskClient, settings: Settings) -> None:
    path = database_file(settings.database_url)
    assert path is not None
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA busy_timeout = 0")
    other.execute("BEGIN IMMEDIATE")
    try:
        from daemon.store import database

        database.execute_sql("PRAGMA busy_timeout = 10")  # keep the test quick
        response = client.get("/readyz")
        assert response.status_code == 503
        assert data_of(response)["checks"]["database"] is False
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert client.get("/readyz").status_code == 200


def test_readyz_when_the_readiness_callable_raises(settings: Settings, db: Any, media: FakeMedia) -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("nope")

    response = create_app(settings, media=media, readiness=broken).test_client().get("/readyz")
    assert response.status_code == 503 and data_of(response)["checks"]["readiness"] is False


def test_metrics_record_latency_per_route_template(settings: Settings, db: Any, media: FakeMedia,
                                                   make_endpoint: Any) -> None:
    metrics = Metrics()
    client = create_app(settings, media=media, metrics=metrics).test_client()
    _, token = make_endpoint()
    callid = data_of(create(client, token))["callid"]
    client.get(f"/v1/calls/{callid}", query_string={"token": token})
    client.get("/nowhere")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    count = 'callbridge_api_request_seconds_count{method="GET",route="/v1/calls/<callid>",status="200"} 1.0'
    assert count in text
    assert 'route="/v1/calls",status="200"' in text
    assert 'route="unmatched",status="404"' in text
    assert 'callbridge_calls_created_total{kind="immediate"} 1.0' in text
    assert callid not in text


def test_media_route_serves_prompts_only_to_freeswitch_in_http_mode(client: FlaskClient, media: FakeMedia,
                                                                    settings: Settings) -> None:
    made = media.from_url("http://example.com/a.wav", kind="play")
    url = f"/media/{made.name}.wav"
    # media_mode = "local" (the default): FreeSWITCH reads the files; the route serves nobody.
    assert client.get(url).status_code == 404
    assert data_of(client.get(url))["code_desc"] == "media: no such file"
    settings.media_mode, settings.media_base_url = "http", "http://127.0.0.1:8080"
    response = client.get(url)  # the test client comes from 127.0.0.1, inside the default allow-list
    assert response.status_code == 200 and response.mimetype == "audio/wav"
    assert response.data == Path(made.path).read_bytes()
    assert "immutable" in response.headers["Cache-Control"]
    for outsider in ("10.9.9.9", "192.0.2.7", "2001:db8::1"):
        response = client.get(url, environ_base={"REMOTE_ADDR": outsider})
        assert response.status_code == 404 and data_of(response)["code_desc"] == "media: no such file"
    settings.media_route_allow = ["10.9.0.0/16"]  # e.g. FreeSWITCH's subnet
    assert client.get(url, environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code == 200
    assert client.get(url).status_code == 404  # loopback is no longer listed
    settings.media_route_allow, settings.esl_host = [], "10.20.30.40"  # the default follows FreeSWITCH's host
    assert client.get(url, environ_base={"REMOTE_ADDR": "10.20.30.40"}).status_code == 200
    assert client.get(url).status_code == 200
    for name in ("0" * 64, "A" * 64, "..%2F..%2Fetc%2Fpasswd", made.name[:-1]):
        response = client.get(f"/media/{name}.wav", environ_base={"REMOTE_ADDR": "10.9.9.9"})
        assert response.status_code == 404
        assert data_of(response)["code_desc"] in ("media: no such file", "path: no such route")


def test_no_api_route_ever_answers_html(client: FlaskClient) -> None:
    # (A page's address answers a wrong method with a page: tests/test_portal.py.)
    for method, path in (("GET", "/x"), ("POST", "/v1/calls"), ("DELETE", "/v1/scheduled/x"), ("TRACE", "/healthz"),
                         ("TRACE", "/v1/calls")):
        response = client.open(path, method=method)
        assert response.mimetype == "application/json"
        assert "<html" not in response.get_data(as_text=True).lower()


# OpenAPI ------------------------------------------------------------------------------------------

def _openapi_path(rule: str) -> str:
    return re.sub(r"<(?:[a-z]+:)?([a-z_0-9]+)>", r"{\1}", rule)


def test_openapi_served_and_covers_every_route(app: Flask, client: FlaskClient, settings: Settings) -> None:
    response = client.get("/v1/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    doc = response.get_json()
    assert doc == openapi_document(settings)
    assert doc["openapi"].startswith("3.")
    served: dict[str, set[str]] = {}
    for rule, methods in route_rules(app):
        served.setdefault(_openapi_path(rule), set()).update(methods)
    assert set(served) == set(doc["paths"])
    for path, methods in served.items():
        assert methods == {m.upper() for m in doc["paths"][path]}, path


def test_openapi_document_is_valid_for_the_version_it_declares(settings: Settings) -> None:
    """Code generators and Swagger UI read the document by its ``openapi`` version: a 3.1 construct (a
    list of types) in a 3.0.3 document makes them refuse it."""
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation import OpenAPIV30SpecValidator

    doc = openapi_document(settings)
    assert doc["openapi"] == "3.0.3"
    validate(doc, cls=OpenAPIV30SpecValidator)


def test_openapi_references_resolve_and_statuses_are_documented(settings: Settings) -> None:
    doc = openapi_document(settings)
    schemas = doc["components"]["schemas"]

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if "$ref" in node else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    create_op = doc["paths"]["/v1/calls"]["post"]
    assert {"200", "400", "401", "413", "415", "429"} <= set(create_op["responses"])
    assert set(create_op["requestBody"]["content"]) == {"application/x-www-form-urlencoded",
                                                        "application/json"}
    cancel = doc["paths"]["/v1/scheduled/{callid}"]["delete"]
    assert {"200", "401", "404", "409", "429"} <= set(cancel["responses"])
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (path, method)
            assert op.get("operationId"), (path, method)
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    assert "{" + param["name"] + "}" in path
    assert "spring-forward" in schemas["CreateJson"]["properties"]["call_date"]["description"]
    assert "spring-forward" in doc["info"]["description"]
    languages = schemas["CreateForm"]["properties"]["msg_lang"]["enum"]
    assert "en-GB" in languages and len(languages) == 10


def test_answers_match_the_documented_required_fields(client: FlaskClient, make_endpoint: Any,
                                                      settings: Settings) -> None:
    """A light check of responses against the document (full validation is the property-based suite's)."""
    schemas = openapi_document(settings)["components"]["schemas"]
    summary_fields = set(schemas["CallSummary"]["required"])
    _, token = make_endpoint()
    created = data_of(create(client, token, call_date="2026-06-20 10:00"))
    assert summary_fields | {"token", "code", "code_desc"} == set(created)
    listed = data_of(client.get("/v1/calls", query_string={"token": token}))["calls"][0]
    assert set(listed) == summary_fields
    detail = data_of(client.get(f"/v1/calls/{created['callid']}", query_string={"token": token}))
    assert set(detail) == summary_fields | {"timeline", "code", "code_desc"}
    for name, value in listed.items():
        spec = schemas["CallSummary"]["properties"][name]
        if "$ref" in spec:
            continue
        if value is None:
            assert spec.get("nullable"), name
        else:
            kinds: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                                  "boolean": (bool,)}
            assert isinstance(value, kinds[spec["type"]]), name


def test_a_busy_database_is_503_not_500(client: FlaskClient, make_endpoint: Any, settings: Settings) -> None:
    _, token = make_endpoint()
    path = database_file(settings.database_url)
    assert path is not None
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        from daemon.store import database

        database.execute_sql("PRAGMA busy_timeout = 10")
        response = create(client, token)
        assert response.status_code == 503
        assert data_of(response)["code_desc"] == "database: unavailable or busy; retry later"
        assert response.headers["Retry-After"] == "1"
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert create(client, token).status_code == 200


@pytest.mark.stores("postgresql")
def test_a_read_only_postgresql_is_not_ready_and_writes_are_503(client: FlaskClient, make_endpoint: Any,
                                                                settings: Settings, postgres_server: Any) -> None:
    """A standby or a database made read-only (a failover under way): /readyz says so, writes answer 503."""
    from daemon.store import database

    _, token = make_endpoint()
    name = settings.database_url.rsplit("/", 1)[1]
    postgres_server.admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
    database.obj.close_idle()  # the setting applies to new sessions
    response = client.get("/readyz")
    assert response.status_code == 503 and data_of(response)["checks"]["database"] is False
    response = create(client, token)
    assert response.status_code == 503
    assert data_of(response)["code_desc"] == "database: unavailable or busy; retry later"
    postgres_server.admin(f'ALTER DATABASE "{name}" SET default_transaction_read_only = off')
    database.obj.close_idle()
    assert client.get("/readyz").status_code == 200
    assert create(client, token).status_code == 200


@pytest.mark.stores("postgresql")
def test_a_postgresql_pool_busy_past_its_wait_is_503_not_500(make_endpoint: Any, settings: Settings,
                                                             media: FakeMedia) -> None:
    """Every pooled connection held longer than the wait (timeout=1 here): the request answers 503 and the
    next one, once a connection is free, goes through."""
    import gevent
    import gevent.event

    from daemon.store import close_database, database, open_database

    _, token = make_endpoint()
    close_database(database.obj)
    settings.database_url += "?max_connections=1&timeout=1"
    db = open_database(settings.database_url)
    client = create_app(settings, media=media).test_client()
    holding, release = gevent.event.Event(), gevent.event.Event()

    def hold() -> None:
        with db.atomic():
            db.execute_sql("SELECT 1")
            holding.set()
            release.wait(30)

    holder = gevent.spawn(hold)
    assert holding.wait(30)
    response = create(client, token)
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    release.set()
    holder.get(timeout=30)
    assert create(client, token).status_code == 200
    close_database(db)


@pytest.mark.stores("postgresql")
def test_requests_give_back_every_postgresql_connection(client: FlaskClient, make_endpoint: Any) -> None:
    """Whatever a request did (created, listed, refused, canceled, failed), no connection stays lent."""
    from daemon.store import database

    _, token = make_endpoint()
    callid = data_of(create(client, token, call_date="2026-06-16 08:00"))["callid"]
    assert client.get("/v1/calls", query_string={"token": token}).status_code == 200
    assert create(client, token, phone_b="12").status_code == 400
    assert create(client, "cb_wrong").status_code == 401
    assert client.delete(f"/v1/scheduled/{callid}", query_string={"token": token}).status_code == 200
    assert client.delete(f"/v1/scheduled/{callid}", query_string={"token": token}).status_code == 409
    assert client.get("/readyz").status_code == 200
    assert not database.obj._in_use and database.obj._connections


def test_made_up_methods_do_not_grow_the_latency_metric_without_bound(settings: Settings, db: Any,
                                                                       media: FakeMedia) -> None:
    """The method is the client's to choose: each made-up one must not become a series of its own."""
    metrics = Metrics()
    client = create_app(settings, media=media, metrics=metrics).test_client()
    for number in range(200):
        assert client.open("/v1/calls", method=f"X{number}").status_code == 405
    client.open("/healthz", method="GET")
    methods = {sample.labels["method"] for family in metrics.registry.collect()
               if family.name == "callbridge_api_request_seconds" for sample in family.samples}
    assert "GET" in methods
    assert len(methods) <= 10, sorted(methods)[:20]
