"""The store on SQLite and on PostgreSQL: pragmas, the same schema and indexes from the same migrations,
migrations that keep rows (and take turns on a shared PostgreSQL), naive UTC times, and PostgreSQL's
connections lent per statement or transaction without blocking the gevent loop."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
from peewee import Database, IntegerField, IntegrityError, OperationalError
from playhouse.migrate import SchemaMigrator
from playhouse.migrate import TextField as MigrateTextField
from playhouse.migrate import migrate as run_migration

from daemon import store
from daemon.accounts.endpoints import authenticate
from daemon.calls.records import CallRecords, add_event, append_event, update_call
from daemon.config import Settings
from daemon.postgres import GreenConnection, GreenPostgresqlDatabase, ReadRows
from daemon.store import (
    Call,
    CallEvent,
    CallStatus,
    Endpoint,
    Heartbeat,
    SchemaVersion,
    WebhookDelivery,
    close_database,
    database_file,
    migrate,
    open_database,
    relaxed_durability,
    schema_version,
)

pytestmark = pytest.mark.stores("sqlite", "postgresql")

NOW = dt.datetime(2026, 6, 15, 12, 0)


def a_call(endpoint: Any, callid: str, **extra: Any) -> Call:
    fields: dict[str, Any] = {"due_at": NOW, "status": "queued", **extra}
    return Call.create(callid=callid, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002", **fields)


def an_endpoint(name: str) -> Endpoint:
    return Endpoint.create(name=name, token_hash=hashlib.sha256(name.encode()).hexdigest(), token_hint="cb_0000…",
                           caller_id_number="1", dial_string="sofia/gateway/carrier/{number}")


@pytest.mark.stores("sqlite")
def test_sqlite_pragmas(db: Database) -> None:
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert 0 < db.execute_sql("PRAGMA busy_timeout").fetchone()[0] <= 5000


def index_columns(db: Database, table: str) -> dict[tuple[str, ...], bool]:
    """{(column, ...): unique} for every index of ``table``."""
    return {tuple(index.columns): bool(index.unique) for index in db.get_indexes(table)}


def test_indexes_for_every_query(db: Database) -> None:
    calls = index_columns(db, "call")
    assert calls[("callid",)] is True
    assert calls[("endpoint_id", "idempotency_key")] is True
    assert ("endpoint_id", "id") in calls  # GET /v1/calls, newest first
    assert ("endpoint_id", "status", "id") in calls  # GET /v1/calls?status=...
    assert ("endpoint_id", "status", "due_at") in calls  # GET /v1/scheduled
    assert ("status", "due_at") in calls  # the dispatcher's next due call
    assert ("endpoint_id", "started_at") in calls  # an endpoint's starts today, in its rate window
    assert ("call_id", "id") in index_columns(db, "callevent")
    # None that only repeats another's first column: every insert and status change writes each index.
    assert ("endpoint_id",) not in calls and ("call_id",) not in index_columns(db, "callevent")
    endpoints = index_columns(db, "endpoint")
    assert endpoints[("token_hash",)] is True and endpoints[("name",)] is True
    assert ("owner_id",) in endpoints
    assert ("state", "next_attempt_at") in index_columns(db, "webhookdelivery")
    assert index_columns(db, "websession")[("key_hash",)] is True


def test_idempotency_key_unique_per_endpoint_but_null_repeats(make_endpoint: Any) -> None:
    one, _ = make_endpoint()
    two, _ = make_endpoint()
    a_call(one, "a" * 28)
    a_call(one, "b" * 28)  # two calls without a key
    a_call(one, "c" * 28, idempotency_key="k")
    a_call(two, "d" * 28, idempotency_key="k")
    with pytest.raises(IntegrityError):
        a_call(one, "e" * 28, idempotency_key="k")
    assert Call.select().count() == 4  # the refused insert left nothing behind, and the store still works


def test_v8_drops_the_redundant_indexes_and_keeps_the_keys_unique(settings: Settings, make_endpoint: Any) -> None:
    """A store from before v8 (its indexes as v1 made them then): v8 drops the single-column ones on the
    foreign keys and makes the idempotency index partial; rows, uniqueness and the look-up stay."""
    endpoint, _ = make_endpoint()
    a_call(endpoint, "8" * 28, idempotency_key="k")
    add_event(Call.get(Call.callid == "8" * 28), "requested")
    db = store.database.obj
    with db.atomic():
        db.execute_sql('DROP INDEX "call_endpoint_id_idempotency_key"')
        db.execute_sql('CREATE UNIQUE INDEX "call_endpoint_id_idempotency_key" ON "call" ("endpoint_id", "idempotency_key")')
        db.execute_sql('CREATE INDEX "call_endpoint_id" ON "call" ("endpoint_id")')
        db.execute_sql('CREATE INDEX "callevent_call_id" ON "callevent" ("call_id")')
        SchemaVersion.delete().where(SchemaVersion.version >= 8).execute()
    close_database(db)
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS) >= 8
    calls = index_columns(db, "call")
    assert ("endpoint_id",) not in calls and ("call_id",) not in index_columns(db, "callevent")
    assert calls[("endpoint_id", "idempotency_key")] is True
    assert Call.get(Call.callid == "8" * 28).events.count() == 1
    with pytest.raises(IntegrityError):
        a_call(endpoint, "9" * 28, idempotency_key="k")
    a_call(endpoint, "a" * 28)
    a_call(endpoint, "b" * 28)  # calls without a key are not in the index at all
    assert CallRecords.by_idempotency_key(endpoint.id, "k").callid == "8" * 28
    close_database(db)


@pytest.mark.stores("sqlite")
def test_the_idempotency_look_up_uses_the_partial_index(make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    query = Call.select().where((Call.endpoint == endpoint.id) & (Call.idempotency_key == "k"))
    sql, params = query.sql()
    plan = " ".join(str(row) for row in store.database.execute_sql("EXPLAIN QUERY PLAN " + sql, params))
    assert "call_endpoint_id_idempotency_key" in plan, plan


def test_times_are_naive_utc_to_the_microsecond_and_booleans_are_booleans(make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    due = dt.datetime(2026, 12, 31, 23, 59, 59, 123456)
    a_call(endpoint, "t" * 28, due_at=due, scheduled=True, ring_seconds=12.345678901)
    call = Call.get(Call.callid == "t" * 28)
    assert call.due_at == due and call.due_at.tzinfo is None
    assert call.scheduled is True and call.ring_seconds == 12.345678901  # a double on both, not a float4
    assert Call.select().where(Call.scheduled == True).count() == 1  # noqa: E712 (peewee expression)
    assert Call.select().where(Call.due_at > due - dt.timedelta(microseconds=1)).count() == 1


def test_precompiled_insert_and_rows_read_back_as_peewee_writes_and_reads_them(make_endpoint: Any) -> None:
    """insert_row and select_rows (the hot paths' own SQL) keep the models' defaults and types exactly."""
    endpoint, _ = make_endpoint()
    due = dt.datetime(2026, 12, 31, 23, 59, 59, 123456)
    fresh = Call(callid="p" * 28, endpoint=endpoint.id, phone_a="15550001001", phone_b="15550002002",
                 due_at=due, scheduled=True, status="scheduled", ring_seconds=1.5)
    store.insert_row(fresh)
    assert fresh.id is not None and not fresh.is_dirty()
    by_peewee = Call.get_by_id(fresh.id)
    sql = store.precompiled("test:call_by_id", lambda p: f'SELECT * FROM "call" WHERE "id" = {p}')
    (ours,) = store.select_rows(Call, sql, (fresh.id,))
    assert ours.__data__ == by_peewee.__data__
    assert ours.due_at == due and ours.scheduled is True and ours.msg == "" and ours.a_uuid is None
    assert ours.endpoint_id == endpoint.id and ours.endpoint.name == endpoint.name  # the foreign key resolves
    ours.status = "queued"
    ours.save()  # an instance read this way saves its changes like any other
    assert Call.get_by_id(fresh.id).status == "queued"


def test_the_hot_writes_store_exactly_what_peewee_stores(db: Database, make_endpoint: Any) -> None:
    """update_call and append_event (straight on SQLite's connection, through peewee on PostgreSQL) leave
    the same column values, as stored, as peewee's own update and create; a store error is peewee's."""
    endpoint, _ = make_endpoint()
    at = dt.datetime(2026, 12, 31, 23, 59, 59, 123456)
    ours, theirs = a_call(endpoint, "h" * 28, status="bridged"), a_call(endpoint, "i" * 28, status="bridged")
    row = {"status": "completed", "ended_at": at, "reason": "", "talk_seconds": 2.5, "recording_bytes": 10,
           "a_cause": "NORMAL_CLEARING", "lease_until": dt.datetime(2027, 1, 1), "switch": None}
    assert update_call(ours.id, row, if_status=(CallStatus.BRIDGED,)) == 1
    assert update_call(ours.id, row, if_status=(CallStatus.BRIDGED,)) == 0  # no longer bridged
    Call.update(**row).where(Call.id == theirs.id).execute()
    append_event(ours.id, "ended", at=at, cause="NORMAL_CLEARING", leg="", none=None)
    append_event(ours.id, "noted", at=at)
    add_event(theirs.id, "ended", at=at, cause="NORMAL_CLEARING")
    add_event(theirs.id, "noted", at=at)
    stored = [tuple(r) for r in db.execute_sql(
        f'SELECT CAST("ended_at" AS TEXT), CAST("lease_until" AS TEXT), "status", "reason", "talk_seconds", '
        f'"recording_bytes", "a_cause", "switch" FROM "call" WHERE "id" IN ({db.param}, {db.param}) ORDER BY "id"',
        (ours.id, theirs.id)).fetchall()]
    assert stored[0] == stored[1]
    events = [tuple(r) for r in db.execute_sql(
        f'SELECT "call_id" = {db.param}, CAST("at" AS TEXT), "kind", "detail" FROM "callevent" ORDER BY "id"',
        (ours.id,)).fetchall()]
    assert [e[1:] for e in events if e[0]] == [e[1:] for e in events if not e[0]]
    assert events[0][3] == '{"cause": "NORMAL_CLEARING"}' and events[1][3] == ""
    with pytest.raises(IntegrityError):  # the call's row must exist (foreign key): peewee's error, as before
        append_event(10**9, "noted", at=at)


def test_rows_read_directly_leave_out_a_newer_schemas_columns(db: Database, make_endpoint: Any) -> None:
    """After a downgrade the table may hold a column this version does not know: requests still
    authenticate, as they did through peewee's own rows."""
    endpoint, token = make_endpoint()
    db.execute_sql('ALTER TABLE "endpoint" ADD COLUMN "from_a_later_version" TEXT DEFAULT \'x\'')
    found = authenticate(token)
    assert found is not None and found.id == endpoint.id and found.name == endpoint.name
    assert "from_a_later_version" not in found.__data__


@pytest.mark.parametrize(("version", "table", "index", "columns", "only"), [
    # the webhook sender: which endpoints have pending rows, and each one's due rows
    (11, "webhookdelivery", "webhookdelivery_state_endpoint_id_next_attempt_at_id",
     ["state", "endpoint_id", "next_attempt_at", "id"], None),
    # recording retention: the calls that have a recording (partial: the others cost it no write)
    (12, "call", "call_recorded_requested_at", ["requested_at"], "recording_path"),
    # the outbox's prune: the finished rows by finish time (partial: not the pending ones)
    (13, "webhookdelivery", "webhookdelivery_finished_at", ["finished_at"], "pending"),
    # the lists of scheduled calls: each endpoint's in due order (partial: not the immediate calls)
    (14, "call", "call_scheduled_pending", ["endpoint_id", "due_at"], "scheduled"),
])
def test_a_store_from_before_an_index_gains_it_and_keeps_its_rows(
        settings: Settings, make_endpoint: Any, version: int, table: str, index: str, columns: list[str],
        only: str | None) -> None:
    endpoint, _ = make_endpoint()
    a_call(endpoint, "r" * 28, recording_path="/var/lib/callbridge/recordings/r.wav")
    WebhookDelivery.create(event_id="e" * 32, endpoint=endpoint, callid="c", status="queued", payload="{}")
    db = store.database.obj
    with db.atomic():
        db.execute_sql(f'DROP INDEX "{index}"')
        SchemaVersion.delete().where(SchemaVersion.version >= version).execute()
    assert index not in {found.name for found in db.get_indexes(table)}
    close_database(db)
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS) >= version
    made = [found for found in db.get_indexes(table) if found.name == index]
    assert len(made) == 1 and made[0].columns == columns
    assert only is None or only in made[0].sql  # a partial index's condition
    assert Call.select().count() == 1 and WebhookDelivery.get().state == "pending"


def test_v15_starts_each_endpoints_day_count_with_the_calls_it_started_today(
        settings: Settings, make_endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade during the day keeps the daily caps: the counter starts where the day's calls are."""
    busy, quiet = make_endpoint()[0], make_endpoint()[0]
    today = store.day_of(NOW)
    for n, (endpoint, started) in enumerate([(busy, today), (busy, NOW), (quiet, NOW),
                                             (quiet, today - dt.timedelta(microseconds=1)), (busy, None)]):
        a_call(endpoint, f"{n:028d}", started_at=started, status="queued" if started is None else "completed")
    db = store.database.obj
    with db.atomic():
        db.drop_tables([store.EndpointDay])
        SchemaVersion.delete().where(SchemaVersion.version >= 15).execute()
    close_database(db)
    monkeypatch.setattr(store, "utcnow", lambda: NOW)
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS) >= 15
    assert CallRecords.started_on(today) == {busy.id: 2, quiet.id: 1}
    assert Call.select().count() == 5


def test_migration_on_an_existing_store_keeps_its_rows(settings: Settings, make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint(name="keep-me")
    call = a_call(endpoint, "f" * 28)
    add_event(call, "requested", at=NOW, note="kept")
    version = schema_version(store.database.obj)
    close_database(store.database.obj)
    db = open_database(settings.database_url)  # a restart: migrate again on the same store
    assert schema_version(db) == version == len(store.MIGRATIONS)
    assert SchemaVersion.select().count() == len(store.MIGRATIONS)
    assert Endpoint.get(Endpoint.name == "keep-me").get_id() == endpoint.get_id()
    assert Call.get(Call.callid == "f" * 28).phone_a == "15550001001"
    assert CallEvent.get().detail_dict == {"note": "kept"}
    close_database(db)


def test_a_new_migration_step_runs_once_and_keeps_rows(settings: Settings, make_endpoint: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, _ = make_endpoint()
    a_call(endpoint, "1" * 28)
    close_database(store.database.obj)
    runs: list[int] = []

    def v_next_add_column(db: Database) -> None:
        runs.append(1)
        run_migration(SchemaMigrator.from_database(db).add_column("call", "note", MigrateTextField(default="")))

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, v_next_add_column])
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS) and runs == [1]
    assert Call.get(Call.callid == "1" * 28).status == "queued"
    assert [tuple(row) for row in db.execute_sql("SELECT note FROM call").fetchall()] == [("",)]
    close_database(db)
    db = open_database(settings.database_url)
    assert runs == [1]
    close_database(db)


