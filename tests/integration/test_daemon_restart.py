"""The daemon killed with SIGKILL mid-call and started again: no call dialed twice, none left open."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pytest

from daemon.calls.appqueue import AppStep
from daemon.calls.records import add_event
from daemon.calls.sequence import FAILURE_NOTICE, UNFOLLOWED_INTERRUPTED, CallSequence, wait_uuid
from daemon.store import Call, CallEvent, CallStatus, Endpoint, utcnow
from tests.integration.conftest import Harness, needs_standin, wait_for
from tests.integration.test_switch_limits import set_sps
from tests.robustness.helpers import audit_calls

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """``python -m daemon run`` in a subprocess, on the given state folder and switch."""

    def __init__(self, state: Path, esl_port: int, database_url: str = "") -> None:
        self.env = dict(os.environ, CALLBRIDGE_STATE_DIR=str(state), CALLBRIDGE_ESL_PORT=str(esl_port),
                        CALLBRIDGE_HTTP_PORT="0", CALLBRIDGE_LOG_LEVEL="WARNING")
        self.env.pop("CALLBRIDGE_DATABASE_URL", None)
        if database_url:  # else SQLite in the state folder
            self.env["CALLBRIDGE_DATABASE_URL"] = database_url
        self.env["CALLBRIDGE_HTTP_PORT"] = str(_free_port())
        self.base = f"http://127.0.0.1:{self.env['CALLBRIDGE_HTTP_PORT']}"
        self.log = state.with_name(f"{state.name}.log")  # what its runs wrote to stderr, one after another
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "daemon", *args, "--json"], cwd=ROOT, env=self.env,
                             capture_output=True, check=True)
        return json.loads(out.stdout)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=self.env,
                                         stdout=subprocess.DEVNULL, stderr=log)
        assert wait_for(lambda: self.get("/readyz")[0] == 200, 60), "daemon did not become ready"

    def add_endpoint(self, name: str, *options: str) -> str:
        """``endpoint add`` with the test number plan's caller ID and dial string; the endpoint's token."""
        token: str = self.cli("endpoint", "add", "--name", name, "--caller-id", "15551230000", "--dial-string",
                              "sofia/gateway/carrier/{number}", *options)["token"]
        return token

    def refusal(self, timeout: float = 90) -> str:
        """``daemon run`` that is to refuse to start: it exits 2 with no traceback; the line it ends with (a
        start that is not refused runs on, and ends here in TimeoutExpired)."""
        refused = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=self.env,
                                 capture_output=True, text=True, timeout=timeout, check=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        return refused.stderr.strip().splitlines()[-1]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def request(self, method: str, path: str, data: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """One request over a gevent socket: the stand-in shares this process's hub and keeps running while
        the answer is awaited (a blocking client would stall the switch on every request)."""
        body = urllib.parse.urlencode(data).encode() if data else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if body else {}
        conn = http.client.HTTPConnection("127.0.0.1", int(self.env["CALLBRIDGE_HTTP_PORT"]), timeout=30)
        conn._create_connection = gevent.socket.create_connection  # type: ignore[attr-defined]
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        except (OSError, http.client.HTTPException):
            return 0, {}
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return self.request("GET", path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_standin()
@pytest.mark.slow
@pytest.mark.stores("sqlite", "postgresql")
def test_sigkill_mid_call_then_restart_reconciles_every_call(tmp_path: Path, store_kind: str,
                                                             request: pytest.FixtureRequest) -> None:
    from freeswitch.standin import StandIn

    switch = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.05)
    switch.start()
    url = request.getfixturevalue("postgres_url") if store_kind == "postgresql" else ""
    daemon = Daemon(tmp_path / "state", switch.port, url)
    try:
        token = daemon.add_endpoint("k", "--max-in-flight", "50")
        daemon.start()
        callids = []
        # B talks 60 s (3 s here): the kill lands while calls are bridged or still being set up.
        for i in range(20):
            status, answer = daemon.request("POST", "/v1/calls", {"token": token, "phone_a": f"15550000{i:03d}",
                                                                  "phone_b": f"15550001{i:03d}"})
            assert status == 200, answer
            callids.append(answer["data"]["callid"])
        # Killed once calls are up in the switch (not after a fixed delay: on a busy machine none may be yet).
        assert wait_for(lambda: len(switch.channels_live()) >= 2, 30), "no call reached the switch"
        daemon.kill()
        daemon.start()

        def all_final() -> bool:
            for callid in callids:
                _, got = daemon.get(f"/v1/calls/{callid}?token={urllib.parse.quote(token)}")
                if got.get("data", {}).get("status") not in ("completed", "failed"):
                    return False
            return True

        assert wait_for(all_final, 60), "calls not all final after the restart"
        originates = [c.text for c in switch.commands if c.text.startswith("bgapi originate")]
        undialed = []
        for callid in callids:
            dialed = sum(callid in text for text in originates)
            assert dialed <= 1, f"{callid} dialed {dialed} times"
            if dialed == 0:
                undialed.append(daemon.get(f"/v1/calls/{callid}?token={urllib.parse.quote(token)}")[1]["data"])
        # Every call is dialed once, but for at most one: the originate the kill caught in the act of being
        # sent (its "dialing_a" mark committed, its bytes not out yet). Commands go one at a time, so no
        # other can be in that state; a claimed call still waiting for its turn is dialed after the restart.
        assert len(undialed) <= 1, [(c["callid"], c["reason"]) for c in undialed]
        for call in undialed:
            kinds = [step["kind"] for step in call["timeline"]]
            assert (call["status"], call["reason"], call["failed_leg"]) == ("failed", UNFOLLOWED_INTERRUPTED, ""), call
            assert "dialing_a" in kinds and "adopted" in kinds, kinds
        assert wait_for(lambda: not switch.channels_live(), 10), "channels left open"
    finally:
        daemon.stop()
        switch.stop()


@needs_standin()
@pytest.mark.slow
def test_a_second_daemon_on_one_sqlite_store_refuses_and_a_restart_after_sigkill_is_not_held_up(
        tmp_path: Path) -> None:
    """An operator's ``daemon run`` beside the service on its store (or two units on one state_dir): the
    second used to adopt every call the first was following, and both bridged, hung up, ended them. Now it
    exits 2 naming the first, with nothing of the first's touched; the lock dies with the first, even by
    SIGKILL, so the next start is not held up."""
    from freeswitch.standin import StandIn

    switch = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.1)
    switch.start()
    first = Daemon(tmp_path / "state", switch.port)
    try:
        token = first.add_endpoint("k")
        first.start()
        callids = []
        for i in range(3):  # A and B answer and stay up (300 s; 30 s here)
            status, answer = first.request("POST", "/v1/calls", {"token": token, "phone_a": f"15550000{i:03d}",
                                                                 "phone_b": f"15550000{i + 500:03d}"})
            assert status == 200, answer
            callids.append(answer["data"]["callid"])

        def timelines() -> dict[str, list[str]]:
            calls = (first.get(f"/v1/calls/{c}?token={urllib.parse.quote(token)}")[1]["data"] for c in callids)
            return {c["callid"]: [step["kind"] for step in c["timeline"]] for c in calls}

        assert wait_for(lambda: all("bridged" in kinds for kinds in timelines().values()), 30), timelines()
        before = timelines()
        # The operator commands run beside the daemon: they do not take its lock.
        assert {c["callid"] for c in first.cli("calls", "in-flight")} == set(callids)
        second = Daemon(tmp_path / "state", switch.port)
        assert first.proc is not None
        line = second.refusal()
        assert re.fullmatch(rf"callbridge: another daemon \(pid {first.proc.pid}, instance \S+, since \S+Z\) runs on "
                            rf"this store \({re.escape(str(tmp_path / 'state' / 'callbridge.db'))}\): stop it first, "
                            r"or give this one its own state_dir", line), line
        assert second.get("/healthz")[0] == 0  # it never served
        assert first.get("/readyz")[0] == 200 and timelines() == before
        assert len({command.conn_id for command in switch.commands}) == 1  # no second ESL connection
        first.kill()
        first.start()  # the kernel dropped the lock with the killed process
        assert wait_for(lambda: all("adopted" in kinds for kinds in timelines().values()), 30), timelines()
    finally:
        first.stop()
        switch.stop()


@needs_standin()
@pytest.mark.slow
def test_calls_killed_while_waiting_for_their_turn_to_be_sent_are_dialed_at_the_next_start(tmp_path: Path) -> None:
    """The switch answers slowly: the first originate is sent and waits for its reply, the other calls are
    claimed and wait for their turn on the connection when the daemon is killed. Those never reached
    FreeSWITCH: the next start dials them (once), where it used to fail them 'interrupted' undialed. The
    one that was sent is followed, never sent again."""
    from freeswitch.standin import StandIn

    switch = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.05)
    switch.start()
    daemon = Daemon(tmp_path / "state", switch.port)
    daemon.env["CALLBRIDGE_ESL_COMMAND_TIMEOUT"] = "60"  # the waiting ones keep waiting for their turn
    try:
        token = daemon.add_endpoint("w")
        daemon.start()
        switch.slow_replies(5.0)  # the first originate's reply (and so its job) comes 5 s after it is sent

        def originates() -> list[str]:
            return [c.text for c in switch.commands if c.text.startswith("bgapi originate")]

        callids = []
        for i in range(4):  # A answers and stays up; B answers, talks 2 s (0.1 s here) and hangs up
            status, answer = daemon.request("POST", "/v1/calls", {"token": token, "phone_a": f"15550000{i:03d}",
                                                                  "phone_b": f"15550006{i:03d}"})
            assert status == 200, answer
            callids.append(answer["data"]["callid"])

        def status_of(callid: str) -> str:
            return str(daemon.get(f"/v1/calls/{callid}?token={urllib.parse.quote(token)}")[1]
                       .get("data", {}).get("status"))

        assert wait_for(lambda: all(status_of(c) == "dialing_a" for c in callids), 20), "not all claimed"
        assert len(originates()) == 1, originates()
        daemon.kill()
        first = re.search(r"origination_uuid=([0-9a-f-]{36})", originates()[0])
        assert first is not None
        # The one sent reaches FreeSWITCH after all (its reply was only slow): A exists before the restart.
        assert wait_for(lambda: switch.channel(first.group(1)) is not None, 20)
        switch.slow_replies(0)
        daemon.start()
        assert wait_for(lambda: all(status_of(c) in ("completed", "failed") for c in callids), 60), \
            [status_of(c) for c in callids]
        sent = originates()
        for callid in callids:
            assert sum(callid in text for text in sent) == 1, f"{callid} dialed {sum(callid in t for t in sent)} times"
            _, got = daemon.get(f"/v1/calls/{callid}?token={urllib.parse.quote(token)}")
            assert got["data"]["status"] == "completed", (got["data"]["reason"], got["data"]["timeline"])
        assert wait_for(lambda: not switch.channels_live(), 10), "channels left open"
    finally:
        daemon.stop()
        switch.stop()


@needs_standin()
def test_at_start_a_claimed_call_never_sent_is_dialed_or_missed_past_the_grace(
        make_harness: Callable[..., Harness]) -> None:
    """Rows as a killed run leaves them: claimed (status dialing_a, leg UUIDs committed), the originate
    never marked as sent. Adopted at start, one is dialed (once) and completes; one due longer ago than
    ``schedule_grace`` is missed, never dialed, as a pending call would be."""
    harness = make_harness(schedule_grace=300)
    endpoint = harness.endpoint()
    now = utcnow()

    def claimed(phone_a: str, phone_b: str, due_ago: float) -> Call:
        # Claimed when due; the run that claimed it died then (no dispatcher ran since: the store is new).
        call = Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a=phone_a, phone_b=phone_b,
                           due_at=now - dt.timedelta(seconds=due_ago), status=CallStatus.DIALING_A.value,
                           a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()),
                           started_at=now - dt.timedelta(seconds=due_ago))
        harness.finals.setdefault(call.callid, gevent.event.AsyncResult())
        return call

    recent = claimed("15550000701", "15550006701", due_ago=10)
    stale = claimed("15550000702", "15550006702", due_ago=3600)
    assert harness.service.engine.adopt_in_flight() == 2
    done, missed = harness.wait_final(recent), harness.wait_final(stale)
    assert done.status == "completed", harness.timeline(done)
    assert (missed.status, missed.a_answered_at) == ("missed", None)
    assert missed.reason.endswith("before the daemon could start it (grace 300 s)"), missed.reason
    originates = [c.text for c in harness.switch.commands if c.text.startswith("bgapi originate")]
    assert [recent.a_uuid in text for text in originates] == [True], originates
    assert "adopted" in harness.timeline(done) and "dialing_a" in harness.timeline(done)


def left_refused(harness: Harness, endpoint: Endpoint, phone_a: str, phone_b: str, *, sent_again: bool,
                 prompts: bool = True) -> Call:
    """A call's row as a run killed under a busy switch leaves it: A's originate marked, then refused over
    the switch's limits (``throttled``: nothing created); ``sent_again``: the retry was marked too."""
    now = utcnow()
    call = Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a=phone_a, phone_b=phone_b,
                       due_at=now - dt.timedelta(seconds=5), status=CallStatus.DIALING_A.value,
                       a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()), started_at=now,
                       msg_file=harness.message if prompts else "")
    add_event(call, "dialing_a", phone=phone_a, a_uuid=call.a_uuid)
    add_event(call, "throttled", leg="a", cause="DESTINATION_OUT_OF_ORDER", attempt=1, retry_in=0.2)
    if sent_again:
        add_event(call, "dialing_a", phone=phone_a, a_uuid=call.a_uuid, attempt=2)
    harness.finals.setdefault(call.callid, gevent.event.AsyncResult())
    return call


