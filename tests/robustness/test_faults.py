"""Faults injected while calls run: each ends with "no call lost, none dialed twice, every call ends with
a true status" (helpers.audit_calls), and the API answers 503, never 500, while the store is unusable.

The whole service runs in this process against the in-process stand-in (tests/integration/conftest.py)
at a time scale of 0.05 (a plan second is 50 ms), so a fault can be aimed at one phase of a call.
Each scenario is arranged so that it is deterministic: the calls are all in the phase under test when
the fault lands.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.server
import gevent.subprocess
import pytest

from daemon.accounts.endpoints import EndpointOptions, create_endpoint
from daemon.calls.sequence import wait_uuid
from daemon.store import Call, Endpoint, WebhookDelivery, database_file
from tests.integration.conftest import Harness, needs_standin, tone_wav, wait_for
from tests.robustness.helpers import (
    FIGURES,
    Answer,
    Audit,
    audit_calls,
    live_channels_of,
    originate_lines,
    plan_number,
    request,
    sent_commands,
)

pytestmark = [needs_standin(), pytest.mark.timeout(300), pytest.mark.time_scale(0.05)]

# For the faults of a hung switch: a hang is noticed within a second or two. Only those tests use the short
# command timeout; elsewhere a reply late by half a second on a loaded machine would drop the connection.
FAST = {"esl_command_timeout": 0.5, "esl_heartbeat_timeout": 1.0, "originate_timeout": 10,
        "esl_reconnect_max_delay": 0.5}
# For a dropped connection: back within half a second once the switch accepts again.
QUICK_RECONNECT = {"originate_timeout": 10, "esl_reconnect_max_delay": 0.5}
# (A digit, B digit): every number-plan outcome, each call over within 60 plan seconds.
MIX = [("1", "6"), ("2", "3"), ("7", "4"), ("9", "5"), ("0", "8"), ("3", "1"), ("4", "2"), ("5", "7"),
       ("8", "9"), ("x", "0"), ("2", "0"), ("9", "6"), ("6", "1"), ("0", "2"), ("1", "9"), ("7", "1")]
FINAL = ("completed", "failed", "canceled", "missed")

IN_FLIGHT = ("dialing_a", "a_answered", "dialing_b", "bridged")
RESTARTED = "FreeSWITCH restarted during the call"

# ----- calls, phases and faults ------------------------------------------------------------------------


def number(digit: str, n: int) -> str:
    """A number of the plan's row ``digit`` ("1555000{digit}{nnn}"); "x": one outside the plan (unallocated)."""
    return plan_number(digit, n) if digit != "x" else f"1555123{n % 10000:04d}"


def place(harness: Harness, endpoint: Endpoint, pairs: list[tuple[str, str]], *,
          prompts: bool = True, first: int = 0, play_file: str | None = None, due_in: float = 0.0) -> list[Call]:
    """One call per (A digit, B digit), all due now or all ``due_in`` seconds from now (numbered from
    ``first``)."""
    return [harness.place(endpoint, number(a, i), number(b, i), prompts=prompts, play_file=play_file,
                          due_in=due_in) for i, (a, b) in enumerate(pairs, start=first)]


def fresh(call: Call) -> Call:
    """The call's row as stored now."""
    return Call.get_by_id(call.id)


def all_in(calls: list[Call], *statuses: str) -> Callable[[], bool]:
    return lambda: all(fresh(c).status in statuses for c in calls)


def leg_ringing(harness: Harness, leg_uuid: str | None) -> bool:
    """The leg exists in FreeSWITCH, rings and has neither answered nor ended."""
    ch = harness.switch.channel(leg_uuid) if leg_uuid else None
    return ch is not None and ch.progress_us > 0 and ch.answered_us == 0 and ch.hangup_cause is None


def _answered(harness: Harness, leg_uuid: str | None) -> bool:
    ch = harness.switch.channel(leg_uuid) if leg_uuid else None
    return ch is not None and ch.answered_us > 0


def _ended(harness: Harness, leg_uuid: str | None) -> bool:
    ch = harness.switch.channel(leg_uuid) if leg_uuid else None
    return ch is not None and ch.hangup_cause is not None


def _apps_queued(harness: Harness, call: Call) -> bool:
    """Every app is queued on A: its last one, the wait after the bridge, was sent."""
    last = wait_uuid(str(call.a_uuid), 1)
    return any(s.verb == "sendmsg" and s.headers.get("event-uuid") == last for s in sent_commands(harness.switch))


def reconnects(harness: Harness) -> float:
    return sum(float(link_count._value.get()) for link_count in
               (harness.service.metrics.esl_reconnects.labels(link.name) for link in harness.service.engine.links))


