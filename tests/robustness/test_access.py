"""Access, over real HTTP (the app under gevent's server, tests/conftest.py ``live_server``), beyond what
tests/test_api_*.py check with the test client:

* property-based over random pairs of endpoints, calls, routes and ways of presenting the token: one
  token never reads, lists or cancels another's call, and learns nothing (the answer is the very one an
  unknown callid gets);
* a token rotated or an endpoint disabled by the CLI, in another process, stops working on the very next
  request, also on a kept-alive connection;
* failed tokens are limited per client address (429 with Retry-After for bad or missing tokens, and a
  forged X-Forwarded-For does not reset it), while the right token from that same address is still
  served (a shared NAT is not locked out by one bad client) and another address is unaffected.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.config import Settings
from daemon.store import Call, Endpoint
from tests.conftest import LiveServer, create, data_of
from tests.robustness.helpers import FIGURES, Answer, request

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
UNKNOWN = "0" * 28


class Tenants:
    """Four endpoints, each with scheduled, queued and final calls."""

    def __init__(self, client: FlaskClient, make_endpoint: Callable[..., Any]) -> None:
        self.tokens: list[str] = []
        self.calls: list[list[str]] = []
        for n in range(4):
            _, token = make_endpoint(name=f"tenant{n}")
            self.tokens.append(token)
            ids = [data_of(create(client, token, call_date=f"2026-06-{16 + i} 10:00"))["callid"] for i in range(3)]
            ids += [data_of(create(client, token))["callid"] for _ in range(2)]
            Call.update(status="failed", reason="test").where(Call.callid == ids[-1]).execute()
            self.calls.append(ids)


@pytest.fixture
def tenants(client: FlaskClient, make_endpoint: Callable[..., Any]) -> Tenants:
    return Tenants(client, make_endpoint)


def presented(how: str, token: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """(headers, query, form) presenting ``token`` as a bearer header, a query parameter or a body field."""
    if how == "bearer":
        return {"Authorization": f"Bearer {token}"}, {}, {}
    if how == "query":
        return {}, {"token": token}, {}
    return {}, {}, {"token": token}


def act(base: str, action: str, callid: str, token: str, how: str) -> Answer:
    headers, query, form = presented(how, token)
    if action == "read":
        return request(base, "GET", f"/v1/calls/{callid}", headers=headers, query=query or {"token": token})
    if action == "recording":
        return request(base, "GET", f"/v1/calls/{callid}/recording", headers=headers,
                       query=query or {"token": token})
    if action == "delete":
        return request(base, "DELETE", f"/v1/scheduled/{callid}", headers=headers, query=query, form=form or None)
    return request(base, "POST", f"/v1/scheduled/{callid}/cancel", headers=headers, query=query,
                   form=form or {})


def listed(base: str, path: str, token: str, how: str, params: dict[str, str]) -> list[str]:
    """Every callid a token sees on a list route, page by page."""
    headers, query, _ = presented(how, token)
    seen: list[str] = []
    cursor: str | None = None
    while True:
        args = {**(query or {"token": token}), **params, **({"cursor": cursor} if cursor else {})}
        answer = request(base, "GET", path, headers=headers, query=args)
        assert answer.status == 200, answer.body
        data = answer.data()
        seen += [c["callid"] for c in data["calls"]]
        cursor = data["next_cursor"]
        if cursor is None:
            return seen


def test_no_token_reaches_another_tokens_calls(live_server: LiveServer, tenants: Tenants) -> None:
    base = live_server.url
    statuses_before = {c.callid: c.status for c in Call.select()}
    refusals = {action: act(base, action, UNKNOWN, tenants.tokens[0], "bearer")
                for action in ("read", "recording", "delete", "post")}

    @given(owner=st.integers(0, 3), intruder=st.integers(0, 3), which=st.integers(0, 4),
           action=st.sampled_from(["read", "recording", "delete", "post", "list", "scheduled"]),
           how=st.sampled_from(["bearer", "query", "field"]),
           params=st.fixed_dictionaries({}, optional={"limit": st.sampled_from(["1", "2", "200"]),
                                                      "status": st.sampled_from(["scheduled", "queued,failed"])}))
    @hsettings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def one(owner: int, intruder: int, which: int, action: str, how: str, params: dict[str, str]) -> None:
        if owner == intruder:
            intruder = (intruder + 1) % 4
        callid = tenants.calls[owner][which]
        token = tenants.tokens[intruder]
        FIGURES["cross-token access attempts"] += 1
        if action in ("list", "scheduled"):
            path = "/v1/calls" if action == "list" else "/v1/scheduled"
            if action == "scheduled":
                params = {k: v for k, v in params.items() if k != "status"}
            seen = set(listed(base, path, token, how if how != "field" else "query", params))
            assert not seen & set(tenants.calls[owner]), (owner, intruder, action)
            assert seen <= set(tenants.calls[intruder])
            return
        if action in ("read", "recording") and how == "field":
            how = "query"  # GET has no body
        answer = act(base, action, callid, token, how)
        assert answer.status == 404, (action, how, answer.status, answer.body)
        assert answer.json() == refusals[action].json(), "the answer must not tell 'exists, not yours'"

    one()
    assert {c.callid: c.status for c in Call.select()} == statuses_before, "an intruder changed a call"
    # Each owner still sees all its own calls.
    for n, token in enumerate(tenants.tokens):
        assert set(listed(base, "/v1/calls", token, "bearer", {"limit": "2"})) == set(tenants.calls[n])


def cli(settings: Settings, *args: str) -> dict[str, Any]:
    env = dict(os.environ, CALLBRIDGE_DATABASE_URL=settings.database_url, CALLBRIDGE_STATE_DIR=str(settings.state_dir))
    done = subprocess.run([sys.executable, "-m", "daemon", *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def every_route(base: str, token: str, callid: str) -> list[int]:
    auth = {"Authorization": f"Bearer {token}"}
    return [
        request(base, "GET", "/v1/calls", headers=auth).status,
        request(base, "GET", "/v1/scheduled", query={"token": token}).status,
        request(base, "GET", f"/v1/calls/{callid}", headers=auth).status,
        request(base, "POST", "/v1/calls", form={"token": token, "phone_a": "15550001001",
                                                 "phone_b": "15550002002", "call_date": "2026-06-30 10:00"}).status,
        request(base, "POST", f"/v1/scheduled/{UNKNOWN}/cancel", form={"token": token}).status,
    ]


class KeptAlive:
    """One HTTP/1.1 connection reused for several requests (a client that keeps its connection)."""

    def __init__(self, live: LiveServer) -> None:
        self.conn = http.client.HTTPConnection(live.host, live.port, timeout=10)

    def status(self, token: str) -> int:
        self.conn.request("GET", "/v1/calls", headers={"Authorization": f"Bearer {token}"})
        response = self.conn.getresponse()
        response.read()
        assert response.getheader("Connection", "").lower() != "close"
        return response.status


def test_rotated_and_disabled_tokens_stop_at_once_across_processes(live_server: LiveServer, settings: Settings,
                                                                    make_endpoint: Callable[..., Any],
                                                                    client: FlaskClient) -> None:
    base = live_server.url
    _, token = make_endpoint(name="acme")
    callid = data_of(create(client, token, call_date="2026-06-20 10:00"))["callid"]
    kept = KeptAlive(live_server)
    assert kept.status(token) == 200
    assert every_route(base, token, callid) == [200, 200, 200, 200, 404]

    new = cli(settings, "endpoint", "rotate", "acme")["token"]
    FIGURES["tokens rotated / disabled by another process"] += 1
    assert kept.status(token) == 401, "the old token still worked on a kept-alive connection"
    assert every_route(base, token, callid) == [401] * 5
    assert kept.status(new) == 200
    assert every_route(base, new, callid) == [200, 200, 200, 200, 404]  # its calls stay its own

    cli(settings, "endpoint", "disable", "acme")
    FIGURES["tokens rotated / disabled by another process"] += 1
    assert kept.status(new) == 401
    assert every_route(base, new, callid) == [401] * 5
    answer = request(base, "GET", "/v1/calls", query={"token": new})
    assert answer.data()["code_desc"] == "token: invalid or disabled"


def guess(base: str, token: str, *, source: str = "127.0.0.1", headers: dict[str, str] | None = None) -> Answer:
    return request(base, "GET", "/v1/calls", headers={"Authorization": f"Bearer {token}", **(headers or {})},
                   source_address=source)


def test_token_guessing_is_slowed_per_address_but_the_right_token_always_works(
        live_server: LiveServer, settings: Settings, make_endpoint: Callable[..., Any]) -> None:
    base = live_server.url
    _, token = make_endpoint(name="target")
    limit = settings.auth_failures_per_minute
    near_misses = [token[:-1] + ("A" if token[-1] != "A" else "B"), token[:-4], token + "x", token.upper(),
                   "cb_" + "A" * 32]
    answers = [guess(base, near_misses[i % len(near_misses)]) for i in range(limit)]
    FIGURES["token guesses sent"] += limit
    assert [a.status for a in answers] == [401] * limit
    assert len({a.body for a in answers}) == 1, "near misses must answer exactly like any wrong token"
    # Over the limit: every bad or missing token from this address is 429, whatever it forges.
    for attempt in (guess(base, near_misses[0]),
                    guess(base, near_misses[1], headers={"X-Forwarded-For": "198.51.100.7"}),
                    request(base, "GET", "/v1/calls"),
                    request(base, "POST", "/v1/calls", form={"token": near_misses[2], "phone_a": "15550001001",
                                                             "phone_b": "15550002002"})):
        FIGURES["token guesses sent"] += 1
        assert attempt.status == 429, attempt.body
        assert attempt.data()["code_desc"].startswith("token: too many failed attempts")
        assert 1 <= int(attempt.headers["retry-after"]) <= 60
    # The right token from the very same address is never refused: reads, creates, forged header or not.
    assert guess(base, token).status == 200
    assert guess(base, token, headers={"X-Forwarded-For": "198.51.100.7"}).status == 200
    created = request(base, "POST", "/v1/calls", form={"token": token, "phone_a": "15550001001",
                                                       "phone_b": "15550002002"})
    assert created.status == 200, created.body
    assert guess(base, near_misses[0]).status == 429  # and serving it did not reset the count
    # Another address (127.0.0.2 is loopback too) is not affected, and has its own count.
    assert guess(base, token, source="127.0.0.2").status == 200
    assert guess(base, near_misses[0], source="127.0.0.2").status == 401
    assert guess(base, token, source="127.0.0.2").status == 200
    # Routes without a token are never limited.
    assert request(base, "GET", "/healthz").status == 200


@given(token=st.text(min_size=1, max_size=60).filter(lambda t: t.isprintable() and t.strip() == t))
@hsettings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_guess_ever_gets_in(client: FlaskClient, make_endpoint: Callable[..., Any], token: str) -> None:
    """Random guesses (each from its own address, so the limiter does not end the run) never authenticate."""
    if not Endpoint.select().exists():
        make_endpoint(name="real")
    FIGURES["token guesses sent"] += 1
    response = client.get("/v1/calls", headers={"Authorization": f"Bearer {token}"},
                          environ_base={"REMOTE_ADDR": f"10.9.{len(token)}.{ord(token[0]) % 250}"})
    assert response.status_code in (401, 429), token
