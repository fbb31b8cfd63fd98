"""The store: pragmas, indexes for every API and dispatcher query, and migrations that keep rows."""

from __future__ import annotations

import datetime as dt
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from peewee import Database, IntegrityError
from playhouse.migrate import SqliteMigrator
from playhouse.migrate import TextField as MigrateTextField
from playhouse.migrate import migrate as run_migration

from daemon import store
from daemon.calls.records import add_event
from daemon.config import Settings
from daemon.store import Call, CallEvent, Endpoint, database_file, open_database, schema_version

NOW = dt.datetime(2026, 6, 15, 12, 0)


def a_call(endpoint: Any, callid: str, **extra: Any) -> Call:
    return Call.create(callid=callid, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                       due_at=NOW, status="queued", **extra)


def test_sqlite_pragmas(db: Database) -> None:
    assert db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
    assert 0 < db.execute_sql("PRAGMA busy_timeout").fetchone()[0] <= 5000


def index_columns(db: Database, table: str) -> dict[tuple[str, ...], bool]:
    """{(column, ...): unique} for every index of ``table``."""
    out: dict[tuple[str, ...], bool] = {}
    for _, name, unique, *_rest in db.execute_sql(f'PRAGMA index_list("{table}")').fetchall():
        cols = tuple(row[2] for row in db.execute_sql(f'PRAGMA index_info("{name}")').fetchall())
        out[cols] = bool(unique)
    return out


def test_indexes_for_every_query(db: Database) -> None:
    calls = index_columns(db, "call")
    assert calls[("callid",)] is True
    assert calls[("endpoint_id", "idempotency_key")] is True
    assert ("endpoint_id", "id") in calls  # GET /v1/calls, newest first
    assert ("endpoint_id", "status", "due_at") in calls  # GET /v1/scheduled
    assert ("status", "due_at") in calls  # the dispatcher's next due call
    assert ("call_id", "id") in index_columns(db, "callevent")
    endpoints = index_columns(db, "endpoint")
    assert endpoints[("token_hash",)] is True and endpoints[("name",)] is True


def test_idempotency_key_unique_per_endpoint_but_null_repeats(make_endpoint: Any) -> None:
    one, _ = make_endpoint()
    two, _ = make_endpoint()
    a_call(one, "a" * 28)
    a_call(one, "b" * 28)  # two calls without a key
    a_call(one, "c" * 28, idempotency_key="k")
    a_call(two, "d" * 28, idempotency_key="k")
    with pytest.raises(IntegrityError):
        a_call(one, "e" * 28, idempotency_key="k")


def test_migration_on_an_existing_file_keeps_its_rows(settings: Settings, make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint(name="keep-me")
    call = a_call(endpoint, "f" * 28)
    add_event(call, "requested", at=NOW, note="kept")
    version = schema_version(store.database.obj)
    store.database.close()
    db = open_database(settings.database_url)  # a restart: migrate again on the same file
    assert schema_version(db) == version == len(store.MIGRATIONS)
    assert Endpoint.get(Endpoint.name == "keep-me").get_id() == endpoint.get_id()
    assert Call.get(Call.callid == "f" * 28).phone_a == "15550001001"
    assert CallEvent.get().detail_dict == {"note": "kept"}
    db.close()


def test_a_new_migration_step_runs_once_and_keeps_rows(settings: Settings, make_endpoint: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, _ = make_endpoint()
    a_call(endpoint, "1" * 28)
    store.database.close()
    runs: list[int] = []

    def v2_add_column(db: Database) -> None:
        runs.append(1)
        run_migration(SqliteMigrator(db).add_column("call", "note", MigrateTextField(default="")))

    monkeypatch.setattr(store, "MIGRATIONS", [*store.MIGRATIONS, v2_add_column])
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS) and runs == [1]
    assert Call.get(Call.callid == "1" * 28).status == "queued"
    assert db.execute_sql("SELECT note FROM call").fetchall() == [("",)]
    db.close()
    db = open_database(settings.database_url)
    assert runs == [1]
    db.close()


def test_a_file_made_before_schema_versions_is_adopted(tmp_path: Path) -> None:
    """Tables that exist without a version row (an early file) are kept as they are, rows and all."""
    path = tmp_path / "old.db"
    db = open_database(f"sqlite:///{path}")
    endpoint = Endpoint.create(name="old", token_hash="0" * 64, token_hint="cb_0000…", caller_id_number="1",
                               dial_string="sofia/gateway/carrier/{number}")
    a_call(endpoint, "2" * 28)
    db.close()
    raw = sqlite3.connect(path)
    raw.execute("DROP TABLE schemaversion")
    raw.commit()
    raw.close()
    db = open_database(f"sqlite:///{path}")
    assert schema_version(db) == len(store.MIGRATIONS)
    assert Call.select().count() == 1 and Endpoint.get().name == "old"
    db.close()


def test_add_event_drops_empty_details(make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    call = a_call(endpoint, "3" * 28)
    event = add_event(call, "ended", cause="NORMAL_CLEARING", leg="", extra=None)
    assert event.detail_dict == {"cause": "NORMAL_CLEARING"}


def test_database_file(settings: Settings) -> None:
    assert database_file(settings.database_url) == str(Path(settings.state_dir) / "callbridge.db")
    assert database_file("postgresql://u:p@h/db") is None