def fault(name: str) -> None:
    FIGURES["faults injected"] += 1
    FIGURES[f"fault: {name}"] += 1


def settle(harness: Harness, calls: list[Call], *, timeout: float = 60.0, **options: Any) -> Audit:
    """Wait until every call is final and no leg of theirs is left up, then audit them against the switch:
    none lost, none dialed twice, every status true (helpers.audit_calls)."""
    for call in calls:
        harness.wait_final(call, timeout)  # fails with the call's timeline
    rows = [fresh(c) for c in calls]
    all_down = wait_for(lambda: not live_channels_of(harness.switch, rows), 30)
    audit = audit_calls(harness.switch, rows, timeline=harness.timeline, **options)
    FIGURES["calls audited after faults"] += audit.checked
    wrong = [f"call {r.callid}: status {r.status} is not final" for r in rows if r.status not in FINAL]
    wrong += audit.all_problems + ([] if all_down else [f"legs left up: {live_channels_of(harness.switch, rows)}"])
    if wrong:
        timelines = [f"{c.callid}: {harness.timeline(c)}" for c in rows if any(c.callid in w for w in wrong)]
        raise AssertionError("\n".join(wrong + ["timelines:"] + timelines))
    return audit


# ----- the Event Socket connection dropped -------------------------------------------------------------

PhaseCheck = Callable[[Harness, Call], bool]
PHASES: dict[str, tuple[str, str, PhaseCheck, PhaseCheck | None]] = {
    # phase: (A digit, B digit, "every call is in that phase now", "what happens while the connection is down")
    # A rings 2 s; it answers while the connection is down.
    "dialing_a": ("1", "6", lambda h, c: leg_ringing(h, fresh(c).a_uuid), lambda h, c: _answered(h, fresh(c).a_uuid)),
    # A hears the prompts, its apps all queued; it goes on to its wait (the dialtone looped) while the
    # connection is down: B is dialed only when the daemon says so (it paces B's session), once it is back.
    "prompts": ("0", "0", lambda h, c: fresh(c).status == "a_answered" and _apps_queued(h, fresh(c)),
                lambda h, c: a_playing(h, fresh(c), wait_uuid(str(fresh(c).a_uuid), 0))),
    # B rings 2 s; it answers (and so is bridged) while the connection is down.
    "dialing_b": ("0", "1", lambda h, c: fresh(c).status == "dialing_b" and leg_ringing(h, fresh(c).b_uuid),
                  lambda h, c: _answered(h, fresh(c).b_uuid)),
    # A and B talk; nothing changes while the connection is down.
    "bridged": ("0", "2", lambda h, c: fresh(c).status == "bridged", None),
}


# Real time: every call must be in the phase at the same moment, and a phase lasts 2 to 3 plan seconds; six
# calls through one connection on a loaded machine spread over more than the 0.1 s those were at 0.05.
@pytest.mark.time_scale(1.0)
@pytest.mark.parametrize("phase", ["dialing_a", "prompts", "dialing_b", "bridged"])
def test_connection_dropped_at_each_phase_of_a_call(make_harness: Callable[..., Harness], phase: str) -> None:
    """Down (refused) until the next step of every call has happened inside FreeSWITCH, then back."""
    harness = make_harness(**QUICK_RECONNECT)
    a, b, in_phase, next_step = PHASES[phase]
    # Due together a second from now: one tick claims the six, and their originates leave together (due
    # now, each would start from its own tick, and a loaded machine spread them over more than A's 2 s ring).
    calls = place(harness, harness.endpoint(), [(a, b)] * 6, due_in=1.0)
    assert wait_for(lambda: all(in_phase(harness, c) for c in calls), 30), f"never saw every call in {phase}"
    harness.switch.refuse_connections(True)
    harness.switch.drop_connections()
    fault(f"ESL down while {phase}")
    if next_step is not None:
        assert wait_for(lambda: all(next_step(harness, c) for c in calls), 30), f"the step after {phase} never came"
    harness.switch.refuse_connections(False)
    assert wait_for(lambda: reconnects(harness) >= 1, 30), "no reconnect"
    # Seen bridged again, the far end on A hangs up (B would talk for up to a minute).
    assert wait_for(all_in(calls, "bridged", "completed"), 30), [fresh(c).status for c in calls]
    for call in calls:
        harness.switch.far_end_hangup(str(fresh(call).a_uuid))
    audit = settle(harness, calls, timeout=60)
    assert audit.statuses == {"completed": 6}
    assert all("reconciled" in harness.timeline(c) for c in calls), [harness.timeline(c) for c in calls]


