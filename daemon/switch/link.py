"""One switch: its Event Socket connection, the supervisor that keeps it up, its capacity and pacer, the
calls on it, and how long it has been unreachable.

* One connection at a time, made fresh after every drop (``EslConnection`` objects are single-use),
  reconnected with exponential backoff and jitter. A connection that goes quiet for longer than
  ``esl_heartbeat_timeout`` is probed with ``api status`` (bounded by the command timeout) and
  dropped if that fails, so a hung FreeSWITCH is noticed, not waited on. Both are the ticks of one
  :class:`daemon.loop.Loop` (the supervisor), which a drop wakes at once.
* Events are routed to their call by channel UUID or Job-UUID through one dict: O(1), and the reader
  only enqueues.
* After every (re)connection each call on this switch is told, and asks FreeSWITCH what became of its
  legs; a new Core-UUID means FreeSWITCH restarted and its calls are gone.
* The switch's session limits are read on every connection (``fsctl sps``, ``fsctl max_sessions``,
  ``status``) and ``status`` again every ``switch_status_interval`` seconds; every CHANNEL_CREATE,
  CHANNEL_HANGUP_COMPLETE and HEARTBEAT feeds :class:`~daemon.switch.capacity.SwitchCapacity`, and a
  second :class:`daemon.loop.Loop` (the pacer) grants room to the legs of calls in progress waiting for it.
* A switch unreachable for ``switch_lost_after`` seconds (from the drop, or from the start when it was
  never reached) ends its calls in progress (:class:`~daemon.calls.sequence.SwitchLost`): they are never
  dialed elsewhere. Their legs are hung up if the switch comes back, since nobody follows them any more.

The link is the :class:`~daemon.calls.sequence.Switch` a call's sequence talks to.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import gevent.event

from daemon.config import Settings, SwitchAddress
from daemon.loop import Backoff, Loop
from daemon.ops.logs import log_event
from daemon.ops.metrics import Metrics
from daemon.switch import commands as fs
from daemon.switch.capacity import StatusFigures, SwitchCapacity, parse_fsctl_max_sessions, parse_fsctl_sps
from daemon.switch.esl import EslConnection, EslDisconnected, EslError, EslEvent, EslNotSent, EslTraffic

if TYPE_CHECKING:
    from daemon.calls.sequence import CallSequence

log = logging.getLogger("callbridge.engine")

HELD_BACK_STATUS_INTERVAL = 1.0  # seconds between `status` reads while legs wait for room

# Only what a call's sequence or the capacity count reads: each event is ~30 µs of reading and routing,
# and a bridged call would carry one more (CHANNEL_UNBRIDGE) that nothing reads.
EVENTS = (
    "CHANNEL_CREATE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
    "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "BACKGROUND_JOB", "HEARTBEAT",
)
# Apps whose CHANNEL_EXECUTE(_COMPLETE) nothing reads: A's park, and the multiset and sched_hangup queued
# first on it. Filtered out by the switch, they are 6 of a call's 20 events.
IGNORED_APPS = ("park", "multiset", "sched_hangup")


class SwitchLink:
    """One FreeSWITCH as the daemon sees it; ``name`` is its ``host:port`` (never the password)."""

    def __init__(self, address: SwitchAddress, settings: Settings, metrics: Metrics, *,
                 on_connected: Callable[[SwitchLink, bool], None],
                 on_lost: Callable[[SwitchLink, float], None],
                 rng: random.Random | None = None) -> None:
        self.address = address
        self.name = address.name
        self.settings = settings
        self.metrics = metrics
        self.on_connected = on_connected  # (link, restarted): tell its calls
        self.on_lost = on_lost  # (link, seconds unreachable): end its calls
        self.conn: EslConnection | None = None
        self.traffic = EslTraffic()  # every connection's messages, counted on
        self.core_uuid: str | None = None
        self.connected = gevent.event.Event()
        self.routes: dict[str, CallSequence] = {}
        self.sequences: dict[int, CallSequence] = {}  # the calls in progress on this switch, by call id
        self._running = False
        self._connected_before = False
        self.down_since: float | None = time.monotonic()  # unreachable since (None while connected)
        self.lost = False  # switch_lost_after passed in this outage: its calls were ended
        self.abandoned: set[str] = set()  # legs of calls ended while it was away: hung up when it is back
        self.backoff = Backoff(0.2, settings.esl_reconnect_max_delay, rng=rng or random.Random())
        # Its clock is the one EslConnection stamps last_received with.
        self.supervisor = Loop(f"esl supervisor {self.name}", self._supervise, time.monotonic, log=log)
        self.capacity = SwitchCapacity(settings.switch_session_margin, on_change=lambda: self.pacer.wake())
        self.pacer = Loop(f"switch pacer {self.name}", self._pace, time.monotonic, log=log, error_delay=1.0)
        self._status_read_at = -math.inf  # when `status` was last read (time.monotonic())
        self._bind_metrics()

    def monotonic(self) -> float:
        """The capacity's clock: the switch's budget refills in real seconds."""
        return time.monotonic()

    @property
    def ready(self) -> bool:
        return self.connected.is_set()

    def unreachable_for(self, now: float) -> float | None:
        return None if self.down_since is None else max(0.0, now - self.down_since)

    # -- the connection ---------------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self.down_since = time.monotonic()
        self.supervisor.start()
        self.pacer.start()

    def stop(self, timeout: float = 1.0) -> None:
        self._running = False
        if self.conn is not None:
            self.conn.close()  # also releases a probe waiting for its answer
        self.supervisor.stop(timeout=timeout)
        self.pacer.stop(timeout=timeout)
        if self.conn is not None:
            self.conn.close()  # made by a connect that was under way
        self.connected.clear()

    def _connect(self) -> EslConnection:
        s, address = self.settings, self.address
        conn = EslConnection(address.host, address.port, address.password,
                             connect_timeout=s.esl_command_timeout, command_timeout=s.esl_command_timeout,
                             on_event=self._on_event, on_disconnect=lambda _reason: self._on_disconnect(conn),
                             traffic=self.traffic)
        conn.connect()
        try:
            for line in fs.event_filters(EVENTS, ignored_apps=IGNORED_APPS):
                _expect_ok(conn.command(line), line)
            _expect_ok(conn.command(fs.event_subscription(EVENTS)), "event")
            core = conn.api(fs.core_uuid_query()).strip()
            self._read_limits(conn)
        except EslError:
            conn.close()
            raise
        if not conn.connected:
            # Gone after its last answer: its drop was heard before it was ours (_on_disconnect ignored it).
            raise EslDisconnected(f"{self.name} closed the connection while it was being set up")
        restarted = self.core_uuid is not None and core != self.core_uuid
        away = self.unreachable_for(time.monotonic())
        self.core_uuid = core
        self.conn = conn
        self.down_since = None
        self.lost = False
        self.connected.set()
        self.metrics.esl_connected.labels(self.name).set(1)
        was_away = round(away, 1) if self._connected_before and away is not None else None
        log_event(log, "esl.connected", switch=self.name, core_uuid=core, restarted=restarted,
                  sessions_per_second=self.capacity.sps, max_sessions=self.capacity.max_sessions,
                  sessions=self.capacity.sessions, was_away=was_away)
        self.pacer.wake()
        self._hang_up_abandoned(conn)
        self.on_connected(self, restarted)
        return conn

    def hang_up_later(self, legs: Iterable[str]) -> None:
        """Legs nobody follows any more (their calls ended while this switch was unreachable, or their
        sequence gave up on them and its kill did not get through): hung up as soon as a command does."""
        self.abandoned.update(legs)
        if self.ready:  # (else at the next connection: a wake now would cut the reconnect's backoff short)
            self.supervisor.wake()

    def _hang_up_abandoned(self, conn: EslConnection) -> None:
        """Kill the abandoned legs; those whose kill does not get through (the connection went, or it is
        so busy the kill found no turn) are tried again at the next look (_supervise) or connection."""
        for uuid in sorted(self.abandoned):
            try:
                reply = conn.api(fs.uuid_kill(uuid, "NORMAL_CLEARING"))
            except EslError:
                return
            self.abandoned.discard(uuid)
            if reply.startswith("+OK"):
                log_event(log, "switch.abandoned_leg_hung_up", logging.WARNING, switch=self.name, uuid=uuid)

    def _supervise(self, now: float) -> float:
        """One look at the connection: probe it when silent too long, note a drop, (re)connect, end the
        calls of a switch away too long; returns seconds until the next look (a drop wakes it at once)."""
        quiet = self.settings.esl_heartbeat_timeout
        conn = self.conn
        if conn is not None and conn.connected:
            if now - conn.last_received > quiet:
                try:
                    self._read_status(conn)
                except EslError:
                    conn.close()  # a hung switch: drop it and reconnect
            if self.abandoned and conn.connected:
                self._hang_up_abandoned(conn)
            return min(1.0, quiet / 4)
        if conn is not None:
            self.conn = None
            self.connected.clear()
            self.capacity.disconnected()
            self.metrics.esl_connected.labels(self.name).set(0)
            self.down_since = now
            if self._running:
                log_event(log, "esl.disconnected", logging.WARNING, switch=self.name)
        if not self._running:
            return 1.0  # stopping: the loop will not tick again
        try:
            self._connect()
        except EslError as exc:
            delay = self.backoff.next()
            log_event(log, "esl.connect_failed", logging.WARNING, switch=self.name, error=str(exc),
                      retry_in=round(delay, 2))
            return min(delay, self._check_lost(now))
        if self._connected_before:
            self.metrics.esl_reconnects.labels(self.name).inc()
        self._connected_before = True
        self.backoff.reset()
        return min(1.0, quiet / 4)

    def _check_lost(self, now: float) -> float:
        """Past ``switch_lost_after`` unreachable: end the calls on it, once an outage (a call adopted on it
        later in the same outage is ended at its launch). Returns seconds until worth checking again."""
        bound = self.settings.switch_lost_after
        away = self.unreachable_for(now)
        if bound <= 0 or away is None:
            return float("inf")
        if away < bound:
            return bound - away
        if not self.lost:
            self.lost = True
            log_event(log, "switch.lost", logging.ERROR, switch=self.name, unreachable_seconds=round(away),
                      calls=len(self.sequences))
            self.on_lost(self, away)
        return float("inf")

    def _on_disconnect(self, conn: EslConnection) -> None:
        """Runs in the connection's reader; a connection that never became ours (a failed attempt) is ignored."""
        if conn is self.conn:
            self.connected.clear()
            self.supervisor.wake()

    def _on_event(self, event: EslEvent) -> None:
        """Runs in the ESL reader: count sessions, route, never wait."""
        name = event.name
        if name == "CHANNEL_CREATE":
            self.capacity.created(event.uuid or "", time.monotonic())
        elif name == "CHANNEL_HANGUP_COMPLETE":
            self.capacity.gone(event.uuid or "")
        elif name == "HEARTBEAT":
            self.capacity.learn_heartbeat(event.get)
            return
        key = event.get("Job-UUID") if name == "BACKGROUND_JOB" else event.uuid
        if key:
            sequence = self.routes.get(key)
            if sequence is not None:
                sequence.deliver(event)

    # -- the switch's capacity ---------------------------------------------------------------------
    def _read_limits(self, conn: EslConnection) -> None:
        """On a new connection: the limits (read-only fsctl) and the sessions now (status)."""
        sps = parse_fsctl_sps(conn.api(fs.fsctl_read("sps")))
        most = parse_fsctl_max_sessions(conn.api(fs.fsctl_read("max_sessions")))
        self.capacity.learn_limits(sps=sps, max_sessions=most)
        figures = self._read_status(conn)
        self.capacity.assume_created(figures.rate_last_second or 0, time.monotonic())
        if sps is None or most is None or figures.sessions is None:
            log_event(log, "switch.limits_unknown", logging.WARNING, switch=self.name, sps=sps, max_sessions=most,
                      note="FreeSWITCH's defaults (30 per second, 1000) are assumed until it says")
        self._status_read_at = time.monotonic()

    def _read_status(self, conn: EslConnection) -> StatusFigures:
        """Read ``status``: its sessions are taken in by the reader as the reply is read, so that the
        CHANNEL_CREATE and HANGUP events framed after it adjust that count (taken in by this greenlet, after
        the reader went on, it would drop theirs until the next read: legs let through into a full switch)."""
        read: list[StatusFigures] = []
        conn.api(fs.core_status(), on_reply=lambda text: read.append(self.capacity.learn_status(text)))
        return read[0] if read else StatusFigures()

    def _status_due(self) -> float:
        """When `status` is next read: every switch_status_interval, and at least every second while legs
        are held back or the switch admits nothing (its limit may have been raised: room to find)."""
        interval = self.settings.switch_status_interval
        if self.capacity.waiting or self.capacity.rate_cap == 0:
            interval = min(interval, HELD_BACK_STATUS_INTERVAL)
        return self._status_read_at + interval

    def _pace(self, now: float) -> float:
        """The pacer: read `status` when due (or after a refusal), then let waiting legs go in order;
        returns seconds until worth looking again (woken sooner when something changes)."""
        capacity = self.capacity
        conn = self.conn
        if conn is not None and conn.connected and (now >= self._status_due() or capacity.refresh_wanted):
            capacity.refresh_wanted = False
            self._status_read_at = now
            with contextlib.suppress(EslError):  # the supervisor deals with the connection
                self._read_status(conn)
        if not self.ready:
            return max(0.0, self._status_due() - now) if conn is not None else 1.0
        return min(capacity.serve(now), max(0.0, self._status_due() - now))

    def describe(self, now: float) -> dict[str, Any]:
        """This switch as the daemon sees it (for /readyz): reachable or for how long not, and its capacity."""
        away = self.unreachable_for(now)
        return {"switch": self.name, "connected": self.ready,
                "unreachable_seconds": None if away is None else round(away, 1),
                "calls_in_progress": len(self.sequences), **self.capacity.describe(now)}

    def _bind_metrics(self) -> None:
        m, capacity, name = self.metrics, self.capacity, self.name
        m.esl_connected.labels(name).set(0)
        m.esl_reconnects.labels(name)
        m.switch_sps.labels(name).set_function(lambda: capacity.sps or 0)
        m.switch_max_sessions.labels(name).set_function(lambda: capacity.max_sessions or 0)
        m.switch_sessions.labels(name).set_function(lambda: capacity.sessions)
        m.switch_session_rate.labels(name).set_function(lambda: capacity.rate(time.monotonic()))
        m.switch_legs_waiting.labels(name).set_function(lambda: capacity.waiting)
        m.switch_calls.labels(name).set_function(lambda: len(self.sequences))
        m.watch_esl_traffic(name, self.traffic)

    # -- what sequences call ----------------------------------------------------------------------
    def _conn(self) -> EslConnection:
        conn = self.conn
        if conn is None or not conn.connected:
            raise EslNotSent(f"not connected to FreeSWITCH at {self.name}")
        return conn

    def api(self, command: str) -> str:
        return self._conn().api(command)

    def bgapi(self, command: str, job_uuid: str, before_send: Callable[[], None] | None = None) -> str:
        return self._conn().bgapi(command, job_uuid, before_send=before_send)

    def send_messages(self, messages: list[str]) -> list[Any]:
        return self._conn().send_messages(messages)

    def route(self, key: str, sequence: CallSequence) -> None:
        if key:
            self.routes[key] = sequence

    def unroute(self, key: str) -> None:
        self.routes.pop(key, None)


def _expect_ok(reply: str, what: str) -> None:
    """A set-up command the switch refused leaves the connection unfit (a missing positive filter would
    drop every event of its kind): it is dropped and made again."""
    if not reply.startswith("+OK"):
        raise EslError(f"{what}: {reply.strip()[:200] or 'no reply text'}")
