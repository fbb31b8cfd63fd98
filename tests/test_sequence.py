"""A call's sequence against a scripted switch: what is sent, and what is never sent twice."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import gevent
import pytest
from peewee import OperationalError

from daemon.calls.records import CallRecords
from daemon.calls.sequence import (
    REFUSED,
    UNFOLLOWED_END,
    UNFOLLOWED_INTERRUPTED,
    CallOptions,
    CallSequence,
    Granted,
    Reconnected,
    RetryDial,
    wait_uuid,
)
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallEvent, CallStatus, Endpoint, utcnow
from daemon.switch.capacity import SwitchCapacity
from daemon.switch.esl import EslDisconnected, EslEvent, EslLostInFlight, EslNotSent


class ScriptedSwitch:
    """Records commands; ``fail_next`` makes the next bgapi raise; api answers from ``answers``."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.fail_next: list[BaseException] = []
        self.answers: dict[str, str] = {}
        self.routes: dict[str, CallSequence] = {}
        self.fail_message_at: int | None = None
        self.batches: list[int] = []  # the sizes of the sendmsg batches written
        self.no_turn_for_message_at: int | None = None  # that sendmsg finds no turn (EslNotSent), once
        self.no_turn_for_api = 0  # so many api commands find no turn
        self.now = 1000.0  # the capacity's clock, moved by the tests
        self.core_uuid: str | None = "5c0e1d2a-0000-4000-8000-000000000001"  # FreeSWITCH's, as last connected
        self.capacity = SwitchCapacity(0.1)
        self.capacity.learn_limits(sps=30, max_sessions=1000)
        self.left_to_kill: list[str] = []  # legs handed to the link to hang up later

    def monotonic(self) -> float:
        return self.now

    def hang_up_later(self, legs: Iterable[str]) -> None:
        self.left_to_kill.extend(legs)

    def bgapi(self, command: str, job_uuid: str, before_send: Callable[[], None] | None = None) -> str:
        if self.fail_next and isinstance(self.fail_next[0], EslNotSent):
            raise self.fail_next.pop(0)  # no turn: nothing sent, nothing marked
        if before_send is not None:
            before_send()
        if self.fail_next:
            raise self.fail_next.pop(0)  # lost in flight
        self.sent.append("bgapi " + command)
        return f"+OK Job-UUID: {job_uuid}"

    def api(self, command: str) -> str:
        if self.no_turn_for_api:
            self.no_turn_for_api -= 1
            raise EslNotSent("api: no turn to send within 0.5s (another command is in flight)")
        self.sent.append("api " + command)
        return next((v for k, v in self.answers.items() if command.startswith(k)), "+OK\n")

    def send_messages(self, messages: list[str]) -> list[Any]:
        """As one write: a batch holding the no-turn index is not sent at all; at ``fail_message_at`` the
        connection drops with the messages before it answered (those from it on are not recorded)."""
        first = len([m for m in self.sent if m.startswith("sendmsg")])
        self.batches.append(len(messages))
        if self.no_turn_for_message_at is not None and first <= self.no_turn_for_message_at < first + len(messages):
            self.no_turn_for_message_at = None
            raise EslNotSent("sendmsg: no turn to send within 0.5s (another command is in flight)")
        for index, message in enumerate(messages):
            if first + index == self.fail_message_at:
                self.fail_message_at = None
                if len(messages) == 1:
                    raise EslDisconnected("closed mid-command")
                raise EslLostInFlight("closed mid-command", acknowledged=index)
            self.sent.append(message)
        return [None] * len(messages)

    def route(self, key: str, sequence: CallSequence) -> None:
        self.routes[key] = sequence

    def unroute(self, key: str) -> None:
        self.routes.pop(key, None)


def event(name: str, uuid_: str, **headers: str) -> EslEvent:
    return EslEvent({"Event-Name": name, "Unique-ID": uuid_, **headers}, "", content_type="text/event-plain")


def job_done(job_uuid: str, body: str) -> EslEvent:
    return EslEvent({"Event-Name": "BACKGROUND_JOB", "Job-UUID": job_uuid}, body, content_type="text/event-plain")


def executes(a_uuid: str, app_uuid: str, app: str = "playback") -> EslEvent:
    return event("CHANNEL_EXECUTE", a_uuid, **{"Application": app, "Application-UUID": app_uuid})


def bridge_done(a_uuid: str, app_uuid: str, disposition: str) -> EslEvent:
    return event("CHANNEL_EXECUTE_COMPLETE", a_uuid, **{"Application": "bridge", "Application-UUID": app_uuid,
                                                        "variable_originate_disposition": disposition})


NEVER_SENT = "never sent to FreeSWITCH"  # CallRecords.unsent_because: no originate of A was marked


def steps_of(sequence: CallSequence, kind: str) -> list[str]:
    return [e.detail for e in CallEvent.select().where((CallEvent.call == sequence.call.id) & (CallEvent.kind == kind))]


# The sequences a test made: stopped when it ends. A sequence left running keeps its idle checks going and
# writes its steps through the process's store proxy, into whatever database the next test opened (its own
# call ids start at 1 too): a later test in the same process saw another test's call "failed" in its own.
made: list[CallSequence] = []


@pytest.fixture(autouse=True)
def stop_sequences() -> Iterator[None]:
    yield
    gevent.killall([s.greenlet for s in made if s.greenlet is not None], timeout=10)
    made.clear()


@pytest.fixture
def run_call(db: Any, make_endpoint: Callable[..., Any], tmp_path: Any) -> Callable[..., tuple[CallSequence, ScriptedSwitch]]:
    def run() -> tuple[CallSequence, ScriptedSwitch]:
        endpoint: Endpoint = make_endpoint()[0]
        call = Call.create(callid="c0ffee" + uuid.uuid4().hex[:10], endpoint=endpoint, phone_a="15550000001",
                           phone_b="15550000002", due_at=utcnow(), status=CallStatus.DIALING_A.value,
                           a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()), started_at=utcnow())
        switch = ScriptedSwitch()
        options = CallOptions(originate_timeout=30, media_root=str(tmp_path), recordings_dir=str(tmp_path),
                              idle_check=30)
        sequence = CallSequence(call, endpoint, switch, CallRecords(Metrics()), options)  # type: ignore[arg-type]
        made.append(sequence)
        return sequence, switch

    return run


def marker_app(sequence: CallSequence) -> str:
    """The marker awaited, as sent: it sets cb_resume to its own event UUID."""
    marker = sequence.apps.marker
    assert marker is not None
    return f"set cb_resume={marker.event_uuid}"


def originates(switch: ScriptedSwitch) -> list[str]:
    return [c for c in switch.sent if c.startswith("bgapi originate")]