@pytest.mark.time_scale(0.1)
@pytest.mark.parametrize("b", ["3", "5", "8", "x"])
def test_the_connection_drops_while_a_waits_for_b(make_harness: Callable[..., Harness], b: str) -> None:
    """A has heard the prompts and waits for B (the dialtone looped) when the connection goes: B is dialed
    only when the daemon says so, so nothing happens until it is back; A hears the dialtone throughout.
    Then B is dialed once, refused (busy, rejected, unallocated), and the call fails with B's cause."""
    harness = make_harness(**{**FAST, "esl_reconnect_max_delay": 0.05})
    # The four calls must be in their prompts at the same moment, and a loaded machine spreads their answers
    # over more than the 3 plan seconds (0.3 s) of the usual prompts: a 30-second prompt here (3 s; 1.5 s was
    # seen to end, and its wait start, before a heavily loaded machine had the fourth call answered).
    prompt = tone_wav(harness.settings.media_dir, 30.0, 523.0)
    calls = place(harness, harness.endpoint(), [("0", b)] * 4, play_file=prompt)
    assert wait_for(lambda: all(fresh(c).status == "a_answered" and _apps_queued(harness, fresh(c))
                                for c in calls), 30), [(fresh(c).status, fresh(c).reason, harness.timeline(c))
                                                       for c in calls]
    # Still in the prompts: the switch goes silent for longer than they last, so the daemon never hears the
    # waits start, then the connection drops for good.
    hang = 5.0  # longer than the prompts: 3.1 s here (the 30-second prompt and the 1-second message)
    hung_at = time.monotonic()
    harness.switch.hang(hang)
    assert wait_for(lambda: all(a_playing(harness, fresh(c), wait_uuid(str(fresh(c).a_uuid), 0)) for c in calls),
                    10), ("A never started its wait", [harness.timeline(c) for c in calls])
    harness.switch.refuse_connections(True)
    harness.switch.drop_connections()
    fault("ESL down while A waits for B")
    # At least 10 plan seconds of outage, and the hang over before the switch takes connections again.
    gevent.sleep(max(1.0, hang - (time.monotonic() - hung_at)))
    assert all(harness.switch.channel(str(fresh(c).b_uuid)) is None for c in calls), "B dialed while down"
    assert all(harness.switch.channel(str(fresh(c).a_uuid)).hangup_cause is None for c in calls)
    harness.switch.refuse_connections(False)
    audit = settle(harness, calls)
    assert audit.statuses == {"failed": 4}
    cause = {"3": "USER_BUSY", "5": "UNALLOCATED_NUMBER", "8": "CALL_REJECTED", "x": "UNALLOCATED_NUMBER"}[b]
    for call in map(fresh, calls):
        assert (call.failed_leg, call.b_cause, call.reason) == ("b", cause, "B was not reached"), \
            (call.failed_leg, call.b_cause, call.reason, harness.timeline(call))
        assert "reconciled" in harness.timeline(call)
        heard = [s for s in harness.switch.heard(str(call.a_uuid)) if s["kind"] != "silence"]
        # The dialtone, through the outage: its first wait, one segment, or several back to back (the
        # stand-in records a round on its own when a loaded machine leaves a gap of silence before it).
        def dialtone(s: dict[str, Any]) -> bool:
            return bool(s["kind"] == "file" and s["source"] == harness.dialtone)

        first = next((i for i, s in enumerate(heard) if dialtone(s)), None)
        assert first is not None, heard
        last = first
        while last + 1 < len(heard) and dialtone(heard[last + 1]):
            last += 1
        assert heard[last]["end"] - heard[first]["start"] >= 4.0, heard


@pytest.mark.time_scale(0.1)
def test_b_fails_while_the_connection_is_down(make_harness: Callable[..., Harness]) -> None:
    """B rings (it never answers) when the connection goes and gives up while it is down; A goes back to
    its wait. Once back, the daemon reads B's failure from A's ``originate_disposition``: failed, leg b,
    NO_ANSWER, as if it had heard it; A hears the notice and is hung up."""
    harness = make_harness(**{**FAST, "esl_reconnect_max_delay": 0.05})
    calls = place(harness, harness.endpoint(), [("0", "4")] * 4)
    assert wait_for(lambda: all(leg_ringing(harness, fresh(c).b_uuid) for c in calls), 10), \
        [fresh(c).status for c in calls]
    harness.switch.refuse_connections(True)
    harness.switch.drop_connections()
    fault("ESL down while B fails")
    assert wait_for(lambda: all(_ended(harness, fresh(c).b_uuid) for c in calls), 30), "B never failed"
    assert all(harness.switch.channel(str(fresh(c).a_uuid)).hangup_cause is None for c in calls)
    harness.switch.refuse_connections(False)
    audit = settle(harness, calls, timeout=60)
    assert audit.statuses == {"failed": 4}
    for call in map(fresh, calls):
        assert (call.failed_leg, call.b_cause, call.reason) == ("b", "NO_ANSWER", "B was not reached"), \
            (call.failed_leg, call.b_cause, call.reason, harness.timeline(call))
        assert "reconciled" in harness.timeline(call)


