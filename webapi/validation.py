"""Request parsing and validation: raw request values in, checked values or a ValidationError out.

Every rule a client can break is here, once, and each failure is a :class:`ValidationError` whose
text names the field and the rule (``"phone_a: 7 to 15 digits with an optional leading +"``). Nothing
in this module raises anything else for any input, so no request can turn into a 500.

Rules worth knowing (the OpenAPI document repeats them):

* Empty strings count as absent (the seed's PHP client sends every field, empty or not).
* Unknown fields are ignored.
* ``call_date`` is ``YYYY-MM-DD HH:MM`` in the endpoint's time zone, or ISO 8601 with an offset.
  DST: a local time that a spring-forward change skips is moved forward by the length of the gap
  (02:30 in a 02:00→03:00 gap is 03:30); a local time that a fall-back change repeats means its first
  occurrence (the earlier instant, ``fold=0``).
* A ``call_date`` up to ``past_grace`` seconds in the past is taken as "now"; further back is refused,
  as is one more than ``schedule_max_days`` ahead.
* ``msg_lang`` is required when ``msg`` is given and ignored when ``msg`` is empty.
* An endpoint's ``extension_pattern`` admits short internal numbers (full match); ``allowed_prefixes``
  restricts the other, public numbers.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import functools
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from daemon.accounts.endpoints import slow_to_match
from daemon.config import LANGUAGES, Settings
from daemon.store import CALLID_RE, CallStatus

PHONE_RE = re.compile(r"^\+?[0-9]{7,15}$")
EXTENSION_CHARS_RE = re.compile(r"^\+?[0-9]{1,20}$")  # what the engine can dial at all
LOCAL_DATE_RE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2})$")
DAY_RE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})$")
URL_MAX = 2000
IDEMPOTENCY_KEY_MAX = 200
LIMIT_MAX = 200
LIMIT_DEFAULT = 50
UTC = dt.UTC
MAX_ROW_ID = 2**63 - 1  # SQLite's INTEGER; a bigger cursor id must be a 400, not a driver error


class ValidationError(ValueError):
    """A request value broke a rule; ``str()`` is ``"<field>: <rule>"``."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


def text(values: Mapping[str, Any], name: str, *, numbers: bool = False) -> str:
    """The field as text, ``""`` when absent; JSON numbers are accepted where ``numbers`` is set."""
    raw = values.get(name)
    if raw is None:
        return ""
    if numbers and isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    if not isinstance(raw, str):
        raise ValidationError(name, "must be a string")
    if any(unicodedata.category(ch) == "Cs" for ch in raw):
        raise ValidationError(name, "must be valid Unicode text")
    return raw


@functools.lru_cache(maxsize=256)
def _safe_pattern(pattern: str) -> bool:
    """A pattern stored before the rule existed that could take exponential time admits nothing: matching
    runs on the event loop (see daemon.accounts.endpoints.slow_to_match)."""
    return slow_to_match(pattern) is None


def parse_phone(value: str, field: str, *, extension_pattern: str = "", allowed_prefixes: str = "") -> str:
    """A number to dial: 7–15 digits with an optional ``+``, or a full match of the extension pattern.

    ``allowed_prefixes`` (comma-separated digit prefixes, empty = any) applies to public numbers; an
    extension admitted by the endpoint's own pattern is internal and not subject to it.
    """
    if not value:
        raise ValidationError(field, "required")
    if extension_pattern and EXTENSION_CHARS_RE.fullmatch(value) and _safe_pattern(extension_pattern):
        try:
            if re.fullmatch(extension_pattern, value):
                return value
        except (re.error, OverflowError):
            pass  # an operator's broken pattern admits nothing
    if not PHONE_RE.fullmatch(value):
        rule = "7 to 15 digits with an optional leading +"
        if extension_pattern:
            rule += ", or an extension matching the endpoint's pattern"
        raise ValidationError(field, rule)
    prefixes = [p.strip().lstrip("+") for p in allowed_prefixes.split(",") if p.strip()]
    if prefixes and not any(value.lstrip("+").startswith(p) for p in prefixes):
        allowed = ", ".join(prefixes)
        raise ValidationError(field, f"not allowed for this endpoint (allowed prefixes: {allowed})")
    return value


def local_to_utc(local: dt.datetime, tz: ZoneInfo) -> dt.datetime:
    """A naive local wall-clock time in ``tz`` as naive UTC, with the DST rule of this API.

    Skipped times (spring forward) move forward by the gap: with ``fold=0`` zoneinfo applies the offset
    in force *before* the change, so America/New_York 02:30 on the spring-forward day is 07:30 UTC,
    i.e. 03:30 EDT. Repeated times (fall back) mean their first occurrence: ``fold=0`` is the earlier
    instant, so New York 01:30 on the fall-back day is 05:30 UTC (01:30 EDT), not 06:30 UTC.
    """
    aware = local.replace(tzinfo=tz, fold=0)
    return aware.astimezone(UTC).replace(tzinfo=None)


