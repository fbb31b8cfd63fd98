"""The dispatcher with a controllable clock: due order, limits, exactly-once claims, missed calls."""

from __future__ import annotations

import datetime as dt
import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent import monkey
from peewee import OperationalError

import daemon.calls.dispatcher as dispatcher_module
import daemon.calls.records as records_module
from daemon.accounts.endpoints import disable_endpoint
from daemon.calls.dispatcher import Dispatcher, TokenBucket
from daemon.calls.records import CallRecords
from daemon.config import Settings
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallStatus, Endpoint, database
from daemon.switch.capacity import SwitchCapacity
from daemon.switch.engine import choose_switch, room_for_new_calls
from daemon.writer import ThreadWriter
from tests.conftest import insert_rows, sqlite_work
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.stores("sqlite", "postgresql")

T0 = dt.datetime(2026, 3, 1, 9, 0, 0)
real_lock = monkey.get_original("_thread", "allocate_lock")


class FakeSwitch:
    """A switch as the dispatcher sees it: a name, whether it is reachable, its capacity."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        self.capacity = SwitchCapacity(0.1)
        self.capacity.learn_limits(sps=30, max_sessions=1000)


class FakeEngine:
    """Records launches (and on which switch); calls stay in flight until ``end`` is called. The choice
    of switch is the engine's own (``choose_switch``)."""

    def __init__(self, switches: int = 1) -> None:
        self.switches = [FakeSwitch(f"10.0.0.{11 + n}:8021") for n in range(switches)]
        self.launched: list[Call] = []
        self.launched_on: list[str] = []
        self.in_flight_by_endpoint: Counter[int] = Counter()
        self.now = 100.0  # monotonic seconds, moved by the tests

    @property
    def ready(self) -> bool:
        return any(switch.ready for switch in self.switches)

    @ready.setter
    def ready(self, value: bool) -> None:
        for switch in self.switches:
            switch.ready = value

    @property
    def capacity(self) -> SwitchCapacity:
        return self.switches[0].capacity

    def pick_switch(self, now: float) -> tuple[FakeSwitch | None, float]:
        return choose_switch(self.switches, now)  # type: ignore[arg-type,return-value]

    def room_for_new_calls(self, now: float) -> tuple[int, float]:
        return room_for_new_calls(self.switches, now)  # type: ignore[arg-type]

    def monotonic(self) -> float:
        return self.now

    def in_flight(self) -> int:
        return sum(self.in_flight_by_endpoint.values())

    def new_leg_uuids(self) -> tuple[str, str]:
        import uuid

        return str(uuid.uuid4()), str(uuid.uuid4())

    def launch(self, call: Call, endpoint: Endpoint, *, switch: FakeSwitch, **_: Any) -> None:
        self.launched.append(call)
        self.launched_on.append(switch.name)
        self.in_flight_by_endpoint[endpoint.id] += 1
        switch.capacity.sent(call.a_uuid, self.now)  # the sequence sends A's originate at once

    def end(self, call: Call) -> None:
        self.in_flight_by_endpoint[call.endpoint_id] -= 1
        # As a real call's end: its final status is stored (a shared store counts calls in flight from it).
        Call.update(status="completed").where(Call.id == call.id).execute()


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def dispatcher(settings: Settings, db: Any, fake_engine: FakeEngine) -> Dispatcher:
    settings.calls_per_second = 1000
    settings.max_in_flight = 1000
    return Dispatcher(settings, fake_engine, CallRecords(Metrics(), clock=lambda: T0), clock=lambda: T0)  # type: ignore[arg-type]


def add(endpoint: Endpoint, due: dt.datetime, status: CallStatus = CallStatus.SCHEDULED) -> Call:
    return Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a="15550000001",
                       phone_b="15550000002", due_at=due, scheduled=True, status=status.value)


