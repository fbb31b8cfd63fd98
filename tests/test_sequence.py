"""A call's sequence against a scripted switch: what is sent, and what is never sent twice."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import gevent
import pytest

from daemon.esl import EslDisconnected, EslEvent
from daemon.journal import Journal
from daemon.metrics import Metrics
from daemon.sequence import CallOptions, CallSequence, NotSent, Reconnected
from daemon.store import Call, CallStatus, Endpoint, utcnow


class ScriptedSwitch:
    """Records commands; ``fail_next`` makes the next bgapi raise; api answers from ``answers``."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.fail_next: list[BaseException] = []
        self.answers: dict[str, str] = {}
        self.routes: dict[str, CallSequence] = {}
        self.fail_message_at: int | None = None

    def bgapi(self, command: str, job_uuid: str) -> str:
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.sent.append("bgapi " + command)
        return f"+OK Job-UUID: {job_uuid}"

    def api(self, command: str) -> str:
        self.sent.append("api " + command)
        return next((v for k, v in self.answers.items() if command.startswith(k)), "+OK\n")

    def send_message(self, message: str) -> Any:
        if self.fail_message_at is not None and len([m for m in self.sent if m.startswith("sendmsg")]) == \
                self.fail_message_at:
            self.fail_message_at = None
            raise EslDisconnected("closed mid-command")
        self.sent.append(message)
        return None

    def route(self, key: str, sequence: CallSequence) -> None:
        self.routes[key] = sequence

    def unroute(self, key: str) -> None:
        self.routes.pop(key, None)


def event(name: str, uuid_: str, **headers: str) -> EslEvent:
    return EslEvent({"Event-Name": name, "Unique-ID": uuid_, **headers}, "", content_type="text/event-plain")


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
        sequence = CallSequence(call, endpoint, switch, Journal(Metrics()), options)  # type: ignore[arg-type]
        return sequence, switch

    return run


def originates(switch: ScriptedSwitch) -> list[str]:
    return [c for c in switch.sent if c.startswith("bgapi originate")]


def test_an_originate_that_was_never_sent_is_sent_once_reconnected(run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    switch.fail_next.append(NotSent("not connected"))
    sequence.start()
    gevent.sleep(0)
    assert originates(switch) == []
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert len(originates(switch)) == 1
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    assert Call.get_by_id(sequence.call.id).status == "a_answered"


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
    assert (call.status, call.failed_leg, call.reason) == ("failed", "a", "interrupted")


def test_after_answer_the_apps_are_queued_on_a_in_order_with_the_bridge_last_but_the_notice(
        run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    apps = [m.split("execute-app-name: ")[1].split("\n")[0] + " " + m.split("\n\n", 1)[1]
            for m in switch.sent if m.startswith("sendmsg")]
    assert apps[0] == "set cb_stage=queued"
    assert apps[1] == f"sched_hangup +{sequence.endpoint.max_duration} ALLOTTED_TIMEOUT"
    assert "set hangup_after_bridge=true" in apps and "set continue_on_fail=true" in apps
    assert apps.index("set instant_ringback=true") < next(i for i, a in enumerate(apps) if a.startswith("bridge "))
    assert apps[-2].startswith("playback tone_stream://") and apps[-1] == "hangup NORMAL_CLEARING"
    assert f"origination_uuid={sequence.b.uuid}" in apps[-3]
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


def test_connection_lost_while_queuing_ends_the_call_rather_than_risk_dialing_b_twice(
        run_call: Callable[..., Any]) -> None:
    sequence, switch = run_call()
    switch.fail_message_at = 3
    sequence.start()
    sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
    gevent.sleep(0)
    switch.answers = {f"uuid_exists {sequence.a.uuid}": "true", f"uuid_exists {sequence.b.uuid}": "false",
                      "uuid_getvar": "_undef_"}
    sequence.deliver(Reconnected(False))
    gevent.sleep(0)
    assert f"api uuid_kill {sequence.a.uuid} NORMAL_CLEARING" in switch.sent
    sequence.deliver(event("CHANNEL_HANGUP_COMPLETE", sequence.a.uuid, **{"Hangup-Cause": "NORMAL_CLEARING"}))
    sequence.greenlet.join(timeout=5)
    call = Call.get_by_id(sequence.call.id)
    assert (call.status, call.failed_leg) == ("failed", "a")
    assert call.reason == "connection to FreeSWITCH lost while setting up the call"
    assert not any("execute-app-name: bridge" in m for m in switch.sent)
