"""What held the event loop, logged (daemon/ops/loopwatch.py): gevent's monitor thread, its report read."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import gevent
import pytest

from daemon.ops.loopwatch import ROOT, LoopWatch, where_blocked
from daemon.ops.metrics import Metrics

REPORT = [
    "2026-12-02T20:51:26Z : Greenlet <Greenlet at 0x7f: Loop._run> appears to be blocked",
    "    Reported by <gevent._gevent_c_tracer.GreenletTracer object at 0x7f>",
    "Blocked Stack (for thread id 0x7f):",
    f'  File "{ROOT}/daemon/loop.py", line 92, in _run\n    delay = self.tick(self.clock())',
    f'  File "{ROOT}/daemon/calls/leases.py", line 94, in tick\n    self.take_over(now)',
    f'  File "{ROOT}/daemon/calls/leases.py", line 170, in take_over\n    for call in ...',
    f'  File "{ROOT}/daemon/calls/records.py", line 1037, in expired_leases\n    return list(...)',
    f'  File "{ROOT}/.venv/lib/python3.11/site-packages/peewee.py", line 8432, in __iter__\n    self.execute()',
    "",
    "Info:",
    f'  File "{ROOT}/daemon/service.py", line 1, in elsewhere',
]


def test_the_report_names_the_blocked_greenlets_innermost_frames_of_our_code_innermost_first() -> None:
    assert where_blocked(REPORT) == ("daemon/calls/records.py:1037 expired_leases < daemon/calls/leases.py:170 "
                                     "take_over < daemon/calls/leases.py:94 tick < daemon/loop.py:92 _run")
    theirs = [line.replace(str(ROOT), "/usr/lib/python3") for line in REPORT]
    assert where_blocked(theirs, root=Path("/nowhere")).startswith(
        "/usr/lib/python3/.venv/lib/python3.11/site-packages/peewee.py:8432 __iter__ < ")
    assert where_blocked(["no stack at all"]) == "unknown"


def hold_the_loop(watch: LoopWatch, deadline: float = 10.0) -> None:
    """Run without yielding until the monitor thread has seen it (at most ``deadline`` seconds)."""
    started = time.monotonic()
    while not watch._blocked and time.monotonic() - started < deadline:
        pass


def test_a_greenlet_holding_the_loop_is_logged_with_where_and_counted_and_stop_ends_the_watch(
        caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    watch = LoopWatch(0.05, metrics)
    before = (gevent.config.monitor_thread, gevent.config.max_blocking_time)
    caplog.set_level(logging.WARNING, logger="callbridge.loop")
    watch.start()
    try:
        gevent.spawn(hold_the_loop, watch).join()
        deadline = time.monotonic() + 10
        while not [r for r in caplog.records if r.getMessage() == "loop.blocked"] and time.monotonic() < deadline:
            gevent.sleep(0.01)
    finally:
        watch.stop()
    blocked = next(r for r in caplog.records if r.getMessage() == "loop.blocked")
    assert blocked.over_ms == 50  # type: ignore[attr-defined]
    assert blocked.where.startswith("tests/test_loopwatch.py:")  # type: ignore[attr-defined]
    assert " hold_the_loop" in blocked.where  # type: ignore[attr-defined]
    assert metrics.registry.get_sample_value("callbridge_loop_blocked_total") >= 1
    assert (gevent.config.monitor_thread, gevent.config.max_blocking_time) == before
    assert gevent.get_hub().periodic_monitoring_thread is None


def test_a_threshold_of_0_watches_nothing() -> None:
    watch = LoopWatch(0.0, Metrics())
    watch.start()
    assert gevent.get_hub().periodic_monitoring_thread is None
    watch.stop()
