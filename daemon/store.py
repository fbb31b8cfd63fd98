"""The store: peewee models for endpoints, calls and each call's timeline, and the schema migrations.

Two databases, the same schema and the same code:

* **SQLite** (``sqlite:///path``, the default): one daemon on one host. WAL mode with
  ``synchronous=FULL``, so that a committed claim ("this call is being dialed") survives a power cut.
  One connection per OS thread (:class:`ThreadConnections`), not per greenlet: the greenlets of the
  event loop share one, which only reads while the daemon runs, and the store's writer thread
  (:mod:`daemon.writer`) has its own, through which every write of the daemon goes; WAL lets the loop
  read while the writer commits. Nothing yields inside a transaction (no network I/O between
  ``atomic()`` and its commit, and SQLite's own calls do not yield). SQLite's busy wait blocks its
  thread, hence the short busy timeout.
* **PostgreSQL** (``postgresql://user:password@host:port/name``): the store several daemons share.
  Here every statement waits on the network and yields to other greenlets, so one shared connection
  would interleave two greenlets' transactions. Instead a small pool lends a connection to one greenlet
  for one statement or one whole transaction (:mod:`daemon.postgres`): a transaction never sees another
  greenlet's statements, a connection is never pinned to a call in progress or to a greenlet that dies,
  and a process needs about as many connections as it has statements in flight at once (10 by
  default). The driver is psycopg 3, which waits through gevent when gevent patched first: no wait
  callback to install, and psycopg2's psycogreen route is in maintenance mode.

Migrations run on both (PostgreSQL holds an advisory lock around them, so daemons starting together
take turns); they are numbered, each runs once inside a transaction, and new ones are appended.

Times are naive UTC datetimes everywhere in the store (SQLite text, PostgreSQL ``timestamp`` without
time zone).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import peewee
from gevent import monkey
from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    CompositeKey,
    Database,
    DatabaseProxy,
    DateTimeField,
    DeferredForeignKey,
    DoubleField,
    Expression,
    Field,
    ForeignKeyField,
    IntegerField,
    Model,
    PostgresqlDatabase,
    SqliteDatabase,
    TextField,
    Value,
    _ConnectionState,  # type: ignore[attr-defined]  # peewee's per-connection state
    fn,
)
from playhouse.db_url import connect
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import migrate as migrate_schema

from daemon.postgres import GreenPostgresqlDatabase, connect_postgres, is_postgres_url

database = DatabaseProxy()

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "full",
    "foreign_keys": 1,
    # ms; SQLite's wait blocks the whole gevent process, so it is short: the daemon's call records retry a locked
    # write with gevent sleeps in between, and the API answers 503.
    "busy_timeout": 250,
    # The statement journals of the writer's savepoints in memory: on disk each was a file created and
    # unlinked in /var/tmp (16 a second under load), which a hardened unit may not even allow.
    "temp_store": "memory",
}


EPOCH = dt.datetime(1970, 1, 1)  # times in the store are naive UTC; FreeSWITCH counts microseconds from this


def utcnow() -> dt.datetime:
    """Now, as the store keeps times: naive UTC. (From ``time.time()``: ``datetime.now(UTC)`` with its zone
    dropped took seven times as long, and a call reads the clock at nearly every step.)"""
    return EPOCH + dt.timedelta(seconds=time.time())


def day_of(at: dt.datetime) -> dt.datetime:
    """The start (midnight, UTC) of the day ``at`` falls on: the day an endpoint's daily cap counts in."""
    return dt.datetime.combine(at.date(), dt.time())


# What a callid may be (ours are 28 random hex digits): the API's paths, the OpenAPI document and the
# channel variable sent to FreeSWITCH all hold to this one rule.
CALLID_PATTERN = r"^[0-9a-z]{8,40}$"
CALLID_RE = re.compile(CALLID_PATTERN)


def new_callid() -> str:
    """A fresh, unguessable callid."""
    return secrets.token_hex(14)


