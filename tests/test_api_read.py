"""GET /v1/calls, /v1/calls/<callid>, /v1/scheduled: shapes, pagination, filters, isolation, tokens."""

from __future__ import annotations

import datetime as dt
import itertools
from typing import Any

import pytest
from flask.testing import FlaskClient
from peewee import fn

from daemon.accounts.endpoints import disable_endpoint, rotate_token
from daemon.calls import search
from daemon.calls.records import add_event
from daemon.store import Call, CallStatus, Endpoint
from tests.conftest import NOW, create, data_of

pytestmark = pytest.mark.stores("sqlite", "postgresql")

SERIAL = itertools.count(1)


def bulk_calls(endpoint: Endpoint, n: int, *, start: dt.datetime = NOW, status: str = "completed",
               scheduled: bool = False, step: float = 60.0) -> None:
    """Insert ``n`` calls for ``endpoint``, requested ``step`` seconds apart."""
    rows = []
    for i in range(n):
        at = start - dt.timedelta(seconds=step * (n - i))
        rows.append({"callid": f"{next(SERIAL):028x}", "endpoint": endpoint.get_id(),
                     "phone_a": "15550001001", "phone_b": "15550002002", "requested_at": at,
                     "due_at": at, "status": status, "scheduled": scheduled})
    for chunk in range(0, len(rows), 200):
        Call.insert_many(rows[chunk:chunk + 200]).execute()


def walk(client: FlaskClient, path: str, token: str, **params: Any) -> list[dict[str, Any]]:
    """Follow next_cursor to the end; return every call seen."""
    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(1000):
        query = dict(params, token=token)
        if cursor:
            query["cursor"] = cursor
        data = data_of(client.get(path, query_string=query))
        seen.extend(data["calls"])
        cursor = data["next_cursor"]
        if cursor is None:
            return seen
    raise AssertionError("cursor never ended")


