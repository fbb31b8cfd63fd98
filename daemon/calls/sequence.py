"""One call's life, from the claim to its final status, as one readable sequence.

The shape (run on a real FreeSWITCH 1.10.12, see shared/esl-traces/16*):

1. ``bgapi originate {origination_uuid=<A>,...,hangup_after_bridge=true,continue_on_fail=true,
   instant_ringback=true,app_disable_expand_variables=true}<A> &park()``, sent once the switch has room
   for a session (:mod:`daemon.switch.capacity`).
2. On A's CHANNEL_ANSWER, queue on A with ``sendmsg`` + ``event-lock`` (arguments in the body; all in
   one write, see :mod:`daemon.calls.appqueue`):
   ``multiset cb_stage=queued ringback=<dialtone> transfer_ringback=<dialtone>``, ``sched_hangup
   +<max> ALLOTTED_TIMEOUT`` (a dead daemon never leaves a call up forever), the prompts (``playback``),
   then *the wait*: the dialtone looped (``playback`` with ``loops: -1``), ``bridge
   {origination_uuid=<B>,ignore_early_media=true,...}<B>``, and the wait again.
3. When the wait starts (its CHANNEL_EXECUTE) and the switch has room for B's session, ``uuid_break``
   ends the loop and the bridge dials B at that moment: B's session is created when *we* say, so it is
   paced like A's. FreeSWITCH then plays the ringback itself with no gap from the moment B is dialed,
   never passes B's early media, cancels B (ORIGINATOR_CANCEL) when A hangs up, hangs A up when B
   hangs up, and keeps a bridged call going if this daemon restarts.
4. The bridge's outcome is read from its CHANNEL_EXECUTE_COMPLETE (``originate_disposition``). A plays
   the wait after it while we decide: a bridge the switch refused over its limits (disposition
   DESTINATION_OUT_OF_ORDER and no CHANNEL_CREATE for B: nothing was dialed) is queued again, with the
   same B UUID, once there is room (backoff, within ``originate_timeout``); any other failure, or the
   last refusal, gets the busy notice and ``hangup`` queued and the wait broken. The call ends when A
   is gone and B is gone or was never created.

Why the tail after the bridge is the wait and not the notice: ``sendmsg`` can only append to A's queue,
so whatever FreeSWITCH would do by itself after a failed bridge (a notice and a hangup) would run before
a second bridge could be queued; flushing it (``uuid_break all``) would leave A in silence until the new
bridge arrives. With the wait last, a refused B costs two ``sendmsg`` and a break, and A
hears the dialtone throughout; a real failure costs the notice, the hangup and a break. No call sends more than
before this shape (a bridged call sends four commands fewer, a failed B one fewer): the variables of
the bridge went into A's originate and the others into one ``multiset``. The price:
a daemon that dies while A waits leaves A on the dialtone until it is back (the next start adopts the
call and finishes it) or until ``sched_hangup``. The next start, or a reconnection, knows A's wait at once
from what FreeSWITCH keeps on A (it removes ``app_uuid`` as each app starts): a looped ``playback`` (only
the waits loop); no bridge ran yet (``originate_disposition`` unset): the first wait; else the wait after
the last bridge, numbered by the ``set cb_wait=<n>`` queued before it from the second bridge on (unset:
after the first). A wait after a refused bridge (B in no ``originated_legs``) has B tried again as above,
never B's failure. The next start cannot see what A holds queued (the run
may have died between two ``sendmsg``): at A's wait it drops A's queue with the wait (``uuid_break all``)
and queues the bridge and the wait after it anew; before A's first wait, a marker queued behind A's steps
tells whether they end short (it runs first), and then the waits and the bridge are queued. The waits are unbounded because the stand-in runs
the switch's time fast while its session budget refills in real time.

A refused A (BACKGROUND_JOB ``-ERR DESTINATION_OUT_OF_ORDER`` with no CHANNEL_CREATE for A) is
originated again the same way, same UUID, new Job-UUID. Only past ``originate_timeout`` does a refused
leg fail the call: ``the switch refused the session (over its limit)``.

The sequence runs in its own greenlet and reads its events from an inbox that the engine fills by
channel UUID, so the ESL reader never waits on call logic. Where the call stands is its stored
status (``CallStatus``, kept current by :class:`~daemon.calls.records.CallRecords`); the steps queued on
A, and how they are finished after a lost connection, are :class:`~daemon.calls.appqueue.AppQueue`'s.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import logging
import os
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.queue
from peewee import DatabaseError, OperationalError

from daemon.calls.appqueue import AppQueue, AppStep
from daemon.calls.records import (
    NOT_SENT,
    SWITCH_LOST_REASON,
    THROTTLED,
    CallRecords,
    HangupRequested,
    NotOwned,
)
from daemon.loop import Backoff
from daemon.ops.logs import log_event
from daemon.store import EPOCH, Call, CallStatus, Endpoint
from daemon.switch import commands as fs
from daemon.switch.capacity import SwitchCapacity
from daemon.switch.esl import EslError, EslEvent, EslNotSent
from daemon.uuids import new_uuid, uuid_text

log = logging.getLogger("callbridge.call")

# The cause A's sched_hangup ends it with once the endpoint's maximum duration is up.
MAX_DURATION_CAUSE = "ALLOTTED_TIMEOUT"
# A short busy tone A hears when B could not be reached, before we hang up.
FAILURE_NOTICE = "tone_stream://%(500,500,480,620);loops=3"
# Dispositions of the bridge that mean "B was never connected because of B".
CALLER_GONE = {"ORIGINATOR_CANCEL", "LOSE_RACE", "PICKED_OFF"}
# A call whose legs were gone when it was found again, its end unheard: while the connection to the switch
# was down, or while no daemon followed it (its daemon stopped or died; found at a start or a takeover).
UNHEARD_END = "ended while the switch connection was down"
UNFOLLOWED_END = "ended while no daemon followed it (its end was not heard)"
INTERRUPTED = "interrupted"
UNFOLLOWED_INTERRUPTED = ("interrupted: it ended while no daemon followed it; which leg ended it, and why, "
                          "is not known")
# What the switch answers for a leg it refused over its session limits (nothing was created).
REFUSED_CAUSE = "DESTINATION_OUT_OF_ORDER"
REFUSED = "the switch refused the session (over its limit)"
# Retries of a refused leg: a second or so apart (the switch refills its budget once a second).
RETRY_FIRST, RETRY_CAP = 0.25, 2.0
# A dialtone file shorter than this is not looped for the wait (FreeSWITCH does not repeat a round
# under half a second): the endpoint's ring tone is.
SHORTEST_LOOP = 1.0
# The wait's event UUIDs are derived from A's, so a daemon that adopts the call after a restart knows
# each wait's events (their ``Application-UUID``).
WAIT_NAMESPACE = uuidlib.UUID("6f1d9c55-2b7e-4f0c-9a51-4e4d1b7c3a20")
MAX_WAITS = 64  # bridge attempts looked for when adopting a call
# A's channel variable that says which wait A plays after a bridge sent again (a ``set`` queued right before
# that wait): FreeSWITCH keeps channel variables, not the Application-UUID of what A runs.
WAIT_VAR = "cb_wait"
# A's channel variable the tail marker (_mark_tail) sets to its own event UUID: read after a gap, it tells the
# marker ran unheard. (Not the AppQueue's marker's: both may be queued, and each must tell its own run.)
TAIL_VAR = "cb_tail"


def wait_uuid(a_uuid: str, attempt: int) -> str:
    """The event UUID of the wait A plays before bridge attempt ``attempt + 1`` (0: before the first):
    ``str(uuid.uuid5(WAIT_NAMESPACE, f"{a_uuid}:wait:{attempt}"))``, without its two UUID objects (each call
    asks for new ones: 3.6 -> 1.2 us)."""
    return uuid_text(hashlib.sha1(_WAIT_NAMESPACE_BYTES + f"{a_uuid}:wait:{attempt}".encode()).hexdigest(), 5)


_WAIT_NAMESPACE_BYTES = WAIT_NAMESPACE.bytes


class Switch(Protocol):
    """What a sequence needs from the engine: the Event Socket connection and the switch's capacity."""

    capacity: SwitchCapacity
    core_uuid: str | None  # FreeSWITCH's, as read on the last connection

    def api(self, command: str) -> str: ...  # raises EslNotSent when there is no connection
    def bgapi(self, command: str, job_uuid: str, before_send: Callable[[], None] | None = None) -> str: ...
    def send_messages(self, messages: list[str]) -> list[Any]: ...  # in one write (EslLostInFlight: how many answered)
    def route(self, key: str, sequence: CallSequence) -> None: ...
    def unroute(self, key: str) -> None: ...
    def monotonic(self) -> float: ...  # the capacity's clock
    def hang_up_later(self, legs: Iterable[str]) -> None: ...  # legs no one follows: killed when a command gets through