class CallStatus(enum.StrEnum):
    """Every state a call can be in. Final states are words a person understands."""

    SCHEDULED = "scheduled"  # waiting for call_date (and, once due, for a free slot under the limits)
    QUEUED = "queued"  # a call for now, waiting for a free slot under the limits
    DIALING_A = "dialing_a"  # claimed; originate to A sent (or about to be)
    A_ANSWERED = "a_answered"  # A picked up, hearing the prompts
    DIALING_B = "dialing_b"  # bridge to B started, A hears the dialtone
    BRIDGED = "bridged"  # A and B talking
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    MISSED = "missed"  # its time passed while no dispatcher ran, beyond schedule_grace

    @property
    def final(self) -> bool:
        return self in FINAL_STATUSES

    @property
    def in_flight(self) -> bool:
        return self in IN_FLIGHT_STATUSES


FINAL_STATUSES = frozenset({CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.CANCELED, CallStatus.MISSED})
PENDING_STATUSES = (CallStatus.SCHEDULED, CallStatus.QUEUED)
IN_FLIGHT_STATUSES = (CallStatus.DIALING_A, CallStatus.A_ANSWERED, CallStatus.DIALING_B, CallStatus.BRIDGED)
# The scheduled calls not yet started: the condition of their partial index (v14). A query repeats it word
# for word to be served by that index (SQLite matches a partial index's condition by its terms).
SCHEDULED_PENDING = "\"scheduled\" AND \"status\" IN ('scheduled', 'queued')"


class BaseModel(Model):
    id = AutoField()  # declared so type checkers know it

    class Meta:
        database = database


M = TypeVar("M", bound=BaseModel)


class Endpoint(BaseModel):
    """An API client: its token (hashed), caller ID, route to the carrier, limits and options."""

    name = CharField(max_length=100, unique=True)
    token_hash = CharField(max_length=64, unique=True)  # sha256 hex of the token
    token_hint = CharField(max_length=16)  # the token's first characters, for lists and logs
    caller_id_number = CharField(max_length=32)
    caller_id_name = CharField(max_length=64, default="")
    dial_string = CharField(max_length=255)  # e.g. sofia/gateway/carrier/{number}
    record = BooleanField(default=False)
    timezone = CharField(max_length=64, default="UTC")
    ring_tone = CharField(max_length=128, default="%(2000,4000,440,480)")
    max_in_flight = IntegerField(default=10)
    calls_per_second = DoubleField(default=5.0)
    max_duration = IntegerField(default=3600)  # seconds from A's answer
    daily_cap = IntegerField(default=1000)  # calls started per UTC day
    allowed_prefixes = TextField(default="")  # comma-separated digit prefixes; empty: any
    extension_pattern = CharField(max_length=128, default="")  # regex for short internal numbers
    webhook_url = CharField(max_length=500, default="")
    webhook_secret = CharField(max_length=128, default="")
    enabled = BooleanField(default=True)
    created_at = DateTimeField(default=utcnow)
    disabled_at = DateTimeField(null=True)
    # The web account that sees this endpoint and its calls (admins see all). Deferred: no REFERENCES
    # clause, so the v1 step can create this table before the account table exists (v5 adds both).
    owner = DeferredForeignKey("Account", null=True, backref="endpoints")
    owner_id: int | None  # the column behind ``owner`` (peewee makes the attribute)


