"""Every row of the test number plan, through bgapi originate, with FreeSWITCH's results and events."""

from __future__ import annotations

import time

import gevent
import pytest

from freeswitch.standin import StandIn
from freeswitch.standin.originate import originate

from .esl_client import EslClient
from .helpers import bg_originate, job_result, names_for, plan_duration_ok, wait_gone

REFUSED = [
    ("15550003101", "USER_BUSY", "486"),
    ("15550005101", "UNALLOCATED_NUMBER", "404"),
    ("15550008101", "CALL_REJECTED", "403"),
    ("15559999999", "UNALLOCATED_NUMBER", "404"),
    ("4711", "UNALLOCATED_NUMBER", "404"),
]


@pytest.mark.parametrize(("number", "cause", "status"), REFUSED)
def test_refused_numbers(client: EslClient, standin: StandIn, number: str, cause: str, status: str) -> None:
    uuid, job = bg_originate(client, number)
    assert job_result(client, job) == f"-ERR {cause}\n"
    wait_gone(standin, uuid)
    client.wait_event(lambda m: m.name == "CHANNEL_DESTROY" and m.e("Unique-ID") == uuid)
    assert names_for(client, uuid) == ["CHANNEL_CREATE", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE",
                                       "CHANNEL_DESTROY"]
    hup = client.named("CHANNEL_HANGUP_COMPLETE", uuid)[0]
    assert hup.e("Hangup-Cause") == cause
    assert hup.e("variable_sip_term_status") == status
    assert hup.e("variable_sip_invite_failure_status") == status
    assert hup.e("variable_sip_hangup_disposition") == "recv_refuse"


ANSWERED = [
    # number, events before answer, plan seconds to answer, far end hangs up after (plan s)
    # 300 plan seconds: at the default scale that is 15 s; at 0.01 its slack (60 plan s) is still 0.6 s.
    pytest.param("15550000101", [], 0.02, 300.0, marks=pytest.mark.time_scale(0.01)),
    ("15550001101", ["CHANNEL_PROGRESS"], 2.0, 60.0),
    ("15550002101", ["CHANNEL_PROGRESS"], 1.0, 30.0),
    ("15550006101", [], 0.02, 2.0),
    ("15550007101", ["CHANNEL_PROGRESS_MEDIA"], 3.0, 30.0),
    ("15550009101", ["CHANNEL_PROGRESS"], 1.0, 30.0),
]


@pytest.mark.parametrize(("number", "early", "answer_after", "up_for"), ANSWERED)
def test_answering_numbers(client: EslClient, standin: StandIn, number: str, early: list[str],
                           answer_after: float, up_for: float) -> None:
    started = time.monotonic()
    uuid, job = bg_originate(client, number, extra="cb_callid=abc123")
    assert job_result(client, job) == f"+OK {uuid}\n"
    answered_after = (time.monotonic() - started) / standin.time_scale
    assert answered_after >= answer_after * 0.9
    client.wait_event(lambda m: m.name == "CHANNEL_PARK" and m.e("Unique-ID") == uuid)
    assert names_for(client, uuid)[: len(early) + 2] == ["CHANNEL_CREATE", *early, "CHANNEL_ANSWER"]
    answer = client.named("CHANNEL_ANSWER", uuid)[0]
    assert answer.e("variable_cb_callid") == "abc123"
    assert answer.e("Caller-Destination-Number") == number
    # The far end hangs up by itself after its plan time.
    hup = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == uuid,
                            timeout=up_for * standin.time_scale + 5)
    assert hup.e("Hangup-Cause") == "NORMAL_CLEARING"
    assert hup.e("variable_sip_hangup_disposition") == "recv_bye"
    assert hup.e("variable_sip_term_status") == "200"
    ch = standin.channel(uuid)
    assert ch is not None and ch.answered_at is not None and ch.ended_at is not None
    assert plan_duration_ok((ch.ended_at - ch.answered_at) / standin.time_scale, up_for, slack=max(4.0, up_for * 0.2))


def test_dtmf_from_plan_9(client: EslClient) -> None:
    uuid, job = bg_originate(client, "15550009101")
    assert job_result(client, job).startswith("+OK")
    client.wait_event(lambda m: len(client.named("DTMF", uuid)) == 5)
    dtmf = client.named("DTMF", uuid)
    assert [m.e("DTMF-Digit") for m in dtmf] == list("1234#")
    assert {m.e("DTMF-Source") for m in dtmf} == {"RTP"}


