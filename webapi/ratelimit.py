"""Slow down token guessing: per client address, at most N failed authentications a minute.

A sliding window in memory (this process is the only API server): each address keeps the times of
its recent failures. While an address is at its limit *every* request from it that needs a token is
answered 429 before the token is even looked at, so a guesser cannot learn from a 429-or-not answer
whether a guess was right. The table is bounded: the oldest addresses are forgotten first.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class AuthFailureLimiter:
    """Counts authentication failures per address in a sliding window of ``window`` seconds."""

    def __init__(self, per_window: int, window: float = 60.0, *, max_addresses: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_window = per_window
        self.window = window
        self.max_addresses = max_addresses
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None if it may try now. 0 per minute = no limit."""
        if self.per_window <= 0:
            return None
        now = self.clock()
        times = self._recent(address, now)
        if times is None or len(times) < self.per_window:
            return None
        # The window frees up when the oldest failure that keeps it full ages out.
        oldest = times[len(times) - self.per_window]
        return max(1, math.ceil(oldest + self.window - now))

    def fail(self, address: str) -> None:
        """Record one failed authentication from ``address``."""
        if self.per_window <= 0:
            return
        now = self.clock()
        times = self._recent(address, now)
        if times is None:
            times = self._failures[address] = deque(maxlen=self.per_window)
            while len(self._failures) > self.max_addresses:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(address)
        times.append(now)

    def forget(self, address: str) -> None:
        """Drop the failures recorded for ``address`` (a key: an address, or an account after a success)."""
        self._failures.pop(address, None)
