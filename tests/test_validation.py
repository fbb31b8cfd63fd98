"""webapi.validation on its own: rules, the DST rule, cursors; nothing but ValidationError escapes."""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.calls.view import utc_to_local_text
from daemon.config import LANGUAGES, Settings, load_settings
from webapi.validation import (
    ValidationError,
    decode_due_cursor,
    decode_id_cursor,
    encode_due_cursor,
    encode_id_cursor,
    local_to_utc,
    parse_call_date,
    parse_create,
    parse_idempotency_key,
    parse_instant,
    parse_lang,
    parse_limit,
    parse_list_query,
    parse_msg,
    parse_phone,
    parse_url,
)

NOW = dt.datetime(2026, 6, 15, 12, 0)
UTC = ZoneInfo("UTC")


@pytest.fixture(scope="module")
def conf() -> Settings:
    return load_settings(environ={}, state_dir="/tmp/cb-validation-unused")


def rule(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(ValidationError) as info:
        call(*args, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(("zone", "local", "utc"), [
    ("America/New_York", dt.datetime(2027, 3, 14, 2, 0), dt.datetime(2027, 3, 14, 7, 0)),  # gap start → 03:00
    ("America/New_York", dt.datetime(2027, 3, 14, 2, 59), dt.datetime(2027, 3, 14, 7, 59)),
    ("America/New_York", dt.datetime(2027, 3, 14, 3, 0), dt.datetime(2027, 3, 14, 7, 0)),
    ("America/New_York", dt.datetime(2026, 11, 1, 1, 0), dt.datetime(2026, 11, 1, 5, 0)),  # first 01:00 (EDT)
    ("America/New_York", dt.datetime(2026, 11, 1, 1, 59), dt.datetime(2026, 11, 1, 5, 59)),
    ("America/New_York", dt.datetime(2026, 11, 1, 2, 0), dt.datetime(2026, 11, 1, 7, 0)),
    ("Europe/Berlin", dt.datetime(2027, 3, 28, 2, 15), dt.datetime(2027, 3, 28, 1, 15)),
    ("Europe/Berlin", dt.datetime(2026, 10, 25, 2, 15), dt.datetime(2026, 10, 25, 0, 15)),
    ("Australia/Lord_Howe", dt.datetime(2026, 10, 4, 2, 15), dt.datetime(2026, 10, 3, 15, 45)),  # 30-min gap
    ("UTC", dt.datetime(2026, 6, 15, 12, 0), dt.datetime(2026, 6, 15, 12, 0)),
])
def test_dst_rule(zone: str, local: dt.datetime, utc: dt.datetime) -> None:
    assert local_to_utc(local, ZoneInfo(zone)) == utc


def test_gap_moves_forward_by_the_gap_length() -> None:
    ny = ZoneInfo("America/New_York")
    for minute in (0, 1, 30, 59):
        local = dt.datetime(2027, 3, 14, 2, minute)
        assert utc_to_local_text(local_to_utc(local, ny), ny) == f"2027-03-14 03:{minute:02d}"
    lh = ZoneInfo("Australia/Lord_Howe")
    assert utc_to_local_text(local_to_utc(dt.datetime(2026, 10, 4, 2, 10), lh), lh) == "2026-10-04 02:40"


@given(st.datetimes(min_value=dt.datetime(2000, 1, 2), max_value=dt.datetime(2100, 1, 1)),
       st.sampled_from(["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "Asia/Kolkata", "UTC"]))
@hsettings(max_examples=300, deadline=None, database=None)
def test_every_local_time_maps_to_a_time_not_before_it(local: dt.datetime, zone: str) -> None:
    """Existing times round-trip; skipped times land later, never earlier, by less than two hours."""
    tz = ZoneInfo(zone)
    local = local.replace(second=0, microsecond=0)
    shown = dt.datetime.strptime(utc_to_local_text(local_to_utc(local, tz), tz), "%Y-%m-%d %H:%M")
    assert dt.timedelta(0) <= shown - local < dt.timedelta(hours=2)


@pytest.mark.parametrize("number", ["1555000", "+155500012345678"[:16], "15550001234", "+4930123456"])
def test_phone_ok(number: str) -> None:
    assert parse_phone(number, "phone_a") == number


@pytest.mark.parametrize(("number", "expected"), [
    ("", "phone_a: required"),
    ("155500", "phone_a: 7 to 15 digits with an optional leading +"),
    ("1555000123\n", "phone_a: 7 to 15 digits with an optional leading +"),
    ("+", "phone_a: 7 to 15 digits with an optional leading +"),
    ("1555 0001234", "phone_a: 7 to 15 digits with an optional leading +"),
    ("١٥٥٥٠٠٠١٢٣٤", "phone_a: 7 to 15 digits with an optional leading +"),
])
def test_phone_rules(number: str, expected: str) -> None:
    assert rule(parse_phone, number, "phone_a") == expected


def test_phone_extension_and_prefixes() -> None:
    assert parse_phone("42", "phone_b", extension_pattern=r"[0-9]{2}") == "42"
    assert rule(parse_phone, "4\n", "phone_b", extension_pattern=r"4.").startswith("phone_b: 7 to 15")
    assert rule(parse_phone, "42", "phone_b", extension_pattern="(").startswith("phone_b: 7 to 15")
    # A pattern stored before repeated groups were refused admits nothing: its match could take minutes
    # (this one: 20 ones and no 2) on the loop that runs every call.
    assert rule(parse_phone, "1" * 20, "phone_b", extension_pattern="((1+)+)+2").startswith("phone_b: 7 to 15")
    assert parse_phone("+15550001234", "phone_a", allowed_prefixes="1555") == "+15550001234"
    assert rule(parse_phone, "12125550100", "phone_a", allowed_prefixes="1555, 44").startswith(
        "phone_a: not allowed for this endpoint (allowed prefixes: 1555, 44)")


def test_call_date(conf: Settings) -> None:
    tz = ZoneInfo("Europe/Paris")
    assert parse_call_date("", tz, NOW, conf) is None
    assert parse_call_date("2026-06-15 16:00", tz, NOW, conf) == dt.datetime(2026, 6, 15, 14, 0)
    assert parse_call_date("2026-06-15 13:59", tz, NOW, conf) == NOW  # 1 min ago: now
    assert rule(parse_call_date, "2026-06-15 13:57", tz, NOW, conf) == (
        "call_date: in the past (more than 120 s ago)")
    assert parse_call_date("2027-06-16T12:00:00Z", tz, NOW, conf) == dt.datetime(2027, 6, 16, 12, 0)
    assert rule(parse_call_date, "2027-06-16T12:01:00Z", tz, NOW, conf) == (
        "call_date: more than 366 days ahead")
    assert rule(parse_call_date, "2026-06-16T12:01:00", tz, NOW, conf).startswith("call_date: ISO 8601 needs")
    assert rule(parse_call_date, "2026-06-16 10:00:00", tz, NOW, conf).startswith("call_date: ISO 8601 needs")
    for bad in ("2026-06-16", "16/06/2026 10:00", "2026-6-16 10:00", "2026-06-16 10:00\n",
                "0000-01-01 00:00", "x" * 100):
        assert rule(parse_call_date, bad, tz, NOW, conf).startswith("call_date: must be"), bad


def test_instant_day_forms() -> None:
    ny = ZoneInfo("America/New_York")
    assert parse_instant("2026-06-14", "from", ny, days=True) == dt.datetime(2026, 6, 14, 4, 0)
    assert parse_instant("2026-06-14", "to", ny, days=True, day_end=True) == dt.datetime(2026, 6, 15, 4, 0)
    assert rule(parse_instant, "2026-06-14", "call_date", ny).startswith("call_date: must be")


@pytest.mark.parametrize("url", ["http://example.com/a.wav", "HTTPS://example.com:8443/x?y=1#z",
                                 "http://[2001:db8::1]/a.mp3", "http://127.0.0.1/a%20b.wav"])
def test_url_ok(url: str) -> None:
    assert parse_url(url, "play_url") == url


@pytest.mark.parametrize("url", ["example.com/a.wav", "ftp://example.com/a", "http:///a", "http://exämple.com/",
                                 "http://example.com/a b", "http://[::1", "shell_stream:///bin/sh",
                                 "http://example.com/\r\nX: y", "data:audio/wav;base64,AAAA"])
def test_url_rules(url: str) -> None:
    assert rule(parse_url, url, "play_url").startswith("play_url: must be an http or https URL")


def test_url_length() -> None:
    assert parse_url("http://e.com/" + "a" * 1987, "x") and len("http://e.com/" + "a" * 1987) == 2000
    assert rule(parse_url, "http://e.com/" + "a" * 1988, "x") == "x: at most 2000 characters"


def test_msg_and_lang(conf: Settings) -> None:
    assert parse_msg("  ", conf) == ""
    assert parse_msg("ok ✓", conf) == "ok ✓"
    assert rule(parse_msg, "tab\there", conf).startswith("msg: must not contain control characters")
    assert rule(parse_msg, "del\x7f", conf).startswith("msg: must not contain control characters")
    assert parse_lang("nonsense", "") == ""
    for lang in LANGUAGES:
        assert parse_lang(lang, "hi") == lang
    assert rule(parse_lang, "", "hi").startswith("msg_lang: required when msg is given")


def test_limits_and_keys() -> None:
    assert parse_limit("") == 50 and parse_limit("1") == 1 and parse_limit("200") == 200
    assert rule(parse_limit, "²") == "limit: must be a whole number from 1 to 200"
    assert rule(parse_limit, "9" * 5000) == "limit: must be a whole number from 1 to 200"
    assert rule(parse_limit, "0050") == "limit: must be a whole number from 1 to 200"
    assert parse_idempotency_key("") is None and parse_idempotency_key(None) is None
    assert rule(parse_idempotency_key, "a\x01") == "Idempotency-Key: printable ASCII only"


@pytest.mark.parametrize("raw", ["c1|99999999999999999999999", "c1|0", "c1|-1", "c1|１",
                                 "s1|2026-06-15T12:00|0", "s1|2026-06-15T12:00+01:00|5", "s1|x|5", "c1|5|6",
                                 "s1|2026-06-15T12:00|" + "9" * 30])
def test_forged_cursors_are_400(raw: str) -> None:
    import base64

    forged = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    for decode in (decode_id_cursor, decode_due_cursor):
        assert rule(decode, forged) == "cursor: not a cursor this API gave out"


def test_cursors_round_trip() -> None:
    assert decode_id_cursor(encode_id_cursor(12345)) == 12345
    when = dt.datetime(2026, 6, 15, 12, 0, 0, 123000)
    assert decode_due_cursor(encode_due_cursor(when, 7)) == (when, 7)
    assert rule(decode_id_cursor, encode_due_cursor(when, 7)) == "cursor: not a cursor this API gave out"
    assert rule(decode_due_cursor, encode_id_cursor(7)) == "cursor: not a cursor this API gave out"


@given(st.text(max_size=300))
@hsettings(max_examples=300, deadline=None, database=None)
def test_cursor_decoding_never_raises_anything_else(value: str) -> None:
    for decode in (decode_id_cursor, decode_due_cursor):
        try:
            decode(value)
        except ValidationError as exc:
            assert exc.field == "cursor"


FIELD = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["15550001234", "+4930123456", "en-US",
                  "2026-06-16 10:00", "2027-03-14 02:30", "http://example.com/a.wav", "2026-06-16T10:00Z"]),
                  st.integers(), st.booleans(), st.lists(st.integers(), max_size=2), st.floats())


@given(st.fixed_dictionaries({}, optional={name: FIELD for name in (
    "phone_a", "phone_b", "call_date", "play_url", "msg", "msg_lang", "dialtone_url", "other")}),
    st.sampled_from(["", "1555", "44,1"]), st.sampled_from(["", "[0-9]{3}"]))
@hsettings(max_examples=400, deadline=None, database=None)
def test_parse_create_only_ever_raises_validation_errors(values: dict[str, Any], prefixes: str,
                                                         pattern: str) -> None:
    conf = load_settings(environ={}, state_dir="/tmp/cb-validation-unused")
    try:
        req = parse_create(values, extension_pattern=pattern, allowed_prefixes=prefixes,
                           tz=ZoneInfo("America/New_York"), now=NOW, settings=conf)
    except ValidationError as exc:
        assert str(exc).startswith(exc.field + ": ") and exc.rule
        return
    assert req.due_at >= NOW and (req.msg == "" or req.msg_lang in LANGUAGES)


@given(st.dictionaries(st.sampled_from(["limit", "cursor", "status", "from", "to", "x"]),
                       st.one_of(st.text(max_size=30),
                                 st.sampled_from(["2026-06-14", "completed,failed", "5"]))))
@hsettings(max_examples=300, deadline=None, database=None)
def test_parse_list_query_only_ever_raises_validation_errors(args: dict[str, str]) -> None:
    try:
        parse_list_query(args, UTC)
    except ValidationError as exc:
        assert exc.field in args