@needs_standin()
def test_at_start_a_call_the_switch_refused_and_not_sent_again_is_dialed_one_sent_again_is_not(
        make_harness: Callable[..., Harness]) -> None:
    """Rows as a run killed under a busy switch leaves them: A's originate marked, then refused over the
    switch's limits (``throttled``: nothing created). One was not sent again before the kill: dialed at the
    next start (once) and completes, not failed 'interrupted' unheard. The other's second originate was
    marked, so it may have reached the switch: reconciled (its A is not there), never sent again."""
    harness = make_harness()
    endpoint = harness.endpoint()
    waiting = left_refused(harness, endpoint, "15550000703", "15550006703", sent_again=False)
    in_the_air = left_refused(harness, endpoint, "15550000704", "15550006704", sent_again=True)
    assert harness.service.engine.adopt_in_flight() == 2
    done, lost = harness.wait_final(waiting), harness.wait_final(in_the_air)
    assert done.status == "completed", harness.timeline(done)
    notes = [e.detail for e in CallEvent.select().where((CallEvent.call == done.id) & (CallEvent.kind == "adopted"))]
    assert "refused by the switch (over its limit) and not sent again: dialing A now" in notes[0], notes
    assert (lost.status, lost.reason) == ("failed", UNFOLLOWED_INTERRUPTED), harness.timeline(lost)
    originates = [c.text for c in harness.switch.commands if c.text.startswith("bgapi originate")]
    assert [waiting.a_uuid in text for text in originates] == [True], originates


