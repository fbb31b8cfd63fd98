"""A call's record, used directly (as the API and any other front end use it): create, cancel, claim,
transitions and finish, with no Flask in between."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest

from daemon import store
from daemon.calls.records import CallRecords, HangupRequested, NewCall, NotCancelable, NotOwned
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallEvent, CallStatus, DaemonInstance, Endpoint, EndpointDay, database
from daemon.writer import ThreadWriter
from tests.conftest import insert_rows, sqlite_statements, sqlite_work

pytestmark = pytest.mark.stores("sqlite", "postgresql")

NOW = dt.datetime(2026, 6, 15, 12, 0, 0)


@pytest.fixture
def records(db: Any) -> CallRecords:
    return CallRecords(Metrics(), clock=lambda: NOW)


def request(due: dt.datetime = NOW, *, scheduled: bool = False, key: str | None = None) -> NewCall:
    return NewCall(phone_a="15550001001", phone_b="15550002002", due_at=due, scheduled=scheduled,
                   idempotency_key=key)


def kinds(call: Call) -> list[str]:
    return [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]


def test_create_queues_now_or_schedules_later_and_tells_the_listeners(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    heard: list[tuple[str, str]] = []
    records.listeners.append(lambda call, status, _detail: heard.append((call.callid, status.value)))
    now_call = records.create(endpoint, request(NOW - dt.timedelta(seconds=30)), now=NOW)
    later = records.create(endpoint, request(NOW + dt.timedelta(hours=1), scheduled=True), now=NOW)
    assert now_call.new and now_call.call.status == "queued" and now_call.call.due_at == NOW
    assert later.call.status == "scheduled" and later.call.due_at == NOW + dt.timedelta(hours=1)
    assert heard == [(now_call.call.callid, "queued"), (later.call.callid, "scheduled")]
    assert kinds(now_call.call) == ["requested"]


def test_create_with_a_used_idempotency_key_gives_the_earlier_call(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    first = records.create(endpoint, request(key="k1"), now=NOW)
    again = records.create(endpoint, request(key="k1"), now=NOW)  # as when two requests race past the look-up
    assert first.new and not again.new and again.call.id == first.call.id
    assert Call.select().count() == 1


def test_cancel_wins_before_the_claim_and_is_refused_after_it(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    early = records.create(endpoint, request(), now=NOW).call
    canceled = records.cancel(early, endpoint, now=NOW, via="the web page")
    assert isinstance(canceled, Call)
    assert (canceled.status, canceled.canceled_by, canceled.reason) == ("canceled", endpoint.name,
                                                                        "canceled through the web page")
    assert not records.claim(early, a_uuid="a", b_uuid="b", now=NOW)

    late = records.create(endpoint, request(), now=NOW).call
    assert records.claim(late, a_uuid="a", b_uuid="b", now=NOW)
    refused = records.cancel(late, endpoint, now=NOW)
    assert isinstance(refused, NotCancelable)
    assert refused.reason == "the call already started (status dialing_a)"
    records.finish(late, CallStatus.COMPLETED)
    final = records.cancel(late, endpoint, now=NOW)
    assert isinstance(final, NotCancelable) and final.reason == "the call is already final (status completed)"


def test_a_pending_call_canceled_since_it_was_read_stays_canceled(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """The dispatcher ends calls it read as pending (over the daily cap, missed) while its claims commit; a
    cancel committed in between was answered 200 and stays: no second final status, step or metric."""
    endpoint, _ = make_endpoint()
    heard: list[str] = []
    records.listeners.append(lambda _call, status, _detail: heard.append(status.value))
    ends: list[Callable[[Call], None]] = [
        lambda call: records.finish(call, CallStatus.FAILED, reason="daily cap of 1 calls reached"),
        lambda call: records.missed(call, now=NOW + dt.timedelta(hours=2), grace=60),
    ]
    for end in ends:
        read = records.create(endpoint, request(NOW + dt.timedelta(hours=1), scheduled=True), now=NOW).call
        assert isinstance(records.cancel(Call.get_by_id(read.id), endpoint, now=NOW), Call)
        heard.clear()
        end(read)  # as read before the cancel: scheduled
        records.flush()
        stored = Call.get_by_id(read.id)
        assert (stored.status, stored.reason, kinds(stored)) == ("canceled", "canceled through the API",
                                                                 ["requested", "canceled"])
        assert heard == [] and read.status == "scheduled" and read.ended_at is None
    for status in ("failed", "missed"):
        assert not records.metrics.registry.get_sample_value("callbridge_calls_finished_total",
                                                             {"status": status, "cause": ""})


def test_transitions_store_their_columns_and_finish_keeps_what_it_is_not_given(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    assert records.claim(call, a_uuid="a" * 36, b_uuid="b" * 36, now=NOW)
    records.a_answered(call, at=NOW + dt.timedelta(seconds=3))
    records.dialing_b(call, at=NOW + dt.timedelta(seconds=9))
    records.bridged(call, at=NOW + dt.timedelta(seconds=14), ring_seconds=5.0)
    records.finish(call, CallStatus.COMPLETED, at=NOW + dt.timedelta(seconds=74), talk_seconds=60.0)
    row = Call.get_by_id(call.id)
    assert row.status == "completed" and row.ring_seconds == 5.0 and row.talk_seconds == 60.0
    assert row.b_dialed_at == NOW + dt.timedelta(seconds=9) and row.ended_at == NOW + dt.timedelta(seconds=74)
    assert kinds(call) == ["requested", "claimed", "a_answered", "dialing_b", "bridged", "completed"]
    dialing_b = CallEvent.get((CallEvent.call == call.id) & (CallEvent.kind == "dialing_b"))
    assert dialing_b.detail_dict["phone"] == "15550002002"
    records.finish(call, CallStatus.FAILED, reason="too late")  # a final call stays as it ended
    assert Call.get_by_id(call.id).status == "completed"


def test_finish_takes_only_a_final_status_and_named_fields(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    with pytest.raises(ValueError, match="bridged is not a final status"):
        records.finish(call, CallStatus.BRIDGED)
    with pytest.raises(TypeError):
        records.finish(call, CallStatus.FAILED, failed_legg="a")  # type: ignore[call-arg]
    assert Call.get_by_id(call.id).status == "queued"


# -- PostgreSQL shared by several daemons: claims -------------------------------------------------

def wait_until_blocked_on_a_lock(timeout: float = 30.0) -> None:
    """Until some session of this database waits on a row lock (the racing claim has reached the server).
    Asked from a greenlet of its own: outside the caller's transaction, whose statistics are a snapshot."""
    gevent.spawn(_wait_for_a_lock_waiter, timeout).get()


