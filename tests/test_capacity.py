"""The switch's capacity: what FreeSWITCH's answers say, and the pacing rule that keeps under its limits."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from daemon.switch.capacity import (
    SwitchCapacity,
    parse_fsctl_max_sessions,
    parse_fsctl_sps,
    parse_status,
)
from daemon.switch.engine import choose_switch, room_for_new_calls
from freeswitch.standin.limits import SessionLimits

# `api status` as FreeSWITCH 1.10.12 answered it (shared/esl-traces/17_throttle_sps, trailing spaces kept).
STATUS = (
    "UP 0 years, 0 days, 0 hours, 16 minutes, 34 seconds, 496 milliseconds, 959 microseconds\n"
    "FreeSWITCH (Version 1.10.12-release git a88d069 2024-08-02 21:02:27Z 64bit) is ready\n"
    "1159 session(s) since startup\n"
    "3 session(s) - peak 42, last 5min 12 \n"
    "7 session(s) per Sec out of max 30, peak 86, last 5min 28 \n"
    "1000 session(s) max\n"
    "min idle cpu 0.00/5.43\n"
    "Current Stack Size/Max 240K/8192K\n"
)


def test_status_and_fsctl_answers_are_read() -> None:
    figures = parse_status(STATUS)
    assert (figures.sessions, figures.rate_last_second, figures.sps, figures.max_sessions) == (3, 7, 30, 1000)
    assert parse_fsctl_sps("+OK sessions per second: 30\n") == 30
    assert parse_fsctl_max_sessions("+OK max sessions: 1000\n") == 1000
    assert parse_fsctl_max_sessions("+OK max sessions: -1\n") == 0xFFFFFFFF  # a uint32 printed with %d
    assert parse_fsctl_sps("-ERR INVALID COMMAND\n") is None
    assert parse_status("-ERR no reply\n").sps is None


def test_a_rate_lowered_under_an_unspent_budget_is_read_from_the_next_status() -> None:
    """``fsctl sps 2`` sets only the total; at the switch's next tick ``sps_last = sps_total - sps``
    (switch_time.c) is 2 minus what was left of the old budget, and ``status`` prints it with %d: a negative
    count for that second. The new limit on the same line must still be read."""
    now = [0.0]
    limits = SessionLimits(clock=lambda: now[0])  # the stand-in, as switch_time.c counts
    limits.set_sps(2)
    now[0] = 1.0
    lines = limits.status_lines()
    assert "-28 session(s) per Sec out of max 2, " in lines
    capacity = SwitchCapacity(0.1)
    capacity.learn_status(STATUS)
    figures = capacity.learn_status(lines)
    assert (capacity.sps, capacity.rate_cap, figures.sps) == (2, 1, 2)
    assert figures.rate_last_second is None  # what the old budget's second created is not known from it
    assert figures.sessions == 0 and figures.max_sessions == 1000


@pytest.mark.parametrize(("sps", "margin", "cap"), [(30, 0.1, 26), (30, 0.0, 29), (2, 0.1, 1), (1, 0.1, 0),
                                                    (300, 0.1, 269)])
def test_the_rate_cap_is_the_switchs_n_minus_one_less_the_margin(sps: int, margin: float, cap: int) -> None:
    capacity = SwitchCapacity(margin)
    capacity.learn_limits(sps=sps, max_sessions=1000)
    assert capacity.rate_cap == cap


@pytest.mark.parametrize(("max_sessions", "margin", "cap"), [(1000, 0.1, 900), (700, 0.3, 490), (1, 0.1, 1),
                                                             (3, 0.9, 1), (10, 0.0, 10)])
def test_the_session_cap_is_max_sessions_less_the_margin_and_never_none(max_sessions: int, margin: float,
                                                                        cap: int) -> None:
    # A cap of 0 would leave every call `queued` for ever on a small switch, without a word.
    capacity = SwitchCapacity(margin)
    capacity.learn_limits(sps=30, max_sessions=max_sessions)
    assert capacity.session_cap == cap
    assert capacity.delay(0.0) == 0.0  # an idle switch takes a leg now


def send(capacity: SwitchCapacity, uuid: str, now: float) -> None:
    capacity.reserve(uuid, now)
    capacity.sent(uuid, now)


def test_on_a_new_connection_the_switchs_last_second_counts_as_spent_for_a_second() -> None:
    """Legs sent before a restart (or by anyone before the daemon listened) were not heard: the 7 creations
    ``status`` reports for the switch's last second are assumed made now, so 26 - 7 legs may go at once."""
    capacity = SwitchCapacity(0.1)
    capacity.learn_status(STATUS)
    t = 100.0
    capacity.assume_created(parse_status(STATUS).rate_last_second or 0, t)
    for n in range(19):
        assert capacity.delay(t) == 0
        send(capacity, f"leg{n}", t)
    assert capacity.delay(t) == pytest.approx(1.0)
    capacity.assume_created(7, t + 0.5)  # already counted: nothing more
    assert capacity.rate(t + 0.5) == 26 and capacity.delay(t + 1.0) == 0