def test_an_originate_that_was_never_sent_is_sent_once_reconnected(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    switch.fail_next.append(EslNotSent("not connected"))
    sequence.start()
    gevent.sleep(0)
    assert originates(switch) == []
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert len(originates(switch)) == 1
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    assert Call.get_by_id(sequence.call.id).status == "a_answered"


def test_the_dial_mark_is_written_when_the_originate_has_its_turn_not_before(run_call: Callable[..., Any]) -> None:
    """The mark (timeline step ``dialing_a``) tells the next start whether the originate may have reached
    FreeSWITCH: it is not there while the originate waits for a connection, and it is once it leaves."""
    sequence, switch = run_call()
    switch.fail_next.append(EslNotSent("not connected"))
    sequence.start()
    gevent.sleep(0)
    assert CallRecords.unsent_because(sequence.call) == NEVER_SENT
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert len(originates(switch)) == 1 and CallRecords.unsent_because(sequence.call) is None
    kinds = [e.kind for e in CallEvent.select().where(CallEvent.call == sequence.call.id).order_by(CallEvent.id)]
    assert kinds == ["waiting_for_switch", "dialing_a"]


def test_an_originate_marked_whose_connection_went_before_it_left_is_known_unsent(
        run_call: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection goes while the dial mark commits (the Event Socket finds it unusable after the mark,
    and sends nothing). A daemon that dies before sending it again must leave the call to be dialed at the
    next start: the mark alone said 'it may have reached FreeSWITCH', and the call ended 'interrupted'
    undialed."""
    sequence, switch = run_call()
    scripted = switch.bgapi

    def mark_then_connection_gone(command: str, job_uuid: str, before_send: Callable[[], None] | None = None) -> str:
        monkeypatch.setattr(switch, "bgapi", scripted)
        if before_send is not None:
            before_send()
        raise EslNotSent("bgapi: not connected")

    monkeypatch.setattr(switch, "bgapi", mark_then_connection_gone)
    sequence.start()
    gevent.sleep(0)
    assert originates(switch) == [] and sequence.dial_pending
    assert CallRecords.unsent_because(sequence.call) is not None
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert len(originates(switch)) == 1 and CallRecords.unsent_because(sequence.call) is None


def test_a_store_that_refuses_the_dial_mark_holds_the_originate_back(run_call: Callable[..., Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmarked means never sent: when the mark cannot be written, the originate waits and goes later."""
    sequence, switch = run_call()
    real_mark = sequence.records.mark_dialing_a
    refusals = [OperationalError("database is locked")]

    def mark(*args: Any, **kwargs: Any) -> None:
        if refusals:
            raise refusals.pop()
        real_mark(*args, **kwargs)

    monkeypatch.setattr(sequence.records, "mark_dialing_a", mark)
    sequence.start()
    gevent.sleep(0)
    assert originates(switch) == [] and sequence.dial_pending
    assert CallRecords.unsent_because(sequence.call) == NEVER_SENT
    sequence.deliver(RetryDial())
    gevent.sleep(0)
    assert len(originates(switch)) == 1 and CallRecords.unsent_because(sequence.call) is None


def died_while_dialing_b(first: CallSequence) -> tuple[Call, str, str]:
    """The daemon died with ``first``'s call dialing B: the call as the next start reads it, and its legs."""
    now = utcnow()
    Call.update(status=CallStatus.DIALING_B.value, a_answered_at=now, b_dialed_at=now).where(
        Call.id == first.call.id).execute()
    call = Call.get_by_id(first.call.id)
    return call, str(call.a_uuid), str(call.b_uuid)


def adopted(call: Call, first: CallSequence, switch: ScriptedSwitch) -> CallSequence:
    """The next start's sequence for ``call`` (``first``'s, which died), once it has looked at the switch."""
    sequence = CallSequence(call, first.endpoint, switch, first.records, first.options, adopted=True)
    made.append(sequence)
    sequence.start()
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    return sequence


def test_an_adopted_call_whose_a_hangs_up_during_the_look_sends_nothing_to_a(run_call: Callable[..., Any]) -> None:
    """B rang when the daemon died; at the next start A is up and B gone, and A hangs up between the
    questions (its ``cb_stage`` read finds no channel). Nothing is sent to A: that answer once read as
    "A's steps were never queued" and queued them all again, the bridge to B among them. A's hangup, which
    follows, ends the call."""
    first, switch = run_call()
    call, a, b = died_while_dialing_b(first)
    switch.answers = {f"uuid_exists {a}": "true\n", f"uuid_exists {b}": "false\n",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER\n",
                      f"uuid_getvar {a}": "-ERR No such channel!\n"}
    sequence = adopted(call, first, switch)
    assert [c for c in switch.sent if not c.startswith("api uuid_")] == [], switch.sent
    assert not sequence.done
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", a, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    assert Call.get_by_id(call.id).status == "failed"
    assert not [c for c in switch.sent if "bridge" in c], switch.sent


def died_while_dialing_a(first: CallSequence) -> tuple[Call, str]:
    """The daemon died right after marking ``first``'s originate: the call as the next start reads it."""
    call = Call.get_by_id(first.call.id)
    return call, str(call.a_uuid)


@pytest.mark.parametrize("answered", [True, False])
def test_an_a_that_hung_up_while_no_daemon_heard_it_is_told_apart_from_one_never_reached(
        run_call: Callable[..., Any], answered: bool) -> None:
    """The daemon died as A rang. A answered and hung up while no daemon heard it: at the next start the
    look finds A up, then gone (LegGone), and its hangup follows. That hangup says whether A answered: one
    that did was reached and hung up; one that did not was not reached."""
    first, switch = run_call()
    call, a = died_while_dialing_a(first)
    switch.answers = {f"uuid_exists {a}": "true\n", f"uuid_getvar {a}": "-ERR No such channel!\n"}
    sequence = adopted(call, first, switch)
    answered_at = call.started_at + (utcnow() - call.started_at) / 2  # by the switch's clock, in microseconds
    answered_us = (answered_at - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1) if answered else 0
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", a, **{"Hangup-Cause": "NORMAL_CLEARING",
                                                            "Caller-Channel-Answered-Time": str(answered_us)}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(call.id)
    assert (call.status, call.failed_leg, call.a_cause) == ("failed", "a", "NORMAL_CLEARING")
    if answered:
        assert call.reason == "A hung up before B was dialed"
        assert call.a_answered_at == answered_at
    else:
        assert call.reason == "A was not reached"
        assert call.a_answered_at is None
    assert originates(switch) == [] and not [c for c in switch.sent if c.startswith("sendmsg")], switch.sent


@pytest.mark.parametrize("bridged", [True, False])
def test_an_adopted_call_found_ended_says_no_daemon_followed_it_not_that_a_connection_was_down(
        run_call: Callable[..., Any], bridged: bool) -> None:
    """Its daemon died (or was stopped) and both legs ended before a start or another daemon took it over:
    the switch kept no trace of how. The reason says what happened; the switch's connection was never down."""
    first, switch = run_call()
    call, a, b = died_while_dialing_b(first)
    if bridged:
        Call.update(status=CallStatus.BRIDGED.value, bridged_at=utcnow()).where(Call.id == call.id).execute()
        call = Call.get_by_id(call.id)
    switch.answers = {f"uuid_exists {a}": "false\n", f"uuid_exists {b}": "false\n"}
    sequence = adopted(call, first, switch)
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(call.id)
    expected = ("completed", UNFOLLOWED_END) if bridged else ("failed", UNFOLLOWED_INTERRUPTED)
    assert (call.status, call.reason, call.failed_leg, call.talk_seconds) == (*expected, "", None)
    assert originates(switch) == [] and not [c for c in switch.sent if c.startswith("sendmsg")], switch.sent


def adopted_with_b_ringing(run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]
                           ) -> tuple[CallSequence, ScriptedSwitch]:
    """The daemon died with B ringing; the next start adopts the call and finds A (its steps queued) and B up."""
    first, switch = run_call()
    call, a, b = died_while_dialing_b(first)
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "true",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER",
                      f"uuid_getvar {b} endpoint_disposition": "_undef_",
                      f"uuid_getvar {a} cb_stage": "queued",
                      f"uuid_getvar {a}": "_undef_"}
    sequence = adopted(call, first, switch)
    assert not sequence.done
    return sequence, switch


def test_a_tail_marker_that_found_no_turn_is_sent_a_moment_later(run_call: Callable[..., Any]) -> None:
    """Adopted while B rang (the previous run's bridge), B fails: the marker queued behind A's steps tells
    whether the wait after the bridge is queued (that run may have died first, leaving A parked in
    silence). On a backlogged connection it found no turn, and nothing sent it again."""
    sequence, switch = adopted_with_b_ringing(run_call)
    a, b = sequence.a.uuid, sequence.b.uuid
    assert sequence.apps.bridge is None
    switch.no_turn_for_message_at = len([m for m in switch.sent if m.startswith("sendmsg")])
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", b, **{"Hangup-Cause": "USER_BUSY"}))
    sequence.deliver(bridge_done(a, str(uuid.uuid4()), "USER_BUSY"))
    gevent.sleep(0)
    assert not [m for m in switch.sent if "cb_tail=" in m]
    assert wait_until(lambda: bool(sequence.tail_marker), timeout=10)
    assert len([m for m in switch.sent if f"cb_tail={sequence.tail_marker}" in m]) == 1


def test_a_sequence_that_fails_hands_the_legs_it_could_not_kill_to_the_link(run_call: Callable[..., Any]) -> None:
    """A bug ends the sequence (the call fails, 'internal error'): its legs are killed, and a kill that
    found no turn is left to the link, which tries again, instead of being dropped (A would stay up with no
    one following it)."""
    sequence, switch = run_call()

    def broken_bridge() -> None:
        raise RuntimeError("a bug")

    sequence._bridge = broken_bridge  # type: ignore[method-assign]
    switch.no_turn_for_api = 5
    sequence.start()
    sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    sequence.greenlet.join(timeout=5)
    assert Call.get_by_id(sequence.call.id).status == "failed"
    assert switch.left_to_kill == [sequence.a.uuid, sequence.b.uuid]


def test_a_fault_inside_the_final_write_still_ends_the_call_as_an_internal_error(
        run_call: Callable[..., Any]) -> None:
    """The safety net (a fault ends the call 'internal error') must hold when the fault is in the final
    write itself (a driver's InterfaceError is no DatabaseError): ``done`` was set first, the net's own
    finish returned at once, and the call stayed in flight with nobody following it."""
    sequence, switch = run_call()
    finish = sequence.records.finish
    tries: list[str] = []

    def faulty_once(*args: Any, **fields: Any) -> None:
        tries.append(fields["reason"])
        if len(tries) == 1:
            raise RuntimeError("a fault in the final write")
        finish(*args, **fields)

    sequence.records.finish = faulty_once  # type: ignore[method-assign]
    sequence.start()
    assert wait_until(lambda: bool(originates(switch)))
    sequence.deliver(job_done(sequence.job_uuid, "-ERR USER_BUSY\n"))
    sequence.greenlet.join(timeout=5)
    assert tries == ["A was not reached", "internal error: RuntimeError"]
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.reason) == ("failed", "internal error: RuntimeError")


def test_an_originate_lost_in_flight_is_reconciled_never_resent(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    switch.fail_next.append(EslDisconnected("closed mid-command"))
    switch.answers = {"uuid_exists": "false"}
    sequence.start()
    gevent.sleep(0)
    sequence.deliver(Reconnected(False))
    sequence.greenlet.join(timeout=5)
    assert originates(switch) == []
    assert any(c.startswith("api uuid_exists " + sequence.a.uuid) for c in switch.sent)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.reason) == ("failed", "", "interrupted")


def test_after_answer_a_hears_the_prompts_then_waits_on_the_dialtone_around_the_bridge(
        run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    # The bridge's own variables travel with A's originate: no apps for them after the answer.
    assert "hangup_after_bridge=true,continue_on_fail=true,instant_ringback=true" in originates(switch)[0]
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    apps = apps_sent(switch)
    tone = sequence.endpoint.ring_tone
    assert apps[0] == f"multiset cb_stage=queued ringback={tone} transfer_ringback={tone}"
    assert apps[1] == f"sched_hangup +{sequence.endpoint.max_duration} ALLOTTED_TIMEOUT"
    # The wait (the ring tone, looped until broken), the bridge, the wait again: nothing that ends the call.
    waits = [m for m in switch.sent if m.startswith("sendmsg") and "loops: -1" in m]
    assert len(waits) == 2 and apps[2] == apps[4] == f"playback tone_stream://{tone}"
    assert f"Event-UUID: {wait_uuid(sequence.a.uuid, 0)}" in waits[0]
    assert apps[3].startswith("bridge ") and f"origination_uuid={sequence.b.uuid}" in apps[3]
    assert len(apps) == 5
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.reason) == ("failed", "a", "A hung up before B was dialed")