@needs_standin()
@pytest.mark.time_scale(0.1)  # A stays up 30 s: room for every B at 3 sessions a second
def test_at_start_calls_left_unsent_wait_for_room_on_the_switch_not_sent_all_at_once(
        make_harness: Callable[..., Harness]) -> None:
    """A run killed under a busy switch may leave many calls whose A was refused and not sent again. The
    next start dials each of them once, and paced to the switch's budget like any leg: sent all at once,
    they would take the switch's whole second from everyone else on it, and most would be refused again."""
    harness = make_harness(switch_status_interval=0.2)
    set_sps(harness, 5)  # 3 legs a second for the daemon (4, less its margin)
    capacity = harness.service.engine.links[0].capacity
    assert wait_for(lambda: capacity.sps == 5, 10), "the daemon never read the switch's new limit"
    endpoint = harness.endpoint()
    calls = [left_refused(harness, endpoint, f"155500007{n:02d}", f"155500067{n:02d}", sent_again=False,
                          prompts=False) for n in range(6)]
    assert harness.service.engine.adopt_in_flight() == 6
    done = [harness.wait_final(call, 60) for call in calls]
    assert [call.status for call in done] == ["completed"] * 6, [harness.timeline(call) for call in done]
    paced = [call for call in done if '"leg": "a"' in " ".join(
        e.detail for e in CallEvent.select().where((CallEvent.call == call.id) & (CallEvent.kind == "paced")))]
    assert len(paced) >= 3, [harness.timeline(call) for call in done]  # 3 went at once, the rest waited
    for call in done:  # each A created once, its originates only those the switch refused and one more
        a_uuid = str(call.a_uuid)
        originates = sum(1 for c in harness.switch.commands if c.text.startswith("bgapi originate") and a_uuid in c.text)
        assert originates == 1 + harness.switch.refusals(a_uuid)


