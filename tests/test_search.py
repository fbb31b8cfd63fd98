"""Finding calls for a list (``GET /v1/calls``, the Calls page): every match exactly once, newest first,
page after page, and no page that walks the store."""

from __future__ import annotations

import datetime as dt
import random
import secrets
from collections.abc import Callable

import pytest

from daemon.calls import records, search
from daemon.calls.records import CallRecords
from daemon.calls.search import CallFilter, find_calls
from daemon.store import Call, Endpoint
from tests.conftest import insert_rows, sqlite_statements, sqlite_work

pytestmark = pytest.mark.stores("sqlite", "postgresql")

START = dt.datetime(2026, 6, 1, 0, 0, 0)
STATUSES = ("completed", "failed", "canceled", "scheduled")


def store_calls(endpoints: list[Endpoint], count: int, *, seed: int = 1, step: float = 60.0,
                jitter: float = 0.0) -> None:
    """``count`` calls spread over the endpoints, requested ``step`` seconds apart in the order they are
    stored, each up to ``jitter`` seconds out of that order (concurrent requests, clocks of several hosts)."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        at = START + dt.timedelta(seconds=i * step + rng.uniform(-jitter, jitter))
        rows.append({"callid": secrets.token_hex(14), "endpoint": rng.choice(endpoints).id,
                     "phone_a": f"1555{rng.randrange(10_000):04d}001", "phone_b": f"1666{rng.randrange(10_000):04d}",
                     "requested_at": at, "due_at": at, "status": rng.choice(STATUSES)})
    insert_rows(Call, rows)


def every_page(endpoint_ids: list[int] | None, wanted: CallFilter, limit: int) -> tuple[list[int], int]:
    """The ids of every call found, following the pages to the end, and how many pages that took."""
    seen: list[int] = []
    before: int | None = None
    for pages in range(1, 10_000):
        found = find_calls(endpoint_ids, wanted, limit=limit, before_id=before)
        assert len(found.calls) <= limit
        seen += [call.id for call in found.calls]
        if found.before_id is None:
            return seen, pages
        assert found.before_id != before, "a cursor that does not move on"
        before = found.before_id
    raise AssertionError("the pages never ended")


def matches(calls: list[Call], endpoint_ids: list[int] | None, wanted: CallFilter) -> list[int]:
    """The same search done the slow, obvious way, over ``calls`` (newest first)."""
    return [c.id for c in calls
            if (endpoint_ids is None or c.endpoint_id in endpoint_ids)
            and (not wanted.statuses or c.status in wanted.statuses)
            and (wanted.since is None or c.requested_at >= wanted.since)
            and (wanted.until is None or c.requested_at < wanted.until)
            and (wanted.digits in c.phone_a or wanted.digits in c.phone_b)]


def test_pages_hold_every_match_once_newest_first_whatever_the_filters(
        make_endpoint: Callable[..., tuple[Endpoint, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Small windows and a small share, so that a few hundred calls cross every edge: short pages with a
    cursor, merged endpoints, date bounds with calls stored out of request-time order."""
    monkeypatch.setattr(search, "EXAMINED_PER_PAGE", 60)
    monkeypatch.setattr(search, "FIRST_WINDOW", 4)
    monkeypatch.setattr(search, "CLOCK_SLACK", dt.timedelta(minutes=10))
    monkeypatch.setattr(search, "MERGED_AT_MOST", 2)  # all three: looked for among all calls
    endpoints = [make_endpoint()[0] for _ in range(3)]
    store_calls(endpoints, 300, jitter=9 * 60)  # within the slack
    ids = [e.id for e in endpoints]
    stored = list(Call.select().order_by(Call.id.desc()))
    rng = random.Random(7)
    scopes: list[list[int] | None] = [None, [ids[0]], ids[:2], ids, []]
    for _ in range(40):
        since = START + dt.timedelta(minutes=rng.randrange(-30, 320)) if rng.random() < 0.5 else None
        until = START + dt.timedelta(minutes=rng.randrange(-30, 320)) if rng.random() < 0.5 else None
        wanted = CallFilter(statuses=tuple(rng.sample(STATUSES, rng.randrange(3))), since=since, until=until,
                            digits=rng.choice(["", "", "1555", "001", "77", "16662"]))
        scope = rng.choice(scopes)
        seen, _ = every_page(scope, wanted, rng.choice([2, 7, 50]))
        assert seen == matches(stored, scope, wanted), (scope, wanted)


