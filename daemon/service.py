"""The daemon process: wires the store, media, engine, dispatcher and HTTP API together and runs them.

Order at start: database (migrated) → this daemon's hold on its store or its instance_id (another daemon
holding it refuses the start: daemon/ops/instance.py) → the API's socket bound (a port in use ends the
start here) → the store's writer (on SQLite a thread of its own: nothing on the event loop waits for the
disk) → engine (connects to FreeSWITCH in the background, adopts the calls a previous run left in flight)
→ dispatcher (marks missed what was due while no dispatcher ran, then starts due ones) → leases (renewed;
calls of daemons that died taken over: daemon/calls/leases.py) → HTTP server → ``READY=1`` to systemd. On
SIGTERM: stop taking calls, leave calls in progress to FreeSWITCH (they are adopted at the next start, or
by another daemon sharing the store, their leases ended), stop the server, commit what is queued (the
ended leases with it), let go of the store or the instance_id, exit.
"""

from __future__ import annotations

import datetime as dt
import logging
import signal
import sys
from collections.abc import Callable

import gevent
import gevent.event

from daemon.calls.dispatcher import Dispatcher
from daemon.calls.leases import Leases, new_instance_id
from daemon.calls.records import CallRecords
from daemon.config import ConfigError, Settings
from daemon.loop import Loop
from daemon.media.library import MediaLibrary
from daemon.ops.heap import FREEZE_INTERVAL, Heap
from daemon.ops.instance import Instance
from daemon.ops.logs import log_event
from daemon.ops.loopwatch import LoopWatch
from daemon.ops.metrics import Metrics
from daemon.ops.retention import Retention
from daemon.ops.systemd import notify, watchdog_interval
from daemon.ops.webhooks import Webhooks
from daemon.store import close_database, database_file, is_shared, open_database, utcnow
from daemon.switch.commands import http_cache_url
from daemon.switch.engine import Engine
from daemon.writer import GroupWriter, ThreadWriter, Writer, install
from webapi.app import MAX_BODY, create_app
from webapi.server import ApiServer

log = logging.getLogger("callbridge.service")

MEDIA_EVICTION_INTERVAL = 3600.0  # seconds; the first eviction comes one interval after the start
# Calls ending close together wake the dispatcher once: each look reads due calls from the store, and at
# a hundred calls ending a second one look per call was the daemon's largest single cost per call.
CALL_END_WAKE_DELAY = 0.02  # seconds
GIL_SWITCH_INTERVAL = 0.001  # seconds