@needs_standin()
def test_sigterm_leaves_bridged_calls_to_freeswitch_and_the_next_start_follows_them(tmp_path: Path) -> None:
    from freeswitch.standin import StandIn

    # B talks 60 plan seconds, 12 s here: long enough that a stop on a loaded machine ends well inside it.
    switch = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.2)
    switch.start()
    daemon = Daemon(tmp_path / "state", switch.port)
    try:
        token = daemon.add_endpoint("t")
        daemon.start()
        status, answer = daemon.request("POST", "/v1/calls", {"token": token, "phone_a": "15550000601",
                                                              "phone_b": "15550001601"})
        assert status == 200
        callid = answer["data"]["callid"]
        query = f"/v1/calls/{callid}?token={urllib.parse.quote(token)}"
        assert wait_for(lambda: daemon.get(query)[1]["data"]["status"] == "bridged", 20)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: daemon.proc is not None and daemon.proc.poll() is not None, 15)
        assert daemon.proc.returncode == 0
        assert len(switch.channels_live()) == 2, "the bridged call must go on inside FreeSWITCH"
        daemon.start()
        assert wait_for(lambda: daemon.get(query)[1]["data"]["status"] == "completed", 30)
        kinds = [step["kind"] for step in daemon.get(query)[1]["data"]["timeline"]]
        assert "daemon_stopped" in kinds and "adopted" in kinds
        assert sum(c.text.startswith("bgapi originate") for c in switch.commands) == 1
    finally:
        daemon.stop()
        switch.stop()