def test_a_forged_event_for_another_uuid_is_ignored(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", str(uuid.uuid4())))
    gevent.sleep(0)
    assert Call.get_by_id(sequence.call.id).status == "dialing_a"


def apps_sent(switch: ScriptedSwitch) -> list[str]:
    return [m.split("execute-app-name: ")[1].split("\n")[0] + " " + m.split("\n\n", 1)[1]
            for m in switch.sent if m.startswith("sendmsg")]


def test_a_steps_go_in_one_write(run_call: Callable[..., Any]) -> None:
    """One write for all of A's steps (one send: less CPU per call); a lost connection leaves a chain of
    steps that must not be queued twice in doubt, settled in order (daemon.calls.appqueue)."""
    sequence, switch = run_call()
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    assert [a.split(" ")[0] for a in apps_sent(switch)] == ["multiset", "sched_hangup", "playback", "bridge",
                                                             "playback"]
    assert switch.batches == [5]


@pytest.mark.parametrize("shows", ["the marker runs", "the wait starts", "A is on the wait at the reconnect"])
def test_a_wait_lost_in_flight_is_never_queued_twice(run_call: Callable[..., Any], shows: str) -> None:
    """A second copy of a wait would hold A on the dialtone after the first is broken (it is the same wait:
    acted on once), so B would never be dialed: a wait in doubt is resolved by a marker, like the bridge.
    (The bridge and the wait after it, in the same write, are in doubt with it.)"""
    sequence, switch = run_call()
    switch.fail_message_at = 2  # the wait (and the bridge, the wait after it) in flight when the connection drops
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    wait = wait_uuid(sequence.a.uuid, 0)
    assert [step.event_uuid for step in sequence.apps.uncertain] == [wait, sequence.apps.bridge.event_uuid,
                                                                    wait_uuid(sequence.a.uuid, 1)]
    switch.answers = {f"uuid_exists {sequence.a.uuid}": "true", f"uuid_exists {sequence.b.uuid}": "false",
                      "uuid_getvar": "_undef_"}
    if shows == "A is on the wait at the reconnect":  # as FreeSWITCH shows it: no app_uuid
        switch.answers = {f"uuid_getvar {sequence.a.uuid} current_application": "playback",
                          f"uuid_getvar {sequence.a.uuid} total_loops": "-1",
                          f"uuid_getvar {sequence.a.uuid} endpoint_disposition": "ANSWER",
                          f"uuid_getvar {sequence.a.uuid} cb_stage": "queued", **switch.answers}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert marker_app(sequence) in apps_sent(switch)
    marker = sequence.apps.marker
    if shows == "the marker runs":
        assert marker is not None
        sequence.deliver(event("CHANNEL_EXECUTE", sequence.a.uuid, **{"Application-UUID": marker.event_uuid}))
    elif shows == "the wait starts":
        sequence.deliver(executes(sequence.a.uuid, wait))
    gevent.sleep(0)
    if shows != "the marker runs":
        # The wait arrived; the bridge after it may have: B's turn breaks the wait (the switch has room), and
        # A runs the bridge if it arrived, else the marker queued behind it, which it does here.
        assert f"api uuid_break {sequence.a.uuid}" in switch.sent and sequence.apps.marker is marker
        assert not any(a.startswith("bridge ") for a in apps_sent(switch))
        assert marker is not None
        sequence.deliver(executes(sequence.a.uuid, marker.event_uuid, "set"))
        gevent.sleep(0)
    apps = apps_sent(switch)
    waits = [m for m in switch.sent if m.startswith("sendmsg") and f"Event-UUID: {wait}" in m]
    assert len(waits) == (1 if shows == "the marker runs" else 0), apps  # sent again only if it never arrived
    assert sum(a.startswith("bridge ") for a in apps) == 1 and apps[-1].startswith("playback tone_stream://")
    assert sequence.apps.marker is None and not sequence.apps.pending


def test_a_bridge_lost_in_flight_is_resolved_by_a_marker_never_sent_twice(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    switch.fail_message_at = 3  # multiset, sched_hangup, the wait answered; the bridge and the wait after it not
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    assert [step.app for step in sequence.apps.uncertain] == ["bridge", "playback"]
    assert sequence.apps.uncertain[0] is sequence.apps.bridge
    switch.answers = {f"uuid_exists {sequence.a.uuid}": "true", f"uuid_exists {sequence.b.uuid}": "false",
                      "uuid_getvar": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert apps_sent(switch)[-1] == marker_app(sequence)
    assert not any(a.startswith("bridge ") for a in apps_sent(switch))
    # The marker runs before any B appears: the bridge never arrived, so it is sent now, once.
    marker = sequence.apps.marker
    assert marker is not None
    sequence.deliver(event("CHANNEL_EXECUTE", sequence.a.uuid, **{"Application-UUID": marker.event_uuid}))
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert sum(a.startswith("bridge ") for a in apps) == 1 and apps[-1].startswith("playback tone_stream://")


def test_a_bridge_lost_in_flight_that_did_arrive_is_not_resent(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    switch.fail_message_at = 3
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    switch.answers = {f"uuid_exists {sequence.a.uuid}": "true", f"uuid_exists {sequence.b.uuid}": "false",
                      "uuid_getvar": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    sequence.deliver(event("CHANNEL_CREATE", sequence.b.uuid))  # B appears: the bridge was queued
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert not any(a.startswith("bridge ") for a in apps)
    # The wait after the bridge, in the same write, may have arrived too: B says nothing about it.
    assert apps[-1] == marker_app(sequence) and sequence.apps.marker is not None
    assert Call.get_by_id(sequence.call.id).status == "dialing_b"
    # B fails and A runs the marker: the wait after the bridge never arrived; it is sent now, the bridge not.
    sequence.deliver(executes(sequence.a.uuid, sequence.apps.marker.event_uuid, "set"))
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert not any(a.startswith("bridge ") for a in apps)
    assert apps[-1].startswith("playback tone_stream://") and not sequence.apps.in_doubt


def test_the_idle_check_counts_from_the_last_item_heard(run_call: Callable[..., Any]) -> None:
    """Items closer together than idle_check keep it away; each silence of idle_check brings one (a stopped
    libev timer restarted would count only what was left of it)."""
    sequence, switch = run_call()
    sequence.options.idle_check = 0.3
    switch.answers = {"uuid_exists": "true"}
    sequence.start()
    assert wait_until(lambda: len(originates(switch)) == 1)
    checks = lambda: sum(c.startswith("api uuid_exists") for c in switch.sent)  # noqa: E731
    for _ in range(8):  # 0.4 s of news every 0.05 s: nothing to check
        gevent.sleep(0.05)
        sequence.deliver(event("CHANNEL_PROGRESS", str(uuid.uuid4())))
    assert checks() == 0
    assert wait_until(lambda: checks() >= 2, timeout=3.0)  # then each idle period brings one


def test_an_idle_check_while_the_dial_is_pending_dials_instead_of_giving_up(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.options.idle_check = 0.01  # the idle check comes before the 1 s retry
    switch.fail_next.append(EslNotSent("no turn to send"))
    switch.answers = {"uuid_exists": "false"}
    sequence.start()
    assert wait_until(lambda: len(originates(switch)) == 1)
    assert Call.get_by_id(sequence.call.id).status == "dialing_a"
    assert not any(c.startswith("api uuid_exists") for c in switch.sent)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(0.005)
        return True
    return False


def test_a_bridge_that_failed_unheard_is_learned_from_a_hangup(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{
        "Hangup-Cause": "NORMAL_CLEARING", "variable_originate_disposition": "NO_ANSWER",
        "variable_DIALSTATUS": "NOANSWER"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.b_cause, call.reason) == ("failed", "b", "NO_ANSWER",
                                                                          "B was not reached")


# -- the switch's session limits ------------------------------------------------------------------

def answered_and_waiting(sequence: CallSequence, switch: ScriptedSwitch) -> None:
    """A is up and has started its wait before the first bridge."""
    sequence.start()
    sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 0)))
    gevent.sleep(0)


@pytest.mark.parametrize("bridged", [True, False])
def test_a_call_that_ended_while_nobody_heard_it_has_no_made_up_talk_or_ring_time(
        run_call: Callable[..., Any], bridged: bool) -> None:
    # The connection (or the daemon) was away for minutes or hours; the call ended then, unheard. "Now"
    # is not its end: counted from the bridge, the whole gap would be billed as talk.
    sequence, switch = run_call()
    answered_and_waiting(sequence, switch)
    bridge = sequence.apps.bridge
    assert bridge is not None
    sequence.deliver(executes(sequence.a.uuid, bridge.event_uuid, "bridge"))
    sequence.deliver(event("CHANNEL_CREATE", sequence.b.uuid))
    if bridged:
        sequence.deliver(event("CHANNEL_ANSWER", sequence.b.uuid))
        sequence.deliver(event("CHANNEL_BRIDGE", sequence.a.uuid))
    gevent.sleep(0)
    switch.answers = {"uuid_exists": "false"}
    sequence.deliver(Reconnected(False))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.reason) == (("completed", "ended while the switch connection was down") if bridged
                                          else ("failed", "interrupted"))
    assert call.talk_seconds is None
    assert (call.ring_seconds is not None) == bridged  # B's ringing ended when it was heard to answer


def breaks(switch: ScriptedSwitch, a_uuid: str) -> list[str]:
    return [c for c in switch.sent if c.startswith(f"api uuid_break {a_uuid}")]


def playing_wait(a_uuid: str, bridges: int, disposition: str = "DESTINATION_OUT_OF_ORDER") -> dict[str, str]:
    """A's variables as FreeSWITCH shows them while A plays the wait after ``bridges`` bridges: a looped
    playback, the last bridge's outcome, cb_wait from the second bridge on, and no app_uuid (FreeSWITCH
    removes it as each queued app starts)."""
    return {f"uuid_getvar {a_uuid} app_uuid": "_undef_", f"uuid_getvar {a_uuid} current_application": "playback",
            f"uuid_getvar {a_uuid} total_loops": "-1",
            f"uuid_getvar {a_uuid} originate_disposition": disposition if bridges else "_undef_",
            f"uuid_getvar {a_uuid} cb_wait": str(bridges) if bridges >= 2 else "_undef_"}


def the_switch_refuses_b(sequence: CallSequence) -> None:
    """The bridge on A starts and ends refused by the switch over its limits (no B channel created)."""
    bridge = sequence.apps.bridge
    assert bridge is not None
    sequence.deliver(executes(sequence.a.uuid, bridge.event_uuid, "bridge"))
    sequence.deliver(bridge_done(sequence.a.uuid, bridge.event_uuid, "DESTINATION_OUT_OF_ORDER"))


def test_a_refused_originate_is_sent_again_with_the_same_uuid_and_a_new_job(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    first_job = sequence.job_uuid
    sequence.deliver(job_done(first_job, "-ERR DESTINATION_OUT_OF_ORDER\n"))
    gevent.sleep(0)
    assert len(originates(switch)) == 1 and Call.get_by_id(sequence.call.id).status == "dialing_a"
    assert steps_of(sequence, "throttled") and '"leg": "a"' in steps_of(sequence, "throttled")[0]
    switch.now += 5  # past the backoff; the capacity's line lets it go
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    sent = originates(switch)
    assert len(sent) == 2 and sent[0] == sent[1]  # the same A, never created
    assert sequence.job_uuid != first_job and sequence.job_uuid in switch.routes and first_job not in switch.routes
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    assert Call.get_by_id(sequence.call.id).status == "a_answered"


def test_each_originate_of_a_is_marked_so_a_refused_one_not_yet_sent_again_is_known_unsent(
        run_call: Callable[..., Any]) -> None:
    """The next start dials a call whose A the switch refused and the killed run had not sent again; one
    whose second originate was marked (it may have left) is reconciled, never sent again."""
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    assert CallRecords.unsent_because(sequence.call) is None
    sequence.deliver(job_done(sequence.job_uuid, "-ERR DESTINATION_OUT_OF_ORDER\n"))
    gevent.sleep(0)
    assert CallRecords.unsent_because(sequence.call) == "refused by the switch (over its limit) and not sent again"
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    assert len(originates(switch)) == 2 and CallRecords.unsent_because(sequence.call) is None
    marks = [json.loads(d) for d in steps_of(sequence, "dialing_a")]
    assert [m.get("attempt", 1) for m in marks] == [1, 2]


def test_a_refused_past_the_originate_timeout_fails_with_the_reason(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    switch.now += sequence.options.originate_timeout + 1
    sequence.deliver(job_done(sequence.job_uuid, "-ERR DESTINATION_OUT_OF_ORDER\n"))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.a_cause, call.reason) == ("failed", "a", "DESTINATION_OUT_OF_ORDER",
                                                                          REFUSED)
    assert len(originates(switch)) == 1


def test_an_a_that_failed_after_being_created_is_not_sent_again(run_call: Callable[..., Any]) -> None:
    # A carrier's own refusal (a created leg, then its cause) is a failure, even with the same cause.
    sequence, switch = run_call()
    sequence.start()
    sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
    sequence.deliver(job_done(sequence.job_uuid, "-ERR DESTINATION_OUT_OF_ORDER\n"))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.a_cause, call.reason) == ("failed", "DESTINATION_OUT_OF_ORDER", "A was not reached")
    assert len(originates(switch)) == 1


def test_b_is_dialed_when_the_wait_starts_and_the_switch_has_room(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    answered_and_waiting(sequence, switch)
    assert breaks(switch, sequence.a.uuid) == [f"api uuid_break {sequence.a.uuid}"]
    # Each round of the loop announces itself again: B is dialed once.
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 0)))
    gevent.sleep(0)
    assert len(breaks(switch, sequence.a.uuid)) == 1


def test_b_waits_for_room_while_a_hears_the_dialtone(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    for n in range(switch.capacity.rate_cap):  # other legs took this second's room
        switch.capacity.reserve(f"other-{n}", switch.now)
        switch.capacity.sent(f"other-{n}", switch.now)
    answered_and_waiting(sequence, switch)
    assert breaks(switch, sequence.a.uuid) == []
    assert steps_of(sequence, "paced") and '"leg": "b"' in steps_of(sequence, "paced")[0]
    switch.now += 1.01
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    assert len(breaks(switch, sequence.a.uuid)) == 1


def test_a_call_that_ends_while_b_waits_in_line_leaves_no_deadline_timer_behind(run_call: Callable[..., Any]) -> None:
    """A busy switch makes nearly every B wait in line, each with a timer that forces it at its deadline: a
    call ending first must not leave it running (up to originate_timeout, holding the whole sequence)."""
    sequence, switch = run_call()
    for n in range(switch.capacity.rate_cap):  # other legs took this second's room
        switch.capacity.reserve(f"other-{n}", switch.now)
        switch.capacity.sent(f"other-{n}", switch.now)
    answered_and_waiting(sequence, switch)
    timer = sequence.forcing["b"]
    assert isinstance(timer, gevent.Greenlet) and not timer.dead
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    assert Call.get_by_id(sequence.call.id).status == "failed"
    assert timer.dead


def test_b_refused_is_dialed_again_with_the_same_uuid_after_the_wait_starts(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    answered_and_waiting(sequence, switch)
    the_switch_refuses_b(sequence)
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 1)))
    gevent.sleep(0)
    assert '"leg": "b"' in steps_of(sequence, "throttled")[0]
    apps = apps_sent(switch)
    assert not any(a.startswith(("hangup", "playback tone_stream://%(500")) for a in apps)  # no notice: A waits on
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    apps = apps_sent(switch)
    bridges = [a for a in apps if a.startswith("bridge ")]
    assert len(bridges) == 2 and bridges[0] == bridges[1]  # the same B, never created
    assert apps[-1].startswith("playback tone_stream://") and len(breaks(switch, sequence.a.uuid)) == 2
    assert f"Event-UUID: {wait_uuid(sequence.a.uuid, 2)}" in [m for m in switch.sent if m.startswith("sendmsg")][-1]
    # This time B comes: the call goes on as usual.
    sequence.deliver(event("CHANNEL_CREATE", sequence.b.uuid))
    gevent.sleep(0)
    assert Call.get_by_id(sequence.call.id).status == "dialing_b"


