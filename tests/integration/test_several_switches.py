"""One daemon, two switches (stand-ins over TCP): where calls go, B beside A, a switch that goes away.

These need two switches and the stand-in's own controls (refusing connections): stand-in only.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import switch_sent_to
from daemon.store import Call, CallEvent
from tests.integration.conftest import Harness, needs_standin, switch_address, wait_for
from tests.integration.test_daemon_restart import Daemon

pytestmark = needs_standin()


def name_of(switch: Any) -> str:
    return switch_address(switch).name


def originates(switch: Any, a_uuid: str) -> int:
    return sum(1 for c in switch.commands if c.text.startswith("bgapi originate") and a_uuid in c.text)


def readyz(harness: Harness) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{harness.service.http_port}/readyz", timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def place_many(harness: Harness, count: int, phone_a: str, phone_b: str) -> list[Call]:
    endpoint = harness.endpoint(max_in_flight=100)
    return [harness.place(endpoint, phone_a, phone_b, prompts=False) for _ in range(count)]


def wait_all(harness: Harness, calls: list[Call], status: str, timeout: float = 60) -> None:
    for call in calls:
        harness.wait_status(call, status, timeout)


def go_away(switch: Any) -> None:
    """The switch stops answering: its port closed, its connections cut (its channels go on)."""
    switch.refuse_connections(True)
    switch.drop_connections()


@pytest.mark.time_scale(0.05)  # B talks 60 plan seconds: 3 s here
def test_calls_spread_over_both_switches_with_b_on_as_switch(
        make_harness: Callable[..., Harness], switch: Any, more_switches: list[Any]) -> None:
    switches = [switch, *more_switches]
    harness = make_harness(switches=switches)
    calls = place_many(harness, 20, "15550000440", "15550001440")
    done = [harness.wait_final(c, 60) for c in calls]
    assert Counter(c.status for c in done) == {"completed": 20}, [harness.timeline(c) for c in done]
    on = Counter(c.switch for c in done)
    assert set(on) == {name_of(switch), name_of(more_switches[0])} and min(on.values()) >= 5, on
    by_name = {name_of(sw): sw for sw in switches}
    for call in done:
        mine = by_name[call.switch]
        other = next(sw for sw in switches if sw is not mine)
        # A's originate and B's bridge both on the switch stored with the call, nothing on the other
        assert originates(mine, str(call.a_uuid)) == 1
        assert mine.channel(str(call.a_uuid)) is not None and mine.channel(str(call.b_uuid)) is not None
        assert other.channel(str(call.a_uuid)) is None and other.channel(str(call.b_uuid)) is None
        claimed = CallEvent.get((CallEvent.call == call.id) & (CallEvent.kind == "claimed"))
        assert json.loads(claimed.detail)["switch"] == call.switch
    status, body = readyz(harness)
    assert status == 200 and body["data"]["switches_not_ready"] == []
    assert [s["switch"] for s in body["data"]["switches"]] == [name_of(sw) for sw in switches]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{harness.service.http_port}/metrics", timeout=5).read()
    for sw in switches:
        assert f'callbridge_esl_connected{{switch="{name_of(sw)}"}} 1.0'.encode() in metrics
        assert f'callbridge_switch_sessions_per_second_limit{{switch="{name_of(sw)}"}} 30.0'.encode() in metrics
    assert b"ClueCon" not in metrics and b"ClueCon" not in json.dumps(body).encode()


@pytest.mark.time_scale(0.1)  # B talks 60 plan seconds: 6 s here, while its switch is away and back
def test_a_switch_that_goes_away_gets_no_new_calls_and_its_calls_are_reconciled_when_back(
        make_harness: Callable[..., Harness], switch: Any, more_switches: list[Any]) -> None:
    other = more_switches[0]
    harness = make_harness(switches=[switch, other], esl_reconnect_max_delay=0.5)
    first = place_many(harness, 8, "15550000441", "15550001441")
    wait_all(harness, first, "bridged")
    away = [c for c in (Call.get_by_id(c.id) for c in first) if c.switch == name_of(switch)]
    assert away, "no call went to the first switch"
    go_away(switch)
    link = switch_sent_to(harness.service.engine.links, name_of(switch))
    assert link is not None
    assert wait_for(lambda: not link.ready, 10)
    status, body = readyz(harness)  # still ready: the other switch takes the calls
    assert status == 200 and body["data"]["switches_not_ready"] == [name_of(switch)]
    assert next(s for s in body["data"]["switches"] if s["switch"] == name_of(switch))["connected"] is False
    later = place_many(harness, 6, "15550000442", "15550001442")
    wait_all(harness, later, "bridged")
    assert {Call.get_by_id(c.id).switch for c in later} == {name_of(other)}
    assert all(Call.get_by_id(c.id).status == "bridged" for c in away)  # followed, not ended, while away
    switch.refuse_connections(False)
    assert wait_for(lambda: link.ready, 15), "the switch was not reconnected"
    done = [harness.wait_final(c, 60) for c in first + later]
    assert Counter(c.status for c in done) == {"completed": 14}, [harness.timeline(c) for c in done]
    for call in away:  # reconciled with the switch they were on, dialed once, never anywhere else
        assert "reconciled" in harness.timeline(call)
        assert originates(switch, str(call.a_uuid)) == 1 and originates(other, str(call.a_uuid)) == 0


@pytest.mark.time_scale(0.1)  # A and B stay up 300 plan seconds: 30 s here, beyond the bound
def test_a_switch_away_longer_than_switch_lost_after_ends_its_calls_and_they_are_never_redialed(
        make_harness: Callable[..., Harness], switch: Any, more_switches: list[Any]) -> None:
    other = more_switches[0]
    harness = make_harness(switches=[switch, other], esl_reconnect_max_delay=0.5, switch_lost_after=2.0)
    calls = place_many(harness, 6, "15550000443", "15550000444")
    wait_all(harness, calls, "bridged")
    lost = [c for c in (Call.get_by_id(c.id) for c in calls) if c.switch == name_of(switch)]
    kept = [c for c in calls if c.id not in {x.id for x in lost}]
    assert lost and kept
    go_away(switch)
    for call in lost:
        done = harness.wait_final(call, 30)
        assert (done.status, done.failed_leg) == ("failed", ""), harness.timeline(done)
        assert done.reason == f"the switch {name_of(switch)} was unreachable for 2 s"
        assert "switch_lost" in harness.timeline(done)
    assert all(Call.get_by_id(c.id).status == "bridged" for c in kept)  # the other switch's calls go on
    status, _ = readyz(harness)
    assert status == 200
    # When it is back, the legs nobody follows any more are hung up; nothing is dialed again anywhere.
    switch.refuse_connections(False)
    for call in lost:
        for uuid in (str(call.a_uuid), str(call.b_uuid)):
            assert wait_for(lambda u=uuid: not switch.channel(u).is_up, 15), f"leg {uuid} left up"
        assert originates(switch, str(call.a_uuid)) == 1 and originates(other, str(call.a_uuid)) == 0
        assert Call.get_by_id(call.id).status == "failed"


@pytest.mark.time_scale(0.05)
def test_with_every_switch_away_calls_wait_queued_and_go_when_one_is_back(
        make_harness: Callable[..., Harness], switch: Any, more_switches: list[Any]) -> None:
    other = more_switches[0]
    harness = make_harness(switches=[switch, other], esl_reconnect_max_delay=0.5)
    go_away(switch)
    go_away(other)
    assert wait_for(lambda: not harness.service.engine.ready, 10)
    status, body = readyz(harness)
    assert status == 503 and sorted(body["data"]["switches_not_ready"]) == sorted(
        [name_of(switch), name_of(other)])
    dispatcher = harness.service.dispatcher
    real_tick, ticks = dispatcher.tick, [0]

    def tick(now: Any, mono: float) -> float:
        try:
            return real_tick(now, mono)
        finally:
            ticks[0] += 1

    dispatcher.tick = tick  # type: ignore[method-assign]
    calls = place_many(harness, 3, "15550000445", "15550006445")
    ticks[0] = 0
    # The dispatcher looks at least once a second: two whole looks after the calls were placed.
    assert wait_for(lambda: ticks[0] >= 2, 30), "the dispatcher did not look at the queued calls"
    assert {Call.get_by_id(c.id).status for c in calls} == {"queued"}
    other.refuse_connections(False)
    done = [harness.wait_final(c, 60) for c in calls]
    assert {(c.status, c.switch) for c in done} == {("completed", name_of(other))}


@pytest.mark.slow
@pytest.mark.time_scale(0.05)
def test_sigkill_then_restart_adopts_each_call_on_the_switch_it_was_sent_to(
        tmp_path: Path, switch: Any, more_switches: list[Any]) -> None:
    switches = [switch, *more_switches]
    daemon = Daemon(tmp_path / "state", switch.port)
    daemon.env["CALLBRIDGE_SWITCHES"] = ",".join(f"127.0.0.1:{sw.port}:ClueCon" for sw in switches)
    try:
        token = daemon.cli("endpoint", "add", "--name", "k", "--caller-id", "15551230000", "--dial-string",
                           "sofia/gateway/carrier/{number}", "--max-in-flight", "50")["token"]
        daemon.start()
        callids = []
        for i in range(12):  # B talks 60 plan seconds (3 s here): the kill lands while they are up
            status, answer = daemon.request("POST", "/v1/calls", {"token": token, "phone_a": f"15550000{i:03d}",
                                                                  "phone_b": f"15550001{i:03d}"})
            assert status == 200, answer
            callids.append(answer["data"]["callid"])
        assert wait_for(lambda: all(len(sw.channels_live()) >= 2 for sw in switches), 30), "calls not on both"
        daemon.kill()
        daemon.start()

        def call(callid: str) -> dict[str, Any]:
            return daemon.get(f"/v1/calls/{callid}?token={urllib.parse.quote(token)}")[1].get("data", {})

        assert wait_for(lambda: all(call(c).get("status") in ("completed", "failed") for c in callids), 60)
        for callid in callids:
            # every call dialed at most once, all switches counted
            assert sum(sum(callid in c.text for c in sw.commands if c.text.startswith("bgapi originate"))
                       for sw in switches) <= 1
        adopted = [step for c in callids for step in call(c)["timeline"] if step["kind"] == "adopted"]
        assert adopted and {step["detail"]["switch"] for step in adopted} <= {name_of(sw) for sw in switches}
        assert sum(call(c)["status"] == "completed" for c in callids) >= 11  # one may be caught mid-send
        assert wait_for(lambda: not any(sw.channels_live() for sw in switches), 10), "channels left open"
    finally:
        daemon.stop()
