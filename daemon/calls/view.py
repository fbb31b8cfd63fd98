"""A call as the outside world sees it: the JSON object of the API's answers, of status webhooks and of
``python -m daemon calls show``.

Written once, as a list of fields, each with how it is read from the call and its JSON schema; the
OpenAPI document's ``CallSummary`` is :func:`call_schema`, so the document cannot drift from the
answers. A client parses a webhook with the code that parses ``GET /v1/calls/<callid>``. Never the
token: only its hint.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from daemon.config import ConfigError, mask_url, zone
from daemon.store import CALLID_PATTERN, Call, CallEvent, CallStatus, Endpoint


def iso(when: dt.datetime | None) -> str | None:
    """Naive UTC as ISO 8601 with ``Z``; None stays None."""
    if when is None:
        return None
    return when.replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def utc_to_local_text(when: dt.datetime, tz: ZoneInfo) -> str:
    """Naive UTC as ``YYYY-MM-DD HH:MM`` wall-clock time in ``tz``."""
    return when.replace(tzinfo=dt.UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M")


def endpoint_zone(name: str) -> ZoneInfo:
    """The endpoint's zone; UTC if the stored name is unusable (the CLI checks it, so it should not be)."""
    try:
        return zone(name)
    except ConfigError:
        return ZoneInfo("UTC")


@dataclass(frozen=True)
class Field:
    """One member of a call's public shape."""

    name: str
    read: Callable[[Call, Endpoint], Any]
    schema: dict[str, Any]


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "nullable": True, **extra}


def _text(name: str, **schema: Any) -> Field:
    return Field(name, lambda call, _endpoint: getattr(call, name), {"type": "string", **schema})


def _media_url(name: str) -> Field:
    """A media URL as given, but a password in it (``user:password@``, fetched as Basic auth) as ****: the
    answer, the lists, the pages and every webhook carry this field."""
    return Field(name, lambda call, _endpoint: mask_url(getattr(call, name)),
                 {"type": "string", "description": "As given, a password in it shown as ****."})


def _time(name: str) -> Field:
    return Field(name, lambda call, _endpoint: iso(getattr(call, name)),
                 _nullable("string", format="date-time", description="ISO 8601 UTC with Z; null when unset."))


def _number(name: str, kind: str, description: str = "") -> Field:
    extra = {"description": description} if description else {}
    return Field(name, lambda call, _endpoint: getattr(call, name), _nullable(kind, **extra))


def _call_date(call: Call, endpoint: Endpoint) -> str | None:
    return utc_to_local_text(call.due_at, endpoint_zone(endpoint.timezone)) if call.scheduled else None


def _recording(call: Call, _endpoint: Endpoint) -> dict[str, Any] | None:
    if not call.recording_path:
        return None
    return {"seconds": call.recording_seconds, "bytes": call.recording_bytes,
            "url": f"/v1/calls/{call.callid}/recording"}


RECORDING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "nullable": True,
    "required": ["seconds", "bytes", "url"],
    "properties": {
        "seconds": _nullable("number"),
        "bytes": _nullable("integer"),
        "url": {"type": "string", "description": "`/v1/calls/<callid>/recording` (needs the token)."},
    },
    "description": "The bridged call's recording while it is kept; null when none.",
}

FIELDS: tuple[Field, ...] = (
    _text("callid", pattern=CALLID_PATTERN),
    _text("status", enum=[s.value for s in CallStatus],
          description="queued (a call for now) or scheduled (for its call_date; it stays scheduled while "
                      "held back by the limits once due) → dialing_a → a_answered → dialing_b → bridged → "
                      "completed; or failed, canceled, missed."),
    _text("phone_a"),
    _text("phone_b"),
    _media_url("play_url"),
    _text("msg"),
    _text("msg_lang"),
    _media_url("dialtone_url"),
    Field("scheduled", lambda call, _endpoint: bool(call.scheduled),
          {"type": "boolean", "description": "True when `call_date` was given."}),
    Field("call_date", _call_date, _nullable("string", description="Due time as `YYYY-MM-DD HH:MM` in the "
                                                                   "endpoint's time zone; null for immediate "
                                                                   "calls.")),
    Field("timezone", lambda _call, endpoint: endpoint.timezone,
          {"type": "string", "description": "The endpoint's time zone."}),
    _time("due_at"),
    _time("requested_at"),
    _time("started_at"),
    _time("a_answered_at"),
    _time("bridged_at"),
    _time("ended_at"),
    _time("canceled_at"),
    _text("canceled_by"),
    _number("lateness_ms", "integer", "Start time minus due time."),
    _text("failed_leg", enum=["", "a", "b"]),
    _text("a_cause", description="FreeSWITCH hangup cause of A, e.g. USER_BUSY."),
    _text("b_cause"),
    _text("reason"),
    _number("ring_seconds", "number", "Seconds from dialing B until B answered, or until B's attempt ended "
                                      "(busy, no answer, A hung up); null when B was never dialed, or when its end is not known."),
    _number("talk_seconds", "number", "Seconds from the bridge to the end; null when never bridged, or when the "
                                      "call ended while no daemon heard it (its end is not known)."),
    Field("recording", _recording, RECORDING_SCHEMA),
    Field("token_hint", lambda _call, endpoint: endpoint.token_hint,
          {"type": "string", "description": "The token's first characters; never all."}),
)


def call_view(call: Call, endpoint: Endpoint) -> dict[str, Any]:
    """The call's public fields."""
    return {field.name: field.read(call, endpoint) for field in FIELDS}


def call_schema() -> dict[str, Any]:
    """The JSON schema (OpenAPI 3.0) of :func:`call_view`'s object."""
    return {"type": "object", "required": [field.name for field in FIELDS],
            "properties": {field.name: field.schema for field in FIELDS}}


def timeline_view(events: Iterable[CallEvent]) -> list[dict[str, Any]]:
    """A call's steps as clients see them, oldest first."""
    return [{"at": iso(event.at), "kind": event.kind, "detail": event.detail_dict} for event in events]


TIMELINE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["at", "kind", "detail"],
    "properties": {"at": {"type": "string", "format": "date-time"}, "kind": {"type": "string"},
                   "detail": {"type": "object", "additionalProperties": True}},
}