def a_playing(harness: Harness, call: Call, app_uuid: str) -> bool:
    """A runs the queued application with that event UUID (FreeSWITCH keeps no variable that says so:
    switch_core_session_exec removes app_uuid as the application starts)."""
    ch = harness.switch.channel(str(call.a_uuid)) if call.a_uuid else None
    return ch is not None and app_uuid in ch.app_uuids


# The number plan's outcomes assume the daemon queues A's steps well within A's 30 plan seconds: at 0.05
# (1.5 s) a loaded machine and the slowed replies did not, and A hung up during the prompts.
@pytest.mark.time_scale(0.2)
def test_originates_waiting_to_be_sent_when_the_connection_drops_are_dialed_later(
        make_harness: Callable[..., Harness]) -> None:
    """One originate in flight (its answer lost), the others still waiting for their turn: the one in flight
    is found, never sent again; the waiting ones are sent once reconnected. Each A dialed exactly once."""
    harness = make_harness(**FAST)
    harness.switch.slow_replies(0.1)  # each reply takes 100 ms: the originates queue up behind the first
    calls = place(harness, harness.endpoint(), MIX)
    assert wait_for(lambda: len(originate_lines(harness.switch)) >= 2, 30)
    harness.switch.drop_connections()
    harness.switch.slow_replies(0)
    fault("ESL dropped with originates queued")
    assert len(originate_lines(harness.switch)) < len(calls)  # some had not been sent
    settle(harness, calls)
    assert len(originate_lines(harness.switch)) == len(calls)


def test_connection_dropped_while_the_apps_are_being_queued_on_a(make_harness: Callable[..., Harness]) -> None:
    """The connection drops with A's apps half queued (one in flight): the rest are queued once
    reconnected, the one in flight resent only if harmless, B dialed once."""
    harness = make_harness(**FAST)
    calls = place(harness, harness.endpoint(), [("0", "6")] * 3)
    assert wait_for(all_in(calls, "dialing_a", "a_answered"), 30)
    harness.switch.slow_replies(0.1)  # five sendmsg per call, 100 ms each
    assert wait_for(lambda: any(s.verb == "sendmsg" for s in sent_commands(harness.switch)), 30)
    harness.switch.drop_connections()
    harness.switch.slow_replies(0)
    fault("ESL dropped while queueing apps")
    assert not all(_apps_queued(harness, fresh(c)) for c in calls), "the apps were all queued already"
    audit = settle(harness, calls)
    assert audit.statuses == {"completed": 3}


def test_the_marker_runs_while_the_connection_is_down_again(make_harness: Callable[..., Harness]) -> None:
    """A's steps go in one write and the connection drops right after A's wait arrived (the bridge and the
    wait after it never did). The reconnect queues the marker behind A's wait, and B's turn breaks the wait;
    the connection drops again right after that break and stays down, so A runs the marker while no daemon
    hears it, and parks. It used to sit there in silence until A gave up (here, the plan's 300 s: "A hung up
    before B was dialed") or its sched_hangup: nothing was left unsent and the marker's start was never heard.
    Now the next reconnect reads A's cb_resume, sends the bridge once, and A talks to B."""
    harness = make_harness(**QUICK_RECONNECT)
    sw = harness.switch

    def drop_and_refuse() -> None:
        sw.drop_connections()
        sw.refuse_connections(True, rude=True)  # (no yield: the daemon cannot be back before the marker runs)

    # Stand-in only: each drop lands right after the message aimed at, before its reply leaves.
    sw.fault_after(lambda text: "\nloops: -1" in text, sw.drop_connections)  # the first wait: A's first write
    sw.fault_after(lambda text: text.startswith("api uuid_break "), drop_and_refuse)
    [call] = place(harness, harness.endpoint(), [("0", "2")], prompts=False)

    def marker_ran() -> bool:
        a = sw.channel(str(fresh(call).a_uuid))
        return a is not None and bool(a.var("cb_resume"))

    assert wait_for(marker_ran, 30), harness.timeline(call)
    fault("ESL dropped twice, the marker run unheard")
    call = fresh(call)
    assert sw.creations(str(call.b_uuid)) == 0 and sw.channel(str(call.a_uuid)).hangup_cause is None  # parked
    sw.refuse_connections(False)
    assert wait_for(lambda: fresh(call).status in ("bridged", "completed"), 30), \
        (fresh(call).status, fresh(call).reason, harness.timeline(call))
    audit = settle(harness, [call])
    assert audit.statuses == {"completed": 1}
    assert [s["source"] for s in sw.heard(str(call.a_uuid)) if s["kind"] == "bridge"] == [str(call.b_uuid)]
    assert timeline_count(harness, call, "reconciled") == 2


