"""The switch core: channels, event dispatch, scaled time and recordings."""

from __future__ import annotations

import time
import uuid as uuidlib
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

import gevent
import soundfile as sf

from .channel import Channel, Recording
from .events import Event, EventFactory
from .limits import DEFAULT_MAX_SESSIONS, DEFAULT_SPS, SessionLimits
from .media import write_recording
from .recording import render

# Ended channels kept for inspection (sw.channel(uuid)); bounded so long benchmarks stay small.
MAX_ENDED = 20_000


class EventSink(Protocol):
    """Anything that wants every event (an ESL connection)."""

    def deliver(self, event: Event) -> None: ...

    def wants(self, name: str, uuid: str | None) -> bool: ...


class Switch:
    """Holds the channels and the clock; fires events to every sink.

    ``far_end_sessions``: the far ends are sessions of this same switch, as on the host that recorded
    the traces (each answered call there is 2 sessions); off, only the legs the clients create count,
    as on a production switch whose carrier is elsewhere.
    """

    def __init__(self, time_scale: float = 1.0, hostname: str | None = None, sps: int = DEFAULT_SPS,
                 max_sessions: int = DEFAULT_MAX_SESSIONS, far_end_sessions: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.time_scale = time_scale
        self.limits = SessionLimits(sps, max_sessions, clock=clock)
        self.far_end_sessions = far_end_sessions
        self.core_uuid = str(uuidlib.uuid4())
        self.events = EventFactory(self.core_uuid, hostname)
        self.channels: dict[str, Channel] = {}
        self.all_channels: dict[str, Channel] = {}  # live and ended (the oldest ended ones are forgotten)
        self.ended: deque[str] = deque()
        self.sinks: set[EventSink] = set()
        self.started_at = time.monotonic()
        self.calls_out = 0  # legs through the carrier gateway (sofia status gateway's CallsOUT)
        # Sessions refused over a limit, by the origination_uuid asked for ("" when none was given):
        # nothing was created for them (for tests that check nothing was dialed twice).
        self.refused: Counter[str] = Counter()
        self.created: Counter[str] = Counter()  # legs created, by uuid (a uuid dialed twice counts twice)
        self.globals: dict[str, str] = {
            "hostname": self.events.hostname, "local_ip_v4": "127.0.0.1", "switch_serial": "standin",
            "core_uuid": self.core_uuid, "domain": "127.0.0.1", "hold_music": "local_stream://moh",
            # the ring tones of FreeSWITCH's default vars.xml
            "us-ring": "%(2000,4000,440,480)", "uk-ring": "%(400,200,400,450);%(400,2000,400,450)",
            "fr-ring": "%(1500,3500,440)", "de-ring": "%(1000,4000,425)", "rs-ring": "%(1000,4000,425)",
            "it-ring": "%(1000,4000,425)", "pt-ring": "%(1000,5000,400)", "bong-ring":
            "v=-7;%(100,0,941.0,1477.0);v=-7;>=2;+=.1;%(1400,0,350,440)",
        }
        self.tasks: list[gevent.Greenlet] = []
        self._prune_at = 1000
        self.task_seq = 0

    # ----- time --------------------------------------------------------------------------
    def real(self, plan_seconds: float) -> float:
        """Real seconds for a plan duration."""
        return max(0.0, plan_seconds * self.time_scale)

    def sleep(self, plan_seconds: float) -> None:
        """Sleep a plan duration."""
        gevent.sleep(self.real(plan_seconds))

    def later(self, plan_seconds: float, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Run fn after a plan delay; the greenlet is killed by restart()."""
        g = gevent.spawn_later(self.real(plan_seconds), fn, *args)
        self.tasks.append(g)
        if len(self.tasks) > self._prune_at:
            self.tasks = [t for t in self.tasks if not t.dead]
            self._prune_at = max(1000, 2 * len(self.tasks))  # amortised: never a scan per call
        return g

    # ----- ids & events ---------------------------------------------------------------------
    @staticmethod
    def new_uuid() -> str:
        """A new random uuid (channels, jobs, events)."""
        return str(uuidlib.uuid4())

    def anyone_wants(self, name: str, uuid: str | None = None) -> bool:
        """Whether any sink may want such an event (so unwanted events are never built)."""
        return any(sink.wants(name, uuid) for sink in self.sinks)

    def fire(self, event: Event) -> None:
        """Deliver an event to every connected sink."""
        for sink in list(self.sinks):
            sink.deliver(event)

    # ----- channels ------------------------------------------------------------------------
    def add_channel(self, ch: Channel) -> None:
        """Register a new leg whose session was admitted (ch.session_id)."""
        self.channels[ch.uuid] = ch
        self.all_channels[ch.uuid] = ch
        self.created[ch.uuid] += 1
        self.calls_out += 1

    def locate(self, uuid: str | None) -> Channel | None:
        """A channel that still exists (not destroyed)."""
        if not uuid:
            return None
        return self.channels.get(uuid.strip())

    def channel_hungup(self, ch: Channel) -> None:
        """Hook called when a leg hangs up (nothing else to do in the core)."""

    def channel_gone(self, ch: Channel) -> None:
        """A leg reported its hangup: it no longer exists for api commands, its session is freed."""
        if self.channels.pop(ch.uuid, None) is not None:
            self.limits.release()
            if ch.far_end_session:
                self.limits.release()
                ch.far_end_session = False
        self.ended.append(ch.uuid)
        while len(self.ended) > MAX_ENDED:
            self.all_channels.pop(self.ended.popleft(), None)

    # ----- recordings ------------------------------------------------------------------------
    def start_recording(self, ch: Channel, path: str, limit: float | None = None) -> Recording:
        """Start recording a leg (for at most limit plan seconds); RECORD_START fires."""
        rec = Recording(path=path, started_at=time.monotonic(), stereo=ch.true_var("RECORD_STEREO"), limit=limit,
                        read=not ch.true_var("RECORD_WRITE_ONLY"), write=not ch.true_var("RECORD_READ_ONLY"))
        ch.recordings.append(rec)
        ch.fire("RECORD_START", ("switch_ivr_async.c", "record_callback", 1413),
                post=[("Record-File-Path", path)])
        ch.fire("MEDIA_BUG_START", ("switch_core_media_bug.c", "switch_core_media_bug_add", 1014),
                pre=[("Media-Bug-Function", "session_record"), ("Media-Bug-Target", path)])
        if limit and limit > 0:
            ch.greenlets.append(self.later(limit, self.stop_recording, ch, rec))
        return rec

    def stop_recording(self, ch: Channel, rec: Recording, cause: str = "success-maxtime") -> None:
        """Stop one recording, write its WAV file and fire RECORD_STOP."""
        if rec.stopped_at is not None:
            return
        # A leg's recording ends when the leg hung up (FreeSWITCH closes the media bug then), not when
        # this runs, which on a loaded machine can be a good while later.
        now = time.monotonic()
        rec.stopped_at = min(now, ch.ended_at) if ch.ended_at is not None else now
        rec.plan_seconds = (rec.stopped_at - rec.started_at) / self.time_scale
        if rec.limit:
            rec.plan_seconds = min(rec.plan_seconds, rec.limit)
        ch.set_var("record_seconds", str(int(rec.plan_seconds)))
        ch.set_var("record_ms", str(int(rec.plan_seconds * 1000)))
        ch.set_var("record_samples", str(int(rec.plan_seconds * 8000)))
        try:
            write_recording(rec.path, render(ch, rec))
            rec.written = True
        except (OSError, RuntimeError, sf.LibsndfileError):
            rec.written = False
        ch.fire("RECORD_STOP", ("switch_ivr_async.c", "send_record_stop_event", 1216),
                post=[("Record-File-Path", rec.path), ("Record-Completion-Cause", cause)])
        ch.fire("MEDIA_BUG_STOP", ("switch_core_media_bug.c", "switch_core_media_bug_destroy", 84),
                pre=[("Media-Bug-Function", "session_record"), ("Media-Bug-Target", rec.path)])

    def stop_recordings(self, ch: Channel, path: str | None = None) -> int:
        """Stop the leg's recordings (all, or the one at path); returns how many stopped."""
        n = 0
        for rec in ch.recordings:
            if rec.stopped_at is None and (path in (None, "all") or rec.path == path):
                self.stop_recording(ch, rec)
                n += 1
        return n

    # ----- lifecycle -----------------------------------------------------------------------
    def vanish(self) -> None:
        """Drop every channel without a single event (a crashed/restarted switch)."""
        for ch in list(self.channels.values()):
            ch.destroyed.set()
            ch.hungup.set()
            if ch.ended_at is None:
                ch.ended_at = time.monotonic()
                ch.hangup_cause = ch.hangup_cause or "CRASH"
            for g in ch.greenlets:
                g.kill(block=False)
        self.channels.clear()
        for t in self.tasks:
            t.kill(block=False)
        self.tasks = []

    def uptime(self) -> float:
        """Real seconds since this switch (re)started."""
        return time.monotonic() - self.started_at
