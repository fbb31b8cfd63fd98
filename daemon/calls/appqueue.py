"""The apps queued on A once it answers, sent in order, and finished safely after a lost connection.

Each step is one ``sendmsg`` (``execute``, ``event-lock``); FreeSWITCH runs them one after the other.
Steps go several to a write (:meth:`~daemon.switch.esl.EslConnection.send_messages`: one round trip
instead of one per step), each batch ending at the first step that must reach A exactly once (see
:attr:`AppStep.once`): so that, whatever happens to a batch, at most its last step is in doubt. A batch
can end three ways:

* acknowledged: its steps are queued on A, the next batch goes;
* never sent (:class:`~daemon.switch.esl.EslNotSent`): its steps stay first in line;
* lost in flight (any other :class:`~daemon.switch.esl.EslError`): the steps FreeSWITCH answered are
  queued; the others may or may not be (those that arrived are a run right after the answered ones),
  so they are kept apart as *uncertain*. Nothing is sent past them until they are settled; one seen to
  start meanwhile (:meth:`AppQueue.started`) had arrived, with those before it.

Once reconnected, :meth:`AppQueue.resume` finishes the queue without ever dialing B twice or leaving A
on a second copy of a wait. Sending a ``set`` or a prompt twice is harmless, so uncertain steps that
are only such are simply resent. A step that must arrive once is not resent blindly:

* the bridge: if B exists, the bridge arrived, and only what follows it is sent;
* otherwise a *marker* app (``set cb_resume=marker``) is queued behind whatever A already has. If the
  doubtful step shows first (B appears: :meth:`AppQueue.b_appeared`; the wait starts:
  :meth:`AppQueue.started`), it had arrived and the rest follows; if the marker runs first
  (:meth:`AppQueue.marker_ran`), it had not: it is sent then, with the uncertain steps before it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.switch import commands as fs
from daemon.switch.esl import EslError, EslLostInFlight, EslNotSent
from daemon.uuids import new_uuid


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
        self.uncertain: list[AppStep] = []  # in flight when the connection was lost; at most the last is `once`
        self.marker: AppStep | None = None
        # The uncertain steps and those after them, until the marker or the doubtful step shows: the
        # doubtful step (the last uncertain one) is waiting_for_marker[doubtful].
        self.waiting_for_marker: list[AppStep] = []
        self.doubtful = -1

    @property
    def pending(self) -> bool:
        """Some steps are not surely queued on A yet."""
        return bool(self.unsent or self.uncertain)

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
        self.unsent.extend(steps)
        self.send_unsent()

    @property
    def in_doubt(self) -> bool:
        """Some steps may or may not be queued on A: a step of A's seen to start settles some (:meth:`started`)."""
        return bool(self.uncertain or self.waiting_for_marker)

    def send_unsent(self) -> None:
        """Send the steps not yet acknowledged, in order, a batch at a time; raises what the send raised.
        Nothing goes past uncertain steps (A would run it before them, or without them): :meth:`resume`
        settles them first."""
        while self.unsent and not self.uncertain:
            batch = self._next_batch()
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

    def _next_batch(self) -> list[AppStep]:
        """The unsent steps up to the first that must arrive once, that one included."""
        for index, step in enumerate(self.unsent):
            if step.once:
                return self.unsent[:index + 1]
        return list(self.unsent)

    def resume(self, b_exists: Callable[[], bool]) -> None:
        """Reconnected with steps not surely queued: finish queueing without ever dialing B twice."""
        uncertain = self.uncertain
        if uncertain and uncertain[-1].once:
            doubtful = uncertain[-1]
            if doubtful.app == "bridge" and b_exists():  # asked before anything changes: if it fails, nothing is lost
                self.uncertain = []  # the bridge arrived, and so did every step before it
                self.send_unsent()
                return
            self.uncertain = []
            self.marker = AppStep("set", fs.set_arg("cb_resume", "marker"))
            self.steps[self.marker.event_uuid] = self.marker
            self.waiting_for_marker = [*uncertain, *self.unsent]
            self.doubtful = len(uncertain) - 1
            self.unsent = [self.marker]
        elif uncertain:
            self.uncertain = []
            self.unsent[:0] = uncertain  # a set or a prompt queued twice is harmless
        self.send_unsent()

    def b_appeared(self) -> None:
        """B exists: a bridge waiting on the marker had arrived; send what follows it."""
        if self.waiting_for_marker and self.waiting_for_marker[self.doubtful].app == "bridge":
            self._arrived()

    def started(self, event_uuid: str) -> None:
        """A step of A's began: it, and every step before it, had arrived. If it is the doubtful step (a
        wait), what follows it is sent; if it comes before, it is not sent again should the marker run.
        Heard before :meth:`resume` (the look after a reconnect was delayed), it settles uncertain steps."""
        index = _position(self.uncertain, event_uuid)
        if index is not None:
            del self.uncertain[:index + 1]
            return
        waiting = self.waiting_for_marker
        index = _position(waiting[:self.doubtful + 1], event_uuid)
        if index is None:
            return
        if index == self.doubtful:
            self._arrived()
            return
        del waiting[:index + 1]
        self.doubtful -= index + 1

    def _arrived(self) -> None:
        self.marker, self.unsent = None, self.waiting_for_marker[self.doubtful + 1:]
        self.waiting_for_marker, self.doubtful = [], -1
        self.send_unsent()

    def marker_ran(self) -> None:
        """The marker started on A before the doubtful step showed: it never arrived (nor did any of the
        uncertain steps not seen to start); send them and the rest."""
        self.marker, self.unsent, self.waiting_for_marker, self.doubtful = None, self.waiting_for_marker, [], -1
        self.send_unsent()


def _position(steps: list[AppStep], event_uuid: str) -> int | None:
    """Where the step known by ``event_uuid`` is in ``steps``, or None."""
    return next((n for n, step in enumerate(steps) if step.event_uuid == event_uuid), None)