def timeline_count(harness: Harness, call: Call, kind: str) -> int:
    return harness.timeline(call).count(kind)


# ----- FreeSWITCH hung or restarted --------------------------------------------------------------------


@pytest.mark.time_scale(0.2)  # the plan's outcomes, as above: A's 30 plan seconds outlast the hang
def test_switch_hung_longer_than_the_command_timeout(make_harness: Callable[..., Harness]) -> None:
    """FreeSWITCH stops answering for 2 s (socket open, no replies, no events), four times the command
    timeout, with every kind of call in flight: the engine notices, drops the connection, reconnects once
    the switch answers again, and every call ends with a true status."""
    harness = make_harness(**FAST)
    calls = place(harness, harness.endpoint(), MIX)
    assert wait_for(lambda: sum(fresh(c).status != "queued" for c in calls) >= 8, 30)
    harness.switch.hang(2)
    fault("switch hung 2 s")
    assert wait_for(lambda: not harness.service.engine.ready, 30), "the hang was never noticed"
    assert wait_for(lambda: reconnects(harness) >= 1, 30), "no reconnect after the hang"
    settle(harness, calls)


# Scale 0.2 and B ringing 30 plan seconds: eight calls, some bridged and the others ringing B, at the same
# moment is a window of 6 s (at 0.05, with B giving up after 10, it was 0.3 s); they all end within about 8 s,
# well inside the 12 s hang.
@pytest.mark.time_scale(0.2)
def test_calls_that_end_entirely_while_the_switch_is_hung(make_harness: Callable[..., Harness]) -> None:
    """Hung for 12 s while some calls are bridged (B hangs up 30 plan seconds after answering) and others
    ring B, which never answers (it gives up after originate_timeout, 30 plan seconds). The bridged calls end
    inside FreeSWITCH unheard: seen bridged, they are completed. For the others B gives up unheard and A goes
    back to waiting on the dialtone (what follows a failed bridge is the daemon's to say); once the switch
    answers again the daemon reads B's failure from A's variables."""
    harness = make_harness(**{**FAST, "originate_timeout": 30})
    talking = place(harness, harness.endpoint(), [("0", "2")] * 4)
    ringing = place(harness, harness.endpoint(), [("0", "4")] * 4)
    assert wait_for(lambda: all(fresh(c).status == "bridged" for c in talking)
                    and all(fresh(c).status == "dialing_b" and leg_ringing(harness, fresh(c).b_uuid)
                            for c in ringing), 30), [fresh(c).status for c in talking + ringing]
    harness.switch.hang(12)
    fault("switch hung 12 s")
    assert wait_for(lambda: not live_channels_of(harness.switch, [fresh(c) for c in talking])
                    and all(_ended(harness, fresh(c).b_uuid) for c in ringing), 12)
    assert not harness.service.engine.ready, "the calls ended while the switch was hung"
    assert all(harness.switch.channel(str(fresh(c).a_uuid)).hangup_cause is None for c in ringing)
    audit = settle(harness, talking + ringing)
    assert audit.statuses == {"completed": 4, "failed": 4}
    for call in map(fresh, talking):
        assert (call.status, call.reason) == ("completed", "ended while the switch connection was down")
    for call in map(fresh, ringing):
        assert (call.status, call.reason, call.failed_leg, call.b_cause) == (
            "failed", "B was not reached", "b", "NO_ANSWER"), harness.timeline(call)