def test_v7_adds_the_calls_switch_to_a_store_without_it_and_keeps_its_calls(
        settings: Settings, make_endpoint: Any) -> None:
    """A store from before several switches: its calls in flight keep their legs and get no switch (they
    are on the one switch such a daemon had); new claims name theirs."""
    endpoint, _ = make_endpoint()
    a_call(endpoint, "7" * 28, status="bridged", a_uuid="a" * 36, b_uuid="b" * 36)
    db = store.database.obj
    with db.atomic():
        run_migration(SchemaMigrator.from_database(db).drop_column("call", "switch"))
        SchemaVersion.delete().where(SchemaVersion.version >= 6).execute()
    close_database(db)
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS) >= 7
    assert "switch" in {column.name for column in db.get_columns("call")}
    old = Call.get(Call.callid == "7" * 28)
    assert (old.status, old.a_uuid, old.switch) == ("bridged", "a" * 36, None)
    Call.update(switch="10.0.0.12:8021").where(Call.id == old.id).execute()
    assert Call.get_by_id(old.id).switch == "10.0.0.12:8021"
    close_database(db)


def test_v6_gives_a_v5_store_call_owners_leases_and_the_start_index(db: Database, make_endpoint: Any) -> None:
    """A store at v5 (no leases yet) with a call in flight: v6 adds the columns (empty: whoever starts
    first takes that call) and the (endpoint, started_at) index, keeping the rows."""
    endpoint, _ = make_endpoint()
    a_call(endpoint, "6" * 28, status="bridged", started_at=NOW)
    db.execute_sql("DROP INDEX call_endpoint_id_started_at")
    db.execute_sql("ALTER TABLE call DROP COLUMN owner")
    db.execute_sql("ALTER TABLE call DROP COLUMN lease_until")
    SchemaVersion.delete().where(SchemaVersion.version >= 6).execute()  # back to v5 (v7 goes again: a no-op)
    assert migrate(db) == len(store.MIGRATIONS) >= 6
    call = Call.get(Call.callid == "6" * 28)
    assert (call.status, call.owner, call.lease_until) == ("bridged", None, None)
    assert ("endpoint_id", "started_at") in index_columns(db, "call")
    assert [c.name for c in db.get_columns("call")][-2:] == ["owner", "lease_until"]


