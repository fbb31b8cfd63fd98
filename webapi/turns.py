"""HTTP work gives way to call control: the API and the calls share one event loop.

A request read from its socket does not run the app at once: it waits for a *turn*, which the loop gives
when it has nothing else ready (a libev idle watcher), :data:`PER_TURN` requests at a time. The call events
read meanwhile, and the sequences they woke, run first. A create takes a second turn once its call is
committed: one commit answers a whole group of requests at once, and their answers would otherwise run
back to back. Without turns, ten clients creating calls back to back kept the loop busy with their
requests for several milliseconds at a time, and an answered A waited that long for its next command
(scale bench: event reaction p99 5.5-11 ms; with both turns the daemon's own share of the worst probe
is under 1.5 ms).

Two requests per turn: their store writes then still share a commit (one at a time cost 6 % of the create
rate), and an event waits behind two requests' work at most, not three. Scale bench, 4 interleaved rounds,
reaction p99 while 10 clients create calls: 3.4-5.1 ms with two (creates 761-872/s), 4.2-11.9 ms with three
(587-794/s); one gave 4.0 and 8.9 ms (626-762/s). A request never waits more than :data:`MAX_WAIT` for its
turn, however busy the calls keep the loop: then it takes the turn anyway.
"""

from __future__ import annotations

import collections
import time
import weakref

from gevent.hub import Hub, Waiter, get_hub

PER_TURN = 2  # requests that start when the loop is idle, before it looks at its sockets again
MAX_WAIT = 0.02  # seconds: a request waiting this long gets its turn even if the loop never idles


class Turns:
    """The queue of requests waiting for the loop to be idle (one per hub)."""

    def __init__(self, hub: Hub, per_turn: int = PER_TURN, max_wait: float = MAX_WAIT) -> None:
        self.per_turn = per_turn
        self.max_wait = max_wait
        self._waiting: collections.deque[tuple[float, Waiter]] = collections.deque()
        self._idle = hub.loop.idle()
        self._overdue = hub.loop.timer(max_wait, max_wait)

    def take(self) -> None:
        """Return once the loop has run what else was ready (or after ``max_wait``)."""
        waiter = Waiter()
        entry = (time.monotonic(), waiter)
        self._waiting.append(entry)
        if not self._idle.active:
            self._idle.start(self._give, self.per_turn)
            self._overdue.start(self._give_overdue)
        try:
            waiter.get()
        except BaseException:
            if entry in self._waiting:  # killed while waiting (the server evicted the request)
                self._waiting.remove(entry)
            raise

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _give(self, count: int) -> None:  # in the hub
        while count > 0 and self._waiting:
            count -= 1
            self._waiting.popleft()[1].switch(None)
        if not self._waiting:
            self._idle.stop()
            self._overdue.stop()

    def _give_overdue(self) -> None:  # in the hub
        if self._waiting and time.monotonic() - self._waiting[0][0] >= self.max_wait:
            self._give(1)


_turns: weakref.WeakKeyDictionary[Hub, Turns] = weakref.WeakKeyDictionary()


def take_turn() -> None:
    """Wait for this thread's loop to give the calling request its turn (see the module's docstring)."""
    hub = get_hub()
    turns = _turns.get(hub)
    if turns is None:
        turns = _turns[hub] = Turns(hub)
    turns.take()
