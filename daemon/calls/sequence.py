"""One call's life, from the claim to its final status, as one readable sequence.

The shape (run on a real FreeSWITCH 1.10.12, see shared/esl-traces/16*):

1. ``bgapi originate {origination_uuid=<A>,...,app_disable_expand_variables=true}<A> &park()``.
2. On A's CHANNEL_ANSWER, queue on A with ``sendmsg`` + ``event-lock`` (arguments in the body):
   ``sched_hangup +<max> ALLOTTED_TIMEOUT`` (a dead daemon never leaves a call up forever),
   ``set hangup_after_bridge=true``, ``set continue_on_fail=true``, the prompts (``playback``),
   ``set ringback=<dialtone>``, ``set transfer_ringback=<dialtone>``, ``set instant_ringback=true``,
   ``bridge {origination_uuid=<B>,ignore_early_media=true,...}<B>``, and, for when B fails, a short
   busy tone and ``hangup``.
   FreeSWITCH then plays the ringback itself with no gap from the moment B is dialed, never passes
   B's early media, cancels B (ORIGINATOR_CANCEL) when A hangs up, hangs A up when B hangs up, and
   keeps a bridged call going if this daemon restarts. The daemon follows both legs by the UUIDs it
   chose and committed before dialing.
3. The bridge's outcome is read from its CHANNEL_EXECUTE_COMPLETE (``originate_disposition``), the
   legs' causes from their CHANNEL_HANGUP_COMPLETE; the call ends when A is gone and B is gone or was
   never created.

The sequence runs in its own greenlet and reads its events from an inbox that the engine fills by
channel UUID, so the ESL reader never waits on call logic.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
import os
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import gevent
import gevent.queue
from peewee import DatabaseError, OperationalError

from daemon.calls.journal import Journal
from daemon.store import Call, CallEvent, CallStatus, Endpoint
from daemon.switch import commands as fs
from daemon.switch.esl import EslError, EslEvent, EslNotSent

log = logging.getLogger("callbridge.call")

# A short busy tone A hears when B could not be reached, before we hang up.
FAILURE_NOTICE = "tone_stream://%(500,500,480,620);loops=3"
# Dispositions of the bridge that mean "B was never connected because of B".
CALLER_GONE = {"ORIGINATOR_CANCEL", "LOSE_RACE", "PICKED_OFF"}


# The timeline step committed right before the originate to A leaves (see CallSequence._mark_dialing_a).
DIAL_MARK = "dialing_a"


def originate_marked(call: Call) -> bool:
    """Whether the originate to A may have reached FreeSWITCH: its mark is in the call's timeline."""
    return bool(CallEvent.select().where((CallEvent.call == call.id) & (CallEvent.kind == DIAL_MARK)).exists())


class Switch(Protocol):
    """What a sequence needs from the engine's Event Socket connection."""

    def api(self, command: str) -> str: ...  # raises EslNotSent when there is no connection
    def bgapi(self, command: str, job_uuid: str, before_send: Callable[[], None] | None = None) -> str: ...
    def send_message(self, message: str) -> Any: ...
    def route(self, key: str, sequence: CallSequence) -> None: ...
    def unroute(self, key: str) -> None: ...


class Reconnected:
    """Inbox marker: the Event Socket came back; ``restarted`` when FreeSWITCH's Core-UUID changed."""

    def __init__(self, restarted: bool) -> None:
        self.restarted = restarted


class Stop:
    """Inbox marker: the daemon is shutting down; leave the call to FreeSWITCH."""


class RetryDial:
    """Inbox marker: try again an originate that was never sent."""


class RetrySend:
    """Inbox marker: try again to queue A's steps that found no turn on a busy connection."""


class Phase(enum.Enum):
    DIALING_A = "dialing_a"
    PROMPTS = "prompts"
    DIALING_B = "dialing_b"
    BRIDGED = "bridged"
    ENDING = "ending"


@dataclass
class CallOptions:
    """Settings a sequence needs, resolved once by the engine."""

    originate_timeout: int
    media_root: str
    recordings_dir: str
    idle_check: float  # seconds without news before asking FreeSWITCH whether A still exists
    media_base_url: str = ""
    playable: Callable[[str], str] = lambda path: path