class Call(BaseModel):
    """One requested call bridge, from request to final status."""

    callid = CharField(max_length=40, unique=True)
    # No index of its own: (endpoint_id, id) and the others that start with it serve it (v8).
    endpoint = ForeignKeyField(Endpoint, backref="calls", on_delete="RESTRICT", index=False)
    endpoint_id: int
    phone_a = CharField(max_length=20)
    phone_b = CharField(max_length=20)
    play_url = TextField(default="")
    msg = TextField(default="")
    msg_lang = CharField(max_length=8, default="")
    dialtone_url = TextField(default="")
    # Normalised media made when the request arrived (paths under the media cache).
    play_file = TextField(default="")
    msg_file = TextField(default="")
    dialtone_file = TextField(default="")
    idempotency_key = CharField(max_length=200, null=True)
    request_fingerprint = CharField(max_length=64, null=True)  # sha256 of the request a key was used for
    requested_at = DateTimeField(default=utcnow)
    due_at = DateTimeField()
    scheduled = BooleanField(default=False)
    status = CharField(max_length=16)
    # Filled in as the call goes.
    a_uuid = CharField(max_length=36, null=True)
    b_uuid = CharField(max_length=36, null=True)
    switch = CharField(max_length=300, null=True)  # host:port of the switch A and B were sent to (v7)
    started_at = DateTimeField(null=True)
    lateness_ms = IntegerField(null=True)
    a_answered_at = DateTimeField(null=True)
    b_dialed_at = DateTimeField(null=True)
    bridged_at = DateTimeField(null=True)
    ended_at = DateTimeField(null=True)
    failed_leg = CharField(max_length=1, default="")  # "a" or "b"
    a_cause = CharField(max_length=40, default="")
    b_cause = CharField(max_length=40, default="")
    reason = CharField(max_length=200, default="")
    ring_seconds = DoubleField(null=True)
    talk_seconds = DoubleField(null=True)
    recording_path = TextField(default="")
    recording_seconds = DoubleField(null=True)
    recording_bytes = BigIntegerField(null=True)
    canceled_at = DateTimeField(null=True)
    canceled_by = CharField(max_length=100, default="")
    # Which daemon follows the call (its instance id, set by the claim) and until when it has said so:
    # it renews the lease while the call runs; past it, another daemon takes the call over (v6).
    owner = CharField(max_length=100, null=True)
    lease_until = DateTimeField(null=True)

    class Meta:
        indexes = (
            (("endpoint", "id"), False),  # list a token's calls, newest first
            (("endpoint", "started_at"), False),  # an endpoint's calls started today, in the last second
            (("endpoint", "status", "due_at"), False),  # list a token's scheduled calls
            (("status", "due_at"), False),  # the dispatcher: next due, calls in flight
        )  # and (endpoint_id, idempotency_key), unique where a key was given: v8 makes it


class CallEvent(BaseModel):
    """One step of a call's timeline."""

    call = ForeignKeyField(Call, backref="events", on_delete="CASCADE", index=False)  # (call_id, id) serves it
    at = DateTimeField(default=utcnow)
    kind = CharField(max_length=40)
    detail = TextField(default="")  # JSON object

    class Meta:
        indexes = ((("call", "id"), False),)

    @property
    def detail_dict(self) -> dict[str, Any]:
        return json.loads(self.detail) if self.detail else {}


class Account(BaseModel):
    """A person who signs in to the web pages: their endpoints and calls (an admin: everyone's)."""

    email = CharField(max_length=254, unique=True)  # stored lower-case
    password_hash = CharField(max_length=200)  # argon2id, parameters inside the string
    is_admin = BooleanField(default=False)
    enabled = BooleanField(default=True)
    created_at = DateTimeField(default=utcnow)
    disabled_at = DateTimeField(null=True)
    password_changed_at = DateTimeField(default=utcnow)
    last_login_at = DateTimeField(null=True)


class WebSession(BaseModel):
    """A signed-in browser. The cookie carries the session's random key, signed; only its SHA-256 is here,
    so a copy of the database does not hand out sessions."""

    key_hash = CharField(max_length=64, unique=True)
    account = ForeignKeyField(Account, backref="sessions", on_delete="CASCADE")
    account_id: int
    created_at = DateTimeField(default=utcnow)
    expires_at = DateTimeField()
    address = CharField(max_length=64, default="")

    class Meta:
        indexes = ((("account", "expires_at"), False),)


class SchemaVersion(BaseModel):
    version = IntegerField()
    applied_at = DateTimeField(default=utcnow)


class WebhookDelivery(BaseModel):
    """One status webhook to deliver: the outbox row is the queue (see daemon/ops/webhooks.py)."""

    event_id = CharField(max_length=36, unique=True)  # uuid4, sent as X-Callbridge-Event-Id
    endpoint = ForeignKeyField(Endpoint, backref="webhook_deliveries", on_delete="CASCADE")
    callid = CharField(max_length=40)
    status = CharField(max_length=16)  # the call status this event reports
    payload = TextField()  # the exact JSON body, frozen at creation so every retry sends the same bytes
    created_at = DateTimeField(default=utcnow)
    state = CharField(max_length=10, default="pending")  # pending, delivered, failed
    next_attempt_at = DateTimeField(default=utcnow)
    attempts = IntegerField(default=0)
    last_status_code = IntegerField(null=True)
    last_error = CharField(max_length=200, default="")
    finished_at = DateTimeField(null=True)

    class Meta:
        indexes = (
            (("state", "next_attempt_at"), False),  # the sender: when the next pending row falls due
            (("state", "endpoint", "next_attempt_at", "id"), False),  # which endpoints wait, each one's due rows
        )


