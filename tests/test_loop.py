"""The background loop primitive: ticks with the injected clock, sleeps what the tick says, is woken
early by wake(), stops promptly, survives a failing tick; and the reconnect backoff."""

from __future__ import annotations

import logging
import random
import sqlite3
from collections.abc import Sequence

import gevent
import gevent.event
import gevent.queue
import pytest
from peewee import OperationalError

from daemon.loop import Backoff, Loop
from tests.integration.conftest import wait_for

log = logging.getLogger("test.loop")
LONG = 3600.0  # a sleep no test may ever wait out


class Ticks:
    """A tick that reports each ``now`` it is given and returns ``delay``; it raises each of ``errors`` in
    turn first, and once more when ``fail_next`` is set."""

    def __init__(self, delay: float = LONG, errors: Sequence[Exception] = ()) -> None:
        self.delay = delay
        self.seen: gevent.queue.Queue = gevent.queue.Queue()
        self.fail_next = False
        self.errors = list(errors)

    def __call__(self, now: int) -> float:
        self.seen.put(now)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        if self.errors:
            raise self.errors.pop(0)
        return self.delay


class Clock:
    """Each reading is one more than the last, so a test sees which reading each tick got."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        self.now += 1
        return self.now


def test_ticks_with_the_injected_clock_and_wake_runs_it_again_at_once() -> None:
    ticks = Ticks(LONG)
    loop = Loop("test tick", ticks, Clock(), log=log)
    loop.start()
    try:
        assert ticks.seen.get(timeout=10) == 1
        loop.wake()  # without it the next tick would be an hour away
        assert ticks.seen.get(timeout=10) == 2
    finally:
        loop.stop()
    assert not loop.running


def test_the_tick_decides_the_sleep_within_max_sleep() -> None:
    ticks = Ticks(LONG)
    loop = Loop("test tick", ticks, Clock(), log=log, max_sleep=0.01)
    loop.start()
    try:
        for expected in (1, 2, 3):  # no wake(): max_sleep alone brings the next ticks
            assert ticks.seen.get(timeout=10) == expected
    finally:
        loop.stop()


def test_stop_interrupts_the_sleep_and_no_tick_follows() -> None:
    ticks = Ticks(LONG)
    loop = Loop("test tick", ticks, Clock(), log=log)
    loop.start()
    ticks.seen.get(timeout=10)
    with gevent.Timeout(10):  # an hour's sleep, interrupted
        loop.stop()
    loop.wake()
    gevent.sleep(0)
    assert ticks.seen.empty()


def test_a_started_loop_looks_once_even_if_stopped_at_once() -> None:
    ticks = Ticks(LONG)
    loop = Loop("test tick", ticks, Clock(), log=log)
    loop.start()
    loop.stop()
    assert ticks.seen.qsize() == 1


def test_a_first_delay_interrupted_by_stop_never_ticks() -> None:
    ticks = Ticks(LONG)
    loop = Loop("test tick", ticks, Clock(), log=log, first_delay=LONG)
    loop.start()
    gevent.sleep(0)
    with gevent.Timeout(10):
        loop.stop()
    assert ticks.seen.empty()


def test_a_failing_tick_is_logged_and_tried_again_after_the_error_delay(caplog: pytest.LogCaptureFixture) -> None:
    ticks = Ticks(LONG)
    ticks.fail_next = True
    loop = Loop("test tick", ticks, Clock(), log=log, error_delay=0.01)
    with caplog.at_level(logging.ERROR, logger="test.loop"):
        loop.start()
        try:
            assert ticks.seen.get(timeout=10) == 1
            assert ticks.seen.get(timeout=10) == 2  # the error delay, not the hour a good tick asks for
        finally:
            loop.stop()
    assert "test tick failed" in caplog.text


def test_a_store_outage_is_one_line_when_it_starts_and_one_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    """A database restart or a network cut fails every tick of every loop: a 7 KB traceback each second
    buried the one line that said what was wrong."""
    ticks = Ticks(LONG, errors=[OperationalError("connection failed: connection to server at \"127.0.0.1\", "
                                                 "port 5432 failed:\n\tConnection refused")] * 5)
    loop = Loop("test tick", ticks, Clock(), log=log, error_delay=0.001)
    with caplog.at_level(logging.INFO, logger="test.loop"):
        loop.start()
        try:
            for expected in range(1, 7):
                assert ticks.seen.get(timeout=10) == expected
            assert wait_for(lambda: any(r.getMessage() == "store.available_again" for r in caplog.records), 10)
        finally:
            loop.stop()
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [("ERROR", "store.unavailable"), ("INFO", "store.available_again")], lines
    down = caplog.records[0]
    assert down.exc_info is None and down.loop == "test tick"  # type: ignore[attr-defined]
    assert down.error == 'connection failed: connection to server at "127.0.0.1", port 5432 failed: ' \
        "Connection refused"  # type: ignore[attr-defined]


def test_a_statements_own_error_keeps_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Not every OperationalError is an outage: SQLite's "no such column" is a bug, and needs its stack."""
    ticks = Ticks(LONG, errors=[sqlite_error("no such column: nope", 1)])  # SQLITE_ERROR
    loop = Loop("test tick", ticks, Clock(), log=log, error_delay=0.001)
    with caplog.at_level(logging.INFO, logger="test.loop"):
        loop.start()
        try:
            assert [ticks.seen.get(timeout=10) for _ in range(2)] == [1, 2]  # logged, and the loop goes on
        finally:
            loop.stop()
    assert [r.getMessage() for r in caplog.records] == ["test tick failed"]
    assert caplog.records[0].exc_info is not None


