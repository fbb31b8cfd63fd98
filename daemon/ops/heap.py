"""CPython's cyclic garbage collector, kept off the calls' path.

A full pass of the collector stops the whole process while it visits every object it tracks: with 2,000
calls in progress (about 50 tracked objects each) a pass took 35-55 ms, and one came every few seconds
while calls were being set up or requests came in (each younger pass moves what is in flight to an older
generation, and the full pass follows once enough did). Every call's next command waited that long: one
probe of the scale bench waited 48.9 ms for its first command after A answered.

So what has survived ten seconds leaves the collector's sight (``gc.freeze``): later passes visit only what
came since, in a millisecond or two. Frozen objects are still freed as soon as nothing refers to them,
and the daemon makes no reference cycles on its busy paths (the API's creates are checked by a test;
calls end by reference counting), so freezing keeps nothing alive. A cycle that did form among frozen
objects is found by the full pass that runs once an hour (``gc.unfreeze``, ``gc.collect``), after which
the survivors are frozen again.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from daemon.ops.logs import log_event

log = logging.getLogger("callbridge.heap")

FREEZE_INTERVAL = 10.0  # seconds between freezes: what is not frozen stays a few seconds of growth
FULL_PASS_EVERY = 360  # freezes: one full pass an hour


class Heap:
    """The tick of the daemon's ``heap`` loop (see the module's docstring); the first tick is a full pass."""

    def __init__(self, full_pass_every: int = FULL_PASS_EVERY) -> None:
        self.full_pass_every = full_pass_every
        self.ticks = 0

    def tick(self, _now: Any = None) -> float:
        if self.ticks % self.full_pass_every == 0:
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            log_event(log, "heap.full_pass", unreachable=found,
                      ms=round(1000 * (time.perf_counter() - started), 1))
        else:
            gc.collect(1)  # the young garbage goes first: frozen, it would wait for the next full pass
        gc.freeze()
        self.ticks += 1
        return FREEZE_INTERVAL
