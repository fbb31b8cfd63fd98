"""Shared fixtures: settings in tmp_path, a fresh SQLite store per test, endpoints with tokens, the API
app with fakes, and the same app over real HTTP (the daemon's server on 127.0.0.1, port 0)."""

from __future__ import annotations

# The daemon is a gevent process; its tests run the same way, so a blocking client call in a test
# (urllib, sqlite3 from another "process") yields to the in-process server and stand-in.
from gevent import monkey

monkey.patch_all()

import datetime as dt
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from peewee import Database, Model, chunked

from daemon.accounts.endpoints import EndpointOptions, create_endpoint
from daemon.config import Settings, load_settings
from daemon.store import Endpoint, close_database, open_database
from daemon.writer import GroupWriter, ThreadWriter, install
from tests.fakes import FakeDispatcher, FakeMedia, FixedClock
from tests.shards import SHARD_VARIABLE

NOW = dt.datetime(2026, 6, 15, 12, 0, 0)  # naive UTC, the fixed "now" of API tests


STORES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.stores("sqlite", "postgresql")`` (on a test or a module) runs the test once per
    database; unmarked tests run on SQLite only."""
    marker = metafunc.definition.get_closest_marker("stores")
    if marker is None or "store_kind" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(STORES)
    assert marker.args and not unknown, f"stores: expected some of {STORES}, got {marker.args}"
    metafunc.parametrize("store_kind", marker.args)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``CALLBRIDGE_TEST_SHARD=i/n`` (set by tests/shards.py): keep the i-th of n parts of the suite, dealt
    round-robin; the tests of a module that share a module-scoped fixture go together, in one part. The
    ``slow`` ones are dealt apart from the rest, so that each part gets its share of both."""
    shard = os.environ.get(SHARD_VARIABLE)
    if not shard:
        return
    index, count = (int(part) for part in shard.split("/"))
    groups: dict[tuple[bool, str], int] = {}
    dealt: Counter[bool] = Counter()
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        slow = item.get_closest_marker("slow") is not None
        key = (slow, _shard_group(item))
        if key not in groups:
            groups[key] = dealt[slow]
            dealt[slow] += 1
        (kept if groups[key] % count == index else dropped).append(item)
    items[:] = kept
    config.hook.pytest_deselected(items=dropped)


def _shard_group(item: pytest.Item) -> str:
    info = getattr(item, "_fixtureinfo", None)
    definitions = info.name2fixturedefs.values() if info is not None else ()
    if any(fixture.scope == "module" for chain in definitions for fixture in chain):
        return item.nodeid.split("::")[0]
    return item.nodeid


@pytest.fixture
def store_kind() -> str:
    """The database under test (parametrized by the ``stores`` marker)."""
    return "sqlite"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One PostgreSQL server for the session (tests/postgres_server.py); skipped when PostgreSQL is not
    installed, unless CALLBRIDGE_REQUIRE_POSTGRES is set (CI), where that fails instead."""
    from tests.postgres_server import PostgresMissing, start_server, stop_server

    try:
        server = start_server()
    except PostgresMissing as exc:
        if os.environ.get("CALLBRIDGE_REQUIRE_POSTGRES"):
            pytest.fail(f"{exc}; CALLBRIDGE_REQUIRE_POSTGRES is set, so this does not skip")
        pytest.skip(f"{exc}: the PostgreSQL runs of the store tests are skipped")
    yield server
    stop_server(server)


@pytest.fixture
def postgres_url(postgres_server: Any) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test (a copy of the session's template)."""
    name = postgres_server.new_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture
def database_url(store_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if store_kind == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return f"sqlite:///{tmp_path / 'state' / 'callbridge.db'}"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings whose state lives in this test's tmp_path, and whose database is this test's."""
    return load_settings(environ={}, state_dir=str(tmp_path / "state"), database_url=database_url)


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    """A fresh, migrated store bound to the models (SQLite, or PostgreSQL under ``stores``)."""
    database = open_database(settings.database_url)
    yield database
    close_database(database)


@pytest.fixture
def writer(db: Database) -> Iterator[ThreadWriter]:
    """The daemon's store writer on SQLite, installed: a real thread committing what queued meanwhile in one group."""
    thread_writer = ThreadWriter(db, retry_for=30.0)
    previous = install(thread_writer)
    yield thread_writer
    thread_writer.stop()
    install(previous)


@pytest.fixture
def group_writer(db: Database) -> Iterator[GroupWriter]:
    """The daemon's store writer on PostgreSQL, installed: steps queued and committed in groups by one greenlet."""
    writer = GroupWriter(retry_for=30.0)
    previous = install(writer)
    yield writer
    writer.stop()
    install(previous)


def insert_rows(model: type[Model], rows: Iterable[dict[str, Any]]) -> None:
    """Insert many rows, a thousand a statement (SQLite bounds a statement's parameters)."""
    for batch in chunked(rows, 1000):
        model.insert_many(batch).execute()


def sqlite_work(run: Callable[[], Any]) -> int:
    """The work SQLite did on this thread's connection while ``run`` ran, in hundreds of its virtual
    machine's instructions: what a read or write costs as the store grows, counted, not timed (a test
    on a busy machine can rely on it)."""
    from daemon.store import database

    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    connection = database.connection()
    connection.set_progress_handler(count, 100)
    try:
        run()
    finally:
        connection.set_progress_handler(None, 100)
    return steps


def sqlite_statements(run: Callable[[], Any]) -> int:
    """How many statements ``run`` sent to SQLite on this thread's connection (its trace callback)."""
    from daemon.store import database

    sent: list[str] = []
    connection = database.connection()
    connection.set_trace_callback(sent.append)
    try:
        run()
    finally:
        connection.set_trace_callback(None)
    return len(sent)


@pytest.fixture
def make_endpoint(db: Database) -> Callable[..., tuple[Endpoint, str]]:
    """Factory: ``make_endpoint(name=..., **options)`` → (endpoint, token)."""
    counter = iter(range(1, 10_000))

    def make(name: str | None = None, **options: Any) -> tuple[Endpoint, str]:
        opts = EndpointOptions(name=name or f"ep{next(counter)}", caller_id_number="15550000000",
                               dial_string="sofia/gateway/carrier/{number}", **options)
        return create_endpoint(opts)

    return make


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def media(tmp_path: Path) -> FakeMedia:
    return FakeMedia(tmp_path / "media")


@pytest.fixture
def dispatcher() -> FakeDispatcher:
    return FakeDispatcher()


@pytest.fixture
def readiness_checks() -> dict[str, bool]:
    """Mutable checks the app's readiness callable reports."""
    return {"esl": True}


@pytest.fixture
def app(settings: Settings, db: Database, media: FakeMedia, dispatcher: FakeDispatcher, clock: FixedClock,
        readiness_checks: dict[str, bool]) -> Flask:
    from webapi.app import create_app

    return create_app(settings, media=media, dispatcher=dispatcher, readiness=lambda: dict(readiness_checks),
                      clock=clock)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@dataclass
class LiveServer:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


@pytest.fixture
def live_server(app: Flask) -> Iterator[LiveServer]:
    """The app under the daemon's HTTP server (webapi/server.py) in its own thread, on 127.0.0.1:0."""
    import gevent
    import gevent.event

    from webapi.app import MAX_BODY
    from webapi.server import ApiServer, Limits

    started = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        server = ApiServer(("127.0.0.1", 0), app, Limits(max_body=MAX_BODY), log=None, error_log=None)
        server.start()
        stop = gevent.get_hub().loop.async_()
        done = gevent.event.Event()
        stop.start(done.set)
        holder.update(port=server.server_port, stop=stop)
        started.set()
        done.wait()
        server.stop(timeout=2)
        stop.close()

    thread = threading.Thread(target=serve, name="live-api", daemon=True)
    thread.start()
    assert started.wait(10), "server did not start"
    yield LiveServer("127.0.0.1", holder["port"])
    holder["stop"].send()
    thread.join(10)


def data_of(response: Any) -> dict[str, Any]:
    """The ``data`` object of an envelope, checking the envelope itself on the way."""
    assert response.mimetype == "application/json", response.get_data(as_text=True)[:200]
    body = response.get_json()
    assert set(body) == {"data"}
    inner: dict[str, Any] = body["data"]
    assert inner["code"] == response.status_code
    assert isinstance(inner["code_desc"], str)
    assert (inner["code_desc"] == "") == (response.status_code == 200)
    return inner


def create(client: FlaskClient, token: str | None, *, json: bool = False,
           headers: dict[str, str] | None = None, **fields: Any) -> Any:
    """POST /v1/calls with the token as a field (form by default, JSON with ``json=True``)."""
    body = dict(fields)
    if token is not None:
        body["token"] = token
    body.setdefault("phone_a", "15550001001")
    body.setdefault("phone_b", "15550002002")
    body = {k: v for k, v in body.items() if v is not None}  # None: leave the field out
    if json:
        return client.post("/v1/calls", json=body, headers=headers or {})
    return client.post("/v1/calls", data=body, headers=headers or {})