def test_b_refused_past_the_originate_timeout_ends_the_call_with_the_reason(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    answered_and_waiting(sequence, switch)
    switch.now += sequence.options.originate_timeout + 1
    the_switch_refuses_b(sequence)
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 1)))
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert apps[-2:] == ["playback tone_stream://%(500,500,480,620);loops=3", "hangup NORMAL_CLEARING"]
    assert len(breaks(switch, sequence.a.uuid)) == 2  # the first dial, then the wait to end it
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{
        "Hangup-Cause": "NORMAL_CLEARING", "variable_originate_disposition": "DESTINATION_OUT_OF_ORDER"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.b_cause, call.reason) == ("failed", "b", "DESTINATION_OUT_OF_ORDER",
                                                                          REFUSED)


def b_busy_before_a_s_next_wait(sequence: CallSequence, switch: ScriptedSwitch) -> None:
    """A answered and waits; the bridge dials B, which is busy: the bridge ends, A's next wait is still to start."""
    answered_and_waiting(sequence, switch)
    bridge = sequence.apps.bridge
    assert bridge is not None
    sequence.deliver(executes(sequence.a.uuid, bridge.event_uuid, "bridge"))
    switch.capacity.created(sequence.b.uuid, switch.now)
    sequence.deliver(event("CHANNEL_CREATE", sequence.b.uuid))
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.b.uuid, **{"Hangup-Cause": "USER_BUSY"}))
    sequence.deliver(bridge_done(sequence.a.uuid, bridge.event_uuid, "USER_BUSY"))


def test_a_b_that_really_failed_gets_the_notice_and_hangup_at_once(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    b_busy_before_a_s_next_wait(sequence, switch)
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 1)))
    gevent.sleep(0)
    assert apps_sent(switch)[-2:] == ["playback tone_stream://%(500,500,480,620);loops=3", "hangup NORMAL_CLEARING"]
    assert len(breaks(switch, sequence.a.uuid)) == 2
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.b_cause, call.reason) == ("failed", "b", "USER_BUSY",
                                                                          "B was not reached")
    assert not steps_of(sequence, "throttled")


@pytest.mark.parametrize("stalled", ["the notice", "the break"])
def test_ending_a_that_finds_no_turn_is_sent_a_moment_later_and_never_left_on_its_dialtone(
        run_call: Callable[..., Any], stalled: str) -> None:
    """B failed for real, and ending A finds no turn on a backlogged connection (EslNotSent: nothing
    sent). The notice, the hangup and the break that lets them run are sent a moment later, in that
    order. Before, the fallback (uuid_kill) found no turn either and nothing tried again: A heard its
    looped dialtone until its maximum duration."""
    sequence, switch = run_call()
    b_busy_before_a_s_next_wait(sequence, switch)
    a = sequence.a.uuid
    gevent.sleep(0)
    breaks_before = len(breaks(switch, a))
    if stalled == "the notice":
        switch.no_turn_for_message_at = len([m for m in switch.sent if m.startswith("sendmsg")])
    switch.no_turn_for_api = 1  # the break, or the kill the notice's failure once fell back to
    sequence.deliver(executes(a, wait_uuid(a, 1)))
    gevent.sleep(0)
    assert len(breaks(switch, a)) == breaks_before
    notice = ["playback tone_stream://%(500,500,480,620);loops=3", "hangup NORMAL_CLEARING"]
    assert wait_until(lambda: len(breaks(switch, a)) == breaks_before + 1, timeout=10), switch.sent
    assert apps_sent(switch)[-2:] == notice
    last_notice = max(i for i, c in enumerate(switch.sent) if c.startswith("sendmsg"))
    last_break = max(i for i, c in enumerate(switch.sent) if c.startswith(f"api uuid_break {a}"))
    assert last_break > last_notice
    assert not [c for c in switch.sent if "uuid_kill" in c]
    assert steps_of(sequence, "waiting_for_switch")
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", a, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.b_cause) == ("failed", "b", "USER_BUSY")


def test_ending_a_on_a_connection_that_drops_is_noted_for_the_reconnect(run_call: Callable[..., Any]) -> None:
    """B failed for real and the connection drops as A's notice and hangup go out: the call notes the
    connection lost (as any step lost in flight), so that its reconnect's look settles it, and sends
    nothing more to A meanwhile."""
    sequence, switch = run_call()
    b_busy_before_a_s_next_wait(sequence, switch)
    a = sequence.a.uuid
    gevent.sleep(0)
    switch.fail_message_at = len([m for m in switch.sent if m.startswith("sendmsg")])
    sequence.deliver(executes(a, wait_uuid(a, 1)))
    gevent.sleep(0)
    assert sequence.connection_lost and steps_of(sequence, "connection_lost")
    assert not sequence.end_break_pending


