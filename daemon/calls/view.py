"""A call as the outside world sees it: the JSON object of the API's answers and of status webhooks.

One shape for both, so a client parses a webhook with the code that parses ``GET /v1/calls/<callid>``.
Never the token: only its hint.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from zoneinfo import ZoneInfo

from daemon.config import ConfigError, zone
from daemon.store import Call, Endpoint


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


def call_view(call: Call, endpoint: Endpoint) -> dict[str, Any]:
    """The call's public fields."""
    recording = None
    if call.recording_path:
        recording = {"seconds": call.recording_seconds, "bytes": call.recording_bytes,
                     "url": f"/v1/calls/{call.callid}/recording"}
    return {
        "callid": call.callid,
        "status": call.status,
        "phone_a": call.phone_a,
        "phone_b": call.phone_b,
        "play_url": call.play_url,
        "msg": call.msg,
        "msg_lang": call.msg_lang,
        "dialtone_url": call.dialtone_url,
        "scheduled": bool(call.scheduled),
        "call_date": utc_to_local_text(call.due_at, endpoint_zone(endpoint.timezone)) if call.scheduled else None,
        "timezone": endpoint.timezone,
        "due_at": iso(call.due_at),
        "requested_at": iso(call.requested_at),
        "started_at": iso(call.started_at),
        "a_answered_at": iso(call.a_answered_at),
        "bridged_at": iso(call.bridged_at),
        "ended_at": iso(call.ended_at),
        "canceled_at": iso(call.canceled_at),
        "canceled_by": call.canceled_by,
        "lateness_ms": call.lateness_ms,
        "failed_leg": call.failed_leg,
        "a_cause": call.a_cause,
        "b_cause": call.b_cause,
        "reason": call.reason,
        "ring_seconds": call.ring_seconds,
        "talk_seconds": call.talk_seconds,
        "recording": recording,
        "token_hint": endpoint.token_hint,
    }
