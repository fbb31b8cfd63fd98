"""Who follows each call in flight when several daemons share one PostgreSQL: leases, renewal, takeover.

A claim writes the claiming daemon's instance id (``owner``) and a lease (``lease_until``, now +
``lease_seconds``) into the call (``CallRecords.claim``). While it runs, the daemon renews the lease of
every call it follows, one UPDATE every third of the lease. A daemon that dies (SIGKILL, power, network)
stops renewing; once a lease has run out, any other daemon's next look takes the call over: one
conditional UPDATE on the old owner and the expired lease, so exactly one daemon wins, and the winner
follows the call as a restart does (``Engine.adopt``: reconciled with the switch by its leg UUIDs, never
dialed twice; a call claimed but never sent is dialed). A daemon that finds it lost a call (it was stalled
past its lease and another took it) stops following it; until its next renewal tells it, a call's sequence
whose daemon renewed too late asks whether the call is still its own before acting on anything
(``CallRecords.lease_lapsed``), so the stalled daemon sends nothing the new owner sends too.

At start a daemon adopts only its own calls (a previous run under the same ``instance_id``, which no live
daemon holds: daemon/ops/instance.py, whose row each tick renews first) and expired ones
(``CallRecords.left_in_flight``); on SIGTERM it ends its leases at once, so another daemon takes its
calls over at its next look. With SQLite there is one daemon: it adopts every call in flight at start,
and the lease only lets it pick up a call its own sequence gave up on (a store outage) without a restart.

Leases are kept in the database server's time, not the hosts': each renewal of this daemon's instance
row also measures this host's clock against the server's (``Instance.clock_offset``, to half a round trip;
at start too), and every lease this daemon writes or judges is its own clock's time moved by that offset
(``CallRecords.store_time``). Two daemons whose clocks differ by a minute still agree on when a lease ran
out; judged by their own clocks, the one running ahead took the other's live calls over (and the other let
them go at its next renewal: nothing dialed twice, but calls changing hands for nothing). What is left
between two daemons, the clocks' drift within one renewal, is what the early lapse of a third of a lease
allows for. The rest of a daemon still runs by its own clock (a scheduled call starts when this host says
it is due), so a host more than ``CLOCK_TOLERANCE`` off the server logs ``clock.skew`` (once, until it is
back in step: then ``clock.in_step``), and ``/metrics`` shows the offset (``callbridge_clock_offset_seconds``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable

from daemon.calls.records import CallRecords
from daemon.config import Settings
from daemon.loop import Loop
from daemon.ops.instance import Instance
from daemon.ops.logs import log_event
from daemon.store import Call, utcnow
from daemon.switch.engine import Engine

log = logging.getLogger("callbridge.leases")

CLOCK_TOLERANCE = 2.0  # seconds off the database server's clock before a host's clock is said to be wrong


def new_instance_id() -> str:
    """A name for this daemon when none is configured: host name, pid and a random part."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:80] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class Leases:
    """Renews this daemon's leases and takes over calls whose daemon stopped renewing; a :class:`Loop`
    ticking every third of the lease."""

    def __init__(self, settings: Settings, engine: Engine, records: CallRecords,
                 clock: Callable[[], dt.datetime] = utcnow, *, instance: Instance | None = None,
                 on_instance_lost: Callable[[], None] = lambda: None) -> None:
        self.engine = engine
        self.records = records
        self.instance = instance
        self.on_instance_lost = on_instance_lost
        self.period = settings.lease_seconds / 3
        self.originate_timeout = settings.originate_timeout
        self._left_to_another: set[int] = set()  # calls logged as left to a daemon that has their switch
        self.lease = dt.timedelta(seconds=settings.lease_seconds)
        self._renewed_at: dt.datetime | None = None  # this daemon's last renewal that the store took
        self._no_takeover_until: dt.datetime | None = None
        self._clock_skewed = False  # clock.skew logged, clock.in_step not yet
        self.loop = Loop("call leases", self.tick, clock, log=log, first_delay=self.period,
                         error_delay=min(self.period, 1.0))

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def tick(self, now: dt.datetime) -> float:
        if self.hold_instance():
            self.follow_clock()
            self.renew(now)
            self._after_a_gap(now)
            if self._no_takeover_until is None or now >= self._no_takeover_until:
                self.take_over(now)
        return self.period

    def _after_a_gap(self, now: dt.datetime) -> None:
        """After renewals this daemon missed (the store unreachable, or this daemon stalled), the other
        daemons missed theirs too, most likely: a lease expired now says nothing about its daemon. Take
        nothing over for one lease, while they renew; the leases of a daemon that really died are still
        expired then. (Else whichever daemon reached the store first after an outage took the live ones'
        calls, and what those had heard of them meanwhile was lost.)"""
        previous, self._renewed_at = self._renewed_at, now
        if previous is not None and now - previous > self.lease * 2 / 3:
            self._no_takeover_until = now + self.lease
            self.records.metrics.leases.labels("held").inc()
            log_event(log, "lease.takeovers_held", logging.WARNING, gap_seconds=round((now - previous).total_seconds()),
                      until=self._no_takeover_until.isoformat() + "Z",
                      note="renewals were missed (store unreachable or this daemon stalled): the other daemons get "
                           "a lease's time to renew before any call of theirs is taken over")

    def follow_clock(self) -> None:
        """Keep the leases in the database server's time, as the instance's last renewal (or the start)
        measured it against this host's clock, and say when this host's clock is wrong."""
        offset = self.instance.clock_offset if self.instance is not None else None
        if offset is None:
            return
        self.records.clock_offset = dt.timedelta(seconds=offset)
        self.records.metrics.clock_offset.set(offset)
        skewed = abs(offset) > CLOCK_TOLERANCE
        if skewed and not self._clock_skewed:
            log_event(log, "clock.skew", logging.WARNING, offset_seconds=round(offset, 1),
                      tolerance_seconds=CLOCK_TOLERANCE,
                      note="the database server's clock minus this host's: the leases allow for it, but this daemon "
                           "starts scheduled calls and stamps their timelines by its own clock; keep every node and "
                           "the database server in step (NTP)")
        elif self._clock_skewed and not skewed:
            log_event(log, "clock.in_step", offset_seconds=round(offset, 1))
        self._clock_skewed = skewed

    def hold_instance(self) -> bool:
        """Renew this daemon's hold on its instance_id (daemon/ops/instance.py). False once another daemon
        took the instance_id over: the call leases under that name are the other daemon's now, so every call
        is let go (once) and the service is told to stop."""
        if self.instance is None:
            return True
        if self.instance.lost:
            return False
        if self.instance.renew():
            return True
        log_event(log, "instance.lost", logging.ERROR, instance=self.instance.instance_id,
                  calls=len(self.engine.active),
                  note="another daemon took this instance_id over (this one stalled past lease_seconds): "
                       "stopping, its calls left to that daemon")
        self.engine.let_go(list(self.engine.active), note="another daemon took this daemon's instance_id over")
        self.on_instance_lost()
        return False

    def renew(self, now: dt.datetime) -> int:
        """Renew the leases of the calls this daemon follows; let go of any another daemon took over.
        Returns how many were let go."""
        lost = self.records.renew_leases(list(self.engine.active), now=now)
        if lost:
            self.records.metrics.leases.labels("lost").inc(len(lost))
            log_event(log, "lease.lost", logging.WARNING, calls=len(lost),
                      note="another daemon took these calls over: this one stalled past their lease")
            self.engine.let_go(lost, note="another daemon took the call over (this one had not renewed its lease)")
        return len(lost)

    def take_over(self, now: dt.datetime) -> int:
        """Take over the calls whose lease expired (their daemon died) and follow them; returns how many.
        Only a call whose switch this daemon has and reaches now: a daemon that can reconcile it should
        have it. A call on a switch this daemon does not have (the daemons' settings differ) is left to one
        that has it, one on a switch this daemon cannot reach now to one that can. Once the call has
        outlived any call, no such daemon is running: it is taken over all the same, instead of staying in
        flight for ever (the engine ends it: its switch is not in the settings, or was unreachable)."""
        if not self.engine.ready:
            return 0
        taken = 0
        for call in self.records.expired_leases(now=now, exclude=set(self.engine.active)):
            link = self.engine.link_of(call)
            if not self._outlived(call, now):
                if link is None:
                    self._leave_to_another(call)
                    continue
                if not link.ready:
                    continue
            self._left_to_another.discard(call.id)
            previous, expired_at = call.owner, call.lease_until
            if not self.records.take_over(call, now=now):
                continue  # another daemon was quicker
            taken += 1
            note = (f"taken over from {previous}, whose lease ended at {expired_at.isoformat()}Z"
                    if previous and expired_at else "taken over: no daemon held it")
            self.engine.adopt(call, note=note)
        if taken:
            self.records.metrics.leases.labels("taken_over").inc(taken)
            log_event(log, "lease.taken_over", calls=taken)
        return taken

    def _outlived(self, call: Call, now: dt.datetime) -> bool:
        """No leg of the call can be up any more: both legs' rings and the endpoint's maximum duration
        (A's own hangup, set on A when it answers) have passed since its lease ran out."""
        now = self.records.store_time(now)  # (a lease is in the store's time; a start, close enough)
        expired_at = call.lease_until or call.started_at or now
        life = 2 * self.originate_timeout + call.endpoint.max_duration
        return now > expired_at + dt.timedelta(seconds=life)

    def _leave_to_another(self, call: Call) -> None:
        if call.id in self._left_to_another:
            return
        self._left_to_another.add(call.id)
        log_event(log, "lease.left_to_another", logging.WARNING, callid=call.callid, switch=call.switch,
                  note="the call's switch is not in this daemon's settings: a daemon that has it should take "
                       "the call over (give every daemon the same switches)")

    def release(self, call_ids: list[int], now: dt.datetime) -> None:
        """This daemon is stopping: end its leases on the calls it leaves to FreeSWITCH."""
        released = self.records.release_leases(call_ids, now=now)
        if released:
            self.records.metrics.leases.labels("released").inc(released)
            log_event(log, "lease.released", calls=released)
