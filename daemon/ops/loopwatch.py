"""Says when something held the event loop: while one greenlet runs without yielding, no call event is
read and no command is sent, so every call in progress waits (a probe after A's answer, a bridge to B).

gevent's monitor thread looks every ``loop_block_warning`` seconds whether the loop switched greenlets
since its last look; when it did not, the greenlet that held it is reported. Each report is logged on
the loop (``loop.blocked``, where the greenlet was: its innermost frames of this project's code) and
counted (``callbridge_loop_blocked_total``). A block is noticed once it lasted between one and two
periods; one C call that keeps the interpreter throughout (a pass of the garbage collector) is not, since
the monitor thread needs the interpreter to look (daemon/ops/heap.py keeps those short). The monitor
thread itself touches neither logging nor gevent (their locks are the loop's): it queues the report and
wakes the loop through a thread-safe watcher. This is how a tick of the lease keeper that held the loop
for milliseconds with 2,000 calls bridged was found (the scale bench).
"""

from __future__ import annotations

import collections
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import gevent
from gevent._monitor import MonitorWarning
from gevent.events import EventLoopBlocked, subscribers

from daemon.ops.logs import log_event
from daemon.ops.metrics import Metrics

log = logging.getLogger("callbridge.loop")

ROOT = Path(__file__).resolve().parents[2]
FRAME = re.compile(r'^\s*File "(?P<path>[^"]+)", line (?P<line>\d+), in (?P<function>\S+)')
SHOWN_FRAMES = 4


def where_blocked(report: list[str], root: Path = ROOT) -> str:
    """The blocked greenlet's innermost frames in ``report`` (gevent's lines), innermost first: those of
    this project's code when it has any there (``daemon/calls/leases.py:170 take_over``), else any."""
    lines = "\n".join(report).splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Blocked Stack")), None)
    if start is None:
        return "unknown"
    frames = []
    for line in lines[start + 1:]:
        if not line.startswith(" "):
            break  # the report's next section
        found = FRAME.match(line)
        if found:
            frames.append((Path(found["path"]), found["line"], found["function"]))
    ours = [(path.relative_to(root), line, function) for path, line, function in frames
            if path.is_relative_to(root) and ".venv" not in path.parts]
    shown = (ours or frames)[-SHOWN_FRAMES:]
    return " < ".join(f"{path}:{line} {function}" for path, line, function in reversed(shown)) or "unknown"


class LoopWatch:
    """gevent's monitor thread on this process's loop, its reports logged and counted (see the module)."""

    def __init__(self, threshold: float, metrics: Metrics) -> None:
        self.threshold = threshold  # seconds; 0: no watch
        self.metrics = metrics
        self._blocked: collections.deque[str] = collections.deque()
        self._hub: Any = None
        self._wake: Any = None
        self._config: tuple[Any, Any, Any] | None = None  # gevent's, as they were before start()

    def start(self) -> None:
        if self.threshold <= 0 or self._hub is not None:
            return
        config = gevent.config
        self._config = (config.monitor_thread, config.max_blocking_time, config.print_blocking_reports)
        gevent.config.monitor_thread = True
        gevent.config.max_blocking_time = self.threshold
        gevent.config.print_blocking_reports = False  # (a dump of every thread's stack to stderr)
        self._hub = gevent.get_hub()
        self._wake = self._hub.loop.async_()
        self._wake.start(self._report)
        subscribers.append(self._heard)
        with warnings.catch_warnings():  # its memory watch, unused here, asks for psutil
            warnings.simplefilter("ignore", MonitorWarning)
            self._hub.start_periodic_monitoring_thread()

    def stop(self) -> None:
        if self._hub is None:
            return
        if self._heard in subscribers:
            subscribers.remove(self._heard)
        monitor = self._hub.periodic_monitoring_thread
        if monitor is not None:
            monitor.kill()
            self._hub.periodic_monitoring_thread = None
        self._wake.stop()
        self._wake.close()
        self._hub = self._wake = None
        if self._config is not None:  # (a hub started later, a thread's, would start a monitor of its own)
            config = gevent.config
            config.monitor_thread, config.max_blocking_time, config.print_blocking_reports = self._config

    def _heard(self, event: object) -> None:  # in the monitor thread: no logging, no gevent but the wake-up
        if isinstance(event, EventLoopBlocked) and event.hub is self._hub and self._wake is not None:
            self._blocked.append(where_blocked(event.info))
            self._wake.send()

    def _report(self) -> None:  # on the loop
        while self._blocked:
            where = self._blocked.popleft()
            self.metrics.loop_blocked.inc()
            log_event(log, "loop.blocked", logging.WARNING, over_ms=round(self.threshold * 1000), where=where,
                      note="no call event was read and no command sent meanwhile")