def test_list_walks_every_call_once_newest_first(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint()
    other, _ = make_endpoint()
    bulk_calls(mine, 150)
    bulk_calls(other, 100)
    bulk_calls(mine, 153, start=NOW + dt.timedelta(days=1))
    seen = walk(client, "/v1/calls", token, limit=37)
    ids = [c["callid"] for c in seen]
    assert len(ids) == 303 == len(set(ids))
    query = Call.select().where(Call.endpoint == mine).order_by(Call.requested_at.desc())
    expected = [c.callid for c in query]
    assert ids == expected
    assert all(c["token_hint"] == mine.token_hint for c in seen)


def test_list_default_and_max_limit(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint()
    bulk_calls(mine, 260)
    data = data_of(client.get("/v1/calls", query_string={"token": token}))
    assert len(data["calls"]) == 50 and data["next_cursor"]
    data = data_of(client.get("/v1/calls", query_string={"token": token, "limit": "200"}))
    assert len(data["calls"]) == 200
    last = data_of(client.get("/v1/calls", query_string={"token": token, "limit": "200",
                                                          "cursor": data["next_cursor"]}))
    assert len(last["calls"]) == 60 and last["next_cursor"] is None


def test_empty_list(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    assert data_of(client.get("/v1/calls", headers={"Authorization": f"Bearer {token}"})) == {
        "calls": [], "next_cursor": None, "code": 200, "code_desc": ""}


@pytest.mark.parametrize(("params", "desc"), [
    ({"limit": "0"}, "limit: must be a whole number from 1 to 200"),
    ({"limit": "201"}, "limit: must be a whole number from 1 to 200"),
    ({"limit": "-1"}, "limit: must be a whole number from 1 to 200"),
    ({"limit": "ten"}, "limit: must be a whole number from 1 to 200"),
    ({"limit": "١٠"}, "limit: must be a whole number from 1 to 200"),  # Arabic-Indic digits
    ({"cursor": "garbage"}, "cursor: not a cursor this API gave out"),
    ({"cursor": "czE"}, "cursor: not a cursor this API gave out"),
    ({"status": "done"}, "status: unknown status"),
    ({"status": "completed,nope"}, "status: unknown status"),
    ({"from": "yesterday"}, "from: must be 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM'"),
    ({"to": "2026-13-01"}, "to: must be 'YYYY-MM-DD', 'YYYY-MM-DD HH:MM'"),
    ({"to": "9999-12-31"}, "to: out of range"),  # a real date: its end is past the calendar's
    ({"number": "555-0100"}, "number: digits (all or part of A's or B's number), with an optional leading +"),
    ({"number": "1" * 21}, "number: digits"),
    ({"number": "١٢٣"}, "number: digits"),  # Arabic-Indic digits
])
def test_list_query_rules(client: FlaskClient, make_endpoint: Any, params: dict[str, str], desc: str) -> None:
    _, token = make_endpoint()
    for path in ("/v1/calls", "/v1/scheduled"):
        if path == "/v1/scheduled" and set(params) & {"status", "from", "to", "number"}:
            continue
        response = client.get(path, query_string=dict(params, token=token))
        assert response.status_code == 400
        assert data_of(response)["code_desc"].startswith(desc)


def test_a_scheduled_cursor_is_refused_by_the_calls_list(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint()
    bulk_calls(mine, 5, status="scheduled", scheduled=True, start=NOW + dt.timedelta(days=1))
    cursor = data_of(client.get("/v1/scheduled", query_string={"token": token, "limit": 2}))["next_cursor"]
    response = client.get("/v1/calls", query_string={"token": token, "cursor": cursor})
    assert data_of(response)["code_desc"] == "cursor: not a cursor this API gave out"


def test_status_filter(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint()
    bulk_calls(mine, 30, status="completed")
    bulk_calls(mine, 20, status="failed", start=NOW + dt.timedelta(hours=2))
    bulk_calls(mine, 10, status="canceled", start=NOW + dt.timedelta(hours=4))
    failed = walk(client, "/v1/calls", token, status="failed", limit=7)
    assert len(failed) == 20 and {c["status"] for c in failed} == {"failed"}
    both = walk(client, "/v1/calls", token, status="failed, canceled", limit=7)
    assert len(both) == 30 and {c["status"] for c in both} == {"failed", "canceled"}


@pytest.mark.parametrize("params", [
    {"from": "0001-01-01"}, {"to": "0001-01-01"}, {"from": "0001-01-01T00:00:00+00:00"},
    {"from": "9999-12-31 23:58"}, {"to": "9999-12-31 23:58"}, {"to": "9999-12-31T23:59:00+00:00"},
])
def test_dates_at_the_ends_of_the_calendar_answer_and_never_fail(
        client: FlaskClient, make_endpoint: Any, params: dict[str, str]) -> None:
    """The search widens a date by a margin before it looks (daemon.calls.search): not past the calendar."""
    mine, token = make_endpoint()
    bulk_calls(mine, 3)
    response = client.get("/v1/calls", query_string=dict(params, token=token))
    assert response.status_code == 200, data_of(response)
    calls = data_of(response)["calls"]
    everything = params.get("from", "").startswith("0001") or params.get("to", "").startswith("9999")
    assert len(calls) == (3 if everything else 0)


def test_number_filter_finds_digits_in_either_number(client: FlaskClient, make_endpoint: Any,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A CRM looks up the calls of one customer: all of the number, or part of it, in A or in B. A page
    that examined its share of calls without filling up gives a cursor all the same (walk follows it)."""
    monkeypatch.setattr(search, "EXAMINED_PER_PAGE", 64)
    mine, token = make_endpoint()
    other, _ = make_endpoint()
    bulk_calls(mine, 100)
    Call.update(phone_b="+493012345678").where(Call.id == Call.select(fn.MIN(Call.id))).execute()
    bulk_calls(mine, 100)
    Call.update(phone_a="4930123456").where(Call.id == Call.select(fn.MAX(Call.id))).execute()
    bulk_calls(other, 1)
    Call.update(phone_b="493012345678").where(Call.endpoint == other.id).execute()  # not this token's
    found = walk(client, "/v1/calls", token, number="+4930123", limit=10)
    assert [(c["phone_a"], c["phone_b"]) for c in found] == [("4930123456", "15550002002"),
                                                             ("15550001001", "+493012345678")]
    assert walk(client, "/v1/calls", token, number="12345678") == found[1:]
    first = data_of(client.get("/v1/calls", query_string={"token": token, "number": "77777", "limit": 10}))
    assert first["calls"] == [] and first["next_cursor"] is not None
    assert walk(client, "/v1/calls", token, number="77777") == []
    response = client.get("/v1/scheduled", query_string={"token": token, "number": "4930"})
    assert response.status_code == 400 and data_of(response)["code_desc"].startswith("number: not a filter of")


def test_date_filters_in_endpoint_zone(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint(timezone="America/New_York")
    # One call per hour from 2026-06-13 12:00Z to 2026-06-15 11:00Z.
    bulk_calls(mine, 48, step=3600)
    day = walk(client, "/v1/calls", token, **{"from": "2026-06-14", "to": "2026-06-14"})
    # 2026-06-14 in New York is 04:00Z on the 14th to 04:00Z on the 15th: 24 hourly calls.
    assert len(day) == 24
    assert min(c["requested_at"] for c in day) == "2026-06-14T04:00:00.000Z"
    assert max(c["requested_at"] for c in day) == "2026-06-15T03:00:00.000Z"
    since = walk(client, "/v1/calls", token, **{"from": "2026-06-15T10:00:00Z"})
    assert [c["requested_at"] for c in since] == ["2026-06-15T11:00:00.000Z", "2026-06-15T10:00:00.000Z"]
    until = walk(client, "/v1/calls", token, to="2026-06-13 09:00")  # 13:00Z, exclusive
    assert [c["requested_at"] for c in until] == ["2026-06-13T12:00:00.000Z"]


def test_read_one_call_with_timeline(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    callid = data_of(create(client, token))["callid"]
    call = Call.get(Call.callid == callid)
    add_event(call, "a_answered", at=NOW + dt.timedelta(seconds=3), cause="")
    add_event(call, "ended", at=NOW + dt.timedelta(seconds=9), cause="USER_BUSY", leg="b")
    Call.update(status="failed", failed_leg="b", b_cause="USER_BUSY", ended_at=NOW + dt.timedelta(seconds=9),
                recording_path="/nonexistent/r.wav", recording_seconds=4.5, recording_bytes=72000).where(
        Call.callid == callid).execute()
    data = data_of(client.get(f"/v1/calls/{callid}", query_string={"token": token}))
    assert data["status"] == "failed" and data["failed_leg"] == "b" and data["b_cause"] == "USER_BUSY"
    assert data["ended_at"] == "2026-06-15T12:00:09.000Z"
    assert data["recording"] == {"seconds": 4.5, "bytes": 72000, "url": f"/v1/calls/{callid}/recording"}
    assert [(e["kind"], e["detail"]) for e in data["timeline"]] == [
        ("requested", {"due_at": "2026-06-15T12:00:00.000Z"}), ("a_answered", {}),
        ("ended", {"cause": "USER_BUSY", "leg": "b"})]
    assert data["timeline"][1]["at"] == "2026-06-15T12:00:03.000Z"
    # The file is gone: the recording route says so in the envelope.
    response = client.get(f"/v1/calls/{callid}/recording", query_string={"token": token})
    assert response.status_code == 404 and data_of(response)["code_desc"] == "recording: none for this call"


def test_recording_file_is_served_to_its_token_only(client: FlaskClient, make_endpoint: Any,
                                                    tmp_path: Any) -> None:
    _, token = make_endpoint()
    _, other = make_endpoint()
    callid = data_of(create(client, token))["callid"]
    wav = tmp_path / "rec.wav"
    wav.write_bytes(b"RIFF....WAVEfmt ")
    Call.update(recording_path=str(wav), recording_bytes=16).where(Call.callid == callid).execute()
    response = client.get(f"/v1/calls/{callid}/recording", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and response.data == wav.read_bytes()
    assert response.mimetype == "audio/wav"
    assert client.get(f"/v1/calls/{callid}/recording", query_string={"token": other}).status_code == 404


@pytest.mark.parametrize("callid", ["0" * 28, "nope", "x" * 41, "A" * 28, "%00"])
def test_unknown_callid_is_404(client: FlaskClient, make_endpoint: Any, callid: str) -> None:
    _, token = make_endpoint()
    response = client.get(f"/v1/calls/{callid}", query_string={"token": token})
    assert response.status_code == 404
    assert data_of(response)["code_desc"] == "callid: no such call for this token"


def test_tokens_never_see_each_others_calls(client: FlaskClient, make_endpoint: Any) -> None:
    _, alice = make_endpoint()
    _, bob = make_endpoint()
    callid = data_of(create(client, alice, call_date="2026-06-20 10:00"))["callid"]
    missing = client.get("/v1/calls/" + "0" * 28, query_string={"token": bob})
    theirs = client.get(f"/v1/calls/{callid}", query_string={"token": bob})
    assert theirs.status_code == 404 and theirs.get_json() == missing.get_json()
    assert data_of(client.get("/v1/calls", query_string={"token": bob}))["calls"] == []
    assert data_of(client.get("/v1/scheduled", query_string={"token": bob}))["calls"] == []
    for response in (client.delete(f"/v1/scheduled/{callid}", query_string={"token": bob}),
                     client.post(f"/v1/scheduled/{callid}/cancel", data={"token": bob})):
        assert response.status_code == 404
    assert Call.get(Call.callid == callid).status == "scheduled"
    assert len(data_of(client.get("/v1/scheduled", query_string={"token": alice}))["calls"]) == 1


def test_disabled_and_rotated_tokens_stop_at_once(client: FlaskClient, make_endpoint: Any) -> None:
    endpoint, token = make_endpoint()
    assert client.get("/v1/calls", query_string={"token": token}).status_code == 200
    new = rotate_token(endpoint)
    response = client.get("/v1/calls", query_string={"token": token})
    assert response.status_code == 401 and data_of(response)["code_desc"] == "token: invalid or disabled"
    assert client.get("/v1/calls", query_string={"token": new}).status_code == 200
    disable_endpoint(Endpoint.get_by_id(endpoint.get_id()))
    for response in (client.get("/v1/calls", query_string={"token": new}),
                     create(client, new),
                     client.get("/v1/scheduled", headers={"Authorization": f"Bearer {new}"})):
        assert response.status_code == 401
        assert data_of(response)["code_desc"] == "token: invalid or disabled"


def test_scheduled_list_soonest_first_pending_only(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint()
    later = NOW + dt.timedelta(days=2)
    bulk_calls(mine, 45, status="scheduled", scheduled=True, start=later, step=30)
    bulk_calls(mine, 15, status="queued", scheduled=True, start=later + dt.timedelta(seconds=1), step=60)
    bulk_calls(mine, 10, status="queued", scheduled=False, start=later)  # immediate: not listed
    bulk_calls(mine, 10, status="canceled", scheduled=True, start=later)  # final: not listed
    bulk_calls(mine, 10, status="dialing_a", scheduled=True, start=later)  # started: not listed
    # Same due time for several rows: the cursor's id tie-break must neither skip nor repeat them.
    Call.update(due_at=later).where(Call.endpoint == mine, Call.status == "scheduled",
                                    Call.due_at > later - dt.timedelta(minutes=5)).execute()
    seen = walk(client, "/v1/scheduled", token, limit=4)
    assert len(seen) == 60 == len({c["callid"] for c in seen})
    dues = [c["due_at"] for c in seen]
    assert dues == sorted(dues)
    assert {c["status"] for c in seen} == {"scheduled", "queued"}
    expected = [c.callid for c in Call.select().where(
        Call.endpoint == mine, Call.scheduled == True,  # noqa: E712
        Call.status.in_(["scheduled", "queued"])).order_by(Call.due_at, Call.id)]
    assert [c["callid"] for c in seen] == expected


@pytest.mark.parametrize("name, value", [("status", "failed"), ("from", "2027-04-15"), ("to", "2027-01-01")])
def test_the_calls_lists_filters_are_refused_by_the_scheduled_list_not_ignored(
        client: FlaskClient, make_endpoint: Any, name: str, value: str) -> None:
    """A client filtering the scheduled list would otherwise get every pending call and think it filtered."""
    _, token = make_endpoint()
    response = client.get("/v1/scheduled", query_string={"token": token, name: value})
    assert response.status_code == 400
    assert data_of(response)["code_desc"].startswith(f"{name}: not a filter of GET /v1/scheduled")


def test_a_query_parameter_given_twice_is_400_not_its_first_value(client: FlaskClient, make_endpoint: Any) -> None:
    """status=failed&status=completed read as "failed" alone would hide the completed calls the client asked
    for, and say nothing; the list form is status=failed,completed."""
    _, token = make_endpoint()
    for path, query in (("/v1/calls", "status=failed&status=completed"), ("/v1/calls", "limit=1&limit=200"),
                        ("/v1/scheduled", "cursor=a&cursor=b")):
        response = client.get(f"{path}?token={token}&{query}")
        assert response.status_code == 400
        name = query.split("=", 1)[0]
        assert data_of(response)["code_desc"] == f"{name}: given more than once; send each field once"
    assert client.get(f"/v1/calls?token={token}&status=failed,completed").status_code == 200


def test_every_status_value_filters(client: FlaskClient, make_endpoint: Any) -> None:
    mine, token = make_endpoint()
    for i, status in enumerate(CallStatus):
        bulk_calls(mine, 1, status=status.value, start=NOW + dt.timedelta(minutes=i))
    for status in CallStatus:
        response = client.get("/v1/calls", query_string={"token": token, "status": status.value})
        calls = data_of(response)["calls"]
        assert [c["status"] for c in calls] == [status.value]


def test_recording_answers_to_ranges_and_revalidation_are_documented(client: FlaskClient, make_endpoint: Any,
                                                                     tmp_path: Any, settings: Any) -> None:
    """Players ask for ranges and caches revalidate: every status the recording route answers them with is
    in the OpenAPI document, and a refusal is the envelope."""
    from webapi.openapi import openapi_document

    documented = openapi_document(settings)["paths"]["/v1/calls/{callid}/recording"]["get"]["responses"]
    _, token = make_endpoint()
    callid = data_of(create(client, token))["callid"]
    wav = tmp_path / "rec.wav"
    wav.write_bytes(b"RIFF....WAVEfmt ")
    Call.update(recording_path=str(wav), recording_bytes=16).where(Call.callid == callid).execute()
    url, auth = f"/v1/calls/{callid}/recording", {"Authorization": f"Bearer {token}"}
    etag = client.get(url, headers=auth).headers["ETag"]
    part = client.get(url, headers={**auth, "Range": "bytes=0-3"})
    assert part.status_code == 206 and part.data == b"RIFF"
    unsatisfiable = client.get(url, headers={**auth, "Range": "bytes=100-"})
    assert unsatisfiable.status_code == 416 and data_of(unsatisfiable)["code_desc"].startswith("Range: ")
    unchanged = client.get(url, headers={**auth, "If-None-Match": etag})
    assert unchanged.status_code == 304
    for response in (part, unsatisfiable, unchanged):
        assert str(response.status_code) in documented, (response.status_code, sorted(documented))