def test_starts_due_calls_in_due_order_and_says_when_to_look_again(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    late = add(endpoint, T0 - dt.timedelta(seconds=2))
    early = add(endpoint, T0 - dt.timedelta(seconds=5))
    later = add(endpoint, T0 + dt.timedelta(seconds=42))
    wait = dispatcher.tick(T0, 0.0)
    assert [c.id for c in fake_engine.launched] == [early.id, late.id]
    assert wait == pytest.approx(42.0)
    claimed = Call.get_by_id(early.id)
    assert claimed.status == "dialing_a" and claimed.a_uuid and claimed.b_uuid
    assert claimed.lateness_ms == 5000
    assert Call.get_by_id(later.id).status == "scheduled"


def test_per_endpoint_in_flight_limit_holds_calls_in_order(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    busy, _ = make_endpoint(max_in_flight=2, calls_per_second=1000)
    other, _ = make_endpoint(max_in_flight=5, calls_per_second=1000)
    mine = [add(busy, T0 - dt.timedelta(seconds=10 - i)) for i in range(5)]
    theirs = add(other, T0)
    dispatcher.tick(T0, 0.0)
    assert [c.id for c in fake_engine.launched] == [mine[0].id, mine[1].id, theirs.id]
    fake_engine.end(fake_engine.launched[0])
    dispatcher.tick(T0, 1.0)
    assert fake_engine.launched[-1].id == mine[2].id


# SQLite only: on a shared PostgreSQL the rate is also counted from the calls' start times (a window of
# wall-clock time, see test_an_endpoints_limits_hold_across_two_daemons), which this test's clock never moves.
@pytest.mark.stores("sqlite")
def test_calls_per_second_is_a_token_bucket(dispatcher: Dispatcher, fake_engine: FakeEngine,
                                            make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=2)
    for _ in range(6):
        add(endpoint, T0)
    dispatcher.tick(T0, 0.0)
    assert len(fake_engine.launched) == 2  # burst of max(1, rate)
    wait = dispatcher.tick(T0, 0.1)
    assert len(fake_engine.launched) == 2 and 0 < wait <= 0.5
    dispatcher.tick(T0, 0.5)
    assert len(fake_engine.launched) == 3


def test_global_limit_on_calls_in_flight(dispatcher: Dispatcher, fake_engine: FakeEngine,
                                         make_endpoint: Callable[..., Any]) -> None:
    dispatcher.settings.max_in_flight = 3
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    for _ in range(5):
        add(endpoint, T0)
    dispatcher.tick(T0, 0.0)
    assert len(fake_engine.launched) == 3


def test_a_canceled_call_is_never_started(dispatcher: Dispatcher, fake_engine: FakeEngine,
                                          make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    call = add(endpoint, T0)
    # The API's cancel is the mirror conditional update; whichever commits first wins.
    Call.update(status="canceled").where((Call.id == call.id) & Call.status.in_(["scheduled", "queued"])).execute()
    dispatcher.tick(T0, 0.0)
    assert fake_engine.launched == []
    assert dispatcher.records.claim(call, a_uuid="x", b_uuid="y", now=T0) is False


def test_claim_then_cancel_leaves_the_claim(dispatcher: Dispatcher, make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    call = add(endpoint, T0)
    assert dispatcher.records.claim(call, a_uuid="a", b_uuid="b", now=T0)
    canceled = (Call.update(status="canceled")
                .where((Call.id == call.id) & Call.status.in_(["scheduled", "queued"])).execute())
    assert canceled == 0
    assert Call.get_by_id(call.id).status == "dialing_a"


def test_recovery_marks_calls_missed_beyond_the_grace_and_keeps_the_rest(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    dispatcher.settings.schedule_grace = 300
    stale = add(endpoint, T0 - dt.timedelta(hours=3))
    recent = add(endpoint, T0 - dt.timedelta(seconds=200))
    assert dispatcher.recover(T0) == 1
    missed = Call.get_by_id(stale.id)
    assert missed.status == "missed" and "grace 300 s" in missed.reason and missed.ended_at == T0
    dispatcher.tick(T0, 0.0)
    assert [c.id for c in fake_engine.launched] == [recent.id]


def test_a_start_after_a_long_outage_marks_the_backlog_missed_a_page_per_tick_before_dialing(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any]) -> None:
    """A weekend's scheduled calls found overdue at a start: marked missed by the first ticks, a page each
    (neither the loop nor systemd's start timeout waits for the whole backlog), and with no heartbeat
    written meanwhile, so a restart in the middle still finds the rest missed, not late: nothing of them
    is dialed. The late call within the grace is dialed once the backlog is done."""
    settings.schedule_grace, settings.max_in_flight, settings.calls_per_second = 300, 1000, 1000
    endpoint, _ = make_endpoint(max_in_flight=1000, calls_per_second=1000)
    CallRecords(Metrics()).beat(T0 - dt.timedelta(days=3))
    backlog = 2 * dispatcher_module.RECOVERY_PAGE + 7
    insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "requested_at": T0 - dt.timedelta(days=3),
                        "due_at": T0 - dt.timedelta(days=2, seconds=n), "status": "scheduled", "scheduled": True}
                       for n in range(backlog)))
    late = add(endpoint, T0 - dt.timedelta(seconds=60))

    def pending() -> int:
        return Call.select().where(Call.status == "scheduled").count()

    engine = FakeEngine()
    first = Dispatcher(settings, engine, CallRecords(Metrics()), clock=lambda: T0)  # type: ignore[arg-type]
    first.start()
    first.stop()  # its first tick ran: one page
    assert pending() == backlog + 1 - dispatcher_module.RECOVERY_PAGE
    assert CallRecords(Metrics()).dispatcher_last_ran() == T0 - dt.timedelta(days=3)  # no heartbeat yet

    restarted = Dispatcher(settings, engine, CallRecords(Metrics()), clock=lambda: T0)  # type: ignore[arg-type]
    restarted.start()
    restarted.stop()
    assert pending() == backlog + 1 - 2 * dispatcher_module.RECOVERY_PAGE  # still missed after a restart
    ticks = 0
    while not engine.launched:
        ticks += 1
        assert ticks < 10
        restarted.tick(T0, 0.0)
    assert ticks == 2  # the last page, then the calls due
    assert [c.id for c in engine.launched] == [late.id] and pending() == 0
    assert Call.select().where(Call.status == "missed").count() == backlog
    assert CallRecords(Metrics()).dispatcher_last_ran() == T0


@pytest.mark.stores("postgresql")  # SQLite's planner stops each status's walk at the page by itself
def test_a_page_of_overdue_calls_reads_that_page_not_the_backlog(make_endpoint: Callable[..., Any]) -> None:
    """PostgreSQL sorted every pending call of both statuses to find a page's first 50 (its index is by
    status, then due time): a start after an outage read the whole backlog at each of its pages."""
    endpoint, _ = make_endpoint()

    def rows_read_by_a_page(backlog: int) -> int:
        insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550001001",
                            "phone_b": "15550002002", "due_at": T0 - dt.timedelta(days=2, seconds=n),
                            "status": ("scheduled", "queued")[n % 2]} for n in range(backlog)))
        database.execute_sql("ANALYZE call")  # as autovacuum has, on a store in use
        count = "SELECT idx_tup_fetch + seq_tup_read FROM pg_stat_xact_user_tables WHERE relname = 'call'"
        with database.atomic():  # the transaction's own counts
            before = database.execute_sql(count).fetchone()[0]
            assert len(CallRecords.overdue(T0 - dt.timedelta(days=1), limit=50)) == 50
            return int(database.execute_sql(count).fetchone()[0] - before)

    small = rows_read_by_a_page(200)
    large = rows_read_by_a_page(20_000)
    assert large <= 2 * small + 10, (small, large)