@pytest.mark.time_scale(0.2)  # the plan's outcomes for the calls dialed after the restart, as above
def test_switch_restarted_mid_call(make_harness: Callable[..., Harness]) -> None:
    """FreeSWITCH restarts (every channel gone without an event, a new Core-UUID): the calls in flight fail
    'FreeSWITCH restarted during the call', no leg blamed; none is dialed again; calls still queued are
    dialed on the new switch as usual."""
    harness = make_harness(**{**FAST, "max_in_flight": 10})
    calls = place(harness, harness.endpoint(), MIX)
    assert wait_for(lambda: sum(fresh(c).status in IN_FLIGHT[1:] for c in calls) >= 4, 30)
    in_flight = {c.callid for c in map(fresh, calls) if c.status in IN_FLIGHT}
    harness.switch.restart()
    fault("switch restarted")
    assert wait_for(lambda: reconnects(harness) >= 1, 30), "no reconnect after the restart"
    audit = settle(harness, calls, restarted=True)
    # An originate on its way at the restart may never have arrived (it is not sent again): one at most.
    assert audit.never_sent <= 1, audit.never_sent
    ended_by_restart = {c.callid for c in map(fresh, calls) if c.reason == RESTARTED}
    assert ended_by_restart and ended_by_restart <= in_flight, (ended_by_restart, in_flight)
    for call in map(fresh, calls):
        if call.reason == RESTARTED:
            assert (call.status, call.failed_leg) == ("failed", ""), call.callid
            assert "switch_restarted" in harness.timeline(call)
    later = [c for c in calls if c.callid not in in_flight]
    assert later, "every call was in flight at the restart: none shows the new switch dialing"
    assert all(fresh(c).reason != RESTARTED for c in later)


# ----- the store locked or full ------------------------------------------------------------------------

HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()  # held until the test closes this pipe
db.execute("ROLLBACK")
"""


class LockHolder:
    """Another process holding the database's write lock (``BEGIN EXCLUSIVE``) until :meth:`release`.

    Released when the test says so, not after a fixed time: on a busy machine a timed holder lets go while
    the test still believes the store locked (and a cancel it then sends commits)."""

    def __init__(self, path: str | None) -> None:
        assert path is not None, "not an SQLite store"
        self.proc = gevent.subprocess.Popen([sys.executable, "-c", HOLDER, path], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        with gevent.Timeout(60, AssertionError("the other process never got the lock")):
            assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "4m") -> Iterator[Path]:
    """A small file system of its own at ``folder`` (a tmpfs: needs root), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full fault: {done.stderr.strip() or done.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Take every free byte of the file system holding ``folder``; returns the file to delete to free them."""
    path = folder / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                size //= 2
    finally:
        os.close(fd)
    assert os.statvfs(folder).f_bavail == 0
    return path


@dataclass
class Client:
    """The HTTP API of a harness, with one endpoint's token."""

    harness: Harness
    token: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.harness.service.http_port}"

    def post_call(self, key: str, n: int) -> Answer:
        """A call for the day after tomorrow (so nothing is dialed): the API alone is used."""
        when = time.strftime("%Y-%m-%d 12:00", time.gmtime(time.time() + 2 * 86400))
        return request(self.base, "POST", "/v1/calls", headers={"Idempotency-Key": key},
                       form={"token": self.token, "phone_a": number("0", n), "phone_b": number("2", n),
                             "call_date": when})

    def list_calls(self) -> Answer:
        return request(self.base, "GET", "/v1/calls", query={"token": self.token, "limit": "100"})

    def read_call(self, callid: str) -> Answer:
        return request(self.base, "GET", f"/v1/calls/{callid}", query={"token": self.token})

    def cancel(self, callid: str) -> Answer:
        return request(self.base, "POST", f"/v1/scheduled/{callid}/cancel", form={"token": self.token})


def api_client(harness: Harness) -> Client:
    _, token = create_endpoint(EndpointOptions(name="api", caller_id_number="15551230000",
                                               dial_string="sofia/gateway/carrier/{number}", max_in_flight=50,
                                               calls_per_second=1000.0))
    return Client(harness, token)


def check_unavailable(answer: Answer, what: str) -> None:
    """While the store is unusable: 200 (it needed no write) or 503 with Retry-After, never 500."""
    assert answer.status in (200, 503), (what, answer.status, answer.body[:300])
    data = answer.data()
    if answer.status == 503:
        assert int(answer.headers["retry-after"]) >= 1, (what, answer.headers)
        assert data["code_desc"].startswith("database:"), (what, data)


def use_api_while(client: Client, go_on: Callable[[int], bool], kept: dict[str, str]) -> list[str]:
    """Create, list, read and cancel through the API while ``go_on(round)``, the store unusable: every answer
    200 or 503. Adds the creates accepted to ``kept`` (key -> callid); returns the keys of those refused (to
    be sent again)."""
    refused: list[str] = []
    some = next(iter(kept.values()))
    rounds = 0
    while go_on(rounds):
        n = len(kept) + len(refused)
        key = f"key-{n}"
        answer = client.post_call(key, n)
        check_unavailable(answer, "POST /v1/calls")
        if answer.status == 200:
            kept[key] = answer.data()["callid"]
        else:
            refused.append(key)
        for what, got in (("GET /v1/calls", client.list_calls()), ("GET /v1/calls/<id>", client.read_call(some)),
                          ("cancel", client.cancel(some))):
            check_unavailable(got, what)
        FIGURES["API requests while the store was unusable"] += 4
        rounds += 1
    return refused


