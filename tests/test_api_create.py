"""POST /v1/calls: every field and rule, form and JSON alike, Bearer tokens, media, idempotency, DST."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask.testing import FlaskClient

from daemon.media.library import SpeechUnavailable
from daemon.store import Call, CallEvent
from tests.conftest import NOW, create, data_of
from tests.fakes import FakeDispatcher, FakeMedia, FixedClock

pytestmark = pytest.mark.stores("sqlite", "postgresql")

SEED_FIELDS = ("token", "phone_a", "phone_b", "play_url", "msg", "msg_lang", "code", "code_desc", "callid")


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_create_immediate_call_answers_the_seed_shape(client: FlaskClient, make_endpoint: Any,
                                                      dispatcher: FakeDispatcher, as_json: bool) -> None:
    endpoint, token = make_endpoint()
    response = create(client, token, json=as_json, msg="good morning", msg_lang="en-US", play_url="")
    assert response.status_code == 200
    data = data_of(response)
    for name in SEED_FIELDS:
        assert name in data
    assert data["token"] == token
    assert data["phone_a"] == "15550001001" and data["phone_b"] == "15550002002"
    assert data["msg"] == "good morning" and data["msg_lang"] == "en-US" and data["play_url"] == ""
    assert data["status"] == "queued" and data["call_date"] is None and data["scheduled"] is False
    assert data["due_at"] == "2026-06-15T12:00:00.000Z"
    assert len(data["callid"]) == 28
    assert data["token_hint"] == endpoint.token_hint and token not in data["token_hint"]
    call = Call.get(Call.callid == data["callid"])
    assert call.endpoint.get_id() == endpoint.get_id()
    assert call.due_at == NOW and call.requested_at == NOW and not call.scheduled
    assert call.msg_file.endswith(".wav")
    assert [e.kind for e in CallEvent.select().where(CallEvent.call == call)] == ["requested"]
    assert dispatcher.wakes == 1


def test_seed_php_client_form_with_every_field_empty_but_the_required(client: FlaskClient,
                                                                       make_endpoint: Any) -> None:
    _, token = make_endpoint()
    response = client.post("/v1/calls/", data={"token": token, "phone_a": "18323456789",
                                               "phone_b": "17134567890", "play_url": "", "msg": "",
                                               "msg_lang": "", "call_date": "", "dialtone_url": ""})
    assert response.status_code == 200, response.get_json()
    assert data_of(response)["status"] == "queued"


def test_bearer_token_and_json(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    response = client.post("/v1/calls", json={"phone_a": 15550001001, "phone_b": "+15550002002"},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    data = data_of(response)
    assert data["phone_a"] == "15550001001" and data["phone_b"] == "+15550002002"
    assert data["token"] == token


def test_scheduled_call_in_endpoint_zone(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint(timezone="Europe/Paris")
    data = data_of(create(client, token, call_date="2026-06-15 18:30"))
    assert data["status"] == "scheduled" and data["scheduled"] is True
    assert data["call_date"] == "2026-06-15 18:30"
    assert data["due_at"] == "2026-06-15T16:30:00.000Z"
    assert data["timezone"] == "Europe/Paris"


def test_iso_call_date_with_offset(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint(timezone="America/New_York")
    data = data_of(create(client, token, call_date="2026-06-16T09:00:00+02:00"))
    assert data["due_at"] == "2026-06-16T07:00:00.000Z"
    assert data["call_date"] == "2026-06-16 03:00"
    data = data_of(create(client, token, call_date="2026-06-16T09:00:00Z"))
    assert data["due_at"] == "2026-06-16T09:00:00.000Z"


def test_call_date_within_past_grace_is_now(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    data = data_of(create(client, token, call_date="2026-06-15 11:59"))
    assert data["status"] == "queued" and data["due_at"] == "2026-06-15T12:00:00.000Z"
    assert data["scheduled"] is True


def test_call_date_one_second_ahead_is_queued_further_is_scheduled(client: FlaskClient, make_endpoint: Any,
                                                                    clock: FixedClock) -> None:
    _, token = make_endpoint()
    clock.now = NOW.replace(second=59, microsecond=500_000)  # 12:00:59.5; 12:01 is 0.5 s ahead
    assert data_of(create(client, token, call_date="2026-06-15 12:01"))["status"] == "queued"
    assert data_of(create(client, token, call_date="2026-06-15 12:02"))["status"] == "scheduled"


@pytest.mark.parametrize(("zone", "local", "due_at", "shown"), [
    # Spring forward: 02:00 → 03:00; 02:30 does not exist and moves forward by the gap.
    ("America/New_York", "2027-03-14 02:30", "2027-03-14T07:30:00.000Z", "2027-03-14 03:30"),
    ("Europe/Berlin", "2027-03-28 02:30", "2027-03-28T01:30:00.000Z", "2027-03-28 03:30"),
    # Fall back: 01:30 (NY) / 02:30 (Berlin) happen twice; the first occurrence counts.
    ("America/New_York", "2026-11-01 01:30", "2026-11-01T05:30:00.000Z", "2026-11-01 01:30"),
    ("Europe/Berlin", "2026-10-25 02:30", "2026-10-25T00:30:00.000Z", "2026-10-25 02:30"),
    # Ordinary times either side.
    ("America/New_York", "2026-11-01 03:00", "2026-11-01T08:00:00.000Z", "2026-11-01 03:00"),
    ("Europe/Berlin", "2027-03-28 01:59", "2027-03-28T00:59:00.000Z", "2027-03-28 01:59"),
])
def test_dst_gap_and_overlap(client: FlaskClient, make_endpoint: Any, zone: str, local: str, due_at: str,
                             shown: str) -> None:
    _, token = make_endpoint(timezone=zone)
    data = data_of(create(client, token, call_date=local))
    assert (data["due_at"], data["call_date"]) == (due_at, shown)


# Field rules --------------------------------------------------------------------------------------

BAD_FIELDS = [
    ({"phone_a": None}, "phone_a: required"),
    ({"phone_b": ""}, "phone_b: required"),
    ({"phone_a": "12345"}, "phone_a: 7 to 15 digits"),
    ({"phone_a": "1234567890123456"}, "phone_a: 7 to 15 digits"),
    ({"phone_b": "1555-000-1234"}, "phone_b: 7 to 15 digits"),
    ({"phone_b": "++15550001234"}, "phone_b: 7 to 15 digits"),
    ({"phone_a": "1555000123\n"}, "phone_a: 7 to 15 digits"),
    ({"phone_a": "１５５５０００１２３４"}, "phone_a: 7 to 15 digits"),  # full-width digits
    ({"call_date": "2026-06-15"}, "call_date: must be 'YYYY-MM-DD HH:MM'"),  # a bare day is for list filters
    ({"call_date": "tomorrow"}, "call_date: must be 'YYYY-MM-DD HH:MM'"),
    ({"call_date": "2026-02-30 10:00"}, "call_date: must be 'YYYY-MM-DD HH:MM'"),
    ({"call_date": "2026-06-15 24:00"}, "call_date: must be 'YYYY-MM-DD HH:MM'"),
    ({"call_date": "2026-06-16T10:00:00"}, "call_date: ISO 8601 needs an offset"),
    ({"call_date": "2026-06-15 11:57"}, "call_date: in the past (more than 120 s ago)"),
    ({"call_date": "2027-06-17 12:00"}, "call_date: more than 366 days ahead"),
    ({"call_date": "9999-12-31T23:59:00-23:59"}, "call_date: "),
    ({"play_url": "ftp://example.com/a.wav"}, "play_url: must be an http or https URL"),
    ({"play_url": "file:///etc/passwd"}, "play_url: must be an http or https URL"),
    ({"play_url": "http://"}, "play_url: must be an http or https URL"),
    ({"play_url": "http://exa mple.com/a.wav"}, "play_url: must be an http or https URL"),
    ({"play_url": "http://[::1/a.wav"}, "play_url: must be an http or https URL"),
    ({"dialtone_url": "https://example.com/" + "a" * 2000}, "dialtone_url: at most 2000 characters"),
    ({"dialtone_url": "javascript:alert(1)"}, "dialtone_url: must be an http or https URL"),
    ({"msg": "hello"}, "msg_lang: required when msg is given"),
    ({"msg": "hello", "msg_lang": "en"}, "msg_lang: must be one of en-GB"),
    ({"msg": "hello", "msg_lang": "EN-us"}, "msg_lang: must be one of"),
    ({"msg": "x" * 501, "msg_lang": "en-US"}, "msg: at most 500 characters"),
    ({"msg": "line\nbreak", "msg_lang": "en-US"}, "msg: must not contain control characters"),
    ({"msg": "nul\x00", "msg_lang": "en-US"}, "msg: must not contain control characters"),
]


@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
@pytest.mark.parametrize(("fields", "desc"), BAD_FIELDS)
def test_each_field_rule_answers_400_naming_field_and_rule(client: FlaskClient, make_endpoint: Any,
                                                           fields: dict[str, Any], desc: str,
                                                           as_json: bool) -> None:
    _, token = make_endpoint()
    response = create(client, token, json=as_json, **fields)
    assert response.status_code == 400
    assert data_of(response)["code_desc"].startswith(desc)
    assert Call.select().count() == 0


@pytest.mark.parametrize(("value", "desc"), [
    (["15550001001"], "phone_a: must be a string"),
    ({"n": 1}, "phone_a: must be a string"),
    (True, "phone_a: must be a string"),
    (1.5, "phone_a: must be a string"),
    ("\ud800" * 8, "phone_a: must be valid Unicode text"),
])
def test_json_wrong_types(client: FlaskClient, make_endpoint: Any, value: Any, desc: str) -> None:
    _, token = make_endpoint()
    response = client.post("/v1/calls", json={"token": token, "phone_a": value, "phone_b": "15550002002"})
    assert response.status_code == 400
    assert data_of(response)["code_desc"] == desc


def test_msg_lang_without_msg_is_ignored_and_unknown_fields_too(client: FlaskClient,
                                                                make_endpoint: Any) -> None:
    _, token = make_endpoint()
    data = data_of(create(client, token, msg_lang="xx-XX", colour="blue", msg="   "))
    assert data["msg"] == "" and data["msg_lang"] == ""
    assert "colour" not in data


def test_every_language_is_accepted(client: FlaskClient, make_endpoint: Any, media: FakeMedia) -> None:
    from daemon.config import LANGUAGES

    _, token = make_endpoint()
    for lang in LANGUAGES:
        assert create(client, token, msg="bonjour", msg_lang=lang).status_code == 200
    assert sorted(r[1].split(":")[0] for r in media.requests if r[0] == "speak") == sorted(LANGUAGES)


def test_msg_at_the_limit_and_unicode(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    assert create(client, token, msg="é" * 500, msg_lang="fr-FR").status_code == 200
    assert data_of(create(client, token, msg="Привет, мир", msg_lang="ru-RU"))["msg"] == "Привет, мир"


def test_allowed_prefixes_apply_to_both_numbers(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint(allowed_prefixes="1555,+44")
    assert create(client, token, phone_a="15550001001", phone_b="+447700900123").status_code == 200
    response = create(client, token, phone_a="12125550100")
    assert response.status_code == 400
    assert data_of(response)["code_desc"].startswith("phone_a: not allowed for this endpoint")
    response = create(client, token, phone_b="33123456789")
    assert data_of(response)["code_desc"].startswith("phone_b: not allowed for this endpoint")


def test_extension_pattern_admits_short_numbers(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint(extension_pattern=r"2[0-9]{2}", allowed_prefixes="1555")
    data = data_of(create(client, token, phone_a="201", phone_b="15550002002"))
    assert data["phone_a"] == "201"
    response = create(client, token, phone_a="2011")  # full match only
    assert response.status_code == 400
    assert "extension matching the endpoint's pattern" in data_of(response)["code_desc"]
    _, plain = make_endpoint()
    assert data_of(create(client, plain, phone_a="201"))["code_desc"].startswith("phone_a: 7 to 15 digits")


# Media --------------------------------------------------------------------------------------------

def test_media_is_fetched_before_insert_and_paths_stored(client: FlaskClient, make_endpoint: Any,
                                                         media: FakeMedia) -> None:
    _, token = make_endpoint()
    data = data_of(create(client, token, play_url="https://example.com/p.mp3", msg="hi", msg_lang="en-GB",
                          dialtone_url="http://example.com/t.wav"))
    assert media.requests == [("play", "https://example.com/p.mp3"), ("speak", "en-GB:hi"),
                              ("dialtone", "http://example.com/t.wav")]
    call = Call.get(Call.callid == data["callid"])
    assert call.play_file and call.msg_file and call.dialtone_file
    assert len({call.play_file, call.msg_file, call.dialtone_file}) == 3


def test_a_password_in_a_media_url_is_used_for_the_fetch_and_never_shown(client: FlaskClient,
                                                                          make_endpoint: Any,
                                                                          media: FakeMedia) -> None:
    """The answer, the lists and every webhook show the call's URLs: a media server's password in one is
    fetched with (Basic auth) but shown as ****."""
    _, token = make_endpoint()
    play, tone = "https://u:s3cret@media.example/p.wav", "http://t:0ther@media.example/t.wav?x=1"
    data = data_of(create(client, token, play_url=play, dialtone_url=tone))
    assert media.requests == [("play", play), ("dialtone", tone)]
    assert (data["play_url"], data["dialtone_url"]) == ("https://u:****@media.example/p.wav",
                                                        "http://t:****@media.example/t.wav?x=1")
    listed = client.get("/v1/calls", query_string={"token": token}).get_data(as_text=True)
    one = client.get(f"/v1/calls/{data['callid']}", query_string={"token": token}).get_data(as_text=True)
    assert "u:****@" in listed and "u:****@" in one
    assert not any(secret in text for secret in ("s3cret", "0ther") for text in (listed, one))
    assert Call.get(Call.callid == data["callid"]).play_url == play  # stored as given: the fetch needs it


@pytest.mark.parametrize(("field", "value", "extra"), [
    ("play_url", "https://example.com/missing.wav", {}),
    ("dialtone_url", "https://example.com/missing.wav", {}),
    ("msg", "unspeakable", {"msg_lang": "de-DE"}),
])
def test_media_failure_is_400_with_its_reason(client: FlaskClient, make_endpoint: Any, media: FakeMedia,
                                              dispatcher: FakeDispatcher, field: str, value: str,
                                              extra: dict[str, str]) -> None:
    _, token = make_endpoint()
    media.fail[value] = "HTTP 404 from example.com"
    fields: dict[str, Any] = {field: value, **extra}
    response = create(client, token, **fields)
    assert response.status_code == 400
    assert data_of(response)["code_desc"] == f"{field}: HTTP 404 from example.com"
    assert Call.select().count() == 0 and dispatcher.wakes == 0


def test_media_store_oserror_is_503(client: FlaskClient, make_endpoint: Any, media: FakeMedia) -> None:
    _, token = make_endpoint()

    def disk_full(seed: str) -> None:
        raise OSError(28, "No space left on device")

    media.before_fetch = disk_full
    response = create(client, token, play_url="https://example.com/a.wav")
    assert response.status_code == 503
    assert data_of(response)["code_desc"].startswith("play_url: the media store is unavailable")


def test_a_voice_the_servers_engine_lacks_is_503_not_the_clients_400(client: FlaskClient, make_endpoint: Any,
                                                                      media: FakeMedia) -> None:
    _, token = make_endpoint()

    def no_such_voice(seed: str) -> None:  # what MediaLibrary raises for a worker's speech_setup answer
        raise SpeechUnavailable("could not be spoken with voice xx-nowhere: no such voice in the bundled speech engine")

    media.before_fetch = no_such_voice
    response = create(client, token, msg="Hello", msg_lang="de-DE")
    assert response.status_code == 503 and response.headers["Retry-After"] == "60"
    assert data_of(response)["code_desc"] == ("msg: could not be spoken with voice xx-nowhere: no such voice in the "
                                              "bundled speech engine; the server's speech settings need the operator")
    assert Call.select().count() == 0


# Auth ---------------------------------------------------------------------------------------------

def test_auth_comes_before_field_checks(client: FlaskClient, make_endpoint: Any) -> None:
    make_endpoint()
    response = create(client, None, phone_a="nonsense")
    assert response.status_code == 401 and data_of(response)["code_desc"] == "token: missing"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    response = create(client, "cb_wrong", phone_a="nonsense")
    assert response.status_code == 401 and data_of(response)["code_desc"] == "token: invalid or disabled"


@pytest.mark.parametrize("token", [12345, ["cb_x"], "x" * 5000])
def test_odd_tokens_are_401(client: FlaskClient, make_endpoint: Any, token: Any) -> None:
    body = {"token": token, "phone_a": "15550001001", "phone_b": "15550002002"}
    response = client.post("/v1/calls", json=body)
    assert response.status_code == 401


def test_bearer_wins_over_field(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    response = client.post("/v1/calls", data={"token": "cb_wrong", "phone_a": "15550001001",
                                               "phone_b": "15550002002"},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


# Idempotency --------------------------------------------------------------------------------------

def test_idempotency_key_returns_the_same_call(client: FlaskClient, make_endpoint: Any,
                                               dispatcher: FakeDispatcher, media: FakeMedia) -> None:
    _, token = make_endpoint()
    first = data_of(create(client, token, headers={"Idempotency-Key": "order-17"}, play_url="http://e.com/a.wav"))
    again = data_of(create(client, token, headers={"Idempotency-Key": "order-17"}, play_url="http://e.com/a.wav"))
    assert first["callid"] == again["callid"]
    assert Call.select().count() == 1 and dispatcher.wakes == 1
    assert len(media.requests) == 1  # the repeat fetched nothing
    other = data_of(create(client, token, headers={"Idempotency-Key": "order-18"}))
    assert other["callid"] != first["callid"]


def test_idempotency_key_is_per_endpoint(client: FlaskClient, make_endpoint: Any) -> None:
    _, one = make_endpoint()
    _, two = make_endpoint()
    a = data_of(create(client, one, headers={"Idempotency-Key": "k"}))
    b = data_of(create(client, two, headers={"Idempotency-Key": "k"}))
    assert a["callid"] != b["callid"] and Call.select().count() == 2


def test_idempotency_race_on_insert_returns_the_winner(client: FlaskClient, make_endpoint: Any,
                                                       media: FakeMedia) -> None:
    """The unique index catches a concurrent insert that landed between our look-up and our insert."""
    endpoint, token = make_endpoint()
    winner: dict[str, str] = {}

    def concurrent_insert(seed: str) -> None:
        call = Call.create(callid="f" * 28, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                           idempotency_key="race", due_at=NOW, status="queued")
        winner["callid"] = call.callid
        media.before_fetch = None

    media.before_fetch = concurrent_insert
    data = data_of(create(client, token, headers={"Idempotency-Key": "race"}, play_url="http://e.com/a.wav"))
    assert data["callid"] == winner["callid"] == "f" * 28
    assert Call.select().count() == 1


def test_idempotency_key_rules(client: FlaskClient, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    response = create(client, token, headers={"Idempotency-Key": "k" * 201})
    assert response.status_code == 400
    assert data_of(response)["code_desc"] == "Idempotency-Key: at most 200 characters"
    assert create(client, token, headers={"Idempotency-Key": "k" * 200}).status_code == 200


def test_clock_is_used_for_requested_at(client: FlaskClient, make_endpoint: Any, clock: FixedClock) -> None:
    _, token = make_endpoint()
    clock.advance(3600)
    data = data_of(create(client, token))
    assert data["requested_at"] == (NOW + dt.timedelta(hours=1)).isoformat(timespec="milliseconds") + "Z"