def test_calls_held_back_longer_than_the_grace_start_late_after_a_restart_not_missed(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any]) -> None:
    """An endpoint at its limit holds calls for 20 minutes while the dispatcher runs; the daemon is
    restarted (down a minute): they start, late. Only a dispatcher absent for longer than the grace (here
    the next restart, after 10 minutes down) makes them missed."""
    settings.schedule_grace, settings.max_in_flight, settings.calls_per_second = 300, 1000, 1000
    endpoint, _ = make_endpoint(max_in_flight=1, calls_per_second=1000)
    busy = FakeEngine()
    running = Dispatcher(settings, busy, CallRecords(Metrics()), clock=lambda: T0)  # type: ignore[arg-type]
    held = [add(endpoint, T0 - dt.timedelta(minutes=20)) for _ in range(3)]
    running.tick(T0 - dt.timedelta(minutes=20), 0.0)
    running.tick(T0, 1200.0)  # still at its limit: held back, the dispatcher running
    assert [c.id for c in busy.launched] == [held[0].id]
    Call.update(status="completed").where(Call.id == held[0].id).execute()  # ended while the daemon was down

    after_a_minute = T0 + dt.timedelta(minutes=1)
    engine = FakeEngine()
    restarted = Dispatcher(settings, engine, CallRecords(Metrics()), clock=lambda: after_a_minute)  # type: ignore[arg-type]
    assert restarted.recover(after_a_minute) == 0
    assert [Call.get_by_id(c.id).status for c in held[1:]] == ["scheduled", "scheduled"]
    restarted.tick(after_a_minute, 0.0)
    assert [c.id for c in engine.launched] == [held[1].id]

    after_ten_minutes = after_a_minute + dt.timedelta(minutes=10)
    again = Dispatcher(settings, FakeEngine(), CallRecords(Metrics()), clock=lambda: after_ten_minutes)  # type: ignore[arg-type]
    assert again.recover(after_ten_minutes) == 1
    missed = Call.get_by_id(held[2].id)
    assert missed.status == "missed" and "grace 300 s" in missed.reason


def test_a_dispatcher_of_another_daemon_running_means_nothing_overdue_is_missed(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any]) -> None:
    """The store's heartbeat is any dispatcher's: a daemon starting beside a running one (a shared store)
    marks nothing missed that the running one holds back."""
    settings.schedule_grace = 300
    endpoint, _ = make_endpoint()
    overdue = add(endpoint, T0 - dt.timedelta(hours=1))
    other = CallRecords(Metrics(), owner="node-a")
    other.beat(T0 - dt.timedelta(seconds=3))
    starting = Dispatcher(settings, FakeEngine(), CallRecords(Metrics(), owner="node-b"),  # type: ignore[arg-type]
                          clock=lambda: T0)
    assert starting.recover(T0) == 0
    assert Call.get_by_id(overdue.id).status == "scheduled"
    # The latest note wins, even an earlier time: a clock stepped back is believed at once, rather than a
    # time in the future standing until it is reached.
    other.beat(T0 - dt.timedelta(hours=2))
    assert CallRecords(Metrics()).dispatcher_last_ran() == T0 - dt.timedelta(hours=2)


