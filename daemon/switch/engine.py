"""The engine: holds the Event Socket connection and runs a ``CallSequence`` per call in flight.

* One connection at a time, made fresh after every drop (``EslConnection`` objects are single-use),
  reconnected with exponential backoff and jitter. A connection that goes quiet for longer than
  ``esl_heartbeat_timeout`` is probed with ``api status`` (bounded by the command timeout) and
  dropped if that fails, so a hung FreeSWITCH is noticed, not waited on.
* Events are routed to their call by channel UUID or Job-UUID through one dict: O(1), and the reader
  only enqueues.
* After every (re)connection each call in flight is told, and asks FreeSWITCH what became of its
  legs; a new Core-UUID means FreeSWITCH restarted and its calls are gone.
"""

from __future__ import annotations

import logging
import random
import time
import uuid as uuidlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.lock

from daemon.calls.journal import Journal
from daemon.calls.sequence import CallOptions, CallSequence, Reconnected, Stop, originate_marked
from daemon.config import Settings
from daemon.ops.logs import log_event
from daemon.store import IN_FLIGHT_STATUSES, Call, CallStatus, Endpoint
from daemon.switch import commands as fs
from daemon.switch.esl import EslConnection, EslError, EslEvent, EslNotSent

log = logging.getLogger("callbridge.engine")

EVENTS = (
    "CHANNEL_CREATE", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA", "CHANNEL_ANSWER", "CHANNEL_BRIDGE",
    "CHANNEL_UNBRIDGE", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE",
    "BACKGROUND_JOB", "HEARTBEAT",
)


class Engine:
    """Turns claimed calls into FreeSWITCH commands and follows them to their end."""

    def __init__(self, settings: Settings, journal: Journal, *,
                 playable: Callable[[str], str] = lambda path: path,
                 on_call_end: Callable[[CallSequence], None] | None = None) -> None:
        self.settings = settings
        self.journal = journal
        self.metrics = journal.metrics
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
        self._dropped = gevent.event.Event()
        self._supervisor: gevent.Greenlet | None = None

    # -- connection -------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.connected.is_set()

    def start(self) -> None:
        self._running = True
        self._supervisor = gevent.spawn(self._supervise)

    def _connect(self) -> EslConnection:
        s = self.settings
        conn = EslConnection(s.esl_host, s.esl_port, s.esl_password, connect_timeout=s.esl_command_timeout,
                             command_timeout=s.esl_command_timeout, on_event=self._on_event,
                             on_disconnect=self._on_disconnect)
        conn.connect()
        try:
            conn.command(fs.event_subscription(EVENTS))
            core = conn.api("global_getvar core_uuid").strip()
        except EslError:
            conn.close()
            raise
        restarted = self.core_uuid is not None and core != self.core_uuid
        self.core_uuid = core
        self.conn = conn
        self._dropped.clear()
        self.connected.set()
        self.metrics.esl_connected.set(1)
        log_event(log, "esl.connected", host=s.esl_host, port=s.esl_port, core_uuid=core, restarted=restarted)
        for sequence in list(self.active.values()):
            sequence.deliver(Reconnected(restarted))
        return conn

    def _supervise(self) -> None:
        delay = 0.2
        first = True
        while self._running:
            try:
                conn = self._connect()
            except EslError as exc:
                log_event(log, "esl.connect_failed", logging.WARNING, error=str(exc), retry_in=round(delay, 2))
                gevent.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.esl_reconnect_max_delay)
                continue
            if not first:
                self.metrics.esl_reconnects.inc()
            first = False
            delay = 0.2
            self._watch(conn)
            self.connected.clear()
            self.metrics.esl_connected.set(0)
            if self._running:
                log_event(log, "esl.disconnected", logging.WARNING)

    def _watch(self, conn: EslConnection) -> None:
        """Return when the connection is gone; probe it when it has been silent too long."""
        quiet = self.settings.esl_heartbeat_timeout
        while self._running and conn.connected:
            self._dropped.wait(timeout=min(1.0, quiet / 4))
            if conn.connected and time.monotonic() - conn.last_received > quiet:
                try:
                    conn.api("status")
                except EslError:
                    conn.close()

    def _on_disconnect(self, exc: BaseException | None) -> None:
        self.connected.clear()
        self._dropped.set()

    def _on_event(self, event: EslEvent) -> None:
        """Runs in the ESL reader: route, never wait."""
        key = event.get("Job-UUID") if event.name == "BACKGROUND_JOB" else event.uuid
        if key:
            sequence = self.routes.get(key)
            if sequence is not None:
                sequence.deliver(event)

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
        sequence = CallSequence(call, endpoint, self, self.journal, self.options, adopted=adopted,
                                on_end=self._ended)
        self.active[call.id] = sequence
        self.in_flight_by_endpoint[endpoint.id] += 1
        sequence.start()
        if adopted and self.ready:
            sequence.deliver(Reconnected(False))
        return sequence

    def adopt_in_flight(self) -> int:
        """At start: follow the calls a previous run left in flight (reconciled, never redialed)."""
        calls = list(Call.select(Call, Endpoint).join(Endpoint)
                     .where(Call.status.in_([s.value for s in IN_FLIGHT_STATUSES])))
        for call in calls:
            if call.id in self.active:
                continue
            if call.status == CallStatus.DIALING_A.value and not originate_marked(call):
                self._dial_unsent(call)
                continue
            self.journal.step(call, "adopted", note="found in flight at start")
            self.launch(call, call.endpoint, adopted=True)
        return len(calls)

    def _dial_unsent(self, call: Call) -> None:
        """A call claimed by the previous run, which died before its originate had its turn to be sent:
        nothing reached FreeSWITCH, so it is dialed now, like a late start (missed beyond the grace)."""
        late = int((self.journal.clock() - call.due_at).total_seconds())
        if late > self.settings.schedule_grace:
            self.journal.finish(call, CallStatus.MISSED, reason=f"due at {call.due_at.isoformat()}Z, {late} s "
                                f"before the daemon could start it (grace {self.settings.schedule_grace} s)")
            return
        self.journal.step(call, "adopted", note="claimed but never sent to FreeSWITCH: dialing A now")
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

    def hangup(self, callid: str) -> bool:
        """Operator hang-up: kill A (FreeSWITCH then cancels or hangs up B)."""
        for sequence in self.active.values():
            if sequence.callid == callid:
                self.api(fs.uuid_kill(sequence.a.uuid, "NORMAL_CLEARING"))
                return True
        return False

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
            self.conn.close()
        if self._supervisor is not None:
            self._supervisor.kill(block=True, timeout=timeout)
        self.connected.clear()