def test_a_hanging_up_while_b_waits_to_be_dialed_again_is_not_blamed_on_b(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    answered_and_waiting(sequence, switch)
    the_switch_refuses_b(sequence)
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{
        "Hangup-Cause": "NORMAL_CLEARING", "variable_originate_disposition": "DESTINATION_OUT_OF_ORDER"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.reason) == ("failed", "a",
                                                          "A hung up while B waited for room on the switch")
    assert switch.capacity.waiting == 0  # no leg of its left in the line


# -- commands that find no turn on a busy connection ----------------------------------------------

def test_apps_that_find_no_turn_on_a_busy_connection_are_queued_a_moment_later(
        run_call: Callable[..., Any]) -> None:
    """Under load the connection is busy with other calls' commands and a sendmsg gets no turn within the
    command timeout (EslNotSent: nothing sent). The rest of A's steps go a moment later, in order, each
    once; the call was left stuck with A answered and nothing queued, as if the connection had been lost."""
    sequence, switch = run_call()
    switch.no_turn_for_message_at = 0  # the write of A's steps finds no turn
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    assert len(apps_sent(switch)) == 0 and not sequence.connection_lost
    switch.no_turn_for_message_at = 0  # the first retry finds no turn either
    assert wait_until(lambda: len(apps_sent(switch)) == len(sequence.apps.steps))
    gevent.sleep(0.01)
    apps = apps_sent(switch)
    assert len(apps) == len(sequence.apps.steps) and sum(a.startswith("bridge ") for a in apps) == 1, apps
    assert apps[0].startswith("multiset ") and not sequence.apps.pending
    kinds = [e.kind for e in CallEvent.select().where(CallEvent.call == sequence.call.id)]
    assert kinds.count("waiting_for_switch") == 1, kinds  # noted once, not at every retry


def test_a_reconcile_whose_questions_find_no_turn_is_taken_again(run_call: Callable[..., Any]) -> None:
    """After a reconnect every call asks about its legs at once; one whose question gets no turn looks
    again a moment later instead of waiting, unreconciled, for a reconnect that will not come."""
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    assert len(originates(switch)) == 1
    switch.answers = {"uuid_exists": "false"}
    switch.no_turn_for_api = 1
    sequence.deliver(Reconnected(False))
    sequence.greenlet.join(timeout=10)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.reason) == ("failed", "interrupted")


@pytest.mark.parametrize("news", ["queued before the answer", "written after the answer", "never"])
def test_an_idle_check_that_finds_a_gone_waits_for_its_hangup_before_calling_it_lost(
        run_call: Callable[..., Any], news: str) -> None:
    """A rings; the idle check asks whether A still exists just as A gives up (NO_ANSWER). The answer
    'false' may come with A's hangup already read (the stand-in's order) or just before it (FreeSWITCH may
    write the answer first): either way the call ends as the hangup says, failed on A with A's cause, not
    'interrupted'. Only a hangup that never comes is a lost track."""
    sequence, switch = run_call()
    sequence.options.idle_check = 0.2
    hangup = event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{"Hangup-Cause": "NO_ANSWER"})
    sequence.start()
    assert wait_until(lambda: len(originates(switch)) == 1)
    real_api = switch.api

    def api(command: str) -> str:
        answer = real_api(command)
        if command.startswith("uuid_exists " + sequence.a.uuid):
            switch.api = real_api  # type: ignore[method-assign]
            if news == "queued before the answer":
                sequence.deliver(hangup)
            elif news == "written after the answer":
                gevent.spawn_later(0.05, sequence.deliver, hangup)
        return answer

    switch.answers = {"uuid_exists": "false"}
    switch.api = api  # type: ignore[method-assign]
    sequence.greenlet.join(timeout=10)
    call = Call.get_by_id(sequence.call.id)
    kinds = [e.kind for e in CallEvent.select().where(CallEvent.call == sequence.call.id)]
    if news == "never":
        assert (call.status, call.failed_leg, call.reason) == ("failed", "", "interrupted")
        assert "lost_track" in kinds
    else:
        assert (call.status, call.failed_leg, call.a_cause, call.reason) == \
            ("failed", "a", "NO_ANSWER", "A was not reached"), kinds
        assert "lost_track" not in kinds


# -- legs waiting for room: a refused A, and what happens at and past originate_timeout --------------
def refused_a_waiting_for_room(sequence: CallSequence, switch: ScriptedSwitch) -> None:
    """A was refused over the switch's limit and the switch now admits nothing: A waits in line."""
    sequence.start()
    gevent.sleep(0)
    assert len(originates(switch)) == 1
    switch.capacity.learn_limits(sps=1)  # as read after the refusal: 1 a second leaves no room
    sequence.deliver(job_done(sequence.job_uuid, "-ERR DESTINATION_OUT_OF_ORDER\n"))
    gevent.sleep(0)
    assert "a" in sequence.wanted and switch.capacity.waiting == 1


def deadline_passes(sequence: CallSequence, switch: ScriptedSwitch, leg: str) -> None:
    """The leg's originate_timeout passes: its timer fires (here at once: the switch's clock is scripted)."""
    switch.now = max(switch.now, sequence.deadline[leg])
    timer = sequence.forcing[leg]
    if isinstance(timer, gevent.Greenlet):  # (a leg that never waited in line has none armed)
        timer.kill()
    sequence.deliver(Granted(leg, forced=True))
    gevent.sleep(0)


def time_passes_with_no_room(sequence: CallSequence, switch: ScriptedSwitch, leg: str, seconds: float) -> None:
    """``seconds`` go by and the line finds no room; then the leg's own timer fires (in real time)."""
    switch.now += seconds
    switch.capacity.serve(switch.now)
    timer = sequence.forcing[leg]
    assert isinstance(timer, gevent.Greenlet)  # the leg waits in line: its timer is armed
    timer.join(timeout=10)
    gevent.sleep(0)