def test_a_claim_proves_a_dispatcher_ran_then(db: Any) -> None:
    """A call claimed three hours after it was due (held back all that time) whose daemon died before dialing
    it: taken over seconds later it is dialed, not missed; only a gap longer than the grace since the claim
    makes it missed (no heartbeat in this store: the claim is the only evidence)."""
    records = CallRecords(Metrics())
    due, claimed = T0 - dt.timedelta(hours=3), T0 - dt.timedelta(seconds=40)
    assert records.past_grace(due, now=T0, grace=300)  # nothing says a dispatcher ran since it was due
    assert not records.past_grace(due, now=T0, grace=300, claimed_at=claimed)
    assert records.past_grace(due, now=T0 + dt.timedelta(minutes=10), grace=300, claimed_at=claimed)


def test_the_calls_of_a_disabled_endpoint_are_not_dialed(dispatcher: Dispatcher, fake_engine: FakeEngine,
                                                        make_endpoint: Callable[..., Any]) -> None:
    # Disabling is how an operator stops a leaked token or a runaway client: what it had scheduled or
    # queued must not ring anyone, and must not wait for ever either.
    stopped, _ = make_endpoint(name="stopped", max_in_flight=100, calls_per_second=1000)
    other, _ = make_endpoint(name="other", max_in_flight=100, calls_per_second=1000)
    held = [add(stopped, T0 - dt.timedelta(seconds=1)), add(stopped, T0 + dt.timedelta(minutes=5))]
    kept = add(other, T0)
    disable_endpoint(Endpoint.get_by_id(stopped.id))
    dispatcher.tick(T0, 0.0)
    dispatcher.tick(T0 + dt.timedelta(minutes=5), 0.0)
    assert [call.id for call in fake_engine.launched] == [kept.id]
    for call in held:
        ended = Call.get_by_id(call.id)
        assert (ended.status, ended.reason) == ("failed", "the endpoint was disabled before the call started")


def test_daily_cap_refuses_beyond_the_cap(dispatcher: Dispatcher, fake_engine: FakeEngine,
                                          make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint(daily_cap=2, max_in_flight=100, calls_per_second=1000)
    calls = [add(endpoint, T0) for _ in range(3)]
    dispatcher.tick(T0, 0.0)
    assert len(fake_engine.launched) == 2
    refused = Call.get_by_id(calls[2].id)
    assert refused.status == "failed" and "daily cap" in refused.reason


def test_nothing_starts_while_freeswitch_is_unreachable(dispatcher: Dispatcher, fake_engine: FakeEngine,
                                                        make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    add(endpoint, T0)
    fake_engine.ready = False
    dispatcher.tick(T0, 0.0)
    assert fake_engine.launched == []


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10)
    assert sum(bucket.take(0.0) for _ in range(20)) == 10
    assert not bucket.take(0.05)
    assert bucket.take(0.1)


def _queue(endpoint: Endpoint, count: int) -> None:
    insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550000001",
                        "phone_b": "15550000002", "due_at": T0 - dt.timedelta(seconds=60), "scheduled": True,
                        "status": "scheduled"} for _ in range(count)))