class Reconnected:
    """Inbox marker: the Event Socket came back; ``restarted`` when FreeSWITCH's Core-UUID changed."""

    def __init__(self, restarted: bool) -> None:
        self.restarted = restarted


class Stop:
    """Inbox marker: stop following the call and leave it to FreeSWITCH (the daemon is shutting down, or
    another daemon took the call over); ``kind`` and ``note`` are the timeline step that says so."""

    def __init__(self, kind: str = "daemon_stopped",
                 note: str = "call left to FreeSWITCH; reconciled at next start") -> None:
        self.kind = kind
        self.note = note


class SwitchLost:
    """Inbox marker: the call's switch stayed unreachable for ``switch_lost_after``: end the call (it is
    never dialed elsewhere)."""

    def __init__(self, switch: str, seconds: float) -> None:
        self.switch = switch
        self.seconds = seconds


class RetryDial:
    """Inbox marker: try again an originate that was never sent."""


class Granted:
    """Inbox marker: the switch has room for this call's leg (``a`` or ``b``) now; it is reserved.
    ``forced``: B waited ``originate_timeout`` for room: it goes now and the switch decides."""

    def __init__(self, leg: str, forced: bool = False) -> None:
        self.leg = leg
        self.forced = forced


class RetrySend:
    """Inbox marker: try again to send A's steps that found no turn on a busy connection."""


class LegGone(Exception):
    """A question about a leg found it gone (``-ERR No such channel!``): it ended since the last look, and
    its hangup, routed to the call, tells how. An empty answer would read as "not set" and could make the
    call act on a leg that is not there (queue A's steps, the bridge to B among them, a second time)."""


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


