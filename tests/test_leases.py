"""Ownership of calls in flight: the claim's lease, its renewal, takeover after it ran out, adoption at
start (a daemon's own and expired calls only, on a shared store), and an endpoint's limits counted across
two daemons sharing one PostgreSQL."""

from __future__ import annotations

import datetime as dt
import secrets
import uuid
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import pytest
from peewee import OperationalError

import daemon.calls.records as records_module
from daemon.calls.dispatcher import Dispatcher
from daemon.calls.leases import Leases, new_instance_id
from daemon.calls.records import CallRecords, NotOwned
from daemon.config import Settings, switch_sent_to
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallEvent, CallStatus, Endpoint
from tests.test_dispatcher import FakeEngine, FakeSwitch
from tests.test_sequence import wait_until

pytestmark = pytest.mark.stores("sqlite", "postgresql")

T0 = dt.datetime(2026, 3, 1, 9, 0, 0)
LEASE = dt.timedelta(seconds=30)


@pytest.fixture(autouse=True)
def daemons_writer(store_kind: str, request: pytest.FixtureRequest) -> None:
    """On PostgreSQL the writer a daemon runs with (its steps queued and committed in groups): the lost-lease
    tests below are its guard. (SQLite's daemon writer has its own tests; one daemon owns every call there.)"""
    if store_kind == "postgresql":
        request.getfixturevalue("group_writer")


def daemon(name: str, now: Callable[[], dt.datetime] = lambda: T0) -> CallRecords:
    return CallRecords(Metrics(), clock=now, owner=name, lease_seconds=LEASE.total_seconds())


def lease_events(records: CallRecords) -> dict[str, int]:
    """``callbridge_lease_events_total`` by event, as /metrics shows it."""
    return {event: int(records.metrics.registry.get_sample_value("callbridge_lease_events_total", {"event": event})
                       or 0) for event in ("taken_over", "lost", "released", "held")}


def in_flight(endpoint: Endpoint, *, owner: str | None, lease_until: dt.datetime | None,
              status: CallStatus = CallStatus.BRIDGED) -> Call:
    """A call as a daemon leaves it running: claimed, legs known, owned, its lease until ``lease_until``."""
    return Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a="15550000001",
                       phone_b="15550000002", due_at=T0 - dt.timedelta(minutes=1), status=status.value,
                       a_uuid=secrets.token_hex(16), b_uuid=secrets.token_hex(16), started_at=T0 - LEASE,
                       owner=owner, lease_until=lease_until)


def pending(endpoint: Endpoint, due: dt.datetime = T0) -> Call:
    return Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a="15550000001",
                       phone_b="15550000002", due_at=due, scheduled=True, status="scheduled")


def test_an_instance_id_is_made_from_the_host_the_pid_and_a_random_part() -> None:
    first, second = new_instance_id(), new_instance_id()
    assert first != second and len(first) <= 100
    assert Settings(instance_id=first).instance_id == first


def test_a_claim_writes_its_owner_and_lease_and_renewal_extends_only_this_daemons(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    mine, other = daemon("node-a"), daemon("node-b")
    call = pending(endpoint)
    assert mine.claim(call, a_uuid="a", b_uuid="b", now=T0)
    stored = Call.get_by_id(call.id)
    assert (stored.owner, stored.lease_until) == ("node-a", T0 + LEASE)
    theirs = in_flight(endpoint, owner="node-b", lease_until=T0 + LEASE)
    later = T0 + dt.timedelta(seconds=10)
    assert mine.renew_leases([call.id], now=later) == set()
    assert Call.get_by_id(call.id).lease_until == later + LEASE
    # A call this daemon still follows but another took over while it stalled: reported lost, left alone.
    assert mine.renew_leases([call.id, theirs.id], now=later) == {theirs.id}
    assert Call.get_by_id(theirs.id).lease_until == T0 + LEASE
    assert other.renew_leases([], now=later) == set()


def test_an_expired_lease_is_taken_over_once_and_a_live_one_never(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]], store_kind: str) -> None:
    endpoint, _ = make_endpoint()
    dead = in_flight(endpoint, owner="node-dead", lease_until=T0 - dt.timedelta(seconds=1))
    live = in_flight(endpoint, owner="node-live", lease_until=T0 + dt.timedelta(seconds=1))
    b, c = daemon("node-b"), daemon("node-c")
    expired = b.expired_leases(now=T0)
    assert [x.id for x in expired] == [dead.id]
    # Both read the same expired call; each tries the conditional UPDATE on the old owner: one wins.
    seen_by_b, seen_by_c = b.expired_leases(now=T0)[0], c.expired_leases(now=T0)[0]
    won = [b.take_over(seen_by_b, now=T0), c.take_over(seen_by_c, now=T0)]
    assert won == [True, False]
    stored = Call.get_by_id(dead.id)
    assert (stored.owner, stored.lease_until) == ("node-b", T0 + LEASE)
    assert b.expired_leases(now=T0) == []
    if store_kind == "postgresql":  # a shared store: a live daemon's call is never taken
        assert not c.take_over(Call.get_by_id(live.id), now=T0)
        assert Call.get_by_id(live.id).owner == "node-live"