def dies_before_a_step(monkeypatch: pytest.MonkeyPatch, dies: Callable[[CallSequence, AppStep], bool]) -> None:
    """From now on a run of the daemon dies right before sending a step of A's that ``dies`` names (the steps
    before it in the same write are sent): the process is gone, nothing more of that run is sent or written."""
    send_apps = CallSequence._send_apps

    def send(sequence: CallSequence, steps: list[AppStep]) -> None:
        for index, step in enumerate(steps):
            if dies(sequence, step):
                if index:
                    send_apps(sequence, steps[:index])
                raise gevent.GreenletExit
        send_apps(sequence, steps)

    monkeypatch.setattr(CallSequence, "_send_apps", send)


def next_start_after_death(harness: Harness, call: Call) -> None:
    """Once the run following ``call`` died with A answered: a next start adopts it."""
    assert wait_for(lambda: harness.service.engine.in_flight() == 0
                    and Call.get_by_id(call.id).status == "a_answered", 10), harness.timeline(call)
    harness.service.records.flush()
    assert harness.service.engine.adopt_in_flight() == 1


def _steps_before(a_uuid: str, step: AppStep, died_before: str) -> bool:
    """Whether ``step`` is the one ``died_before`` names, among the steps queued on A after its answer."""
    if died_before == "bridge":
        return step.app == "bridge"
    return step.event_uuid == wait_uuid(a_uuid, 0 if died_before == "wait" else 1)


