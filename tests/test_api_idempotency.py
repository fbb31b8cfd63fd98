"""Idempotency-Key on POST /v1/calls: the same request gets the first answer; the same key with a
different request answers 422 naming the key, and creates nothing."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from flask.testing import FlaskClient

from daemon import store
from daemon.config import Settings
from daemon.store import Call, open_database, schema_version
from tests.conftest import NOW, create, data_of
from tests.fakes import FakeDispatcher, FakeMedia, FixedClock

FULL = {"phone_a": "15550001001", "phone_b": "15550002002", "call_date": "2026-06-16 09:00",
        "play_url": "http://e.com/a.wav", "msg": "hello", "msg_lang": "en-US",
        "dialtone_url": "http://e.com/tone.wav"}
KEY = {"Idempotency-Key": "order-17"}


@pytest.mark.parametrize("field,other", [
    ("phone_a", "15550001999"), ("phone_b", "15550002999"), ("call_date", "2026-06-16 09:01"),
    ("play_url", "http://e.com/b.wav"), ("msg", "hello again"), ("msg_lang", "en-GB"),
    ("dialtone_url", "http://e.com/other.wav"), ("call_date", None), ("play_url", None),
])
def test_same_key_with_a_different_request_is_422_and_creates_nothing(
        client: FlaskClient, make_endpoint: Any, dispatcher: FakeDispatcher, media: FakeMedia,
        field: str, other: str | None) -> None:
    _, token = make_endpoint()
    first = data_of(create(client, token, headers=KEY, **FULL))
    fetched = len(media.requests)
    response = create(client, token, headers=KEY, **{**FULL, field: other})
    assert response.status_code == 422
    assert data_of(response)["code_desc"].startswith(
        "Idempotency-Key: reused with a different request; use a new key")
    assert Call.select().count() == 1 and dispatcher.wakes == 0  # scheduled: due later than its next look
    assert len(media.requests) == fetched  # refused before any media fetch
    stored = Call.get()
    assert stored.callid == first["callid"] and stored.phone_a == FULL["phone_a"] and stored.msg == "hello"
    # The first request, repeated unchanged, still gets its answer.
    assert data_of(create(client, token, headers=KEY, **FULL))["callid"] == first["callid"]


def test_form_and_json_bodies_of_one_request_match(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    form = data_of(create(client, token, headers=KEY, **FULL))
    as_json = create(client, None, json=True, headers={**KEY, "Authorization": f"Bearer {token}"},
                     **{**FULL, "phone_a": 15550001001, "phone_b": 15550002002})  # JSON numbers
    assert as_json.status_code == 200, as_json.get_json()
    assert data_of(as_json)["callid"] == form["callid"] and Call.select().count() == 1


def test_call_date_is_the_instant_written_not_its_spelling(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint(timezone="Europe/Paris")
    local = data_of(create(client, token, headers=KEY, call_date="2026-06-16 09:00"))
    iso = create(client, token, headers=KEY, call_date="2026-06-16T07:00:00Z")  # the same instant (CEST)
    assert iso.status_code == 200 and data_of(iso)["callid"] == local["callid"]
    assert create(client, token, headers=KEY, call_date="2026-06-16T09:00:00Z").status_code == 422


def test_a_retry_of_a_date_just_past_matches_although_its_due_time_moved(
        client: FlaskClient, make_endpoint: Any, clock: FixedClock) -> None:
    """A call_date a minute ago is due "now"; its retry, later, must still be the same request."""
    _, token = make_endpoint()
    first = data_of(create(client, token, headers=KEY, call_date="2026-06-15 11:59"))  # NOW is 12:00
    clock.advance(30)
    again = create(client, token, headers=KEY, call_date="2026-06-15 11:59")
    assert again.status_code == 200 and data_of(again)["callid"] == first["callid"]


def test_a_retry_after_the_call_date_passed_gets_the_call_it_made(
        client: FlaskClient, make_endpoint: Any, clock: FixedClock) -> None:
    """The answer to a call scheduled a minute ahead is lost; the retry comes minutes later, its call_date
    now past the grace: it gets the call it made (which may have rung already), not a 400 that leads the
    client to create it again. A different request under the key is still a 422."""
    _, token = make_endpoint()
    scheduled = data_of(create(client, token, headers=KEY, call_date="2026-06-15 12:01"))  # NOW is 12:00
    just_past = data_of(create(client, token, headers={"Idempotency-Key": "k2"}, call_date="2026-06-15 11:59"))
    clock.advance(5 * 60)
    again = create(client, token, headers=KEY, call_date="2026-06-15 12:01")
    assert again.status_code == 200 and data_of(again)["callid"] == scheduled["callid"]
    again = create(client, token, headers={"Idempotency-Key": "k2"}, call_date="2026-06-15 11:59")
    assert again.status_code == 200 and data_of(again)["callid"] == just_past["callid"]
    assert create(client, token, headers=KEY, call_date="2026-06-15 12:02").status_code == 422
    assert Call.select().count() == 2


def test_a_call_stored_before_fingerprints_matches_any_request(client: FlaskClient, make_endpoint: Any) -> None:
    endpoint, token = make_endpoint()
    Call.create(callid="e" * 28, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                idempotency_key="old", due_at=NOW, status="queued")  # no request_fingerprint
    response = create(client, token, headers={"Idempotency-Key": "old"}, phone_a="15550001777")
    assert response.status_code == 200 and data_of(response)["callid"] == "e" * 28


def test_the_insert_race_winner_with_a_different_request_is_422(client: FlaskClient, make_endpoint: Any,
                                                                 media: FakeMedia) -> None:
    """Two different requests with one key meet inside the media fetch: the loser answers 422."""
    endpoint, token = make_endpoint()

    def concurrent_insert(seed: str) -> None:
        media.before_fetch = None
        data_of(create(client, token, headers={"Idempotency-Key": "race"}, phone_b="15550002999"))

    media.before_fetch = concurrent_insert
    response = create(client, token, headers={"Idempotency-Key": "race"}, play_url="http://e.com/a.wav")
    assert response.status_code == 422
    assert data_of(response)["code_desc"].startswith("Idempotency-Key: reused with a different request")
    assert Call.select().count() == 1 and Call.get().phone_b == "15550002999"


def test_without_a_key_nothing_is_fingerprinted(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    data_of(create(client, token, **FULL))
    data_of(create(client, token, **FULL))
    assert [c.request_fingerprint for c in Call.select()] == [None, None]


def test_migration_v4_adds_the_fingerprint_column_and_keeps_rows(settings: Settings, make_endpoint: Any) -> None:
    """A database at version 3 (before fingerprints) gets the column; its calls stay and match any request."""
    endpoint, _ = make_endpoint()
    Call.create(callid="a" * 28, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                idempotency_key="k", due_at=NOW, status="queued")
    path = settings.database_url[len("sqlite:///"):]
    store.database.obj.close()
    raw = sqlite3.connect(path)
    raw.execute("ALTER TABLE call DROP COLUMN request_fingerprint")  # as version 3 left it
    raw.execute("DELETE FROM schemaversion WHERE version >= 4")
    raw.commit()
    raw.close()
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS)
    assert "request_fingerprint" in {c.name for c in db.get_columns("call")}
    kept = Call.get()
    assert kept.callid == "a" * 28 and kept.request_fingerprint is None
    db.close()