class Heartbeat(BaseModel):
    """When a dispatcher last ran (one row, ``name`` "dispatcher", whichever daemon wrote it last): a call
    overdue at a start is missed only if no dispatcher ran for longer than the grace since it was due
    (one held back by the limits while a dispatcher ran is late, not missed)."""

    name = CharField(max_length=40, unique=True)
    seen_at = DateTimeField()


class DaemonInstance(BaseModel):
    """A daemon running under an ``instance_id`` on a shared PostgreSQL, renewing ``seen_at`` (the server's
    clock) while it runs, so that a second live daemon under the same id refuses to start
    (daemon/ops/instance.py). Made on SQLite too, where one daemon per file is held by a file lock instead
    and the table stays empty."""

    instance_id = CharField(max_length=100, primary_key=True)
    run_id = CharField(max_length=32)  # random, this run's
    host = CharField(max_length=255)
    boot_id = CharField(max_length=36, default="")  # the host's /proc/sys/kernel/random/boot_id
    pid = IntegerField()
    started_at = DateTimeField()
    seen_at = DateTimeField()

    class Meta:
        table_name = "instances"


class EndpointDay(BaseModel):
    """How many calls an endpoint started on one UTC day (``day``: its midnight), counted by each claim in
    the claim's own transaction. The endpoint's daily cap reads it: on a shared PostgreSQL at every claim
    round, where counting the day's calls instead read up to the cap's number of index entries with the
    endpoint locked against the other daemons."""

    endpoint = ForeignKeyField(Endpoint, on_delete="CASCADE", index=False)  # the key serves it
    endpoint_id: int
    day = DateTimeField()
    started = IntegerField(default=0)

    class Meta:
        primary_key = CompositeKey("endpoint", "day")


MODELS: list[type[Model]] = [SchemaVersion, Endpoint, Call, CallEvent, WebhookDelivery, Account, WebSession,
                             Heartbeat, DaemonInstance, EndpointDay]


def _v1_initial(db: Database) -> None:
    db.create_tables([Endpoint, Call, CallEvent], safe=True)


def _v2_webhook_outbox(db: Database) -> None:
    db.create_tables([WebhookDelivery], safe=True)


def _v3_status_index(db: Database) -> None:
    # GET /v1/calls?status=... walks one endpoint's calls of one status, newest first.
    db.execute_sql("CREATE INDEX IF NOT EXISTS call_endpoint_status_id ON call (endpoint_id, status, id)")


def _v4_request_fingerprint(db: Database) -> None:
    # An Idempotency-Key reused with a different request answers 422: the call keeps its request's
    # fingerprint. A database created at v1 from today's models has the column already.
    if "request_fingerprint" not in {c.name for c in db.get_columns("call")}:
        migrate_schema(SchemaMigrator.from_database(db).add_column(
            "call", "request_fingerprint", CharField(max_length=64, null=True)))


def _v5_web_accounts(db: Database) -> None:
    # Web accounts, their sessions, and which account owns each endpoint. A store created by v1 after
    # this model change already has endpoint.owner_id (v1 creates the current Endpoint), an older one not.
    db.create_tables([Account, WebSession], safe=True)
    if "owner_id" not in {column.name for column in db.get_columns("endpoint")}:
        migrator = SchemaMigrator.from_database(db)
        migrate_schema(migrator.add_column("endpoint", "owner_id", IntegerField(null=True)))
    db.execute_sql("CREATE INDEX IF NOT EXISTS endpoint_owner_id ON endpoint (owner_id)")


