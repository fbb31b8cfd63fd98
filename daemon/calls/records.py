"""A call's record: the only code that writes a ``Call`` row or its ``CallEvent`` timeline, and the named
queries the rest of the daemon reads calls through.

Who asks for which write:

* the API (and anything else that takes requests) *creates* a call and *cancels* one not yet started;
* the dispatcher *claims* a due call and marks calls *missed* at start or *refused* over a limit;
* a call's sequence moves it through ``a_answered``, ``dialing_b``, ``bridged``, notes timeline steps
  and its recording, and *finishes* it;
* retention clears a recording it deleted.

Durability: every write goes through the store's writer (:mod:`daemon.writer`): on SQLite one thread
that commits in groups, so no greenlet of the event loop waits for the disk. An accepted request, a
cancel, a claim and the mark before A's originate commit with ``synchronous=FULL`` (each must survive a
power cut) and their callers wait for that commit; timeline steps and the status changes of calls in
progress commit relaxed and nobody waits for them, because the next start reconciles those calls with
FreeSWITCH anyway. Every write is a few short statements with no network I/O inside. The daemon's own
writes wait out a locked or full database; the API's fail at once and the client is answered 503.

Status changes are heard twice. :attr:`CallRecords.status_writers` (the webhook outbox) run inside the
change's transaction (in the writer's thread on SQLite: store work only, nothing of gevent), so their
rows commit with the change or not at all; what they return runs on the loop after the commit.
:attr:`CallRecords.listeners` run on the loop once the change is committed, in order, with the call as
it was at the change. Neither may block.

Claims on a shared PostgreSQL: the claim itself is one conditional UPDATE (``... WHERE id = ? AND status IN
(pending)``); under READ COMMITTED a second daemon's UPDATE of the same row waits for the first to commit,
re-reads the row, finds it no longer pending and changes nothing, so exactly one claim wins. So that two
daemons do not walk the same due calls only for one to lose every race, the dispatcher claims in rounds
(:meth:`CallRecords.claim_round`): one transaction in which :meth:`CallRecords.due` locks the rows it returns
(``FOR UPDATE OF call SKIP LOCKED``, so another daemon's round gets the next calls instead of waiting),
the claims commit together, and what follows a claim (the engine's launch, metrics, listeners) runs after
that commit (:meth:`CallRecords.after_claims`), never for a claim that rolled back. On SQLite (one daemon,
one writer) a round is no transaction: each claim commits at once, durably, and what follows runs at once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from peewee import EXCLUDED, DateTimeField, Expression, IntegrityError, OperationalError, fn

from daemon.calls.search import MERGED_AT_MOST
from daemon.calls.view import iso
from daemon.ops.logs import log_event
from daemon.ops.metrics import Metrics
from daemon.store import (
    IN_FLIGHT_STATUSES,
    PENDING_STATUSES,
    SCHEDULED_PENDING,
    Call,
    CallEvent,
    CallStatus,
    DaemonInstance,
    Endpoint,
    EndpointDay,
    Heartbeat,
    among,
    among_sql,
    among_value,
    database,
    day_of,
    endpoints_in_index,
    execute,
    insert_row,
    is_shared,
    new_callid,
    precompiled,
    select_rows,
    sqlite_time,
    utcnow,
)
from daemon.writer import current as writer

log = logging.getLogger("callbridge.call")
api_log = logging.getLogger("callbridge.api")

DISPATCHER_HEARTBEAT = "dispatcher"

StatusListener = Callable[[Call, CallStatus, dict[str, Any]], None]
# Runs inside a status change's transaction (see the module's docstring); may return an action for the loop.
StatusWriter = Callable[[Call, CallStatus, dict[str, Any]], Callable[[], None] | None]


# The timeline step committed right before each originate to A leaves (CallRecords.mark_dialing_a), and
# the step written when the switch refused a leg over its limits (nothing created; sent again later).
DIAL_MARK = "dialing_a"
THROTTLED = "throttled"
# The step written when an originate, marked, was not sent after all (the connection went meanwhile).
NOT_SENT = "not_sent"
# An operator's hangup (``calls hangup``, the admin page): no originate of A leaves after it is committed.
HANGUP_REQUESTED = "hangup_requested"
# The reason of a call ended because its switch stayed unreachable (CallRecords.ended_on_lost_switch reads it).
SWITCH_LOST_REASON = "the switch {switch} was unreachable for {seconds} s"


def add_event(call: Call | int, kind: str, at: dt.datetime | None = None, **detail: Any) -> CallEvent:
    """Append one step to a call's timeline (empty details are left out)."""
    return CallEvent.create(call=call, kind=kind, at=at or utcnow(), detail=_clean_detail(detail))


def _clean_detail(detail: dict[str, Any]) -> str:
    """A step's details as stored: JSON with sorted keys, empty ones left out; "" when none is left."""
    if not detail:
        return ""
    clean = {k: v for k, v in detail.items() if v is not None and v != ""}
    return json.dumps(clean, sort_keys=True) if clean else ""


def append_event(call_id: int, kind: str, at: dt.datetime, **detail: Any) -> None:
    """:func:`add_event` as the daemon writes its steps: one precompiled insert, no model built."""
    sql = precompiled("event", _event_sql)
    execute(sql, (call_id, sqlite_time(at) if database.param == "?" else at, kind, _clean_detail(detail)))


def _event_sql(p: str) -> str:
    return f'INSERT INTO "callevent" ("call_id", "at", "kind", "detail") VALUES ({p}, {p}, {p}, {p})'


def count_started(endpoint_id: int, at: dt.datetime) -> None:
    """Count a call the endpoint started at ``at`` in its day's :class:`EndpointDay` (inside the claim's
    transaction: a claim undone is not counted)."""
    sql = precompiled("count_started", lambda p: (
        f'INSERT INTO "endpointday" ("endpoint_id", "day", "started") VALUES ({p}, {p}, 1) '
        'ON CONFLICT ("endpoint_id", "day") DO UPDATE SET "started" = "endpointday"."started" + 1'))
    execute(sql, (endpoint_id, EndpointDay.day.db_value(day_of(at))))


def _hangup_requested_by(call_id: int) -> str | None:
    """Who asked to hang the call up (:meth:`CallRecords.request_hangup`), or None if nobody did."""
    sql = precompiled("hangup_requested", lambda p: (
        f'SELECT "detail" FROM "callevent" WHERE "call_id" = {p} AND "kind" = {p} LIMIT 1'))
    row = execute(sql, (call_id, HANGUP_REQUESTED)).fetchone()
    return None if row is None else str(json.loads(row[0] or "{}").get("by") or "an operator")


def _due_sql(p: str, after: tuple[dt.datetime, int] | None, lock: bool) -> str:
    """The due calls of one pending status, in (due_at, id) order (see :meth:`CallRecords.due`)."""
    sql = f'SELECT * FROM "call" WHERE "status" = {p} AND "due_at" <= {p}'
    if after is not None:  # (a row value: the index walk starts at the cursor, not at the first due call)
        sql += f' AND ("due_at", "id") > ({p}, {p})'
    return sql + f' ORDER BY "due_at", "id" LIMIT {p}' + (" FOR UPDATE SKIP LOCKED" if lock else "")