def _wait_for_a_lock_waiter(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
             "AND wait_event_type = 'Lock'")
    while True:
        if database.execute_sql(query).fetchone()[0] > 0:
            return
        assert time.monotonic() < deadline, "the racing claim never waited on the row lock"
        gevent.sleep(0.01)


@pytest.mark.stores("postgresql")
@pytest.mark.parametrize("first_commits", [True, False])
def test_two_daemons_claiming_one_call_exactly_one_wins(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]], first_commits: bool) -> None:
    """READ COMMITTED: the second claim waits on the first's row lock, then re-reads the row. If the first
    committed, the call is no longer pending and the second changes nothing; if it rolled back, the
    second wins."""
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    other = CallRecords(Metrics(), clock=lambda: NOW)  # another daemon's (its own connection: a greenlet)

    first_claimed = gevent.event.Event()

    def first() -> bool:
        try:
            with records.claim_round():
                claimed = records.claim(Call.get_by_id(call.id), a_uuid="first", b_uuid="b", now=NOW)
                first_claimed.set()
                wait_until_blocked_on_a_lock()
                if not first_commits:
                    raise RuntimeError("the first daemon's round fails")
                return claimed
        except RuntimeError:
            return False

    def second() -> bool:
        first_claimed.wait(30)
        return other.claim(Call.get_by_id(call.id), a_uuid="second", b_uuid="b", now=NOW)

    one, two = gevent.spawn(first), gevent.spawn(second)
    results = (one.get(timeout=60), two.get(timeout=60))
    assert results == ((True, False) if first_commits else (False, True))
    row = Call.get_by_id(call.id)
    assert row.status == "dialing_a" and row.a_uuid == ("first" if first_commits else "second")
    assert kinds(row) == ["requested", "claimed"]  # one claim step: the losing round's rolled back


