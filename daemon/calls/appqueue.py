"""The apps queued on A once it answers, sent in order, and finished safely after a lost connection.

Each step is one ``sendmsg`` (``execute``, ``event-lock``); FreeSWITCH runs them one after the other.
All the steps not yet sent go in ONE write (:meth:`~daemon.switch.esl.EslConnection.send_messages`):
each write is a ``send`` that wakes the switch's side of the socket in our context, so one write for
A's six steps instead of one per step that must reach A exactly once (:attr:`AppStep.once`: a wait, the
bridge) costs less CPU per call. A write can end three ways:

* acknowledged: its steps are queued on A;
* never sent (:class:`~daemon.switch.esl.EslNotSent`): its steps stay first in line;
* lost in flight (any other :class:`~daemon.switch.esl.EslError`): the steps FreeSWITCH answered are
  queued; the others may or may not be, so they are kept apart as *uncertain*: a CHAIN of steps that
  may hold several once-steps (wait, bridge, wait). Nothing is sent past them until they are settled.

What settles them rests on one fact: FreeSWITCH reads its socket in order and runs A's queued apps in
order, so the uncertain steps that arrived are a prefix of them (none, some, all), and anything sent
later (the marker below) is queued behind that prefix. Also, A never passes a wait by itself (it loops
until we break it), so nothing after a wait runs until we say so. The rules:

* a step of A's seen to start (its CHANNEL_EXECUTE, or A found on a wait: :meth:`AppQueue.started`)
  had arrived, and so had every step before it: that prefix is settled (dropped from the steps in
  doubt, never sent again);
* B was created (:meth:`AppQueue.b_appeared`, or asked in :meth:`AppQueue.resume`: it exists, or A's
  ``originated_legs`` names it): the bridge arrived, and every step before it: the same as the bridge
  seen to start;
* once reconnected (:meth:`AppQueue.resume`), uncertain steps none of which must arrive once (sets,
  prompts, the notice, the hangup: harmless twice) are simply sent again. If a once-step remains, a
  *marker* app (``set cb_resume=<its own event UUID>``) is queued behind whatever A has, and the uncertain
  steps and those after them wait for it; the *doubtful* step is the last once-step among them (the sets
  and prompts after it are harmless to send again). Then either:

  - the doubtful step, or a step after it, is seen to start (the bridge: B appears): everything up to
    it arrived; only what follows it is sent;
  - a step before the doubtful one is seen to start: the prefix through it is settled, the rest still
    waits (wait0 starts with the bridge and wait1 in doubt: B's turn breaks wait0, and A runs the
    bridge if it arrived, or else the marker);
  - the marker runs (:meth:`AppQueue.marker_ran`): A reached it before the doubtful step, so none of
    the steps still waiting up to it arrived (the arrived prefix ran before the marker, and each was
    seen to start and settled): they are sent, with the rest, in one write;
  - the connection drops again and the marker runs unheard: at the next reconnect
    (:meth:`AppQueue.resume` again) A's ``cb_resume`` holding the marker's UUID says it ran. It is read
    before anything else: a marker that runs after that read is heard, as the events are subscribed to
    by then. What ran before it unheard is known from two facts. A wait never ends by itself and we
    break only a wait we heard start (which settled it), so no wait still waiting had arrived: A would
    still be on it. A bridge still waiting ran if it arrived; B created (it exists, or A's
    ``originated_legs`` names it: B came and went) proves it did, as if B had appeared. Then the rest
    is sent as when the marker is heard. A bridge that arrived and that the switch refused (no B) is sent
    again: B is still dialed once at most.

So B is never dialed twice, a wait is never queued twice on A (a second copy would hold A on the
dialtone after we broke the first), and nothing is lost. Steps queued while the marker is awaited go
after the steps waiting for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.switch import commands as fs
from daemon.switch.esl import EslError, EslLostInFlight, EslNotSent
from daemon.uuids import new_uuid

# A's channel variable the marker sets to its own event UUID: read after a gap, it tells the marker ran unheard.
MARKER_VAR = "cb_resume"


@dataclass
class AppStep:
    """One application to run on A, known by the Application-UUID FreeSWITCH reports it under."""

    app: str
    arg: str
    event_uuid: str = field(default_factory=new_uuid)
    loops: int | None = None  # run it that many times; -1: until uuid_break

    @property
    def once(self) -> bool:
        """Must reach A exactly once: the bridge (dials B), a wait (looped until broken: a second copy
        would hold A on the dialtone after we broke the first)."""
        return self.app == "bridge" or self.loops == -1


class AppQueue:
    """The steps for A, what FreeSWITCH surely has, and what is still to send."""

    def __init__(self, send: Callable[[list[AppStep]], object]) -> None:
        # Sends the steps in one write; raises EslNotSent (none left), EslLostInFlight (how many were
        # answered) or another EslError (none answered; any may have arrived).
        self.send = send
        self.steps: dict[str, AppStep] = {}  # by event UUID, the marker included
        self.bridge: AppStep | None = None
        self.unsent: list[AppStep] = []  # built but not yet acknowledged by FreeSWITCH
        self.uncertain: list[AppStep] = []  # in flight when the connection was lost: a prefix of them arrived
        self.marker: AppStep | None = None
        # The uncertain steps and those after them, until the marker or the doubtful step shows: the
        # doubtful step (the last uncertain one that must arrive once) is waiting_for_marker[doubtful].
        self.waiting_for_marker: list[AppStep] = []
        self.doubtful = -1

    @property
    def pending(self) -> bool:
        """Some steps are not surely queued on A yet."""
        return bool(self.unsent or self.uncertain)

    @property
    def to_resume(self) -> bool:
        """A reconnect must look (:meth:`resume`): steps not surely queued, or a marker whose start may have
        gone unheard."""
        return self.pending or self.marker is not None

    def find(self, event_uuid: str) -> AppStep | None:
        return self.steps.get(event_uuid)

    def start(self, steps: list[AppStep], *, bridge: AppStep) -> None:
        """Send ``steps`` (which include ``bridge``) in order."""
        self.steps.update((step.event_uuid, step) for step in steps)
        self.bridge = bridge
        self.unsent = list(steps)
        self.send_unsent()

    def extend(self, steps: list[AppStep], *, bridge: AppStep | None = None) -> None:
        """Queue more steps after those already sent (a bridge sent again after the switch refused B's
        session, the notice and hangup that end a call); ``bridge`` becomes the bridge to watch."""
        self.steps.update((step.event_uuid, step) for step in steps)
        if bridge is not None:
            self.bridge = bridge
        # Nothing goes past steps in doubt: while the marker is awaited, they follow the steps waiting for it.
        (self.waiting_for_marker or self.unsent).extend(steps)
        self.send_unsent()

    @property
    def in_doubt(self) -> bool:
        """Some steps may or may not be queued on A: a step of A's seen to start settles some (:meth:`started`)."""
        return bool(self.uncertain or self.waiting_for_marker)

    def send_unsent(self) -> None:
        """Send the steps not yet acknowledged, in order, in one write; raises what the send raised.
        Nothing goes past uncertain steps (A would run it before them, or without them): :meth:`resume`
        settles them first."""
        while self.unsent and not self.uncertain:
            batch = list(self.unsent)  # all of them: one write (a lost one leaves a chain in doubt)
            try:
                self.send(batch)
            except EslNotSent:
                raise
            except EslError as exc:
                answered = exc.acknowledged if isinstance(exc, EslLostInFlight) else 0
                in_doubt = len(batch) - answered
                self.uncertain = self.unsent[answered:len(batch)]
                del self.unsent[:answered + in_doubt]
                raise
            del self.unsent[:len(batch)]

    def resume(self, b_created: Callable[[], bool], a_var: Callable[[str], str]) -> None:
        """Reconnected (:attr:`to_resume`): finish queueing without ever dialing B twice or queueing a wait
        twice. A marker awaited that ran unheard (``a_var``, A's channel variables, tells) settles what
        waited for it. B created proves the first uncertain bridge arrived, with the steps before it; if a
        once-step is still uncertain, a marker settles the chain (see the module's docstring). Every
        question is asked before anything changes: if one fails, nothing is lost."""
        if self.marker is not None and self.marker not in self.unsent:  # (one never sent never ran)
            self._marker_maybe_ran(self.marker, b_created, a_var)
        uncertain = self.uncertain
        bridge = next((n for n, step in enumerate(uncertain) if step.app == "bridge"), None)
        if bridge is not None and b_created():
            uncertain = uncertain[bridge + 1:]
        doubtful = max((n for n, step in enumerate(uncertain) if step.once), default=-1)
        self.uncertain = []
        if doubtful >= 0:
            marker_uuid = new_uuid()
            self.marker = AppStep("set", fs.set_arg(MARKER_VAR, marker_uuid), event_uuid=marker_uuid)
            self.steps[self.marker.event_uuid] = self.marker
            self.waiting_for_marker = [*uncertain, *self.unsent]
            self.doubtful = doubtful
            self.unsent = [self.marker]
        else:
            self.unsent[:0] = uncertain  # a set or a prompt queued twice is harmless
        self.send_unsent()

    def _marker_maybe_ran(self, marker: AppStep, b_created: Callable[[], bool], a_var: Callable[[str], str]) -> None:
        """The marker is awaited after a gap: if A's variable says it ran, settle as if it had been heard,
        B created first telling that a bridge waiting for it had arrived (and ran, unheard, before it). The
        variable first: once the marker has run, what ran before it is final."""
        if a_var(MARKER_VAR) != marker.event_uuid:
            return  # not yet: its start is heard on this connection
        in_doubt = self.waiting_for_marker[:self.doubtful + 1]
        arrived = any(step.app == "bridge" for step in in_doubt) and b_created()
        self.uncertain = [step for step in self.uncertain if step is not marker]  # its own write, lost, arrived
        if arrived:
            self.b_appeared()
        self.marker_ran()

    def b_appeared(self) -> None:
        """B was created: the bridge in doubt (the first, were there several) had arrived, and every step
        before it: as if it was seen to start."""
        in_doubt = self.uncertain or self.waiting_for_marker[:self.doubtful + 1]
        bridge = next((step for step in in_doubt if step.app == "bridge"), None)
        if bridge is not None:
            self.started(bridge.event_uuid)

    def started(self, event_uuid: str) -> None:
        """A step of A's began: it, and every step before it, had arrived. Heard before :meth:`resume`
        (the look after a reconnect was delayed), it settles uncertain steps; after, steps waiting for
        the marker: if it is the doubtful step or one after it, what follows it is sent; if it comes
        before, it and those before it are not sent again should the marker run."""
        index = _position(self.uncertain, event_uuid)
        if index is not None:
            del self.uncertain[:index + 1]
            return
        waiting = self.waiting_for_marker
        index = _position(waiting, event_uuid)  # (the steps after the uncertain ones were never sent: never start)
        if index is None:
            return
        if index >= self.doubtful:
            self._settled(waiting[index + 1:])
            return
        del waiting[:index + 1]
        self.doubtful -= index + 1

    def marker_ran(self) -> None:
        """The marker started on A before the doubtful step showed: it never arrived (nor did any of the
        uncertain steps not seen to start: they ran before the marker, had they arrived); send them and
        the rest."""
        self._settled(self.waiting_for_marker)

    def _settled(self, not_arrived: list[AppStep]) -> None:
        """The marker is no longer awaited: the steps that did not arrive go first, then the rest."""
        self.marker, self.unsent = None, [*not_arrived, *self.unsent]
        self.waiting_for_marker, self.doubtful = [], -1
        self.send_unsent()


def _position(steps: list[AppStep], event_uuid: str) -> int | None:
    """Where the step known by ``event_uuid`` is in ``steps``, or None."""
    return next((n for n, step in enumerate(steps) if step.event_uuid == event_uuid), None)