def make_folders(settings: Settings) -> None:
    """The state folder's media and recordings folders; ConfigError naming state_dir when they cannot be made."""
    for folder in (settings.media_dir, settings.recordings_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # under a file, read-only (ProtectSystem=strict outside StateDirectory) ...
            raise ConfigError(f"state_dir: cannot create {folder}: {exc.strerror or exc}") from None


class ListenError(Exception):
    """The HTTP API cannot listen at http_host:http_port; the message names both and the reason."""


class Service:
    """Everything one callbridge process runs."""

    def __init__(self, settings: Settings, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.settings = settings
        make_folders(settings)
        self.database = open_database(settings.database_url)
        self.metrics = Metrics()
        self.clock = clock
        self.instance_id = settings.instance_id or new_instance_id()
        self.records = CallRecords(self.metrics, clock, owner=self.instance_id, lease_seconds=settings.lease_seconds)
        self.webhooks = Webhooks(settings, self.metrics, clock)
        self.records.status_writers.append(self.webhooks.record_status)
        self.retention = Retention(settings, clock, records=self.records)
        self.media = MediaLibrary(settings)
        self.metrics.watch_media_pool(self.media.pool)
        self.engine = Engine(settings, self.records, playable=self._playable,
                             on_call_end=lambda _sequence: self._call_ended())
        self.dispatcher = Dispatcher(settings, self.engine, self.records, clock)
        self.instance = Instance(settings, self.instance_id)
        self.leases = Leases(settings, self.engine, self.records, clock, instance=self.instance,
                             on_instance_lost=self._instance_lost)
        self.app = create_app(settings, media=self.media, dispatcher=self.dispatcher, metrics=self.metrics,
                              readiness=self.readiness, clock=clock, records=self.records,
                              switch_status=self.engine.switch_status)
        self.server = ApiServer.for_settings(settings, self.app, max_body=MAX_BODY)
        self.metrics.watch_http_server(self.server)
        self.stopping = gevent.event.Event()
        self.media_eviction = Loop("media eviction", self._evict_media, clock, log=log,
                                   first_delay=MEDIA_EVICTION_INTERVAL, error_delay=MEDIA_EVICTION_INTERVAL)
        self.writer: ThreadWriter | GroupWriter | None = None
        self.exit_code = 0  # the process's, once run_forever returns
        self._wake_pending = False
        self._previous_writer: Writer | None = None

    def _call_ended(self) -> None:
        """A call ended: its room goes to the next due call, at the dispatcher's next look (soon)."""
        if not self._wake_pending:
            self._wake_pending = True
            gevent.spawn_later(CALL_END_WAKE_DELAY, self._wake_dispatcher)

    def _wake_dispatcher(self) -> None:
        self._wake_pending = False
        self.dispatcher.wake()

    def _playable(self, path: str) -> str:
        """Our file as FreeSWITCH reaches it: the path itself, or our media route through mod_http_cache."""
        target = self.media.playable(path)
        return http_cache_url(target) if self.settings.media_mode == "http" else target

    def readiness(self) -> dict[str, bool]:
        """Ready while at least one switch is connected (/readyz names those that are not)."""
        return {"esl": self.engine.ready}

    @property
    def http_port(self) -> int:
        return int(self.server.server_port)

    def listen(self) -> None:
        """Bind the API's socket, first of all: a port in use stops the start before a call is dialed."""
        try:
            self.server.init_socket()
        except OSError as exc:
            raise ListenError(f"http_host/http_port {self.settings.http_host}:{self.settings.http_port}: "
                              f"cannot listen: {exc.strerror or exc}") from None

    def _instance_lost(self) -> None:
        """Another daemon runs under this instance_id now: stop, and say so with the exit code."""
        self.exit_code = 1
        self.stopping.set()

    def start(self) -> None:
        # Before anything else: a daemon that already runs on this store, or under this instance_id on a
        # shared one, refuses this start (AlreadyRunning) with nothing of its own touched.
        self.instance.acquire()
        self.records.run_id = self.instance.run_id if is_shared() else None
        self.leases.follow_clock()  # leases in the store's time from the first adoption on
        try:
            self._start()
        except BaseException:
            self.instance.release()
            raise

    def _start(self) -> None:
        self.media.check_voices()  # a voice the operator set that the engine lacks: a ConfigError, nothing started
        self.listen()
        if database_file(self.settings.database_url) is not None and not self.settings.database_url.endswith(
                ":memory:"):
            self.writer = ThreadWriter(self.database)
            self._previous_writer = install(self.writer)
            # The writer thread runs Python (peewee) between its SQLite calls; when the event loop wants the
            # interpreter back it gets it within this, not CPython's default 5 ms: an ESL event waits less.
            sys.setswitchinterval(GIL_SWITCH_INTERVAL)
        elif is_shared():
            self.writer = GroupWriter()
            self._previous_writer = install(self.writer)
        self.engine.start()
        adopted = self.engine.adopt_in_flight()
        self.leases.start()
        self.webhooks.start()
        self.retention.start()
        self.dispatcher.start()
        self.media_eviction.start()
        self.server.start()
        log_event(log, "service.started", http=f"{self.settings.http_host}:{self.http_port}",
                  switches=",".join(link.name for link in self.engine.links), adopted=adopted,
                  instance=self.instance_id)
        notify(f"READY=1\nSTATUS=serving on {self.settings.http_host}:{self.http_port}")

    def stop(self) -> None:
        notify("STOPPING=1")
        log_event(log, "service.stopping", in_flight=self.engine.in_flight())
        self.dispatcher.stop()
        self.server.stop(timeout=self.settings.shutdown_grace)
        self.leases.stop()
        leaving = list(self.engine.active)
        self.engine.stop()
        try:  # another daemon sharing the store takes these calls over at its next look
            if not self.instance.lost:  # else they are the daemon's that took this instance_id over
                self.leases.release(leaving, self.clock())
        except Exception:
            log.exception("could not end the leases of the calls left to FreeSWITCH")
        self.media_eviction.stop()
        self.retention.stop()
        self.webhooks.stop()
        self.media.close()
        if self.writer is not None:
            self.writer.stop(timeout=self.settings.shutdown_grace)
            if self._previous_writer is not None:
                install(self._previous_writer)
            self.writer = None
        self.instance.release()
        close_database(self.database)
        log_event(log, "service.stopped")

    def _evict_media(self, now: dt.datetime) -> float:
        """Keep the media cache under its bound, never evicting what a call not yet ended will play."""
        freed = self.media.evict(self.records.media_in_use)
        log_event(log, "media.evicted", bytes=freed)
        return MEDIA_EVICTION_INTERVAL

    def run_forever(self) -> None:
        """Run until SIGTERM or SIGINT, pinging systemd's watchdog from this loop."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, self.stopping.set)
        self.start()
        # What lives long (start-up's modules and app, then calls in progress) leaves the cyclic collector's
        # sight, so that its passes never stop the loop for long (daemon/ops/heap.py). Only in the process's
        # own entry: services started inside the tests keep the interpreter's collector as it is.
        heap = Loop("heap", Heap().tick, self.clock, log=log, error_delay=FREEZE_INTERVAL)
        heap.start()
        # Likewise: what holds the loop is logged (daemon/ops/loopwatch.py), by a thread of the process's own.
        watch = LoopWatch(self.settings.loop_block_warning, self.metrics)
        watch.start()
        gevent.spawn(self.media.warm_up)  # the first request need not wait for a worker to start
        interval = watchdog_interval()
        while not self.stopping.wait(timeout=interval or 60):
            if interval:
                notify("WATCHDOG=1")
        watch.stop()
        heap.stop()
        self.stop()