def test_a_refused_a_waiting_for_room_outlives_a_reconnection_and_idle_checks(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """Nothing of a refused A exists on the switch: a reconnection or a quiet spell has nothing to reconcile
    (uuid_exists says false) and must not end the call 'interrupted'; A goes when room comes."""
    sequence, switch = run_call()
    sequence.options.idle_check = 0.05
    idle_checks = [0]
    real_check = sequence._check_alive

    def check_alive() -> None:
        idle_checks[0] += 1
        real_check()

    sequence._check_alive = check_alive  # type: ignore[method-assign]
    refused_a_waiting_for_room(sequence, switch)
    switch.answers = {"uuid_exists": "false"}
    sequence.deliver(Reconnected(False))
    assert wait_until(lambda: idle_checks[0] >= 3 or sequence.done)  # several idle checks with nothing heard
    assert not sequence.done, Call.get_by_id(sequence.call.id).reason
    assert not any(c.startswith("api uuid_exists") for c in switch.sent)
    switch.capacity.learn_limits(sps=30)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    assert len(originates(switch)) == 2


def test_a_forced_at_its_deadline_that_found_no_turn_goes_once_it_has_one(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    sequence, switch = run_call()
    refused_a_waiting_for_room(sequence, switch)
    switch.fail_next.append(EslNotSent("no turn"))
    deadline_passes(sequence, switch, "a")
    assert sequence.dial_pending and len(originates(switch)) == 1
    sequence.deliver(RetryDial())  # a second later: past the deadline, so A goes room or not
    gevent.sleep(0)
    time_passes_with_no_room(sequence, switch, "a", 0)
    assert len(originates(switch)) == 2  # the switch decides (a refusal now fails the call)


def test_b_forced_at_its_deadline_that_found_no_turn_goes_once_it_has_one(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """Past B's originate_timeout it goes room or not; a send that found no turn is tried again a second
    later, never left in a line that a full switch would keep it in while A hears the dialtone for ever."""
    sequence, switch = run_call()
    switch.capacity.learn_limits(max_sessions=10)
    switch.capacity.learn_status("9 session(s) - peak 9, last 5min 9 \n")  # full, with long calls
    answered_and_waiting(sequence, switch)
    assert "b" in sequence.wanted and breaks(switch, sequence.a.uuid) == []
    switch.no_turn_for_api = 1
    deadline_passes(sequence, switch, "b")
    assert breaks(switch, sequence.a.uuid) == [] and "b" in sequence.wanted
    time_passes_with_no_room(sequence, switch, "b", 120)  # the switch is still full
    assert len(breaks(switch, sequence.a.uuid)) == 1


def test_b_refused_just_before_its_deadline_is_tried_once_more_then_the_call_ends(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """The deadline passes between a refused bridge and A's next wait (B is not waiting then): the retry
    still goes after its backoff, room or not, and the switch's answer decides."""
    sequence, switch = run_call()
    answered_and_waiting(sequence, switch)
    assert len(breaks(switch, sequence.a.uuid)) == 1
    switch.now = sequence.deadline["b"] - 0.01
    bridge = sequence.apps.bridge
    assert bridge is not None
    sequence.deliver(executes(sequence.a.uuid, bridge.event_uuid, "bridge"))
    switch.capacity.learn_limits(sps=1)  # the switch admits nothing any more
    sequence.deliver(bridge_done(sequence.a.uuid, bridge.event_uuid, "DESTINATION_OUT_OF_ORDER"))
    gevent.sleep(0)
    assert sequence.after_bridge == "retry"
    deadline_passes(sequence, switch, "b")  # B is not in line at this moment: the timer finds nothing to do
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 1)))
    gevent.sleep(0)
    time_passes_with_no_room(sequence, switch, "b", 60)
    assert len(breaks(switch, sequence.a.uuid)) == 2


def test_a_b_sent_at_once_arms_no_deadline_timer_and_one_that_waits_later_gets_the_first_deadline(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The deadline's timer is armed only for a leg waiting in line: nearly every B goes at once and would
    leave a greenlet holding its sequence until originate_timeout. A B that waits later (a refusal's retry
    with no room) is forced at the deadline counted from when it was first wanted, as before."""
    sequence, switch = run_call()
    forced_in: list[float] = []
    spawn_later = gevent.spawn_later

    def spawn_later_noted(seconds: float, function: Any, *args: Any) -> gevent.Greenlet:
        if args and isinstance(args[0], Granted) and args[0].forced:
            forced_in.append(seconds)
        return spawn_later(seconds, function, *args)

    monkeypatch.setattr(gevent, "spawn_later", spawn_later_noted)
    answered_and_waiting(sequence, switch)
    assert len(breaks(switch, sequence.a.uuid)) == 1  # B went at once
    assert forced_in == []
    assert sequence.forcing["b"] == sequence.deadline["b"]  # when it would have been forced: nothing armed
    first_deadline = sequence.deadline["b"]
    switch.now += 3
    bridge = sequence.apps.bridge
    assert bridge is not None
    sequence.deliver(executes(sequence.a.uuid, bridge.event_uuid, "bridge"))
    switch.capacity.learn_limits(sps=1)  # the switch admits nothing any more: the retry waits in line
    sequence.deliver(bridge_done(sequence.a.uuid, bridge.event_uuid, "DESTINATION_OUT_OF_ORDER"))
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 1)))
    gevent.sleep(0)
    assert "b" in sequence.wanted
    timer = sequence.forcing["b"]
    assert isinstance(timer, gevent.Greenlet) and not timer.dead
    assert sequence.deadline["b"] == first_deadline
    # armed for what was left until the first deadline, not a whole originate_timeout from now
    assert forced_in == [pytest.approx(first_deadline - switch.now)]
    timer.kill()


def test_b_granted_by_the_line_and_at_its_deadline_in_one_turn_is_dialed_once(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    sequence, switch = run_call()
    for n in range(switch.capacity.rate_cap):  # this second's room is taken: B waits in line
        switch.capacity.reserve(f"other-{n}", switch.now)
        switch.capacity.sent(f"other-{n}", switch.now)
    answered_and_waiting(sequence, switch)
    assert breaks(switch, sequence.a.uuid) == [] and "b" in sequence.wanted
    switch.now += 1.01
    timer = sequence.forcing["b"]
    assert isinstance(timer, gevent.Greenlet)
    timer.kill()
    sequence.deliver(Granted("b", forced=True))  # the deadline's timer...
    switch.capacity.serve(switch.now)  # ...and the line, before the call's greenlet runs
    gevent.sleep(0)
    bridges = [a for a in apps_sent(switch) if a.startswith("bridge ")]
    assert (len(breaks(switch, sequence.a.uuid)), len(bridges), sequence.attempts["b"]) == (1, 1, 1)
    # the others, A and B sent (none created here), each once: the room the line reserved for B, unused,
    # went back
    assert switch.capacity.pending == switch.capacity.rate_cap + 2


def test_b_dialed_at_a_reconnect_while_its_retry_waits_in_line_leaves_no_room_taken(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """B's break found no turn (B asks again a second later, in line); the reconnect's look dials B at once.
    Its place in line must go with it: else the line grants B room again later, and if that grant comes as
    the call ends, the room is never given back (a switch of 2 sessions a second then admits no call)."""
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    switch.capacity.created(sequence.a.uuid, switch.now)  # as the link counts every CHANNEL_CREATE
    sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    switch.no_turn_for_api = 1  # the break that dials B finds no turn
    sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 0)))
    gevent.sleep(0)
    assert breaks(switch, sequence.a.uuid) == [] and "b" in sequence.wanted
    a = sequence.a.uuid
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {sequence.b.uuid}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      **playing_wait(a, 0)}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert len(breaks(switch, a)) == 1 and "b" not in sequence.wanted
    switch.capacity.created(sequence.b.uuid, switch.now)
    sequence.deliver(event("CHANNEL_CREATE", sequence.b.uuid))
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.b.uuid, **{"Hangup-Cause": "USER_BUSY"}))
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", a, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    switch.now += 1.5
    switch.capacity.serve(switch.now)  # the line, as the call's last events wait to be read
    sequence.greenlet.join(timeout=5)
    assert sequence.done
    assert (switch.capacity.waiting, switch.capacity.pending) == (0, 0)


@pytest.mark.parametrize("bridge_ran", [False, True])
def test_a_reconnect_finds_a_on_its_first_wait_as_freeswitch_shows_it(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], bridge_ran: bool) -> None:
    """FreeSWITCH removes app_uuid as each queued app starts: after a gap A's wait is known by what A runs, a
    looped playback, and by no bridge having run on it yet; B is then dialed at once, not a round later.
    A looped playback after a bridge ran is not taken for the first wait (B may have been dialed): it is the
    wait after a bridge that failed (busy here), and the call ends at once, B not dialed again."""
    sequence, switch = run_call()
    sequence.start()
    gevent.sleep(0)
    switch.capacity.created(sequence.a.uuid, switch.now)
    sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    a = sequence.a.uuid  # the connection went; A's wait started unheard
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {sequence.b.uuid}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      f"uuid_getvar {a} app_uuid": "_undef_", f"uuid_getvar {a} current_application": "playback",
                      f"uuid_getvar {a} total_loops": "-1",
                      f"uuid_getvar {a} originate_disposition": "USER_BUSY" if bridge_ran else "_undef_",
                      f"uuid_getvar {a} cb_wait": "_undef_"}
    before, bridges = len(breaks(switch, a)), len(bridges_to(switch, sequence.b.uuid))
    sequence.deliver(Reconnected(False))
    gevent.sleep(0.1)
    assert len(breaks(switch, a)) > before, switch.sent
    assert len(bridges_to(switch, sequence.b.uuid)) == bridges  # the one queued at A's answer, never again
    assert ("hangup NORMAL_CLEARING" in apps_sent(switch)) == bridge_ran, switch.sent


# -- a bridge to B retried after a refusal, then a restart or a reconnection ------------------------------
def test_adopted_call_with_b_ringing_after_an_earlier_refused_bridge_ends_when_b_fails(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """Previous run: the first bridge was refused by the switch (DESTINATION_OUT_OF_ORDER), the retry
    (second bridge) dialed B, B rings; the daemon is SIGKILLed. The new run adopts the call: A and B are
    both up. B is then busy: FreeSWITCH ends the bridge (continue_on_fail) and A starts the wait queued
    after the second bridge, wait_uuid(A, 2). The adopted sequence must end A (notice + hangup, break).
    """
    sequence, switch = adopted_with_b_ringing(run_call)
    a, b = sequence.a.uuid, sequence.b.uuid
    # B is busy: B's hangup, the bridge's end on A, then A starts the wait after the 2nd bridge.
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", b, **{"Hangup-Cause": "USER_BUSY"}))
    sequence.deliver(event("CHANNEL_EXECUTE_COMPLETE", a, **{
        "Application": "bridge", "Application-UUID": "prev-run-bridge-2",
        "variable_originate_disposition": "USER_BUSY", "variable_DIALSTATUS": "BUSY"}))
    sequence.deliver(event("CHANNEL_EXECUTE", a, **{"Application": "playback",
                                                    "Application-UUID": wait_uuid(a, 2)}))
    gevent.sleep(0.05)
    apps = apps_sent(switch)
    assert "hangup NORMAL_CLEARING" in apps and breaks(switch, a), (
        f"A left on the dialtone: after_bridge={sequence.after_bridge!r} apps={apps} sent={switch.sent}")


def b_refused_then_retried(sequence: CallSequence, switch: ScriptedSwitch) -> list[str]:
    """A answers and waits, bridge 1 is refused by the switch, and the retry (bridge 2) is queued and its
    break sent; returns the bridges to B queued on A so far."""
    answered_and_waiting(sequence, switch)
    a = sequence.a.uuid
    the_switch_refuses_b(sequence)
    sequence.deliver(executes(a, wait_uuid(a, 1)))
    gevent.sleep(0)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    return bridges_to(switch, sequence.b.uuid)


def bridges_to(switch: ScriptedSwitch, b_uuid: str) -> list[str]:
    return [m for m in apps_sent(switch) if m.startswith("bridge ") and b_uuid in m]


def test_a_retry_bridge_that_ended_unheard_is_not_dialed_again_after_a_reconnect(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """Bridge 1 is refused by the switch (nothing created) and retried: bridge 2 dials B. The Event Socket
    then drops; while it is down B is busy (B created and gone, its end unheard) and A moves on to the
    wait queued after bridge 2. On reconnecting, A's variables say bridge 2 failed with USER_BUSY and that
    B was originated (originated_legs). The call must end (notice + hangup), not dial B a third time."""
    sequence, switch = run_call()
    a, b = sequence.a.uuid, sequence.b.uuid
    assert len(b_refused_then_retried(sequence, switch)) == 2 and len(breaks(switch, a)) == 2  # 2 dials B
    # -- the connection drops here; B (created by bridge 2) is busy; A starts wait 2 -- all unheard --
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER",
                      f"uuid_getvar {a} cb_stage": "queued",
                      **playing_wait(a, 2, "USER_BUSY"),
                      f"uuid_getvar {a} originated_legs": f"{b};Outbound Call;15550000002",
                      f"uuid_getvar {a}": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0.05)
    assert len(bridges_to(switch, b)) == 2  # B, busy, is not dialed again
    assert "hangup NORMAL_CLEARING" in apps_sent(switch)


def adopted_on_wait_1(run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]],
                      note: str) -> CallSequence:
    """Bridge 1 refused; the retry's [bridge, wait] were queued on A, but the break found no turn and the
    daemon was killed. The next start finds A still on wait 1, with ``cb_requeued`` as ``note`` says (a run
    before 2026-12 noted the retry on A after queueing it: a death in between left no note; now none is
    written, and one found is not trusted). The adopted sequence, once B has room; ``switch.sent`` holds
    what it sent."""
    first, switch = run_call()
    a, b = first.a.uuid, first.b.uuid
    assert len(b_refused_then_retried(first, switch)) == 2  # its break is taken below as never sent
    first.greenlet.kill()  # the process dies; A, as the next start finds it, still plays wait 1
    switch.sent.clear()
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      **playing_wait(a, 1), f"uuid_getvar {a} cb_requeued": note,
                      f"uuid_getvar {a}": "_undef_"}
    sequence = adopted(Call.get_by_id(first.call.id), first, switch)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0.05)
    return sequence


@pytest.mark.parametrize("note", ["2", "_undef_"])
def test_an_adopted_call_whose_retry_bridge_may_be_queued_flushes_it_and_queues_it_once(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], note: str) -> None:
    """Bridge 1 refused; the retry's [bridge, wait] were queued on A (noted on A, or not: the daemon died
    right after queueing them), the break never sent. The next start finds A still on wait 1 and cannot know
    what A holds after it: it drops it all with the wait (``uuid_break all``) and queues the bridge and the
    wait after it once, with no plain break that would leave a second bridge behind the first (B dialed
    again if the first failed). Without the note, the next start used to queue the retry behind the first."""
    sequence = adopted_on_wait_1(run_call, note)
    switch = sequence.switch
    assert isinstance(switch, ScriptedSwitch)
    a, b = sequence.a.uuid, sequence.b.uuid
    assert not sequence.done
    flush = f"api uuid_break {a} all"
    assert breaks(switch, a) == [flush], switch.sent
    assert len(bridges_to(switch, b)) == 1 and switch.sent.index(flush) < next(
        i for i, m in enumerate(switch.sent) if m.startswith("sendmsg") and b in m)


@pytest.mark.parametrize("refused", [1, 2])
def test_an_adopted_call_on_the_wait_after_a_refused_bridge_dials_b_again_at_once(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], refused: int) -> None:
    """Bridges to B refused by the switch over its limits (nothing created), the last one's refusal heard or
    not; the daemon dies with A on the wait after it. The next start finds A as FreeSWITCH shows it (no
    app_uuid; which wait, from originate_disposition and cb_wait) and, once B has room, drops A's queue with
    the wait and queues the bridge and the next wait (its cb_wait first) once. It used to take the refusal
    for B's failure: A got the busy notice and was hung up, B never tried again."""
    first, switch = run_call()
    a, b = first.a.uuid, first.b.uuid
    if refused == 1:
        answered_and_waiting(first, switch)
        the_switch_refuses_b(first)
    else:
        assert len(b_refused_then_retried(first, switch)) == 2
        the_switch_refuses_b(first)  # bridge 2 too
        assert apps_sent(switch)[-2:] == ["set cb_wait=2", apps_sent(switch)[-1]]  # before wait 2
    gevent.sleep(0)
    first.greenlet.kill()  # the process dies with A on the wait after the refused bridge
    switch.sent.clear()
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      **playing_wait(a, refused), f"uuid_getvar {a}": "_undef_"}
    sequence = adopted(Call.get_by_id(first.call.id), first, switch)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0.05)
    assert not sequence.done and sequence.after_bridge == ""
    assert breaks(switch, a) == [f"api uuid_break {a} all"], switch.sent
    apps = apps_sent(switch)
    assert len(bridges_to(switch, b)) == 1 and "hangup NORMAL_CLEARING" not in apps, apps
    assert apps[1:] == [f"set cb_wait={refused + 1}", apps[-1]] and apps[-1].startswith("playback "), apps
    assert sequence.attempts["b"] == refused + 1