def check_nothing_lost(client: Client, kept: dict[str, str], refused: list[str]) -> None:
    """The refused creates, sent again with their keys, succeed; every accepted call is there once."""
    for key in refused:
        answer = client.post_call(key, int(key.split("-")[1]))
        assert answer.status == 200, (key, answer.status, answer.body[:300])
        kept[key] = answer.data()["callid"]
    for key in list(kept)[:3]:  # the same key again: the same call, not a second one
        assert client.post_call(key, int(key.split("-")[1])).data()["callid"] == kept[key]
    listed = client.list_calls().data()["calls"]
    assert sorted(c["callid"] for c in listed) == sorted(kept.values())
    endpoint_id = Endpoint.get(Endpoint.name == "api").id
    assert Call.select().where(Call.endpoint == endpoint_id).count() == len(kept)
    answer = client.cancel(kept["key-0"])
    assert answer.status in (200, 409) and answer.data()["code"] == answer.status


def settle_after_store_fault(harness: Harness, calls: list[Call]) -> Audit:
    """``settle`` for calls that ran while the store could not be written.

    A call's greenlet waits for its write before its next step (CallRecords._write), so while the store is
    unusable its control waits too: here 3 s, 60 plan seconds, longer than any far end of the plan stays
    up. An A that answered then hangs up in silence before the prompts, and the number plan's outcome no
    longer holds; so the calls are checked against what the switch did, not the plan: every status
    agrees with the legs, and a call said to have ended by A hanging up ended so inside FreeSWITCH.
    """
    audit = settle(harness, calls, expect_plan=False)
    for call in map(fresh, calls):
        if call.status == "failed" and call.failed_leg == "a" and call.a_answered_at is not None:
            a = harness.switch.channel(str(call.a_uuid))
            assert a is not None and a.answered_us and a.var("sip_hangup_disposition") == "recv_bye", \
                (call.callid, call.reason, a and a.variables.get("sip_hangup_disposition"), harness.timeline(call))
            FIGURES["calls whose A hung up while the store was unusable"] += 1
    return audit


def test_database_locked_by_another_process_while_the_api_is_used(make_harness: Callable[..., Harness]) -> None:
    """Another process holds the write lock through five rounds of requests: creates and cancels answer 503
    with Retry-After (reads still answer, SQLite's WAL lets them), never 500; afterwards the same requests
    succeed, nothing lost."""
    harness = make_harness(**FAST)
    client = api_client(harness)
    kept: dict[str, str] = {}
    assert client.post_call("key-0", 0).status == 200
    kept["key-0"] = client.list_calls().data()["calls"][0]["callid"]
    holder = LockHolder(database_file(harness.settings.database_url))
    try:
        fault("database locked (API only)")
        refused = use_api_while(client, lambda rounds: rounds < 5, kept)
    finally:
        holder.release()
    assert len(refused) == 5, f"creates accepted while the database was locked: {refused}"
    check_nothing_lost(client, kept, refused)


def test_database_locked_by_another_process_while_calls_run(make_harness: Callable[..., Harness]) -> None:
    """Another process holds the write lock for 3 s while calls of every kind run: the records wait it out
    (the calls go on inside FreeSWITCH meanwhile) and every call ends with a true status."""
    harness = make_harness(**FAST)
    calls = place(harness, harness.endpoint(), MIX)
    assert wait_for(lambda: sum(fresh(c).status != "queued" for c in calls) >= 8, 30)
    holder = LockHolder(database_file(harness.settings.database_url))
    try:
        fault("database locked 3 s (calls running)")
        gevent.sleep(3.0)  # the fault's length: the calls go on inside FreeSWITCH meanwhile
    finally:
        holder.release()
    settle_after_store_fault(harness, calls)


def test_disk_full_while_the_api_is_used(make_harness: Callable[..., Harness], tmp_path: Path) -> None:
    """The file system holding the state directory is full: creates answer 503 with Retry-After, never 500;
    once space is freed the same requests succeed, nothing lost."""
    with small_tmpfs(tmp_path / "small") as state:
        harness = make_harness(**{**FAST, "state_dir": str(state)})
        client = api_client(harness)
        kept: dict[str, str] = {}
        assert client.post_call("key-0", 0).status == 200
        kept["key-0"] = client.list_calls().data()["calls"][0]["callid"]
        filler = fill(state)
        fault("disk full (API only)")
        refused = use_api_while(client, lambda rounds: rounds < 5, kept)
        os.unlink(filler)
        assert refused, "no create was refused on a full disk"
        check_nothing_lost(client, kept, refused)