def test_expired_leases_leave_out_the_calls_this_daemon_follows_and_still_fill_a_page(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    expired = [in_flight(endpoint, owner="node-a", lease_until=T0 - dt.timedelta(seconds=1)) for _ in range(5)]
    followed = {call.id for call in expired[:3]}  # node-a's own, its renewal not through yet
    a = daemon("node-a")
    assert [call.id for call in a.expired_leases(now=T0, exclude=followed, limit=2)] == [c.id for c in expired[3:]]
    assert [call.id for call in a.expired_leases(now=T0, exclude=followed, limit=1)] == [expired[3].id]
    assert a.expired_leases(now=T0, exclude={c.id for c in expired}, limit=2) == []


@pytest.mark.stores("postgresql")
def test_daemons_whose_clocks_differ_judge_leases_by_the_stores_clock(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """node-b's host clock runs a minute ahead of the database server's (node-a's is right): by its own clock
    node-a's live call looked expired, and it was taken over (then let go by node-a: changing hands for
    nothing). Moved into the server's time by the offset its renewals measure, it waits for the real end."""
    endpoint, _ = make_endpoint()
    ahead = dt.timedelta(seconds=60)
    a, b = daemon("node-a"), daemon("node-b")
    b.clock_offset = -ahead  # the server's clock minus node-b's
    live = in_flight(endpoint, owner="node-a", lease_until=T0 + LEASE)  # renewed by node-a at T0
    assert b.expired_leases(now=T0 + ahead) == []
    assert not b.take_over(Call.get_by_id(live.id), now=T0 + ahead)
    a.renew_leases([live.id], now=T0 + LEASE / 3)  # node-a's next renewal, on time
    assert Call.get_by_id(live.id).lease_until == T0 + LEASE / 3 + LEASE
    # node-a dies; a lease after its last renewal, node-b takes the call over, its lease in the server's time.
    dead_for = T0 + LEASE / 3 + LEASE + dt.timedelta(seconds=1)
    assert b.expired_leases(now=dead_for) == []  # node-b's clock reads that a minute before the server does
    [expired] = b.expired_leases(now=dead_for + ahead)
    assert b.take_over(expired, now=dead_for + ahead)
    stored = Call.get_by_id(live.id)
    assert (stored.owner, stored.lease_until) == ("node-b", dead_for + LEASE)


@pytest.mark.stores("postgresql")
def test_daemons_racing_for_expired_calls_each_take_different_ones_and_none_twice(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    calls = [in_flight(endpoint, owner="node-dead", lease_until=T0 - dt.timedelta(seconds=5)) for _ in range(30)]
    daemons = [daemon(f"node-{n}") for n in range(3)]

    def grab(records: CallRecords) -> list[int]:
        taken = []
        for call in records.expired_leases(now=T0):
            if records.take_over(call, now=T0):
                taken.append(call.id)
            gevent.sleep(0)
        return taken

    runs = [gevent.spawn(grab, records) for records in daemons]
    gevent.joinall(runs, timeout=60, raise_error=True)
    taken = [call_id for run in runs for call_id in run.value]
    assert sorted(taken) == sorted(c.id for c in calls)  # every one, each by exactly one daemon
    owners = {c.owner for c in Call.select()}
    assert owners <= {"node-0", "node-1", "node-2"}


def test_at_start_a_daemon_takes_its_own_and_expired_calls_and_on_sqlite_every_one(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]], store_kind: str) -> None:
    endpoint, _ = make_endpoint()
    own = in_flight(endpoint, owner="node-a", lease_until=T0 + LEASE)  # a previous run of node-a
    expired = in_flight(endpoint, owner="node-dead", lease_until=T0 - dt.timedelta(seconds=1))
    unowned = in_flight(endpoint, owner=None, lease_until=None)  # left in flight before leases existed
    live = in_flight(endpoint, owner="node-live", lease_until=T0 + dt.timedelta(seconds=5))
    finished = in_flight(endpoint, owner="node-dead", lease_until=None, status=CallStatus.COMPLETED)
    taken = {c.id for c in daemon("node-a").left_in_flight(now=T0)}
    if store_kind == "postgresql":
        assert taken == {own.id, expired.id, unowned.id}
        assert Call.get_by_id(live.id).owner == "node-live"
    else:  # one daemon on SQLite: whatever is in flight is its own
        assert taken == {own.id, expired.id, unowned.id, live.id}
    assert finished.id not in taken
    assert {c.owner for c in Call.select().where(Call.id.in_(taken))} == {"node-a"}


def test_the_in_flight_gauge_counts_a_call_taken_over_while_it_is_followed_and_not_after(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """A call adopted at start (or taken over from a dead daemon) is in progress here: /metrics counts it,
    and its end takes it off again (never below zero, as the phase it ends in was never counted)."""
    endpoint, _ = make_endpoint()
    in_flight(endpoint, owner="node-a", lease_until=T0 + LEASE)  # left bridged by a previous run
    records = daemon("node-a")
    gauge = records.metrics.calls_in_flight
    [call] = records.left_in_flight(now=T0)
    assert gauge.labels("bridged")._value.get() == 1
    assert records.take_over(call, now=T0)  # taken again (its sequence gave up on a store outage): once
    assert gauge.labels("bridged")._value.get() == 1
    records.finish(call, CallStatus.COMPLETED, at=T0)
    records.flush()
    assert gauge.labels("bridged")._value.get() == 0


def test_the_in_flight_gauge_forgets_a_call_this_daemon_no_longer_follows(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """Another daemon took the call over (this one stalled past its lease): it is in progress there, not here."""
    endpoint, _ = make_endpoint()
    records = daemon("node-a")
    call = pending(endpoint)
    assert records.claim(call, a_uuid="a", b_uuid="b", now=T0)
    records.flush()
    gauge = records.metrics.calls_in_flight
    assert gauge.labels("dialing_a")._value.get() == 1
    records.stopped_following(call)
    assert gauge.labels("dialing_a")._value.get() == 0
    records.finish(call, CallStatus.FAILED, at=T0)  # a late step of the sequence: not counted again
    records.flush()
    assert gauge.labels("dialing_a")._value.get() == 0


def test_stopping_ends_the_leases_so_another_daemon_takes_over_at_once(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    mine = [in_flight(endpoint, owner="node-a", lease_until=T0 + LEASE) for _ in range(2)]
    theirs = in_flight(endpoint, owner="node-b", lease_until=T0 + LEASE)
    assert daemon("node-a").release_leases([c.id for c in mine] + [theirs.id], now=T0) == 2
    later = T0 + dt.timedelta(seconds=1)
    assert {c.id for c in daemon("node-c").expired_leases(now=later)} == {c.id for c in mine}


def test_renewal_and_release_take_more_calls_than_a_statement_takes_parameters(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """A daemon following more calls than PostgreSQL takes parameters in one statement (65,535: the ids used
    to be one each) renews and ends all their leases, and still tells which another daemon took over."""
    endpoint, _ = make_endpoint()
    n = 66_000
    first = in_flight(endpoint, owner="node-a", lease_until=T0 + LEASE)
    columns = [field.column_name for field in Call._meta.sorted_fields if field.name not in ("id", "callid")]
    listed = ", ".join(f'"{column}"' for column in columns)
    Call._meta.database.execute_sql(  # its copies, made by the store itself: inserting 66,000 rows from Python is slow
        f'WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {n - 1}) '
        f'INSERT INTO "call" ("callid", {listed}) SELECT \'bulk\' || n.i, {listed} FROM "call", n '
        f'WHERE "call"."id" = {first.id}')
    ids = [row_id for (row_id,) in Call.select(Call.id).where(Call.owner == "node-a").tuples()]
    taken = ids[-1]
    Call.update(owner="node-b").where(Call.id == taken).execute()
    later = T0 + dt.timedelta(seconds=10)
    assert daemon("node-a").renew_leases(ids, now=later) == {taken}
    renewed = Call.select().where((Call.owner == "node-a") & (Call.lease_until == later + LEASE)).count()
    assert renewed == n - 1
    assert daemon("node-a").release_leases(ids, now=later) == n - 1
    assert Call.select().where(Call.lease_until == later).count() == n - 1


class AdoptingEngine(FakeEngine):
    """The engine's side of leases: the calls it follows, adopts and lets go of."""

    def __init__(self) -> None:
        super().__init__()
        self.active: dict[int, Any] = {}
        self.adopted: list[tuple[int, str]] = []
        self.let_go_of: list[int] = []

    def link_of(self, call: Call) -> Any:
        return switch_sent_to(self.switches, call.switch)

    def adopt(self, call: Call, *, note: str) -> None:
        self.adopted.append((call.id, note))
        self.active[call.id] = call

    def let_go(self, call_ids: Any, *, note: str) -> None:
        for call_id in call_ids:
            self.let_go_of.append(call_id)
            self.active.pop(call_id, None)


def test_the_lease_keeper_renews_takes_over_and_lets_go(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    engine = AdoptingEngine()
    records = daemon("node-a")
    keeper = Leases(settings, engine, records)  # type: ignore[arg-type]
    assert keeper.period == settings.lease_seconds / 3
    followed = in_flight(endpoint, owner="node-a", lease_until=T0 + dt.timedelta(seconds=2))
    engine.active[followed.id] = followed
    orphan = in_flight(endpoint, owner="node-dead", lease_until=T0 - dt.timedelta(seconds=1))
    stolen = in_flight(endpoint, owner="node-b", lease_until=T0 + LEASE)  # node-b took it while we stalled
    engine.active[stolen.id] = stolen
    engine.ready = False
    assert keeper.tick(T0) == keeper.period
    assert engine.adopted == []  # no switch: nothing taken over, to be followed by a daemon that has one
    assert engine.let_go_of == [stolen.id]
    assert Call.get_by_id(followed.id).lease_until == T0 + LEASE
    engine.ready = True
    keeper.tick(T0)
    assert [call_id for call_id, _ in engine.adopted] == [orphan.id]
    assert "taken over from node-dead" in engine.adopted[0][1]
    assert Call.get_by_id(orphan.id).owner == "node-a"
    keeper.tick(T0)
    assert len(engine.adopted) == 1 and Call.get_by_id(stolen.id).owner == "node-b"
    assert lease_events(records) == {"taken_over": 1, "lost": 1, "released": 0, "held": 0}


def test_after_renewals_missed_to_a_store_outage_nothing_is_taken_over_for_a_lease(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """The store was unreachable longer than a lease: every daemon's leases ran out, its own and the live
    ones'. The first to reach the store again took the others' calls (and what they had heard of them
    meanwhile was lost). Now it renews, gives the others a lease to renew theirs, and takes only what is
    still expired then: the calls of a daemon that really died."""
    endpoint, _ = make_endpoint()
    engine = AdoptingEngine()
    records = daemon("node-a")
    keeper = Leases(settings, engine, records)  # type: ignore[arg-type]
    keeper.tick(T0)  # a renewal the store took
    back = T0 + 2 * LEASE  # the store answers again after an outage of two leases
    live = in_flight(endpoint, owner="node-b", lease_until=T0 + LEASE)  # node-b is alive, could not renew
    dead = in_flight(endpoint, owner="node-dead", lease_until=T0 + LEASE)
    keeper.tick(back)
    assert engine.adopted == []
    Call.update(lease_until=back + LEASE / 3 + LEASE).where(Call.id == live.id).execute()  # node-b renews
    for third in (1, 2):  # the keeper's cadence: a third of a lease
        keeper.tick(back + LEASE * third / 3)
        assert engine.adopted == []
    keeper.tick(back + LEASE + dt.timedelta(seconds=1))
    assert [call_id for call_id, _ in engine.adopted] == [dead.id]
    assert Call.get_by_id(live.id).owner == "node-b"
    assert lease_events(records) == {"taken_over": 1, "lost": 0, "released": 0, "held": 1}


def test_a_call_on_a_switch_this_daemon_lacks_or_cannot_reach_is_left_to_another_until_it_outlived_any_call(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """Daemons whose settings differ: a dead daemon's call on a switch this one does not have is left for
    a daemon that has it (failing it would leave a live call unfollowed), and one on a switch this daemon
    cannot reach now waits as the whole engine's calls do. Once the call has outlived any call (both rings
    and the endpoint's maximum duration since its lease ran out), no daemon with that switch is running:
    it is taken over, and the engine ends it."""
    endpoint, _ = make_endpoint(max_duration=600)
    engine = AdoptingEngine()
    engine.switches.append(FakeSwitch("10.0.0.12:8021"))
    engine.switches[1].ready = False
    keeper = Leases(settings, engine, daemon("node-a"))  # type: ignore[arg-type]
    expired = T0 - dt.timedelta(seconds=1)
    elsewhere = in_flight(endpoint, owner="node-dead", lease_until=expired)
    Call.update(switch="10.9.9.9:8021").where(Call.id == elsewhere.id).execute()
    unreachable = in_flight(endpoint, owner="node-dead", lease_until=expired)
    Call.update(switch="10.0.0.12:8021").where(Call.id == unreachable.id).execute()
    ours = in_flight(endpoint, owner="node-dead", lease_until=expired)

    keeper.take_over(T0)
    assert [call_id for call_id, _ in engine.adopted] == [ours.id]
    assert Call.get_by_id(elsewhere.id).owner == Call.get_by_id(unreachable.id).owner == "node-dead"

    life = 2 * settings.originate_timeout + 600
    keeper.take_over(T0 + dt.timedelta(seconds=life - 1))
    assert [call_id for call_id, _ in engine.adopted] == [ours.id]

    keeper.take_over(T0 + dt.timedelta(seconds=life + 1))
    assert sorted(call_id for call_id, _ in engine.adopted[1:]) == sorted([elsewhere.id, unreachable.id])
    assert Call.get_by_id(elsewhere.id).owner == Call.get_by_id(unreachable.id).owner == "node-a"


def test_a_call_on_a_switch_this_daemon_cannot_reach_now_is_taken_over_once_it_can(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint()
    engine = AdoptingEngine()
    engine.switches.append(FakeSwitch("10.0.0.12:8021"))
    engine.switches[1].ready = False
    keeper = Leases(settings, engine, daemon("node-a"))  # type: ignore[arg-type]
    call = in_flight(endpoint, owner="node-dead", lease_until=T0 - dt.timedelta(seconds=1))
    Call.update(switch="10.0.0.12:8021").where(Call.id == call.id).execute()
    keeper.take_over(T0)
    assert engine.adopted == []
    engine.switches[1].ready = True
    keeper.take_over(T0)
    assert [call_id for call_id, _ in engine.adopted] == [call.id]


# -- an endpoint's limits across two daemons on one PostgreSQL ---------------------------------------

def two_dispatchers(settings: Settings, clock: Callable[[], dt.datetime]) -> list[tuple[Dispatcher, FakeEngine]]:
    settings.calls_per_second = 1000
    settings.max_in_flight = 1000
    out = []
    for name in ("node-a", "node-b"):
        engine = FakeEngine()
        engine.capacity.learn_limits(sps=10_000, max_sessions=100_000)  # a big switch: only the endpoint limits
        out.append((Dispatcher(settings, engine, daemon(name, clock), clock=clock), engine))  # type: ignore[arg-type]
    return out


def tick_both(pair: list[tuple[Dispatcher, FakeEngine]], now: dt.datetime, mono: float = 0.0) -> None:
    ticks = [gevent.spawn(dispatcher.tick, now, mono) for dispatcher, _ in pair]
    gevent.joinall(ticks, timeout=60, raise_error=True)


@pytest.mark.stores("postgresql")
def test_an_endpoints_in_flight_limit_and_daily_cap_hold_across_two_daemons(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    limited, _ = make_endpoint(max_in_flight=5, calls_per_second=1000, daily_cap=1000)
    capped, _ = make_endpoint(max_in_flight=1000, calls_per_second=1000, daily_cap=7)
    for n in range(40):
        pending(limited, T0 - dt.timedelta(seconds=n))
        pending(capped, T0 - dt.timedelta(seconds=n))
    pair = two_dispatchers(settings, lambda: T0)
    tick_both(pair, T0)
    launched = [call for _, engine in pair for call in engine.launched]
    assert sum(c.endpoint_id == limited.id for c in launched) == 5  # not 5 per daemon
    assert sum(c.endpoint_id == capped.id for c in launched) == 7
    assert Call.select().where((Call.endpoint == capped.id) & (Call.status == "failed")).count() == 33
    # Two of the limited endpoint's calls end (on whichever daemon): two more start, across both.
    for call in [c for c in launched if c.endpoint_id == limited.id][:2]:
        next(engine for _, engine in pair if call in engine.launched).end(call)
    tick_both(pair, T0)
    running = Call.select().where((Call.endpoint == limited.id) & Call.status.in_(["dialing_a"])).count()
    assert running == 5


@pytest.mark.stores("postgresql")
def test_an_endpoints_calls_per_second_hold_across_two_daemons(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint, _ = make_endpoint(max_in_flight=1000, calls_per_second=3, daily_cap=1000)
    for n in range(20):
        pending(endpoint, T0 - dt.timedelta(seconds=n))
    now = [T0]
    pair = two_dispatchers(settings, lambda: now[0])
    tick_both(pair, now[0])
    assert sum(len(engine.launched) for _, engine in pair) == 3  # each daemon's bucket alone would allow 6
    waits = [dispatcher.tick(now[0] + dt.timedelta(seconds=0.5), 0.5) for dispatcher, _ in pair]
    assert sum(len(engine.launched) for _, engine in pair) == 3
    assert all(0 < wait <= 0.5 for wait in waits), waits  # the window's oldest start leaves it then
    now[0] = T0 + dt.timedelta(seconds=1)
    tick_both(pair, now[0], 1.0)
    assert sum(len(engine.launched) for _, engine in pair) == 6
    starts: list[dt.datetime] = [c.started_at for c in Call.select().where(Call.started_at.is_null(False))]
    assert max(sum(1 for s in starts if t <= s < t + dt.timedelta(seconds=1)) for t in starts) <= 3
    kinds = {e.kind for e in CallEvent.select()}
    assert "claimed" in kinds


@pytest.mark.stores("postgresql")
def test_a_daemon_that_lost_a_call_cannot_mark_it_sent_so_only_the_new_owner_dials_it(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """node-a claimed the call and stalled (waiting for its turn on the connection) past its lease; node-b
    took it over, found no mark and dials it. node-a's mark, which must precede its send, is refused: it
    never sends. The other order: a mark committed before the takeover is seen by the new owner, which
    then reconciles instead of dialing."""
    endpoint, _ = make_endpoint()
    stalled, other = daemon("node-a"), daemon("node-b", lambda: T0 + LEASE + dt.timedelta(seconds=1))
    call = pending(endpoint)
    assert stalled.claim(call, a_uuid="a-leg", b_uuid="b-leg", now=T0)
    taken = other.expired_leases(now=T0 + LEASE + dt.timedelta(seconds=1))
    assert [c.id for c in taken] == [call.id] and other.take_over(taken[0], now=T0 + LEASE + dt.timedelta(seconds=1))
    assert other.unsent_because(taken[0]) == "never sent to FreeSWITCH"  # the new owner dials it
    with pytest.raises(NotOwned):
        stalled.mark_dialing_a(call)
    assert other.unsent_because(taken[0]) == "never sent to FreeSWITCH"
    other.mark_dialing_a(taken[0])  # the owner's mark goes in, renewing its lease
    assert Call.get_by_id(call.id).lease_until == T0 + LEASE + dt.timedelta(seconds=1) + LEASE

    second = pending(endpoint)
    assert stalled.claim(second, a_uuid="a2", b_uuid="b2", now=T0)
    stalled.mark_dialing_a(second)  # sent, then node-a dies
    later = T0 + 3 * LEASE
    found = [c for c in other.expired_leases(now=later) if c.id == second.id]
    assert found and other.take_over(found[0], now=later)
    assert other.unsent_because(found[0]) is None  # reconciled by its UUIDs, never dialed again


@pytest.mark.stores("postgresql")
def test_a_daemon_starting_never_marks_missed_what_another_is_claiming(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """node-a's claim round holds overdue calls (held back by a limit for long, then claimed); node-b starts
    and marks the calls overdue beyond the grace missed: not those node-a holds, which stay claimed."""
    endpoint, _ = make_endpoint()
    old = [pending(endpoint, T0 - dt.timedelta(hours=1)) for _ in range(4)]
    settings.schedule_grace = 300
    claimer, starter = daemon("node-a"), daemon("node-b")
    holding, release = gevent.event.Event(), gevent.event.Event()

    def claim_two() -> None:
        with claimer.claim_round():
            for call in claimer.due(T0, limit=2):
                assert claimer.claim(call, a_uuid="a", b_uuid="b", now=T0)
            holding.set()
            release.wait(30)

    round_a = gevent.spawn(claim_two)
    assert holding.wait(30)
    dispatcher = Dispatcher(settings, FakeEngine(), starter, clock=lambda: T0)  # type: ignore[arg-type]
    assert dispatcher.recover(T0) == 2
    release.set()
    round_a.get(timeout=30)
    statuses = [Call.get_by_id(c.id).status for c in old]
    assert statuses == ["dialing_a", "dialing_a", "missed", "missed"]


def lost_to_another(endpoint: Endpoint) -> tuple[CallRecords, CallRecords, Call, Call]:
    """node-a claims a call, dials it, hears A answer and dials B, then stalls past its lease; node-b takes
    the call over. Returns both daemons' records and each one's copy of the call."""
    later = T0 + LEASE + dt.timedelta(seconds=1)
    stalled, other = daemon("node-a"), daemon("node-b", lambda: later)
    call = pending(endpoint)
    assert stalled.claim(call, a_uuid="a-leg", b_uuid="b-leg", now=T0)
    stalled.mark_dialing_a(call)
    stalled.a_answered(call, at=T0 + dt.timedelta(seconds=1))
    stalled.dialing_b(call, at=T0 + dt.timedelta(seconds=2))
    found = [c for c in other.expired_leases(now=later) if c.id == call.id]
    assert found and other.take_over(found[0], now=later)
    return stalled, other, call, found[0]


@pytest.mark.stores("postgresql")
def test_a_daemon_that_lost_a_call_cannot_rewrite_its_status_after_the_new_owner_ended_it(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """node-a claims and dials the call, then stalls past its lease (its store writes held up); node-b takes
    the call over and follows it to its end (completed). node-a's sequence, still running until its next
    lease renewal notices the loss, then writes what it saw: its late status changes must not land."""
    stalled, other, call, theirs = lost_to_another(make_endpoint()[0])
    later = T0 + LEASE + dt.timedelta(seconds=1)
    other.bridged(theirs, at=later, ring_seconds=1.0)
    other.finish(theirs, CallStatus.COMPLETED, at=later + dt.timedelta(seconds=5), talk_seconds=5.0)
    assert Call.get_by_id(call.id).status == "completed"

    # node-a wakes up and its sequence goes on with what it had queued (a bridge it heard before it
    # stalled), before its lease keeper's next renewal tells it the call is no longer its own.
    with pytest.raises(NotOwned):
        stalled.bridged(call, at=T0 + dt.timedelta(seconds=3), ring_seconds=1.0)
    stored = Call.get_by_id(call.id)
    steps = [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]
    assert (stored.status, stored.owner, steps[-2:]) == ("completed", "node-b", ["bridged", "completed"])


@pytest.mark.stores("postgresql")
def test_a_daemon_that_lost_a_call_writes_none_of_its_late_steps_while_the_new_owner_follows_it(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    stalled, other, call, theirs = lost_to_another(make_endpoint()[0])
    with pytest.raises(NotOwned):  # late, and no longer its call
        stalled.bridged(call, at=T0 + dt.timedelta(seconds=3), ring_seconds=1.0)
    stored = Call.get_by_id(call.id)
    steps = [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]
    assert (stored.status, stored.owner, "bridged" in steps) == ("dialing_b", "node-b", False)
    later = T0 + LEASE + dt.timedelta(seconds=2)
    other.bridged(theirs, at=later, ring_seconds=1.0)  # the owner's own steps go on
    assert Call.get_by_id(call.id).status == "bridged"


@pytest.mark.stores("postgresql")
def test_a_daemon_that_lost_a_call_cannot_write_a_second_final_status(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    stalled, other, call, theirs = lost_to_another(make_endpoint()[0])
    later = T0 + LEASE + dt.timedelta(seconds=1)
    other.finish(theirs, CallStatus.COMPLETED, at=later)
    # node-a, not yet told, ends the call its own way (e.g. it lost track of A while it stalled).
    with pytest.raises(NotOwned):
        stalled.finish(call, CallStatus.FAILED, at=later, reason="interrupted")
    stored = Call.get_by_id(call.id)
    kinds = [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]
    assert (stored.status, kinds.count("completed") + kinds.count("failed")) == ("completed", 1)


@pytest.mark.stores("postgresql")
def test_a_claim_that_fails_gives_back_the_switch_room_reserved_for_it(
        settings: Settings, db: Any, make_endpoint: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim the store refuses (the connection broke, a failover) rolls its round back: nothing started,
    and the switch's room reserved for its A must go back, or after a few such refusals the daemon never
    starts a call again."""
    settings.calls_per_second = 1000
    settings.max_in_flight = 1000
    engine = FakeEngine()
    engine.capacity.learn_limits(sps=4, max_sessions=1000)  # rate_cap 2: two new-call slots a second
    records = CallRecords(Metrics(), clock=lambda: T0)
    dispatcher = Dispatcher(settings, engine, records, clock=lambda: T0)  # type: ignore[arg-type]
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    call = pending(endpoint, T0)
    original = records_module.append_event
    failures = {"left": 2}

    def refusing(call_id: Any, kind: str, *args: Any, **detail: Any) -> Any:
        if kind == "claimed" and failures["left"] > 0:
            failures["left"] -= 1
            raise OperationalError("the connection broke")
        return original(call_id, kind, *args, **detail)

    monkeypatch.setattr(records_module, "append_event", refusing)
    for _ in range(2):  # two ticks, a few seconds apart, each refused by the store
        engine.now += 5.0
        with pytest.raises(OperationalError):
            dispatcher.tick(T0, engine.now)
    assert Call.get_by_id(call.id).status == "scheduled"
    # The store is fine again; much later the call is still due and the switch idle.
    engine.now += 60.0
    dispatcher.tick(T0, engine.now)
    assert Call.get_by_id(call.id).status == "dialing_a", "the due call never starts: the switch's room leaked"


@pytest.mark.stores("postgresql")
def test_a_daemon_gone_mid_claim_round_holds_no_call_or_endpoint_for_good(
        settings: Settings, db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """node-a's host vanishes (power, network) in the middle of a claim round: its session stays open on the
    server, holding the round's locks on the due calls and on their endpoint, and never sends another byte.
    node-b must still start every due call (the server ends the dead round), not wait on it for good."""
    endpoint, _ = make_endpoint(max_in_flight=100, calls_per_second=1000)
    calls = [pending(endpoint, T0 - dt.timedelta(seconds=n)) for n in range(6)]
    (_, _), (dispatcher, engine) = two_dispatchers(settings, lambda: T0)
    vanished, holding = daemon("node-a"), gevent.event.Event()

    def round_then_gone() -> None:
        with vanished.claim_round():
            page = vanished.due(T0, limit=2)
            vanished.lock_endpoints({call.endpoint_id for call in page})
            holding.set()
            gevent.sleep(3600)  # no more traffic from this host: its socket stays open on the server

    gone = gevent.spawn(round_then_gone)
    try:
        assert holding.wait(30)
        with gevent.Timeout(60, AssertionError("node-b's dispatcher waited on the dead round's locks")):
            while len(engine.launched) < len(calls):
                dispatcher.tick(T0, 0.0)
                gevent.sleep(0.1)
        assert sorted(c.id for c in engine.launched) == sorted(c.id for c in calls)
    finally:
        gone.kill()


@pytest.mark.stores("postgresql")
def test_a_daemon_that_lost_a_call_queues_nothing_on_a_when_it_hears_the_answer_late(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]], tmp_path: Any) -> None:
    """node-a dials A, then stalls (a GC pause, a long fsync) past its lease while A rings; node-b takes the
    call over and follows it: A's answer makes node-b queue the prompts and the bridge to B. node-a wakes
    with A's answer in its backlog before its lease keeper tells it the call is gone: it must not queue
    them too (A would hear every prompt twice and B would be dialed twice), nor touch the legs."""
    from tests.test_sequence import apps_sent, event

    endpoint, _ = make_endpoint()
    stalled, other = daemon("node-a"), daemon("node-b")
    call = pending(endpoint)
    assert stalled.claim(call, a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()), now=T0)
    sequence, switch = followed_by(stalled, call, endpoint, tmp_path)
    try:
        assert wait_until(lambda: any(c.startswith("bgapi originate") for c in switch.sent))
        later = T0 + 2 * LEASE
        assert other.take_over(Call.get_by_id(call.id), now=later)  # node-a stalled past its lease

        sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))  # node-a's backlog, heard late
        assert sequence.greenlet is not None
        sequence.greenlet.join(timeout=10)
        assert apps_sent(switch) == [], "the stalled daemon queued the call's apps on A beside the new owner"
        assert not [c for c in switch.sent if "uuid_kill" in c]
        stored = Call.get_by_id(call.id)
        assert (stored.owner, stored.status) == ("node-b", "dialing_a")
    finally:
        gevent.kill(sequence.greenlet)


def followed_by(records: CallRecords, call: Call, endpoint: Endpoint, tmp_path: Any) -> tuple[Any, Any]:
    """The call's sequence, as the daemon ``records`` belongs to runs it, on a scripted switch: started."""
    from daemon.calls.sequence import CallOptions, CallSequence
    from tests.test_sequence import ScriptedSwitch

    switch = ScriptedSwitch()
    options = CallOptions(originate_timeout=30, media_root=str(tmp_path), recordings_dir=str(tmp_path),
                          idle_check=30)
    sequence = CallSequence(call, endpoint, switch, records, options)  # type: ignore[arg-type]
    sequence.start()
    return sequence, switch


@pytest.mark.stores("postgresql")
def test_a_daemon_that_stalled_past_its_lease_sends_nothing_for_a_call_another_took_over(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]], tmp_path: Any) -> None:
    """node-a dials A, A answers and its apps are queued, then node-a stalls past its lease; node-b takes the
    call over. node-a wakes with the start of A's wait in its backlog, which would have it break the wait
    to dial B (node-b does that): having not renewed its leases in time, it asks whether the call is still
    its own before it acts on anything, and stops following it."""
    from tests.test_sequence import breaks, event, executes, wait_uuid

    endpoint, _ = make_endpoint()
    mono = [1000.0]
    stalled = CallRecords(Metrics(), clock=lambda: T0, owner="node-a", lease_seconds=LEASE.total_seconds(),
                          monotonic=lambda: mono[0])
    other = daemon("node-b")
    call = pending(endpoint)
    assert stalled.claim(call, a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()), now=T0)
    sequence, switch = followed_by(stalled, call, endpoint, tmp_path)
    try:
        sequence.deliver(event("CHANNEL_CREATE", sequence.a.uuid))
        sequence.deliver(event("CHANNEL_ANSWER", sequence.a.uuid))
        assert wait_until(lambda: sequence.apps_queued and Call.get_by_id(call.id).status == "a_answered")

        mono[0] += 2 * LEASE.total_seconds()  # node-a's loop stalled: no renewal for two leases
        assert other.take_over(Call.get_by_id(call.id), now=T0 + 2 * LEASE)
        sequence.deliver(executes(sequence.a.uuid, wait_uuid(sequence.a.uuid, 0)))  # heard late
        assert sequence.greenlet is not None
        sequence.greenlet.join(timeout=10)
        assert breaks(switch, sequence.a.uuid) == [], "the stalled daemon dialed B beside the new owner"
        assert sequence.greenlet.dead, "the stalled daemon still follows a call another daemon owns"
        assert Call.get_by_id(call.id).owner == "node-b"
    finally:
        gevent.kill(sequence.greenlet)


@pytest.mark.stores("postgresql")
def test_a_daemon_whose_store_does_not_answer_goes_on_with_its_calls(
        db: Any, make_endpoint: Callable[..., tuple[Endpoint, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewals stopped because the store is away (a failover): nobody can take a call over meanwhile, so a
    daemon that cannot confirm a call is still its own goes on with it; a definite no stops it."""
    endpoint, _ = make_endpoint()
    mono, now = [1000.0], [T0]
    records = CallRecords(Metrics(), clock=lambda: now[0], owner="node-a", lease_seconds=LEASE.total_seconds(),
                          monotonic=lambda: mono[0])
    call = in_flight(endpoint, owner="node-a", lease_until=T0 + LEASE)
    assert not records.lease_lapsed()
    mono[0] += LEASE.total_seconds()
    now[0] = T0 + LEASE
    assert records.lease_lapsed()

    class Away:
        def submit(self, *_: Any, **__: Any) -> Any:
            raise OperationalError("connection refused")

    with monkeypatch.context() as patched:
        patched.setattr(records_module, "writer", lambda: Away())
        records.hold(call)  # no answer: goes on
    records.hold(call)
    assert Call.get_by_id(call.id).lease_until == T0 + 2 * LEASE
    assert records.renew_leases([call.id], now=T0) == set() and not records.lease_lapsed()
    Call.update(owner="node-b").where(Call.id == call.id).execute()
    with pytest.raises(NotOwned):
        records.hold(call)