def _due_of_others_sql(p: str, after: tuple[dt.datetime, int] | None, lock: bool) -> str:
    """The due calls of one pending status of the endpoints not among those given, in (due_at, id) order:
    each endpoint's first ones through its (endpoint_id, status, due_at) index, however many calls the
    others have queued ahead of them (see :meth:`CallRecords.due`)."""
    later = f' AND ("due_at", "id") > ({p}, {p})' if after is not None else ""
    others = "NOT (" + among_sql('e."id"', p) + ")"
    return (f'SELECT c.* FROM "endpoint" AS e JOIN "call" AS c ON c."id" IN (SELECT "id" FROM "call" '
            f'WHERE "endpoint_id" = e."id" AND "status" = {p} AND "due_at" <= {p}{later} ORDER BY "due_at", "id" '
            f'LIMIT {p}) WHERE {others} ORDER BY c."due_at", c."id" LIMIT {p}'
            + (" FOR UPDATE OF c SKIP LOCKED" if lock else ""))


class _Update(NamedTuple):
    """A precompiled ``update_call``: its statement and how each of its values is stored."""

    sql: str
    convert: tuple[Callable[[Any], Any], ...]  # per column of the row, in order
    statuses: tuple[str, ...]  # the values of ``if_status``


# (columns, if_status, owned, placeholder) -> its plan: built once, as precompiled() does for statements.
_updates: dict[tuple[tuple[str, ...], tuple[CallStatus, ...], bool, str], _Update] = {}


def _update_plan(names: tuple[str, ...], if_status: tuple[CallStatus, ...], owned: bool, param: str) -> _Update:
    fields = Call._meta.fields  # type: ignore[attr-defined]  # peewee's model metadata

    def build(p: str) -> str:
        columns = ", ".join(f'"{fields[name].column_name}" = {p}' for name in names)
        condition = f' AND "status" IN ({", ".join([p] * len(if_status))})' if if_status else ""
        condition += f' AND "owner" = {p}' if owned else ""
        return f'UPDATE "call" SET {columns} WHERE "id" = {p}{condition}'

    def converter(field: Any) -> Callable[[Any], Any]:
        # SQLite: a datetime as its driver would store it (sqlite_time), converted here in one step.
        db_value: Callable[[Any], Any] = field.db_value
        if param == "?" and isinstance(field, DateTimeField):
            return lambda value: sqlite_time(db_value(value))
        return db_value

    sql = precompiled(f"update:{','.join(names)}:{len(if_status)}:{owned}", build)
    return _Update(sql, tuple(converter(fields[name]) for name in names), tuple(s.value for s in if_status))


def update_call(call_id: int, row: dict[str, Any], *, if_status: tuple[CallStatus, ...] = (),
                owned_by: str | None = None) -> int:
    """Set ``row``'s columns of one call (values as the models take them), only while its status is one of
    ``if_status`` when given (a claim) and only while ``owned_by`` owns it when given; returns the rows
    changed."""
    names = tuple(row)
    key = (names, if_status, owned_by is not None, database.param)
    plan = _updates.get(key)
    if plan is None:
        plan = _updates[key] = _update_plan(*key)
    params = [convert(value) for convert, value in zip(plan.convert, row.values(), strict=True)]
    params.append(call_id)
    params += plan.statuses
    if owned_by is not None:
        params.append(owned_by)
    return int(execute(plan.sql, params).rowcount)


def _status_in(statuses: Iterable[CallStatus]) -> Expression:
    return Call.status.in_([s.value for s in statuses])


def _snapshot(call: Call) -> Call:
    """A copy of ``call`` as it is now (its endpoint shared), for the writes and listeners that run later."""
    copy = Call(__no_default__=True)
    copy.__data__ = dict(call.__data__)
    copy.__rel__ = dict(call.__rel__)
    copy._dirty = set()  # type: ignore[attr-defined]
    return copy


def _fits(text: str, field: Any) -> str:
    """``text`` cut to the column's length: PostgreSQL refuses a longer value (SQLite does not), and a
    final status that cannot be written leaves the call unfinished. (A reason names an operator's e-mail
    or a switch's address: either can be long.)"""
    limit = field.max_length
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat() + "Z"
    return value


@dataclass(frozen=True)
class NewCall:
    """A checked request for a call, with the media normalised for it (paths in the media cache)."""

    phone_a: str
    phone_b: str
    due_at: dt.datetime  # naive UTC; the request's time when no call_date was given
    scheduled: bool  # a call_date was given
    play_url: str = ""
    msg: str = ""
    msg_lang: str = ""
    dialtone_url: str = ""
    play_file: str = ""
    msg_file: str = ""
    dialtone_file: str = ""
    idempotency_key: str | None = None
    request_fingerprint: str | None = None  # of the request the key was used for (webapi/idempotency.py)


class Created(NamedTuple):
    """What :meth:`CallRecords.create` did: the call, and whether it is new (False: an earlier request
    with the same idempotency key made it)."""

    call: Call
    new: bool


@dataclass(frozen=True)
class NotCancelable:
    """A cancel that came too late: the call already started or ended."""

    call: Call  # as it stands now

    @property
    def status(self) -> CallStatus:
        return CallStatus(self.call.status)

    @property
    def reason(self) -> str:
        if self.status.final:
            return f"the call is already final (status {self.status.value})"
        return f"the call already started (status {self.status.value})"


class NotOwned(OperationalError):
    """The call belongs to another daemon now (its lease here ran out and the other took it over)."""


class HangupRequested(Exception):
    """An operator hung the call up before this originate of A left: it is not sent."""

    def __init__(self, by: str) -> None:
        super().__init__(f"hung up by {by} before A was dialed")
        self.by = by


@dataclass(frozen=True)
class EndpointLoad:
    """What an endpoint has going across every daemon sharing the store (:meth:`CallRecords.endpoint_load`)."""

    in_flight: int  # calls claimed and not final
    started_today: int  # calls started since the start of the UTC day
    started_recently: int  # calls started in the rate window
    oldest_recent: dt.datetime | None  # the earliest start in that window


BOOTTIME: int | None = getattr(time, "CLOCK_BOOTTIME", None)  # Linux only


def lease_clock() -> float:
    """Seconds for judging this daemon's own leases: a clock that never goes back and, unlike
    ``time.monotonic`` on Linux, goes on while the machine sleeps (``CLOCK_BOOTTIME``). A host suspended past
    its leases, whose calls another daemon took over meanwhile, then finds them lapsed as it wakes and asks
    before acting on one, instead of acting until its next renewal tells it."""
    return time.clock_gettime(BOOTTIME) if BOOTTIME is not None else time.monotonic()


