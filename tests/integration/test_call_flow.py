"""What a call does and what each person hears, through the daemon and the switch over TCP."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import gevent
import pytest

from daemon.store import Call
from tests.integration.conftest import SCALE, Harness, needs_standin, wait_for


def segments(switch: Any, leg_uuid: str) -> list[dict[str, Any]]:
    return [dict(s) for s in switch.heard(leg_uuid)]


# Durations are checked to a plan second: 200 ms of a loaded machine's timer lateness at 0.2 (10 ms at the
# default 0.01, which a loaded machine exceeds: B's 2 s ring was once measured as 4.85).
@pytest.mark.time_scale(0.2)
@needs_standin()
def test_a_hears_the_prompts_in_order_then_the_dialtone_only_while_b_rings_then_b(harness: Harness) -> None:
    call = harness.place(harness.endpoint(), "15550000401", "15550001401")
    harness.wait_status(call, "bridged", timeout=60)
    harness.switch.far_end_hangup(str(Call.get_by_id(call.id).b_uuid))  # B would talk 60 plan seconds
    call = harness.wait_final(call, timeout=60)
    assert call.status == "completed", harness.timeline(call)
    heard = segments(harness.switch, call.a_uuid)
    kinds = [(s["kind"], s["source"]) for s in heard]
    files = [k for k in kinds if k[0] == "file"]
    assert files[:2] == [("file", harness.prompt), ("file", harness.message)], kinds
    ringback = [s for s in heard if s["kind"] == "ringback"]
    assert len(ringback) == 1 and ringback[0]["source"] == harness.dialtone, kinds
    bridge = [s for s in heard if s["kind"] == "bridge"]
    assert len(bridge) == 1 and bridge[0]["source"] == call.b_uuid, kinds
    message = next(s for s in heard if s["kind"] == "file" and s["source"] == harness.message)
    # No gap, no overlap: the ringback starts when the prompts end and stops when B is heard.
    assert ringback[0]["start"] >= message["end"] - 0.05
    assert ringback[0]["end"] == pytest.approx(bridge[0]["start"], abs=0.25)
    # B rings 2 s; at a time scale of 0.2 a plan second is 200 ms of real scheduling jitter.
    assert ringback[0]["end"] - ringback[0]["start"] == pytest.approx(2.0, abs=1.0)
    b = harness.switch.channel(call.b_uuid)
    assert b.variables.get("cb_callid") == call.callid
    assert b.variables.get("origination_caller_id_number") == "15551230000"


@needs_standin()
def test_without_a_dialtone_a_hears_the_endpoints_ring_tone_and_never_b_early_media(harness: Harness) -> None:
    endpoint = harness.endpoint(ring_tone="%(1000,3000,425)")
    call = harness.wait_final(harness.place(endpoint, "15550000402", "15550007402", dialtone=False), timeout=30)
    assert call.status == "completed", harness.timeline(call)
    heard = segments(harness.switch, call.a_uuid)
    kinds = [s["kind"] for s in heard]
    assert "early_media" not in kinds
    ringback = [s for s in heard if s["kind"] == "ringback"]
    assert ringback and ringback[0]["source"] == "%(1000,3000,425)", heard


@needs_standin()
@pytest.mark.time_scale(1.0)  # A's 3 s of prompts: time to see it answered (a commit later) and hang up during them
def test_a_hangs_up_during_the_prompts(harness: Harness) -> None:
    call = harness.place(harness.endpoint(), "15550000403", "15550001403")
    harness.wait_status(call, "a_answered")
    fresh = Call.get_by_id(call.id)
    harness.switch.far_end_hangup(fresh.a_uuid)
    done = harness.wait_final(call)
    assert (done.status, done.failed_leg, done.reason) == ("failed", "a", "A hung up during the prompts"), harness.timeline(done)
    assert done.a_cause == "NORMAL_CLEARING"
    assert harness.switch.channel(done.b_uuid) is None  # B was never dialed


@needs_standin()
def test_a_hangs_up_while_b_rings_and_b_is_cancelled(harness: Harness) -> None:
    call = harness.place(harness.endpoint(), "15550000404", "15550004404")  # B never answers
    harness.wait_status(call, "dialing_b")
    fresh = Call.get_by_id(call.id)
    assert wait_for(lambda: harness.switch.channel(fresh.b_uuid) is not None, 30)
    harness.switch.far_end_hangup(fresh.a_uuid)
    done = harness.wait_final(call)
    assert (done.status, done.failed_leg) == ("failed", "a"), harness.timeline(done)
    assert done.reason == "A hung up while B was ringing"
    assert done.b_cause == "ORIGINATOR_CANCEL"
    assert harness.switch.channel(done.b_uuid).hangup_cause == "ORIGINATOR_CANCEL"


def test_b_hangs_up_first_and_a_is_hung_up(harness: Harness) -> None:
    call = harness.wait_final(harness.place(harness.endpoint(), "15550000405", "15550006405"), timeout=30)
    assert call.status == "completed"
    assert call.b_cause == "NORMAL_CLEARING" and call.a_cause == "NORMAL_CLEARING"
    assert call.talk_seconds is not None and call.talk_seconds > 0
    assert call.ring_seconds is not None


def test_recording_of_the_bridged_call(harness: Harness) -> None:
    endpoint = harness.endpoint(record=True)
    call = harness.wait_final(harness.place(endpoint, "15550000406", "15550006406"), timeout=30)
    assert call.status == "completed"
    assert call.recording_path.startswith(str(harness.settings.recordings_dir))
    assert os.path.exists(call.recording_path)
    assert call.recording_bytes and call.recording_bytes > 44
    assert "recording_started" in harness.timeline(call)


def test_maximum_duration_is_enforced_inside_freeswitch(harness: Harness) -> None:
    endpoint = harness.endpoint(max_duration=10)  # both ends would stay up for 300 s
    call = harness.wait_final(harness.place(endpoint, "15550000407", "15550000407", prompts=False), timeout=30)
    assert call.status == "completed"
    assert call.a_cause == "ALLOTTED_TIMEOUT"
    assert call.talk_seconds is not None and call.talk_seconds < 300 * SCALE


@pytest.mark.time_scale(0.1)  # B must be ringing well before the 10 plan seconds are up
def test_maximum_duration_reached_while_b_rings_says_so_not_that_a_hung_up(harness: Harness) -> None:
    endpoint = harness.endpoint(max_duration=10)  # B rings for originate_timeout (30 s)
    call = harness.wait_final(harness.place(endpoint, "15550000408", "15550004408", prompts=False), timeout=30)
    assert "dialing_b" in harness.statuses[call.callid], harness.timeline(call)
    assert (call.status, call.failed_leg, call.a_cause, call.b_cause) == \
        ("failed", "a", "ALLOTTED_TIMEOUT", "ORIGINATOR_CANCEL"), harness.timeline(call)
    assert call.reason == "the call reached the endpoint's maximum duration (10 s) while B was ringing"


@pytest.mark.stores("sqlite", "postgresql")
@needs_standin()
def test_connection_dropped_with_the_originate_in_flight_is_reconciled_not_redialed(harness: Harness) -> None:
    harness.switch.slow_replies(0.5)
    call = harness.place(harness.endpoint(), "15550001414", "15550006414")
    harness.wait_status(call, "dialing_a")
    fresh = Call.get_by_id(call.id)
    assert wait_for(lambda: any(c.text.startswith("bgapi originate") for c in harness.switch.commands), 30)
    harness.switch.drop_connections()
    harness.switch.slow_replies(0)
    done = harness.wait_final(call, timeout=30)
    timeline = harness.timeline(done)
    assert "connection_lost" in timeline and "reconciled" in timeline, timeline
    # The outcome is what the switch really did with the one originate it got, never a second dial.
    if harness.switch.channel(fresh.a_uuid) is None:
        assert (done.status, done.failed_leg, done.reason) == ("failed", "", "interrupted")
    else:
        assert done.status == "completed", timeline
    originates = [c for c in harness.switch.commands if c.text.startswith("bgapi originate") and fresh.a_uuid in c.text]
    assert len(originates) == 1


@needs_standin()
def test_connection_dropped_while_bridged_keeps_the_call(harness: Harness) -> None:
    call = harness.place(harness.endpoint(), "15550000409", "15550001409")  # B talks 60 s
    harness.wait_status(call, "bridged")
    harness.switch.drop_connections()
    assert wait_for(lambda: harness.service.metrics.esl_reconnects.labels(
        harness.service.engine.links[0].name)._value.get() >= 1, 5)
    done = harness.wait_final(call, timeout=30)
    assert done.status == "completed", harness.timeline(done)
    assert done.b_cause == "NORMAL_CLEARING"


@needs_standin()
def test_switch_restart_mid_call_fails_the_call_with_that_reason(harness: Harness) -> None:
    call = harness.place(harness.endpoint(), "15550000410", "15550001410")
    harness.wait_status(call, "bridged")
    harness.switch.restart()
    done = harness.wait_final(call, timeout=30)
    assert (done.status, done.reason) == ("failed", "FreeSWITCH restarted during the call")


# A's far end stays up 300 plan seconds: at the default 0.01 that is 3 s, about what the queue of the calls'
# commands through one connection can take on a loaded machine (then A hangs up before B is dialed). At 0.05
# it is 15 s; each call still lasts only B's 2 plan seconds (0.1 s), 200 of them ten at a time.
@pytest.mark.time_scale(0.05)
def test_per_endpoint_limit_is_never_exceeded(harness: Harness) -> None:
    endpoint = harness.endpoint(max_in_flight=10)
    peak = 0

    def watch(*_: Any) -> None:
        nonlocal peak
        peak = max(peak, harness.service.engine.in_flight_by_endpoint[endpoint.id])

    harness.service.records.listeners.append(watch)
    calls = [harness.place(endpoint, "15550000411", "15550006412", prompts=False) for _ in range(200)]
    for call in calls:
        harness.wait_final(call, timeout=60)
    assert peak == 10
    outcomes = Counter((c.status, c.reason) for c in Call.select())
    assert outcomes == {("completed", ""): 200}


@pytest.mark.stores("sqlite", "postgresql")
@pytest.mark.time_scale(0.1)  # as above, with 50 calls at once: A stays up 30 s
def test_nothing_is_dialed_twice_under_load(harness: Harness) -> None:
    endpoint = harness.endpoint(max_in_flight=50)
    calls = [harness.place(endpoint, "15550000413", "15550006413", prompts=False) for _ in range(60)]
    gevent.joinall([gevent.spawn(harness.wait_final, c, 60) for c in calls], raise_error=True)
    if hasattr(harness.switch, "commands"):
        # An originate the switch refused over its session limits created nothing; it is sent again.
        originates = [c.text for c in harness.switch.commands if c.text.startswith("bgapi originate")]
        a_uuids = [Call.get_by_id(c.id).a_uuid for c in calls]
        assert all(sum(u in text for text in originates) == 1 + harness.switch.refusals(u) for u in a_uuids)
    assert {Call.get_by_id(c.id).status for c in calls} == {"completed"}, \
        [harness.timeline(c) for c in calls if Call.get_by_id(c.id).status != "completed"]
    # PostgreSQL: every connection the 60 sequences, the dispatcher and the API borrowed went back.
    assert wait_for(lambda: not getattr(harness.service.database, "_in_use", {}), 10)


def test_metrics_after_calls_parse_with_the_prometheus_parser(harness: Harness) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    endpoint = harness.endpoint()
    done = harness.wait_final(harness.place(endpoint, "15550003420", "15550006420"))
    assert done.status == "failed"
    with urllib.request.urlopen(f"http://127.0.0.1:{harness.service.http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("callbridge_calls_finished_total", (("cause", "USER_BUSY"), ("status", "failed")))] == 1
    switch = harness.service.engine.links[0].name
    assert samples[("callbridge_esl_connected", (("switch", switch),))] == 1
    assert samples[("callbridge_scheduler_lateness_seconds_count", ())] == 1
    assert samples[("callbridge_calls_in_flight", (("phase", "dialing_a"),))] == 0


@pytest.mark.time_scale(0.1)  # B stays up 30 s: time enough for a command-line start under load
def test_the_operator_hangs_up_a_call_from_the_command_line(harness: Harness) -> None:
    """``python -m daemon calls hangup CALLID``, run beside the daemon as an operator would: A is killed
    by the UUID the daemon stored, FreeSWITCH hangs B up, and the daemon records the end it hears."""
    import json
    import sys

    import gevent.subprocess

    call = harness.place(harness.endpoint(), "15550000431", "15550000432", prompts=False)  # B would talk 300 s
    harness.wait_status(call, "bridged")
    s = harness.settings
    env = {**os.environ, "CALLBRIDGE_DATABASE_URL": s.database_url, "CALLBRIDGE_STATE_DIR": str(s.state_dir),
           "CALLBRIDGE_ESL_HOST": s.esl_host, "CALLBRIDGE_ESL_PORT": str(s.esl_port),
           "CALLBRIDGE_ESL_PASSWORD": s.esl_password}
    env.pop("CALLBRIDGE_CONFIG", None)
    done = gevent.subprocess.run([sys.executable, "-m", "daemon", "calls", "hangup", call.callid, "--json"],
                                 env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"callid": call.callid, "freeswitch": "+OK"}
    ended = harness.wait_final(call, timeout=30)
    assert (ended.status, ended.a_cause) == ("completed", "NORMAL_CLEARING"), harness.timeline(ended)
    again = gevent.subprocess.run([sys.executable, "-m", "daemon", "calls", "hangup", call.callid],
                                  env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "not in progress (status completed)" in again.stderr


@pytest.mark.stores("postgresql")
@pytest.mark.time_scale(0.1)  # as above: A stays up 30 s, a call lasts about a second
def test_the_databases_sessions_cut_under_load_lose_no_step_and_dial_nothing_twice(
        harness: Harness, postgres_server: Any) -> None:
    """PostgreSQL restarted, or a failover cutting every session, twice while 40 calls run: the writes in
    flight are undone and written again on new connections (a group of steps whole, a refused mark before its
    originate is sent). Every call completes, its timeline holds each status once, nothing is dialed twice."""
    endpoint = harness.endpoint(max_in_flight=50)
    calls = [harness.place(endpoint, "15550000413", "15550006413", prompts=False) for _ in range(40)]
    database_name = harness.settings.database_url.rsplit("/", 1)[-1].split("?")[0]

    def reached(count: int) -> bool:
        return sum("bridged" in harness.statuses.get(c.callid, []) for c in calls) >= count

    for count in (8, 24):
        assert wait_for(lambda count=count: reached(count), 60), f"fewer than {count} calls bridged"
        # (each gone when this returns, its socket closed: as after a restart, a pooled connection is seen dead)
        postgres_server.admin("SELECT pg_terminate_backend(pid, 30000) FROM pg_stat_activity "
                              f"WHERE datname = '{database_name}' AND pid <> pg_backend_pid()")
    gevent.joinall([gevent.spawn(harness.wait_final, c, 90) for c in calls], raise_error=True)
    harness.service.writer.flush()  # the last steps, before the timelines are read
    finals = {c.callid: Call.get_by_id(c.id).status for c in calls}
    assert set(finals.values()) == {"completed"}, [harness.timeline(c) for c in calls if finals[c.callid] != "completed"]
    for call in calls:
        timeline = Counter(harness.timeline(call))
        assert all(timeline[status] == 1 for status in ("a_answered", "dialing_b", "bridged", "completed")), timeline
    if hasattr(harness.switch, "commands"):
        originates = [c.text for c in harness.switch.commands if c.text.startswith("bgapi originate")]
        a_uuids = [Call.get_by_id(c.id).a_uuid for c in calls]
        assert all(sum(u in text for text in originates) == 1 + harness.switch.refusals(u) for u in a_uuids)
