"""The switch's session limits (traces 17/17b, switch_core_session_request_uuid): sessions per second
refilled on a one-second tick, max sessions at once, `fsctl`, `status`, and what a refused leg looks like.

The tick's clock is a ManualClock the tests move, so nothing here depends on how busy the machine is.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from freeswitch.standin import StandIn
from freeswitch.standin.limits import SessionLimits

from .conftest import SCALE
from .esl_client import EslClient
from .helpers import ManualClock, bg_originate, job_result, new_uuid, sendmsg, wait_gone

ROOT = Path(__file__).resolve().parents[2]
REFUSED = "-ERR DESTINATION_OUT_OF_ORDER\n"


def admit_all(limits: SessionLimits, n: int) -> list[int | None]:
    return [limits.admit() for _ in range(n)]


# ----- the counting itself ------------------------------------------------------------------------
def test_a_burst_gets_one_less_than_the_rate_per_tick() -> None:
    # `sps = --runtime.sps; if (sps <= 0) refuse`: the 30th request of a tick finds the budget at 0.
    limits = SessionLimits(clock=ManualClock())
    got = admit_all(limits, 35)
    assert got[:29] == list(range(1, 30))
    assert got[29:] == [None] * 6
    assert limits.throttled == 6 and limits.count == 29


def test_the_budget_refills_on_the_tick_and_not_before() -> None:
    clock = ManualClock()
    limits = SessionLimits(sps=3, clock=clock)
    assert admit_all(limits, 3) == [1, 2, None]
    clock.advance(0.999)
    assert limits.admit() is None
    clock.advance(0.001)  # the tick, one second after the switch started
    # The first second saw 4 requests (a refused one spends budget too): `status` counts requests.
    assert "4 session(s) per Sec out of max 3, peak 4, last 5min 4 \n" in limits.status_lines()
    assert admit_all(limits, 3) == [3, 4, None]
    clock.advance(1.0)
    assert "3 session(s) per Sec out of max 3, peak 4, last 5min 4 \n" in limits.status_lines()


def test_a_new_rate_applies_from_the_next_tick() -> None:
    clock = ManualClock()
    limits = SessionLimits(clock=clock)
    assert limits.set_sps(2) == 2
    assert all(admit_all(limits, 10))  # this tick still runs on the old budget of 30
    clock.advance(1.0)
    assert admit_all(limits, 2) == [11, None]  # a limit of 2 admits one session a tick
    clock.advance(1.0)
    assert limits.set_sps(0) == 2 and limits.set_sps(-5) == 2  # `fsctl sps` without a positive N only reads
    assert admit_all(limits, 2) == [12, None]


def test_max_sessions_counts_the_sessions_that_exist() -> None:
    clock = ManualClock()
    limits = SessionLimits(max_sessions=3, clock=clock)
    assert admit_all(limits, 4) == [1, 2, 3, None]
    assert limits.over_limit == 1 and limits.throttled == 0
    limits.release()
    assert limits.admit() == 4
    assert limits.set_max_sessions(5) == 5  # at once, no tick needed
    assert admit_all(limits, 3) == [5, 6, None]
    assert limits.set_max_sessions(0) == 5  # `fsctl max_sessions` without N only reads


def test_a_refusal_over_max_sessions_still_spends_the_rate_budget() -> None:
    limits = SessionLimits(sps=5, max_sessions=1, clock=ManualClock())
    assert admit_all(limits, 5) == [1, None, None, None, None]
    assert limits.over_limit == 3 and limits.throttled == 1


def test_max_sessions_is_a_c_unsigned_int() -> None:
    limits = SessionLimits(clock=ManualClock())
    assert limits.set_max_sessions(-1) == -1  # stored as 4294967295, printed with %d
    assert "-1 session(s) max\n" in limits.status_lines()
    assert dict(limits.heartbeat_headers())["Max-Sessions"] == 4294967295


def test_status_lines_read_like_freeswitch() -> None:
    clock = ManualClock()
    limits = SessionLimits(clock=clock)
    assert limits.status_lines() == (
        "0 session(s) since startup\n"
        "0 session(s) - peak 0, last 5min 0 \n"
        "0 session(s) per Sec out of max 30, peak 0, last 5min 0 \n"
        "1000 session(s) max\n"
    )
    admit_all(limits, 4)
    limits.release()
    clock.advance(1.0)
    assert limits.status_lines() == (
        "4 session(s) since startup\n"
        "3 session(s) - peak 4, last 5min 4 \n"
        "4 session(s) per Sec out of max 30, peak 4, last 5min 4 \n"
        "1000 session(s) max\n"
    )
    clock.advance(1.0)
    assert "0 session(s) per Sec out of max 30, peak 4, last 5min 4 \n" in limits.status_lines()
    headers = dict(limits.heartbeat_headers())
    assert (headers["Session-Count"], headers["Session-Per-Sec"], headers["Session-Per-Sec-Max"]) == (3, 30, 4)


def test_the_five_minute_peaks_start_over_every_300_ticks() -> None:
    clock = ManualClock()
    limits = SessionLimits(clock=clock)
    admit_all(limits, 7)
    clock.advance(1.0)
    assert "peak 7, last 5min 7 \n" in limits.status_lines()
    clock.advance(300.0)
    lines = limits.status_lines()
    assert "7 session(s) - peak 7, last 5min 7 \n" in lines  # 7 still exist
    assert "0 session(s) per Sec out of max 30, peak 7, last 5min 0 \n" in lines


# ----- over the Event Socket --------------------------------------------------------------------------
@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def limited(clock: ManualClock) -> Iterator[StandIn]:
    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=SCALE, clock=clock).start()
    try:
        yield sw
    finally:
        sw.stop()


@pytest.fixture
def c(limited: StandIn) -> Iterator[EslClient]:
    client = EslClient(limited.port)
    assert client.auth().h("Reply-Text") == "+OK accepted"
    assert client.cmd("event plain ALL").h("Reply-Text") == "+OK event listener enabled plain"
    try:
        yield client
    finally:
        client.close()


def test_fsctl_reads_and_sets_the_limits(c: EslClient) -> None:
    assert c.api("fsctl sps") == "+OK sessions per second: 30\n"
    assert c.api("fsctl sps 2") == "+OK sessions per second: 2\n"
    assert c.api("fsctl SPS") == "+OK sessions per second: 2\n"
    assert c.api("fsctl sps nonsense") == "+OK sessions per second: 2\n"
    assert c.api("fsctl max_sessions") == "+OK max sessions: 1000\n"
    assert c.api("fsctl max_sessions 3") == "+OK max sessions: 3\n"
    assert c.api("fsctl last_sps") == "+OK last sessions per second: 0\n"
    assert c.api("fsctl").startswith("-USAGE: [recover|send_sighup|hupall|")
    assert c.api("fsctl bogus").startswith("-ERR INVALID COMMAND\nUSAGE: fsctl [recover|")
    assert c.api("fsctl pause") == "-ERR fsctl pause is not simulated by the stand-in\n"
    status = c.api("status")
    assert "0 session(s) per Sec out of max 2, peak 0, last 5min 0 \n3 session(s) max\n" in status


def test_past_the_budget_an_originate_creates_nothing(c: EslClient, limited: StandIn, clock: ManualClock) -> None:
    assert c.api("fsctl sps 3") == "+OK sessions per second: 3\n"
    clock.advance(1.0)
    jobs = [bg_originate(c, f"15550000{i:03d}") for i in range(4)]
    results = [job_result(c, job) for _, job in jobs]
    assert results[:2] == [f"+OK {uuid}\n" for uuid, _ in jobs[:2]]
    assert results[2:] == [REFUSED, REFUSED]
    refused = {uuid for uuid, _ in jobs[2:]}
    assert not [m for m in c.events if m.e("Unique-ID") in refused]  # no CHANNEL_CREATE, no event at all
    assert all(limited.channel(uuid) is None for uuid in refused)
    # The synchronous api answers the same, and the next tick lets calls through again.
    assert c.api("originate sofia/gateway/carrier/15550000010 &park()") == REFUSED
    clock.advance(1.0)
    assert c.api("originate sofia/gateway/carrier/15550000011 &park()").startswith("+OK ")
    # The second that ended saw 5 requests, 2 admitted: `status` counts the requests.
    assert "5 session(s) per Sec out of max 3, peak 5, last 5min 5 \n" in c.api("status")
    assert json.loads(c.api("standin limits")) == {"sps": 3, "max_sessions": 1000, "budget": 2, "sessions": 3,
                                                   "throttled": 3, "over_limit": 0, "ticks": 2}


def test_sofia_asks_for_the_session_before_it_looks_at_the_gateway(c: EslClient, clock: ManualClock) -> None:
    assert c.api("fsctl sps 2") == "+OK sessions per second: 2\n"
    clock.advance(1.0)
    assert c.api("originate sofia/gateway/nosuch/15550000001 &park()") == "-ERR INVALID_GATEWAY\n"
    assert c.api("originate sofia/gateway/nosuch/15550000001 &park()") == REFUSED
    # error/ and unknown endpoints never ask for a session.
    assert c.api("originate error/user_busy &park()") == "-ERR USER_BUSY\n"
    # The first request got session 1 (gone at once); the refused one got none.
    assert "1 session(s) since startup\n0 session(s) - peak 1, last 5min 1 \n" in c.api("status")


def test_a_refused_leg_fails_over_to_the_next(c: EslClient, clock: ManualClock) -> None:
    assert c.api("fsctl max_sessions 1") == "+OK max sessions: 1\n"
    a = new_uuid()
    assert c.api(f"originate {{origination_uuid={a}}}sofia/gateway/carrier/15550000020 &park()") == f"+OK {a}\n"
    dial = "sofia/gateway/carrier/15550000021|sofia/gateway/carrier/15550000022"
    assert c.api(f"originate {dial} &park()") == REFUSED
    assert c.api("fsctl max_sessions 2") == "+OK max sessions: 2\n"
    assert c.api(f"originate {dial} &park()").startswith("+OK ")


def bridge_refused(c: EslClient, sw: StandIn, *sets: str) -> tuple[str, str]:
    """A answered and parked, then the limit is lowered under it and the bridge app dials B."""
    a, job = bg_originate(c, "15550000030")
    assert job_result(c, job) == f"+OK {a}\n"
    assert c.api("fsctl max_sessions 1") == "+OK max sessions: 1\n"
    b = new_uuid()
    for arg in (*sets, "ringback=%(2000,4000,440,480)", "instant_ringback=true"):
        assert sendmsg(c, a, "set", arg).h("Reply-Text") == "+OK"
    dial = f"{{origination_uuid={b},ignore_early_media=true}}sofia/gateway/carrier/15550000031"
    assert sendmsg(c, a, "bridge", dial).h("Reply-Text") == "+OK"
    return a, b


def bridge_result(c: EslClient, a: str) -> dict[str, str | None]:
    done = c.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Unique-ID") == a
                        and m.e("Application") == "bridge")
    return {k: done.e(f"variable_{k}") for k in ("originate_disposition", "DIALSTATUS", "originate_failed_cause",
                                                 "last_bridge_hangup_cause", "originate_causes")}


def test_the_bridge_app_when_b_cannot_get_a_session(c: EslClient, limited: StandIn) -> None:
    a, b = bridge_refused(c, limited)
    assert bridge_result(c, a) == {
        "originate_disposition": "DESTINATION_OUT_OF_ORDER", "DIALSTATUS": "INVALIDARGS",
        "originate_failed_cause": "DESTINATION_OUT_OF_ORDER",
        "last_bridge_hangup_cause": None,  # only B's own hangup would have set it
        "originate_causes": None,  # no B leg was created
    }
    assert limited.channel(b) is None
    assert not [m for m in c.events if m.e("Unique-ID") == b]
    # Without continue_on_fail the bridge app hangs A up with the cause (switch_channel_handle_cause).
    wait_gone(limited, a)
    hangup = c.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == a)
    assert hangup.e("Hangup-Cause") == "DESTINATION_OUT_OF_ORDER"


def test_with_continue_on_fail_a_stays_parked_and_heard_no_ringback(c: EslClient, limited: StandIn) -> None:
    a, _ = bridge_refused(c, limited, "continue_on_fail=true")
    assert bridge_result(c, a)["originate_disposition"] == "DESTINATION_OUT_OF_ORDER"
    assert c.api(f"uuid_exists {a}") == "true"
    assert [seg["kind"] for seg in limited.heard(a)] == ["ringing", "silence"]  # no B, so no ringback at all
    # Once the switch has room again the same A can be bridged.
    assert c.api("fsctl max_sessions 10") == "+OK max sessions: 10\n"
    b = new_uuid()
    assert sendmsg(c, a, "bridge", f"{{origination_uuid={b}}}sofia/gateway/carrier/15550000032").h("Reply-Text") == "+OK"
    bridged = c.wait_event(lambda m: m.name == "CHANNEL_BRIDGE" and m.e("Unique-ID") == a)
    assert bridged.e("Other-Leg-Unique-ID") == b


def test_a_session_is_freed_when_its_leg_is_gone(c: EslClient, limited: StandIn) -> None:
    assert c.api("fsctl max_sessions 2") == "+OK max sessions: 2\n"
    first = [c.api(f"originate sofia/gateway/carrier/1555000000{i} &park()") for i in range(3)]
    assert [r[:3] for r in first] == ["+OK", "+OK", "-ER"]
    uuid = first[0].split()[1]
    assert c.api(f"uuid_kill {uuid}") == "+OK\n"
    wait_gone(limited, uuid)
    assert c.api("originate sofia/gateway/carrier/15550000003 &park()").startswith("+OK ")
    # A refused far end or a failed leg frees its session as well.
    assert c.api("fsctl max_sessions 3") == "+OK max sessions: 3\n"
    for _ in range(3):
        assert c.api("originate sofia/gateway/carrier/15550003001 &park()") == "-ERR USER_BUSY\n"
    assert "6 session(s) since startup\n2 session(s) - peak 3, last 5min 3 \n" in c.api("status")


def test_far_end_sessions_count_when_the_far_end_lives_on_the_switch(media_dir: Path) -> None:
    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=SCALE, far_end_sessions=True,
                 max_sessions=3).start()
    try:
        client = EslClient(sw.port)
        client.auth()
        assert client.api("originate sofia/gateway/carrier/15550000040 &park()").startswith("+OK ")
        assert "2 session(s) - peak 2" in client.api("status")
        # The next gateway leg is the 3rd session; its far end would be the 4th: 503, a created leg.
        assert client.api("originate sofia/gateway/carrier/15550000041 &park()") == "-ERR NORMAL_TEMPORARY_FAILURE\n"
        failed = [ch for ch in sw.switch.all_channels.values() if ch.number == "15550000041"][0]
        assert failed.var("sip_invite_failure_status") == "503"
        assert failed.var("sip_invite_failure_phrase") == "Maximum Calls In Progress"
        client.close()
    finally:
        sw.stop()


def test_a_restarted_switch_starts_from_its_configured_limits(limited: StandIn, c: EslClient) -> None:
    assert c.api("fsctl sps 5") == "+OK sessions per second: 5\n"
    limited.restart()
    fresh = EslClient(limited.port)
    fresh.auth()
    assert fresh.api("fsctl sps") == "+OK sessions per second: 30\n"
    fresh.close()


def test_the_cli_takes_the_limits_with_freeswitch_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "freeswitch.standin", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert re.search(r"--sps SPS\s+sessions-per-second.*default: 30\)", out.stdout, re.S)
    assert re.search(r"--max-sessions MAX_SESSIONS\s+max-sessions at once.*default: 1000\)", out.stdout, re.S)
    bad = subprocess.run([sys.executable, "-m", "freeswitch.standin", "--sps", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "--sps must be > 0" in bad.stderr
