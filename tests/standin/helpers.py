"""Small helpers shared by the stand-in tests."""

from __future__ import annotations

import uuid as uuidlib

from freeswitch.standin import StandIn

from .esl_client import EslClient, Msg


def new_uuid() -> str:
    return str(uuidlib.uuid4())


def bg_originate(c: EslClient, number: str, extra: str = "", target: str = "&park()",
                 uuid: str | None = None) -> tuple[str, str]:
    """bgapi originate through the carrier gateway; returns (uuid, job uuid)."""
    uuid = uuid or new_uuid()
    job = new_uuid()
    vars_ = f"origination_uuid={uuid},origination_caller_id_number=15551230000,ignore_early_media=true"
    if extra:
        vars_ += "," + extra
    reply = c.cmd(f"bgapi originate {{{vars_}}}sofia/gateway/carrier/{number} {target}\nJob-UUID: {job}")
    assert reply.h("Reply-Text") == f"+OK Job-UUID: {job}"
    return uuid, job


def job_result(c: EslClient, job: str, timeout: float = 30.0) -> str:
    ev = c.wait_event(lambda m: m.name == "BACKGROUND_JOB" and m.e("Job-UUID") == job, timeout)
    return ev.event_body or ""


def sendmsg(c: EslClient, uuid: str, app: str, arg: str = "", event_uuid: str | None = None,
            as_body: bool = True, loops: int | None = None) -> Msg:
    """sendmsg execute, the argument as a content-length body (as the engine does) or header."""
    lines = [f"sendmsg {uuid}", "call-command: execute", f"execute-app-name: {app}", "event-lock: true"]
    if event_uuid:
        lines.append(f"Event-UUID: {event_uuid}")
    if loops is not None:
        lines.append(f"loops: {loops}")
    if as_body:
        data = arg.encode()
        lines += ["content-type: text/plain", f"content-length: {len(data)}"]
        c.send(("\n".join(lines) + "\n\n").encode() + data)
        return c.read_reply()
    lines.append(f"execute-app-arg: {arg}")
    return c.cmd("\n".join(lines))


def wait_gone(sw: StandIn, uuid: str, timeout: float = 30.0) -> None:
    assert sw.wait_for(lambda: (ch := sw.channel(uuid)) is not None and not ch.live, timeout), f"{uuid} still up"


def names_for(c: EslClient, uuid: str) -> list[str]:
    return [m.name or "" for m in c.events if m.e("Unique-ID") == uuid]


def kinds(heard: list[dict]) -> list[tuple[str, str]]:
    """(kind, source) of each non-empty heard segment."""
    return [(s["kind"], s["source"]) for s in heard if s["end"] is None or s["end"] - s["start"] > 1e-6]


def audible(heard: list[dict]) -> list[tuple[str, str]]:
    """kinds() without silence (gaps between applications are not interesting)."""
    return [k for k in kinds(heard) if k[0] != "silence"]


# Timers never fire early, but a loaded machine may fire them late: at time scale 0.05 every real
# millisecond of lateness is 0.02 plan second. Durations are checked against [expected, expected + SLACK].
SLACK = 4.0


def plan_duration_ok(actual: float, expected: float, slack: float = SLACK) -> bool:
    """actual (plan seconds) is expected, or late by at most slack."""
    return expected - 0.05 <= actual <= expected + slack


class ManualClock:
    """A clock the test moves by hand (for the stand-in's sessions-per-second tick)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = max(self.now, now)