@needs_standin()
@pytest.mark.parametrize("died_before", ["wait", "bridge", "wait after the bridge"])
def test_a_run_that_died_while_queueing_a_steps_leaves_them_for_the_next_start_to_finish(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch, died_before: str) -> None:
    """The daemon dies while A's steps are sent one by one after A answered: the first ones (A's variables,
    its prompts...) reached FreeSWITCH, the rest never did. The next start adopts the call: it must finish
    what A was to hear and do, so that B (busy here) is dialed once and the call ends failed on B. It used
    to find A's ``cb_stage`` set, take every step as queued and leave A parked in silence, or hung up only
    by its maximum duration, with the call in flight."""
    harness = make_harness()
    endpoint = harness.endpoint()
    dies_before_a_step(monkeypatch, lambda sequence, step: not sequence.adopted
                       and _steps_before(sequence.a.uuid, step, died_before))
    call = harness.place(endpoint, "15550000811", "15550003811")
    next_start_after_death(harness, call)
    final = harness.wait_final(call)
    assert (final.status, final.failed_leg, final.b_cause) == ("failed", "b", "USER_BUSY"), \
        (final.reason, harness.timeline(call))
    assert harness.switch.creations(str(final.b_uuid)) == 1
    # The robustness tests' audit agrees: a bridge queued, dropped unstarted and queued again is one dial.
    assert audit_calls(harness.switch, [final]).problems == []
    a_leg = harness.switch.channel(str(final.a_uuid))
    # A was hung up after its busy notice, not left in silence until the person gave up.
    assert a_leg is not None and a_leg.var("sip_hangup_disposition") != "recv_bye", harness.timeline(call)
    assert wait_for(lambda: not harness.switch.channels_live(), 10), "A left up"


