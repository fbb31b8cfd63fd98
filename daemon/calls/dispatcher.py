"""The dispatcher: starts each pending call when it is due, within the limits, exactly once.

A :class:`daemon.loop.Loop` runs :meth:`Dispatcher.tick` with ``now`` from an injected clock and sleeps
until the next call is due (or at most one second, so calls inserted by another process are noticed
within a second). The API and
the engine ``wake()`` it when a call is committed, canceled or ends. Each wake-up is two indexed
queries: the due calls in order, and the next due time.

Claiming is one conditional UPDATE committed before any command goes to FreeSWITCH (see
``CallRecords.claim``): a cancel racing a start leaves exactly one outcome, and a crash after the claim
leaves a call that the engine reconciles at the next start instead of dialing it again. Each page of due
calls is a claim round (``CallRecords.claim_round``): on SQLite the claims go to the store's writer
without waiting (``CallRecords.claim_soon``), so a tick's claims share one commit, and each call is
launched once its claim is committed (a call canceled meanwhile is not: its room goes back); on a
PostgreSQL shared with other daemons the page's rows are locked for this round (others skip them), the
claims commit together and launch after that commit. Either way the calls claimed but not yet launched
count against the limits like calls in flight.

Limits: calls in flight (global and per endpoint), a switch's room for one more session (its
sessions-per-second and max sessions, read from it: :mod:`daemon.switch.capacity`; the legs of calls
already in progress go first; with several switches, the one with the most room takes the call), new calls per second (per endpoint, and an optional global cap of the
operator's, token buckets), and a daily cap per endpoint against toll fraud. Calls held back by a
limit stay as they are (``queued``, or ``scheduled`` for a scheduled call) in due order and go as soon as a
slot frees; the calls of a disabled endpoint fail when due.

On a PostgreSQL shared by several daemons an endpoint's limits hold across all of them: each round locks
the rows of the endpoints its page of calls belongs to (``CallRecords.lock_endpoints``: two daemons'
rounds for one endpoint take turns) and reads the endpoint's calls in flight and started in its rate window
from the calls table, and its calls started today from the day's counter that each claim adds to
(``CallRecords.endpoint_load``), whichever daemon runs them.
``max_in_flight`` and ``calls_per_second`` of the settings stay this daemon's own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from daemon.calls.records import CallRecords, EndpointLoad
from daemon.config import Settings
from daemon.loop import Loop
from daemon.ops.logs import log_event
from daemon.store import Call, CallStatus, Endpoint, day_of, is_shared, utcnow
from daemon.switch.capacity import SwitchCapacity
from daemon.switch.engine import Engine
from daemon.switch.link import SwitchLink

log = logging.getLogger("callbridge.dispatcher")

BATCH = 500  # the largest page of due calls a tick reads at once
FIRST_PAGE = 8  # its first page: pages double from there
PAGE_SLACK = 2
MAX_SLEEP = 1.0
RECOVERY_PAGE = 50  # overdue calls marked missed per look at a start (one read, one commit)
HEARTBEAT_INTERVAL = 5.0  # seconds between the store's notes that a dispatcher runs (missed vs late)
DISABLED_REASON = "the endpoint was disabled before the call started"


def rate_window(calls_per_second: float) -> dt.timedelta:
    """The window an endpoint's calls per second are counted in across daemons: a second, or one call's
    share of time for rates below one a second."""
    return dt.timedelta(seconds=max(1.0, 1.0 / calls_per_second) if calls_per_second > 0 else 1.0)


@dataclass
class TokenBucket:
    """``rate`` starts per second with a burst of ``max(1, rate)``."""

    rate: float
    tokens: float = 0.0
    updated: float | None = None

    def available(self, now: float) -> int:
        """How many starts the bucket would allow at ``now``, none taken."""
        burst = max(1.0, self.rate)
        if self.updated is None:
            self.tokens = burst
        else:
            self.tokens = min(burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        return int(self.tokens)

    def take(self, now: float) -> bool:
        if self.available(now) >= 1:
            self.tokens -= 1.0
            return True
        return False

    def wait_time(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)


class Dispatcher:
    """Claims due calls and hands them to the engine."""

    def __init__(self, settings: Settings, engine: Engine, records: CallRecords,
                 clock: Callable[[], dt.datetime] = utcnow, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.engine = engine
        self.records = records
        self.clock = clock
        # For the rate limits' token buckets: never the wall clock (gevent's loop.now() is, under libev),
        # which NTP may step back and leave the buckets in debt for the length of the step.
        self.monotonic = monotonic
        self.loop = Loop("dispatcher tick", lambda now: self.tick(now, self.monotonic()), clock, log=log,
                         max_sleep=MAX_SLEEP, error_delay=MAX_SLEEP)
        # The operator's own cap on new calls per second, when set (0: the switch's pacing alone).
        self.global_rate = TokenBucket(settings.calls_per_second) if settings.calls_per_second > 0 else None
        self.endpoint_rates: dict[int, TokenBucket] = {}
        self.started_today: dict[int, int] = {}
        self._day: dt.date | None = None
        self._day_start = dt.datetime.min
        self._claimed: Counter[int] = Counter()  # per endpoint: claimed in this round, not launched yet
        # SQLite: claims submitted, not committed yet (per endpoint, and which calls: a tick skips them).
        self._claiming: Counter[int] = Counter()
        self._claiming_calls: set[int] = set()
        # A legs of calls claimed in this round, not launched yet, and the capacity their room was taken from.
        self._unlaunched: dict[str, SwitchCapacity] = {}
        self._next_beat: float | None = None
        self._missed_before: dt.datetime | None = None  # recovering: calls due before it are missed

    # -- control ----------------------------------------------------------------------------------
    def wake(self) -> None:
        """Something changed (a call committed, canceled or ended): look again now."""
        self.loop.wake()

    def start(self) -> None:
        # Whether the calls overdue now were missed is decided before this run's first heartbeat, and they
        # are marked a page at a time by the first ticks, which write no heartbeat until done: after a long
        # outage a backlog of scheduled calls holds neither the event loop nor the start (systemd's
        # TimeoutStartSec) for long, and a restart in the middle still finds them missed, not late.
        self._missed_before = self.records.missed_before(now=self.clock(), grace=self.settings.schedule_grace)
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    # -- start-up ---------------------------------------------------------------------------------
    def recover(self, now: dt.datetime) -> int:
        """Mark missed, at once, the calls whose time passed while no dispatcher ran (this daemon down, and
        on a shared store every other one too) for longer than the grace; the others start late. (A
        started dispatcher does it a page at a time: :meth:`start`.) Returns how many were missed."""
        self._missed_before = self.records.missed_before(now=now, grace=self.settings.schedule_grace)
        missed = 0
        while self._missed_before is not None:
            missed += self._recover_page(now)
        return missed

    def _recover_page(self, now: dt.datetime) -> int:
        """Mark missed the next page of calls due before ``_missed_before``; the last page ends recovery."""
        limit = self._missed_before
        assert limit is not None
        # A round of its own: on a shared PostgreSQL another daemon may be claiming these calls right now;
        # the rows it holds are skipped, and those marked here are held until the commit.
        with self.records.claim_round():
            page = self.records.overdue(limit, limit=RECOVERY_PAGE)
            for call in page:
                self.records.missed(call, now=now, grace=self.settings.schedule_grace, wait=False)
        self.records.flush()  # one commit for the page; the next page is read from what is committed
        if len(page) < RECOVERY_PAGE:
            self._missed_before = None
        return len(page)

    # -- each tick --------------------------------------------------------------------------------
    def tick(self, now: dt.datetime, mono: float) -> float:
        """Start what is due at ``now`` within the limits; return seconds until worth looking again."""
        if self._missed_before is not None:
            self._recover_page(now)
            return 0.0
        if self._next_beat is None or mono >= self._next_beat:
            self.records.beat(now)
            self._next_beat = mono + HEARTBEAT_INTERVAL
        if not self.engine.ready:
            return MAX_SLEEP
        self._roll_day(now)
        shared = is_shared()
        held_back: float | None = None
        skip: set[int] = set()  # endpoints at their limit this tick: their calls wait, others go
        after: tuple[dt.datetime, int] | None = None
        page_size = FIRST_PAGE
        while True:
            free = self.settings.max_in_flight - self._in_flight()
            if free <= 0:
                return MAX_SLEEP  # a call ending wakes us
            startable, room_wait = self.engine.room_for_new_calls(self.engine.monotonic())
            if startable <= 0:
                return room_wait  # no switch has room for another session yet: every call waits
            if self.global_rate is not None:
                startable = min(startable, self.global_rate.available(mono))
                if startable <= 0:
                    return self.global_rate.wait_time()  # the operator's cap: nothing starts before then
            # A page is read as model rows (tens of microseconds each, and a tick follows every create and
            # every call's end): no more than could start now, and two to spare for calls skipped (their
            # endpoint at its limit, which the next page leaves out). Pages start small and double: a long
            # queue of one endpoint at its own limit costs a tick a few of its rows, not all of them.
            limit = min(page_size, min(free, startable) + PAGE_SLACK)
            page_size = min(BATCH, page_size * 2)
            loads: dict[int, EndpointLoad] = {}  # shared store: the endpoints' load, read under this round's lock
            with self._claim_round():
                page = self.records.due(now, limit=limit, skip_endpoints=skip, after=after)
                if shared:
                    self.records.lock_endpoints({call.endpoint_id for call in page})
                for call in page:
                    if call.id in self._claiming_calls:
                        continue  # its claim is on its way to the disk
                    if not self.engine.ready:
                        return MAX_SLEEP
                    if self._in_flight() >= self.settings.max_in_flight:
                        return MAX_SLEEP
                    endpoint = call.endpoint
                    if endpoint.id in skip:
                        continue
                    if not endpoint.enabled:
                        # Disabling is the operator's stop: what it had scheduled or queued is not dialed.
                        self.records.finish(call, CallStatus.FAILED, reason=DISABLED_REASON)
                        continue
                    in_flight = self.engine.in_flight_by_endpoint[endpoint.id]
                    if shared:
                        load = loads.get(endpoint.id) or self._load(endpoint, now, loads)
                        in_flight = max(in_flight, load.in_flight)
                    if in_flight + self._claimed[endpoint.id] + self._claiming[endpoint.id] >= endpoint.max_in_flight:
                        skip.add(endpoint.id)
                        continue
                    if self.started_today.get(endpoint.id, 0) >= endpoint.daily_cap:
                        self.records.finish(call, CallStatus.FAILED,
                                            reason=f"daily cap of {endpoint.daily_cap} calls reached")
                        continue
                    if shared and (wait := self._shared_rate_wait(endpoint, loads[endpoint.id], now)) > 0:
                        held_back = wait if held_back is None else min(held_back, wait)
                        skip.add(endpoint.id)
                        continue
                    switch, room = self.engine.pick_switch(self.engine.monotonic())
                    if switch is None:
                        return room  # no switch has room for another session yet: every call waits
                    bucket = self.endpoint_rates.setdefault(endpoint.id, TokenBucket(endpoint.calls_per_second))
                    bucket.rate = endpoint.calls_per_second
                    if self.global_rate is not None and not self.global_rate.take(mono):
                        return self.global_rate.wait_time()
                    if not bucket.take(mono):
                        if self.global_rate is not None:
                            self.global_rate.tokens += 1  # not used after all
                        wait = bucket.wait_time()
                        held_back = wait if held_back is None else min(held_back, wait)
                        skip.add(endpoint.id)
                        continue
                    self._start(call, endpoint, switch)
            if len(page) < limit:
                break
            after = (page[-1].due_at, page[-1].id)
        nxt = self.records.next_due_at(now)
        # From the clock at the tick's end: the tick's claims took time the next call must not wait again.
        delay = MAX_SLEEP if nxt is None else max(0.0, (nxt - self.clock()).total_seconds())
        return min(delay, held_back) if held_back is not None else delay

    # -- limits across daemons (a shared PostgreSQL) ---------------------------------------------
    def _load(self, endpoint: Endpoint, now: dt.datetime, loads: dict[int, EndpointLoad]) -> EndpointLoad:
        """The endpoint's load across every daemon, read once per round under the round's lock on the
        endpoint's row (``CallRecords.lock_endpoints``): its daily count replaces this daemon's own."""
        load = self.records.endpoint_load(endpoint.id, day=self._day_start,
                                          window_start=now - rate_window(endpoint.calls_per_second))
        loads[endpoint.id] = load
        self.started_today[endpoint.id] = load.started_today
        return load

    def _shared_rate_wait(self, endpoint: Endpoint, load: EndpointLoad, now: dt.datetime) -> float:
        """Seconds until the endpoint may start another call by its calls per second counted across every
        daemon (0: now): at most ``rate`` starts (at least one) in any window of ``max(1, 1/rate)`` seconds.
        The calls this round claimed for it count too."""
        window = rate_window(endpoint.calls_per_second)
        allowed = max(1, int(endpoint.calls_per_second * window.total_seconds()))
        if load.started_recently + self._claimed[endpoint.id] < allowed:
            return 0.0
        if load.oldest_recent is None:
            return window.total_seconds()
        return max(0.01, (load.oldest_recent + window - now).total_seconds())

    def _in_flight(self) -> int:
        return self.engine.in_flight() + sum(self._claimed.values()) + sum(self._claiming.values())

    @contextlib.contextmanager
    def _claim_round(self) -> Iterator[None]:
        try:
            with self.records.claim_round():
                yield
        finally:
            # Whatever is left was claimed in a round that rolled back: never started, never launched.
            for endpoint_id, count in self._claimed.items():
                self.started_today[endpoint_id] = self.started_today.get(endpoint_id, 0) - count
            self._claimed.clear()
            for a_uuid, capacity in self._unlaunched.items():  # nor sent: their A's room goes back
                capacity.cancel(a_uuid)
            self._unlaunched.clear()

    def _start(self, call: Call, endpoint: Endpoint, switch: SwitchLink) -> None:
        a_uuid, b_uuid = self.engine.new_leg_uuids()
        capacity = switch.capacity
        # A's session is reserved before the claim's commit lets other greenlets run (and take the room).
        capacity.reserve_new_call(a_uuid, self.engine.monotonic())
        if not is_shared():
            self._claim_soon(call, endpoint, switch, a_uuid, b_uuid)
            return
        self._unlaunched[a_uuid] = capacity  # until launched: a claim that raises gives the room back too
        # Lateness is stamped at this call's own claim, not at the start of the tick; the switch is
        # committed with the claim, so a restart knows where to find the call.
        if not self.records.claim(call, a_uuid=a_uuid, b_uuid=b_uuid, now=self.clock(), switch=switch.name):
            self._unlaunched.pop(a_uuid, None)
            capacity.cancel(a_uuid)
            return  # canceled (or claimed elsewhere) in the meantime
        self.started_today[endpoint.id] = self.started_today.get(endpoint.id, 0) + 1
        self._claimed[endpoint.id] += 1

        def launch() -> None:  # once the claim is committed
            self._claimed[endpoint.id] -= 1
            self._unlaunched.pop(a_uuid, None)
            self._launch(call, endpoint, switch)

        self.records.after_claims(launch)

    def _launch(self, call: Call, endpoint: Endpoint, switch: SwitchLink) -> None:
        """Hand a committed claim to the engine (called from a commit's callback: never raises)."""
        try:
            self.engine.launch(call, endpoint, switch=switch)
        except Exception:
            log.exception("launch failed", extra={"callid": call.callid})

    def _claim_soon(self, call: Call, endpoint: Endpoint, switch: SwitchLink, a_uuid: str, b_uuid: str) -> None:
        """SQLite: submit the claim and go on; the call is launched once it is committed (see the module's
        docstring). Meanwhile it counts as in flight, against its endpoint's limits and with its A's room
        reserved, and the next ticks leave it be."""
        self.started_today[endpoint.id] = self.started_today.get(endpoint.id, 0) + 1
        self._claiming[endpoint.id] += 1
        self._claiming_calls.add(call.id)

        def done(claimed: bool) -> None:  # on the loop, once the claim is committed (or not)
            self._claiming[endpoint.id] -= 1
            if not self._claiming[endpoint.id]:
                del self._claiming[endpoint.id]
            self._claiming_calls.discard(call.id)
            if not claimed:  # canceled in the meantime: never started
                self.started_today[endpoint.id] = self.started_today.get(endpoint.id, 0) - 1
                switch.capacity.cancel(a_uuid)
                self.wake()  # its place may go to another call
                return
            self._launch(call, endpoint, switch)

        try:
            self.records.claim_soon(call, a_uuid=a_uuid, b_uuid=b_uuid, now=self.clock(), switch=switch.name,
                                    done=done)
        except Exception:
            if call.id in self._claiming_calls:  # not even queued (the writer stopped): nothing was claimed
                done(False)
            raise

    def _roll_day(self, now: dt.datetime) -> None:
        if self._day == now.date():
            return
        self._day = now.date()
        start = self._day_start = day_of(now)
        self.started_today = self.records.started_on(start)
        self.records.forget_days_before(start - dt.timedelta(days=1))  # yesterday's still counts a late clock's
        log_event(log, "dispatcher.day", day=str(self._day), endpoints=len(self.started_today))
