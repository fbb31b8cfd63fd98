"""What happens to a call, written down: status changes, timeline steps, logs, metrics, listeners.

Every write is one short statement (or one short transaction) with no network I/O inside, so the
single SQLite writer never waits on FreeSWITCH. Listeners (status webhooks) are told after the
commit and must not block.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from peewee import OperationalError

from daemon.ops.logs import log_event
from daemon.ops.metrics import Metrics
from daemon.store import PENDING_STATUSES, Call, CallStatus, add_event, relaxed_durability, utcnow

log = logging.getLogger("callbridge.call")

T = TypeVar("T")
StatusListener = Callable[[Call, CallStatus, dict[str, Any]], None]


class Journal:
    """Writes a call's steps and status changes; the only code that changes ``Call.status`` after creation
    (besides the API's cancel, which is a single conditional update)."""

    def __init__(self, metrics: Metrics, clock: Callable[[], dt.datetime] = utcnow, *,
                 retry_for: float = 60.0) -> None:
        self.metrics = metrics
        self.clock = clock
        self.retry_for = retry_for
        self.listeners: list[StatusListener] = []

    def step(self, call: Call, kind: str, at: dt.datetime | None = None, **detail: Any) -> None:
        """Add one step to the call's timeline (no status change)."""
        when = at or self.clock()
        self._write(lambda: add_event(call.id, kind, at=when, **detail), durable=False)
        log_event(log, kind, callid=call.callid, **detail)

    def mark(self, call: Call, kind: str, **detail: Any) -> None:
        """A step that must be on disk before what it announces happens (the originate to A leaving):
        committed durably, in one attempt with no wait, since the caller holds the switch connection's
        turn. Raises ``OperationalError`` when the store refuses it; then the caller must not go on (and
        tries again later; the refusal is logged as ``store.retry``, like the other writes' refusals)."""
        try:
            add_event(call.id, kind, at=self.clock(), **detail)
        except OperationalError as exc:
            log_event(log, "store.retry", logging.WARNING, error=str(exc), step=kind, callid=call.callid)
            raise
        log_event(log, kind, callid=call.callid, **detail)

    def claim(self, call: Call, *, a_uuid: str, b_uuid: str, now: dt.datetime) -> bool:
        """Take a pending call for dialing: one conditional update, so a cancel racing it loses or wins whole.

        The leg UUIDs are committed with the claim, before anything is sent to FreeSWITCH: after a crash
        the call is found by them and reconciled, never redialed.
        """
        lateness = max(0, int((now - call.due_at).total_seconds() * 1000))
        updated = self._write(lambda: Call.update(status=CallStatus.DIALING_A.value, a_uuid=a_uuid,
                                                  b_uuid=b_uuid, started_at=now, lateness_ms=lateness)
                              .where((Call.id == call.id) & (Call.status.in_([s.value for s in PENDING_STATUSES])))
                              .execute())
        if updated != 1:
            return False
        call.status, call.a_uuid, call.b_uuid = CallStatus.DIALING_A.value, a_uuid, b_uuid
        call.started_at, call.lateness_ms = now, lateness
        self.metrics.scheduler_lateness.observe(lateness / 1000)
        self.metrics.calls_in_flight.labels(CallStatus.DIALING_A.value).inc()
        self.step(call, "claimed", at=now, lateness_ms=lateness, a_uuid=a_uuid, b_uuid=b_uuid)
        self._notify(call, CallStatus.DIALING_A, {})
        return True

    def status(self, call: Call, status: CallStatus, kind: str | None = None, **fields: Any) -> None:
        """Move an in-flight call to ``status``, storing ``fields`` on the row and a timeline step."""
        old = CallStatus(call.status)
        if old.final or old == status:
            return
        at = fields.get("at") or self.clock()
        row = {k: v for k, v in fields.items() if k != "at" and hasattr(Call, k)}
        detail = {k: v for k, v in fields.items() if k != "at" and not hasattr(Call, k)}
        for name, value in row.items():
            setattr(call, name, value)
        call.status = status.value
        self._write(lambda: Call.update(status=status.value, **row).where(Call.id == call.id).execute(),
                    durable=False)
        if old not in PENDING_STATUSES:
            self.metrics.calls_in_flight.labels(old.value).dec()
        if status.final:
            cause = call.b_cause if call.failed_leg == "b" else call.a_cause
            self.metrics.calls_final.labels(status.value, cause or "").inc()
        else:
            self.metrics.calls_in_flight.labels(status.value).inc()
        self.step(call, kind or status.value, at=at, **{**detail, **{k: _plain(v) for k, v in row.items()}})
        self._notify(call, status, detail)

    def finish(self, call: Call, status: CallStatus, *, reason: str = "", **fields: Any) -> None:
        """End the call with a final status; stamps ``ended_at`` unless given."""
        fields.setdefault("ended_at", self.clock())
        self.status(call, status, reason=reason, **fields)

    def _write(self, statement: Callable[[], T], durable: bool = True) -> T:
        """Run one short write, waiting out a locked or full database instead of failing the call.

        SQLite's own busy wait blocks the whole process, so it is kept short (store.SQLITE_PRAGMAS) and
        the longer wait happens here, where other greenlets (the ESL reader, other calls) keep running.
        """
        delay = 0.05
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                if durable:
                    return statement()
                with relaxed_durability():
                    return statement()
            except OperationalError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log_event(log, "store.retry", logging.WARNING, error=str(exc), retry_in=delay)
                gevent.sleep(delay)
                delay = min(delay * 2, 2.0)

    def announce(self, call: Call, status: CallStatus) -> None:
        """Tell the listeners of a status someone else wrote (the API's queued, scheduled, canceled)."""
        self._notify(call, status, {})

    def _notify(self, call: Call, status: CallStatus, detail: dict[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(call, status, detail)
            except Exception:  # a listener must never break a call
                log.exception("status listener failed", extra={"callid": call.callid})


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat() + "Z"
    return value
