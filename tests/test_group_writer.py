"""The store's writer on PostgreSQL (daemon/group_writer.py, GroupWriter): the steps of calls in progress queue and
commit in groups from one greenlet, in the order submitted, their callers going on at once; a write made at
once (durable, fail-fast) lands after what queued before it; a write's own error undoes that write alone; a
broken connection is waited out. (Its stop: test_writer.py; the lost-lease tests of test_leases.py run with
it too.)"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from peewee import IntegrityError, OperationalError

from daemon.calls.records import THROTTLED, CallRecords, NewCall
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallEvent, Endpoint, database
from daemon.writer import GroupWriter

pytestmark = pytest.mark.stores("postgresql")

NOW = dt.datetime(2026, 6, 15, 12, 0, 0)


@pytest.fixture
def call(make_endpoint: Callable[..., tuple[Endpoint, str]]) -> Call:
    created: Call = Call.create(callid="c" * 28, endpoint=make_endpoint()[0], phone_a="15550001001",
                                phone_b="15550002002", due_at=NOW, status="queued")
    return created


def kinds(call: Call) -> list[str]:
    return [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]


def step(call: Call, kind: str) -> Callable[[], Any]:
    return lambda: CallEvent.create(call=call.id, kind=kind)


def test_steps_queue_and_commit_in_one_group_in_the_order_submitted(group_writer: GroupWriter, call: Call) -> None:
    groups: list[int] = []
    for n in range(50):
        group_writer.submit(step(call, f"step{n}"), durable=False, committed=lambda _: groups.append(group_writer.groups))
    assert kinds(call) == []  # the callers went on: nothing written yet
    group_writer.flush()
    assert kinds(call) == [f"step{n}" for n in range(50)]
    assert len(groups) == 50 and len(set(groups)) == 1  # one transaction for all fifty


def test_a_write_made_at_once_lands_after_the_steps_queued_before_it(group_writer: GroupWriter, call: Call) -> None:
    """A's originate refused by the switch (a step, queued), then its next originate marked (durable, at
    once): the mark must come last, or a restart reads "refused and not sent again" and dials A twice."""
    records = CallRecords(Metrics(), clock=lambda: NOW)
    Call.update(status="dialing_a", a_uuid=str(uuid.uuid4())).where(Call.id == call.id).execute()
    call = Call.get_by_id(call.id)
    records.mark_dialing_a(call)
    records.step(call, THROTTLED, leg="a", attempt=1)
    records.mark_dialing_a(call, attempt=2)
    assert kinds(call) == ["dialing_a", THROTTLED, "dialing_a"]
    assert CallRecords.unsent_because(call) is None


def test_an_api_create_does_not_wait_for_the_steps_of_calls_in_progress(group_writer: GroupWriter, call: Call) -> None:
    """A new call shares no row with the steps queued: its request is answered without waiting for them."""
    held = gevent.event.Event()
    group_writer.submit(lambda: held.wait(), durable=False)  # a group the server is slow to take
    records = CallRecords(Metrics(), clock=lambda: NOW)
    request = NewCall(phone_a="15550001001", phone_b="15550002002", due_at=NOW, scheduled=False)
    creating = gevent.spawn(records.create, call.endpoint, request, now=NOW)
    try:
        created = creating.get(timeout=30).call
        assert Call.get_by_id(created.id).status == "queued"
    finally:
        held.set()
    group_writer.flush()


def test_a_writes_own_error_undoes_that_write_alone(group_writer: GroupWriter, call: Call) -> None:
    def half_then_duplicate() -> None:
        CallEvent.create(call=call.id, kind="undone")  # undone with the write it belongs to
        Call.update(callid="d" * 28).where(Call.id == call.id).execute()
        Call.create(callid="d" * 28, endpoint=call.endpoint, phone_a="1", phone_b="2", due_at=NOW)

    group_writer.submit(step(call, "before"), durable=False)
    failing = gevent.spawn(group_writer.submit, half_then_duplicate, durable=False, wait=True)
    group_writer.submit(step(call, "after"), durable=False)
    with pytest.raises(IntegrityError):
        failing.get(timeout=30)
    group_writer.flush()
    assert kinds(call) == ["before", "after"]
    assert Call.get_by_id(call.id).callid == "c" * 28


def test_a_broken_connection_is_waited_out_and_the_group_written_once(group_writer: GroupWriter, call: Call) -> None:
    """The server ends the writer's session mid-group (a restart, a failover): the group is undone and
    written again on a new connection, each step once."""
    ended: list[bool] = []

    def end_own_session() -> None:
        if not ended:
            ended.append(True)
            database.execute_sql("SELECT pg_terminate_backend(pg_backend_pid())")

    group_writer.submit(step(call, "first"), durable=False)
    group_writer.submit(end_own_session, durable=False)
    group_writer.submit(step(call, "second"), durable=False)
    group_writer.flush()
    assert kinds(call) == ["first", "second"]
    assert group_writer.retries >= 1


def test_a_fail_fast_write_gets_one_attempt_at_the_steps_before_it(group_writer: GroupWriter, call: Call) -> None:
    """A request's write behind steps the store refuses answers at once (503), not after the retries."""
    store_away = [True]

    def refused_while_away() -> None:
        if store_away:
            raise OperationalError("the store refuses writes")

    group_writer.submit(refused_while_away, durable=False)
    with pytest.raises(OperationalError):
        group_writer.submit(step(call, "request"), durable=True, fail_fast=True, wait=True)
    assert kinds(call) == []
    store_away.clear()
    group_writer.flush()  # back: the step waited out the refusal