@needs_standin()
def test_a_start_that_died_while_requeueing_the_bridge_leaves_it_for_the_next_to_finish(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deaths: the first run dies before queueing the bridge; the next start, at A's wait, drops A's
    queue and queues the bridge and the wait after it anew, and dies between the two (the bridge starts as
    it arrives: B, busy, fails at once). The third start finds A parked after the bridge with nothing
    queued: it must still give A the busy notice and hang it up, B dialed once in all."""
    harness = make_harness()
    endpoint = harness.endpoint()
    deaths = ["bridge", "wait after the bridge"]  # the step each run in turn dies before

    def dies(sequence: CallSequence, step: AppStep) -> bool:
        if deaths and _steps_before(sequence.a.uuid, step, deaths[0]):
            deaths.pop(0)
            return True
        return False

    dies_before_a_step(monkeypatch, dies)
    call = harness.place(endpoint, "15550000812", "15550003812")
    next_start_after_death(harness, call)
    assert wait_for(lambda: not deaths, 10), harness.timeline(call)
    next_start_after_death(harness, call)
    final = harness.wait_final(call)
    assert (final.status, final.failed_leg, final.b_cause) == ("failed", "b", "USER_BUSY"), \
        (final.reason, harness.timeline(call))
    assert harness.switch.creations(str(final.b_uuid)) == 1
    a_leg = harness.switch.channel(str(final.a_uuid))
    assert a_leg is not None and a_leg.var("sip_hangup_disposition") != "recv_bye", harness.timeline(call)


@needs_standin()
@pytest.mark.time_scale(0.1)  # A and B talk 6 s here: the death, the switch's restart and the next start fit
def test_a_switch_restarted_while_the_daemon_was_down_is_told_at_the_next_start(
        make_harness: Callable[..., Harness]) -> None:
    """The daemon dies with a call bridged; FreeSWITCH restarts (every channel gone, a new Core-UUID) before
    it is back. The next start cannot tell from the switch alone (its first connection has nothing to compare
    with): the call used to end 'completed', as if A and B had said goodbye, when the switch cut them off."""
    harness = make_harness()
    call = harness.place(harness.endpoint(), "15550000813", "15550001813", prompts=False)
    harness.wait_status(call, "bridged")
    engine = harness.service.engine
    sequence = engine.active[call.id]
    assert sequence.greenlet is not None
    sequence.greenlet.kill()  # the process dies: nothing more of this run is sent or written
    harness.service.records.flush()
    link = engine.links[0]
    before = link.core_uuid
    harness.switch.restart()
    assert wait_for(lambda: link.ready and link.core_uuid != before, 20), "no reconnect after the restart"
    assert engine.adopt_in_flight() == 1
    final = harness.wait_final(call)
    assert (final.status, final.reason, final.failed_leg) == \
        ("failed", "FreeSWITCH restarted during the call", ""), harness.timeline(call)


@needs_standin()
@pytest.mark.time_scale(1.0)  # B answers in 1 s and talks 30 s: the outage and the next start fit well inside
def test_legs_of_calls_ended_while_their_switch_was_unreachable_are_hung_up_after_a_restart(
        make_harness: Callable[..., Harness]) -> None:
    """The switch is unreachable past ``switch_lost_after``: its calls end failed, their legs to be hung up
    when it is back. The daemon restarts before it is: the next start used to forget them, and A and B
    (or A alone on the dialtone, up to the endpoint's maximum duration) stayed up in FreeSWITCH."""
    harness = make_harness(switch_lost_after=1.0, esl_reconnect_max_delay=0.5)
    call = harness.place(harness.endpoint(), "15550000814", "15550002814", prompts=False)
    harness.wait_status(call, "bridged")
    harness.switch.refuse_connections(True)
    harness.switch.drop_connections()
    lost = harness.wait_final(call)
    assert lost.reason.startswith("the switch ") and "unreachable" in lost.reason, lost.reason
    harness.stop()
    assert len(harness.switch.channels_live()) == 2
    next_start = Harness(harness.settings, harness.switch)
    next_start.service.start()
    try:
        harness.switch.refuse_connections(False)
        assert wait_for(lambda: not harness.switch.channels_live(), 10), "legs left up"
    finally:
        next_start.stop()


@needs_standin()
def test_a_run_that_died_before_queueing_the_maximum_duration_leaves_it_for_the_next_start(
        make_harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon dies right after A's variables were queued, before its ``sched_hangup``: the next start
    queues the rest of A's steps, the maximum duration among them, so the endpoint's limit still ends the
    call (A and B would talk 300 s here)."""
    harness = make_harness()
    endpoint = harness.endpoint(max_duration=60)
    dies_before_a_step(monkeypatch, lambda sequence, step: not sequence.adopted and step.app == "sched_hangup")
    call = harness.place(endpoint, "15550000815", "15550000816")
    next_start_after_death(harness, call)
    final = harness.wait_final(call)
    assert (final.status, final.a_cause) == ("completed", "ALLOTTED_TIMEOUT"), (final.reason, harness.timeline(call))


@needs_standin()  # lowers the switch's limit; the run dies (its greenlet) with A on the wait after a refusal
@pytest.mark.time_scale(0.5)  # the prompts last 1.5 s: time for the switch to tick to the lowered limit
def test_a_start_finds_a_on_the_wait_after_a_refused_bridge_and_dials_b_again_once(
        make_harness: Callable[..., Harness]) -> None:
    """The switch refused B's session (DESTINATION_OUT_OF_ORDER, nothing created) and A plays the wait queued
    after that bridge when the daemon dies. The next start, with room on the switch, must know that wait at
    once from what FreeSWITCH keeps on A (app_uuid is gone) and dial B again: the call completes, B created
    once. It used to take the refusal for B's failure: A heard the busy notice and was hung up. (A wait after
    a later bridge, known by A's cb_wait: tests/test_sequence.py.)"""
    harness = make_harness(switch_status_interval=60.0)  # it learns the lowered limit from the refusal
    call = harness.place(harness.endpoint(), "15550000821", "15550006821")
    harness.wait_status(call, "a_answered")
    set_sps(harness, 1)  # the switch admits nothing now: B is refused
    fresh = Call.get_by_id(call.id)
    a_uuid, b_uuid = str(fresh.a_uuid), str(fresh.b_uuid)
    a_leg = harness.switch.channel(a_uuid)
    assert a_leg is not None
    assert wait_for(lambda: harness.switch.refusals(b_uuid) >= 1
                    and a_leg.var("current_application") == "playback" and a_leg.var("total_loops") == "-1"
                    and a_leg.var("originate_disposition") == "DESTINATION_OUT_OF_ORDER", 20), harness.timeline(call)
    engine = harness.service.engine
    sequence = engine.active[call.id]
    assert sequence.greenlet is not None
    sequence.greenlet.kill()  # the process dies: nothing more of this run is sent or written
    harness.service.records.flush()
    assert wait_for(lambda: engine.in_flight() == 0, 10)
    set_sps(harness, 30)  # room again by the next start
    assert engine.adopt_in_flight() == 1
    final = harness.wait_final(call, 60)
    assert (final.status, final.reason) == ("completed", ""), harness.timeline(call)
    assert harness.switch.creations(b_uuid) == 1
    assert not [s for s in harness.switch.heard(a_uuid) if s["source"] == FAILURE_NOTICE], harness.switch.heard(a_uuid)