def test_a_failing_migration_step_leaves_nothing_half_done(settings: Settings, make_endpoint: Any,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step runs in a transaction (PostgreSQL's DDL too): a failure keeps the old schema and version."""
    make_endpoint()
    close_database(store.database.obj)
    version = len(store.MIGRATIONS)

    def v_broken(db: Database) -> None:
        run_migration(SchemaMigrator.from_database(db).add_column("call", "half", IntegerField(null=True)))
        db.execute_sql("SELECT no_such_column FROM call")

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, v_broken])
    with pytest.raises(Exception, match="no_such_column"):
        open_database(settings.database_url)
    db = store.database.obj
    assert schema_version(db) == version
    assert "half" not in {column.name for column in db.get_columns("call")}
    close_database(db)


def test_a_store_made_before_schema_versions_is_adopted(db: Database) -> None:
    """Tables that exist without a version row (an early store) are kept as they are, rows and all."""
    a_call(an_endpoint("old"), "2" * 28)
    db.execute_sql("DROP TABLE schemaversion")
    assert migrate(db) == len(store.MIGRATIONS)
    assert Call.select().count() == 1 and Endpoint.get().name == "old"


def test_add_event_drops_empty_details(make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    call = a_call(endpoint, "3" * 28)
    event = add_event(call, "ended", cause="NORMAL_CLEARING", leg="", extra=None)
    assert event.detail_dict == {"cause": "NORMAL_CLEARING"}


def test_relaxed_durability_is_scoped_to_its_own_write(db: Database, store_kind: str) -> None:
    """Steps of calls in progress commit without waiting for the disk; everything else stays durable."""
    if store_kind == "sqlite":
        with relaxed_durability():
            assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        return
    with relaxed_durability():
        assert db.execute_sql("SHOW synchronous_commit").fetchone()[0] == "off"
    assert db.execute_sql("SHOW synchronous_commit").fetchone()[0] == "on"
    with db.atomic(), relaxed_durability():  # inside a caller's transaction, the caller's commit decides
        assert db.execute_sql("SHOW synchronous_commit").fetchone()[0] == "on"


@pytest.mark.stores("sqlite")
def test_database_file(settings: Settings) -> None:
    assert database_file(settings.database_url) == str(Path(settings.state_dir) / "callbridge.db")
    assert database_file("postgresql://u:p@h/db") is None


@pytest.mark.stores("sqlite")
def test_a_new_database_file_and_its_wal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "callbridge.db"
    previous = os.umask(0o022)  # a shell's: SQLite alone would make the file world-readable
    try:
        db = open_database(f"sqlite:///{path}")
        try:
            an_endpoint("private")  # a write: the WAL file is made
            modes = {file.name: file.stat().st_mode & 0o777 for file in path.parent.iterdir()}
        finally:
            close_database(db)
    finally:
        os.umask(previous)
    assert modes["callbridge.db"] == 0o600
    assert modes["callbridge.db-wal"] == 0o600, modes
    # A file the operator made keeps its mode.
    other = tmp_path / "theirs.db"
    other.touch()
    other.chmod(0o640)
    close_database(open_database(f"sqlite:///{other}"))
    assert other.stat().st_mode & 0o777 == 0o640


@pytest.mark.stores("sqlite")
def test_unknown_database_schemes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'mysql' is not supported; use sqlite:///path or postgresql://"):
        open_database("mysql://u:p@h/db")


# -- the same schema on both ---------------------------------------------------------------------

# SQLite's declared type -> what PostgreSQL must have made from the same model field.
SAME_TYPE = {
    "INTEGER": {"integer", "bigint", "boolean"},  # SQLite stores booleans as integers
    "VARCHAR": {"character varying"},
    "TEXT": {"text"},
    "DATETIME": {"timestamp without time zone"},
    "REAL": {"double precision"},
}


def describe(db: Database) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for table in db.get_tables():
        columns = {c.name: (c.data_type.split("(")[0].upper() if isinstance(db, store.SqliteDatabase)
                            else c.data_type, c.null) for c in db.get_columns(table)}
        # The primary key's own index: PostgreSQL's <table>_pkey, SQLite's sqlite_autoindex_<table>_N (a key
        # that is not the rowid: instances.instance_id).
        indexes = {(tuple(i.columns), bool(i.unique)) for i in db.get_indexes(table)
                   if not i.name.endswith("_pkey") and not i.name.startswith("sqlite_autoindex_")}
        out[table] = (columns, indexes)
    return out


@pytest.mark.stores("postgresql")
def test_postgresql_gets_the_schema_sqlite_gets(db: Database, tmp_path: Path) -> None:
    """Every migration, run on both, makes the same tables, columns (type, NULL) and indexes (unique)."""
    postgres = describe(db)
    sqlite = describe(open_database(f"sqlite:///{tmp_path / 'same.db'}"))
    close_database(store.database.obj)
    assert set(postgres) == set(sqlite)
    for table, (sqlite_columns, sqlite_indexes) in sqlite.items():
        postgres_columns, postgres_indexes = postgres[table]
        assert list(postgres_columns) == list(sqlite_columns), table
        for name, (sqlite_type, nullable) in sqlite_columns.items():
            pg_type, pg_nullable = postgres_columns[name]
            assert pg_type in SAME_TYPE[sqlite_type], f"{table}.{name}: {sqlite_type} became {pg_type}"
            assert pg_nullable == nullable, f"{table}.{name}"
        assert postgres_indexes == sqlite_indexes, table
    assert postgres["call"][0]["scheduled"][0] == "boolean"
    assert postgres["call"][0]["recording_bytes"][0] == "bigint"


# -- PostgreSQL: migrations from several daemons at once -----------------------------------------

@pytest.fixture
def empty_postgres(postgres_server: Any) -> Any:
    """A PostgreSQL database with nothing in it (not a copy of the migrated template)."""
    name = f"empty_{postgres_server.new_database()}"
    postgres_server.admin(f'CREATE DATABASE "{name}" TEMPLATE template0')
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.mark.stores("postgresql")
def test_daemons_starting_together_migrate_once(empty_postgres: str) -> None:
    """Four daemons start at once on an empty database: each step runs once, and all see the newest
    schema (the advisory lock makes them take turns; without it CREATE TABLE races and steps repeat).
    Each greenlet migrates on its own connection, a session of its own as another daemon's would be."""
    db = store.connect_postgres(empty_postgres)
    store.database.initialize(db)
    ready = gevent.event.Event()

    def start() -> int:
        ready.wait()
        return migrate(db)

    greenlets = [gevent.spawn(start) for _ in range(4)]
    gevent.sleep(0)
    ready.set()
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    assert [g.value for g in greenlets] == [len(store.MIGRATIONS)] * 4
    versions = [v for (v,) in db.execute_sql("SELECT version FROM schemaversion ORDER BY version")]
    assert versions == list(range(1, len(store.MIGRATIONS) + 1))
    close_database(db)


# -- PostgreSQL: connections lent per statement or transaction, never blocking the loop -----------

@pytest.mark.stores("postgresql")
def test_a_query_waiting_on_the_server_lets_other_greenlets_run(db: GreenPostgresqlDatabase) -> None:
    """One greenlet waits on a lock held by another connection; the loop keeps running, so the holder can
    let it go (a driver that blocked the process would hang here until lock_timeout)."""
    holding = gevent.event.Event()
    release = gevent.event.Event()

    def holder() -> None:
        with db.atomic():
            db.execute_sql("SELECT pg_advisory_xact_lock(42)")
            holding.set()
            release.wait(30)

    def waiter() -> str:
        with db.atomic():
            db.execute_sql("SET LOCAL lock_timeout = '30s'")
            db.execute_sql("SELECT pg_advisory_xact_lock(42)")
            return "got it"

    first = gevent.spawn(holder)
    assert holding.wait(30)
    second = gevent.spawn(waiter)
    ticks = 0
    while not second.ready() and ticks < 20:  # the loop runs while the waiter waits on the server
        gevent.sleep(0.01)
        ticks += 1
    assert ticks == 20 and not second.ready()
    release.set()
    assert second.get(timeout=30) == "got it"
    first.get(timeout=30)


@pytest.mark.stores("postgresql")
def test_statements_wait_on_the_socket_both_ways_and_a_dead_session_is_an_error(db: GreenPostgresqlDatabase) -> None:
    """The connections' own wait (GreenConnection): a statement larger than the socket's buffers waits to
    write, a large result to read, and a session the server ends while it waits raises instead of hanging."""
    big = "x" * 8_000_000
    assert db.execute_sql("SELECT length(%s), md5(%s)", (big, big)).fetchone() == (
        len(big), hashlib.md5(big.encode()).hexdigest())
    rows = db.execute_sql("SELECT repeat('y', 1000) FROM generate_series(1, 20000)").fetchall()
    assert len(rows) == 20_000 and rows[-1][0] == "y" * 1000
    with db.connection_context():
        assert isinstance(db.connection(), GreenConnection)
        pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
        killer = gevent.spawn_later(0.2, lambda: db.execute_sql("SELECT pg_terminate_backend(%s)", (pid,)))
        with pytest.raises(OperationalError):
            db.execute_sql("SELECT pg_sleep(30)")
        killer.get(timeout=30)
    assert db.execute_sql("SELECT 1").fetchone() == (1,)  # a new connection, not the dead one


@pytest.mark.stores("postgresql")
def test_a_transaction_never_sees_another_greenlets_statements(db: GreenPostgresqlDatabase) -> None:
    inside = gevent.event.Event()
    done = gevent.event.Event()
    pids: dict[str, int] = {}

    def transaction() -> None:
        try:
            with db.atomic():
                pids["txn"] = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
                an_endpoint("uncommitted")
                inside.set()
                done.wait(30)
                pids["txn_again"] = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
                raise RuntimeError("roll back")
        except RuntimeError:
            pass

    worker = gevent.spawn(transaction)
    assert inside.wait(30)
    pids["other"] = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    assert Endpoint.select().count() == 0  # not the open transaction's uncommitted row
    an_endpoint("committed")  # autocommit, on another connection: the rollback cannot take it away
    done.set()
    worker.get(timeout=30)
    assert pids["txn"] == pids["txn_again"] != pids["other"]
    assert [e.name for e in Endpoint.select()] == ["committed"]
    assert not db._in_use  # every connection went back


@pytest.mark.stores("postgresql")
def test_connections_go_back_after_statements_transactions_and_errors(db: GreenPostgresqlDatabase) -> None:
    def work(n: int) -> None:
        an_endpoint(f"e{n}")
        assert Endpoint.select().where(Endpoint.name == f"e{n}").count() == 1
        with db.atomic():
            Endpoint.update(caller_id_name="x").where(Endpoint.name == f"e{n}").execute()
        with pytest.raises(RuntimeError), db.atomic():
            an_endpoint(f"f{n}")
            raise RuntimeError
        with pytest.raises(IntegrityError):
            an_endpoint(f"e{n}")
        with pytest.raises(Exception, match="no_such_table"):
            db.execute_sql("SELECT * FROM no_such_table")
        rows = Endpoint.select().where(Endpoint.name == f"e{n}").execute()
        assert isinstance(rows.cursor, ReadRows)  # read whole before the connection went back

    greenlets = [gevent.spawn(work, n) for n in range(25)]
    gevent.joinall(greenlets, timeout=60, raise_error=True)
    assert Endpoint.select().count() == 25
    assert not db._in_use
    assert 1 <= len(db._connections) <= db._max_connections


@pytest.mark.stores("postgresql")
def test_a_silent_database_host_is_noticed_within_a_minute_or_so(db: GreenPostgresqlDatabase) -> None:
    # The kernel's defaults would wait two hours and more before a query on a vanished host fails.
    with db.connection_context():
        fd = db.connection().fileno()
        probe = socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM)  # a dup: closing it leaves the connection
        try:
            assert probe.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            count = probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + interval * count <= 90
            assert probe.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000  # unacknowledged sends
        finally:
            probe.close()