def test_no_more_than_the_cap_in_a_second_then_room_as_the_oldest_leave() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_status(STATUS)
    t = 100.0
    for n in range(26):
        assert capacity.delay(t + n * 0.01) == 0
        send(capacity, f"leg{n}", t + n * 0.01)
    assert capacity.delay(t + 0.5) == pytest.approx(0.5)  # the first leaves the window at t + 1
    assert capacity.delay(t + 0.999) == pytest.approx(0.001)
    assert capacity.delay(t + 1.0) == 0  # a second after it: in no one-second span with the last


def test_a_leg_given_room_counts_as_sent_now_until_it_is() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_limits(sps=2, max_sessions=1000)  # one a second
    capacity.reserve("late", 100.0)
    assert capacity.delay(105.0) > 0  # still not sent: it may go any moment
    capacity.sent("late", 105.0)
    assert capacity.delay(105.5) == pytest.approx(0.5)
    capacity.reserve("never", 106.0)
    capacity.cancel("never")
    assert capacity.delay(106.0) == 0


def test_sliding_window_holds_for_every_second_whatever_the_phase() -> None:
    rng = random.Random(7)
    capacity = SwitchCapacity(0.1)
    capacity.learn_limits(sps=30, max_sessions=10_000)
    t, sent = 0.0, []
    for n in range(3000):
        t += rng.expovariate(60.0)  # twice the rate the switch allows
        if capacity.delay(t) == 0:
            send(capacity, f"leg{n}", t)
            sent.append(t)
    for i, start in enumerate(sent):
        in_window = sum(1 for u in sent[i:] if u < start + 1.0)
        assert in_window <= capacity.rate_cap
    assert len(sent) > 0.8 * capacity.rate_cap * t  # and the cap is used


def test_others_creations_share_the_budget_and_ours_are_not_counted_twice() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_status(STATUS)
    for n in range(20):
        capacity.created(f"theirs{n}", 50.0)  # another client's legs
    send(capacity, "ours", 50.0)
    capacity.created("ours", 50.01)
    assert capacity.rate(50.02) == 21 and capacity.sessions == 3 + 21
    for n in range(5):
        send(capacity, f"more{n}", 50.02)
    assert capacity.delay(50.02) > 0
    capacity.gone("theirs0")
    assert capacity.sessions == 3 + 20


def test_max_sessions_holds_with_the_margin() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_limits(sps=1000, max_sessions=10)  # 9 at most
    capacity.learn_status("8 session(s) - peak 8, last 5min 8 \n")
    assert capacity.delay(10.0) == 0
    send(capacity, "x", 10.0)
    assert capacity.delay(10.0) > 0  # 8 + the one on its way = 9
    capacity.gone("someone")
    assert capacity.delay(10.0) == 0


def test_a_refusal_stops_new_legs_for_a_second_and_asks_for_the_figures_again() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_status(STATUS)
    send(capacity, "refused", 10.0)
    capacity.refused("refused", "a", 10.0)
    assert capacity.refresh_wanted and capacity.throttled["a"] == 1
    assert capacity.delay(10.5) == pytest.approx(0.5)
    assert capacity.delay(11.0) == 0