class CallSequence:
    """Drives one call on FreeSWITCH and writes down what happens to it."""

    def __init__(self, call: Call, endpoint: Endpoint, switch: Switch, records: CallRecords,
                 options: CallOptions, *, adopted: bool = False, wait_for_room: bool = False,
                 on_end: Callable[[CallSequence], None] | None = None) -> None:
        """``wait_for_room``: A's room on the switch is not reserved yet (a call a previous run claimed and
        never sent): its originate waits in the switch's line like a refused A's retry."""
        self.call = call
        self.endpoint = endpoint
        self.switch = switch
        self.records = records
        self.options = options
        self.adopted = adopted
        self.wait_for_room = wait_for_room
        self.on_end = on_end
        self.inbox: gevent.queue.Queue = gevent.queue.Queue()
        # An adopted call resumes from what the store says happened before the restart.
        self.a = LegState(str(call.a_uuid), created=call.a_answered_at is not None, answered_at=call.a_answered_at)
        self.b = LegState(str(call.b_uuid), answered_at=call.bridged_at)
        self.job_uuid = new_uuid()
        self.apps = AppQueue(self._send_apps)
        self.apps_queued = False  # by this run, or (learned from A's cb_stage) by a previous one
        self.bridge_disposition = ""
        self.b_ended_at: dt.datetime | None = None  # when B's attempt ended unbridged: its ringing stops there
        self.recording = False
        self.connection_lost = False
        self.dial_pending = False
        self.send_stalled = False  # A's steps found no turn to be sent; retried (RetrySend)
        self.end_break_pending = False  # the break that lets A's notice and hangup run is still to be sent
        self.tail_unsent = False  # the tail marker (_mark_tail) found no turn: still to be sent
        self.done = False
        self.greenlet: gevent.Greenlet | None = None
        # Pacing: legs sent only when the switch has room; a leg it refused is sent again until then.
        self.capacity = switch.capacity
        self.backoff = {"a": Backoff(RETRY_FIRST, RETRY_CAP), "b": Backoff(RETRY_FIRST, RETRY_CAP)}
        self.deadline: dict[str, float] = {}  # leg -> monotonic time after which a refusal is final
        self.retry_in = {"a": 0.0, "b": 0.0}  # the backoff after the last refusal
        self.attempts = {"a": 0, "b": 0}  # originates of A and bridges to B sent
        self.wanted: set[str] = set()  # legs waiting in the capacity's line
        # Per leg: the timer that sends it at its deadline, or (not armed yet: the leg never waited in line)
        # the monotonic time it would fire at.
        self.forcing: dict[str, gevent.Greenlet | float] = {}
        self.refused_leg = ""  # the leg the switch kept refusing: the call fails for that
        # B: the wait A plays is known by its event UUID (wait_uuid); the last one acted on; the bridge
        # attempt whose retry steps are queued; what to do when the wait after a bridge starts.
        self.wait_acted = ""
        self._waits: dict[str, int] = {}  # wait_uuid(A, n) -> n, for n up to the last asked about
        self.requeued = 0
        self.after_bridge = ""  # for the bridge last sent: "retry" (refused: dial again) or "end" (notice, hang up)
        # A's originate_disposition still tells the refusal of the bridge before the one being sent now
        # (until that one starts): not a new outcome.
        self.refusal_on_a = False
        # An adopted call: the bridge attempt whose wait was flushed (_flush_and_requeue), and the marker
        # queued to learn whether A's steps end before its first wait (_queue_tail).
        self.wait_flushed: int | None = None
        self.tail_marker = ""
        self.dial_checked = False  # an adopted call: the switch's Core-UUID compared with the dial mark's
        self.a_marked = False  # the originate being sent is marked (CallRecords.mark_dialing_a)

    # -- life -------------------------------------------------------------------------------------
    @property
    def callid(self) -> str:
        return str(self.call.callid)

    @property
    def status(self) -> CallStatus:
        """Where the call stands: its stored status, which the records keep current on ``self.call``."""
        return CallStatus(self.call.status)

    def start(self) -> None:
        for key in (self.a.uuid, self.b.uuid, self.job_uuid):
            self.switch.route(key, self)
        self.greenlet = gevent.spawn(self._run)

    def deliver(self, item: EslEvent | Reconnected | Stop | RetryDial | RetrySend | Granted | SwitchLost) -> None:
        self.inbox.put(item)

    def _run(self) -> None:
        try:
            if self.wait_for_room:
                self._want("a")
            elif not self.adopted:
                self._dial_a()
            loop, me = gevent.get_hub().loop, gevent.getcurrent()
            while not self.done:
                try:
                    if self.inbox.qsize():
                        item = self.inbox.get()
                    else:
                        # What inbox.get(timeout=idle_check) does, without its Timeout object around the loop's
                        # timer: 5.2 -> 3.5 us per item woken for (nearly every event). A new timer each time:
                        # libev restarts a stopped one with what was left of it.
                        timer = loop.timer(self.options.idle_check, ref=True, priority=-1)
                        timer.start(me.throw, gevent.queue.Empty, update=True)
                        try:
                            item = self.inbox.get()
                        finally:
                            timer.close()
                except gevent.queue.Empty:
                    self._hold()
                    self._check_alive()
                    continue
                if isinstance(item, Stop):
                    self.records.step(self.call, item.kind, phase=self.status.value, note=item.note)
                    return
                self._hold()
                if isinstance(item, EslEvent):  # nearly every item: tested first
                    self._on_event(item)
                elif isinstance(item, SwitchLost):
                    self._switch_lost(item)
                elif isinstance(item, Granted):
                    self._granted(item.leg, forced=item.forced)
                elif isinstance(item, RetryDial):
                    if self.dial_pending:
                        self._want("a")
                elif isinstance(item, RetrySend):
                    if self.apps.unsent and not self.connection_lost:
                        self._guarded(self.apps.send_unsent, "queuing")
                    if self.end_break_pending and not self.apps.unsent and not self.connection_lost:
                        self._guarded(self._break_to_end, "ending")
                    if self.tail_unsent and not self.tail_marker and not self.connection_lost:
                        self._guarded(self._mark_tail, "queuing")
                elif isinstance(item, Reconnected) and self.dial_pending:
                    self._want("a")
                elif isinstance(item, Reconnected) and "a" in self.wanted:
                    pass  # a refused A waits in line for room: nothing of it exists to reconcile
                elif isinstance(item, Reconnected):
                    self._reconcile(item.restarted)
                del item  # don't keep the last event (kilobytes of headers) alive while waiting
        except NotOwned:
            # This daemon stalled past its lease and another took the call over: it follows the call now,
            # and this sequence sends nothing more (the legs are the new owner's).
            log_event(log, "lease.lost", logging.WARNING, callid=self.callid,
                      note="another daemon took the call over; no longer followed here")
        except DatabaseError:
            # The store stayed unwritable past the records' retries: leave the call to FreeSWITCH
            # (hanging up a healthy call would be worse). No longer renewed, its lease runs out and the lease
            # keeper adopts and reconciles it (daemon/calls/leases.py), or the next start does.
            log.exception("store unavailable; call left to FreeSWITCH", extra={"callid": self.callid})
        except Exception as exc:  # never leave a call without a final status
            log.exception("call sequence crashed", extra={"callid": self.callid})
            self._kill_legs()
            self.done = False  # (the crash may have come from inside _finish, after it set this)
            self._finish(CallStatus.FAILED, reason=f"internal error: {type(exc).__name__}")
        finally:
            for key in (self.a.uuid, self.b.uuid, self.job_uuid):
                self.switch.unroute(key)
            for timer in self.forcing.values():  # a leg's deadline, armed while it waited in line
                if isinstance(timer, gevent.Greenlet):
                    timer.kill(block=False)
            for leg in (self.a, self.b):
                self.capacity.withdraw(leg.uuid)
                if not leg.created:
                    self.capacity.failed(leg.uuid)  # a slot reserved for it is free again
                self.capacity.unreserve(leg.uuid)  # a grant that came for a leg already gone: room for no one
            if self.on_end:
                self.on_end(self)

    def _hold(self) -> None:
        """Before acting on anything: when this daemon's leases may have run out (it stalled), make sure the
        call is still its own (raises ``NotOwned`` if another daemon took it over and acts on it now)."""
        if self.records.lease_lapsed():
            self.records.hold(self.call)

    # -- commands ---------------------------------------------------------------------------------
    def _leg_vars(self, leg_uuid: str) -> dict[str, str | int | bool]:
        return fs.leg_variables(leg_uuid=leg_uuid, callid=self.callid,
                                caller_id_number=self.endpoint.caller_id_number,
                                caller_id_name=self.endpoint.caller_id_name,
                                originate_timeout=self.options.originate_timeout)

    def _a_variables(self) -> dict[str, str | int | bool]:
        """A's own variables: also those the bridge from A reads (set here, not by apps after the answer)."""
        variables = self._leg_vars(self.a.uuid)
        variables.update({"hangup_after_bridge": True, "continue_on_fail": True, "instant_ringback": True})
        if self.endpoint.record:
            variables["RECORD_STEREO"] = True
        return variables

    def _dial_a(self) -> None:
        """Send A's originate; the switch's room for it is already reserved (dispatcher or a grant)."""
        command = fs.originate_a(template=self.endpoint.dial_string, phone=self.call.phone_a,
                                 variables=self._a_variables())
        retry = self.dial_pending
        self.dial_pending = False
        if self.attempts["a"]:
            # Again after a refusal: same A (never created), a new job to hear the answer by.
            self.switch.unroute(self.job_uuid)
            self.job_uuid = new_uuid()
            self.switch.route(self.job_uuid, self)
        self.a_marked = False
        try:
            reply = self.switch.bgapi(command, self.job_uuid, before_send=self._sending_a)
        except HangupRequested as exc:  # an operator's hangup came first: A is never dialed (again)
            self.capacity.cancel(self.a.uuid)
            self._finish(CallStatus.CANCELED, reason=str(exc), canceled_by=exc.by[:100])
            return
        except (EslNotSent, OperationalError) as exc:
            # Never reached FreeSWITCH (no connection, no turn, or the store refused the mark): dial when
            # reconnected, or in a moment if the connection or the store was only busy.
            self.capacity.cancel(self.a.uuid)
            if self.a_marked:  # the connection went while the mark committed: a next start must dial it
                self.records.step(self.call, NOT_SENT, leg="a", error=str(exc))
            if not retry and isinstance(exc, EslNotSent):
                self.records.step(self.call, "waiting_for_switch", phase="dialing_a")
            self.dial_pending = True
            gevent.spawn_later(1.0, self.deliver, RetryDial())
            return
        except EslError as exc:
            # The originate may or may not have reached FreeSWITCH: never send it again; find out.
            self.connection_lost = True
            self.records.step(self.call, "connection_lost", phase="dialing_a", error=str(exc))
            return
        self.attempts["a"] += 1
        self.deadline.setdefault("a", self.switch.monotonic() + self.options.originate_timeout)
        if not reply.startswith("+OK"):
            self._finish(CallStatus.FAILED, failed_leg="a", a_cause="", reason=f"originate refused: {reply}")

    def _sending_a(self) -> None:
        """A's originate has its turn and is about to leave: marked first (each attempt: a refusal marked
        after it tells the next start that nothing was sent since; ``CallRecords.unsent_because``), then
        counted against the switch's budget from this moment (the mark's commit may have taken a while)."""
        self.records.mark_dialing_a(self.call, attempt=self.attempts["a"] + 1, core_uuid=self.switch.core_uuid)
        self.a_marked = True
        self.capacity.sent(self.a.uuid, self.switch.monotonic())

    def _queue_apps(self) -> None:
        """After A answers: everything A hears, the wait, the bridge to B and the wait again, queued on A."""
        call, endpoint = self.call, self.endpoint
        ringback = self._playable(call.dialtone_file) if call.dialtone_file else fs.ring_tone(endpoint.ring_tone)
        steps = [
            AppStep("multiset", fs.multiset_arg({"cb_stage": "queued", "ringback": ringback,
                                                 "transfer_ringback": ringback})),
            self._max_duration(),
        ]
        for prompt in (call.play_file, call.msg_file):
            if prompt:
                steps.append(AppStep("playback", self._playable(prompt)))
        self.wait_step = self._wait(0)
        bridge = self._bridge()
        steps += [self.wait_step, bridge, self._wait(1)]
        self.apps_queued = True
        self.apps.start(steps, bridge=bridge)

    def _bridge(self) -> AppStep:
        return AppStep("bridge", fs.bridge_target(template=self.endpoint.dial_string, phone=self.call.phone_b,
                                                  variables=self._leg_vars(self.b.uuid)))

    def _wait(self, attempt: int) -> AppStep:
        """A's dialtone looped until we break it: after ``attempt`` bridges (0: before the first)."""
        return AppStep("playback", self._wait_sound(), event_uuid=wait_uuid(self.a.uuid, attempt), loops=-1)

    def _wait_sound(self) -> str:
        call = self.call
        if call.dialtone_file and (_media_seconds(call.dialtone_file) or 0.0) >= SHORTEST_LOOP:
            return self._playable(call.dialtone_file)
        return fs.tone_playback(self.endpoint.ring_tone)

    def _wait_index(self, app_uuid: str, upto: int | None = None) -> int | None:
        """Which wait ``app_uuid`` is (how many bridges came before it), or None."""
        last = self.attempts["b"] + 1 if upto is None else upto
        waits = self._waits  # asked at each app event of A: each UUID derived once, then one dict lookup
        while len(waits) <= last:
            waits[wait_uuid(self.a.uuid, len(waits))] = len(waits)
        index = waits.get(app_uuid)
        return index if index is not None and index <= last else None

    def _send_apps(self, steps: list[AppStep]) -> None:
        a = self.a.uuid
        self.switch.send_messages([fs.sendmsg_execute(a, step.app, step.arg, event_uuid=step.event_uuid, loops=step.loops)
                                   for step in steps])

    def _send_app(self, step: AppStep) -> None:
        self._send_apps([step])

    # -- pacing -----------------------------------------------------------------------------------
    def _want(self, leg: str, delay: float = 0.0) -> None:
        """Ask for room on the switch for ``leg``; it is sent when granted (now, or via a Granted item)."""
        now = self.switch.monotonic()
        uuid = self.a.uuid if leg == "a" else self.b.uuid
        if leg == "b":
            self.deadline.setdefault("b", now + self.options.originate_timeout)
        force = self.forcing.get(leg)
        if leg in self.deadline and (force is None or (force <= now if isinstance(force, float) else force.dead)):
            # A leg waits for room until originate_timeout has passed since it was first wanted; then it
            # goes anyway and the switch decides (a refusal then fails the call). Wanted again after that
            # (its forced send found no connection, or a refusal's retry came due past it), it goes at once
            # or after its delay: never into a line it could wait in for ever. The timer is armed only once
            # the leg waits in line (below): a leg sent at once (nearly every B) needs none, and one armed
            # for it would outlive the call (a greenlet holding the sequence until originate_timeout).
            self.forcing[leg] = float(now + max(0.0, self.deadline[leg] - now, delay))  # (never a Greenlet)
        granted = self.capacity.request(uuid, leg, now, lambda: self.deliver(Granted(leg)),
                                        not_before=now + delay)
        if granted:
            self.wanted.discard(leg)
            self._send_leg(leg)
            return
        due = self.forcing.get(leg)
        if isinstance(due, float):  # the forced send this leg was given, not armed while nothing waited for it
            self.forcing[leg] = gevent.spawn_later(max(0.0, due - now), self.deliver, Granted(leg, forced=True))
        if delay <= 0 and leg not in self.wanted:
            self.records.step(self.call, "paced", leg=leg, note="waiting for room on the switch",
                              sessions=self.capacity.sessions, rate=self.capacity.rate(now))
        self.wanted.add(leg)

    def _granted(self, leg: str, forced: bool = False) -> None:
        """The line gave ``leg`` its turn (room reserved for it), or its deadline came (``forced``): it goes
        if it still waits. Both may arrive, in either order: the second finds it gone and lets it be."""
        uuid = self.a.uuid if leg == "a" else self.b.uuid
        if leg not in self.wanted:
            if not forced:
                self.capacity.unreserve(uuid)  # the line's room, not used: the leg went under another
            return
        if forced:
            self.capacity.withdraw(uuid)
            self.capacity.reserve(uuid, self.switch.monotonic())
        self.wanted.discard(leg)
        self._send_leg(leg)

    def _send_leg(self, leg: str) -> None:
        """Send ``leg`` under the room reserved for it, or give the room back if the call has moved on."""
        uuid = self.a.uuid if leg == "a" else self.b.uuid
        if leg == "a":
            if self.done or self.a.created or self.a.gone or self.connection_lost:
                self.capacity.cancel(uuid)
                return
            self._dial_a()
            return
        if self.done or self.a.gone or self.b.created or self.connection_lost:
            self.capacity.cancel(uuid)
            return
        self._send_b()

    def _send_b(self) -> None:
        """Dial B now: (after a refusal, queue the bridge and the wait again, then) break A's wait."""
        attempt = self.attempts["b"]
        if self.apps.uncertain:
            # Steps in doubt since a lost connection, not settled yet (the look after the reconnect found no
            # turn and is taken again): the break would run whatever of them arrived, or none. B waits for it.
            # (Once the look has queued the marker behind them, the break is safe: A runs the bridge if it
            # arrived, else the marker, which has it sent then.)
            self.capacity.cancel(self.b.uuid)
            self._want("b", delay=1.0)
            return
        try:
            if self.apps.bridge is None:
                self._flush_and_requeue(attempt)
            elif attempt > 0 and self.requeued != attempt:
                self._requeue_bridge(attempt)
            elif self.apps.pending:
                self.apps.send_unsent()
            self.capacity.sent(self.b.uuid, self.switch.monotonic())
            if self.wait_flushed != attempt:
                self.switch.api(fs.uuid_break(self.a.uuid))
        except EslNotSent:
            # Nothing (more) left: the room goes back; ask again in a moment.
            self.capacity.cancel(self.b.uuid)
            self._want("b", delay=1.0)
            return
        except EslError as exc:
            self.connection_lost = True
            self.records.step(self.call, "connection_lost", phase="dialing_b", error=str(exc))
            return
        self.attempts["b"] += 1
        self.after_bridge = ""  # the decision about the bridge before is spent: this one's outcome is to come

    def _flush_and_requeue(self, attempt: int) -> None:
        """An adopted call at A's wait: a previous run may have died while queueing on A, so what A holds
        after this wait (the bridge, the wait after it, some of them, none) is unknown. All of it goes, the
        wait with it (``uuid_break all``), and the bridge and the wait after it are queued anew: the bridge
        starts as it arrives, and B is dialed once whatever had arrived."""
        self.switch.api(fs.uuid_break(self.a.uuid, flush=True))
        self.wait_flushed = attempt
        self._requeue_bridge(attempt)

    def _requeue_bridge(self, attempt: int) -> None:
        """Queue on A the bridge for attempt ``attempt + 1`` and the wait after it."""
        self.requeued = attempt
        bridge = self._bridge()
        self.apps.extend([bridge, *self._wait_after(attempt + 1)], bridge=bridge)

    def _wait_after(self, bridges: int) -> list[AppStep]:
        """The wait after ``bridges`` bridges, as queued after a bridge: from the second bridge on, A's
        ``cb_wait`` set to its number first, so that a look after a gap knows which wait A plays
        (:meth:`_wait_playing`). The first two need none (no bridge ran on A yet; one did and ``cb_wait``
        is unset), so a call whose B is not refused sends nothing more for it."""
        wait = self._wait(bridges)
        return [AppStep("set", fs.set_arg(WAIT_VAR, str(bridges))), wait] if bridges >= 2 else [wait]

    def _queue_tail(self) -> None:
        """The marker an adopted call queued behind A's steps ran before any wait: A's steps ended short (the
        previous run died while sending them). After a bridge, the wait that follows it is queued now (its
        start acts on the bridge's outcome); before any, the maximum duration (again: the earlier one, if
        it arrived, still ends the call first), the wait, the bridge and the wait after it."""
        if self.after_bridge:
            self.apps.extend(self._wait_after(max(1, self.attempts["b"])))
            return
        bridge = self._bridge()
        self.apps.start([self._max_duration(), self._wait(0), bridge, self._wait(1)], bridge=bridge)

    def _max_duration(self) -> AppStep:
        return AppStep("sched_hangup", f"+{int(self.endpoint.max_duration)} {MAX_DURATION_CAUSE}")

    def _refused(self, leg: str, attempt: int) -> float | None:
        """The switch refused ``leg`` (nothing created): seconds until it is tried again, or None when
        ``originate_timeout`` has passed since it was first wanted (the call fails)."""
        now = self.switch.monotonic()
        uuid = self.a.uuid if leg == "a" else self.b.uuid
        self.capacity.refused(uuid, leg, now)
        self.records.metrics.switch_throttled.labels(leg).inc()
        if now < self.deadline.get(leg, now) and not self.a.gone:
            delay = self.backoff[leg].next()
            self.retry_in[leg] = delay
            self.records.step(self.call, THROTTLED, leg=leg, cause=REFUSED_CAUSE, attempt=attempt,
                              retry_in=round(delay, 2))
            return delay
        self.refused_leg = leg
        self.records.step(self.call, THROTTLED, leg=leg, cause=REFUSED_CAUSE, attempt=attempt,
                          note=f"still refused after {self.options.originate_timeout} s: giving up")
        return None

    def _end_a(self) -> None:
        """B will not be bridged: A hears the busy notice, then is hung up (its wait broken). What finds no
        turn to be sent (a backlogged connection) is sent a moment later (RetrySend): the notice and the
        hangup, then the break. Left unsent, A would hear its looped dialtone until its maximum duration."""
        self.wait_acted = "ending"
        self.end_break_pending = True
        try:
            self.apps.extend([AppStep("playback", FAILURE_NOTICE), AppStep("hangup", "NORMAL_CLEARING")])
        except EslNotSent:
            raise  # kept unsent: RetrySend sends them, then the break
        except EslError:
            self._kill_a()
            raise  # the connection went: noted (_guarded), and the reconnect's look settles the call
        self._break_to_end()

    def _break_to_end(self) -> None:
        """Break A's wait: the notice and hangup queued after it run."""
        try:
            self.switch.api(fs.uuid_break(self.a.uuid))
        except EslNotSent:
            raise  # still pending: RetrySend sends it
        except EslError:
            self._kill_a()
            raise  # the connection went: noted (_guarded), and the reconnect's look settles the call
        self.end_break_pending = False

    def _kill_a(self) -> None:
        self.end_break_pending = False
        with contextlib.suppress(EslError):
            self.switch.api(fs.uuid_kill(self.a.uuid, "NORMAL_CLEARING"))

    def _guarded(self, action: Callable[[], None], phase: str) -> None:
        """Run a sending action; a lost connection is noted and handled once reconnected. A step that found
        no turn to be sent (the connection busy with other calls' commands, or down) was not sent: it and
        those after it are tried again in a moment (and on reconnecting)."""
        try:
            action()
        except EslNotSent as exc:
            if not self.send_stalled:  # noted once, not at every retry while the switch is away
                self.records.step(self.call, "waiting_for_switch", phase=phase, error=str(exc))
            self.send_stalled = True
            gevent.spawn_later(1.0, self.deliver, RetrySend())
            return
        except EslError as exc:
            self.connection_lost = True
            self.records.step(self.call, "connection_lost", phase=phase, error=str(exc))
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
            self.records.step(self.call, "recording_failed", error=str(exc))
            return
        if reply.startswith("+OK"):
            self.recording = True
            self.records.recording_started(self.call, path)
        else:
            self.records.step(self.call, "recording_failed", error=reply.strip())

    def _kill_legs(self) -> None:
        """Hang up the legs still up (this sequence gives up on the call); one whose kill did not get
        through is left to the switch's link, which hangs it up as soon as a command does."""
        for leg in (self.a, self.b):
            if leg.gone:
                continue
            try:
                self.switch.api(fs.uuid_kill(leg.uuid, "NORMAL_CLEARING"))
            except EslError:
                self.switch.hang_up_later([leg.uuid])

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
                self.records.step(self.call, f"{tag}_ringing",
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
                self._learn_answer(event)
                self._learn_bridge_outcome(event)
            self._on_leg_gone(leg, tag, event.get("Hangup-Cause") or "")

    def _on_b_created(self) -> None:
        self.refusal_on_a = False
        self._b_dialing()
        self._guarded(self.apps.b_appeared, "queuing")

    def _on_originate_result(self, body: str) -> None:
        if not body.startswith("-ERR"):
            return
        cause = body[4:].strip().split()[0] if body[4:].strip() else "UNKNOWN"
        if cause == REFUSED_CAUSE and not self.a.created:
            # Refused before anything was dialed (no CHANNEL_CREATE for A): not a failure of A's.
            delay = self._refused("a", self.attempts["a"])
            if delay is not None:
                self._want("a", delay=delay)
                return
        elif not self.a.created:
            self.capacity.failed(self.a.uuid)
        self.a.gone = True
        self.a.cause = self.a.cause or cause
        self._conclude()

    def _on_answer(self, leg: LegState, tag: str) -> None:
        if leg.answered_at is not None:
            return
        now = self.records.clock()
        leg.answered_at = now
        if leg is self.a:
            self.records.a_answered(self.call, at=now)
            if not self.apps_queued:
                self._guarded(self._queue_apps, "queuing")
        else:
            self.records.b_answered(self.call, at=now)

    def _on_execute(self, event: EslEvent) -> None:
        app_uuid = event.get("Application-UUID") or ""
        if self.apps.in_doubt:  # steps in doubt since a lost connection: this one arrived
            self._guarded(lambda: self.apps.started(app_uuid), "queuing")
        step = self.apps.find(app_uuid)
        if step is not None and step is self.apps.marker:
            self._guarded(self.apps.marker_ran, "queuing")
        elif app_uuid and app_uuid == self.tail_marker:
            self.tail_marker = ""
            if not self.done and not self.a.gone:
                self._guarded(self._queue_tail, "queuing")
        elif (waiting := self._wait_index(app_uuid, upto=MAX_WAITS if self.adopted else None)) is not None:
            self._on_wait(app_uuid, waiting)
        elif step.app == "bridge" if step is not None else event.get("Application") == "bridge":
            self.refusal_on_a = False
            self._b_dialing()
        elif step is not None and step.app == "playback" and step.arg != FAILURE_NOTICE:
            self.records.step(self.call, "prompt_started", file=os.path.basename(step.arg))

    def _on_wait(self, app_uuid: str, bridges_before: int) -> None:
        """A plays a wait (each of its rounds says so: act once): before the first bridge, B is wanted;
        after a bridge, what its outcome decided."""
        self.apps.started(app_uuid)  # a wait in doubt since a lost connection (the marker's) had arrived
        if app_uuid == self.wait_acted or self.done:
            return
        self.tail_marker = ""  # A's steps did not end short: what follows the wait is seen to at B's turn
        # An adopted call learns from the waits how many bridges the previous run sent.
        self.attempts["b"] = max(self.attempts["b"], bridges_before)
        if bridges_before < self.attempts["b"]:
            return  # a wait whose next bridge is sent already (its break on the way): nothing to decide
        self.wait_acted = app_uuid
        if bridges_before == 0:
            self._want("b")
        elif self.after_bridge == "retry":
            self._want("b", delay=self.retry_in["b"])
        elif self.after_bridge != "bridged":
            self._guarded(self._end_a, "ending")

    def _b_dialing(self) -> None:
        if self.status in (CallStatus.DIALING_A, CallStatus.A_ANSWERED):
            self.records.dialing_b(self.call, at=self.records.clock())

    def _on_execute_complete(self, event: EslEvent) -> None:
        app_uuid = event.get("Application-UUID") or ""
        step = self.apps.find(app_uuid)
        # An adopted call did not queue its apps in this run: it knows its bridge by name only.
        is_bridge = step.app == "bridge" if step is not None else event.get("Application") == "bridge"
        if step is None and not is_bridge:
            return
        if is_bridge:
            disposition = event.get("variable_originate_disposition") or ""
            self.records.step(self.call, "bridge_ended", disposition=disposition,
                              dialstatus=event.get("variable_DIALSTATUS"),
                              cause=event.get("variable_last_bridge_hangup_cause"))
            self._bridge_outcome(disposition)
            if self.apps.pending and disposition != "SUCCESS" and not self.a.gone:
                with contextlib.suppress(EslError):  # the wait after it may never have been queued
                    self.switch.api(fs.uuid_kill(self.a.uuid, "NORMAL_CLEARING"))
            elif self.apps.bridge is None and disposition != "SUCCESS" and not self.a.gone:
                self._guarded(self._mark_tail, "queuing")  # a previous run's bridge: is its wait queued?
        elif step is not None and step.app == "playback" and step.arg != FAILURE_NOTICE \
                and self._wait_index(app_uuid) is None:
            self.records.step(self.call, "prompt_finished", file=os.path.basename(step.arg),
                              result=event.get("Application-Response"))

    def _bridge_outcome(self, disposition: str) -> None:
        """A bridge ended: bridged; refused by the switch (no B created: dial again, or give up); failed."""
        if disposition == "SUCCESS":
            self.bridge_disposition = disposition
            self.after_bridge = "bridged"
            if self.status != CallStatus.BRIDGED:
                self._on_bridged(late=True)  # the bridge happened while we could not hear it
            return
        if disposition == REFUSED_CAUSE and not self.b.created:
            if self._refused("b", self.attempts["b"]) is not None:
                self.after_bridge = "retry"
                self.refusal_on_a = True
                return  # not the call's outcome: B is dialed again
        elif not self.b.created:
            self.capacity.failed(self.b.uuid)
        self.bridge_disposition = disposition
        self.after_bridge = "end"
        self._b_ended()

    def _b_ended(self) -> None:
        """B's attempt is over (its hangup, or the bridge's failure, whichever is heard first)."""
        if self.b_ended_at is None and self.call.b_dialed_at:
            self.b_ended_at = self.records.clock()

    def _on_bridged(self, late: bool = False) -> None:
        if self.status == CallStatus.BRIDGED:
            return
        now = self.records.clock()
        self.b.created = True
        if self.b.answered_at is None:
            self.b.answered_at = now
        ring = round((now - self.call.b_dialed_at).total_seconds(), 3) if self.call.b_dialed_at else None
        self.records.bridged(self.call, at=now, ring_seconds=ring)
        if self.endpoint.record and not late:
            self._start_recording()

    def _learn_answer(self, hangup: EslEvent) -> None:
        """A answered while no daemon heard it (a restart, a lost connection) and is gone now: its hangup
        says when it answered, so the call ends as "A hung up ...", not "A was not reached"."""
        if self.a.answered_at is not None:  # (nearly every call: its answer was heard)
            return
        answered_us = hangup.get("Caller-Channel-Answered-Time") or "0"
        if not answered_us.isdigit() or int(answered_us) == 0:
            return
        now = self.records.clock()
        at = EPOCH + dt.timedelta(microseconds=int(answered_us))
        if not self.call.started_at or not self.call.started_at <= at <= now:
            at = now  # the switch's clock disagrees with ours: when we learned it is what we know
        self.a.answered_at = at
        self.records.a_answered(self.call, at=at)

    def _learn_bridge_outcome(self, hangup: EslEvent) -> None:
        """A's last event carries all its variables: a bridge that ended while we could not hear it (a
        restart, a lost connection) still tells its outcome here."""
        disposition = hangup.get("variable_originate_disposition") or ""
        if self.bridge_disposition or disposition in ("", "failure"):
            return
        if disposition == REFUSED_CAUSE and self.refusal_on_a:
            return  # the refusal we were about to dial B again after: A hung up meanwhile
        self.bridge_disposition = disposition
        if disposition == "SUCCESS":
            self._on_bridged(late=True)
        else:
            if not self.b.created:  # B came and went unseen
                self.b.created = self.b.gone = True
            self.b.cause = self.b.cause or disposition
            self.records.step(self.call, "bridge_ended", disposition=disposition,
                              dialstatus=hangup.get("variable_DIALSTATUS"), source="A's hangup")

    def _on_leg_gone(self, leg: LegState, tag: str, cause: str) -> None:
        if leg.gone:
            return
        leg.gone = True
        leg.cause = cause or leg.cause
        if leg is self.b:
            self._b_ended()
        self.records.step(self.call, f"{tag}_hangup", cause=leg.cause)
        self._conclude()

    # -- endings ----------------------------------------------------------------------------------
    def _conclude(self) -> None:
        """End the call once A is gone and B is gone or was never created."""
        if not self.a.gone or (self.b.created and not self.b.gone):
            return
        if self.call.bridged_at or self.status == CallStatus.BRIDGED:
            self._finish(CallStatus.COMPLETED)
        elif self.refused_leg:
            leg = self.refused_leg
            self._finish(CallStatus.FAILED, failed_leg=leg, reason=REFUSED,
                         a_cause=REFUSED_CAUSE if leg == "a" else None, b_cause=REFUSED_CAUSE if leg == "b" else None)
        elif self.a.answered_at is None:
            self._finish(CallStatus.FAILED, failed_leg="a", reason="A was not reached")
        elif self.bridge_disposition and self.bridge_disposition not in CALLER_GONE | {"SUCCESS"}:
            self.b.cause = self.b.cause or self.bridge_disposition
            self._finish(CallStatus.FAILED, failed_leg="b", b_cause=self.b.cause or self.bridge_disposition,
                         reason="B was not reached")
        else:
            if self.status == CallStatus.DIALING_B and self.after_bridge == "retry" and not self.b.created:
                when = "while B waited for room on the switch"  # refused over its limits: never rang
            elif self.status == CallStatus.DIALING_B:
                when = "while B was ringing"
            elif (self.call.play_file or self.call.msg_file) and not self.wait_acted:
                when = "during the prompts"  # (once A's wait started, the prompts were over)
            else:
                when = "before B was dialed"
            # A's own sched_hangup (the endpoint's maximum duration) ended A: A did not hang up.
            who = (f"the call reached the endpoint's maximum duration ({int(self.endpoint.max_duration)} s)"
                   if self.a.cause == MAX_DURATION_CAUSE else "A hung up")
            self._finish(CallStatus.FAILED, failed_leg="a", reason=f"{who} {when}")

    def _finish(self, status: CallStatus, *, reason: str = "", failed_leg: str | None = None,
                a_cause: str | None = None, b_cause: str | None = None, end_heard: bool = True,
                canceled_by: str | None = None) -> None:
        """End the call; the legs' causes, ring or talk time and the recording's size come from what we saw.
        ``end_heard`` False: it ended while no daemon heard it, so its end time is not known."""
        if self.done:
            return
        self.done = True
        now = self.records.clock()
        talk = ring = None
        if not end_heard:
            pass  # it ended while nobody heard it: "now" would count the time we could not hear as talk or ring
        elif self.call.bridged_at:
            talk = round((now - self.call.bridged_at).total_seconds(), 3)
        elif self.call.b_dialed_at:
            # B rang until its attempt ended, not through the busy notice A hears after it.
            ring = round(((self.b_ended_at or now) - self.call.b_dialed_at).total_seconds(), 3)
        size = seconds = None
        if self.recording and self.call.recording_path and os.path.exists(self.call.recording_path):
            size = os.path.getsize(self.call.recording_path)
            seconds = _wav_seconds(self.call.recording_path)
        self.records.finish(self.call, status, at=now, reason=reason, failed_leg=failed_leg,
                            a_cause=self.a.cause if a_cause is None else a_cause,
                            b_cause=self.b.cause if b_cause is None else b_cause,
                            ring_seconds=ring, talk_seconds=talk, recording_bytes=size, recording_seconds=seconds,
                            canceled_by=canceled_by)

    # -- when the connection was lost or nothing is heard -----------------------------------------
    def _switch_lost(self, lost: SwitchLost) -> None:
        """The switch was unreachable too long: what became of the legs is unknown, and no leg is blamed."""
        if self.done:
            return
        seconds = round(lost.seconds)
        self.records.step(self.call, "switch_lost", switch=lost.switch, unreachable_seconds=seconds,
                          phase=self.status.value)
        self.a.gone = self.b.gone = True
        self._finish(CallStatus.FAILED, reason=SWITCH_LOST_REASON.format(switch=lost.switch, seconds=seconds),
                     end_heard=False)

    def _exists(self, leg_uuid: str) -> bool:
        return self.switch.api(fs.uuid_exists(leg_uuid)).strip() == "true"

    def _getvar(self, leg_uuid: str, name: str) -> str:
        """A channel variable of the leg; "" when unset. Raises LegGone when the leg is not there."""
        value = self.switch.api(fs.uuid_getvar(leg_uuid, name)).strip()
        if value.startswith(fs.NO_SUCH_CHANNEL):
            raise LegGone(leg_uuid)
        return "" if value in ("_undef_", "") or value.startswith("-ERR") else value

    def _b_created(self) -> bool:
        """B was created: it exists, or came and went (A's ``originated_legs`` names it: a bridge dialed it)."""
        return self._exists(self.b.uuid) or self.b.uuid in self._getvar(self.a.uuid, "originated_legs")

    def _answered(self, leg_uuid: str) -> bool:
        # FreeSWITCH sets endpoint_disposition=ANSWER when a leg answers (answer_epoch only at hangup).
        return self._getvar(leg_uuid, "endpoint_disposition") == "ANSWER"

    def _reconcile(self, restarted: bool) -> None:
        """Find out from FreeSWITCH what became of this call while we could not hear it."""
        self.connection_lost = False
        # Adopted (a restart, or another daemon's call taken over): what happened since was heard by no one.
        unfollowed = self.adopted and not self.dial_checked
        if unfollowed:
            # The engine's first connection has no Core-UUID to compare with: the dial mark has one.
            self.dial_checked = True
            dialed_on = self.records.dialed_on(self.call)
            now_on = self.switch.core_uuid
            restarted = restarted or (None not in (dialed_on, now_on) and dialed_on != now_on)
        if restarted:
            self.records.step(self.call, "switch_restarted")
            self.a.gone = self.b.gone = True
            # No leg failed: the switch did. Both legs vanished with it, causes unknown.
            self._finish(CallStatus.FAILED, reason="FreeSWITCH restarted during the call", end_heard=False)
            return
        try:
            a_alive = self._exists(self.a.uuid)
            b_alive = self._exists(self.b.uuid)
            if not a_alive:
                if b_alive:
                    self.switch.api(fs.uuid_kill(self.b.uuid, "NORMAL_CLEARING"))
                self.a.gone = self.b.gone = True
                self.records.step(self.call, "reconciled", a="gone", b="gone")
                if self.call.bridged_at:
                    self._finish(CallStatus.COMPLETED, reason=UNFOLLOWED_END if unfollowed else UNHEARD_END,
                                 end_heard=False)
                elif self.refused_leg or self.bridge_disposition not in CALLER_GONE | {"SUCCESS", ""}:
                    # B's failure was heard before the connection went: A then heard the notice and was
                    # hung up, as it was told to.
                    self._conclude()
                else:
                    # Both legs ended unheard: which one failed, and why, is not known.
                    self._finish(CallStatus.FAILED, reason=UNFOLLOWED_INTERRUPTED if unfollowed else INTERRUPTED,
                                 end_heard=False)
                return
            self.records.step(self.call, "reconciled", a="up", b="up" if b_alive else "absent")
            if self.apps.to_resume:
                self.apps.resume(self._b_created, lambda name: self._getvar(self.a.uuid, name))
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
            if self.apps_queued and self._resume_wait():
                return
            disposition = self._getvar(self.a.uuid, "originate_disposition")
            # FreeSWITCH sets "failure" when a bridge starts and the real outcome when it ends.
            if disposition == "failure" and not self.b.created:
                self._b_dialing()  # the bridge is dialing B right now
            elif disposition == REFUSED_CAUSE and not self.b.created and self.status != CallStatus.BRIDGED \
                    and self.b.uuid not in self._getvar(self.a.uuid, "originated_legs"):
                # The switch refused the bridge's B (nothing dialed) and A, not on a wait yet, goes to the one
                # after it (or has none queued: the marker tells): that wait's start dials B again.
                if not self.after_bridge and not self.refusal_on_a:  # (else known, or the one before's)
                    self.records.step(self.call, "bridge_ended", disposition=disposition, source="A's variables")
                    self._refused_unheard(max(1, self.attempts["b"]))
                if self.apps.bridge is None:
                    self._see_to_tail()  # a previous run's bridge: the wait after it may not be queued
            elif disposition and disposition not in ("SUCCESS", "failure") and self.status != CallStatus.BRIDGED:
                # The bridge failed unheard; A's queued notice and hangup follow.
                self.bridge_disposition = disposition
                self.b.cause = self.b.cause or disposition
                self.b.created = self.b.gone = True
                self.records.step(self.call, "bridge_ended", disposition=disposition)
                # The wait after it ends the call. (Only a refusal is retried, so this is the last bridge's
                # outcome: a "retry" still here was an earlier bridge's, whose retry's break was lost in flight.)
                self.after_bridge = "end"
                if self.apps.bridge is None:
                    self._see_to_tail()  # a previous run's bridge: the wait after it may not be queued
            elif self.status in (CallStatus.DIALING_B, CallStatus.BRIDGED) or self.b.created:
                # B came and went while we were away: its cause is lost.
                self.b.created = self.b.gone = True
            elif self.apps_queued and self.apps.bridge is None:
                self._see_to_tail()
        except LegGone:
            # A leg ended while we looked (after uuid_exists said it was up): its hangup follows in the
            # inbox, and if it never comes the idle check looks again (_check_alive).
            pass
        except EslNotSent:
            # A question or a step found no turn (every call reconciles at once after a reconnect) or the
            # connection is down again: nothing half-sent, so the whole look is taken again in a moment.
            gevent.spawn_later(1.0, self.deliver, Reconnected(False))
        except EslError:
            self.connection_lost = True

    def _see_to_tail(self) -> None:
        """A reconnect finds A on no wait, its steps queued by a previous run: queue the tail marker, or, one
        queued already, see whether it ran while the connection was down (A's TAIL_VAR names it): its start,
        unheard, meant A's steps ended short (_queue_tail); not yet run, its start is heard on this
        connection. (A wait would have held A before it: we break only a wait heard to start, and that one
        clears the marker.)"""
        if not self.tail_marker:
            self._mark_tail()
        elif self._getvar(self.a.uuid, TAIL_VAR) == self.tail_marker:
            self.tail_marker = ""
            self._queue_tail()

    def _mark_tail(self) -> None:
        """A's steps were queued by a previous run and A is not at a wait yet: they may end short (that run
        died while sending them). A marker queued behind them tells: its start before any wait's means
        they did (_queue_tail); a wait starting first is flushed with what follows it (_flush_and_requeue)."""
        marker_uuid = new_uuid()
        self.tail_unsent = True  # until sent: one that finds no turn is sent again (RetrySend)
        self._send_app(AppStep("set", fs.set_arg(TAIL_VAR, marker_uuid), event_uuid=marker_uuid))
        self.tail_unsent = False
        self.tail_marker = marker_uuid

    def _resume_wait(self) -> bool:
        """After a gap (a reconnection, or a start that adopted the call): if A plays a wait, act on it as if
        its start had just been heard, at once. True if it does.

        Which wait A plays is read from what FreeSWITCH keeps on A (:meth:`_wait_playing`), not from
        ``app_uuid``: FreeSWITCH 1.10 removes that as each queued app starts (switch_core_session_exec; no
        event of traces 13 and 16 carries it). A wait after a bridge whose end went unheard is retried when
        the bridge was refused over the switch's limits and B provably never existed (it is in no
        ``originated_legs`` of A's): B is wanted again (an adopted call then drops A's queue with the wait
        and queues the bridge anew, :meth:`_flush_and_requeue`); after any other outcome the call ends.
        """
        waits = self._wait_playing()
        if waits is None:
            return False
        current = wait_uuid(self.a.uuid, waits)  # its next rounds' CHANNEL_EXECUTE carry it: acted on once
        if waits < self.attempts["b"]:
            return True  # its next bridge is sent already: A is on its way there
        if waits > self.attempts["b"]:
            # The bridge before this wait ran unheard (the break that started it was lost in flight, or the
            # call was adopted): what was decided was about an earlier bridge, not this one's outcome.
            self.attempts["b"] = waits
            self.after_bridge, self.refusal_on_a = "", False
        if waits > 0 and not self.after_bridge:
            disposition = self._getvar(self.a.uuid, "originate_disposition")
            self.records.step(self.call, "bridge_ended", disposition=disposition, source="A's variables")
            never_created = self.b.uuid not in self._getvar(self.a.uuid, "originated_legs")
            if disposition == REFUSED_CAUSE and never_created and not self.b.created:
                self._refused_unheard(waits)
            else:
                self.bridge_disposition = disposition or "failure"
                self.after_bridge = "end"
        self.wait_acted = ""
        self._on_wait(current, waits)
        return True

    def _refused_unheard(self, attempt: int) -> None:
        """Bridge ``attempt`` was refused over the switch's limits while we could not hear it (B in no
        ``originated_legs`` of A's): B is tried again at A's wait, or, past ``originate_timeout``, the call
        ends for it (:meth:`_refused`). Never B's failure."""
        self.deadline.setdefault("b", self.switch.monotonic() + self.options.originate_timeout)
        self.after_bridge = "retry" if self._refused("b", attempt) is not None else "end"
        self.refusal_on_a = self.after_bridge == "retry"

    def _wait_playing(self) -> int | None:
        """Which wait A plays now (how many bridges came before it), or None when it plays none.

        Only the waits loop: A runs ``playback`` with ``total_loops`` -1 (set by switch_ivr_parse_event for
        each round of a queued application). No bridge ran on A yet (``originate_disposition``, set on A
        when a bridge starts and ends, is unset): the wait before the first bridge. Else the ``cb_wait``
        set right before it (:meth:`_wait_after`), or, unset, the wait after the first bridge."""
        a = self.a.uuid
        if self._getvar(a, "current_application") != "playback" or self._getvar(a, "total_loops") != "-1":
            return None
        if not self._getvar(a, "originate_disposition"):
            return 0
        index = self._getvar(a, WAIT_VAR)
        return int(index) if index.isdigit() else 1

    def _check_alive(self) -> None:
        """Nothing heard for a while: make sure A still exists, or end the call with what we know."""
        if self.dial_pending:  # A was never originated: there is nothing to look for yet
            self._want("a")
            return
        if "a" in self.wanted:  # A was refused and waits for room: nothing of it exists to look for
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
            self.records.step(self.call, "lost_track", note="A is gone but its hangup was not heard")
            self._reconcile(False)


@functools.lru_cache(maxsize=256)
def _media_seconds(path: str) -> float | None:
    """:func:`_wav_seconds` of a file in the media cache, whose name is its content's hash: it never changes."""
    return _wav_seconds(path)


def _wav_seconds(path: str) -> float | None:
    try:
        import soundfile

        info = soundfile.info(path)
        return round(info.frames / info.samplerate, 3)
    except Exception:
        return None