class CallRecords:
    """Writes calls and their timelines; reads them through named queries (static, no state needed)."""

    def __init__(self, metrics: Metrics | None = None, clock: Callable[[], dt.datetime] = utcnow, *,
                 owner: str = "", lease_seconds: float = 30.0,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.listeners: list[StatusListener] = []
        self.status_writers: list[StatusWriter] = []
        self.owner = owner or None  # this daemon's instance id, written into the calls it claims
        # On a shared store, this run's hold on that id (daemon/ops/instance.py), once it has it: a call is
        # this daemon's only while the id is still this run's (another run may have taken it over).
        self.run_id: str | None = None
        self.lease = dt.timedelta(seconds=lease_seconds)
        # The shared store's clock minus this host's (measured at each lease renewal: daemon/calls/leases.py).
        # Leases are written and judged in the store's time, so that daemons whose clocks differ agree on
        # when one ran out; 0 with SQLite (one daemon, one host).
        self.clock_offset = dt.timedelta(0)
        self.monotonic = monotonic or lease_clock
        # Until when (monotonic) every lease of this daemon surely holds: a call claimed or taken over later
        # gets a lease of its own from then on. Moved on by each renewal of them all (renew_leases).
        self._held_until = self.monotonic() + self._sure_for()
        self._heartbeat_read = False
        self._heartbeat_before_start: dt.datetime | None = None
        # The calls in flight this daemon follows, by the phase calls_in_flight counts each in: claimed here,
        # or taken over (adopted at start, or from a daemon that died), until they end or are let go.
        self._phases: dict[int, CallStatus] = {}
        # calls_in_flight's child per phase, looked up once: labels() takes a lock at each of a call's moves.
        self._in_phase = {status: self.metrics.calls_in_flight.labels(status.value)
                          for status in CallStatus if status.in_flight}

    # -- reads ------------------------------------------------------------------------------------
    @staticmethod
    def find(callid: str) -> Call | None:
        return Call.get_or_none(Call.callid == callid)

    @staticmethod
    def owned(endpoint_id: int, callid: str) -> Call | None:
        """The endpoint's call by callid; None whether it does not exist or belongs to another endpoint."""
        return Call.get_or_none((Call.callid == callid) & (Call.endpoint == endpoint_id))

    @staticmethod
    def by_idempotency_key(endpoint_id: int, key: str) -> Call | None:
        return Call.get_or_none((Call.endpoint == endpoint_id) & (Call.idempotency_key == key))

    @staticmethod
    def timeline(call: Call | int) -> list[CallEvent]:
        """The call's steps, oldest first."""
        return list(CallEvent.select().where(CallEvent.call == call).order_by(CallEvent.id))

    @staticmethod
    def in_flight() -> list[Call]:
        """Calls in progress (claimed, not final), with their endpoints, oldest start first."""
        return list(Call.select(Call, Endpoint).join(Endpoint).where(_status_in(IN_FLIGHT_STATUSES))
                    .order_by(Call.started_at))

    @staticmethod
    def unsent_because(call: Call) -> str | None:
        """Why no originate of A can have reached FreeSWITCH, or None when one may have.

        Each originate is marked (:meth:`mark_dialing_a`) before it leaves. A call without a mark was never
        sent; one whose last mark is followed by the switch's refusal of A (``throttled``, leg a: nothing was
        created) was not sent again since; nor one whose last mark is followed by ``not_sent`` (the connection
        went before it left). The writer commits in order, so a later mark means a later send."""
        steps = (CallEvent.select(CallEvent.kind, CallEvent.detail)
                 .where((CallEvent.call == call.id) & CallEvent.kind.in_([DIAL_MARK, THROTTLED, NOT_SENT]))
                 .order_by(CallEvent.id.desc()))
        for step in steps:
            if step.kind == DIAL_MARK:
                return None
            if step.kind == NOT_SENT:
                return "the connection went before its marked originate was sent"
            if json.loads(step.detail or "{}").get("leg") == "a":
                return "refused by the switch (over its limit) and not sent again"
        return "never sent to FreeSWITCH"

    @staticmethod
    def dialed_on(call: Call) -> str | None:
        """The Core-UUID of the switch the call's last originate of A was sent to, when it was noted."""
        step = (CallEvent.select(CallEvent.detail).where((CallEvent.call == call.id) & (CallEvent.kind == DIAL_MARK))
                .order_by(CallEvent.id.desc()).first())
        return json.loads(step.detail or "{}").get("core_uuid") if step is not None else None

    @staticmethod
    def ended_on_lost_switch(*, ended_after: dt.datetime, due_after: dt.datetime) -> list[Call]:
        """Calls ended after ``ended_after`` because their switch stayed unreachable: their legs may still be up
        in it. Due after ``due_after``, so that the (status, due_at) index bounds the look."""
        lost = SWITCH_LOST_REASON.format(switch="%", seconds="%")
        return list(Call.select(Call.id, Call.switch, Call.a_uuid, Call.b_uuid)
                    .where((Call.status == CallStatus.FAILED.value) & (Call.due_at > due_after)
                           & (Call.ended_at > ended_after) & (Call.reason ** lost)))

    @staticmethod
    def overdue(before: dt.datetime, *, limit: int) -> list[Call]:
        """Up to ``limit`` pending calls due before ``before``, earliest first: :meth:`due`'s walk (locked
        like its calls inside a claim round on a shared PostgreSQL), up to the microsecond before, the
        store's times being to the microsecond. (One query for both pending statuses sorted every one of
        them at each page: a start after a long outage read the whole backlog a page at a time.)"""
        return CallRecords.due(before - dt.timedelta(microseconds=1), limit=limit)

    @staticmethod
    def due(now: dt.datetime, *, limit: int, skip_endpoints: Iterable[int] = (),
            after: tuple[dt.datetime, int] | None = None) -> list[Call]:
        """Up to ``limit`` pending calls due at ``now``, with their endpoints, in (due_at, id) order after
        ``after``, leaving out the endpoints in ``skip_endpoints``.

        The dispatcher asks after every call's end, so this is hand-written SQL: peewee spends a
        millisecond or two compiling a select of a call's ~50 columns, ten times what SQLite takes to
        answer it. One query per pending status, each walking the (status, due_at) index in order and
        stopping at ``limit`` (one query for both would sort every pending call), merged here.

        With endpoints left out (at their limits, their calls first in due order: a campaign queued
        behind its endpoint's calls per second), that walk would pass every one of their calls before
        finding another's, at every tick: instead, each other endpoint's first due calls are read through
        the (``endpoint_id, status, due_at``) index, all in one statement per status, and sorted there. (A
        statement per endpoint, its rows built here, took 0.5-1.3 s a tick with 2,000 endpoints' calls
        due; this, 30-55 ms, and a few endpoints' well under a millisecond.)"""
        skip = sorted(skip_endpoints)
        lock = is_shared() and database.in_transaction()  # a claim round: these calls are ours until it commits
        due_at = Call.due_at.db_value
        until = due_at(now)
        cursor: list[Any] = [] if after is None else [due_at(after[0]), after[1]]
        calls: list[Call] = []
        if not skip:
            sql = precompiled(f"due:{after is not None}:{lock}", lambda p: _due_sql(p, after, lock))
            for status in PENDING_STATUSES:
                calls += select_rows(Call, sql, (status.value, until, *cursor, limit))
        else:
            sql = precompiled(f"due_of_others:{after is not None}:{lock}", lambda p: _due_of_others_sql(p, after, lock))
            for status in PENDING_STATUSES:
                calls += select_rows(Call, sql, (status.value, until, *cursor, limit, among_value(skip), limit))
        calls = sorted(calls, key=lambda call: (call.due_at, call.id))[:limit]
        if calls:
            endpoint_of = {call.id: call.__data__["endpoint"] for call in calls}  # the foreign key's value
            ids = sorted(set(endpoint_of.values()))
            sql = precompiled(f"endpoints:{len(ids)}",
                       lambda p: f'SELECT * FROM "endpoint" WHERE "id" IN ({", ".join([p] * len(ids))})')
            endpoints = {endpoint.id: endpoint for endpoint in select_rows(Endpoint, sql, ids)}
            for call in calls:
                call.endpoint = endpoints[endpoint_of[call.id]]
        return calls

    @staticmethod
    def next_due_at(now: dt.datetime) -> dt.datetime | None:
        """When the next pending call falls due after ``now`` (asked at every tick: precompiled, and one
        index probe per pending status)."""
        sql = precompiled("next_due", lambda p: f'SELECT MIN("due_at") FROM "call" WHERE "status" = {p} AND "due_at" > {p}')
        field = Call.due_at
        found = [database.execute_sql(sql, (status.value, field.db_value(now))).fetchone()[0]
                 for status in PENDING_STATUSES]
        times: list[dt.datetime] = [field.python_value(value) for value in found if value is not None]
        return min(times, default=None)

    @staticmethod
    def started_on(day: dt.datetime) -> dict[int, int]:
        """How many calls each endpoint started on ``day`` (its midnight, UTC), those that started any: the
        dispatcher's count at each day's start (and at its own), which the daily caps count from."""
        sql = precompiled("started_on", lambda p: f'SELECT "endpoint_id", "started" FROM "endpointday" WHERE "day" = {p}')
        counts = execute(sql, (EndpointDay.day.db_value(day),)).fetchall()
        return {int(endpoint_id): int(n) for endpoint_id, n in counts if n}

    @staticmethod
    def forget_days_before(day: dt.datetime) -> None:
        """Drop the endpoints' counters of the days before ``day`` (the dispatcher, at each day's start)."""
        writer().submit(lambda: EndpointDay.delete().where(EndpointDay.day < day).execute(), durable=False, bulk=True)

    @staticmethod
    def media_in_use() -> set[str]:
        """The media files calls not yet ended will play.

        Read on the event loop, hourly: the store keeps each distinct set of files once, so a campaign of
        100,000 scheduled calls playing the same few files hands back a few rows, not 100,000 models
        (1.15 s with every call in progress waiting; now tens of milliseconds)."""
        statuses = [status.value for status in PENDING_STATUSES + IN_FLIGHT_STATUSES]
        sql = precompiled(f"media_in_use:{len(statuses)}", lambda p: (
            'SELECT DISTINCT "play_file", "msg_file", "dialtone_file" FROM "call" '
            f'WHERE "status" IN ({", ".join([p] * len(statuses))})'))
        return {path for files in execute(sql, statuses).fetchall() for path in files if path}

    @staticmethod
    def scheduled_page(endpoint_ids: Collection[int] | None, *, limit: int,
                       after: tuple[dt.datetime, int] | None = None) -> list[Call]:
        """Up to ``limit`` pending scheduled calls of the endpoints (None: every endpoint) after ``after``,
        by (due_at, id), through the index of pending scheduled calls (v14); every endpoint's are those of
        the endpoints found in that index (a loose index scan). One endpoint's: one ordered walk. Several:
        their keys only, merged here, then the page's rows once; up to ``MERGED_AT_MOST`` endpoints, a walk
        each, more in one statement that reads all their pending scheduled calls' keys from the index and
        sorts them there (40,000 of 2,000 endpoints: 2-3 ms; their walks, rows and all, held the loop 1 s)."""
        if endpoint_ids is None:
            endpoint_ids = endpoints_in_index("call", SCHEDULED_PENDING, index="call_scheduled_pending")
        ids = sorted(set(endpoint_ids))
        since = () if after is None else (Call.due_at.db_value(after[0]), after[1])
        later = ' AND ("due_at", "id") > ({p}, {p})' if after is not None else ""
        if len(ids) == 1:
            sql = precompiled(f"scheduled_page:{after is not None}", lambda p: (
                f'SELECT * FROM "call" WHERE "endpoint_id" = {p} AND {SCHEDULED_PENDING}{later.format(p=p)} '
                f'ORDER BY "due_at", "id" LIMIT {p}'))
            return select_rows(Call, sql, (ids[0], *since, limit))
        keys: list[tuple[Any, int]] = []
        if len(ids) <= MERGED_AT_MOST:
            sql = precompiled(f"scheduled_keys:{after is not None}", lambda p: (
                f'SELECT "due_at", "id" FROM "call" WHERE "endpoint_id" = {p} AND {SCHEDULED_PENDING}'
                f'{later.format(p=p)} ORDER BY "due_at", "id" LIMIT {p}'))
            for endpoint_id in ids:
                keys += execute(sql, (endpoint_id, *since, limit)).fetchall()
        else:
            def among_endpoints(p: str) -> str:
                # SQLite is told the index: left alone, it walks each endpoint's calls by status instead.
                indexed = " INDEXED BY call_scheduled_pending" if p == "?" else ""
                chosen = among_sql('"endpoint_id"', p)
                return (f'SELECT "due_at", "id" FROM "call"{indexed} WHERE {chosen} AND {SCHEDULED_PENDING}'
                        f'{later.format(p=p)} ORDER BY "due_at", "id" LIMIT {p}')

            sql = precompiled(f"scheduled_keys_among:{after is not None}", among_endpoints)
            keys = execute(sql, (among_value(ids), *since, limit)).fetchall()
        page = [call_id for _, call_id in sorted(keys)[:limit]]
        if not page:
            return []
        sql = precompiled(f"scheduled_rows:{len(page)}", lambda p: (
            f'SELECT * FROM "call" WHERE "id" IN ({", ".join([p] * len(page))}) ORDER BY "due_at", "id"'))
        return select_rows(Call, sql, page)

    @staticmethod
    def recordings_older_than(cutoff: dt.datetime, limit: int) -> list[Call]:
        """Calls still pointing at a recording and ended (else started, else requested) before ``cutoff``.

        Read on the event loop, hourly: through the index of the calls that have a recording, by request
        time (none ended before it was requested), so the read visits the expired ones and not the
        store's million calls (a walk by id took 0.24 s at 300,000 calls, with every call waiting)."""
        sql = precompiled("recordings_older_than", lambda p: (
            f'SELECT * FROM "call" WHERE "recording_path" != \'\' AND "requested_at" < {p} '
            f'AND COALESCE("ended_at", "started_at", "requested_at") < {p} ORDER BY "requested_at", "id" LIMIT {p}'))
        when = Call.requested_at.db_value(cutoff)
        return select_rows(Call, sql, (when, when, limit))

    @staticmethod
    def recordings_in_use(paths: Collection[str]) -> set[str]:
        """Those of ``paths`` a call still points at. No index has the paths: one read of the recorded
        calls for many files (retention asks for 500 at a time), not one for each."""
        wanted = sorted(set(paths))
        kept: set[str] = set()
        for start in range(0, len(wanted), 500):
            rows: Any = (Call.select(Call.recording_path)
                         .where((Call.recording_path != "") & Call.recording_path.in_(wanted[start:start + 500]))
                         .tuples())
            kept.update(path for (path,) in rows)
        return kept

    # -- a request's writes (synchronous=FULL, fail fast) ----------------------------------------
    def create(self, endpoint: Endpoint, request: NewCall, *, now: dt.datetime) -> Created:
        """Store a requested call: ``scheduled`` when due more than a second from ``now``, else ``queued``.

        A request carrying an idempotency key its endpoint already used gets the earlier call back, also
        when the two requests race (the unique index decides).
        """
        due = request.due_at if request.scheduled else max(request.due_at, now)
        status = CallStatus.SCHEDULED if due > now + dt.timedelta(seconds=1) else CallStatus.QUEUED
        key = request.idempotency_key
        after: list[Callable[[], None]] = []

        def insert() -> Call:
            after.clear()  # (a write tried again after the store refused its group runs again)
            call = Call(
                callid=new_callid(), endpoint=endpoint.id, phone_a=request.phone_a,
                phone_b=request.phone_b, play_url=request.play_url, msg=request.msg, msg_lang=request.msg_lang,
                dialtone_url=request.dialtone_url, play_file=request.play_file, msg_file=request.msg_file,
                dialtone_file=request.dialtone_file, idempotency_key=key,
                request_fingerprint=request.request_fingerprint, requested_at=now, due_at=due,
                scheduled=request.scheduled, status=status.value)
            insert_row(call)
            append_event(call.id, "requested", at=now, due_at=iso(due), scheduled=request.scheduled or None)
            after.extend(self._write_status(call, status, {}))
            return call

        try:
            call: Call = writer().submit(insert, durable=True, fail_fast=True, wait=True, independent=True)
        except IntegrityError:
            # The same key committed by a concurrent request between the caller's look-up and this insert.
            earlier = self.by_idempotency_key(endpoint.id, key) if key is not None else None
            if earlier is None:
                raise
            return Created(earlier, new=False)
        self._committed(call, status, {}, after)
        self.metrics.calls_created.labels(kind="scheduled" if request.scheduled else "immediate").inc()
        log_event(api_log, "api.call_requested", callid=call.callid, endpoint=endpoint.name,
                  token=endpoint.token_hint, status=status.value, due_at=iso(due))
        return Created(call, new=True)

    def cancel(self, call: Call, endpoint: Endpoint, *, now: dt.datetime,
               via: str = "the API") -> Call | NotCancelable:
        """Cancel the endpoint's call if it has not started; the call as it stands afterwards.

        The mirror of :meth:`claim`: both are one conditional UPDATE, so whichever commits first wins whole.
        """
        after: list[Callable[[], None]] = []

        def update() -> Call | None:
            after.clear()
            changed = (Call.update(status=CallStatus.CANCELED.value, canceled_at=now, canceled_by=endpoint.name,
                                   reason=f"canceled through {via}")
                       .where((Call.id == call.id) & (Call.endpoint == endpoint.id) & _status_in(PENDING_STATUSES))
                       .execute())
            if changed != 1:
                return None
            add_event(call.id, "canceled", at=now, by=endpoint.name)
            canceled = Call.get_by_id(call.id)
            after.extend(self._write_status(canceled, CallStatus.CANCELED, {}))
            return canceled

        fresh = writer().submit(update, durable=True, fail_fast=True, wait=True)
        if fresh is None:
            return NotCancelable(Call.get_by_id(call.id))
        self._committed(fresh, CallStatus.CANCELED, {}, after)
        self.metrics.calls_final.labels(CallStatus.CANCELED.value, "").inc()
        log_event(api_log, "api.call_canceled", callid=fresh.callid, endpoint=endpoint.name,
                  token=endpoint.token_hint)
        return fresh

    # -- the daemon's writes (wait out a locked database) -----------------------------------------
    @contextlib.contextmanager
    def claim_round(self) -> Iterator[None]:
        """The dispatcher's reading of due calls and claiming of some of them (see the module's docstring):
        one transaction on PostgreSQL, nothing on SQLite."""
        if not is_shared():
            yield
            return
        with database.atomic():
            yield

    @staticmethod
    def after_claims(action: Callable[[], None]) -> None:
        """Run ``action`` once the claims made so far are committed: at once outside a claim round, after
        the round's commit inside one (and never if it rolls back). ``action`` must not raise."""
        database.after_commit(action)

    def claim(self, call: Call, *, a_uuid: str, b_uuid: str, now: dt.datetime, switch: str | None = None) -> bool:
        """Take a pending call for dialing: one conditional update, so a cancel racing it loses or wins whole.

        The leg UUIDs and the switch they go to are committed with the claim (durably), before anything
        is sent to FreeSWITCH: after a crash the call is found by them on that switch and reconciled,
        never redialed.
        """
        update, claimed = self._claim_write(call, a_uuid=a_uuid, b_uuid=b_uuid, now=now, switch=switch)
        if not writer().submit(update, durable=True, wait=True):
            return False
        claimed()
        return True

    def claim_soon(self, call: Call, *, a_uuid: str, b_uuid: str, now: dt.datetime, switch: str | None,
                   done: Callable[[bool], None]) -> None:
        """:meth:`claim` without waiting for its commit (the dispatcher on SQLite: the claims of a tick then
        share one commit). ``done(True)`` runs on the loop once the claim is committed, ``done(False)`` if
        the call was no longer pending by then (canceled, or claimed meanwhile) or the write failed; nothing
        may be sent for the call before ``done(True)``."""
        update, claimed = self._claim_write(call, a_uuid=a_uuid, b_uuid=b_uuid, now=now, switch=switch)

        def committed(taken: bool) -> None:
            try:
                if taken:
                    claimed()
            finally:  # the dispatcher counts the claim as under way until told: a raise must not leak it
                done(taken)

        writer().submit(update, durable=True, committed=committed, failed=lambda _error: done(False))

    def _claim_write(self, call: Call, *, a_uuid: str, b_uuid: str, now: dt.datetime,
                     switch: str | None) -> tuple[Callable[[], bool], Callable[[], None]]:
        """A claim's conditional update (for the writer), and what follows once it is committed (on the loop)."""
        lateness = max(0, int((now - call.due_at).total_seconds() * 1000))
        lease_until = self.store_time(now) + self.lease
        claimed = _snapshot(call)
        claimed.status, claimed.a_uuid, claimed.b_uuid = CallStatus.DIALING_A.value, a_uuid, b_uuid
        claimed.started_at, claimed.lateness_ms, claimed.switch = now, lateness, switch
        claimed.owner, claimed.lease_until = self.owner, lease_until
        endpoint_id = call.endpoint_id
        after: list[Callable[[], None]] = []

        def update() -> bool:
            after.clear()
            updated = update_call(call.id, {"status": CallStatus.DIALING_A.value, "a_uuid": a_uuid, "b_uuid": b_uuid,
                                            "started_at": now, "lateness_ms": lateness, "switch": switch,
                                            "owner": self.owner, "lease_until": lease_until},
                                  if_status=PENDING_STATUSES)
            if updated != 1:
                return False
            append_event(call.id, "claimed", at=now, lateness_ms=lateness, a_uuid=a_uuid, b_uuid=b_uuid,
                         switch=switch)
            count_started(endpoint_id, now)
            after.extend(self._write_status(claimed, CallStatus.DIALING_A, {}))
            return True

        def taken() -> None:
            call.status, call.a_uuid, call.b_uuid = CallStatus.DIALING_A.value, a_uuid, b_uuid
            call.started_at, call.lateness_ms, call.switch = now, lateness, switch
            call.owner, call.lease_until = self.owner, lease_until
            log_event(log, "claimed", callid=call.callid, lateness_ms=lateness, a_uuid=a_uuid, b_uuid=b_uuid,
                      switch=switch)

            def committed() -> None:
                self.metrics.scheduler_lateness.observe(lateness / 1000)
                self._count_phase(claimed.id, CallStatus.DIALING_A)
                self._committed(claimed, CallStatus.DIALING_A, {}, after)

            self.after_claims(committed)

        return update, taken

    def step(self, call: Call, kind: str, at: dt.datetime | None = None, **detail: Any) -> None:
        """Add one step to the call's timeline (no status change)."""
        when = at or self.clock()
        call_id = call.id
        writer().submit(lambda: append_event(call_id, kind, at=when, **detail), durable=False)
        log_event(log, kind, callid=call.callid, **detail)

    def mark_dialing_a(self, call: Call, *, attempt: int = 1, core_uuid: str | None = None) -> None:
        """The originate to A is about to leave (it has its turn on the connection): committed durably, so
        a call claimed but never sent (the daemon died while it waited for its turn), or refused by the
        switch and not sent again, is known at the next start and dialed then, not failed unheard
        (:meth:`unsent_because`). Each ``attempt`` after a refusal is marked again. One try with no wait,
        since the caller holds the connection's turn: raises ``OperationalError`` when the store refuses
        it, and then the caller must not send (it tries again later; the refusal is logged as
        ``store.retry``, like other refusals).
        The caller waits for the commit (the group being written and its own: milliseconds), not the loop.

        On a shared PostgreSQL, only while this daemon owns the call (its lease renewed with the mark, in
        one transaction): a daemon that stalled past its lease and lost the call to another must not send
        what the other (which found no mark) dials; the mark refused, the lease keeper then lets the call
        go. With SQLite the one daemon owns every call: the mark alone, through the writer thread.

        ``core_uuid``: the switch's Core-UUID, so that a next start can tell that FreeSWITCH restarted while
        no daemon was connected to it (:meth:`dialed_on`)."""
        call_id, now = call.id, self.clock()
        detail: dict[str, Any] = {"phone": call.phone_a, "a_uuid": call.a_uuid, "core_uuid": core_uuid}
        if attempt > 1:
            detail["attempt"] = attempt
        shared = is_shared()
        until, mine = self.store_time(now) + self.lease, self._mine()

        def mark() -> str | None:
            if shared:  # the row's lock also orders this with request_hangup's
                held = Call.update(lease_until=until).where((Call.id == call_id) & mine).execute()
                if held != 1:
                    raise NotOwned("another daemon took the call over")
            by = _hangup_requested_by(call_id)
            if by is None:
                append_event(call_id, DIAL_MARK, at=now, **detail)
            return by

        try:
            refused_by = writer().submit(mark, durable=True, fail_fast=True, wait=True)
        except OperationalError as exc:
            log_event(log, "store.retry", logging.WARNING, error=str(exc), step=DIAL_MARK, callid=call.callid)
            raise
        if refused_by is not None:
            raise HangupRequested(refused_by)
        log_event(log, DIAL_MARK, callid=call.callid, **detail)

    @staticmethod
    def request_hangup(call: Call, *, by: str) -> bool:
        """An operator's hangup, noted durably in the call's timeline before anything goes to the switch:
        from its commit on no originate of A leaves (:meth:`mark_dialing_a` refuses, and the call ends
        canceled). Returns whether an originate of A may have left already (then A's channel is the one
        to kill). Both run in one transaction with the call's row locked on PostgreSQL (one writer on
        SQLite), so the one committed second sees the other."""
        call_id, now = call.id, utcnow()

        def note() -> bool:
            if is_shared():
                list(Call.select(Call.id).where(Call.id == call_id).for_update())
            append_event(call_id, HANGUP_REQUESTED, at=now, by=by)
            return CallRecords.unsent_because(call) is None

        sent: bool = writer().submit(note, durable=True, fail_fast=True, wait=True)
        log_event(log, HANGUP_REQUESTED, callid=call.callid, by=by, a_may_be_dialed=sent)
        return sent

    def a_answered(self, call: Call, *, at: dt.datetime) -> None:
        """A picked up: it hears the prompts next."""
        if call.started_at:
            self.metrics.originate_to_answer.labels("a").observe((at - call.started_at).total_seconds())
        self._move(call, CallStatus.A_ANSWERED, at, {"a_answered_at": at})

    def dialing_b(self, call: Call, *, at: dt.datetime) -> None:
        """The bridge to B started; A hears the dialtone."""
        self._move(call, CallStatus.DIALING_B, at, {"b_dialed_at": at, "b_uuid": call.b_uuid},
                   detail={"phone": call.phone_b})

    def b_answered(self, call: Call, *, at: dt.datetime) -> None:
        """B picked up (the bridge follows)."""
        if call.b_dialed_at:
            self.metrics.originate_to_answer.labels("b").observe((at - call.b_dialed_at).total_seconds())
        self.step(call, "b_answered", at=at)

    def bridged(self, call: Call, *, at: dt.datetime, ring_seconds: float | None) -> None:
        """A and B are talking."""
        self._move(call, CallStatus.BRIDGED, at, {"bridged_at": at, "ring_seconds": ring_seconds})

    def finish(self, call: Call, status: CallStatus, *, at: dt.datetime | None = None, reason: str = "",
               failed_leg: str | None = None, a_cause: str | None = None, b_cause: str | None = None,
               ring_seconds: float | None = None, talk_seconds: float | None = None,
               recording_bytes: int | None = None, recording_seconds: float | None = None,
               canceled_by: str | None = None, wait: bool = True) -> None:
        """End the call with a final status at ``at`` (now by default); fields left None stay as they are.
        ``canceled_by``: who canceled it (its ``canceled_at`` is then ``at``). Not ``wait``: a pending call's
        end is only queued (the caller flushes a page of them: one commit, not one each)."""
        if not status.final:
            raise ValueError(f"{status.value} is not a final status")
        when = at or self.clock()
        row: dict[str, Any] = {"ended_at": when, "reason": _fits(reason, Call.reason)}
        if canceled_by is not None:
            row["canceled_at"] = when
        optional = {"failed_leg": failed_leg, "a_cause": a_cause, "b_cause": b_cause, "ring_seconds": ring_seconds,
                    "talk_seconds": talk_seconds, "recording_bytes": recording_bytes,
                    "recording_seconds": recording_seconds, "canceled_by": canceled_by}
        row.update({name: value for name, value in optional.items() if value is not None})
        self._move(call, status, when, row, wait=wait)

    # -- missed or late ---------------------------------------------------------------------------
    def beat(self, now: dt.datetime) -> None:
        """A dispatcher runs at ``now`` (:class:`daemon.store.Heartbeat`); nobody waits for the write."""
        self.dispatcher_last_ran()  # read before this run's first beat overwrites it

        def write() -> None:
            # The latest note wins, whatever its time: a clock stepped back (or a daemon's clock ahead of the
            # others') is believed within one note, instead of a future time standing until it is reached.
            (Heartbeat.insert(name=DISPATCHER_HEARTBEAT, seen_at=now)
             .on_conflict(conflict_target=[Heartbeat.name], update={Heartbeat.seen_at: EXCLUDED.seen_at})
             .execute())

        writer().submit(write, durable=False)

    def dispatcher_last_ran(self) -> dt.datetime | None:
        """When a dispatcher last ran before this daemon's own began (read once): this daemon's previous run
        or, on a shared store, another daemon."""
        if not self._heartbeat_read:
            row = Heartbeat.get_or_none(Heartbeat.name == DISPATCHER_HEARTBEAT)
            self._heartbeat_before_start, self._heartbeat_read = (row.seen_at if row else None), True
        return self._heartbeat_before_start

    def past_grace(self, due_at: dt.datetime, *, now: dt.datetime, grace: int,
                   claimed_at: dt.datetime | None = None) -> bool:
        """A call not yet dialed is missed when no dispatcher ran for more than ``grace`` seconds since it was
        due; held back by the limits while one ran, it is late, not missed. ``claimed_at``, when it was
        claimed, is a time a dispatcher surely ran (the daemon that claimed it may since have died)."""
        since = max(t for t in (due_at, self.dispatcher_last_ran(), claimed_at) if t is not None)
        return (now - since).total_seconds() > grace

    def missed_before(self, *, now: dt.datetime, grace: int) -> dt.datetime | None:
        """The due time before which pending calls are :meth:`past_grace` at ``now``; None when none is
        (a dispatcher ran within the grace)."""
        limit = now - dt.timedelta(seconds=grace)
        last_ran = self.dispatcher_last_ran()
        return None if last_ran is not None and last_ran >= limit else limit

    def missed(self, call: Call, *, now: dt.datetime, grace: int, wait: bool = True) -> None:
        """A pending call whose time passed, beyond the grace, while the daemon could not start it (``wait``:
        as :meth:`finish`'s)."""
        late = int((now - call.due_at).total_seconds())
        self.finish(call, CallStatus.MISSED, at=now, wait=wait, reason=f"due at {call.due_at.isoformat()}Z, "
                    f"{late} s before the daemon could start it (grace {grace} s)")

    def recording_started(self, call: Call, path: str) -> None:
        """The bridged call is being recorded to ``path``."""
        call_id = call.id
        writer().submit(lambda: update_call(call_id, {"recording_path": path}), durable=False)
        call.recording_path = path
        self.step(call, "recording_started", path=path)

    def recording_expired(self, call: Call, *, at: dt.datetime, retention_days: int,
                          cleared: Callable[[], None] | None = None) -> None:
        """Retention deleted the call's recording: the call no longer points at it (length and size stay).
        Conditional on the call still pointing at it, so two daemons' sweeps clear it and note it once;
        ``cleared`` runs once the clear is committed, if this sweep was the one that cleared it. Nobody
        waits for the write (:meth:`flush` does)."""
        call_id, path = call.id, call.recording_path

        def update() -> bool:
            done = Call.update(recording_path="").where((Call.id == call_id) & (Call.recording_path == path)).execute()
            if done:
                add_event(call_id, "recording_expired", at=at, retention_days=retention_days)
            return bool(done)

        writer().submit(update, durable=False,
                        committed=lambda done: cleared() if done and cleared is not None else None)
        call.recording_path = ""

    @staticmethod
    def flush() -> None:
        """Wait until every write submitted so far is committed (for a reader that must see them)."""
        writer().flush()

    def _move(self, call: Call, status: CallStatus, at: dt.datetime, row: dict[str, Any],
              detail: dict[str, Any] | None = None, *, wait: bool = True) -> None:
        """Change an unfinished call's status with ``row``'s columns, a timeline step and the listeners.

        A call read as pending (the dispatcher refusing it, a missed one) moves only if it still is when
        written: a cancel committed since it was read stays, and nothing else of the change happens. A call
        in flight moves only while it is, and on a shared store only while this daemon owns it: a daemon
        that stalled past its lease, whose call another took over, writes none of its late steps and gets
        :class:`NotOwned`."""
        old = CallStatus(call.status)
        if old.final or old == status:
            return
        as_read = dict(call.__data__)
        for name, value in row.items():
            setattr(call, name, value)
        call.status = status.value
        extra = detail or {}
        step = {**extra, **{k: _plain(v) for k, v in row.items()}}
        moved = _snapshot(call)
        after: list[Callable[[], None]] = []

        pending = old in PENDING_STATUSES
        owner = self.owner if not pending and is_shared() else None

        def update() -> bool:  # the status, its timeline step and the outbox's rows, in one transaction
            after.clear()
            if not update_call(moved.id, {"status": status.value, **row},
                               if_status=PENDING_STATUSES if pending else IN_FLIGHT_STATUSES, owned_by=owner):
                return False
            append_event(moved.id, status.value, at=at, **step)
            after.extend(self._write_status(moved, status, extra))
            return True

        def committed(moved_it: bool) -> None:  # on the loop, once committed (or after the claim round)
            if not moved_it:
                return
            if moved.id in self._phases:  # not a late step of a call no longer followed here
                self._count_phase(moved.id, status)
            if status.final:
                cause = moved.b_cause if moved.failed_leg == "b" else moved.a_cause
                self.metrics.calls_final.labels(status.value, cause or "").inc()
            self._committed(moved, status, extra, after)

        # A call ended before it started (missed, refused by the dispatcher) is waited for: the dispatcher
        # reads pending calls next and must not find it pending still (unless the caller flushes a page of
        # them instead). A change on a shared store too: the caller acts on it only if this daemon still
        # owned the call.
        waited = (pending and wait) or owner is not None
        if writer().submit(update, durable=pending, wait=waited, committed=committed) is False:
            call.__data__ = as_read  # no longer pending (canceled meanwhile), or no longer ours: left as it is
            if owner is not None:
                # The caller must not act on a change it did not make (e.g. queue A's apps on an answer the
                # new owner acts on too): it stops following the call, as the lease keeper would have it.
                raise NotOwned(f"call {call.callid}: another daemon took it over (or ended it)")
            log_event(log, "move_skipped", callid=call.callid, to=status.value, note="no longer pending")
            return
        log_event(log, status.value, callid=call.callid, **step)

    def _write_status(self, call: Call, status: CallStatus, detail: dict[str, Any]) -> list[Callable[[], None]]:
        """The status writers' part of a change (inside its transaction); returns their actions for later."""
        actions = []
        for status_writer in self.status_writers:
            action = status_writer(call, status, detail)
            if action is not None:
                actions.append(action)
        return actions

    def _committed(self, call: Call, status: CallStatus, detail: dict[str, Any],
                   actions: list[Callable[[], None]]) -> None:
        """On the loop once a change is committed: the status writers' actions, then the listeners."""
        for action in actions:
            try:
                action()
            except Exception:
                log.exception("status writer's action failed", extra={"callid": call.callid})
        for listener in self.listeners:
            try:
                listener(call, status, detail)
            except Exception:  # a listener must never break a call
                log.exception("status listener failed", extra={"callid": call.callid})

    # -- several daemons on one store: the limits counted across them ---------------------------
    @staticmethod
    def lock_endpoints(endpoint_ids: Collection[int]) -> None:
        """Inside a claim round on a shared PostgreSQL: hold these endpoints' rows until the round commits,
        so that two daemons' rounds claiming for one endpoint take turns and each counts the other's
        claims (:meth:`endpoint_load`). ``FOR NO KEY UPDATE``: the API's inserts of new calls (which only
        share-lock their endpoint's key) are not held up. One statement in id order, so two rounds never
        wait on each other in a circle."""
        if endpoint_ids:
            list(Endpoint.select(Endpoint.id).where(Endpoint.id.in_(sorted(endpoint_ids))).order_by(Endpoint.id)
                 .for_update("FOR NO KEY UPDATE"))  # type: ignore[arg-type]  # peewee takes the clause

    @staticmethod
    def endpoint_load(endpoint_id: int, *, day: dt.datetime, window_start: dt.datetime) -> EndpointLoad:
        """The endpoint's calls in flight, started on ``day`` (its midnight, UTC) and after ``window_start``,
        whichever daemon runs them: one statement, each of its counts bounded by one of the endpoint's
        limits (in flight, calls per second), the day's read from its counter (:class:`EndpointDay`)."""
        statuses = [status.value for status in IN_FLIGHT_STATUSES]
        sql = precompiled(f"endpoint_load:{len(statuses)}", lambda p: (
            f'SELECT (SELECT COUNT(*) FROM "call" WHERE "endpoint_id" = {p} AND "status" IN '
            f'({", ".join([p] * len(statuses))})), '
            f'(SELECT "started" FROM "endpointday" WHERE "endpoint_id" = {p} AND "day" = {p}), '
            f'(SELECT COUNT(*) FROM "call" WHERE "endpoint_id" = {p} AND "started_at" > {p}), '
            f'(SELECT MIN("started_at") FROM "call" WHERE "endpoint_id" = {p} AND "started_at" > {p})'))
        since = Call.started_at.db_value(window_start)
        in_flight, today, recent, oldest = execute(sql, (
            endpoint_id, *statuses, endpoint_id, EndpointDay.day.db_value(day), endpoint_id, since,
            endpoint_id, since)).fetchone()
        return EndpointLoad(int(in_flight), int(today or 0), int(recent),
                            None if oldest is None else Call.started_at.python_value(oldest))

    # -- ownership: leases on the calls in flight ------------------------------------------------
    def renew_leases(self, call_ids: Collection[int], *, now: dt.datetime) -> set[int]:
        """Extend this daemon's lease on the calls it follows to ``now`` + the lease, in one UPDATE; returns
        those among them it no longer owns (another daemon took them over while this one had not renewed
        in time)."""
        ids = sorted(call_ids)
        started = self.monotonic()
        if not ids:
            self._held_until = started + self._sure_for()
            return set()
        until = self.store_time(now) + self.lease
        mine = self._mine()
        renewed = writer().submit(lambda: Call.update(lease_until=until).where(among(Call.id, ids) & mine).execute(),
                                  durable=False, wait=True, bulk=True)
        self._held_until = started + self._sure_for()
        if renewed == len(ids):
            return set()
        rows: Any = Call.select(Call.id).where(among(Call.id, ids) & mine).tuples()
        kept = {int(row_id) for (row_id,) in rows}
        return set(ids) - kept

    def store_time(self, now: dt.datetime) -> dt.datetime:
        """``now`` of this host's clock as the shared store's clock reads it: the time leases are kept in."""
        return now + self.clock_offset

    def _sure_for(self) -> float:
        """Seconds after a renewal starts that its leases surely still hold: a third of the lease short of
        it, for what the daemons' clocks drift apart between two measurements of their offsets."""
        return self.lease.total_seconds() * 2 / 3

    def lease_lapsed(self) -> bool:
        """On a shared store: this daemon did not renew its leases in time (its loop or the store stalled),
        so another daemon may have taken any of its calls over; ask (:meth:`hold`) before acting on one."""
        return is_shared() and self.monotonic() >= self._held_until

    def hold(self, call: Call) -> None:
        """Renew the lease of this one call, which this daemon follows; raises :class:`NotOwned` when another
        daemon owns it now. A store that does not answer is no answer: the caller goes on as it would have
        (an outage of the store is what stops renewals most often, and nobody takes a call over without it)."""
        call_id, until, mine = call.id, self.store_time(self.clock()) + self.lease, self._mine()
        try:
            held = writer().submit(lambda: Call.update(lease_until=until).where((Call.id == call_id) & mine)
                                   .execute(), durable=False, fail_fast=True, wait=True)
        except OperationalError as exc:
            log_event(log, "lease.unconfirmed", logging.WARNING, error=str(exc), callid=call.callid)
            return
        if held != 1:
            raise NotOwned(f"call {call.callid}: another daemon took it over")

    def release_leases(self, call_ids: Collection[int], *, now: dt.datetime) -> int:
        """This daemon stops following these calls (it is shutting down): their leases end ``now``, so
        another daemon takes them over at its next look instead of a whole lease later."""
        ids = sorted(call_ids)
        if not ids:
            return 0
        mine, ended = self._mine(), self.store_time(now)
        # One attempt: a store that refuses it must not hold up the stop (the leases then run out by themselves).
        return int(writer().submit(lambda: Call.update(lease_until=ended)
                                   .where(among(Call.id, ids) & mine & _status_in(IN_FLIGHT_STATUSES)).execute(),
                                   durable=True, fail_fast=True, wait=True, bulk=True))

    def stopped_following(self, call: Call) -> None:
        """This daemon no longer follows the call (its sequence ended, gave up, or let it go to another
        daemon): it leaves calls_in_flight, and later steps of it are not counted there."""
        self._count_phase(call.id, None)

    def _count_phase(self, call_id: int, status: CallStatus | None) -> None:
        """Count the call in calls_in_flight under ``status`` instead of its phase so far (None or a final
        status: no longer). Kept per call, so a call adopted or taken over is counted once, in its own phase,
        and its end never takes the gauge below zero."""
        before = self._phases.pop(call_id, None)
        if before is not None:
            self._in_phase[before].dec()
        if status is not None and status.in_flight:
            self._phases[call_id] = status
            self._in_phase[status].inc()

    def _mine(self) -> Expression:
        """Calls this daemon owns: under its instance id, and on a shared store only while this run still
        holds that id. A daemon that stalled past ``lease_seconds`` may find both its leases and its id
        taken over by a new run under the same name: every lease check (:meth:`hold`, the mark) then
        fails here, as it would have for another daemon's name, and it acts on nothing more."""
        if self.owner is None:
            return Call.owner.is_null()
        mine = Call.owner == self.owner
        if self.run_id is not None:
            held = DaemonInstance.select(DaemonInstance.instance_id).where(
                (DaemonInstance.instance_id == self.owner) & (DaemonInstance.run_id == self.run_id))
            mine &= fn.EXISTS(held)
        return mine

    def left_in_flight(self, *, now: dt.datetime) -> list[Call]:
        """At start: the calls in flight this daemon is to follow, taken (:meth:`take_over`). With SQLite
        (one daemon) every one; on a shared PostgreSQL those of a previous run under the same instance id,
        those no one owns, and those whose owner's lease expired, never another live daemon's."""
        calls = self.in_flight()
        if is_shared():
            expired = self.store_time(now)
            calls = [call for call in calls if call.owner is None or call.owner == self.owner
                     or call.lease_until is None or call.lease_until < expired]
        # Taken in one commit, not one each (2,000 calls in flight took a start 3 s of commits here).
        taken: list[Call] = []
        for call in calls:
            update, took = self._take_over_write(call, now=now)

            def committed(count: int, call: Call = call, took: Callable[[], None] = took) -> None:
                if count == 1:
                    took()
                    taken.append(call)

            writer().submit(update, durable=True, committed=committed)
        writer().flush()
        return taken

    def expired_leases(self, *, now: dt.datetime, exclude: Collection[int] = (), limit: int = 500) -> list[Call]:
        """Calls in flight, with their endpoints, whose lease ended before ``now`` (their daemon stopped
        renewing it) or that no one holds, oldest start first, leaving out ``exclude``.

        ``exclude`` (the calls this daemon follows: thousands) is left out here, not in the SQL: a ``NOT IN``
        of 2,000 ids took peewee over 4 ms to build, on the event loop, at every lease keeper's tick
        (scale bench). This daemon's own calls are rarely expired (their renewal comes first), so a page
        seldom holds one."""
        expired = self.store_time(now)
        query = (Call.select(Call, Endpoint).join(Endpoint)
                 .where(_status_in(IN_FLIGHT_STATUSES) & (Call.lease_until.is_null() | (Call.lease_until < expired)))
                 .order_by(Call.started_at, Call.id))
        found: list[Call] = []
        offset = 0
        while len(found) < limit:
            page = list(query.limit(limit).offset(offset))
            found += [call for call in page if call.id not in exclude]
            if len(page) < limit:
                break
            offset += limit
        return found[:limit]

    def take_over(self, call: Call, *, now: dt.datetime) -> bool:
        """Make this daemon the call's owner, with a fresh lease: one conditional UPDATE on the owner the
        call had when read (and, on a shared store, its lease having expired unless that owner is this
        daemon), so when several daemons try at once exactly one wins. ``call`` is updated on success."""
        update, took = self._take_over_write(call, now=now)
        # Waited for: the caller follows the call only if this daemon won it (the row count says).
        if writer().submit(update, durable=True, wait=True) != 1:
            return False
        took()
        return True

    def _take_over_write(self, call: Call, *, now: dt.datetime) -> tuple[Callable[[], int], Callable[[], None]]:
        """A take-over's conditional update (its row count: 1 when won), and what follows a win."""
        previous = call.owner
        condition = (Call.id == call.id) & _status_in(IN_FLIGHT_STATUSES)
        condition &= Call.owner.is_null() if previous is None else (Call.owner == previous)
        store_now = self.store_time(now)
        if is_shared() and (previous is None or previous != self.owner):
            condition &= Call.lease_until.is_null() | (Call.lease_until < store_now)
        until = store_now + self.lease
        owner = self.owner

        def update() -> int:
            return int(Call.update(owner=owner, lease_until=until).where(condition).execute())

        def took() -> None:
            call.owner, call.lease_until = owner, until
            self._count_phase(call.id, CallStatus(call.status))
            if previous is not None and previous != owner:
                log_event(log, "call.taken_over", callid=call.callid, previous_owner=previous)

        return update, took
