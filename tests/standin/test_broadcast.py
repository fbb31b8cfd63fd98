"""Queued applications as FreeSWITCH's switch_ivr_parse_event runs them: ``loops``, and ``uuid_break``.

What callbridge relies on (daemon/calls/sequence.py): a dialtone looped with ``loops: -1`` plays until
``uuid_break``, then the application queued behind it runs at once; ``uuid_break <uuid> all`` also drops
what was queued; a break that comes while no queued application runs is lost when the next one starts
(switch_core_session_exec clears CF_BREAK); a round shorter than half a second is not looped again.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from freeswitch.standin import StandIn

from .conftest import SCALE
from .esl_client import EslClient
from .helpers import audible, bg_originate, job_result, new_uuid, sendmsg


@pytest.fixture
def leg(client: EslClient) -> str:
    """An answered, parked leg (plan 0: stays up 300 s)."""
    uuid, job = bg_originate(client, "15550000202")
    assert job_result(client, job) == f"+OK {uuid}\n"
    client.wait_event(lambda m: m.name == "CHANNEL_PARK" and m.e("Unique-ID") == uuid)
    return uuid


@pytest.fixture
def short_file(tmp_path: Path) -> str:
    path = tmp_path / "blip.wav"
    sf.write(path, np.zeros(int(0.3 * 8000), dtype=np.int16), 8000)
    return str(path)


def executes(c: EslClient, uuid: str, app_uuid: str) -> int:
    return sum(1 for m in c.named("CHANNEL_EXECUTE", uuid) if m.e("Application-UUID") == app_uuid)


def wait_executes(c: EslClient, uuid: str, app_uuid: str, n: int) -> None:
    """Read events until the n-th execution of that application has started."""
    c.wait_event(lambda m: m.name == "CHANNEL_EXECUTE" and m.e("Application-UUID") == app_uuid
                 and executes(c, uuid, app_uuid) >= n, 10)


def test_a_looped_playback_repeats_until_uuid_break_then_the_next_app_runs(
        client: EslClient, standin: StandIn, leg: str, media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")  # 1 s a round
    loop_id, after_id = new_uuid(), new_uuid()
    assert sendmsg(client, leg, "playback", beep, loop_id, loops=-1).h("Reply-Text") == "+OK"
    assert sendmsg(client, leg, "set", "after=yes", after_id).h("Reply-Text") == "+OK"
    # Each round is an execution of its own, under the same Application-UUID.
    wait_executes(client, leg, loop_id, 3)
    assert not client.named("CHANNEL_EXECUTE_COMPLETE", leg) or all(
        m.e("Application-UUID") != after_id for m in client.named("CHANNEL_EXECUTE_COMPLETE", leg))
    assert client.api(f"uuid_break {leg}") == "+OK\n"
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == after_id)
    assert client.api(f"uuid_getvar {leg} after") == "yes"
    stops = [m.e("Playback-Status") for m in client.named("PLAYBACK_STOP", leg)]
    assert stops[-1] == "break" and set(stops[:-1]) == {"done"}
    assert audible(standin.heard(leg))[-1] == ("file", beep)


def test_a_queued_applications_event_uuid_is_not_left_in_app_uuid(
        client: EslClient, standin: StandIn, leg: str, media_dir: Path) -> None:
    """switch_ivr_parse_event sets app_uuid to the Event-UUID before each round; switch_core_session_exec
    takes it as the Application-UUID and removes the variable as the application starts. So while the
    looped playback runs, and after, ``uuid_getvar <uuid> app_uuid`` is ``_undef_``, and no event carries
    ``variable_app_uuid`` (none in the recordings 13 and 16a-16e, whose apps all came with an Event-UUID)."""
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    loop_id, after_id = new_uuid(), new_uuid()
    sendmsg(client, leg, "playback", beep, loop_id, loops=-1)
    wait_executes(client, leg, loop_id, 2)
    assert client.api(f"uuid_getvar {leg} app_uuid") == "_undef_"
    assert client.api(f"uuid_break {leg}") == "+OK\n"
    sendmsg(client, leg, "set", "after=yes", after_id)
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == after_id, 10)
    assert client.api(f"uuid_getvar {leg} app_uuid") == "_undef_"
    mine = [m for m in client.events if m.e("Unique-ID") == leg]
    assert [m.name for m in mine if m.e("variable_app_uuid") is not None] == []
    # The Application-UUID echo itself is unchanged: every round and its end carry the Event-UUID.
    assert {m.e("Application-UUID") for m in mine if m.name == "CHANNEL_EXECUTE" and m.e("Application") == "playback"} \
        == {loop_id}


def test_a_queued_application_shows_its_round_in_current_loop_and_total_loops(
        client: EslClient, standin: StandIn, leg: str, media_dir: Path) -> None:
    """switch_ivr_parse_event sets current_loop (the round, from 1) and total_loops (the loops header, 1 when
    absent, -1 for until stopped) before each round and removes both after the last. The recordings 16a-16e
    show variable_current_loop: 1 and variable_total_loops: 1 on every event of A during a queued app
    (CHANNEL_EXECUTE, PLAYBACK_*, CHANNEL_BRIDGE, CHANNEL_HANGUP, CHANNEL_EXECUTE_COMPLETE) and neither on
    park's CHANNEL_EXECUTE_COMPLETE or A's CHANNEL_HANGUP_COMPLETE."""
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    loop_id, after_id = new_uuid(), new_uuid()
    sendmsg(client, leg, "playback", beep, loop_id, loops=-1)
    wait_executes(client, leg, loop_id, 2)
    assert client.api(f"uuid_getvar {leg} total_loops") == "-1"
    rounds = [m.e("variable_current_loop") for m in client.named("CHANNEL_EXECUTE", leg)
              if m.e("Application-UUID") == loop_id]
    assert rounds[:2] == ["1", "2"]
    assert client.api(f"uuid_break {leg}") == "+OK\n"
    sendmsg(client, leg, "set", "after=yes", after_id)
    done = client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == after_id, 10)
    assert (done.e("variable_current_loop"), done.e("variable_total_loops")) == ("1", "1")
    assert standin.wait_for(lambda: standin.channel(leg).var("total_loops") is None, 5)  # the set's round over
    assert client.api(f"uuid_getvar {leg} current_loop") == "_undef_"
    assert client.api(f"uuid_getvar {leg} total_loops") == "_undef_"


def test_loops_plays_that_many_rounds(client: EslClient, leg: str, media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    loop_id, after_id = new_uuid(), new_uuid()
    sendmsg(client, leg, "playback", beep, loop_id, loops=3)
    sendmsg(client, leg, "set", "after=yes", after_id)
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == after_id, 10)
    assert executes(client, leg, loop_id) == 3


def test_a_round_shorter_than_half_a_second_is_not_looped(client: EslClient, leg: str, short_file: str) -> None:
    loop_id, after_id = new_uuid(), new_uuid()
    sendmsg(client, leg, "playback", short_file, loop_id, loops=-1)
    sendmsg(client, leg, "set", "after=yes", after_id)
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == after_id, 10)
    assert executes(client, leg, loop_id) == 1


def test_uuid_break_all_drops_what_was_queued(client: EslClient, standin: StandIn, leg: str, media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    loop_id, dropped_id, after_id = new_uuid(), new_uuid(), new_uuid()
    sendmsg(client, leg, "playback", beep, loop_id, loops=-1)
    sendmsg(client, leg, "hangup", "NORMAL_CLEARING", dropped_id)
    wait_executes(client, leg, loop_id, 1)
    assert client.api(f"uuid_break {leg} all") == "+OK\n"
    sendmsg(client, leg, "set", "after=yes", after_id)
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == after_id, 10)
    assert executes(client, leg, dropped_id) == 0
    assert standin.channel(leg).is_up


def test_a_break_while_nothing_queued_runs_is_lost_when_the_next_app_starts(
        client: EslClient, leg: str, media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    assert client.api(f"uuid_break {leg}") == "+OK\n"  # parked: nothing queued runs
    t0 = time.monotonic()
    played = new_uuid()
    sendmsg(client, leg, "playback", beep, played)
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == played, 10)
    assert [m.e("Playback-Status") for m in client.named("PLAYBACK_STOP", leg)] == ["done"]
    assert (time.monotonic() - t0) / SCALE >= 0.95


@pytest.mark.standin_limits(sps=2)
def test_refusals_are_counted_by_the_uuid_asked_for(client: EslClient, standin: StandIn) -> None:
    # sps 2 admits one session a tick; at the start the budget is 2, so the first leg goes, the second not.
    first, job1 = bg_originate(client, "15550000203")
    second, job2 = bg_originate(client, "15550000204")
    results = {job_result(client, job1), job_result(client, job2)}
    assert "-ERR DESTINATION_OUT_OF_ORDER\n" in results
    refused = first if standin.channel(first) is None else second
    assert standin.refusals(refused) == 1 and standin.channel(refused) is None
    assert standin.refusals(second if refused == first else first) == 0