def _count_rows_read(dispatcher: Dispatcher, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    pages: list[int] = []
    due = dispatcher.records.due

    def counted(now: dt.datetime, **options: Any) -> list[Call]:
        page = due(now, **options)
        pages.append(len(page))
        return page

    monkeypatch.setattr(dispatcher.records, "due", counted)
    return pages


def test_a_saturated_endpoint_with_a_long_queue_neither_starves_others_nor_spins(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    busy, _ = make_endpoint(max_in_flight=2, calls_per_second=1000)
    other, _ = make_endpoint(max_in_flight=5, calls_per_second=1000)
    _queue(busy, 700)
    theirs = add(other, T0)
    wait = dispatcher.tick(T0, 0.0)
    assert [c.endpoint_id for c in fake_engine.launched].count(busy.id) == 2
    assert fake_engine.launched[-1].id == theirs.id
    assert wait > 0  # nothing more can start now: sleep until woken, do not spin


def test_new_calls_start_only_as_fast_as_the_switch_admits_sessions(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    fake_engine.capacity.learn_limits(sps=6, max_sessions=1000)  # 5 a tick, 4 with the margin: 2 new calls
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    calls = [add(endpoint, T0 - dt.timedelta(seconds=10 - i)) for i in range(5)]
    wait = dispatcher.tick(T0, 0.0)
    assert [c.id for c in fake_engine.launched] == [calls[0].id, calls[1].id]
    assert wait == pytest.approx(1.0)
    assert {Call.get_by_id(c.id).status for c in calls[2:]} == {"scheduled"}  # still pending, unclaimed
    fake_engine.now += 1.0
    dispatcher.tick(T0, 1.0)
    assert [c.id for c in fake_engine.launched] == [c.id for c in calls[:4]]  # in due order


def test_a_tick_reads_no_more_due_calls_than_the_switch_has_room_for(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A thousand calls queued behind a switch that admits two a second: each tick reads a page the size
    of the room (and a few to spare), not hundreds of rows it cannot start; none at all while it is full."""
    fake_engine.capacity.learn_limits(sps=6, max_sessions=1000)  # room for 2 new calls a second
    endpoint, _ = make_endpoint(max_in_flight=5000, calls_per_second=1000)
    _queue(endpoint, 1000)
    pages = _count_rows_read(dispatcher, monkeypatch)
    assert dispatcher.tick(T0, 0.0) == pytest.approx(1.0)
    assert len(fake_engine.launched) == 2 and pages and max(pages) <= 2 + 2
    pages.clear()
    assert dispatcher.tick(T0, 0.0) == pytest.approx(1.0) and pages == []  # full this second: nothing read
    fake_engine.now += 1.0
    dispatcher.tick(T0, 1.0)
    assert len(fake_engine.launched) == 4 and max(pages) <= 2 + 2


def test_a_backlog_held_back_by_the_operators_cap_is_not_read_at_every_tick(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A thousand calls queued behind the daemon's own calls per second, on a big switch: a tick reads
    what the cap lets start (and a few to spare), and nothing while the cap has no call left this second.
    Reading the backlog at every tick (a create, a call's end) made a burst of creates cost the daemon
    the whole backlog's rows each time, and the API waited behind it."""
    fake_engine.capacity.learn_limits(sps=2000, max_sessions=5000)
    dispatcher.global_rate = TokenBucket(rate=3)
    endpoint, _ = make_endpoint(max_in_flight=5000, calls_per_second=1000)
    _queue(endpoint, 1000)
    pages = _count_rows_read(dispatcher, monkeypatch)
    wait = dispatcher.tick(T0, 0.0)
    assert len(fake_engine.launched) == 3 and sum(pages) <= 3 + 2
    assert wait == pytest.approx(1 / 3)
    pages.clear()
    assert dispatcher.tick(T0, 0.1) > 0 and pages == []  # the cap's calls of this second are used up
    dispatcher.tick(T0, 0.4)
    assert len(fake_engine.launched) == 4 and sum(pages) <= 1 + 2
    assert [c.id for c in fake_engine.launched] == sorted(c.id for c in fake_engine.launched)  # in due order


@pytest.mark.parametrize("limit", ["calls_per_second", "max_in_flight"])
def test_an_endpoint_at_its_limit_with_a_long_queue_costs_a_tick_a_few_rows_not_its_queue(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch, limit: str) -> None:
    """An endpoint's own limits (5 calls a second and 10 at once by default) hold most of a burst back
    while the switch has room: a tick then reads a few of its rows, skips it, and goes on to the others."""
    fake_engine.capacity.learn_limits(sps=2000, max_sessions=5000)
    options = {"calls_per_second": 2, "max_in_flight": 1000} if limit == "calls_per_second" \
        else {"calls_per_second": 1000, "max_in_flight": 2}
    busy, _ = make_endpoint(**options)
    _queue(busy, 1000)
    other, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    theirs = add(other, T0)
    pages = _count_rows_read(dispatcher, monkeypatch)
    dispatcher.tick(T0, 0.0)
    assert [c.endpoint_id for c in fake_engine.launched] == [busy.id, busy.id, other.id]
    assert fake_engine.launched[-1].id == theirs.id
    assert sum(pages) <= 32, pages
    pages.clear()
    dispatcher.tick(T0, 0.1)  # at its limit from the start of the tick
    assert len(fake_engine.launched) == 3 and sum(pages) <= 16, pages


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
@pytest.mark.parametrize("limit", ["calls_per_second", "max_in_flight"])
def test_a_campaign_queued_behind_its_endpoints_limit_costs_a_tick_the_same_at_any_length(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any], db: Any,
        limit: str) -> None:
    """Its calls come first in due order, and the tick that skips them must still find the next endpoint's
    call: not by walking past every one of them (20,000 cost a tick a hundred times the work of 200)."""
    fake_engine.capacity.learn_limits(sps=2000, max_sessions=5000)
    options = {"calls_per_second": 2, "max_in_flight": 1000} if limit == "calls_per_second" \
        else {"calls_per_second": 1000, "max_in_flight": 1}
    campaign, _ = make_endpoint(**options)
    other, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    queued = 0

    def work_of_a_tick(backlog: int, mono: float) -> int:
        nonlocal queued
        _queue(campaign, backlog - queued)
        queued = backlog
        theirs = add(other, T0 - dt.timedelta(seconds=1))
        work = sqlite_work(lambda: dispatcher.tick(T0, mono))
        assert fake_engine.launched[-1].id == theirs.id  # the other endpoint's call started, the campaign's waited
        return work

    work_of_a_tick(500, 0.0)  # the campaign's first calls start: it is at its limit from now on
    small = work_of_a_tick(500, 0.1)
    large = work_of_a_tick(20_000, 0.2)
    assert large <= 2 * small + 10, (small, large)


def test_legs_of_calls_in_progress_go_before_new_calls(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    fake_engine.capacity.learn_limits(sps=2, max_sessions=1000)  # one a second
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    fake_engine.capacity.request("waiting-b", "b", fake_engine.now, lambda: None, not_before=fake_engine.now)
    add(endpoint, T0)
    assert dispatcher.tick(T0, 0.0) > 0 and fake_engine.launched == []


def test_without_an_operators_cap_only_the_switch_paces(settings: Settings, db: Any, fake_engine: FakeEngine,
                                                          make_endpoint: Callable[..., Any]) -> None:
    settings.calls_per_second = 0  # the default: no cap of the daemon's own
    settings.max_in_flight = 1000
    dispatcher = Dispatcher(settings, fake_engine, CallRecords(Metrics(), clock=lambda: T0),  # type: ignore[arg-type]
                            clock=lambda: T0)
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    for _ in range(40):
        add(endpoint, T0)
    dispatcher.tick(T0, 0.0)
    # Half of the switch's room (26 sessions a second): the other half is for the B legs of these calls.
    assert len(fake_engine.launched) == fake_engine.capacity.new_call_cap == 13


# -- several daemons on one PostgreSQL -----------------------------------------------------------

class CountingRecords(CallRecords):
    """CallRecords that remembers the claims it lost."""

    def __init__(self) -> None:
        super().__init__(Metrics(), clock=lambda: T0)
        self.lost: list[int] = []

    def claim(self, call: Call, *, a_uuid: str, b_uuid: str, now: dt.datetime, switch: str | None = None) -> bool:
        won = super().claim(call, a_uuid=a_uuid, b_uuid=b_uuid, now=now, switch=switch)
        if not won:
            self.lost.append(call.id)
        return won


@pytest.mark.stores("postgresql")
def test_two_daemons_ticking_at_once_take_different_calls_and_lose_no_claim(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any]) -> None:
    """Each daemon's page of due calls is locked while it claims (the other skips those rows), so the two
    never race for the same calls: no claim lost, none launched twice, each within its own limit."""
    endpoint, _ = make_endpoint(max_in_flight=1000, calls_per_second=1000)
    Call.insert_many([{"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550000001",
                       "phone_b": "15550000002", "due_at": T0 - dt.timedelta(seconds=n), "scheduled": True,
                       "status": "scheduled"} for n in range(100)]).execute()
    settings.calls_per_second = 1000
    settings.max_in_flight = 20
    engines = [FakeEngine(), FakeEngine()]
    for engine in engines:
        engine.capacity.learn_limits(sps=1000, max_sessions=10_000)  # a big switch: only the claims limit
    records = [CountingRecords(), CountingRecords()]
    daemons = [Dispatcher(settings, engine, rec, clock=lambda: T0)  # type: ignore[arg-type]
               for engine, rec in zip(engines, records, strict=True)]
    ticks = [gevent.spawn(daemon.tick, T0, 0.0) for daemon in daemons]
    gevent.joinall(ticks, timeout=60, raise_error=True)
    assert records[0].lost == [] and records[1].lost == []
    first, second = ({c.id for c in engine.launched} for engine in engines)
    assert len(first) == len(second) == 20 and not first & second
    assert Call.select().where(Call.status == "dialing_a").count() == 40


@pytest.mark.stores("postgresql")
def test_a_round_that_fails_before_its_commit_starts_nothing_and_the_next_tick_does(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    calls = [add(endpoint, T0) for _ in range(3)]
    dispatcher.tick(T0, 0.0)  # rolls the day: started_today counted from the store
    fake_engine.launched.clear()
    Call.update(status="scheduled").execute()
    original_append_event = records_module.append_event

    def failing_append_event(call: Any, kind: str, *args: Any, **detail: Any) -> Any:
        if kind == "claimed" and call == calls[2].id:
            raise OperationalError("the connection broke")
        return original_append_event(call, kind, *args, **detail)

    monkeypatch.setattr(records_module, "append_event", failing_append_event)
    started = dict(dispatcher.started_today)
    with pytest.raises(OperationalError):
        dispatcher.tick(T0, 0.0)
    assert fake_engine.launched == [] and dispatcher.started_today == started
    assert {c.status for c in Call.select()} == {"scheduled"}
    monkeypatch.setattr(records_module, "append_event", original_append_event)
    dispatcher.tick(T0, 0.0)
    assert sorted(c.id for c in fake_engine.launched) == [c.id for c in calls]


def test_new_calls_go_to_the_switch_with_the_most_room_and_it_is_stored_with_the_claim(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any]) -> None:
    engine = FakeEngine(switches=2)
    big, small = engine.switches
    big.capacity.learn_limits(sps=61, max_sessions=1000)  # 54 a second: 27 new calls
    small.capacity.learn_limits(sps=21, max_sessions=1000)  # 18 a second: 9 new calls
    settings.max_in_flight = 1000
    dispatcher = Dispatcher(settings, engine, CallRecords(Metrics(), clock=lambda: T0), clock=lambda: T0)  # type: ignore[arg-type]
    endpoint, _ = make_endpoint(max_in_flight=1000, calls_per_second=1000)
    calls = [add(endpoint, T0 - dt.timedelta(seconds=100 - n)) for n in range(60)]
    assert dispatcher.tick(T0, 0.0) > 0  # both full for this second
    on = Counter(engine.launched_on)
    assert on == {big.name: 27, small.name: 9}  # each up to its own room, none beyond
    # the bigger one first, until its room is down to the smaller one's; then turn about
    assert engine.launched_on[:18] == [big.name] * 18
    assert set(engine.launched_on[18:20]) == {big.name, small.name}
    stored = {c.id: c.switch for c in Call.select().where(Call.status == "dialing_a")}
    assert [stored[c.id] for c in engine.launched] == engine.launched_on
    assert all(c.id not in stored for c in calls[36:])


def test_a_switch_not_reachable_gets_no_new_calls_and_with_none_calls_wait(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any]) -> None:
    engine = FakeEngine(switches=2)
    first, second = engine.switches
    settings.max_in_flight = 1000
    dispatcher = Dispatcher(settings, engine, CallRecords(Metrics(), clock=lambda: T0), clock=lambda: T0)  # type: ignore[arg-type]
    endpoint, _ = make_endpoint(max_in_flight=1000, calls_per_second=1000)
    for n in range(5):
        add(endpoint, T0 - dt.timedelta(seconds=10 - n))
    first.ready = False
    dispatcher.tick(T0, 0.0)
    assert engine.launched_on == [second.name] * 5
    second.ready = False
    late = add(endpoint, T0)
    dispatcher.tick(T0, 1.0)
    assert len(engine.launched) == 5 and Call.get_by_id(late.id).status == "scheduled"
    first.ready = True
    engine.now += 1.0
    dispatcher.tick(T0, 2.0)
    assert engine.launched_on[-1] == first.name and engine.launched[-1].id == late.id


def test_on_equal_room_the_switch_with_fewer_sessions_takes_the_call() -> None:
    engine = FakeEngine(switches=3)
    busy, quiet, other = engine.switches
    busy.capacity.learn_status("400 session(s) - peak 400, last 5min 400\n")
    quiet.capacity.learn_status("10 session(s) - peak 10, last 5min 10\n")
    other.capacity.learn_status("50 session(s) - peak 50, last 5min 50\n")
    switch, wait = engine.pick_switch(engine.now)
    assert switch is quiet and wait == 0
    busy.capacity.learn_status("895 session(s) - peak 895, last 5min 895\n")  # 5 below its 900
    quiet.ready = other.ready = False
    switch, wait = engine.pick_switch(engine.now)
    assert switch is busy  # room for 5 more sessions
    busy.capacity.learn_status("900 session(s) - peak 900, last 5min 900\n")
    switch, wait = engine.pick_switch(engine.now)
    assert switch is None and wait > 0  # full: the call waits, it is not sent to a switch that is away


def test_the_rate_limits_clock_is_monotonic_not_the_wall_clock(settings: Settings, db: Any,
                                                                fake_engine: FakeEngine) -> None:
    """The token buckets measure time elapsed between starts: on a clock that NTP can step back (gevent's
    ``loop.now()`` under libev is wall-clock time), a step back of an hour left every endpoint's bucket an
    hour's worth of tokens in debt, and its calls held back for that hour."""
    dispatcher = Dispatcher(settings, fake_engine, CallRecords(Metrics()))  # type: ignore[arg-type]
    before = time.monotonic()
    seen = dispatcher.monotonic()
    assert before <= seen <= time.monotonic()


def test_the_wait_after_a_tick_counts_from_its_end_not_its_start(
        settings: Settings, db: Any, fake_engine: FakeEngine, make_endpoint: Callable[..., Any]) -> None:
    """A tick that took a while (durable claims, a busy store) must not then sleep the whole time from its
    start to the next call's due time: that call would start late by the tick's length."""
    clock = [T0]
    dispatcher = Dispatcher(settings, fake_engine, CallRecords(Metrics(), clock=lambda: clock[0]),  # type: ignore[arg-type]
                            clock=lambda: clock[0])
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    add(endpoint, T0)
    add(endpoint, T0 + dt.timedelta(seconds=1.5))
    launch = fake_engine.launch

    def slow_launch(call: Call, endpoint: Endpoint, **options: Any) -> None:
        launch(call, endpoint, **options)
        clock[0] += dt.timedelta(seconds=1)  # the tick's claims took a second

    fake_engine.launch = slow_launch  # type: ignore[method-assign]
    assert dispatcher.tick(T0, 0.0) == pytest.approx(0.5)


@pytest.mark.stores("sqlite")
def test_a_ticks_claims_share_a_commit_and_each_call_starts_once_its_claim_is_on_disk(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any],
        writer: ThreadWriter) -> None:
    """One waited commit per claim held the tick (and a burst of due calls) to the disk's pace: the claims
    now go to the writer together. No call is launched before its claim is committed, and until then the
    calls count as in flight (a second tick claims nothing twice)."""
    endpoint, _ = make_endpoint(calls_per_second=1000, max_in_flight=100)
    calls = [add(endpoint, T0 - dt.timedelta(seconds=1)) for _ in range(10)]  # the switch takes 13 a second
    groups = writer.groups
    dispatcher.tick(T0, 0.0)
    dispatcher.tick(T0, 0.0)  # before any commit: the same calls are not claimed again
    assert fake_engine.launched == [] and dispatcher._in_flight() == 10
    assert wait_for(lambda: len(fake_engine.launched) == 10, 10)
    assert sorted(c.id for c in fake_engine.launched) == sorted(c.id for c in calls)
    assert {c.status for c in Call.select()} == {CallStatus.DIALING_A.value}
    assert writer.groups - groups <= 3  # not one per claim
    assert dispatcher._in_flight() == 10 and not dispatcher._claiming


@pytest.mark.stores("sqlite")
def test_a_call_canceled_before_its_claim_is_committed_is_never_started_and_gives_its_place_back(
        dispatcher: Dispatcher, fake_engine: FakeEngine, make_endpoint: Callable[..., Any],
        writer: ThreadWriter) -> None:
    endpoint, _ = make_endpoint(calls_per_second=1000, max_in_flight=100)
    call = add(endpoint, T0 - dt.timedelta(seconds=1))
    gate = real_lock()
    gate.acquire()
    writer.submit(lambda: gate.acquire(), durable=False)  # the writer thread waits at the gate
    records = CallRecords(Metrics(), clock=lambda: T0)
    cancel = gevent.spawn(records.cancel, call, endpoint, now=T0)
    gevent.sleep(0)  # the cancel is queued (not committed: the tick still reads the call as due)
    dispatcher.tick(T0, 0.0)
    assert dispatcher._in_flight() == 1 and fake_engine.capacity.pending == 1  # its A's room is held
    gate.release()
    canceled = cancel.get(timeout=10)
    assert canceled.status == CallStatus.CANCELED.value
    assert wait_for(lambda: not dispatcher._claiming_calls, 10)
    assert fake_engine.launched == [] and dispatcher._in_flight() == 0
    assert fake_engine.capacity.pending == 0 and dispatcher.started_today.get(endpoint.id, 0) == 0
    assert Call.get_by_id(call.id).status == CallStatus.CANCELED.value


@pytest.mark.stores("sqlite")
def test_a_claim_whose_after_commit_work_raises_does_not_hold_its_endpoint_s_place_for_good(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any], writer: ThreadWriter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault in what runs once a claim is committed (its log line, its metrics) must still tell the
    dispatcher how the claim ended: the call is launched, and no longer counted as being claimed. Before, it
    stayed counted for good, held its endpoint's place (here its one call in flight) and was never
    launched."""
    settings.calls_per_second = settings.max_in_flight = 1000
    engine = FakeEngine()
    dispatcher = Dispatcher(settings, engine, CallRecords(Metrics(), clock=lambda: T0), clock=lambda: T0)  # type: ignore[arg-type]
    endpoint, _ = make_endpoint(calls_per_second=1000, max_in_flight=1)
    first = add(endpoint, T0 - dt.timedelta(seconds=2))
    log_event = records_module.log_event

    def failing_once(logger: Any, name: str, *args: Any, **fields: Any) -> None:
        if name == "claimed" and not failed:
            failed.append(name)
            raise ValueError("a fault after the claim's commit")
        log_event(logger, name, *args, **fields)

    failed: list[str] = []
    monkeypatch.setattr(records_module, "log_event", failing_once)
    dispatcher.tick(T0, 0.0)
    writer.flush()
    assert failed and Call.get_by_id(first.id).status == "dialing_a"
    assert wait_for(lambda: [c.id for c in engine.launched] == [first.id], timeout=10)  # the claim was committed
    assert not dispatcher._claiming and not dispatcher._claiming_calls