def test_an_adopted_call_parked_after_a_refused_bridge_queues_the_wait_and_dials_b_again(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """The switch refused the bridge's B and the run died before the wait after it was queued: the next
    start finds A on no wait (FreeSWITCH leaves current_application at bridge), the bridge refused, B never
    created. The marker queued behind A's steps runs, the wait is queued and, at its start, B is dialed
    again once; the refusal used to be taken for B's failure (busy notice, hangup)."""
    first, switch = run_call()
    a, b = first.a.uuid, first.b.uuid
    answered_and_waiting(first, switch)
    first.greenlet.kill()  # died as the bridge was refused (unheard), before its wait was queued
    switch.sent.clear()
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      f"uuid_getvar {a} current_application": "bridge",
                      f"uuid_getvar {a} originate_disposition": "DESTINATION_OUT_OF_ORDER",
                      f"uuid_getvar {a}": "_undef_"}
    sequence = adopted(Call.get_by_id(first.call.id), first, switch)
    assert not sequence.done and sequence.after_bridge == "retry" and sequence.tail_marker
    sequence.deliver(executes(a, sequence.tail_marker, "set"))  # A's queue ended short: the wait is queued
    gevent.sleep(0)
    wait = apps_sent(switch)[-1]
    assert wait.startswith("playback ") and "hangup NORMAL_CLEARING" not in apps_sent(switch), apps_sent(switch)
    sequence.deliver(executes(a, wait_uuid(a, 1)))
    gevent.sleep(0)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0.05)
    assert breaks(switch, a) == [f"api uuid_break {a} all"], switch.sent
    assert len(bridges_to(switch, b)) == 1 and "hangup NORMAL_CLEARING" not in apps_sent(switch)


@pytest.mark.parametrize("where", ["on wait 2", "between bridge 2 and wait 2"])
def test_a_retry_whose_break_was_lost_in_flight_acts_on_the_retry_bridge_s_own_outcome(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], monkeypatch: pytest.MonkeyPatch,
        where: str) -> None:
    """Bridge 1 is refused; the retry (bridge 2 and wait 2) is queued and the break that starts it is lost in
    flight: it reached FreeSWITCH, bridge 2 dialed B and B was busy, all unheard. The decision "retry" was
    bridge 1's: taken for bridge 2's, B was dialed a third time (A on wait 2 at the reconnect) or A was
    left on wait 2 for ever (A between bridge 2 and wait 2: B "created" was never dialed, nothing broke it)."""
    sequence, switch = run_call()
    a, b = sequence.a.uuid, sequence.b.uuid
    answered_and_waiting(sequence, switch)
    the_switch_refuses_b(sequence)
    sequence.deliver(executes(a, wait_uuid(a, 1)))
    gevent.sleep(0)
    scripted = switch.api

    def break_lost(command: str) -> str:
        reply = scripted(command)
        if command.startswith(f"uuid_break {a}"):
            monkeypatch.setattr(switch, "api", scripted)
            raise EslDisconnected("closed mid-command")  # sent, reply lost
        return reply

    monkeypatch.setattr(switch, "api", break_lost)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0)
    assert len(bridges_to(switch, b)) == 2 and len(breaks(switch, a)) == 2 and sequence.connection_lost
    # -- unheard: bridge 2 dials B, B is busy, A goes on to wait 2 (or is between the two) --
    a_now = (playing_wait(a, 2, "USER_BUSY") if where == "on wait 2" else
             {f"uuid_getvar {a} current_application": "bridge", f"uuid_getvar {a} originate_disposition": "USER_BUSY"})
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      **a_now, f"uuid_getvar {a} originated_legs": f"{b};Outbound Call;15550000002",
                      f"uuid_getvar {a}": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    if where != "on wait 2":
        sequence.deliver(executes(a, wait_uuid(a, 2)))
        gevent.sleep(0)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0.05)
    assert len(bridges_to(switch, b)) == 2, apps_sent(switch)  # B, busy, is not dialed a third time
    assert apps_sent(switch)[-1] == "hangup NORMAL_CLEARING" and len(breaks(switch, a)) == 3, switch.sent  # ended
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", a, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg, call.b_cause) == ("failed", "b", "USER_BUSY")


@pytest.mark.parametrize("in_doubt", ["the wait", "the bridge"])
def test_steps_in_doubt_are_settled_before_b_is_dialed_when_the_reconcile_is_delayed(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], in_doubt: str) -> None:
    """The write holding the wait (or, from the bridge on) is lost in flight; after the reconnect the look at
    the legs finds no turn (every call asks at once) and is taken again a moment later, while A's wait is heard
    to start on the new connection. The wait heard is proof it arrived: it is never sent again (a second copy
    held A on the dialtone once the first was broken); the bridge in doubt is settled before B's turn breaks
    the wait: a marker is queued behind A's steps first, so the break runs the bridge if it arrived, else the
    marker, which sends it (breaking with nothing settled, or sending the wait after the bridge first, ran that
    wait with no bridge before it: the call ended "B was not reached", B never dialed)."""
    sequence, switch = run_call()
    a, b = sequence.a.uuid, sequence.b.uuid
    switch.fail_message_at = 2 if in_doubt == "the wait" else 3
    sequence.start()
    sequence.deliver(event("CHANNEL_CREATE", a))
    sequence.deliver(event("CHANNEL_ANSWER", a))
    gevent.sleep(0)
    # The wait, the bridge and the wait after it; or the bridge and the wait after it.
    assert len(sequence.apps.uncertain) == (3 if in_doubt == "the wait" else 2) and sequence.connection_lost
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      f"uuid_getvar {a}": "_undef_"}
    switch.no_turn_for_api = 1
    sequence.deliver(Reconnected(False))  # its first question finds no turn: looked at again in a moment
    sequence.deliver(executes(a, wait_uuid(a, 0)))  # heard on the new connection meanwhile: B has room
    gevent.sleep(0)
    assert [step.app for step in sequence.apps.uncertain] == ["bridge", "playback"]  # B put off meanwhile
    looked = lambda: sum(c.startswith(f"api uuid_exists {a}") for c in switch.sent)  # noqa: E731
    assert wait_until(lambda: looked() == 1, timeout=3)  # the look, taken again
    gevent.sleep(0.01)
    marker = sequence.apps.marker  # queued behind A's steps, before B's turn breaks the wait
    assert marker is not None and not breaks(switch, a) and not bridges_to(switch, b)
    switch.now += 5  # B's turn, put off until the look settled what was in doubt
    switch.capacity.serve(switch.now)
    assert wait_until(lambda: bool(breaks(switch, a)), timeout=3)
    queued_marker = max(i for i, m in enumerate(switch.sent) if f"Event-UUID: {marker.event_uuid}" in m)
    assert queued_marker < switch.sent.index(breaks(switch, a)[0])
    assert not bridges_to(switch, b)  # it may have arrived: not sent again blindly
    sequence.deliver(executes(a, marker.event_uuid, "set"))  # the break ran the marker: the bridge never arrived
    gevent.sleep(0)
    apps = apps_sent(switch)
    copies = sum(f"Event-UUID: {wait_uuid(a, 0)}" in m for m in switch.sent)  # besides the one lost in flight
    assert copies == (0 if in_doubt == "the wait" else 1), apps  # one on A, never two
    assert [x.split(" ")[0] for x in apps[-2:]] == ["bridge", "playback"], apps  # the bridge, then its wait
    assert len(bridges_to(switch, b)) == 1 and not sequence.apps.pending and sequence.apps.marker is None


def test_wait_uuid_is_the_uuid5_of_the_a_leg_and_the_attempt() -> None:
    """What a previous version derived (an adopted call must know its waits' events after an upgrade)."""
    from daemon.calls.sequence import WAIT_NAMESPACE
    for _ in range(300):
        a_uuid = str(uuid.uuid4())
        for attempt in (0, 1, 2, 17, 63):
            assert wait_uuid(a_uuid, attempt) == str(uuid.uuid5(WAIT_NAMESPACE, f"{a_uuid}:wait:{attempt}"))
    assert wait_uuid("6f1d9c55-2b7e-4f0c-9a51-4e4d1b7c3a21", 0) == "c36b3da9-465a-5384-908d-7bbb1b91e529"