def _v6_call_leases(db: Database) -> None:
    # Several daemons on one PostgreSQL: each call in flight has an owner holding a lease; an endpoint's
    # daily cap and calls per second are counted from its calls' start times. A store created by v1 after
    # this model change already has the columns and the index.
    present = {column.name for column in db.get_columns("call")}
    migrator = SchemaMigrator.from_database(db)
    if "owner" not in present:
        migrate_schema(migrator.add_column("call", "owner", CharField(max_length=100, null=True)))
    if "lease_until" not in present:
        migrate_schema(migrator.add_column("call", "lease_until", DateTimeField(null=True)))
    db.execute_sql("CREATE INDEX IF NOT EXISTS call_endpoint_id_started_at ON call (endpoint_id, started_at)")


def _v7_call_switch(db: Database) -> None:
    # Several switches: the one a call's legs were sent to, so a restart reconciles it there. Calls
    # claimed before (by a daemon with one switch) have none: they are on the first switch listed. A
    # store created by v1 from today's models has the column already.
    if "switch" not in {column.name for column in db.get_columns("call")}:
        migrate_schema(SchemaMigrator.from_database(db).add_column(
            "call", "switch", CharField(max_length=300, null=True)))


def _v8_lean_indexes(db: Database) -> None:
    # Every insert and status change writes each index of its table (a page in the WAL at every commit):
    # drop the two that repeat the first column of another ((endpoint_id) of (endpoint_id, id), (call_id)
    # of (call_id, id)), and keep the idempotency keys' index to the calls that have one (most have none).
    # A store created by v1 from today's models has neither single-column index.
    db.execute_sql('DROP INDEX IF EXISTS "call_endpoint_id"')
    db.execute_sql('DROP INDEX IF EXISTS "callevent_call_id"')
    db.execute_sql('DROP INDEX IF EXISTS "call_endpoint_id_idempotency_key"')
    db.execute_sql('CREATE UNIQUE INDEX "call_endpoint_id_idempotency_key" ON "call" ("endpoint_id", '
                   '"idempotency_key") WHERE "idempotency_key" IS NOT NULL')


def _v9_heartbeat(db: Database) -> None:
    db.create_tables([Heartbeat], safe=True)


def _v10_instances(db: Database) -> None:
    db.create_tables([DaemonInstance], safe=True)


def _v11_webhook_endpoint_index(db: Database) -> None:
    # The sender reads, at every tick, which endpoints have pending rows and the due rows of those with a
    # free place, by index probes: before it a tick read every due row (a slow receiver's backlog too).
    db.execute_sql('CREATE INDEX IF NOT EXISTS "webhookdelivery_state_endpoint_id_next_attempt_at_id" '
                   'ON "webhookdelivery" ("state", "endpoint_id", "next_attempt_at", "id")')


def _v12_recorded_calls_index(db: Database) -> None:
    # Recording retention reads, hourly and on the event loop, the calls whose recording expired: through
    # this index of the calls that have one (a partial index: a call without a recording costs it no
    # write), not by walking every call of the store.
    db.execute_sql('CREATE INDEX IF NOT EXISTS "call_recorded_requested_at" ON "call" ("requested_at") '
                   "WHERE \"recording_path\" != ''")


def _v13_finished_webhooks_index(db: Database) -> None:
    # The sender deletes the rows finished a week ago, hourly, in the store's one writer: through this
    # index of the finished rows by finish time (partial: a pending row is not in it), not by a walk of
    # the whole outbox with the write lock held.
    db.execute_sql('CREATE INDEX IF NOT EXISTS "webhookdelivery_finished_at" ON "webhookdelivery" ("finished_at") '
                   "WHERE \"state\" != 'pending'")


def _v14_scheduled_pending_index(db: Database) -> None:
    # The lists of scheduled calls (GET /v1/scheduled, the Scheduled page) walk an endpoint's scheduled
    # calls in due order through this index. The (endpoint, status, due_at) index holds the immediate calls
    # too: behind a queued backlog of them, a page read the whole backlog to find the scheduled ones.
    # Partial: an immediate call costs it no write.
    db.execute_sql(f'CREATE INDEX IF NOT EXISTS "call_scheduled_pending" ON "call" ("endpoint_id", "due_at") '
                   f"WHERE {SCHEDULED_PENDING}")


