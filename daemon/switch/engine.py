"""The engine: holds one :class:`~daemon.switch.link.SwitchLink` per switch (its Event Socket
connection, supervisor, capacity and pacer) and runs a ``CallSequence`` per call in flight.

* Every switch in ``settings.switch_addresses`` is connected to, each on its own; the engine is ready
  while at least one is.
* A new call goes to the switch with the most room for it now (:func:`choose_switch`); its A and its B
  (the bridge is an application on A) both live there, and the switch's name is committed with the claim
  (``call.switch``), so after a restart the call is adopted, and reconciled, on the switch that has it.
* A switch that drops tells only its own calls when it is back; one unreachable for
  ``switch_lost_after`` seconds ends its calls (failed, no leg blamed): none is ever dialed elsewhere.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from typing import Any

import gevent
from peewee import fn

from daemon.calls.records import CallRecords
from daemon.calls.sequence import CallOptions, CallSequence, Reconnected, Stop, SwitchLost
from daemon.config import Settings, switch_sent_to
from daemon.ops.logs import log_event
from daemon.store import Call, CallStatus, Endpoint
from daemon.switch.link import SwitchLink
from daemon.uuids import new_uuid

log = logging.getLogger("callbridge.engine")

NO_SWITCH_WAIT = 1.0  # seconds before asking again when no switch is reachable
# Calls started this long before their due time are not looked for among those a lost switch ended.
LATE_START_BOUND = dt.timedelta(days=1)


def _admitting(links: Sequence[SwitchLink], now: float) -> tuple[list[SwitchLink], float]:
    """The reachable switches that would take a new call now, and else the seconds until one may."""
    admitting: list[SwitchLink] = []
    wait = float("inf")
    for link in links:
        if not link.ready:
            continue
        delay = link.capacity.new_call_delay(now)
        if delay > 0:
            wait = min(wait, delay)
        else:
            admitting.append(link)
    return admitting, (0.0 if admitting else wait if wait != float("inf") else NO_SWITCH_WAIT)


def choose_switch(links: Sequence[SwitchLink], now: float) -> tuple[SwitchLink | None, float]:
    """The reachable switch with the most room for a new call now, or None and the seconds until one
    may have room. Room is what its capacity would still admit (:meth:`SwitchCapacity.room`); on equal
    room the one with fewer sessions, then the first listed."""
    admitting, wait = _admitting(links, now)
    if not admitting:
        return None, wait
    return max(admitting, key=lambda link: (link.capacity.room(now), -link.capacity.sessions)), 0.0


def room_for_new_calls(links: Sequence[SwitchLink], now: float) -> tuple[int, float]:
    """How many new calls the reachable switches would take now (a switch that admits one counts at least
    one), or 0 and the seconds until one may: the dispatcher reads no more due calls than that."""
    admitting, wait = _admitting(links, now)
    return sum(max(1, link.capacity.room(now)) for link in admitting), wait


class Engine:
    """Turns claimed calls into FreeSWITCH commands and follows them to their end."""

    def __init__(self, settings: Settings, records: CallRecords, *,
                 playable: Callable[[str], str] = lambda path: path,
                 on_call_end: Callable[[CallSequence], None] | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.records = records
        self.metrics = records.metrics
        self.on_call_end = on_call_end
        self.options = CallOptions(originate_timeout=settings.originate_timeout,
                                   media_root=str(settings.media_dir),
                                   recordings_dir=str(settings.recordings_dir),
                                   idle_check=max(settings.esl_heartbeat_timeout, 1.0),
                                   playable=playable, media_base_url=settings.media_base_url)
        self.active: dict[int, CallSequence] = {}
        self.in_flight_by_endpoint: Counter[int] = Counter()
        rng = rng or random.Random()
        self.links = [SwitchLink(address, settings, self.metrics, on_connected=self._switch_connected,
                                 on_lost=self._switch_lost, rng=rng)
                      for address in settings.switch_addresses]
        self.monotonic = time.monotonic  # the capacities' clock

    # -- the switches -----------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """At least one switch is connected: new calls can go somewhere."""
        return any(link.ready for link in self.links)

    def start(self) -> None:
        self._abandon_legs_of_lost_calls()
        for link in self.links:
            link.start()

    def _abandon_legs_of_lost_calls(self) -> None:
        """A previous run ended these calls because their switch stayed unreachable, and would have hung their
        legs up once it was back (``link.hang_up_later``): it did not live to. They are hung up at the first
        connection. Legs older than the longest maximum duration are gone by their own ``sched_hangup``."""
        longest = Endpoint.select(fn.MAX(Endpoint.max_duration)).scalar() or 0
        ended_after = self.records.clock() - dt.timedelta(seconds=longest + self.settings.originate_timeout)
        for call in self.records.ended_on_lost_switch(ended_after=ended_after,
                                                      due_after=ended_after - LATE_START_BOUND):
            link = self.link_of(call)
            if link is not None:
                link.hang_up_later(str(leg) for leg in (call.a_uuid, call.b_uuid) if leg)

    def pick_switch(self, now: float) -> tuple[SwitchLink | None, float]:
        return choose_switch(self.links, now)

    def room_for_new_calls(self, now: float) -> tuple[int, float]:
        return room_for_new_calls(self.links, now)

    def switch_status(self) -> dict[str, Any]:
        """Every switch as the daemon sees it, and which are not connected (for /readyz)."""
        now = time.monotonic()
        return {"switches": [link.describe(now) for link in self.links],
                "switches_not_ready": [link.name for link in self.links if not link.ready]}

    def _switch_connected(self, link: SwitchLink, restarted: bool) -> None:
        for sequence in list(link.sequences.values()):
            sequence.deliver(Reconnected(restarted))

    def _switch_lost(self, link: SwitchLink, seconds: float) -> None:
        for sequence in list(link.sequences.values()):
            self._tell_lost(link, sequence, seconds)

    @staticmethod
    def _tell_lost(link: SwitchLink, sequence: CallSequence, seconds: float) -> None:
        link.hang_up_later((sequence.a.uuid, sequence.b.uuid))
        sequence.deliver(SwitchLost(link.name, seconds))

    def link_of(self, call: Call) -> SwitchLink | None:
        """The switch a claimed call was sent to (:func:`daemon.config.switch_sent_to`)."""
        return switch_sent_to(self.links, call.switch)

    # -- calls ------------------------------------------------------------------------------------
    def new_leg_uuids(self) -> tuple[str, str]:
        return new_uuid(), new_uuid()

    def launch(self, call: Call, endpoint: Endpoint, *, adopted: bool = False, wait_for_room: bool = False,
               switch: SwitchLink | None = None) -> CallSequence:
        """Run a claimed call (its leg UUIDs and its switch are already committed) on ``switch``, or on
        the one named by the call; ``wait_for_room``: A's room was not reserved (see CallSequence)."""
        running = self.active.get(call.id)
        if running is not None:
            # Never two sequences for one call (each would dial A): a claim round that stalled past the
            # lease on PostgreSQL can find its call adopted by this daemon's own lease keeper meanwhile.
            log_event(log, "call.already_followed", logging.WARNING, callid=call.callid)
            return running
        link = switch or self.link_of(call)
        if link is None:
            raise ValueError(f"call {call.callid}: switch {call.switch!r} is not configured")
        sequence = CallSequence(call, endpoint, link, self.records, self.options, adopted=adopted,
                                wait_for_room=wait_for_room, on_end=self._ended)
        self.active[call.id] = sequence
        link.sequences[call.id] = sequence
        self.in_flight_by_endpoint[endpoint.id] += 1
        sequence.start()
        if link.lost:
            away = link.unreachable_for(self.monotonic())
            self._tell_lost(link, sequence, away or self.settings.switch_lost_after)
        elif adopted and link.ready:
            sequence.deliver(Reconnected(False))
        return sequence

    def adopt_in_flight(self) -> int:
        """At start: follow the calls a previous run left in flight (reconciled, never redialed), each on
        the switch it was sent to. On a PostgreSQL shared with other daemons, only this daemon's own and
        those whose lease expired (``CallRecords.left_in_flight``)."""
        calls = self.records.left_in_flight(now=self.records.clock())
        for call in calls:
            self.adopt(call, note="found in flight at start")
        return len(calls)

    def adopt(self, call: Call, *, note: str) -> None:
        """Follow a call in flight that this run did not start (left by a previous run, or taken over from
        a daemon that died) on the switch it was sent to: reconciled by its leg UUIDs, never dialed twice;
        a call whose originate was never sent is dialed now (``_dial_unsent``)."""
        if call.id in self.active:
            return
        link = self.link_of(call)
        if link is None:
            self.records.step(call, "adopted", note=note, switch=call.switch)
            self.records.finish(call, CallStatus.FAILED,
                                reason=f"the switch {call.switch} is not in this daemon's settings")
            return
        unsent = self.records.unsent_because(call) if call.status == CallStatus.DIALING_A.value else None
        if unsent is not None:
            self._dial_unsent(call, link, unsent)
            return
        self.records.step(call, "adopted", note=note, switch=link.name)
        self.launch(call, call.endpoint, adopted=True, switch=link)

    def let_go(self, call_ids: Collection[int], *, note: str) -> None:
        """Stop following these calls (another daemon owns them now); they go on in FreeSWITCH."""
        for call_id in call_ids:
            sequence = self.active.get(call_id)
            if sequence is not None:
                sequence.deliver(Stop(kind="let_go", note=note))

    def _dial_unsent(self, call: Call, link: SwitchLink, unsent: str) -> None:
        """A call claimed by the previous run, which died before its originate had its turn to be sent (or
        before sending it again after the switch refused it): nothing reached FreeSWITCH, so it is dialed
        now, like a late start (missed beyond the grace)."""
        now = self.records.clock()
        if self.records.past_grace(call.due_at, now=now, grace=self.settings.schedule_grace,
                                   claimed_at=call.started_at):
            self.records.missed(call, now=now, grace=self.settings.schedule_grace)
            return
        self.records.step(call, "adopted", note=f"claimed but {unsent}: dialing A now",
                          switch=link.name)
        # It waits for room in the switch's line, ahead of new calls, like a refused A's retry: a previous
        # run stopped under a busy switch may leave hundreds, and sent at once they would take the switch's
        # budget from everyone else on it (refused, and sent again).
        self.launch(call, call.endpoint, switch=link, wait_for_room=True)

    def _ended(self, sequence: CallSequence) -> None:
        self.active.pop(sequence.call.id, None)
        self.records.stopped_following(sequence.call)
        for link in self.links:
            link.sequences.pop(sequence.call.id, None)
        endpoint_id = sequence.endpoint.id
        self.in_flight_by_endpoint[endpoint_id] -= 1
        if self.in_flight_by_endpoint[endpoint_id] <= 0:
            del self.in_flight_by_endpoint[endpoint_id]
        if self.on_call_end:
            self.on_call_end(sequence)

    def in_flight(self) -> int:
        return len(self.active)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop following calls; they go on inside FreeSWITCH and are adopted at the next start."""
        for sequence in list(self.active.values()):
            sequence.deliver(Stop())
        greenlets = [s.greenlet for s in self.active.values() if s.greenlet is not None]
        gevent.joinall(greenlets, timeout=timeout)
        # A sequence stuck on a command must not outlive the engine (and write to the next store).
        gevent.killall([g for g in greenlets if not g.dead], block=True, timeout=timeout)
        for link in self.links:
            link.stop(timeout=min(timeout, 1.0))