def parse_instant(value: str, field: str, tz: ZoneInfo, *, days: bool = False,
                  day_end: bool = False) -> dt.datetime:
    """``YYYY-MM-DD HH:MM`` (local) or ISO 8601 with an offset, as naive UTC; with ``days`` also a bare
    ``YYYY-MM-DD`` (local midnight; with ``day_end`` the following midnight)."""
    forms = "'YYYY-MM-DD', " if days else ""
    try:
        m = LOCAL_DATE_RE.fullmatch(value)
        if m:
            y, mo, d, h, mi = (int(g) for g in m.groups())
            return local_to_utc(dt.datetime(y, mo, d, h, mi), tz)
        m = DAY_RE.fullmatch(value) if days else None
        if m:
            y, mo, d = (int(g) for g in m.groups())
            day = dt.datetime(y, mo, d)
            if day_end:
                day += dt.timedelta(days=1)
            return local_to_utc(day, tz)
        if len(value) > 40 or len(value) < 16 or not value[:4].isdigit():
            raise ValueError
        parsed = dt.datetime.fromisoformat(value)
    except OverflowError:  # a real date at the edge of the calendar (9999-12-31 as the end of a range)
        raise ValidationError(field, "out of range") from None
    except ValueError:
        raise ValidationError(field, f"must be {forms}'YYYY-MM-DD HH:MM' (endpoint's time zone) "
                                     "or ISO 8601 with an offset, and a real date") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise ValidationError(field, "ISO 8601 needs an offset such as +02:00 or Z "
                                     "(or use 'YYYY-MM-DD HH:MM' in the endpoint's time zone)")
    try:
        return parsed.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise ValidationError(field, "out of range") from None


def parse_call_date(value: str, tz: ZoneInfo, now: dt.datetime, settings: Settings) -> dt.datetime | None:
    """The due time (naive UTC) for ``call_date``, None when absent (call now).

    Up to ``settings.past_grace`` seconds in the past counts as now; further back, or more than
    ``settings.schedule_max_days`` ahead, is refused.
    """
    if not value:
        return None
    due = parse_instant(value, "call_date", tz)
    if due < now - dt.timedelta(seconds=settings.past_grace):
        raise ValidationError("call_date", f"in the past (more than {settings.past_grace} s ago)")
    if due > now + dt.timedelta(days=settings.schedule_max_days):
        raise ValidationError("call_date", f"more than {settings.schedule_max_days} days ahead")
    return max(due, now)


def parse_url(value: str, field: str) -> str:
    """An http(s) URL of printable ASCII, at most 2000 characters; ``""`` stays absent."""
    if not value:
        return ""
    if len(value) > URL_MAX:
        raise ValidationError(field, f"at most {URL_MAX} characters")
    rule = "must be an http or https URL of printable ASCII (percent-encode the rest)"
    if not all("!" <= ch <= "~" for ch in value):
        raise ValidationError(field, rule)
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        raise ValidationError(field, rule) from None
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise ValidationError(field, rule)
    return value