def _v15_endpoint_days(db: Database) -> None:
    # The daily caps count from this table; it starts with today's calls so far (UTC).
    db.create_tables([EndpointDay], safe=True)
    today = day_of(utcnow())
    param = db.param
    db.execute_sql(f'INSERT INTO "endpointday" ("endpoint_id", "day", "started") SELECT "endpoint_id", {param}, '
                   f'COUNT(*) FROM "call" WHERE "started_at" >= {param} GROUP BY "endpoint_id"',
                   (EndpointDay.day.db_value(today), Call.started_at.db_value(today)))


# Append new steps; never edit an applied one. Each runs once, in order, inside a transaction.
MIGRATIONS: list[Callable[[Database], None]] = [_v1_initial, _v2_webhook_outbox, _v3_status_index,
                                                _v4_request_fingerprint, _v5_web_accounts, _v6_call_leases,
                                                _v7_call_switch, _v8_lean_indexes, _v9_heartbeat,
                                                _v10_instances, _v11_webhook_endpoint_index,
                                                _v12_recorded_calls_index, _v13_finished_webhooks_index,
                                                _v14_scheduled_pending_index, _v15_endpoint_days]


def schema_version(db: Database) -> int:
    row = SchemaVersion.select(SchemaVersion.version).order_by(SchemaVersion.version.desc()).first()
    return row.version if row else 0


# pg_advisory_lock's key for "migrating this database": the bytes of "callbrdg" as a bigint.
MIGRATION_LOCK = int.from_bytes(b"callbrdg", "big", signed=True)


@contextlib.contextmanager
def _migration_lock(db: Database) -> Iterator[None]:
    """PostgreSQL: one daemon migrates at a time (the others wait, then find nothing left to do); the
    advisory lock belongs to a session, so the whole migration holds one connection. SQLite: nothing
    (its single writer already serialises)."""
    if not isinstance(db, PostgresqlDatabase):
        yield
        return
    with db.connection_context():
        db.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            yield
        finally:
            db.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))


def migrate(db: Database) -> int:
    """Create or upgrade the schema to the newest version, keeping every row. Returns the version."""
    with _migration_lock(db):
        db.create_tables([SchemaVersion], safe=True)
        current = schema_version(db)
        for number, step in enumerate(MIGRATIONS, start=1):
            if number <= current:
                continue
            with db.atomic():
                step(db)
                SchemaVersion.create(version=number)
            current = number
        return current


class ThreadConnections(_ConnectionState, monkey.get_original("_thread", "_local")):  # type: ignore[misc]
    """peewee's connection state per OS thread (the real thread-local, not gevent's greenlet-local one):
    the event loop's greenlets share one SQLite connection, the writer thread has its own."""


def open_database(url: str) -> Database:
    """Connect to ``url`` (``sqlite:///path`` or ``postgresql://...``), bind the models to it and bring
    the schema up to date."""
    db: Database
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        if path and path != ":memory:":
            _make_private_file(Path(path.partition("?")[0]))
        db = connect(url, pragmas=SQLITE_PRAGMAS, thread_safe=False, check_same_thread=False)
        db._state = ThreadConnections()  # type: ignore[attr-defined]
        db.connect(reuse_if_open=True)
    elif is_postgres_url(url):
        db = connect_postgres(url)  # connections are lent per statement or transaction: none held here
    else:
        raise ValueError(f"database_url: {url.split(':', 1)[0]!r} is not supported; use sqlite:///path or "
                         "postgresql://user:password@host:port/name")
    database.initialize(db)
    migrate(db)
    return db