def store_retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage() == "store.retry" for r in caplog.records)


def test_disk_full_while_calls_run(make_harness: Callable[..., Harness], tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    """The state directory's file system fills up while calls of every kind run: the records' writes fail
    and are retried (the calls go on inside FreeSWITCH); once space is freed every call is written down with
    a true status, none lost."""
    with small_tmpfs(tmp_path / "small") as state:
        harness = make_harness(**{**FAST, "state_dir": str(state)})
        calls = place(harness, harness.endpoint(), MIX)
        assert wait_for(lambda: sum(fresh(c).status != "queued" for c in calls) >= 8, 30)
        filler = fill(state)
        fault("disk full (calls running)")
        # Full until the journal has been refused a good many times.
        assert wait_for(lambda: store_retries(caplog) >= 20, 60), "no write was refused on a full disk"
        os.unlink(filler)
        settle_after_store_fault(harness, calls)


# ----- a webhook receiver that never answers -------------------------------------------------------------


class SilentReceiver:
    """Accepts connections on 127.0.0.1, reads what it is sent and never answers; :meth:`hang_up` closes the
    connections it holds, still without an answer."""

    def __init__(self) -> None:
        self.connections = 0
        self.held: list[Any] = []
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks/callbridge"

    def _handle(self, sock: Any, address: Any) -> None:
        self.connections += 1
        self.held.append(sock)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass

    def hang_up(self) -> None:
        for sock in self.held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self.hang_up()
        self.server.stop(timeout=1)


@pytest.mark.time_scale(0.2)
def test_webhook_receiver_that_never_answers(make_harness: Callable[..., Harness]) -> None:
    """The endpoint's webhook receiver accepts connections and never answers. Its calls all end while every
    delivery attempt still waits for its answer (so no call waited on one), exactly as the same calls of an
    endpoint without webhooks; the deliveries stay pending, retried later.

    Not a comparison of durations (on a busy machine two identical calls can differ by seconds): no
    attempt can end during the calls (``webhook_timeout`` is far longer than the test), so a call that
    waited for a delivery could not end at all. Time scale 0.2: the plan's outcomes assume the daemon
    queues A's steps well within A's 30 plan seconds, which 1.5 s at 0.05 is not, for 32 calls at once
    on a loaded machine. The switch's own timeouts are the harness's, not FAST's: the fault here is the
    receiver, and a 0.5 s command timeout drops the connection on a loaded machine."""
    receiver = SilentReceiver()
    try:
        harness = make_harness(webhook_timeout=600.0, originate_timeout=10)
        hooked, plain = harness.endpoint(webhook_url=receiver.url), harness.endpoint()
        # Each call and its twin queued side by side: they start together, whatever the switch's pacing.
        calls, control = [], []
        for i, pair in enumerate(MIX):
            calls += place(harness, hooked, [pair], first=i)
            control += place(harness, plain, [pair], first=i)
        fault("webhook receiver never answers")
        settle(harness, calls + control, timeout=120)
        rows = list(WebhookDelivery.select())
        assert receiver.connections >= 1, "no delivery was even tried"
        assert all(r.attempts == 0 and r.state == "pending" for r in rows), \
            [(r.status, r.attempts, r.state, r.last_error) for r in rows if r.attempts or r.state != "pending"]
        for call, twin in zip(map(fresh, calls), map(fresh, control), strict=True):
            assert (call.status, call.failed_leg, call.reason) == (twin.status, twin.failed_leg, twin.reason), \
                (call.phone_a, call.phone_b, harness.timeline(call), harness.timeline(twin))
        assert {r.callid for r in rows} == {c.callid for c in calls}  # only the hooked endpoint's calls
        assert len(rows) >= 2 * len(calls)  # at least dialing_a and the final status of each
        receiver.hang_up()  # the attempts in flight end, unanswered
        assert wait_for(lambda: WebhookDelivery.select().where(WebhookDelivery.attempts > 0).exists(), 60)
        rows = list(WebhookDelivery.select())
        assert all(r.state == "pending" for r in rows), {r.state for r in rows}
        tried = [r for r in rows if r.attempts > 0]
        assert all(r.last_status_code is None and r.last_error for r in tried), \
            [(r.last_status_code, r.last_error) for r in tried]
        FIGURES["webhook deliveries left pending by a silent receiver"] += len(rows)
    finally:
        receiver.stop()
