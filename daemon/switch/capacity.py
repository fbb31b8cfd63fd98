"""What the switch allows, what it is doing, and which leg may ask it for a session now.

FreeSWITCH creates a *session* for every leg: A's originate and the bridge's B alike. It admits a new
one only while two limits hold (``switch_core_session_request_uuid``): a per-second budget
(``sessions-per-second``, 30 by default, refilled once a second on its own tick; the budget is spent
before it is checked, so a limit of N admits N - 1 a tick, and a refused request spends it too) and
``max-sessions`` at once (1000). Past either, the leg is refused before anything is dialed:
``-ERR DESTINATION_OUT_OF_ORDER`` and no CHANNEL_CREATE for its UUID (shared/esl-traces/17 shows it
for the rate; for max-sessions it follows from the same refusal in ``switch_core_session_request_uuid``
and ``sofia_outgoing_channel``: trace 17b shows only a far end over the limit, the gateway's leg created
and ended NORMAL_TEMPORARY_FAILURE, a carrier-like failure).

What the daemon knows, and from where:

* the limits: ``fsctl sps`` and ``fsctl max_sessions`` (read-only: no value given) on every connection,
  then ``status`` every ``switch_status_interval`` seconds (its lines carry both limits and the sessions
  now), and the ``Max-Sessions`` / ``Session-Count`` of each HEARTBEAT;
* the sessions now: the last ``status`` (or HEARTBEAT), plus the CHANNEL_CREATE and minus the
  CHANNEL_HANGUP_COMPLETE of *all* channels since (other traffic on the switch shares its limits);
* the rate: a log of the creations of the last second. A leg this daemon sends is entered when it is
  sent, under its UUID (so its own CHANNEL_CREATE is not counted again); anyone else's when its
  CHANNEL_CREATE arrives. Between the moment a leg is given room (*reserved*) and the moment it is sent
  (a claim to commit, a connection to get a turn on), it counts as being sent *now*, at every look. On
  a new connection nothing of the switch's current second was heard: as many creations as ``status``
  reports for its last second are counted as made then.

The rule: a leg may be sent when the creations of the last second, with it, number at most
``floor((sps - 1) * (1 - margin))`` (at least 1) and the sessions now, the legs sent but not yet created
and it stay at most ``floor(max_sessions * (1 - margin))``. Every send is checked against the second
before it, so *any* one-second span holds at most that many of ours: whatever the phase of the
switch's own tick, which a client cannot see. The margin absorbs the time between our send and the
switch's admission, and traffic we hear about late. A refusal despite all this (someone else spent the
budget, or the limit was lowered under us) blocks new legs for a second (the budget is gone until the
switch's next tick) and asks for a fresh ``status``.

Legs of calls already in progress (a B waiting while A hears the dialtone, an A to dial again after a
refusal) wait in line here and are served, in order, before any new call starts. New calls take at
most half of each second's room: a call that is answered needs a second session for B a few seconds
later, and B should find room then rather than wait behind a burst of new calls while A listens.

All times are ``time.monotonic()`` seconds: the switch's tick is real time whatever else runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("callbridge.capacity")

WINDOW = 1.0  # seconds: the switch refills its budget once a second
REFUSAL_BLOCK = 1.0  # seconds no leg is sent after a refusal: the budget is gone until the next tick
DEFAULT_SPS = 30  # switch.conf.xml's defaults, used until the switch has said otherwise
DEFAULT_MAX_SESSIONS = 1000

_SPS_REPLY = re.compile(r"^\+OK sessions per second: (-?\d+)\s*$")
_MAX_REPLY = re.compile(r"^\+OK max sessions: (-?\d+)\s*$")
_STATUS_SESSIONS = re.compile(r"^(\d+) session\(s\) - peak \d+", re.M)
# The count is signed: after `fsctl sps N` below what was left of the old budget, the next tick's
# ``sps_last = sps_total - sps`` (switch_time.c) is negative for a second.
_STATUS_RATE = re.compile(r"^(-?\d+) session\(s\) per Sec out of max (\d+)", re.M)
_STATUS_MAX = re.compile(r"^(-?\d+) session\(s\) max$", re.M)


@dataclass(frozen=True)
class StatusFigures:
    """The session lines of ``api status``; a figure its text did not carry (or a negative count) is None."""

    sessions: int | None = None
    rate_last_second: int | None = None
    sps: int | None = None
    max_sessions: int | None = None


def parse_status(text: str) -> StatusFigures:
    """``N session(s) - peak P, ...``, ``N session(s) per Sec out of max M, ...``, ``N session(s) max``."""
    sessions = _STATUS_SESSIONS.search(text)
    rate = _STATUS_RATE.search(text)
    most = _STATUS_MAX.search(text)
    last = int(rate.group(1)) if rate else -1
    return StatusFigures(sessions=int(sessions.group(1)) if sessions else None,
                         rate_last_second=last if last >= 0 else None,
                         sps=int(rate.group(2)) if rate else None,
                         max_sessions=_uint32(int(most.group(1))) if most else None)


def parse_fsctl_sps(reply: str) -> int | None:
    """``+OK sessions per second: 30`` → 30; anything else → None."""
    m = _SPS_REPLY.match(reply.strip())
    return int(m.group(1)) if m else None


def parse_fsctl_max_sessions(reply: str) -> int | None:
    """``+OK max sessions: 1000`` → 1000 (FreeSWITCH prints the uint32 limit with %d); else None."""
    m = _MAX_REPLY.match(reply.strip())
    return _uint32(int(m.group(1))) if m else None


def _uint32(value: int) -> int:
    return value & 0xFFFFFFFF


@dataclass
class _Waiter:
    uuid: str
    leg: str
    not_before: float
    grant: Callable[[], None]


class SwitchCapacity:
    """The switch's session limits as last read, the sessions and creations since, and the line of legs
    waiting for room. Not thread-safe: it lives in the daemon's one gevent loop."""

    def __init__(self, margin: float = 0.1, *, on_change: Callable[[], None] | None = None) -> None:
        self.margin = margin
        self.on_change = on_change  # room may have appeared, or a leg joined the line: serve again
        self.sps: int | None = None  # sessions-per-second as the switch said it
        self.max_sessions: int | None = None
        self.known = False  # the switch has told us its limits since the last (re)connection
        self._base_sessions = 0  # sessions at the last status / heartbeat
        self._delta = 0  # creations minus hangups since then
        self._log: deque[float] = deque()  # creation times of the last second (ours when sent)
        self._reserved: set[str] = set()  # our legs given room, not yet sent: they count as now
        self._sent: dict[str, float] = {}  # our legs sent, not yet created nor refused: uuid -> when
        self._new_calls: deque[float] = deque()  # when new calls were given room, the last second
        self._blocked_until = 0.0
        self._waiters: list[_Waiter] = []
        self.refresh_wanted = False  # a refusal came: read `status` again soon
        self.throttled: dict[str, int] = {"a": 0, "b": 0}

    # -- what the switch says ---------------------------------------------------------------------
    def learn_limits(self, *, sps: int | None = None, max_sessions: int | None = None) -> None:
        if sps is not None and sps > 0:
            if sps != self.sps and self.sps is not None:
                log.info("the switch's sessions-per-second changed from %s to %s", self.sps, sps)
            self.sps = sps
        if max_sessions is not None and max_sessions > 0:
            self.max_sessions = max_sessions
        self.known = self.sps is not None and self.max_sessions is not None
        self._changed()

    def learn_status(self, text: str) -> StatusFigures:
        """Take in an ``api status`` answer: both limits and the sessions now."""
        figures = parse_status(text)
        self.learn_limits(sps=figures.sps, max_sessions=figures.max_sessions)
        if figures.sessions is not None:
            self._set_sessions(figures.sessions)
        return figures

    def learn_heartbeat(self, header: Callable[[str], str | None]) -> None:
        """A HEARTBEAT's ``Session-Count`` and ``Max-Sessions`` (``header(name)`` reads the event)."""
        with_max = _int(header("Max-Sessions"))
        if with_max:
            self.learn_limits(max_sessions=with_max)
        count = _int(header("Session-Count"))
        if count is not None:
            self._set_sessions(count)

    def assume_created(self, count: int, now: float) -> None:
        """Creations the daemon did not hear (a new connection: its own before a restart, anyone's before it
        subscribed), as many as the switch's last second had (``status``), counted as made ``now``: the
        budget of the switch's current second may already be spent by them."""
        self._prune(now)
        for _ in range(count - len(self._log)):
            self._log.append(now)

    def disconnected(self) -> None:
        """The figures are stale until the next connection reads them again; what was sent is settled by
        the calls' own reconciliation, not here."""
        self.known = False
        self._sent.clear()

    def _set_sessions(self, sessions: int) -> None:
        self._base_sessions = sessions
        self._delta = 0

    # -- what the switch does ---------------------------------------------------------------------
    def created(self, uuid: str, now: float) -> None:
        """A CHANNEL_CREATE (any channel on the switch)."""
        self._delta += 1
        if self._sent.pop(uuid, None) is None:
            self._reserved.discard(uuid)
            self._log.append(now)  # not ours (or not marked sent): counted when heard

    def gone(self, uuid: str) -> None:
        """A CHANNEL_HANGUP_COMPLETE (any channel): its session is on its way out."""
        self._delta -= 1
        if self._waiters:
            self._changed()  # room for a waiting leg held back by max sessions

    # -- figures --------------------------------------------------------------------------------
    @property
    def sessions(self) -> int:
        return max(0, self._base_sessions + self._delta)

    def rate(self, now: float) -> int:
        """Creations in the last second (ours from when they were sent)."""
        self._prune(now)
        return len(self._log)

    @property
    def pending(self) -> int:
        """Our legs given room or sent, not yet created: sessions on their way."""
        return len(self._reserved) + len(self._sent)

    @property
    def rate_cap(self) -> int:
        """How many legs may be created in any one second: the switch's N - 1, less the margin."""
        sps = self.sps or DEFAULT_SPS
        if sps <= 1:
            return 0  # the switch admits nothing
        return max(1, math.floor((sps - 1) * (1 - self.margin)))

    @property
    def new_call_cap(self) -> int:
        """New calls in any one second: half the room (each answered call needs a second session)."""
        return math.ceil(self.rate_cap / 2)

    @property
    def session_cap(self) -> int:
        """Sessions at once, less the margin; at least one, or a small switch would never get a call."""
        room = (self.max_sessions or DEFAULT_MAX_SESSIONS) * (1 - self.margin)
        return max(1, math.floor(room + 1e-9))  # 700 * (1 - 0.3) is 489.99... in floats

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def describe(self, now: float) -> dict[str, Any]:
        """For /readyz and logs."""
        return {"known": self.known, "sessions_per_second": self.sps, "max_sessions": self.max_sessions,
                "sessions": self.sessions, "rate_last_second": self.rate(now), "rate_cap": self.rate_cap,
                "session_cap": self.session_cap, "waiting": self.waiting}

    # -- pacing ---------------------------------------------------------------------------------
    def delay(self, now: float, *, extra: int = 0) -> float:
        """Seconds until one more leg (beyond ``extra`` others) may be sent; 0 when it may be now."""
        self._prune(now)
        wait = max(0.0, self._blocked_until - now)
        cap = self.rate_cap
        if cap <= 0:
            return max(wait, WINDOW)  # nothing can be created; look again later
        over = len(self._log) + len(self._reserved) + extra + 1 - cap
        if over > 0:
            # the entries that must leave the window first: the oldest `over` of them (reserved legs
            # count as now: they leave it only a second after they are sent)
            wait = max(wait, self._log[over - 1] + WINDOW - now if over <= len(self._log) else WINDOW)
        if self.sessions + self.pending + extra + 1 > self.session_cap:
            wait = max(wait, WINDOW)  # a hangup frees room; look again in a while (or when woken)
        return wait

    def reserve(self, uuid: str, now: float) -> None:
        """Give ``uuid`` room (the caller checked :meth:`delay` or was granted); :meth:`sent` when it goes."""
        self._prune(now)
        self._reserved.add(uuid)

    def sent(self, uuid: str, now: float) -> None:
        """The reserved leg is being sent now: from now on it counts from this moment."""
        self._reserved.discard(uuid)
        self._prune(now)
        self._log.append(now)
        self._sent[uuid] = now

    def cancel(self, uuid: str) -> None:
        """A reserved leg that was never sent after all (or whose send never left): its room goes back."""
        when = self._sent.pop(uuid, None)
        if when is not None:
            with contextlib.suppress(ValueError):  # already out of the window
                self._log.remove(when)
        elif uuid not in self._reserved:
            return
        self._reserved.discard(uuid)
        self._changed()

    def unreserve(self, uuid: str) -> None:
        """Room reserved for a leg that went under another reservation (granted twice): it goes back; what
        was sent stays counted."""
        if uuid in self._reserved:
            self._reserved.discard(uuid)
            self._changed()

    def refused(self, uuid: str, leg: str, now: float) -> None:
        """The switch refused the leg (nothing created): the budget it spent stays spent, no leg goes
        until its next tick, and its figures are read again."""
        self._sent.pop(uuid, None)
        self._reserved.discard(uuid)
        self._blocked_until = max(self._blocked_until, now + REFUSAL_BLOCK)
        self.refresh_wanted = True
        self.throttled[leg] = self.throttled.get(leg, 0) + 1
        self._changed()

    def failed(self, uuid: str) -> None:
        """A leg that will not be created after all (failed for another reason, its call ended)."""
        if self._sent.pop(uuid, None) is not None or uuid in self._reserved:
            self._reserved.discard(uuid)
            self._changed()

    # -- the line of legs of calls in progress ------------------------------------------------------
    def new_call_delay(self, now: float) -> float:
        """Seconds until a new call's A may be sent: the legs of calls in progress that may go now come
        first, and new calls keep to their half of the room."""
        ready = sum(1 for w in self._waiters if w.not_before <= now)
        wait = self.delay(now, extra=ready)
        edge = now - WINDOW
        while self._new_calls and self._new_calls[0] <= edge:
            self._new_calls.popleft()
        over = len(self._new_calls) + 1 - self.new_call_cap
        if over > len(self._new_calls):  # no room for new calls at all (a switch set to 1 session a second)
            return max(wait, WINDOW)
        if over > 0:
            wait = max(wait, self._new_calls[over - 1] + WINDOW - now)
        return wait

    def room(self, now: float) -> int:
        """How many more new calls this switch would take now: the least of the room left in this
        second's budget, in its sessions and in new calls' half of the second (the legs of calls in
        progress that may go now count as taken). Compares switches: a new call goes where it is largest."""
        self._prune(now)
        edge = now - WINDOW
        while self._new_calls and self._new_calls[0] <= edge:
            self._new_calls.popleft()
        ready = sum(1 for w in self._waiters if w.not_before <= now)
        return min(self.rate_cap - len(self._log) - len(self._reserved) - ready,
                   self.session_cap - self.sessions - self.pending - ready,
                   self.new_call_cap - len(self._new_calls))

    def reserve_new_call(self, uuid: str, now: float) -> None:
        """Give a new call's A room (the caller checked :meth:`new_call_delay`)."""
        self._new_calls.append(now)
        self.reserve(uuid, now)

    def request(self, uuid: str, leg: str, now: float, grant: Callable[[], None], *,
                not_before: float | None = None) -> bool:
        """A leg of a call in progress wants to be sent. True: it may go now (reserved); else it joins
        the line and ``grant()`` is called (from :meth:`serve`) when its turn comes."""
        start = now if not_before is None else not_before
        self.withdraw(uuid)  # its own place, if any (a retry not yet due): it goes now, or queues anew
        if start <= now and not any(w.not_before <= now for w in self._waiters) and self.delay(now) == 0:
            self.reserve(uuid, now)
            return True
        self._waiters.append(_Waiter(uuid, leg, start, grant))
        self._changed()
        return False

    def withdraw(self, uuid: str) -> None:
        """The leg no longer waits (its call ended)."""
        self._waiters = [w for w in self._waiters if w.uuid != uuid]

    def serve(self, now: float) -> float:
        """Grant the waiting legs whose turn it is, in order; seconds until worth serving again."""
        while True:
            ready = next((w for w in self._waiters if w.not_before <= now), None)
            if ready is None:
                break
            wait = self.delay(now)
            if wait > 0:
                return wait
            self._waiters.remove(ready)
            self.reserve(ready.uuid, now)
            ready.grant()
        if self._waiters:
            return max(0.0, min(w.not_before for w in self._waiters) - now)
        return math.inf

    # -- internals ------------------------------------------------------------------------------
    def _prune(self, now: float) -> None:
        edge = now - WINDOW
        while self._log and self._log[0] <= edge:
            self._log.popleft()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