def test_a_search_that_finds_nothing_yet_says_where_to_go_on(
        make_endpoint: Callable[..., tuple[Endpoint, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Part of a number matched only by an old call: the first pages examine their share, find nothing and
    give a cursor; following it finds the call; the last page says there is no more."""
    monkeypatch.setattr(search, "EXAMINED_PER_PAGE", 100)
    endpoint, _ = make_endpoint()
    store_calls([endpoint], 10)
    Call.update(phone_b="4930123456").where(Call.id == Call.select(Call.id).order_by(Call.id).limit(1)).execute()
    store_calls([endpoint], 450, seed=2)
    first = find_calls([endpoint.id], CallFilter(digits="30123"), limit=20)
    assert first.calls == [] and first.before_id is not None
    seen, pages = every_page([endpoint.id], CallFilter(digits="30123"), 20)
    assert [Call.get_by_id(i).phone_b for i in seen] == ["4930123456"] and pages == 5


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_a_page_costs_the_same_at_thirty_thousand_calls_as_at_two_thousand(
        make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """An endpoint's list, by status too: index walks. And the searches that walked every call on the event
    loop: an account's endpoints merged (its whole list sorted), part of a number that matches nothing, a
    status of every endpoint's, request times near either end of the store."""
    mine, other = make_endpoint()[0], make_endpoint()[0]
    ids = [mine.id, other.id]
    newest = START + dt.timedelta(hours=2000)

    def searches() -> list[tuple[list[int] | None, CallFilter]]:
        return [([mine.id], CallFilter()), ([mine.id], CallFilter(statuses=("failed", "completed"))),
                (ids, CallFilter()), (ids, CallFilter(digits="99999")), (None, CallFilter(digits="99999")),
                (None, CallFilter(statuses=("missed",))), ([mine.id], CallFilter(since=newest)),
                ([mine.id], CallFilter(until=START + dt.timedelta(hours=3)))]

    def work(count: int) -> list[int]:
        Call.delete().execute()
        store_calls([mine, other], count, step=3600 * 2000 / count)
        return [sqlite_work(lambda s=scope, w=wanted: find_calls(s, w, limit=50)) for scope, wanted in searches()]

    small, large = work(2_000), work(30_000)
    for (scope, wanted), few, many in zip(searches(), small, large, strict=True):
        assert many <= 2 * few + 50, (scope, wanted, few, many)


@pytest.mark.stores("sqlite")  # SQLite says what it runs (its trace callback)
def test_a_page_of_an_account_of_many_endpoints_runs_a_few_statements_not_one_per_endpoint(
        make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """A reseller's endpoint per customer: a walk and a statement per endpoint held the loop 80-100 ms a page
    of the Calls page at 2,000 endpoints, and the Scheduled page's walks (each read a page of rows) 1 s."""
    endpoints = [make_endpoint()[0] for _ in range(2 * search.MERGED_AT_MOST)]
    store_calls(endpoints, 3000)
    scheduled(endpoints, 600)
    many = [e.id for e in endpoints]

    def pages(ids: list[int]) -> list[int]:
        return [sqlite_statements(lambda: find_calls(ids, CallFilter(), limit=50)),
                sqlite_statements(lambda: find_calls(ids, CallFilter(statuses=("failed",)), limit=50)),
                sqlite_statements(lambda: find_calls(ids, CallFilter(digits="99999"), limit=50)),
                sqlite_statements(lambda: CallRecords.scheduled_page(ids, limit=51))]

    counted = pages(many)  # a page's rows; a window's edge and matches, windows doubling up to the share
    assert all(n <= bound for n, bound in zip(counted, [5, 16, 16, 2], strict=True)), counted
    stored = sorted(Call.select(), key=lambda c: (c.due_at, c.id))
    pending = [c.id for c in stored if c.scheduled and c.status in ("scheduled", "queued")]
    assert [c.id for c in CallRecords.scheduled_page(many, limit=51)] == pending[:51]
    after = (stored[len(stored) // 2].due_at, stored[len(stored) // 2].id)
    later = [c.id for c in stored[len(stored) // 2 + 1:] if c.id in pending]
    assert [c.id for c in CallRecords.scheduled_page(many, limit=20, after=after)] == later[:20]


def scheduled(endpoints: list[Endpoint], count: int, *, seed: int = 3) -> None:
    """Pending calls, scheduled and immediate (a queued backlog), due at random times."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        due = START + dt.timedelta(minutes=rng.randrange(200))  # ties in due time: the id orders them
        is_scheduled = rng.random() < 0.5
        rows.append({"callid": secrets.token_hex(14), "endpoint": rng.choice(endpoints).id, "phone_a": "15550001001",
                     "phone_b": "15550002002", "requested_at": START, "due_at": due, "scheduled": is_scheduled,
                     "status": rng.choice(["scheduled", "queued", "completed"] if is_scheduled else ["queued"])})
    insert_rows(Call, rows)


def test_the_scheduled_lists_hold_every_pending_scheduled_call_once_soonest_first(
        make_endpoint: Callable[..., tuple[Endpoint, str]], monkeypatch: pytest.MonkeyPatch) -> None:
    endpoints = [make_endpoint()[0] for _ in range(3)]
    make_endpoint()  # one with none
    scheduled(endpoints, 300)
    ids = [e.id for e in endpoints]
    stored = sorted(Call.select(), key=lambda c: (c.due_at, c.id))
    monkeypatch.setattr(records, "MERGED_AT_MOST", 2)  # all three (and every endpoint's): in one statement
    for scope in (None, ids[:1], ids[1:], ids, []):
        expected = [c.id for c in stored if c.scheduled and c.status in ("scheduled", "queued")
                    and (scope is None or c.endpoint_id in scope)]
        seen: list[int] = []
        after = None
        while True:
            page = CallRecords.scheduled_page(scope, limit=7, after=after)
            seen += [c.id for c in page]
            if len(page) < 7:
                break
            after = (page[-1].due_at, page[-1].id)
        assert seen == expected, scope


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_a_scheduled_page_does_not_read_a_backlog_of_immediate_calls(
        make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    """A campaign queued behind its endpoint's limits: its calls are pending, not scheduled."""
    endpoint = make_endpoint()[0]
    scheduled([endpoint], 200)

    def work(backlog: int) -> list[int]:
        insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550001001",
                            "phone_b": "15550002002", "due_at": START, "status": "queued"} for _ in range(backlog)))
        return [sqlite_work(lambda s=scope: CallRecords.scheduled_page(s, limit=51)) for scope in ([endpoint.id], None)]

    small, large = work(500), work(20_000)
    assert all(many <= 2 * few + 20 for few, many in zip(small, large, strict=True)), (small, large)


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_a_scheduled_page_deep_in_the_list_starts_its_walk_at_the_cursor(
        make_endpoint: Callable[..., tuple[Endpoint, str]]) -> None:
    endpoint = make_endpoint()[0]
    insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": START + dt.timedelta(minutes=n), "scheduled": True,
                        "status": "scheduled"} for n in range(20_000)))
    listed = list(Call.select(Call.due_at, Call.id).order_by(Call.due_at, Call.id).tuples())
    shallow, deep = (sqlite_work(lambda at=at: CallRecords.scheduled_page([endpoint.id], limit=51, after=at))
                     for at in (listed[10], listed[19_900]))
    assert deep <= 2 * shallow + 10, (shallow, deep)
