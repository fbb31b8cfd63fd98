"""Cancel: DELETE /v1/scheduled/<callid> and POST .../cancel; 200, 409, 404; cancel against claim."""

from __future__ import annotations

import http.client
import json
import sqlite3
import threading
from typing import Any

import pytest
from flask.testing import FlaskClient

from daemon.config import Settings
from daemon.store import Call, CallEvent, database_file
from tests.conftest import NOW, LiveServer, create, data_of
from tests.fakes import FakeDispatcher

pytestmark = pytest.mark.stores("sqlite", "postgresql")

CLAIM_SQL = ("UPDATE call SET status = 'dialing_a', started_at = {p} "
             "WHERE id = {p} AND status IN ('scheduled', 'queued')")


def claim(callid: str) -> int:
    """What the dispatcher does to start a call: the mirror conditional UPDATE. Returns its rowcount."""
    return Call.update(status="dialing_a", started_at=NOW).where(
        (Call.callid == callid) & (Call.status.in_(["scheduled", "queued"]))).execute()


def schedule(client: FlaskClient, token: str) -> str:
    callid: str = data_of(create(client, token, call_date="2026-06-16 08:00"))["callid"]
    return callid


@pytest.mark.parametrize("how", ["delete-query", "delete-bearer", "delete-form", "post-form", "post-json",
                                 "post-bearer"])
def test_cancel_a_scheduled_call(client: FlaskClient, make_endpoint: Any, dispatcher: FakeDispatcher,
                                 how: str) -> None:
    endpoint, token = make_endpoint()
    callid = schedule(client, token)
    path = f"/v1/scheduled/{callid}"
    bearer = {"Authorization": f"Bearer {token}"}
    response = {
        "delete-query": lambda: client.delete(path, query_string={"token": token}),
        "delete-bearer": lambda: client.delete(path, headers=bearer),
        "delete-form": lambda: client.delete(path, data={"token": token}),
        "post-form": lambda: client.post(path + "/cancel", data={"token": token}),
        "post-json": lambda: client.post(path + "/cancel", json={"token": token}),
        "post-bearer": lambda: client.post(path + "/cancel", headers=bearer),
    }[how]()
    assert response.status_code == 200
    data = data_of(response)
    assert data["callid"] == callid and data["status"] == "canceled"
    assert data["canceled_at"] == "2026-06-15T12:00:00.000Z" and data["canceled_by"] == endpoint.name
    call = Call.get(Call.callid == callid)
    assert call.status == "canceled" and call.canceled_by == endpoint.name
    assert [e.kind for e in CallEvent.select().where(CallEvent.call == call).order_by(CallEvent.id)] == [
        "requested", "canceled"]
    assert dispatcher.wakes == 1  # canceled (a scheduled call's creation wakes nobody)
    assert data_of(client.get("/v1/scheduled", query_string={"token": token}))["calls"] == []
    # The row stays and is listed with its final status.
    assert data_of(client.get("/v1/calls", query_string={"token": token}))["calls"][0]["status"] == "canceled"


def test_cancel_after_start_is_409_and_changes_nothing(client: FlaskClient, make_endpoint: Any,
                                                       dispatcher: FakeDispatcher) -> None:
    _, token = make_endpoint()
    callid = schedule(client, token)
    assert claim(callid) == 1
    response = client.delete(f"/v1/scheduled/{callid}", query_string={"token": token})
    assert response.status_code == 409
    data = data_of(response)
    assert data["code_desc"] == "callid: the call already started (status dialing_a)"
    assert data["status"] == "dialing_a" and data["callid"] == callid
    call = Call.get(Call.callid == callid)
    assert call.status == "dialing_a" and call.canceled_at is None
    assert dispatcher.wakes == 0


def test_cancel_twice_and_cancel_final_is_409(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    callid = schedule(client, token)
    assert client.delete(f"/v1/scheduled/{callid}", query_string={"token": token}).status_code == 200
    again = client.delete(f"/v1/scheduled/{callid}", query_string={"token": token})
    assert again.status_code == 409
    assert data_of(again)["code_desc"] == "callid: the call is already final (status canceled)"
    done = schedule(client, token)
    Call.update(status="completed").where(Call.callid == done).execute()
    response = client.post(f"/v1/scheduled/{done}/cancel", data={"token": token})
    assert data_of(response)["code_desc"] == "callid: the call is already final (status completed)"


def test_cancel_an_immediate_queued_call(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    callid = data_of(create(client, token))["callid"]
    response = client.delete(f"/v1/scheduled/{callid}", query_string={"token": token})
    assert data_of(response)["status"] == "canceled"


def test_cancel_unknown_is_404_and_needs_a_token(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    response = client.delete("/v1/scheduled/" + "0" * 28, query_string={"token": token})
    assert response.status_code == 404
    callid = schedule(client, token)
    response = client.delete(f"/v1/scheduled/{callid}")
    assert response.status_code == 401 and data_of(response)["code_desc"] == "token: missing"


def test_claim_after_cancel_does_nothing(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    callid = schedule(client, token)
    assert client.delete(f"/v1/scheduled/{callid}", query_string={"token": token}).status_code == 200
    assert claim(callid) == 0
    assert Call.get(Call.callid == callid).status == "canceled"


def test_cancel_races_claim_from_another_connection(client: FlaskClient, make_endpoint: Any,
                                                    settings: Settings, live_server: LiveServer) -> None:
    """A connection of its own (as a dispatcher in another process would) claims each call while the API
    cancels it over real HTTP: every call ends with exactly one winner."""
    _, token = make_endpoint()
    callids = [schedule(client, token) for _ in range(40)]
    ids = {c.callid: c.get_id() for c in Call.select().where(Call.callid.in_(callids))}
    path = database_file(settings.database_url)
    claimed: dict[str, int] = {}
    canceled: dict[str, int] = {}
    go = threading.Barrier(2)

    def claimer() -> None:
        if path is not None:
            conn: Any = sqlite3.connect(path, timeout=10, isolation_level=None)
            sql, now = CLAIM_SQL.format(p="?"), NOW.isoformat(" ")
        else:
            import psycopg

            conn = psycopg.connect(settings.database_url, autocommit=True)
            sql, now = CLAIM_SQL.format(p="%s"), NOW
        for callid in callids:
            go.wait(10)
            claimed[callid] = conn.execute(sql, (now, ids[callid])).rowcount
        conn.close()

    thread = threading.Thread(target=claimer)
    thread.start()
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    for callid in callids:
        go.wait(10)
        conn.request("DELETE", f"/v1/scheduled/{callid}", headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = json.loads(response.read())
        canceled[callid] = response.status
        assert body["data"]["code"] == response.status
    thread.join(30)
    conn.close()
    for callid in callids:
        status = Call.get(Call.callid == callid).status
        assert (claimed[callid], canceled[callid]) in ((1, 409), (0, 200)), callid
        assert status == ("dialing_a" if claimed[callid] else "canceled")
