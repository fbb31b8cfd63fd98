"""The apps queued on A once it answers, sent in order, and finished safely after a lost connection.

Each step is one ``sendmsg`` (``execute``, ``event-lock``); FreeSWITCH runs them one after the other.
A send can end three ways:

* acknowledged: the step is queued on A, the next one goes;
* never sent (:class:`~daemon.switch.esl.EslNotSent`): the step stays first in line;
* lost in flight (any other :class:`~daemon.switch.esl.EslError`): FreeSWITCH may or may not have it,
  so the step is kept apart as *uncertain*.

Once reconnected, :meth:`AppQueue.resume` finishes the queue without ever dialing B twice. Sending a
``set`` or ``playback`` twice is harmless, so an uncertain one is simply resent. The bridge is not:

* if B exists, the bridge arrived, and only what follows it is sent;
* otherwise a *marker* app (``set cb_resume=marker``) is queued behind whatever A already has. If B
  appears first, the bridge had arrived (:meth:`AppQueue.b_appeared`: the rest follows); if the marker
  runs first, it had not (:meth:`AppQueue.marker_ran`: the bridge and the rest are sent then).
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field

from daemon.switch import commands as fs
from daemon.switch.esl import EslError, EslNotSent


@dataclass
class AppStep:
    """One application to run on A, known by the Application-UUID FreeSWITCH reports it under."""

    app: str
    arg: str
    event_uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))


class AppQueue:
    """The steps for A, what FreeSWITCH surely has, and what is still to send."""

    def __init__(self, send: Callable[[AppStep], object]) -> None:
        self.send = send  # raises EslNotSent (never left) or another EslError (lost in flight)
        self.steps: dict[str, AppStep] = {}  # by event UUID, the marker included
        self.bridge: AppStep | None = None
        self.unsent: list[AppStep] = []  # built but not yet acknowledged by FreeSWITCH
        self.uncertain: AppStep | None = None  # in flight when the connection was lost
        self.marker: AppStep | None = None
        self.waiting_for_marker: list[AppStep] = []  # the bridge and what follows it, until the marker says

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

    def send_unsent(self) -> None:
        """Send the steps not yet acknowledged, in order; raises what the send raised."""
        while self.unsent:
            step = self.unsent[0]
            try:
                self.send(step)
            except EslNotSent:
                raise
            except EslError:
                self.uncertain = self.unsent.pop(0)
                raise
            self.unsent.pop(0)

    def resume(self, b_exists: Callable[[], bool]) -> None:
        """Reconnected with steps not surely queued: finish queueing without ever dialing B twice."""
        uncertain = self.uncertain
        if uncertain is not None and uncertain is self.bridge:
            if b_exists():  # asked before anything changes: if the question fails, nothing is lost
                self.uncertain = None
                self.send_unsent()
                return
            self.uncertain = None
            self.marker = AppStep("set", fs.set_arg("cb_resume", "marker"))
            self.steps[self.marker.event_uuid] = self.marker
            self.waiting_for_marker = [uncertain, *self.unsent]
            self.unsent = [self.marker]
        elif uncertain is not None:
            self.uncertain = None
            self.unsent.insert(0, uncertain)
        self.send_unsent()

    def b_appeared(self) -> None:
        """B exists: a bridge waiting on the marker had arrived; send what follows it."""
        if self.waiting_for_marker:
            self.marker, self.unsent, self.waiting_for_marker = None, self.waiting_for_marker[1:], []
            self.send_unsent()

    def marker_ran(self) -> None:
        """The marker started on A before any B appeared: the bridge never arrived; send it and the rest."""
        self.marker, self.unsent, self.waiting_for_marker = None, self.waiting_for_marker, []
        self.send_unsent()