def _make_private_file(path: Path) -> None:
    """Create the database file (and its folder) if missing, readable by its owner only: it holds phone
    numbers, messages, webhook secrets and password hashes, and SQLite gives its ``-wal`` and ``-shm`` the
    file's own mode. (Made by SQLite, it would be world-readable under a umask of 022, as in a shell.)
    An existing file keeps the mode its operator gave it."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise peewee.OperationalError(f"cannot make the folder {folder}: {exc.strerror or exc}") from exc
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise peewee.OperationalError(f"cannot create {path}: {exc.strerror or exc}") from exc


def close_database(db: Database) -> None:
    """Close the store: SQLite's connection, or PostgreSQL's idle pooled connections (one lent to a
    greenlet at this moment is left to it: closing a socket another greenlet waits on would abort the
    process; it closes with the process)."""
    if isinstance(db, GreenPostgresqlDatabase):
        db.close_idle()
    else:
        db.close()


def is_shared(db: Database | None = None) -> bool:
    """True when the store is PostgreSQL, which several daemons may share."""
    return isinstance(db if db is not None else database.obj, PostgresqlDatabase)


def among(field: Field, ids: Collection[int]) -> Expression:
    """``field IN ids`` with the ids as one parameter, however many (an array on PostgreSQL, a JSON list
    that SQLite's ``json_each`` reads): peewee builds an ``IN`` of thousands of placeholders in tens of
    milliseconds (2,000 ids: 15 ms, on the loop where PostgreSQL's writes run), this in microseconds."""
    if is_shared():
        return field == fn.ANY(Value(among_value(ids), unpack=False))
    return field.in_(SQL(f"(SELECT value FROM json_each({database.param}))", [among_value(ids)]))


def among_sql(column: str, p: str) -> str:
    """:func:`among` in a precompiled statement (placeholder ``p``): ``column`` is one of the ids given as
    the parameter :func:`among_value` makes."""
    return f"{column} = ANY({p})" if p == "%s" else f"{column} IN (SELECT value FROM json_each({p}))"


def among_value(ids: Collection[int]) -> Any:
    """The one parameter of :func:`among_sql` (and :func:`among`) for ``ids``."""
    return list(ids) if is_shared() else json.dumps(list(ids))


_statements: dict[tuple[str, str], str] = {}


def precompiled(key: str, build: Callable[[str], str]) -> str:
    """A statement built once per placeholder style (``?`` SQLite, ``%s`` PostgreSQL). For the writes and
    reads every call or request makes: building them through peewee's query objects each time cost several
    times what the database takes to run them."""
    param = database.param
    sql = _statements.get((key, param))
    if sql is None:
        sql = _statements[(key, param)] = build(param)
    return sql


def endpoints_in_index(table: str, where: str, params: Sequence[Any] = (), *, index: str = "") -> list[int]:
    """The distinct ``endpoint_id`` of the rows of ``table`` matching ``where``, one index probe each (a
    loose index scan): a GROUP BY or DISTINCT would read every matching row. ``where`` must be served by an
    index that starts with ``endpoint_id`` after its equality terms; ``index`` names it to SQLite, whose
    planner, without statistics, may walk another index instead (PostgreSQL's has them). ``params`` are
    ``where``'s, given once."""
    shared = isinstance(database.obj, PostgresqlDatabase)
    source = f'"{table}"' if shared or not index else f'"{table}" INDEXED BY "{index}"'
    sql = precompiled(f"endpoints_in:{table}:{where}:{source}", lambda p: (
        f'WITH RECURSIVE e(id) AS (SELECT MIN("endpoint_id") FROM {source} WHERE {where} UNION ALL SELECT '
        f'(SELECT MIN("endpoint_id") FROM {source} WHERE {where} AND "endpoint_id" > e.id) FROM e '
        'WHERE e.id IS NOT NULL) SELECT id FROM e WHERE id IS NOT NULL').replace("{p}", p))
    return [int(endpoint_id) for (endpoint_id,) in execute(sql, (*params, *params)).fetchall()]


_peewee_log = logging.getLogger("peewee")
_db_errors = peewee.__exception_wrapper__  # type: ignore[attr-defined]  # sqlite3's errors as peewee's, as execute_sql raises them


def execute(sql: str, params: Sequence[Any] = ()) -> Any:
    """``database.execute_sql(sql, params)`` for the statements every call makes: on SQLite straight on
    this thread's open connection (the same cursor, and the same peewee errors), skipping peewee's cursor
    plumbing, which cost about as much again as SQLite takes to run a short write; elsewhere (PostgreSQL's
    lent connections, a closed connection, peewee's statement log or query hooks on) through peewee."""
    db = database.obj
    if isinstance(db, SqliteDatabase) and not db.query_hooks and not _peewee_log.isEnabledFor(logging.DEBUG):
        conn = db._state.conn  # type: ignore[attr-defined]  # this thread's (ThreadConnections)
        if conn is not None:
            with _db_errors:
                return conn.execute(sql, params)
    return db.execute_sql(sql, params)


def sqlite_time(value: Any) -> Any:
    """A datetime as SQLite's driver stores it (``isoformat(" ")``, what its default adapter makes), done
    here in one step; anything else as it is."""
    return value.isoformat(" ") if type(value) is dt.datetime else value


def insert_row(row: BaseModel) -> None:
    """Insert a new model instance as ``row.save()`` would (its fields and their defaults), through one
    precompiled statement per set of columns; sets ``row.id``."""
    meta = type(row)._meta  # type: ignore[attr-defined]  # peewee's model metadata
    fields = meta.fields
    data = {name: value for name, value in row.__data__.items() if name != "id"}
    names = tuple(data)
    returning = is_shared()

    def build(p: str) -> str:
        columns = ", ".join(f'"{fields[name].column_name}"' for name in names)
        sql = f'INSERT INTO "{meta.table_name}" ({columns}) VALUES ({", ".join([p] * len(names))})'
        return sql + (' RETURNING "id"' if returning else "")

    sql = precompiled(f"insert:{meta.table_name}:{','.join(names)}", build)
    cursor = execute(sql, [fields[name].db_value(value) for name, value in data.items()])
    row.id = cursor.fetchone()[0] if returning else cursor.lastrowid
    row._dirty.clear()  # type: ignore[attr-defined]  # as save() leaves it


_row_readers: dict[tuple[type[BaseModel], tuple[str, ...]], list[tuple[int, str, Callable[[Any], Any]]]] = {}


def select_rows(model: type[M], sql: str, params: Sequence[Any] = ()) -> list[M]:
    """The rows of ``sql`` (a ``SELECT *`` of ``model``'s table) as model instances, built directly from
    each column's field: peewee's row wrappers took longer to build an endpoint than SQLite to find it.
    Columns the model does not know (a newer schema's, after a downgrade) are left out."""
    cursor = execute(sql, params)
    columns = tuple(description[0] for description in cursor.description)
    readers = _row_readers.get((model, columns))
    if readers is None:
        by_column = {field.column_name: field for field in model._meta.sorted_fields}  # type: ignore[attr-defined]
        readers = _row_readers[(model, columns)] = [
            (index, by_column[column].name, by_column[column].python_value)
            for index, column in enumerate(columns) if column in by_column]
    rows = []
    for values in cursor.fetchall():
        row = model(__no_default__=True)
        row.__data__ = {name: read(values[index]) for index, name, read in readers}
        rows.append(row)
    return rows


@contextlib.contextmanager
def relaxed_durability() -> Iterator[None]:
    """A transaction whose commit does not wait for the disk: for the timeline and status steps of calls
    in progress. Inside a caller's transaction, the caller's commit decides.

    SQLite: WAL with ``synchronous=NORMAL`` keeps the file consistent; a power cut may lose the last
    steps, and the next start reconciles those calls with FreeSWITCH. PostgreSQL: the same meaning,
    ``SET LOCAL synchronous_commit = off`` (a crash of the server may lose the last steps). Claims and the
    API's writes stay fully durable (an accepted request and a committed claim must survive power loss).
    No yield may happen inside on SQLite.
    """
    db = database.obj
    if db.in_transaction():
        yield
        return
    if isinstance(db, GreenPostgresqlDatabase):
        with db.atomic(relaxed=True):
            yield
        return
    relax = isinstance(db, SqliteDatabase)
    if relax:
        db.execute_sql("PRAGMA synchronous=NORMAL")
    try:
        with db.atomic():
            yield
    finally:
        if relax:
            db.execute_sql("PRAGMA synchronous=FULL")


def database_file(url: str) -> str | None:
    """The SQLite file behind ``url``, or None for other databases."""
    if url.startswith("sqlite:///"):
        return os.path.abspath(url[len("sqlite:///"):])
    return None
