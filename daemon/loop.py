"""The one shape of every background job: ``tick(now)`` says how long until it is worth running again.

A :class:`Loop` runs its tick in a greenlet, sleeping in between on an Event that is also how it is
woken early (``wake()``: a call was committed, a webhook row added) and how it is stopped (``stop()``
sets a flag, then the Event). The clock is injected and ``now`` is passed to the tick, so tests drive
a tick with any time they like and never patch a clock. A tick that raises is logged and tried again
after ``error_delay`` (a store that cannot be reached, an expected outage, in one line when it starts,
every ``STORE_DOWN_LOG_INTERVAL`` while it lasts and when it ends; anything else with its traceback);
one that hangs in I/O past ``stop()``'s timeout is killed, so a stopped loop
never outlives its owner.

:class:`Backoff` is the doubling-with-jitter delay for retrying something that keeps failing (the
Event Socket connection); its randomness is injected too.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import gevent
import gevent.event
from peewee import OperationalError

from daemon.ops.logs import log_event, one_line
from daemon.writer import is_transient

T = TypeVar("T")

STORE_DOWN_LOG_INTERVAL = 60.0  # seconds between a loop's "store unavailable" lines during one outage


@dataclass(eq=False)
class Loop(Generic[T]):
    """Runs ``tick(clock())`` until stopped, sleeping what the tick returns (at most ``max_sleep``).

    The first tick runs as soon as the greenlet does (after ``first_delay`` if one is given), even if
    ``stop()`` came in between: a started loop has looked once. Later ticks run only while not stopped.
    """

    name: str  # in the log line of a failed tick: "<name> failed"
    tick: Callable[[T], float]
    clock: Callable[[], T]
    log: logging.Logger
    max_sleep: float = math.inf
    error_delay: float = 1.0
    first_delay: float = 0.0
    _wake: gevent.event.Event = field(default_factory=gevent.event.Event, init=False, repr=False)
    _stopping: bool = field(default=False, init=False, repr=False)
    _greenlet: gevent.Greenlet | None = field(default=None, init=False, repr=False)
    _store_down_since: float | None = field(default=None, init=False, repr=False)  # monotonic
    _store_down_logged: float = field(default=0.0, init=False, repr=False)

    @property
    def running(self) -> bool:
        return self._greenlet is not None and not self._greenlet.dead

    def start(self) -> None:
        """Start ticking in a greenlet (again after a stop; nothing happens if already running)."""
        if self.running:
            return
        self._stopping = False
        self._wake.clear()
        self._greenlet = gevent.spawn(self._run)

    def wake(self) -> None:
        """Something changed: tick again now instead of at the end of the sleep."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """No tick starts after this; a tick in progress gets ``timeout`` seconds, then is killed."""
        self._stopping = True
        self._wake.set()
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is None:
            return
        greenlet.join(timeout=timeout)
        if not greenlet.dead:
            greenlet.kill(block=True, timeout=max(timeout, 1.0))

    def _run(self) -> None:
        if self.first_delay and self._sleep(self.first_delay):
            return
        while True:
            self._wake.clear()
            try:
                delay = self.tick(self.clock())
            except Exception as exc:
                if isinstance(exc, OperationalError) and is_transient(exc):  # the store down, locked, full
                    self._store_unavailable(exc)
                else:  # a statement's own error (no such column) is a bug like any other: with its stack
                    self.log.exception("%s failed", self.name)
                delay = self.error_delay
            else:
                if self._store_down_since is not None:
                    log_event(self.log, "store.available_again", loop=self.name,
                              down_seconds=round(time.monotonic() - self._store_down_since, 1))
                    self._store_down_since = None
            if self._sleep(min(delay, self.max_sleep)):
                return

    def _store_unavailable(self, exc: OperationalError) -> None:
        """A tick the store refused (down, locked, full): one line, not a traceback each second."""
        now = time.monotonic()
        if self._store_down_since is None:
            self._store_down_since = now
        elif now - self._store_down_logged < STORE_DOWN_LOG_INTERVAL:
            return
        self._store_down_logged = now
        log_event(self.log, "store.unavailable", logging.ERROR, loop=self.name,
                  down_seconds=round(now - self._store_down_since, 1), error=one_line(exc),
                  note="retried; its work waits until the store answers")

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` or until woken; True when the loop is to stop."""
        if not self._stopping:
            self._wake.wait(timeout=max(0.0, seconds))
        return self._stopping


# One generator for every backoff's jitter: a Random of its own is 2.5 KB of state seeded from the kernel,
# and each call in progress has two backoffs (its legs' retries after a refusal).
JITTER = random.Random()


@dataclass(eq=False)
class Backoff:
    """Delays doubling from ``first`` up to ``cap``, each scaled by a random factor in ``jitter`` so that
    many clients retrying the same thing do not come back in step."""

    first: float
    cap: float
    jitter: tuple[float, float] = (0.8, 1.2)
    rng: random.Random = field(default_factory=lambda: JITTER)
    failures: int = 0  # in a row, for next()

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
        # Bounded doublings: 2**1024 does not fit a float, and 64 of them pass any cap long before.
        doublings = min(max(0, attempt - 1), 64)
        return min(self.cap, self.first * 2**doublings) * self.rng.uniform(*self.jitter)

    def next(self) -> float:
        """One more failure in a row: the delay before the next try."""
        self.failures += 1
        return self.delay(self.failures)

    def reset(self) -> None:
        """It worked: the next failure starts again from ``first``."""
        self.failures = 0