def sendmsgs_of(switch: ScriptedSwitch, event_uuid: str) -> int:
    return sum(f"Event-UUID: {event_uuid}" in m for m in switch.sent if m.startswith("sendmsg"))


def reconnect_with_b_absent(sequence: CallSequence, switch: ScriptedSwitch) -> None:
    a, b = sequence.a.uuid, sequence.b.uuid
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      f"uuid_getvar {a}": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)


def answered_with_the_write_lost_after(run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]],
                                       answered: int) -> tuple[CallSequence, ScriptedSwitch]:
    """A call whose A answered and whose one write of A's steps was lost after ``answered`` replies."""
    sequence, switch = run_call()
    switch.fail_message_at = answered
    sequence.start()
    sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    return sequence, switch


@pytest.mark.parametrize("shows", ["the wait after it starts", "the marker runs"])
def test_the_wait_after_the_bridge_in_doubt_is_settled_by_what_a_runs_after_a_failed_bridge(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], shows: str) -> None:
    """The write is lost with only the wait after the bridge unanswered. B is dialed as usual (nothing
    uncertain once the marker is queued); B appearing says nothing about that wait. B fails: A runs that wait
    if it arrived (never sent again: a second copy would hold A after the notice's break), else the marker,
    which has it sent once. Either way A hears the notice and is hung up."""
    sequence, switch = answered_with_the_write_lost_after(run_call, 4)
    a, b = sequence.a.uuid, sequence.b.uuid
    wait_after = wait_uuid(a, 1)
    assert [step.event_uuid for step in sequence.apps.uncertain] == [wait_after]
    reconnect_with_b_absent(sequence, switch)
    marker = sequence.apps.marker
    assert marker is not None and apps_sent(switch)[-1] == marker_app(sequence)
    sequence.deliver(executes(a, wait_uuid(a, 0)))  # the wait before the bridge: B has room, the wait is broken
    gevent.sleep(0)
    assert len(breaks(switch, a)) == 1
    sequence.deliver(executes(a, sequence.apps.bridge.event_uuid, "bridge"))
    sequence.deliver(event("CHANNEL_CREATE", b))
    sequence.deliver(bridge_done(a, sequence.apps.bridge.event_uuid, "USER_BUSY"))
    gevent.sleep(0)
    assert sequence.apps.marker is marker and sendmsgs_of(switch, wait_after) == 0
    if shows == "the marker runs":
        sequence.deliver(executes(a, marker.event_uuid, "set"))
        gevent.sleep(0)
        assert sendmsgs_of(switch, wait_after) == 1
    sequence.deliver(executes(a, wait_after))
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert sendmsgs_of(switch, wait_after) == (1 if shows == "the marker runs" else 0), apps
    assert len(bridges_to(switch, b)) == 1 and apps[-1] == "hangup NORMAL_CLEARING" and len(breaks(switch, a)) == 2
    assert sequence.apps.marker is None and not sequence.apps.in_doubt


def test_the_whole_write_lost_unanswered_is_sent_once_when_the_marker_runs(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """No step answered: any prefix may be on A. The marker queued behind them runs first here (nothing had
    arrived): all five are sent once, and B is dialed once at the wait."""
    sequence, switch = answered_with_the_write_lost_after(run_call, 0)
    a, b = sequence.a.uuid, sequence.b.uuid
    assert len(sequence.apps.uncertain) == 5 and apps_sent(switch) == []
    reconnect_with_b_absent(sequence, switch)
    assert apps_sent(switch) == [marker_app(sequence)] and not breaks(switch, a)
    sequence.deliver(executes(a, sequence.apps.marker.event_uuid, "set"))
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert [x.split(" ")[0] for x in apps] == ["set", "multiset", "sched_hangup", "playback", "bridge", "playback"]
    sequence.deliver(executes(a, wait_uuid(a, 0)))
    gevent.sleep(0)
    assert len(breaks(switch, a)) == 1 and len(bridges_to(switch, b)) == 1
    assert sendmsgs_of(switch, wait_uuid(a, 0)) == sendmsgs_of(switch, wait_uuid(a, 1)) == 1
    assert not sequence.apps.pending and not sequence.apps.in_doubt


@pytest.mark.parametrize("b_created", [False, True], ids=["the bridge never arrived", "the bridge ran, B busy"])
def test_a_marker_that_ran_while_the_connection_was_down_again_is_read_from_a_at_the_next_reconnect(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], b_created: bool) -> None:
    """The write is lost with the bridge and the wait after it in doubt; the reconnect queues the marker, A's
    wait is heard and B's turn breaks it; then the connection drops again: A runs the bridge (if it arrived)
    and the marker unheard, and parks. Nothing was sent at the next reconnect (nothing unsent; the marker's
    start never heard): A sat parked until its sched_hangup. Now A's cb_resume names the marker: the bridge
    is sent unless B was created (A's originated_legs), then the wait after it, each once."""
    sequence, switch = answered_with_the_write_lost_after(run_call, 3)
    a, b = sequence.a.uuid, sequence.b.uuid
    reconnect_with_b_absent(sequence, switch)
    marker = sequence.apps.marker
    assert marker is not None and [step.app for step in sequence.apps.waiting_for_marker] == ["bridge", "playback"]
    sequence.deliver(executes(a, wait_uuid(a, 0)))  # B has room: the wait is broken
    gevent.sleep(0)
    assert len(breaks(switch, a)) == 1 and not bridges_to(switch, b)
    # -- dropped again: A ran the bridge if it arrived (B busy), then the marker, all unheard --
    ran = {f"uuid_getvar {a} originated_legs": f"{b};sofia/gateway/carrier/15550000002;15550000002",
           f"uuid_getvar {a} originate_disposition": "USER_BUSY"} if b_created else {}
    switch.answers = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
                      f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
                      f"uuid_getvar {a} cb_resume": marker.event_uuid, **ran, f"uuid_getvar {a}": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert sequence.apps.marker is None and not sequence.apps.in_doubt and not sequence.apps.pending
    assert len(bridges_to(switch, b)) == (0 if b_created else 1), apps_sent(switch)
    assert sendmsgs_of(switch, wait_uuid(a, 1)) == 1 and apps_sent(switch)[-1].startswith("playback ")
    if b_created:  # the wait after the failed bridge: the notice and the hangup
        sequence.deliver(executes(a, wait_uuid(a, 1)))
        gevent.sleep(0)
        assert apps_sent(switch)[-1] == "hangup NORMAL_CLEARING" and len(breaks(switch, a)) == 2
        sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", a, **{"Hangup-Cause": "NORMAL_CLEARING"}))
        sequence.greenlet.join(timeout=5)
        call = Call.get_by_id(sequence.call.id)
        assert (call.status, call.failed_leg, call.b_cause) == ("failed", "b", "USER_BUSY")


def test_a_marker_not_yet_run_at_the_next_reconnect_is_still_waited_for(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]]) -> None:
    """cb_resume does not name the marker (A has not reached it): nothing is sent; its start, heard on the new
    connection, settles the steps waiting for it."""
    sequence, switch = answered_with_the_write_lost_after(run_call, 3)
    a, b = sequence.a.uuid, sequence.b.uuid
    reconnect_with_b_absent(sequence, switch)
    marker = sequence.apps.marker
    assert marker is not None
    sent = apps_sent(switch)
    reconnect_with_b_absent(sequence, switch)  # cb_resume unset
    assert sequence.apps.marker is marker and apps_sent(switch) == sent
    assert f"api uuid_getvar {a} cb_resume" in switch.sent
    sequence.deliver(executes(a, marker.event_uuid, "set"))
    gevent.sleep(0)
    assert len(bridges_to(switch, b)) == 1 and sendmsgs_of(switch, wait_uuid(a, 1)) == 1


@pytest.mark.parametrize("ran", [True, False], ids=["the tail marker ran unheard", "not yet"])
def test_a_tail_marker_that_ran_while_the_connection_was_down_is_read_from_a_at_the_next_reconnect(
        run_call: Callable[..., tuple[CallSequence, ScriptedSwitch]], ran: bool) -> None:
    """An adopted call parked after a refused bridge queues the tail marker to learn whether the wait after
    the bridge is on A; the connection drops and the marker runs unheard: A's steps ended short and A sat
    parked (the next reconnect saw a tail marker queued and queued no other). Now A's cb_tail names it: the
    wait is queued, and at its start B is dialed again once. Not yet run: its start is still waited for."""
    first, switch = run_call()
    a, b = first.a.uuid, first.b.uuid
    answered_and_waiting(first, switch)
    first.greenlet.kill()  # died as the bridge was refused (unheard), before its wait was queued
    switch.sent.clear()
    parked = {f"uuid_exists {a}": "true", f"uuid_exists {b}": "false",
              f"uuid_getvar {a} endpoint_disposition": "ANSWER", f"uuid_getvar {a} cb_stage": "queued",
              f"uuid_getvar {a} current_application": "bridge",
              f"uuid_getvar {a} originate_disposition": "DESTINATION_OUT_OF_ORDER"}
    switch.answers = {**parked, f"uuid_getvar {a}": "_undef_"}
    sequence = adopted(Call.get_by_id(first.call.id), first, switch)
    tail = sequence.tail_marker
    assert tail and len(apps_sent(switch)) == 1  # the tail marker
    # -- dropped: the tail marker runs unheard (or not yet) --
    switch.answers = {**parked, **({f"uuid_getvar {a} cb_tail": tail} if ran else {}), f"uuid_getvar {a}": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    apps = apps_sent(switch)
    assert len(apps) == (2 if ran else 1), apps  # ran: the wait is queued at once
    assert apps[0] == f"set cb_tail={tail}"  # (the tail marker sets cb_tail to its own event UUID)
    if not ran:
        assert sequence.tail_marker == tail
        sequence.deliver(executes(a, tail, "set"))
        gevent.sleep(0)
    wait = apps_sent(switch)[-1]
    assert wait.startswith("playback ") and sequence.tail_marker == "", apps_sent(switch)
    sequence.deliver(executes(a, wait_uuid(a, 1)))
    gevent.sleep(0)
    switch.now += 5
    switch.capacity.serve(switch.now)
    gevent.sleep(0.05)
    assert len(bridges_to(switch, b)) == 1 and "hangup NORMAL_CLEARING" not in apps_sent(switch)
