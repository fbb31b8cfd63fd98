"""Records: a call's writes in the store, on SQLite and on PostgreSQL, in this process; and the lists'
pages (``GET /v1/calls``, the web pages' Calls and Scheduled) on a large SQLite store.

One call's life as the store sees it: the API's create (durable), the dispatcher's claim round (the
due read and the claim, durable; on PostgreSQL one transaction with ``FOR UPDATE SKIP LOCKED``), then
the sequence's steps (a_answered, dialing_b, bridged, completed; relaxed durability). Measured one call
at a time (the latency of each write) and with 20 greenlets at once (what the store sustains while many
calls run). SQLite: a file with WAL and ``synchronous=FULL``. PostgreSQL: Debian's server started here
(``tests/postgres_server.py``) with fsync on, on the same disk, over TCP on loopback.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator

import gevent
from peewee import chunked

from bench.common import percentile, workdir
from bench.report import Report
from daemon.accounts.endpoints import EndpointOptions, create_endpoint
from daemon.calls.records import CallRecords, NewCall
from daemon.calls.search import CallFilter, find_calls
from daemon.ops.metrics import Metrics
from daemon.store import Account, Call, CallStatus, Endpoint, close_database, open_database, utcnow

CONCURRENCY = 20


def one_call(records: CallRecords, endpoint: Endpoint, laps: dict[str, list[float]]) -> None:
    def lap(name: str, step: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        result = step()
        laps[name].append((time.perf_counter() - t0) * 1000)
        return result

    now = utcnow()
    request = NewCall(phone_a="15550001001", phone_b="15550002002", due_at=now, scheduled=False)
    lap("create", lambda: records.create(endpoint, request, now=now))

    claimed: list[Call] = []

    def claim_round() -> None:
        with records.claim_round():
            for call in records.due(utcnow() + dt.timedelta(seconds=5), limit=1):
                if records.claim(call, a_uuid=str(uuid.uuid4()), b_uuid=str(uuid.uuid4()), now=utcnow()):
                    claimed.append(call)

    lap("claim round", claim_round)
    if not claimed:
        return
    call = claimed[0]

    def steps() -> None:
        records.a_answered(call, at=utcnow())
        records.dialing_b(call, at=utcnow())
        records.bridged(call, at=utcnow(), ring_seconds=3.0)
        records.finish(call, CallStatus.COMPLETED, talk_seconds=57.0)

    lap("4 steps", steps)


def measure(report: Report, kind: str, url: str, calls: int) -> None:
    db = open_database(url)
    try:
        endpoint, _ = create_endpoint(EndpointOptions(name="bench", caller_id_number="15550000000",
                                                      dial_string="sofia/gateway/carrier/{number}",
                                                      max_in_flight=100_000, daily_cap=10_000_000))
        records = CallRecords(Metrics())
        laps: dict[str, list[float]] = {"create": [], "claim round": [], "4 steps": []}
        one_call(records, endpoint, laps)  # warm up: connections, statements
        laps = {name: [] for name in laps}
        started = time.perf_counter()
        for _ in range(calls):
            one_call(records, endpoint, laps)
        sequential = calls / (time.perf_counter() - started)
        size = f"{calls} calls one at a time"
        for name in ("create", "claim round", "4 steps"):
            report.add("records", f"{kind}: {name} p50", percentile(laps[name], 50), "ms", size=size)
            report.add("records", f"{kind}: {name} p99", percentile(laps[name], 99), "ms", size=size)
        report.add("records", f"{kind}: calls through the store, one at a time", sequential, "calls/s", size=size)

        busy: dict[str, list[float]] = {name: [] for name in laps}
        each = max(1, calls // CONCURRENCY)
        started = time.perf_counter()
        def calls_in_a_row() -> None:
            for _ in range(each):
                one_call(records, endpoint, busy)

        workers = [gevent.spawn(calls_in_a_row) for _ in range(CONCURRENCY)]
        gevent.joinall(workers, raise_error=True)
        concurrent = each * CONCURRENCY / (time.perf_counter() - started)
        report.add("records", f"{kind}: calls through the store, {CONCURRENCY} at once", concurrent, "calls/s",
                   size=f"{each * CONCURRENCY} calls, {CONCURRENCY} greenlets")
    finally:
        close_database(db)


LIST_TARGET_MS = 10.0  # a page is read on the event loop: the calls in progress wait that long
MANY_ENDPOINTS = 2000  # a reseller's account: an endpoint per customer
LIST_READS = 30


def lists(report: Report, url: str, stored: int) -> None:
    """The pages of the lists on a store of ``stored`` calls of two endpoints of one account, half of them
    a day apart (and of that account once it has :data:`MANY_ENDPOINTS`): each read ``LIST_READS`` times,
    p99 (the worst a page held the event loop)."""
    db = open_database(url)
    try:
        owner = Account.create(email="bench@example.com", password_hash="-")
        endpoints = [create_endpoint(EndpointOptions(name=f"bench-{n}", caller_id_number="15550000000",
                                                     dial_string="sofia/gateway/carrier/{number}"), owner)[0]
                     for n in range(2)]
        start = utcnow() - dt.timedelta(days=30)
        step = dt.timedelta(days=30) / stored

        def rows(count: int, status: str, scheduled: bool, first: dt.datetime) -> Iterator[dict[str, object]]:
            for n in range(count):
                at = first + n * step
                yield {"callid": uuid.uuid4().hex[:28], "endpoint": endpoints[n % 2].id, "phone_a": "15550001001",
                       "phone_b": f"1555{n % 10_000_000:07d}", "requested_at": at, "due_at": at,
                       "status": status, "scheduled": scheduled}

        with db.atomic():
            for batch in chunked(rows(stored, "completed", False, start), 1000):
                Call.insert_many(batch).execute()
            # a campaign queued behind its endpoints' limits, and a few calls scheduled after it
            for batch in chunked(rows(stored // 10, "queued", False, utcnow()), 1000):
                Call.insert_many(batch).execute()
            Call.insert_many(list(rows(100, "scheduled", True, utcnow() + dt.timedelta(days=1)))).execute()
        # The same account with a reseller's endpoint per customer: the pages of all of them.
        with db.atomic():
            reseller = [e.id for e in endpoints] + [
                create_endpoint(EndpointOptions(name=f"bench-more-{n}", caller_id_number="15550000000",
                                                dial_string="sofia/gateway/carrier/{number}"), owner)[0].id
                for n in range(MANY_ENDPOINTS - len(endpoints))]
        one = [endpoints[0].id]
        day = utcnow() - dt.timedelta(days=10)
        pages: list[tuple[str, Callable[[], object]]] = [
            ("an endpoint's newest calls", lambda: find_calls(one, CallFilter(), limit=50)),
            ("an endpoint's failed calls (none)", lambda: find_calls(one, CallFilter(statuses=["failed"]), limit=50)),
            ("an endpoint's calls of one day", lambda: find_calls(
                one, CallFilter(since=day, until=day + dt.timedelta(days=1)), limit=50)),
            ("a number no call has", lambda: find_calls(one, CallFilter(digits="99999999"), limit=50)),
            ("an account's two endpoints merged", lambda: find_calls([e.id for e in endpoints], CallFilter(),
                                                                      limit=50)),
            ("every endpoint's missed calls (admin)", lambda: find_calls(None, CallFilter(statuses=["missed"]),
                                                                          limit=50)),
            ("scheduled calls behind a queued backlog", lambda: CallRecords.scheduled_page([endpoints[0].id],
                                                                                           limit=51)),
            (f"an account's {MANY_ENDPOINTS:,} endpoints' newest calls",
             lambda: find_calls(reseller, CallFilter(), limit=50)),
            (f"an account's {MANY_ENDPOINTS:,} endpoints' scheduled calls",
             lambda: CallRecords.scheduled_page(reseller, limit=51)),
        ]
        size = f"{stored:,} calls + {stored // 10:,} queued, {LIST_READS} reads, SQLite"
        for name, read in pages:
            laps = []
            for _ in range(LIST_READS):
                t0 = time.perf_counter()
                read()
                laps.append((time.perf_counter() - t0) * 1000)
            worst = percentile(laps, 99)
            report.add("records", f"list page: {name} p99", worst, "ms", size=size,
                       target=f"<= {LIST_TARGET_MS:g} ms", ok=worst <= LIST_TARGET_MS)
    finally:
        close_database(db)


def run(report: Report, full: bool) -> None:
    calls = 2000 if full else 400
    with workdir("records") as folder:
        measure(report, "SQLite", f"sqlite:///{folder / 'callbridge.db'}", calls)
        lists(report, f"sqlite:///{folder / 'lists.db'}", 1_000_000 if full else 200_000)
        try:
            from tests.postgres_server import PostgresMissing, start_server, stop_server
        except ImportError as exc:  # pragma: no cover (the bench runs from the repository)
            raise RuntimeError(f"tests/postgres_server.py is needed: {exc}") from exc
        try:
            server = start_server(durable=True)
        except PostgresMissing as exc:
            report.errors["records"] = f"PostgreSQL figures skipped: {exc}"
            return
        try:
            name = server.new_database()
            measure(report, "PostgreSQL", server.url(name), calls)
        finally:
            stop_server(server)