def test_ring_no_answer_times_out(client: EslClient, standin: StandIn) -> None:
    started = time.monotonic()  # before the request: the switch starts the timeout before its reply is read
    uuid, job = bg_originate(client, "15550004101", extra="originate_timeout=5")
    assert job_result(client, job) == "-ERR NO_ANSWER\n"
    assert plan_duration_ok((time.monotonic() - started) / standin.time_scale, 5.0)
    hup = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == uuid)
    assert hup.e("Hangup-Cause") == "NO_ANSWER"
    assert hup.e("variable_sip_hangup_disposition") == "send_cancel"
    assert "CHANNEL_PROGRESS" in names_for(client, uuid)
    client.wait_event(lambda m: m.name == "CHANNEL_DESTROY" and m.e("Unique-ID") == uuid)
    # Trace 07, #28-#31: the switch's own timeout reports the result before the leg's HANGUP_COMPLETE.
    ending = [m.name for m in client.events if m.e("Unique-ID") == uuid or m.e("Job-UUID") == job]
    assert ending[-4:] == ["CHANNEL_HANGUP", "BACKGROUND_JOB", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_DESTROY"]


def test_ring_no_answer_default_timeout_is_60s(client: EslClient, standin: StandIn) -> None:
    started = time.monotonic()
    _, job = bg_originate(client, "15550004102")
    assert job_result(client, job) == "-ERR NO_ANSWER\n"
    assert plan_duration_ok((time.monotonic() - started) / standin.time_scale, 60.0, slack=10.0)


@pytest.mark.parametrize("number", ["15550007103", "15550003103"])
def test_a_stall_of_the_switch_does_not_outlast_a_far_end_that_already_acted(standin: StandIn, number: str) -> None:
    """A loaded machine stalls the stand-in's process after a leg was invited and before its far end ran,
    past the originate's timeout. The far end is another machine whose clock did not stall: it answered
    (or refused) in time, so the originate reports that, not NO_ANSWER (the soak's CI flake)."""
    dial = f"{{ignore_early_media=true,originate_timeout=10}}sofia/gateway/carrier/{number}"
    result = gevent.spawn(originate, standin.switch, dial)

    def stall() -> None:  # runs after the originate invited the leg, before its far end's greenlet
        until = time.monotonic() + standin.switch.real(15)
        while time.monotonic() < until:
            pass

    gevent.spawn(stall)
    ch, cause = result.get(timeout=30)
    assert ch is not None
    assert cause == ("" if number[7] == "7" else "USER_BUSY")
    ch.hangup("NORMAL_CLEARING")


def test_early_media_without_ignore_returns_at_once(client: EslClient) -> None:
    job = "job-early"
    c = client
    uuid = "e1e1e1e1-0000-4000-8000-000000000001"
    reply = c.cmd(f"bgapi originate {{origination_uuid={uuid}}}"
                  "sofia/gateway/carrier/15550007001 &park()\nJob-UUID: job-early")
    assert reply.h("Reply-Text") == "+OK Job-UUID: job-early"
    assert job_result(c, job) == f"+OK {uuid}\n"
    # At once: the job's result comes with the early media, before the answer 3 plan seconds later (the
    # events' order, not the client's clock, which a loaded machine makes late).
    c.wait_event(lambda m: m.name == "CHANNEL_ANSWER" and m.e("Unique-ID") == uuid)
    names = [m.name for m in c.events if m.e("Unique-ID") == uuid or m.e("Job-UUID") == job]
    assert names.index("CHANNEL_PROGRESS_MEDIA") < names.index("BACKGROUND_JOB") < names.index("CHANNEL_ANSWER")


def test_quoted_values_and_custom_variables(client: EslClient) -> None:
    uuid, job = bg_originate(client, "15550000102",
                             extra="origination_caller_id_name='Acme Sales',originate_timeout=45,"
                                   "app_disable_expand_variables=true,cb_callid=abc123")
    assert job_result(client, job) == f"+OK {uuid}\n"
    create = client.named("CHANNEL_CREATE", uuid)[0]
    assert create.e("Caller-Caller-ID-Name") == "Acme Sales"
    assert create.e("variable_cb_callid") == "abc123"
    assert create.e("variable_originate_timeout") == "45"
    assert b"Caller-Caller-ID-Name: Acme%20Sales\n" in create.raw


@pytest.mark.parametrize(("dial", "error"), [
    ("sofia/gateway/nosuchgw/15550000101", "-ERR INVALID_GATEWAY\n"),
    ("sofia/nosuchprofile/15550000101@127.0.0.1:5090", "-ERR INVALID_PROFILE\n"),
    ("nosuchendpoint/foo", "-ERR CHAN_NOT_IMPLEMENTED\n"),
    ("error/user_busy", "-ERR USER_BUSY\n"),
])
def test_dial_string_errors(client: EslClient, standin: StandIn, dial: str, error: str) -> None:
    assert client.api(f"originate {dial} &park()") == error
    assert standin.channels_live() == []


def test_other_dial_string_forms(client: EslClient) -> None:
    for dial in ("sofia/gateway/15550000103@127.0.0.1:5090", "loopback/15550000104", "user/15550000105"):
        body = client.api(f"originate {{origination_caller_id_number=1}}{dial} &park()")
        assert body.startswith("+OK "), (dial, body)
    assert client.api("originate [cb_leg=1]sofia/gateway/carrier/15550003106 &park()") == "-ERR USER_BUSY\n"
    # `|` fails over to the next leg.
    body = client.api("originate sofia/gateway/carrier/15550003107|sofia/gateway/carrier/15550000107 &park()")
    assert body.startswith("+OK ")


# About the stand-in's own concurrency, not the switch's limits (test_limits.py): 200 sessions at once.
@pytest.mark.standin_limits(sps=1000)
def test_many_concurrent_originates(client: EslClient, standin: StandIn) -> None:
    # CPU seconds of this process (the stand-in and its client), not the wall clock, which other processes
    # on a loaded machine stretch (2.8 s once); make bench measures the rate itself.
    started = time.process_time()
    jobs = [bg_originate(client, f"15550000{i:03d}") for i in range(200)]
    for uuid, job in jobs:
        assert job_result(client, job) == f"+OK {uuid}\n"
    assert len(standin.channels_live()) == 200
    assert time.process_time() - started < 2.0  # 100+ originates a second of CPU without trying hard
    assert client.api("hupall NORMAL_CLEARING") == "+OK hangup all channels with cause NORMAL_CLEARING\n"
    assert standin.wait_for(lambda: not standin.channels_live(), 30)
