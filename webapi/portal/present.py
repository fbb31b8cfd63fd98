"""Plain words for the pages: statuses, FreeSWITCH hangup causes, timeline steps, and times in a zone."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from typing import Any

from markupsafe import Markup, escape

from daemon.calls.view import endpoint_zone
from daemon.store import Call, CallStatus

STATUS_WORDS = {
    "scheduled": "Scheduled",
    "queued": "Waiting to start",
    "dialing_a": "Calling A",
    "a_answered": "A answered, hearing the message",
    "dialing_b": "Calling B (A hears the dial tone)",
    "bridged": "A and B are talking",
    "completed": "Completed",
    "failed": "Failed",
    "canceled": "Canceled",
    "missed": "Missed (could not start in time)",
}

# FreeSWITCH's hangup causes (Q.850 names), as a person would say them.
CAUSE_WORDS = {
    "NORMAL_CLEARING": "hung up normally",
    "USER_BUSY": "the line was busy",
    "NO_ANSWER": "rang but nobody answered",
    "NO_USER_RESPONSE": "the phone did not respond",
    "UNALLOCATED_NUMBER": "the number does not exist",
    "NO_ROUTE_DESTINATION": "no route to that number",
    "INVALID_NUMBER_FORMAT": "the number is not in a valid format",
    "CALL_REJECTED": "the call was refused",
    "ORIGINATOR_CANCEL": "canceled because A hung up first",
    "SUBSCRIBER_ABSENT": "the phone is switched off or out of reach",
    "DESTINATION_OUT_OF_ORDER": "the far end is out of order",
    "NETWORK_OUT_OF_ORDER": "the carrier's network is out of order",
    "NORMAL_TEMPORARY_FAILURE": "a temporary failure in the carrier's network",
    "NORMAL_CIRCUIT_CONGESTION": "the carrier is congested",
    "SWITCH_CONGESTION": "FreeSWITCH is congested",
    "RECOVERY_ON_TIMER_EXPIRE": "the carrier did not respond in time",
    "GATEWAY_DOWN": "the carrier gateway is down",
    "ALLOTTED_TIMEOUT": "the call reached its maximum duration",
    "MEDIA_TIMEOUT": "no audio was received for too long",
    "MANAGER_REQUEST": "hung up by an operator",
    "INCOMPATIBLE_DESTINATION": "the far end cannot take this kind of call",
    "BEARERCAPABILITY_NOTAVAIL": "the far end cannot take this kind of call",
    "SERVICE_UNAVAILABLE": "the service is unavailable",
    "LOSE_RACE": "answered elsewhere",
    "PICKED_OFF": "picked up elsewhere",
    "CHAN_NOT_IMPLEMENTED": "FreeSWITCH cannot make this kind of call",
    "SYSTEM_SHUTDOWN": "FreeSWITCH was shutting down",
    "CRASH": "FreeSWITCH failed",
}

STEP_WORDS = {
    "requested": "Call requested",
    "claimed": "Started",
    "dialing_a": "Calling A",
    "waiting_for_switch": "Waiting for FreeSWITCH",
    "connection_lost": "Connection to FreeSWITCH lost",
    "a_answered": "A answered",
    "prompt_started": "Playing to A",
    "prompt_finished": "Finished playing to A",
    "dialing_b": "Calling B; A hears the dial tone",
    "b_ringing": "B's phone is ringing",
    "b_answered": "B answered",
    "bridged": "A and B connected",
    "recording_started": "Recording started",
    "recording_failed": "Recording failed",
    "bridge_ended": "Connection to B ended",
    "a_hangup": "A's line hung up",
    "b_hangup": "B's line hung up",
    "completed": "Completed",
    "failed": "Failed",
    "canceled": "Canceled",
    "missed": "Missed",
    "queued": "Waiting for a free line",
    "scheduled": "Scheduled",
    "daemon_stopped": "The daemon stopped; FreeSWITCH kept the call",
    "switch_restarted": "FreeSWITCH restarted",
    "reconciled": "Checked with FreeSWITCH after a restart",
    "lost_track": "Lost track of the call",
    "hangup_requested": "Hung up by an operator",
    "throttled": "FreeSWITCH was at its limit; tried again",
    "adopted": "Taken over after a daemon restart",
}

DETAIL_WORDS = {"cause": "cause", "file": "file", "phone": "number", "disposition": "outcome",
                "dialstatus": "dial status", "lateness_ms": "started late by (ms)", "by": "by",
                "due_at": "due", "reason": "reason", "failed_leg": "failed leg"}
# Internal identifiers and server paths stay off the pages; the times are the steps' own.
HIDDEN_DETAILS = {"a_uuid", "b_uuid", "path", "ended_at", "a_answered_at", "b_dialed_at", "bridged_at"}


def status_words(status: str) -> str:
    return STATUS_WORDS.get(status, status.replace("_", " "))


def cause_words(cause: str) -> str:
    """``USER_BUSY`` → ``the line was busy``; an unknown cause is shown in lower case."""
    if not cause:
        return ""
    return CAUSE_WORDS.get(cause, cause.replace("_", " ").lower())


def step_words(kind: str) -> str:
    return STEP_WORDS.get(kind, kind.replace("_", " ").capitalize())


def step_details(detail: dict[str, Any], zone_name: str = "UTC",
                 files: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """A timeline step's details as (label, text) pairs a person can read: causes in words, times in the
    zone, our media files by what they are (``files``: file name → ``the play_url file``...)."""
    out: list[tuple[str, str]] = []
    for key, value in sorted(detail.items()):
        if key in HIDDEN_DETAILS or value in (None, "", False):
            continue
        text = str(value)
        if key.endswith("cause") and isinstance(value, str):
            words = cause_words(value)
            text = f"{value} ({words})" if words.lower() != value.lower() else value
        elif key.endswith("_at") and isinstance(value, str):
            with contextlib.suppress(ValueError):
                text = local_time(dt.datetime.fromisoformat(value.removesuffix("Z")), zone_name)
        elif key == "file" and files and text in files:
            text = files[text]
        out.append((DETAIL_WORDS.get(key, key.replace("_", " ")), text))
    return out


def local_time(when: dt.datetime | None, zone_name: str, *, seconds: bool = True) -> str:
    """Naive UTC as wall-clock time in the zone, with its abbreviation: ``2026-06-15 14:03:05 CEST``."""
    if when is None:
        return ""
    local = when.replace(tzinfo=dt.UTC).astimezone(endpoint_zone(zone_name))
    return local.strftime("%Y-%m-%d %H:%M:%S %Z" if seconds else "%Y-%m-%d %H:%M %Z")


def web_link(url: str) -> str:
    """``url`` if it is an http(s) URL (safe as a link's href), else ``""``."""
    return url if url.lower().startswith(("http://", "https://")) else ""


def iso_utc(when: dt.datetime | None) -> str:
    return when.replace(tzinfo=None).isoformat(timespec="seconds") + "Z" if when else ""


def outcome(call: Call) -> str:
    """One sentence on how the call ended (or where it is)."""
    status = CallStatus(call.status)
    if status == CallStatus.FAILED:
        leg = {"a": "A", "b": "B"}.get(call.failed_leg, "")
        cause = call.b_cause if call.failed_leg == "b" else call.a_cause
        text = call.reason or "failed"
        if cause:
            text += f": {leg + ' — ' if leg else ''}{cause_words(cause)} ({cause})"
        return text[0].upper() + text[1:]
    if status == CallStatus.CANCELED:
        return f"Canceled{' by ' + call.canceled_by if call.canceled_by else ''}."
    if status == CallStatus.MISSED:
        return call.reason or "Its time passed while the daemon could not start it."
    if status == CallStatus.COMPLETED:
        talk = f" for {duration(call.talk_seconds)}" if call.talk_seconds else ""
        return f"A and B talked{talk}." + (f" ({call.reason})" if call.reason else "")
    return status_words(call.status) + "."


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    whole = int(round(seconds))
    return f"{whole // 60} min {whole % 60:02d} s" if whole >= 60 else f"{seconds:.1f} s"


# The API reference: the OpenAPI document as a page -------------------------------------------------

_CODE_SPAN = re.compile(r"`([^`]+)`")


def inline_markdown(text: str) -> Markup:
    """The document's descriptions use `code` spans and blank-line paragraphs; everything else is escaped."""
    paragraphs = [p for p in str(text or "").split("\n\n") if p.strip()]
    html = []
    for paragraph in paragraphs:
        escaped = str(escape(paragraph))
        html.append("<p>" + _CODE_SPAN.sub(lambda m: f"<code>{m.group(1)}</code>", escaped) + "</p>")
    return Markup("".join(html))


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a ``$ref`` into the document's components."""
    seen = 0
    while "$ref" in schema and seen < 10:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = document.get("components", {}).get("schemas", {}).get(name, {})
        seen += 1
    return schema


def schema_text(schema: dict[str, Any]) -> str:
    """A field's type and rules in a few words: ``string, at most 2000 characters``."""
    if "oneOf" in schema:
        return " or ".join(schema_text(s) for s in schema["oneOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    parts = [str(schema.get("type", "object"))]
    if "enum" in schema:
        values = [v for v in schema["enum"] if v != ""]
        parts.append("one of " + ", ".join(values))
    if "maxLength" in schema:
        parts.append(f"at most {schema['maxLength']} characters")
    if "minimum" in schema and "maximum" in schema:
        parts.append(f"{schema['minimum']} to {schema['maximum']}")
    if "default" in schema:
        parts.append(f"default {schema['default']}")
    if "pattern" in schema:
        parts.append(f"matching {schema['pattern']}")
    return ", ".join(parts)