def parse_msg(value: str, settings: Settings) -> str:
    """The text to speak: at most ``msg_max_chars`` characters, no control characters."""
    if not value.strip():
        return ""
    if len(value) > settings.msg_max_chars:
        raise ValidationError("msg", f"at most {settings.msg_max_chars} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValidationError("msg", "must not contain control characters (line breaks, tabs, NUL ...)")
    return value


def parse_lang(value: str, msg: str) -> str:
    """``msg_lang``: required with ``msg`` and one of the nine codes; ignored (``""``) without ``msg``."""
    if not msg:
        return ""
    if not value:
        raise ValidationError("msg_lang", f"required when msg is given; one of {', '.join(LANGUAGES)}")
    if value not in LANGUAGES:
        raise ValidationError("msg_lang", f"must be one of {', '.join(LANGUAGES)}")
    return value


@dataclass
class CreateRequest:
    """A checked ``POST /v1/calls``."""

    phone_a: str
    phone_b: str
    due_at: dt.datetime  # naive UTC
    scheduled: bool  # call_date was given
    play_url: str
    msg: str
    msg_lang: str
    dialtone_url: str


def parse_create(values: Mapping[str, Any], *, extension_pattern: str, allowed_prefixes: str, tz: ZoneInfo,
                 now: dt.datetime, settings: Settings) -> CreateRequest:
    """Check every field of a create request, in the documented order; unknown fields are ignored."""
    phone_a = parse_phone(text(values, "phone_a", numbers=True), "phone_a",
                          extension_pattern=extension_pattern, allowed_prefixes=allowed_prefixes)
    phone_b = parse_phone(text(values, "phone_b", numbers=True), "phone_b",
                          extension_pattern=extension_pattern, allowed_prefixes=allowed_prefixes)
    due = parse_call_date(text(values, "call_date"), tz, now, settings)
    play_url = parse_url(text(values, "play_url"), "play_url")
    msg = parse_msg(text(values, "msg"), settings)
    lang_raw = text(values, "msg_lang")
    msg_lang = parse_lang(lang_raw, msg)
    dialtone_url = parse_url(text(values, "dialtone_url"), "dialtone_url")
    return CreateRequest(phone_a=phone_a, phone_b=phone_b, due_at=due if due is not None else now,
                         scheduled=due is not None, play_url=play_url, msg=msg, msg_lang=msg_lang,
                         dialtone_url=dialtone_url)


def parse_idempotency_key(value: str | None) -> str | None:
    """The ``Idempotency-Key`` header: None when absent or empty, at most 200 printable ASCII characters."""
    if not value:
        return None
    if len(value) > IDEMPOTENCY_KEY_MAX:
        raise ValidationError("Idempotency-Key", f"at most {IDEMPOTENCY_KEY_MAX} characters")
    if not all(" " <= ch <= "~" for ch in value):
        raise ValidationError("Idempotency-Key", "printable ASCII only")
    return value


def parse_callid(value: str) -> str | None:
    """The callid from a path, or None when it cannot be one (answered 404 like any unknown call)."""
    return value if CALLID_RE.fullmatch(value) else None


# Cursors ----------------------------------------------------------------------------------------
# Opaque to clients; inside, the keyset position of the last row of the page.

def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _unb64(value: str) -> str:
    if len(value) > 200:
        raise ValueError
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")


def encode_id_cursor(call_id: int) -> str:
    """Cursor for ``GET /v1/calls`` after the row ``call_id``."""
    return _b64(f"c1|{call_id}")


def decode_id_cursor(value: str) -> int:
    """The row id inside a ``GET /v1/calls`` cursor, or ValidationError."""
    try:
        kind, raw_id = _unb64(value).split("|")
        if kind != "c1" or not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 19:
            raise ValueError
        if not 0 < int(raw_id) <= MAX_ROW_ID:
            raise ValueError
        return int(raw_id)
    except (ValueError, binascii.Error, UnicodeError):
        raise ValidationError("cursor", "not a cursor this API gave out") from None


def encode_due_cursor(due_at: dt.datetime, call_id: int) -> str:
    """Cursor for ``GET /v1/scheduled`` after the row (``due_at``, ``call_id``)."""
    return _b64(f"s1|{due_at.isoformat()}|{call_id}")


def decode_due_cursor(value: str) -> tuple[dt.datetime, int]:
    """The (due_at, id) inside a ``GET /v1/scheduled`` cursor, or ValidationError."""
    try:
        kind, raw_due, raw_id = _unb64(value).split("|")
        if kind != "s1" or not raw_id.isascii() or not raw_id.isdigit() or len(raw_id) > 19:
            raise ValueError
        due = dt.datetime.fromisoformat(raw_due)
        if due.tzinfo is not None or not 0 < int(raw_id) <= MAX_ROW_ID:
            raise ValueError
        return due, int(raw_id)
    except (ValueError, binascii.Error, UnicodeError):
        raise ValidationError("cursor", "not a cursor this API gave out") from None


@dataclass
class ListQuery:
    """A checked ``GET /v1/calls`` or ``GET /v1/scheduled`` query."""

    limit: int
    cursor: str | None
    statuses: list[str] | None
    since: dt.datetime | None  # requested_at >= since (naive UTC)
    until: dt.datetime | None  # requested_at < until (naive UTC)
    digits: str = ""  # all or part of A's or B's number ("": any)


def parse_limit(value: str) -> int:
    """``limit``: a whole number from 1 to 200, 50 when absent."""
    if not value:
        return LIMIT_DEFAULT
    if len(value) > 3 or not value.isascii() or not value.isdigit() or not 1 <= int(value) <= LIMIT_MAX:
        raise ValidationError("limit", f"must be a whole number from 1 to {LIMIT_MAX}")
    return int(value)


def parse_statuses(value: str) -> list[str] | None:
    """``status``: one status or a comma-separated list of them."""
    if not value:
        return None
    wanted = list(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    known = [s.value for s in CallStatus]
    for part in wanted:
        if part not in known:
            raise ValidationError("status", f"unknown status; use one or more of {', '.join(known)}")
    return wanted or None


def parse_number_filter(value: str) -> str:
    """``number``: digits of A's or B's number, all or part, with an optional leading + (dropped)."""
    value = value.strip()
    if value and not EXTENSION_CHARS_RE.fullmatch(value):  # (part of any number the engine can dial)
        raise ValidationError("number", "digits (all or part of A's or B's number), with an optional leading +")
    return value.lstrip("+")


def parse_list_query(args: Mapping[str, Any], tz: ZoneInfo) -> ListQuery:
    """``limit``, ``cursor``, ``status``, ``from`` (inclusive), ``to`` (exclusive; a bare date means the
    end of that day), dates in the endpoint's time zone unless they carry an offset, and ``number``."""
    limit = parse_limit(text(args, "limit"))
    cursor = text(args, "cursor") or None
    statuses = parse_statuses(text(args, "status"))
    raw_from, raw_to = text(args, "from"), text(args, "to")
    since = parse_instant(raw_from, "from", tz, days=True) if raw_from else None
    until = parse_instant(raw_to, "to", tz, days=True, day_end=True) if raw_to else None
    return ListQuery(limit=limit, cursor=cursor, statuses=statuses, since=since, until=until,
                     digits=parse_number_filter(text(args, "number")))
