"""The engine: holds the Event Socket connection and runs a ``CallSequence`` per call in flight.

* One connection at a time, made fresh after every drop (``EslConnection`` objects are single-use),
  reconnected with exponential backoff and jitter. A connection that goes quiet for longer than
  ``esl_heartbeat_timeout`` is probed with ``api status`` (bounded by the command timeout) and
  dropped if that fails, so a hung FreeSWITCH is noticed, not waited on. Both are the ticks of one
  :class:`daemon.loop.Loop` (the supervisor), which a drop wakes at once.
* Events are routed to their call by channel UUID or Job-UUID through one dict: O(1), and the reader
  only enqueues.
* After every (re)connection each call in flight is told, and asks FreeSWITCH what became of its
  legs; a new Core-UUID means FreeSWITCH restarted and its calls are gone.
* The switch's session limits are read on every connection (``fsctl sps``, ``fsctl max_sessions``,
  ``status``) and ``status`` again every ``switch_status_interval`` seconds; every CHANNEL_CREATE,
  CHANNEL_HANGUP_COMPLETE and HEARTBEAT feeds :class:`~daemon.switch.capacity.SwitchCapacity`, and a
  third :class:`daemon.loop.Loop` (the pacer) grants room to the legs of calls in progress waiting for it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

import gevent
import gevent.event
import gevent.lock

from daemon.calls.records import CallRecords
from daemon.calls.sequence import CallOptions, CallSequence, Reconnected, Stop
from daemon.config import Settings
from daemon.loop import Backoff, Loop
from daemon.ops.logs import log_event
from daemon.store import Call, CallStatus, Endpoint
from daemon.switch import commands as fs
from daemon.switch.capacity import SwitchCapacity, parse_fsctl_max_sessions, parse_fsctl_sps
from daemon.switch.esl import EslConnection, EslError, EslEvent, EslNotSent

log = logging.getLogger("callbridge.engine")

HELD_BACK_STATUS_INTERVAL = 1.0  # seconds between `status` reads while legs wait for room

EVENTS = (
    "CHANNEL_CREATE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
    "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE",
    "BACKGROUND_JOB", "HEARTBEAT",
)


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
        self.conn: EslConnection | None = None
        self.core_uuid: str | None = None
        self.connected = gevent.event.Event()
        self.routes: dict[str, CallSequence] = {}
        self.active: dict[int, CallSequence] = {}
        self.in_flight_by_endpoint: Counter[int] = Counter()
        self._running = False
        self._connected_before = False
        self.backoff = Backoff(0.2, settings.esl_reconnect_max_delay, rng=rng or random.Random())
        # Its clock is the one EslConnection stamps last_received with.
        self.supervisor = Loop("esl supervisor", self._supervise, time.monotonic, log=log)
        self.monotonic = time.monotonic  # the capacity's clock: the switch's budget refills in real seconds
        self.capacity = SwitchCapacity(settings.switch_session_margin, on_change=lambda: self.pacer.wake())
        self.pacer = Loop("switch pacer", self._pace, time.monotonic, log=log, error_delay=1.0)
        self._status_due = 0.0
        self._bind_metrics()

    # -- connection -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.connected.is_set()

    def start(self) -> None:
        self._running = True
        self.supervisor.start()
        self.pacer.start()

    def _connect(self) -> EslConnection:
        s = self.settings
        conn = EslConnection(s.esl_host, s.esl_port, s.esl_password, connect_timeout=s.esl_command_timeout,
                             command_timeout=s.esl_command_timeout, on_event=self._on_event,
                             on_disconnect=lambda _reason: self._on_disconnect(conn))
        conn.connect()
        try:
            conn.command(fs.event_subscription(EVENTS))
            core = conn.api(fs.core_uuid_query()).strip()
            self._read_limits(conn)
        except EslError:
            conn.close()
            raise
        restarted = self.core_uuid is not None and core != self.core_uuid
        self.core_uuid = core
        self.conn = conn
        self.connected.set()
        self.metrics.esl_connected.set(1)
        log_event(log, "esl.connected", host=s.esl_host, port=s.esl_port, core_uuid=core, restarted=restarted,
                  sessions_per_second=self.capacity.sps, max_sessions=self.capacity.max_sessions,
                  sessions=self.capacity.sessions)
        self.pacer.wake()
        for sequence in list(self.active.values()):
            sequence.deliver(Reconnected(restarted))
        return conn

    def _supervise(self, now: float) -> float:
        """One look at the connection: probe it when silent too long, note a drop, (re)connect; returns
        seconds until the next look (a drop wakes the supervisor at once)."""
        quiet = self.settings.esl_heartbeat_timeout
        conn = self.conn
        if conn is not None and conn.connected:
            if now - conn.last_received > quiet:
                try:
                    self.capacity.learn_status(conn.api(fs.core_status()))
                except EslError:
                    conn.close()  # a hung switch: drop it and reconnect
            return min(1.0, quiet / 4)
        if conn is not None:
            self.conn = None
            self.connected.clear()
            self.capacity.disconnected()
            self.metrics.esl_connected.set(0)
            if self._running:
                log_event(log, "esl.disconnected", logging.WARNING)
        if not self._running:
            return 1.0  # stopping: the loop will not tick again
        try:
            self._connect()
        except EslError as exc:
            delay = self.backoff.next()
            log_event(log, "esl.connect_failed", logging.WARNING, error=str(exc), retry_in=round(delay, 2))
            return delay
        if self._connected_before:
            self.metrics.esl_reconnects.inc()
        self._connected_before = True
        self.backoff.reset()
        return min(1.0, quiet / 4)

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
        figures = self.capacity.learn_status(conn.api(fs.core_status()))
        if sps is None or most is None or figures.sessions is None:
            log_event(log, "switch.limits_unknown", logging.WARNING, sps=sps, max_sessions=most,
                      note="FreeSWITCH's defaults (30 per second, 1000) are assumed until it says")
        self._status_due = time.monotonic() + self.settings.switch_status_interval

    def _pace(self, now: float) -> float:
        """The pacer: read `status` when due (or after a refusal), then let waiting legs go in order;
        returns seconds until worth looking again (woken sooner when something changes)."""
        capacity = self.capacity
        conn = self.conn
        if conn is not None and conn.connected and (now >= self._status_due or capacity.refresh_wanted):
            capacity.refresh_wanted = False
            # Legs held back (or a switch that admits nothing): look at least every second for room.
            interval = self.settings.switch_status_interval
            if capacity.waiting or capacity.rate_cap == 0:
                interval = min(interval, HELD_BACK_STATUS_INTERVAL)
            self._status_due = now + interval
            with contextlib.suppress(EslError):  # the supervisor deals with the connection
                capacity.learn_status(conn.api(fs.core_status()))
        if not self.ready:
            return max(0.0, self._status_due - now) if conn is not None else 1.0
        return min(capacity.serve(now), max(0.0, self._status_due - now))

    def switch_status(self) -> dict[str, Any]:
        """The switch's capacity as the daemon sees it (for /readyz)."""
        return self.capacity.describe(time.monotonic())

    def _bind_metrics(self) -> None:
        m, capacity = self.metrics, self.capacity
        m.switch_sps.set_function(lambda: capacity.sps or 0)
        m.switch_max_sessions.set_function(lambda: capacity.max_sessions or 0)
        m.switch_sessions.set_function(lambda: capacity.sessions)
        m.switch_session_rate.set_function(lambda: capacity.rate(time.monotonic()))
        m.switch_legs_waiting.set_function(lambda: capacity.waiting)

    # -- what sequences call ----------------------------------------------------------------------
    def _conn(self) -> EslConnection:
        conn = self.conn
        if conn is None or not conn.connected:
            raise EslNotSent("not connected to FreeSWITCH")
        return conn

    def api(self, command: str) -> str:
        return self._conn().api(command)

    def bgapi(self, command: str, job_uuid: str, before_send: Callable[[], None] | None = None) -> str:
        return self._conn().bgapi(command, job_uuid, before_send=before_send)

    def send_message(self, message: str) -> Any:
        return self._conn().send_message(message)

    def route(self, key: str, sequence: CallSequence) -> None:
        if key:
            self.routes[key] = sequence

    def unroute(self, key: str) -> None:
        self.routes.pop(key, None)

    # -- calls ------------------------------------------------------------------------------------
    def new_leg_uuids(self) -> tuple[str, str]:
        return str(uuidlib.uuid4()), str(uuidlib.uuid4())

    def launch(self, call: Call, endpoint: Endpoint, *, adopted: bool = False) -> CallSequence:
        """Run a claimed call (its leg UUIDs are already committed)."""
        sequence = CallSequence(call, endpoint, self, self.records, self.options, adopted=adopted,
                                on_end=self._ended)
        self.active[call.id] = sequence
        self.in_flight_by_endpoint[endpoint.id] += 1
        sequence.start()
        if adopted and self.ready:
            sequence.deliver(Reconnected(False))
        return sequence

    def adopt_in_flight(self) -> int:
        """At start: follow the calls a previous run left in flight (reconciled, never redialed). On a
        PostgreSQL shared with other daemons, only this daemon's own and those whose lease expired
        (``CallRecords.left_in_flight``)."""
        calls = self.records.left_in_flight(now=self.records.clock())
        for call in calls:
            self.adopt(call, note="found in flight at start")
        return len(calls)

    def adopt(self, call: Call, *, note: str) -> None:
        """Follow a call in flight that this run did not start (left by a previous run, or taken over from
        a daemon that died): reconciled by its leg UUIDs with the switch, never dialed twice; a call whose
        originate was never sent is dialed now (``_dial_unsent``)."""
        if call.id in self.active:
            return
        if call.status == CallStatus.DIALING_A.value and not self.records.originate_marked(call):
            self._dial_unsent(call)
            return
        self.records.step(call, "adopted", note=note)
        self.launch(call, call.endpoint, adopted=True)

    def let_go(self, call_ids: Collection[int], *, note: str) -> None:
        """Stop following these calls (another daemon owns them now); they go on in FreeSWITCH."""
        for call_id in call_ids:
            sequence = self.active.get(call_id)
            if sequence is not None:
                sequence.deliver(Stop(kind="let_go", note=note))

    def _dial_unsent(self, call: Call) -> None:
        """A call claimed by the previous run, which died before its originate had its turn to be sent:
        nothing reached FreeSWITCH, so it is dialed now, like a late start (missed beyond the grace)."""
        now = self.records.clock()
        if (now - call.due_at).total_seconds() > self.settings.schedule_grace:
            self.records.missed(call, now=now, grace=self.settings.schedule_grace)
            return
        self.records.step(call, "adopted", note="claimed but never sent to FreeSWITCH: dialing A now")
        # Its room is taken like a new call's; a few such calls at start may exceed the second's budget,
        # and a refusal is retried like any other (within originate_timeout).
        self.capacity.reserve_new_call(str(call.a_uuid), self.monotonic())
        self.launch(call, call.endpoint)

    def _ended(self, sequence: CallSequence) -> None:
        self.active.pop(sequence.call.id, None)
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
        self._running = False
        for sequence in list(self.active.values()):
            sequence.deliver(Stop())
        greenlets = [s.greenlet for s in self.active.values() if s.greenlet is not None]
        gevent.joinall(greenlets, timeout=timeout)
        # A sequence stuck on a command must not outlive the engine (and write to the next store).
        gevent.killall([g for g in greenlets if not g.dead], block=True, timeout=timeout)
        if self.conn is not None:
            self.conn.close()  # also releases a probe waiting for its answer
        self.supervisor.stop(timeout=min(timeout, 1.0))
        self.pacer.stop(timeout=min(timeout, 1.0))
        if self.conn is not None:
            self.conn.close()  # made by a connect that was under way
        self.connected.clear()