@dataclass
class LegState:
    uuid: str
    created: bool = False
    answered_at: dt.datetime | None = None
    gone: bool = False
    cause: str = ""
    ringing_logged: bool = False


@dataclass
class AppStep:
    app: str
    arg: str
    event_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))


class CallSequence:
    """Drives one call on FreeSWITCH and writes down what happens to it."""

    def __init__(self, call: Call, endpoint: Endpoint, switch: Switch, journal: Journal,
                 options: CallOptions, *, adopted: bool = False,
                 on_end: Callable[[CallSequence], None] | None = None) -> None:
        self.call = call
        self.endpoint = endpoint
        self.switch = switch
        self.journal = journal
        self.options = options
        self.adopted = adopted
        self.on_end = on_end
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        # An adopted call resumes from what the store says happened before the restart.
        self.a = LegState(str(call.a_uuid), created=call.a_answered_at is not None, answered_at=call.a_answered_at)
        self.b = LegState(str(call.b_uuid), answered_at=call.bridged_at)
        self.job_uuid = str(uuidlib.uuid4())
        self.phase = Phase(call.status) if call.status in {p.value for p in Phase} else Phase.DIALING_A
        if call.status == CallStatus.A_ANSWERED.value:
            self.phase = Phase.PROMPTS
        self.steps: dict[str, AppStep] = {}
        self.bridge_step: AppStep | None = None
        self.bridge_disposition = ""
        self.apps_queued = False
        self.unsent: list[AppStep] = []  # built but not yet acknowledged by FreeSWITCH
        self.uncertain: AppStep | None = None  # in flight when the connection was lost
        self.marker: AppStep | None = None
        self.waiting_for_marker: list[AppStep] = []
        self.recording = False
        self.connection_lost = False
        self.dial_pending = False
        self.send_stalled = False  # A's steps found no turn to be sent; retried (RetrySend)
        self.done = False
        self.greenlet: gevent.Greenlet | None = None

    # -- life -------------------------------------------------------------------------------------
    @property
    def callid(self) -> str:
        return str(self.call.callid)

    def start(self) -> None:
        for key in (self.a.uuid, self.b.uuid, self.job_uuid):
            self.switch.route(key, self)
        self.greenlet = gevent.spawn(self._run)

    def deliver(self, item: EslEvent | Reconnected | Stop | RetryDial | RetrySend) -> None:
        self.inbox.put(item)

    def _run(self) -> None:
        try:
            if not self.adopted:
                self._dial_a()
            while not self.done:
                try:
                    item = self.inbox.get(timeout=self.options.idle_check)
                except gevent.queue.Empty:
                    self._check_alive()
                    continue
                if isinstance(item, Stop):
                    self.journal.step(self.call, "daemon_stopped", phase=self.phase.value,
                                      note="call left to FreeSWITCH; reconciled at next start")
                    return
                if isinstance(item, RetryDial):
                    if self.dial_pending:
                        self._dial_a()
                elif isinstance(item, RetrySend):
                    if self.unsent and not self.connection_lost:
                        self._guarded(self._send_unsent, "queuing")
                elif isinstance(item, Reconnected) and self.dial_pending:
                    self._dial_a()
                elif isinstance(item, Reconnected):
                    self._reconcile(item.restarted)
                else:
                    self._on_event(item)
                del item  # don't keep the last event (kilobytes of headers) alive while waiting
        except DatabaseError:
            # The store stayed unwritable past the journal's retries: leave the call to FreeSWITCH
            # (hanging up a healthy call would be worse); the next start reconciles it.
            log.exception("store unavailable; call left to FreeSWITCH", extra={"callid": self.callid})
        except Exception as exc:  # never leave a call without a final status
            log.exception("call sequence crashed", extra={"callid": self.callid})
            self._kill_legs()
            self._finish(CallStatus.FAILED, reason=f"internal error: {type(exc).__name__}")
        finally:
            for key in (self.a.uuid, self.b.uuid, self.job_uuid):
                self.switch.unroute(key)
            if self.on_end:
                self.on_end(self)

    # -- commands ---------------------------------------------------------------------------------
    def _leg_vars(self, leg_uuid: str) -> dict[str, str | int | bool]:
        return fs.leg_variables(leg_uuid=leg_uuid, callid=self.callid,
                                caller_id_number=self.endpoint.caller_id_number,
                                caller_id_name=self.endpoint.caller_id_name,
                                originate_timeout=self.options.originate_timeout)

    def _dial_a(self) -> None:
        command = fs.originate_a(template=self.endpoint.dial_string, phone=self.call.phone_a,
                                 variables=self._leg_vars(self.a.uuid))
        retry = self.dial_pending
        self.dial_pending = False
        try:
            reply = self.switch.bgapi(command, self.job_uuid, before_send=self._mark_dialing_a)
        except (EslNotSent, OperationalError) as exc:
            # Never reached FreeSWITCH (no connection, no turn, or the store refused the mark): dial when
            # reconnected, or in a moment if the connection or the store was only busy.
            if not retry and isinstance(exc, EslNotSent):
                self.journal.step(self.call, "waiting_for_switch", phase="dialing_a")
            self.dial_pending = True
            gevent.spawn_later(1.0, self.deliver, RetryDial())
            return
        except EslError as exc:
            # The originate may or may not have reached FreeSWITCH: never send it again; find out.
            self.connection_lost = True
            self.journal.step(self.call, "connection_lost", phase="dialing_a", error=str(exc))
            return
        if not reply.startswith("+OK"):
            self._finish(CallStatus.FAILED, failed_leg="a", a_cause="", reason=f"originate refused: {reply}")

    def _mark_dialing_a(self) -> None:
        """Runs when the originate has its turn on the connection, right before it leaves: committed
        durably, so a call claimed but never sent (the daemon died while it waited for its turn) is
        known at the next start and dialed then (``originate_marked``), not failed unheard."""
        self.journal.mark(self.call, DIAL_MARK, phone=self.call.phone_a, a_uuid=self.a.uuid)

    def _queue_apps(self) -> None:
        """After A answers: everything A hears, and the bridge to B, queued on A in order."""
        call, endpoint = self.call, self.endpoint
        steps = [
            AppStep("set", fs.set_arg("cb_stage", "queued")),
            AppStep("sched_hangup", f"+{int(endpoint.max_duration)} ALLOTTED_TIMEOUT"),
            AppStep("set", fs.set_arg("hangup_after_bridge", True)),
            AppStep("set", fs.set_arg("continue_on_fail", True)),
        ]
        for prompt in (call.play_file, call.msg_file):
            if prompt:
                steps.append(AppStep("playback", self._playable(prompt)))
        ringback = self._playable(call.dialtone_file) if call.dialtone_file else fs.ring_tone(endpoint.ring_tone)
        steps += [
            AppStep("set", fs.set_arg("ringback", ringback)),
            AppStep("set", fs.set_arg("transfer_ringback", ringback)),
            AppStep("set", fs.set_arg("instant_ringback", True)),
        ]
        if endpoint.record:
            steps.append(AppStep("set", fs.set_arg("RECORD_STEREO", True)))
        self.bridge_step = AppStep("bridge", fs.bridge_target(template=endpoint.dial_string, phone=call.phone_b,
                                                              variables=self._leg_vars(self.b.uuid)))
        steps.append(self.bridge_step)
        # Only reached when the bridge failed (continue_on_fail): a short notice, then hang up.
        steps += [AppStep("playback", FAILURE_NOTICE), AppStep("hangup", "NORMAL_CLEARING")]
        for step in steps:
            self.steps[step.event_uuid] = step
        self.unsent = steps
        self.apps_queued = True
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Queue the steps not yet acknowledged, in order. On a lost connection the step in flight is kept
        as ``uncertain``: FreeSWITCH may or may not have it, and ``_resume_queue`` decides."""
        while self.unsent:
            step = self.unsent[0]
            try:
                self.switch.send_message(fs.sendmsg_execute(self.a.uuid, step.app, step.arg,
                                                            event_uuid=step.event_uuid))
            except EslNotSent:
                raise
            except EslError:
                self.uncertain = self.unsent.pop(0)
                raise
            self.unsent.pop(0)

    def _resume_queue(self) -> None:
        """Reconnected with steps not (surely) queued on A: finish queueing without ever dialing B twice.

        Resending a ``set`` or ``playback`` that may already be queued is harmless; resending the bridge is
        not. When the bridge itself was in flight, a marker app is queued behind it: if B appears, the
        bridge was queued; if the marker runs first, it was not, and the bridge is sent then.
        """
        uncertain, self.uncertain = self.uncertain, None
        if uncertain is not None and uncertain is self.bridge_step:
            if self._exists(self.b.uuid):
                self._send_unsent()
                return
            self.marker = AppStep("set", fs.set_arg("cb_resume", "marker"))
            self.steps[self.marker.event_uuid] = self.marker
            self.waiting_for_marker = [uncertain, *self.unsent]
            self.unsent = [self.marker]
        elif uncertain is not None:
            self.unsent.insert(0, uncertain)
        self._send_unsent()

    def _guarded(self, action: Callable[[], None], phase: str) -> None:
        """Run a sending action; a lost connection is noted and handled once reconnected. A step that found
        no turn to be sent (the connection busy with other calls' commands, or down) was not sent: it and
        those after it are tried again in a moment (and on reconnecting)."""
        try:
            action()
        except EslNotSent as exc:
            if not self.send_stalled:  # noted once, not at every retry while the switch is away
                self.journal.step(self.call, "waiting_for_switch", phase=phase, error=str(exc))
            self.send_stalled = True
            gevent.spawn_later(1.0, self.deliver, RetrySend())
            return
        except EslError as exc:
            self.connection_lost = True
            self.journal.step(self.call, "connection_lost", phase=phase, error=str(exc))
            return
        self.send_stalled = False

    def _playable(self, path: str) -> str:
        local = fs.media_path(path, media_root=self.options.media_root)
        return fs.media_target(self.options.playable(local), media_root=self.options.media_root,
                               media_base_url=self.options.media_base_url)

    def _start_recording(self) -> None:
        path = os.path.join(self.options.recordings_dir, f"{self.callid}.wav")
        try:
            reply = self.switch.api(fs.uuid_record_start(self.a.uuid, path, recordings_dir=self.options.recordings_dir))
        except EslError as exc:
            self.journal.step(self.call, "recording_failed", error=str(exc))
            return
        if reply.startswith("+OK"):
            self.recording = True
            Call.update(recording_path=path).where(Call.id == self.call.id).execute()
            self.call.recording_path = path
            self.journal.step(self.call, "recording_started", path=path)
        else:
            self.journal.step(self.call, "recording_failed", error=reply.strip())

    def _kill_legs(self) -> None:
        for leg in (self.a, self.b):
            if leg.gone:
                continue
            with contextlib.suppress(EslError):
                self.switch.api(fs.uuid_kill(leg.uuid, "NORMAL_CLEARING"))

    # -- events -----------------------------------------------------------------------------------
    def _on_event(self, event: EslEvent) -> None:
        name = event.name
        if name == "BACKGROUND_JOB":
            self._on_originate_result(event.body.strip())
            return
        leg = self.a if event.uuid == self.a.uuid else self.b if event.uuid == self.b.uuid else None
        if leg is None:
            return
        tag = "a" if leg is self.a else "b"
        if name == "CHANNEL_CREATE":
            leg.created = True
            if leg is self.b:
                self._on_b_created()
        elif name in ("CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA"):
            if not leg.ringing_logged:
                leg.ringing_logged = True
                self.journal.step(self.call, f"{tag}_ringing",
                                  early_media=name == "CHANNEL_PROGRESS_MEDIA" or None)
        elif name == "CHANNEL_ANSWER":
            leg.created = True
            self._on_answer(leg, tag)
        elif name == "CHANNEL_EXECUTE":
            self._on_execute(event)
        elif name == "CHANNEL_EXECUTE_COMPLETE":
            self._on_execute_complete(event)
        elif name == "CHANNEL_BRIDGE" and leg is self.a:
            self._on_bridged()
        elif name == "CHANNEL_HANGUP_COMPLETE":
            if leg is self.a:
                self._learn_bridge_outcome(event)
            self._on_leg_gone(leg, tag, event.get("Hangup-Cause") or "")

    def _on_b_created(self) -> None:
        self._b_dialing()
        if self.waiting_for_marker:
            # B exists, so the bridge in flight at the drop was queued: queue what follows it.
            self.marker, self.unsent, self.waiting_for_marker = None, self.waiting_for_marker[1:], []
            self._guarded(self._send_unsent, "queuing")

    def _on_originate_result(self, body: str) -> None:
        if body.startswith("-ERR"):
            cause = body[4:].strip().split()[0] if body[4:].strip() else "UNKNOWN"
            self.a.gone = True
            self.a.cause = self.a.cause or cause
            self._conclude()

    def _on_answer(self, leg: LegState, tag: str) -> None:
        if leg.answered_at is not None:
            return
        now = self.journal.clock()
        leg.answered_at = now
        if leg is self.a:
            dialing = (now - self.call.started_at).total_seconds() if self.call.started_at else None
            if dialing is not None:
                self.journal.metrics.originate_to_answer.labels("a").observe(dialing)
            self.phase = Phase.PROMPTS
            self.journal.status(self.call, CallStatus.A_ANSWERED, a_answered_at=now)
            if not self.apps_queued:
                self._guarded(self._queue_apps, "queuing")
        else:
            if self.call.b_dialed_at:
                self.journal.metrics.originate_to_answer.labels("b").observe(
                    (now - self.call.b_dialed_at).total_seconds())
            self.journal.step(self.call, "b_answered", at=now)

    def _on_execute(self, event: EslEvent) -> None:
        step = self.steps.get(event.get("Application-UUID") or "")
        if step is not None and step is self.marker:
            # The marker ran before any bridge: the bridge in flight at the drop never arrived.
            self.marker, self.unsent, self.waiting_for_marker = None, self.waiting_for_marker, []
            self._guarded(self._send_unsent, "queuing")
        elif step is self.bridge_step if step is not None else event.get("Application") == "bridge":
            self._b_dialing()
        elif step is not None and step.app == "playback" and step.arg != FAILURE_NOTICE:
            self.journal.step(self.call, "prompt_started", file=os.path.basename(step.arg))

    def _b_dialing(self) -> None:
        if self.phase in (Phase.DIALING_A, Phase.PROMPTS):
            self.phase = Phase.DIALING_B
            self.journal.status(self.call, CallStatus.DIALING_B, b_dialed_at=self.journal.clock(),
                                phone=self.call.phone_b, b_uuid=self.b.uuid)

    def _on_execute_complete(self, event: EslEvent) -> None:
        step = self.steps.get(event.get("Application-UUID") or "")
        # An adopted call did not queue its apps in this run: it knows its bridge by name only.
        is_bridge = step is self.bridge_step if step is not None else event.get("Application") == "bridge"
        if step is None and not is_bridge:
            return
        if is_bridge:
            self.bridge_disposition = event.get("variable_originate_disposition") or ""
            if self.bridge_disposition == "SUCCESS" and self.phase != Phase.BRIDGED:
                self._on_bridged(late=True)  # the bridge happened while we could not hear it
            if (self.unsent or self.uncertain) and self.bridge_disposition != "SUCCESS" and not self.a.gone:
                with contextlib.suppress(EslError):  # the notice and hangup after it may never have been queued
                    self.switch.api(fs.uuid_kill(self.a.uuid, "NORMAL_CLEARING"))
            self.journal.step(self.call, "bridge_ended", disposition=self.bridge_disposition,
                              dialstatus=event.get("variable_DIALSTATUS"),
                              cause=event.get("variable_last_bridge_hangup_cause"))
        elif step is not None and step.app == "playback" and step.arg != FAILURE_NOTICE:
            self.journal.step(self.call, "prompt_finished", file=os.path.basename(step.arg),
                              result=event.get("Application-Response"))

    def _on_bridged(self, late: bool = False) -> None:
        if self.phase == Phase.BRIDGED:
            return
        now = self.journal.clock()
        self.phase = Phase.BRIDGED
        self.b.created = True
        if self.b.answered_at is None:
            self.b.answered_at = now
        ring = round((now - self.call.b_dialed_at).total_seconds(), 3) if self.call.b_dialed_at else None
        self.journal.status(self.call, CallStatus.BRIDGED, bridged_at=now, ring_seconds=ring)
        if self.endpoint.record and not late:
            self._start_recording()

    def _learn_bridge_outcome(self, hangup: EslEvent) -> None:
        """A's last event carries all its variables: a bridge that ended while we could not hear it (a
        restart, a lost connection) still tells its outcome here."""
        disposition = hangup.get("variable_originate_disposition") or ""
        if self.bridge_disposition or disposition in ("", "failure"):
            return
        self.bridge_disposition = disposition
        if disposition == "SUCCESS":
            self._on_bridged(late=True)
        else:
            if not self.b.created:  # B came and went unseen
                self.b.created = self.b.gone = True
            self.b.cause = self.b.cause or disposition
            self.journal.step(self.call, "bridge_ended", disposition=disposition,
                              dialstatus=hangup.get("variable_DIALSTATUS"), source="A's hangup")

    def _on_leg_gone(self, leg: LegState, tag: str, cause: str) -> None:
        if leg.gone:
            return
        leg.gone = True
        leg.cause = cause or leg.cause
        self.journal.step(self.call, f"{tag}_hangup", cause=leg.cause)
        self._conclude()

    # -- endings ----------------------------------------------------------------------------------
    def _conclude(self) -> None:
        """End the call once A is gone and B is gone or was never created."""
        if not self.a.gone or (self.b.created and not self.b.gone):
            return
        if self.call.bridged_at or self.phase == Phase.BRIDGED:
            self._finish(CallStatus.COMPLETED)
        elif self.a.answered_at is None:
            self._finish(CallStatus.FAILED, failed_leg="a", reason="A was not reached")
        elif self.bridge_disposition and self.bridge_disposition not in CALLER_GONE | {"SUCCESS"}:
            self.b.cause = self.b.cause or self.bridge_disposition
            self._finish(CallStatus.FAILED, failed_leg="b", b_cause=self.b.cause or self.bridge_disposition,
                         reason="B was not reached")
        elif self.phase == Phase.DIALING_B:
            self._finish(CallStatus.FAILED, failed_leg="a", reason="A hung up while B was ringing")
        elif self.call.play_file or self.call.msg_file:
            self._finish(CallStatus.FAILED, failed_leg="a", reason="A hung up during the prompts")
        else:
            self._finish(CallStatus.FAILED, failed_leg="a", reason="A hung up before B was dialed")

    def _finish(self, status: CallStatus, **fields: Any) -> None:
        if self.done:
            return
        self.done = True
        self.phase = Phase.ENDING
        now = self.journal.clock()
        fields.setdefault("a_cause", self.a.cause)
        fields.setdefault("b_cause", self.b.cause)
        if self.call.bridged_at:
            fields.setdefault("talk_seconds", round((now - self.call.bridged_at).total_seconds(), 3))
        elif self.call.b_dialed_at:
            fields.setdefault("ring_seconds", round((now - self.call.b_dialed_at).total_seconds(), 3))
        if self.recording and self.call.recording_path and os.path.exists(self.call.recording_path):
            fields["recording_bytes"] = os.path.getsize(self.call.recording_path)
            fields["recording_seconds"] = _wav_seconds(self.call.recording_path)
        self.journal.finish(self.call, status, ended_at=now, **fields)

    # -- when the connection was lost or nothing is heard -----------------------------------------
    def _exists(self, leg_uuid: str) -> bool:
        return self.switch.api(fs.uuid_exists(leg_uuid)).strip() == "true"

    def _getvar(self, leg_uuid: str, name: str) -> str:
        value = self.switch.api(fs.uuid_getvar(leg_uuid, name)).strip()
        return "" if value in ("_undef_", "") or value.startswith("-ERR") else value

    def _answered(self, leg_uuid: str) -> bool:
        # FreeSWITCH sets endpoint_disposition=ANSWER when a leg answers (answer_epoch only at hangup).
        return self._getvar(leg_uuid, "endpoint_disposition") == "ANSWER"

    def _reconcile(self, restarted: bool) -> None:
        """Find out from FreeSWITCH what became of this call while we could not hear it."""
        self.connection_lost = False
        if restarted:
            self.journal.step(self.call, "switch_restarted")
            self.a.gone = self.b.gone = True
            # No leg failed: the switch did. Both legs vanished with it, causes unknown.
            self._finish(CallStatus.FAILED, reason="FreeSWITCH restarted during the call")
            return
        try:
            a_alive = self._exists(self.a.uuid)
            b_alive = self._exists(self.b.uuid)
            if not a_alive:
                if b_alive:
                    self.switch.api(fs.uuid_kill(self.b.uuid, "NORMAL_CLEARING"))
                self.a.gone = self.b.gone = True
                self.journal.step(self.call, "reconciled", a="gone", b="gone")
                if self.call.bridged_at:
                    self._finish(CallStatus.COMPLETED, reason="ended while the switch connection was down")
                else:
                    # Both legs ended unheard: which one failed, and why, is not known.
                    self._finish(CallStatus.FAILED, reason="interrupted")
                return
            self.journal.step(self.call, "reconciled", a="up", b="up" if b_alive else "absent")
            if self.unsent or self.uncertain:
                self._resume_queue()
            if self._answered(self.a.uuid):
                self.apps_queued = self.apps_queued or bool(self._getvar(self.a.uuid, "cb_stage"))
                if self.a.answered_at is None:
                    self._on_answer(self.a, "a")  # queues the apps unless they already are
                elif not self.apps_queued:
                    self._queue_apps()
            if b_alive:
                self.b.created = True
                self._on_b_created()
                if self._answered(self.b.uuid):
                    self._on_bridged()
                return
            disposition = self._getvar(self.a.uuid, "originate_disposition")
            # FreeSWITCH sets "failure" when a bridge starts and the real outcome when it ends.
            if disposition == "failure" and not self.b.created:
                self._b_dialing()  # the bridge is dialing B right now
            elif disposition and disposition not in ("SUCCESS", "failure") and self.phase != Phase.BRIDGED:
                # The bridge failed unheard; A's queued notice and hangup follow.
                self.bridge_disposition = disposition
                self.b.cause = self.b.cause or disposition
                self.b.created = self.b.gone = True
                self.journal.step(self.call, "bridge_ended", disposition=disposition)
            elif self.phase in (Phase.DIALING_B, Phase.BRIDGED) or self.b.created:
                # B came and went while we were away: its cause is lost.
                self.b.created = self.b.gone = True
        except EslNotSent:
            # A question or a step found no turn (every call reconciles at once after a reconnect) or the
            # connection is down again: nothing half-sent, so the whole look is taken again in a moment.
            gevent.spawn_later(1.0, self.deliver, Reconnected(False))
        except EslError:
            self.connection_lost = True

    def _check_alive(self) -> None:
        """Nothing heard for a while: make sure A still exists, or end the call with what we know."""
        if self.dial_pending:  # A was never originated: there is nothing to look for yet
            self._dial_a()
            return
        if self.connection_lost:
            return
        try:
            a_alive = self._exists(self.a.uuid)
        except EslError:
            return
        if not a_alive:
            # A's hangup may be on its way: the reader may have queued it while we waited for this answer,
            # or FreeSWITCH may write the answer before the event. It tells the real outcome; "gone" does
            # not. So news gets an idle period to arrive (the loop reads it) before the hangup counts as lost.
            try:
                self.inbox.peek(timeout=self.options.idle_check)
                return
            except gevent.queue.Empty:
                pass
            self.journal.step(self.call, "lost_track", note="A is gone but its hangup was not heard")
            self._reconcile(False)


def _wav_seconds(path: str) -> float | None:
    try:
        import soundfile

        info = soundfile.info(path)
        return round(info.frames / info.samplerate, 3)
    except Exception:
        return None