@pytest.mark.stores("postgresql")
def test_claim_rounds_of_two_daemons_get_different_calls(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """While one daemon's round holds its page, another's reads the next calls instead of the same ones
    (no claim is lost), and each round's follow-ups run only after its own commit. The first page's calls
    are another endpoint's: two rounds claiming for one endpoint take turns (its day's counter)."""
    first_endpoint, second_endpoint = make_endpoint()[0], make_endpoint()[0]
    calls = [records.create(first_endpoint if n < 4 else second_endpoint, request(NOW - dt.timedelta(seconds=10 - n)),
                            now=NOW).call for n in range(10)]
    other = CallRecords(Metrics(), clock=lambda: NOW)
    holding = gevent.event.Event()
    release = gevent.event.Event()
    launched: list[tuple[str, int]] = []

    def round_of(who: str, daemon: CallRecords, limit: int, hold: bool) -> list[bool]:
        with daemon.claim_round():
            page = daemon.due(NOW, limit=limit)
            results = []
            for call in page:
                results.append(daemon.claim(call, a_uuid=who, b_uuid="b", now=NOW))
                daemon.after_claims(lambda call=call: launched.append((who, call.id)))
            if hold:
                holding.set()
                release.wait(30)
                assert [c for w, c in launched if w == who] == []  # uncommitted: none of ours launched yet
        return results

    first = gevent.spawn(round_of, "first", records, 4, True)
    assert holding.wait(30)
    second = round_of("second", other, 10, False)  # does not wait for the first round's rows
    release.set()
    assert first.get(timeout=30) == [True] * 4 and second == [True] * 6
    by_call = {c.id: Call.get_by_id(c.id).a_uuid for c in calls}
    assert [by_call[c.id] for c in calls] == ["first"] * 4 + ["second"] * 6  # in due order, no overlap
    assert sorted(call_id for _, call_id in launched) == sorted(c.id for c in calls)
    assert launched[:6] == [("second", c.id) for c in calls[4:]]  # the second committed first


@pytest.mark.stores("postgresql")
def test_a_claim_round_that_rolls_back_claims_and_launches_nothing(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    heard: list[str] = []
    records.listeners.append(lambda c, status, _detail: heard.append(status.value))
    with pytest.raises(RuntimeError), records.claim_round():
        for due in records.due(NOW, limit=10):
            assert records.claim(due, a_uuid="a", b_uuid="b", now=NOW)
            records.after_claims(lambda: heard.append("launched"))
        raise RuntimeError("the round fails before its commit")
    assert heard == []
    assert Call.get_by_id(call.id).status == "queued" and kinds(call) == ["requested"]
    assert CallRecords.started_on(store.day_of(NOW)) == {}  # nor counted in the endpoint's day
    assert records.metrics.calls_in_flight.labels("dialing_a")._value.get() == 0


def test_a_status_change_and_its_timeline_step_commit_together(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    assert records.claim(call, a_uuid="a", b_uuid="b", now=NOW)

    def broken_event(*_args: Any, **_kw: Any) -> None:
        raise RuntimeError("the timeline insert failed")

    monkeypatch.setattr("daemon.calls.records.append_event", broken_event)
    with pytest.raises(RuntimeError):
        records.a_answered(call, at=NOW)
    monkeypatch.undo()
    assert Call.get_by_id(call.id).status == "dialing_a" and kinds(call) == ["requested", "claimed"]


def test_a_hangup_committed_before_an_originate_of_a_stops_it_and_one_after_a_mark_is_chased(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """An operator's hangup of a call whose A is not dialed yet: every later mark (the first originate, or
    one after a refusal) refuses, so nothing of A leaves; after a mark, the hangup says A may be up."""
    endpoint, _ = make_endpoint()
    early = records.create(endpoint, request(), now=NOW).call
    assert records.claim(early, a_uuid="a1", b_uuid="b1", now=NOW)
    assert CallRecords.request_hangup(early, by="ops@example.com") is False
    with pytest.raises(HangupRequested, match="hung up by ops@example.com before A was dialed"):
        records.mark_dialing_a(early)
    assert kinds(early) == ["requested", "claimed", "hangup_requested"]

    late = records.create(endpoint, request(), now=NOW).call
    assert records.claim(late, a_uuid="a2", b_uuid="b2", now=NOW)
    records.mark_dialing_a(late)
    assert CallRecords.request_hangup(late, by="ops@example.com") is True
    with pytest.raises(HangupRequested):
        records.mark_dialing_a(late, attempt=2)  # its next attempt, after a refusal by the switch
    assert kinds(late) == ["requested", "claimed", "dialing_a", "hangup_requested"]


@pytest.mark.stores("postgresql")
@pytest.mark.parametrize("mark_first", [True, False])
def test_a_hangup_racing_a_mark_on_postgresql_is_seen_by_it_or_sees_it(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]], mark_first: bool) -> None:
    """Another daemon's mark and an operator's hangup (``calls hangup`` elsewhere) at the same moment: the
    call's row lock orders them, so the one committed second sees the first. Without it, both would read
    before the other's commit: the originate would leave and the hangup would say nothing had."""
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    assert records.claim(call, a_uuid="a", b_uuid="b", now=NOW)
    holding = gevent.event.Event()

    def mark() -> str:
        try:
            records.mark_dialing_a(Call.get_by_id(call.id))
            return "marked"
        except HangupRequested:
            return "refused"

    def first() -> Any:
        with database.atomic():
            result = mark() if mark_first else CallRecords.request_hangup(call, by="ops")
            holding.set()
            wait_until_blocked_on_a_lock()
            return result

    def second() -> Any:
        holding.wait(30)
        return CallRecords.request_hangup(call, by="ops") if mark_first else mark()

    one, two = gevent.spawn(first), gevent.spawn(second)
    results = (one.get(timeout=60), two.get(timeout=60))
    assert results == (("marked", True) if mark_first else (False, "refused"))


@pytest.mark.stores("postgresql")
def test_a_stalled_daemon_whose_instance_id_a_new_run_took_acts_on_none_of_its_calls(
        make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """Same instance id, so the calls' owner is the same name: only this run's hold on the id (its row in
    ``instances``) tells the stalled daemon that the calls are the new run's now."""
    records = CallRecords(Metrics(), clock=lambda: NOW, owner="node1")
    records.run_id = "run-1"
    DaemonInstance.create(instance_id="node1", run_id="run-1", host="h", pid=1, started_at=NOW, seen_at=NOW)
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    assert records.claim(call, a_uuid="a", b_uuid="b", now=NOW)
    records.hold(call)  # still this run's
    DaemonInstance.update(run_id="run-2").where(DaemonInstance.instance_id == "node1").execute()  # a new run
    with pytest.raises(NotOwned):
        records.hold(call)
    with pytest.raises(NotOwned):
        records.mark_dialing_a(call)
    assert records.renew_leases([call.id], now=NOW) == {call.id}
    assert kinds(call) == ["requested", "claimed"]  # no mark: no originate would have left


def test_a_reason_longer_than_its_column_is_cut_not_refused(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """PostgreSQL refuses a value longer than the column (SQLite does not): a final status that cannot be
    written leaves the call unfinished. A reason names an operator's e-mail or a switch's address."""
    endpoint, _ = make_endpoint()
    call = records.create(endpoint, request(), now=NOW).call
    assert records.claim(call, a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()), now=NOW)
    by = "o" * 230 + "@example.com"
    records.finish(call, CallStatus.CANCELED, reason=f"hung up by {by} before A was dialed", canceled_by="cli")
    stored = Call.get_by_id(call.id)
    assert stored.status == "canceled"
    assert len(stored.reason) == 200 and stored.reason.startswith("hung up by ooo") and stored.reason.endswith("…")


def _claimed(records: CallRecords, endpoint: Endpoint, count: int, at: dt.datetime) -> None:
    for _ in range(count):
        call = records.create(endpoint, request(at), now=at).call
        assert records.claim(call, a_uuid=uuid.uuid4().hex, b_uuid=uuid.uuid4().hex, now=at)


def test_each_claim_counts_in_its_endpoints_day(records: CallRecords,
                                                make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """The daily caps count from these: the dispatcher's count at each day's start, and on a shared store
    every round's (:meth:`CallRecords.endpoint_load`)."""
    busy, quiet, idle = (make_endpoint()[0] for _ in range(3))
    today, yesterday = store.day_of(NOW), store.day_of(NOW - dt.timedelta(days=1))
    _claimed(records, busy, 3, NOW - dt.timedelta(hours=1))
    _claimed(records, busy, 2, yesterday + dt.timedelta(hours=23, minutes=59, seconds=59))
    _claimed(records, quiet, 1, today)  # its first moment
    canceled = records.create(idle, request(), now=NOW).call
    assert records.cancel(canceled, idle, now=NOW) is not None
    assert not records.claim(canceled, a_uuid="a", b_uuid="b", now=NOW)  # not started: not counted
    assert CallRecords.started_on(today) == {busy.id: 3, quiet.id: 1}
    assert CallRecords.started_on(yesterday) == {busy.id: 2}
    window = NOW - dt.timedelta(hours=2)
    assert CallRecords.endpoint_load(busy.id, day=today, window_start=window).started_today == 3
    assert CallRecords.endpoint_load(idle.id, day=today, window_start=window).started_today == 0
    CallRecords.forget_days_before(today)  # the counters of the days gone by go
    assert CallRecords.started_on(yesterday) == {} and CallRecords.started_on(today) == {busy.id: 3, quiet.id: 1}


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_an_endpoints_load_reads_as_much_on_a_busy_day_as_on_a_quiet_one(
        records: CallRecords, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """Read at every claim round on a shared store, with the endpoint locked against the other daemons:
    what it reads is bounded by the endpoint's limits (in flight, calls per second), not by its day's calls
    (a count of them read up to the daily cap's number of index entries: 13-31 ms at 100,000 on PostgreSQL)."""
    endpoint, _ = make_endpoint()
    today = store.day_of(NOW)

    def work_on_a_day_of(count: int) -> int:
        insert_rows(Call, ({"callid": uuid.uuid4().hex[:28], "endpoint": endpoint.id, "phone_a": "15550001001",
                            "phone_b": "15550002002", "due_at": NOW, "started_at": NOW - dt.timedelta(seconds=n % 3600),
                            "status": "completed"} for n in range(count)))
        EndpointDay.replace(endpoint=endpoint.id, day=today,
                            started=Call.select().where(Call.endpoint == endpoint.id).count()).execute()
        found: list[Any] = []
        work = sqlite_work(lambda: found.append(
            CallRecords.endpoint_load(endpoint.id, day=today, window_start=NOW - dt.timedelta(seconds=1))))
        assert found[0].started_today == Call.select().where(Call.endpoint == endpoint.id).count()
        return work

    quiet = work_on_a_day_of(100)
    busy = work_on_a_day_of(20_000)
    assert busy <= 2 * quiet + 10, (quiet, busy)


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_a_page_of_due_calls_after_a_cursor_starts_its_walk_at_the_cursor(
        records: CallRecords, make_endpoint: Callable[..., Any]) -> None:
    """A tick reads a backlog page after page: a page deep in it must not walk the pages before it again
    (the cursor a bound of the index walk, not a filter of it)."""
    endpoint, _ = make_endpoint()
    first = NOW - dt.timedelta(days=1)
    insert_rows(Call, ({"callid": uuid.uuid4().hex[:28], "endpoint": endpoint.id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": first + dt.timedelta(seconds=n), "status": "queued"}
                       for n in range(20_000)))
    backlog = list(Call.select(Call.id, Call.due_at).order_by(Call.due_at, Call.id).tuples())

    def work_of_a_page(position: int, **options: Any) -> int:
        call_id, due_at = backlog[position]
        pages: list[list[Call]] = []
        work = sqlite_work(lambda: pages.append(records.due(NOW, limit=8, after=(due_at, call_id), **options)))
        assert [c.id for c in pages[0]] == [i for i, _ in backlog[position + 1:position + 9]]
        return work

    for options in ({}, {"skip_endpoints": {10**6}}):
        shallow, deep = work_of_a_page(10, **options), work_of_a_page(19_900, **options)
        assert deep <= 2 * shallow + 10, (options, shallow, deep)


def test_due_calls_of_many_endpoints_beside_those_left_out_come_in_a_statement_per_status(
        records: CallRecords, make_endpoint: Callable[..., Any]) -> None:
    """An endpoint at its limits is left out of a tick's page (its campaign first in due order): the other
    endpoints' first due calls, soonest first, read in one statement per pending status whatever their
    number (a statement and a page of rows per endpoint held the loop 0.5-1.3 s a tick at 2,000)."""
    left_out = make_endpoint()[0]
    others = [make_endpoint()[0] for _ in range(40)]
    insert_rows(Call, ({"callid": uuid.uuid4().hex[:28], "endpoint": left_out.id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": NOW - dt.timedelta(hours=1, seconds=n), "status": "queued"}
                       for n in range(50)))
    insert_rows(Call, ({"callid": uuid.uuid4().hex[:28], "endpoint": others[n % 40].id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": NOW - dt.timedelta(seconds=n % 7),
                        "status": ("queued", "scheduled")[n % 2], "scheduled": bool(n % 2)} for n in range(400)))
    insert_rows(Call, [{"callid": uuid.uuid4().hex[:28], "endpoint": others[0].id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": NOW + dt.timedelta(seconds=1), "status": "queued"}])
    pending = sorted((c for c in Call.select() if c.endpoint_id != left_out.id and c.due_at <= NOW),
                     key=lambda c: (c.due_at, c.id))
    after = (pending[20].due_at, pending[20].id)
    for cursor, expected in ((None, pending[:8]), (after, pending[21:29])):
        with database.atomic():  # (on PostgreSQL a claim round's read: the rows locked)
            page = records.due(NOW, limit=8, skip_endpoints={left_out.id}, after=cursor)
        assert [c.id for c in page] == [c.id for c in expected]
        assert all(c.endpoint.id == c.endpoint_id for c in page)
    if not store.is_shared():
        assert sqlite_statements(lambda: records.due(NOW, limit=8, skip_endpoints={left_out.id})) <= 3


def test_the_media_of_calls_not_yet_ended_is_in_use_and_only_that(make_endpoint: Callable[..., Any]) -> None:
    """What the media cache's eviction keeps: every file a pending or running call will play."""
    endpoint, _ = make_endpoint()
    files = iter(range(1000))

    def call(status: CallStatus, *, msg: bool = True) -> tuple[str, ...]:
        n = next(files)
        named = (f"/media/play-{n}.wav", f"/media/msg-{n}.wav" if msg else "", f"/media/tone-{n}.wav")
        Call.create(callid=uuid.uuid4().hex[:28], endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                    due_at=NOW, status=status.value, play_file=named[0], msg_file=named[1], dialtone_file=named[2])
        return tuple(path for path in named if path)

    kept = set()
    for status in (CallStatus.SCHEDULED, CallStatus.QUEUED, CallStatus.DIALING_A, CallStatus.BRIDGED):
        kept.update(call(status))
    kept.update(call(CallStatus.A_ANSWERED, msg=False))
    for status in (CallStatus.COMPLETED, CallStatus.FAILED, CallStatus.CANCELED):
        call(status)
    for _ in range(3):  # a campaign: many calls, the same files
        Call.create(callid=uuid.uuid4().hex[:28], endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                    due_at=NOW, status="scheduled", play_file="/media/campaign.wav")
    assert CallRecords.media_in_use() == kept | {"/media/campaign.wav"}


@pytest.mark.stores("sqlite")  # the store's writer thread counts its commits
def test_a_start_takes_the_calls_left_in_flight_in_one_commit(writer: ThreadWriter,
                                                               make_endpoint: Callable[..., Any]) -> None:
    """Each take-over waited for its own commit: a start with 2,000 calls in flight spent 3 s on them (more
    on a disk slower to sync) before following any."""
    endpoint, _ = make_endpoint()
    insert_rows(Call, ({"callid": uuid.uuid4().hex[:28], "endpoint": endpoint.id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": NOW, "started_at": NOW - dt.timedelta(seconds=n),
                        "status": "bridged", "a_uuid": uuid.uuid4().hex, "b_uuid": uuid.uuid4().hex,
                        "owner": "the previous run"} for n in range(300)))
    records = CallRecords(Metrics(), clock=lambda: NOW)
    before = writer.groups
    taken = records.left_in_flight(now=NOW)
    assert [call.id for call in taken] == [call.id for call in Call.select().order_by(Call.started_at)]
    assert {call.owner for call in Call.select()} == {records.owner}
    assert writer.groups - before <= 2