@pytest.mark.stores("postgresql")
def test_a_full_pool_answers_operational_error_after_its_wait(postgres_url: str) -> None:
    db = store.connect_postgres(postgres_url + "?max_connections=2&timeout=1")
    store.database.initialize(db)
    holding = gevent.event.Event()
    release = gevent.event.Event()
    count = 0

    def hold() -> None:
        nonlocal count
        with db.atomic():
            Endpoint.select().count()
            count += 1
            if count == 2:
                holding.set()
            release.wait(30)

    holders = [gevent.spawn(hold) for _ in range(2)]
    assert holding.wait(30)
    with pytest.raises(OperationalError, match="all 2 connections stayed busy"):
        Endpoint.select().count()
    release.set()
    gevent.joinall(holders, timeout=30, raise_error=True)
    assert Endpoint.select().count() == 0  # a connection is free again
    close_database(db)


@pytest.mark.stores("postgresql")
def test_a_connection_the_server_ended_is_not_lent_again(db: GreenPostgresqlDatabase,
                                                         postgres_server: Any) -> None:
    """A restart or an administrator ends idle sessions: the next statement gets a live connection, no error."""
    pid = db.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    postgres_server.admin(f"SELECT pg_terminate_backend({pid}, 30000)")  # returns once it is gone
    assert db.execute_sql("SELECT pg_backend_pid()").fetchone()[0] != pid
    assert Endpoint.select().count() == 0


@pytest.mark.stores("postgresql")
def test_a_write_whose_transaction_the_server_ended_for_idling_goes_again(postgres_url: str) -> None:
    """The daemon's event loop stalled (a GC pause, a busy CPU) in the middle of a write's transaction for
    longer than ``idle_in_transaction_timeout``: the server ended the session and rolled the write back. It
    is a store-level failure like a dropped connection: the write goes again, whole, and lands."""
    from daemon.writer import DirectWriter

    db = store.connect_postgres(postgres_url + "?idle_in_transaction_timeout=0.2")
    store.database.initialize(db)
    attempts = []

    def write() -> None:
        attempts.append(1)
        Heartbeat.create(name=f"first-{len(attempts)}", seen_at=dt.datetime(2026, 3, 1))
        if len(attempts) == 1:
            gevent.sleep(1.0)  # the loop stalled here, the transaction open
        Heartbeat.create(name=f"second-{len(attempts)}", seen_at=dt.datetime(2026, 3, 1))

    try:
        DirectWriter(retry_for=30).submit(write, durable=True, wait=True)
        assert sorted(h.name for h in Heartbeat.select()) == ["first-2", "second-2"]
    finally:
        close_database(db)