def test_waiting_legs_go_in_order_before_new_calls_and_not_before_their_time() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_limits(sps=2, max_sessions=1000)  # one a second
    granted: list[str] = []
    assert capacity.request("b1", "b", 0.0, lambda: granted.append("b1"))  # room now: granted at once
    assert not capacity.request("b2", "b", 0.0, lambda: granted.append("b2"))
    assert not capacity.request("a3", "a", 0.0, lambda: granted.append("a3"), not_before=2.5)
    capacity.sent("b1", 0.0)
    assert capacity.new_call_delay(1.0) > 0  # b2 is ready and goes first
    assert capacity.serve(1.0) == pytest.approx(1.5) and granted == ["b2"]  # a3 is next, at 2.5
    capacity.sent("b2", 1.0)
    assert capacity.serve(2.0) == pytest.approx(0.5)  # a3 not before 2.5
    assert capacity.serve(2.5) == float("inf") and granted == ["b2", "a3"]


def test_a_heartbeat_updates_the_sessions_and_the_limit() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_status(STATUS)
    headers = {"Session-Count": "12", "Max-Sessions": "500", "Session-Per-Sec": "28"}
    capacity.learn_heartbeat(headers.get)
    assert (capacity.sessions, capacity.max_sessions, capacity.session_cap) == (12, 500, 450)


def test_until_the_switch_says_freeswitchs_defaults_are_assumed() -> None:
    capacity = SwitchCapacity(0.1)
    assert not capacity.known and (capacity.rate_cap, capacity.session_cap) == (26, 900)


def test_new_calls_keep_to_half_the_room_leaving_the_rest_for_their_b_legs() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_limits(sps=30, max_sessions=1000)
    started = 0
    while capacity.new_call_delay(0.0) == 0:
        capacity.reserve_new_call(f"a{started}", 0.0)
        capacity.sent(f"a{started}", 0.0)
        started += 1
    assert started == capacity.new_call_cap == 13
    assert capacity.delay(0.5) == 0  # a B leg finds room at once
    assert capacity.new_call_delay(0.5) == pytest.approx(0.5)


def test_room_is_the_least_of_the_seconds_budget_the_sessions_and_new_calls_half() -> None:
    capacity = SwitchCapacity(0.1)
    capacity.learn_limits(sps=30, max_sessions=1000)  # 26 legs a second, 13 new calls, 900 sessions
    capacity.learn_status("0 session(s) - peak 0, last 5min 0\n")
    assert capacity.room(0.0) == 13  # new calls' half of the second
    for n in range(5):
        capacity.reserve_new_call(f"a{n}", 0.0)
        capacity.sent(f"a{n}", 0.0)
        capacity.created(f"a{n}", 0.01)
    assert capacity.room(0.1) == 8
    for n in range(18):  # B legs of calls in progress spend the second's budget too
        capacity.reserve(f"b{n}", 0.2)
        capacity.sent(f"b{n}", 0.2)
        capacity.created(f"b{n}", 0.21)
    assert capacity.room(0.3) == 26 - 23
    capacity.reserve("c", 0.3)  # a leg given room and not yet sent counts as sent now
    assert capacity.room(0.3) == 26 - 24
    capacity.cancel("c")
    assert capacity.room(1.25) == 13  # a second later the window is empty again
    capacity.learn_status("895 session(s) - peak 900, last 5min 895\n")
    assert capacity.room(1.25) == 900 - 895  # the sessions bind now
    capacity.learn_status("950 session(s) - peak 950, last 5min 950\n")
    assert capacity.room(1.25) < 0 and capacity.new_call_delay(1.25) > 0


def test_a_switch_that_admits_nothing_makes_new_calls_wait_and_leaves_the_others_open() -> None:
    """``fsctl sps 1`` (a budget of nothing once one second's margin is kept): new calls wait there, and a
    second switch still takes them; neither look raises (it ran in every dispatcher tick)."""
    closed = SwitchCapacity(0.1)
    closed.learn_limits(sps=1, max_sessions=1000)
    assert closed.rate_cap == 0 and closed.new_call_delay(100.0) >= 1.0
    open_ = SwitchCapacity(0.1)
    open_.learn_limits(sps=30, max_sessions=1000)
    links = [SimpleNamespace(ready=True, capacity=closed, name="closed"),
             SimpleNamespace(ready=True, capacity=open_, name="open")]
    assert choose_switch(links, 100.0) == (links[1], 0.0)  # type: ignore[arg-type]
    assert room_for_new_calls(links, 100.0)[0] > 0  # type: ignore[arg-type]
    assert choose_switch(links[:1], 100.0)[0] is None  # type: ignore[arg-type]
