"""The store's writer (daemon/writer.py) on SQLite: writes committed in groups on one real thread's connection,
in the order submitted, the loop running a group's first short writes itself; a write's own error undoes that
write alone; a locked store is waited out by the daemon's writes (never by the loop) and answered at once (503)
for a request's; durable groups commit with synchronous=FULL; stop commits what is queued (PostgreSQL's GroupWriter
too, whose other tests are in test_group_writer.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from flask.testing import FlaskClient
from gevent import monkey
from peewee import Database, IntegrityError, OperationalError

from daemon.calls.records import CallRecords, NewCall
from daemon.ops.metrics import Metrics
from daemon.store import SQLITE_PRAGMAS, Call, CallEvent, CallStatus, Endpoint, database, database_file
from daemon.writer import GroupWriter, ThreadWriter, current, install
from tests.integration.conftest import wait_for

NOW = dt.datetime(2026, 6, 15, 12, 0, 0)
real_lock = monkey.get_original("_thread", "allocate_lock")
real_ident = monkey.get_original("_thread", "get_ident")
real_sleep = monkey.get_original("time", "sleep")


@pytest.fixture
def endpoint(make_endpoint: Callable[..., tuple[Endpoint, str]]) -> Endpoint:
    return make_endpoint()[0]


@pytest.fixture
def call(endpoint: Endpoint) -> Call:
    created: Call = Call.create(callid="c" * 28, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                                due_at=NOW, status="queued")
    return created


class Gate:
    """Holds the writer thread inside a write until opened, so that what is submitted meanwhile queues."""

    def __init__(self, writer: ThreadWriter) -> None:
        self.lock = real_lock()
        self.lock.acquire()
        self.entered: list[int] = []

        def hold() -> None:
            self.entered.append(real_ident())
            with self.lock:
                pass

        writer.submit(hold, durable=False, bulk=True)  # long: the thread runs it
        assert wait_for(lambda: bool(self.entered), 30), "the writer thread never ran the holding write"

    def open(self) -> None:
        self.lock.release()


@contextlib.contextmanager
def another_process_holds_the_lock(settings: Any) -> Iterator[None]:
    """The store's write lock held by another connection (a CLI command's, say) until the block ends."""
    other = sqlite3.connect(database_file(settings.database_url), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


def kinds(call: Call) -> list[str]:
    return [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]


def test_writes_run_on_a_connection_of_their_own_short_ones_on_the_loop_and_bulk_ones_in_the_thread(
        writer: ThreadWriter, call: Call) -> None:
    def where() -> tuple[int, int]:
        return real_ident(), id(database.connection())

    gate = Gate(writer)
    short = gevent.spawn(writer.submit, where, durable=False, wait=True)
    bulk = gevent.spawn(writer.submit, where, durable=False, wait=True, bulk=True)
    after = gevent.spawn(writer.submit, where, durable=False, wait=True)
    gevent.sleep(0)  # all three queued: one group
    gate.open()
    (short_thread, short_conn), (bulk_thread, bulk_conn), (after_thread, after_conn) = (
        short.get(timeout=30), bulk.get(timeout=30), after.get(timeout=30))
    assert short_thread == real_ident() and bulk_thread != real_ident()
    assert after_thread == bulk_thread  # what follows a bulk write in its group stays in the thread
    assert short_conn == bulk_conn == after_conn != id(database.connection())  # the loop's own connection: never


def test_a_group_longer_than_the_loops_share_goes_on_in_the_thread(writer: ThreadWriter, call: Call) -> None:
    gate = Gate(writer)
    ran_in: list[int] = []

    def step(n: int) -> None:
        ran_in.append(real_ident())
        real_sleep(0.0002)  # (a write never yields)
        CallEvent.create(call=call.id, kind=f"step{n}")

    for n in range(50):  # 10 ms of writes against the loop's 1 ms
        writer.submit(lambda n=n: step(n), durable=False)
    gevent.sleep(0)
    gate.open()
    writer.flush()
    on_loop = ran_in.count(real_ident())
    assert 1 <= on_loop < 50 and set(ran_in[on_loop:]) == {ran_in[-1]} != {real_ident()}
    assert kinds(call) == [f"step{n}" for n in range(50)]


def test_the_loop_never_waits_for_another_processs_lock(writer: ThreadWriter, call: Call, settings: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SQLITE_PRAGMAS, "busy_timeout", 3000)  # each wait for the lock: 3 s (the thread's)
    writer.submit(lambda: None, durable=False, wait=True)  # (the writer's connection takes it)
    with another_process_holds_the_lock(settings):
        writer.submit(lambda: CallEvent.create(call=call.id, kind="waited"), durable=False)
        # While the thread waits out the lock, the loop keeps running greenlets: a wait on it would stall
        # them 3 s at a time.
        started = time.monotonic()
        stalls = []
        while time.monotonic() - started < 4.0:
            before = time.monotonic()
            gevent.sleep(0.01)
            stalls.append(time.monotonic() - before)
        assert max(stalls) < 1.5, f"the loop stalled {max(stalls):.3f} s"
        assert kinds(call) == []
    writer.flush()
    assert kinds(call) == ["waited"]


def test_what_queues_meanwhile_commits_in_one_group_in_the_order_submitted(writer: ThreadWriter,
                                                                          call: Call) -> None:
    gate = Gate(writer)
    groups: list[int] = []
    for n in range(50):
        writer.submit(lambda n=n: CallEvent.create(call=call.id, kind=f"step{n}"), durable=False,
                      committed=lambda _: groups.append(writer.groups))
    assert kinds(call) == []  # nothing committed while the thread is held
    gate.open()
    writer.flush()
    assert kinds(call) == [f"step{n}" for n in range(50)]
    assert len(groups) == 50 and len(set(groups)) == 1  # one transaction for all fifty


def test_a_writes_own_error_undoes_that_write_alone(writer: ThreadWriter, call: Call, endpoint: Endpoint) -> None:
    gate = Gate(writer)

    def half_then_duplicate() -> None:
        CallEvent.create(call=call.id, kind="undone")  # undone with the write it belongs to
        Endpoint.create(name=endpoint.name, token_hash="x" * 64, token_hint="x", caller_id_number="1",
                        dial_string="d")

    writer.submit(lambda: CallEvent.create(call=call.id, kind="before"), durable=False)
    failing = gevent.spawn(writer.submit, half_then_duplicate, durable=True, wait=True)
    writer.submit(lambda: CallEvent.create(call=call.id, kind="after"), durable=False)
    gevent.sleep(0)  # the failing write is queued too
    gate.open()
    with pytest.raises(IntegrityError):
        failing.get(timeout=30)
    writer.flush()
    assert kinds(call) == ["before", "after"]


def test_a_writes_own_error_in_the_threads_part_of_a_group_undoes_that_write_alone(
        writer: ThreadWriter, call: Call, endpoint: Endpoint) -> None:
    gate = Gate(writer)

    def duplicate() -> None:
        Endpoint.create(name=endpoint.name, token_hash="x" * 64, token_hint="x", caller_id_number="1",
                        dial_string="d")

    writer.submit(lambda: CallEvent.create(call=call.id, kind="on the loop"), durable=False)
    writer.submit(lambda: CallEvent.create(call=call.id, kind="bulk"), durable=False, bulk=True)
    failing = gevent.spawn(writer.submit, duplicate, durable=True, wait=True)  # after the bulk one: the thread's
    writer.submit(lambda: CallEvent.create(call=call.id, kind="after"), durable=False)
    gevent.sleep(0)
    gate.open()
    with pytest.raises(IntegrityError):
        failing.get(timeout=30)
    writer.flush()
    assert kinds(call) == ["on the loop", "bulk", "after"]
    assert writer.submit(lambda: CallEvent.create(call=call.id, kind="next"), durable=True, wait=True)
    assert kinds(call)[-1] == "next"


def test_a_locked_store_is_waited_out_by_the_daemons_writes_and_refused_at_once_to_a_requests(
        writer: ThreadWriter, call: Call, settings: Any) -> None:
    with another_process_holds_the_lock(settings):
        writer.submit(lambda: CallEvent.create(call=call.id, kind="waited"), durable=False)
        with pytest.raises(OperationalError, match="locked"):
            writer.submit(lambda: CallEvent.create(call=call.id, kind="refused"), durable=True, fail_fast=True,
                          wait=True)
        assert wait_for(lambda: writer.retries >= 2, 30), "the daemon's write was not retried"
        assert kinds(call) == []
    writer.flush()
    assert kinds(call) == ["waited"]


def test_durable_groups_commit_with_synchronous_full_and_relaxed_ones_normal(writer: ThreadWriter) -> None:
    def synchronous() -> int:
        value: int = database.execute_sql("PRAGMA synchronous").fetchone()[0]
        return value

    assert writer.submit(synchronous, durable=True, wait=True) == 2  # FULL
    assert writer.submit(synchronous, durable=False, wait=True) == 1  # NORMAL
    gate = Gate(writer)
    relaxed = gevent.spawn(writer.submit, synchronous, durable=False, wait=True)
    durable = gevent.spawn(writer.submit, synchronous, durable=True, wait=True)
    gevent.sleep(0)
    gate.open()
    # One group holding a durable write commits durably, its relaxed writes with it.
    assert (relaxed.get(timeout=30), durable.get(timeout=30)) == (2, 2)
    assert database.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # the loop's own connection: untouched


def test_the_writers_connection_keeps_its_temporary_files_in_memory(writer: ThreadWriter) -> None:
    def temp_store() -> int:
        value: int = database.execute_sql("PRAGMA temp_store").fetchone()[0]
        return value

    assert writer.submit(temp_store, durable=False, wait=True) == 2  # MEMORY: no journal files in /var/tmp
    assert temp_store() == 2  # and the loop's own connection


def test_a_create_answers_after_its_commit_and_listeners_hear_changes_after_theirs(
        writer: ThreadWriter, endpoint: Endpoint) -> None:
    records = CallRecords(Metrics(), clock=lambda: NOW)
    heard: list[tuple[str, bool, bool]] = []

    def listener(changed: Call, status: CallStatus, _detail: dict[str, Any]) -> None:
        step = {CallStatus.QUEUED: "requested", CallStatus.DIALING_A: "claimed"}.get(status, status.value)
        committed = CallEvent.select().where((CallEvent.call == changed.id) & (CallEvent.kind == step)).exists()
        heard.append((status.value, committed, changed.status == status.value))

    records.listeners.append(listener)
    outbox: list[tuple[str, str]] = []
    records.status_writers.append(lambda changed, status, _detail: outbox.append((status.value, changed.status))
                                  and None)
    created = records.create(endpoint, NewCall(phone_a="15550001001", phone_b="15550002002", due_at=NOW,
                                               scheduled=False), now=NOW).call
    assert Call.get_by_id(created.id).status == "queued"  # read on the loop's connection, right after
    assert records.claim(created, a_uuid="a" * 36, b_uuid="b" * 36, now=NOW)
    records.a_answered(created, at=NOW)
    records.finish(created, CallStatus.COMPLETED, at=NOW)  # both queued: the loop goes on at once
    writer.flush()
    assert [h[0] for h in heard] == ["queued", "dialing_a", "a_answered", "completed"]
    # Each heard once committed, with the call as it was at that change (it moved on meanwhile).
    assert all(committed and same for _, committed, same in heard)
    # The status writers saw the call as it was at each change, although it moved on before they ran.
    assert outbox == [("queued", "queued"), ("dialing_a", "dialing_a"), ("a_answered", "a_answered"),
                      ("completed", "completed")]
    assert kinds(created) == ["requested", "claimed", "a_answered", "completed"]


def test_the_api_answers_503_when_the_store_refuses_a_create(writer: ThreadWriter, client: FlaskClient,
                                                            make_endpoint: Callable[..., tuple[Endpoint, str]],
                                                            settings: Any) -> None:
    _, token = make_endpoint()
    with another_process_holds_the_lock(settings):
        response = client.post("/v1/calls", json={"phone_a": "15550001001", "phone_b": "15550002002"},
                               headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert "database" in response.get_json()["data"]["code_desc"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["data"]["checks"]["database"] is False
    response = client.post("/v1/calls", json={"phone_a": "15550001001", "phone_b": "15550002002"},
                           headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert Call.select().count() == 1 and current() is writer


def test_stop_tells_the_callers_of_the_group_still_being_written_how_it_ended(db: Database, call: Call) -> None:
    """stop() gives up waiting for its pump after ``timeout`` (a slow disk, a store locked by another process);
    the group the thread holds then is still committed, and its callers are told so, not left waiting."""
    writer = ThreadWriter(db)
    previous = install(writer)
    disk, entered = real_lock(), []
    disk.acquire()

    def slow() -> int:  # a commit that outlasts stop()'s timeout
        entered.append(1)
        with disk:
            return int(CallEvent.create(call=call.id, kind="slow").id)

    try:
        waiting = gevent.spawn(writer.submit, slow, durable=True, wait=True, bulk=True)
        assert wait_for(lambda: bool(entered), 30), "the writer thread never ran the write"
        gevent.spawn_later(1.0, disk.release)
        writer.stop(timeout=0.2)
    finally:
        install(previous)
    assert waiting.join(timeout=10) is None and waiting.ready(), "the caller was left waiting"
    assert kinds(call) == ["slow"] and waiting.get() == CallEvent.get(CallEvent.kind == "slow").id


@pytest.mark.stores("sqlite", "postgresql")
def test_stop_commits_what_is_queued(db: Database, call: Call, store_kind: str) -> None:
    writer: ThreadWriter | GroupWriter = ThreadWriter(db) if store_kind == "sqlite" else GroupWriter()
    previous = install(writer)
    try:
        for n in range(20):
            writer.submit(lambda n=n: CallEvent.create(call=call.id, kind=f"step{n}"), durable=False)
        writer.stop()
    finally:
        install(previous)
    assert len(kinds(call)) == 20
    with pytest.raises(OperationalError):
        writer.submit(lambda: None, durable=False)