def sqlite_error(message: str, code: int) -> OperationalError:
    """peewee's OperationalError around sqlite3's, with SQLite's result code, as the store raises it."""
    orig = sqlite3.OperationalError(message)
    orig.sqlite_errorcode = code  # type: ignore[attr-defined]
    error = OperationalError(message)
    error.orig = orig  # type: ignore[attr-defined]
    return error


def test_a_tick_stuck_past_the_stop_timeout_is_killed() -> None:
    entered = gevent.event.Event()

    def stuck(now: int) -> float:
        entered.set()
        gevent.sleep(LONG)  # stands for I/O that never answers
        return LONG

    loop = Loop("stuck tick", stuck, Clock(), log=log)
    loop.start()
    assert entered.wait(timeout=10)
    with gevent.Timeout(10):
        loop.stop(timeout=0.01)
    assert not loop.running


def test_a_loop_can_be_started_again_after_a_stop() -> None:
    ticks = Ticks(LONG)
    loop = Loop("test tick", ticks, Clock(), log=log)
    loop.start()
    ticks.seen.get(timeout=10)
    loop.stop()
    loop.start()
    try:
        assert ticks.seen.get(timeout=10) == 2
    finally:
        loop.stop()


def test_backoff_doubles_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(0.2, 1.0, jitter=(0.8, 1.2), rng=random.Random(7))
    delays = [backoff.next() for _ in range(5)]
    for delay, base in zip(delays, [0.2, 0.4, 0.8, 1.0, 1.0], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    assert len(set(delays)) == 5  # jittered: reconnecting daemons do not stampede in step
    backoff.reset()
    assert 0.16 <= backoff.next() <= 0.24
    same = Backoff(0.2, 1.0, rng=random.Random(7))
    assert [same.next() for _ in range(5)] == delays  # the randomness is injected


def test_backoff_stays_at_its_cap_through_a_long_outage() -> None:
    # The ESL supervisor retries every ~30 s while a switch is down: 1024 failures is under 9 hours.
    backoff = Backoff(0.2, 30.0, jitter=(1.0, 1.0))
    delays = [backoff.next() for _ in range(5000)]
    assert delays[-1] == 30.0
