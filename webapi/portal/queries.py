"""What the pages read: an account's endpoints and calls, with the API's keyset paging and filters.

An account sees the calls of the endpoints it owns; an admin sees every call. A call of someone else's
endpoint is answered exactly like a call that does not exist.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from daemon.calls.records import CallRecords
from daemon.calls.view import endpoint_zone
from daemon.store import (
    IN_FLIGHT_STATUSES,
    Account,
    Call,
    CallEvent,
    CallStatus,
    Endpoint,
    execute,
    precompiled,
    select_rows,
)
from webapi import views
from webapi.validation import (
    MAX_ROW_ID,
    ListQuery,
    ValidationError,
    decode_due_cursor,
    encode_due_cursor,
    parse_callid,
    parse_list_query,
    text,
)

PAGE_SIZE = "50"


@dataclass
class CallsPageQuery:
    """A checked calls-page query: the API's ``limit``/``cursor``/``status``/``from``/``to``/``number`` plus
    the page's own ``endpoint``."""

    query: ListQuery
    endpoint: Endpoint | None
    zone_name: str  # the zone the from/to dates are read in


class EndpointChoice(NamedTuple):
    """An endpoint as a list to choose from shows it."""

    id: int
    name: str


# The lists of the account's endpoints that the Calls and Scheduled pages read at each view (the Calls page
# every second while it updates itself) are plain rows: a reseller's account has an endpoint per customer,
# and 2,000 of them as models, twice a view, held the event loop 80-100 ms.
def _own_endpoints_sql(columns: str, account: Account, tail: str = "", *,
                       enabled: bool = False) -> tuple[str, tuple[int, ...]]:
    mine = not account.is_admin

    def build(p: str) -> str:
        conditions = ([f'"owner_id" = {p}'] if mine else []) + (['"enabled"'] if enabled else [])
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        return f'SELECT {columns} FROM "endpoint"{where}{tail}'

    return precompiled(f"own_endpoints:{columns}:{mine}:{enabled}:{tail}", build), (account.id,) if mine else ()


ENDPOINTS_PAGE = 100  # rows of a table of endpoints (a reseller's account has thousands)


def endpoints_page(account: Account, args: Mapping[str, Any]) -> tuple[list[Endpoint], str | None]:
    """A page of the endpoints the account sees (its own, or every one for an admin) by name, after the
    query string's ``after``; and the name the next page starts after (None: the last page)."""
    after = text(args, "after")
    if len(after) > 200 or any(ord(ch) < 32 for ch in after):
        raise ValidationError("after", "not a name this page gave")
    query = Endpoint.select()
    if not account.is_admin:
        query = query.where(Endpoint.owner == account.id)
    if after:
        query = query.where(Endpoint.name > after)
    rows = list(query.order_by(Endpoint.name).limit(ENDPOINTS_PAGE + 1))
    return rows[:ENDPOINTS_PAGE], rows[ENDPOINTS_PAGE - 1].name if len(rows) > ENDPOINTS_PAGE else None


def endpoint_ids(account: Account) -> list[int] | None:
    """The ids of the account's endpoints; None for an admin (every endpoint)."""
    if account.is_admin:
        return None
    return [endpoint_id for (endpoint_id,) in execute(*_own_endpoints_sql('"id"', account)).fetchall()]


class PlaceChoice(NamedTuple):
    """An endpoint as the place-a-call form offers it."""

    id: int
    name: str
    caller_id_number: str
    timezone: str
    record: bool


def place_choices(account: Account) -> list[PlaceChoice]:
    """The enabled endpoints the account sees, by name."""
    rows = execute(*_own_endpoints_sql('"id", "name", "caller_id_number", "timezone", "record"', account,
                                       ' ORDER BY "name"', enabled=True)).fetchall()
    return [PlaceChoice(row[0], row[1], row[2], row[3], bool(row[4])) for row in rows]


def endpoint_choices(account: Account) -> list[EndpointChoice]:
    """The endpoints the account sees (its own, or every one for an admin), by name."""
    return [EndpointChoice(*row) for row in execute(*_own_endpoints_sql('"id", "name"', account,
                                                                         ' ORDER BY "name"')).fetchall()]


def own_endpoint(account: Account, endpoint_id: Any) -> Endpoint | None:
    try:
        wanted = int(endpoint_id)
    except (TypeError, ValueError):
        return None
    if not 0 < wanted <= MAX_ROW_ID:
        return None
    endpoint = Endpoint.get_or_none(Endpoint.id == wanted)
    if endpoint is None or not (account.is_admin or endpoint.owner_id == account.id):
        return None
    return endpoint


def own_call(account: Account, raw_callid: str) -> Call | None:
    """The call by callid if the account may see it, else None (whether or not it exists)."""
    callid = parse_callid(raw_callid)
    if callid is None:
        return None
    call = Call.select(Call, Endpoint).join(Endpoint).where(Call.callid == callid).first()
    if call is None or not (account.is_admin or call.endpoint.owner_id == account.id):
        return None
    return call


def shared_zone(account: Account) -> str:
    """The one zone all the account's endpoints use, else UTC."""
    zones = execute(*_own_endpoints_sql('DISTINCT "timezone"', account, " LIMIT 2")).fetchall()
    return str(zones[0][0]) if len(zones) == 1 else "UTC"


def parse_filter(account: Account, args: Mapping[str, Any]) -> CallsPageQuery:
    """The calls page's query string, checked by the API's rules (ValidationError names the field)."""
    endpoint = None
    raw_endpoint = text(args, "endpoint")
    if raw_endpoint:
        endpoint = own_endpoint(account, raw_endpoint)
        if endpoint is None:
            raise ValidationError("endpoint", "not one of your endpoints")
    zone_name = endpoint.timezone if endpoint is not None else shared_zone(account)
    values = {k: v for k, v in args.items() if k in ("limit", "cursor", "status", "from", "to", "number")}
    values.setdefault("limit", PAGE_SIZE)
    query = parse_list_query(values, endpoint_zone(zone_name))
    return CallsPageQuery(query=query, endpoint=endpoint, zone_name=zone_name)


def calls_page(account: Account, f: CallsPageQuery) -> tuple[list[Call], str | None]:
    """One page of calls newest first, and the cursor of the next page (None on the last): the search of
    ``GET /v1/calls`` (:mod:`daemon.calls.search`), so a page may end short of its size with a cursor when
    a number search has examined its share of the calls."""
    calls, next_cursor = views.calls_page([f.endpoint.id] if f.endpoint is not None else endpoint_ids(account),
                                          f.query)
    with_endpoints(calls)
    return calls, next_cursor


def with_endpoints(calls: list[Call]) -> None:
    """Give each call its endpoint, read once for the whole list (a page shows each call's zone)."""
    wanted = {call.endpoint_id for call in calls}
    endpoints = {e.id: e for e in Endpoint.select().where(Endpoint.id.in_(list(wanted)))} if wanted else {}
    for call in calls:
        call.endpoint = endpoints[call.endpoint_id]


def scheduled_page(account: Account, args: Mapping[str, Any]) -> tuple[list[Call], str | None]:
    """Pending scheduled calls soonest first, with the API's (due_at, id) cursor."""
    values = {k: v for k, v in args.items() if k in ("limit", "cursor")}
    values.setdefault("limit", PAGE_SIZE)
    q = parse_list_query(values, ZoneInfo("UTC"))
    after = decode_due_cursor(q.cursor) if q.cursor is not None else None
    rows = CallRecords.scheduled_page(endpoint_ids(account), limit=q.limit + 1, after=after)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    with_endpoints(rows)
    return rows, encode_due_cursor(rows[-1].due_at, rows[-1].id) if more else None


LIVE_PAGE = 100  # calls in progress a page shows (it is read again every second while it is open)


def live_page(args: Mapping[str, Any]) -> tuple[list[Call], dict[str, int], str | None]:
    """Calls in progress (admin), oldest start first, a page of them with a (started_at, id) cursor; how
    many are in each phase; the cursor of the next page. The store sorts every call in progress (as many
    as the daemons' ``max_in_flight``, in C); only the page becomes rows here: the page reads itself again
    every second, and 2,000 calls built through peewee's joined query took about a second of the event loop."""
    raw = text(args, "cursor")
    after = decode_due_cursor(raw) if raw else None
    statuses = [status.value for status in IN_FLIGHT_STATUSES]
    marks = ", ".join(["{p}"] * len(statuses))
    sql = precompiled(f"live_page:{after is not None}", lambda p: (
        f'SELECT * FROM "call" WHERE "status" IN ({marks})'
        + (' AND ("started_at", "id") > ({p}, {p})' if after is not None else "")
        + ' ORDER BY "started_at", "id" LIMIT {p}').format(p=p))
    since = () if after is None else (Call.started_at.db_value(after[0]), after[1])
    rows = select_rows(Call, sql, (*statuses, *since, LIVE_PAGE + 1))
    more = len(rows) > LIVE_PAGE
    rows = rows[:LIVE_PAGE]
    with_endpoints(rows)
    counts = precompiled("live_counts", lambda p: (
        f'SELECT "status", COUNT(*) FROM "call" WHERE "status" IN ({marks}) GROUP BY "status"').format(p=p))
    phases = {status: 0 for status in statuses} | {status: int(n) for status, n in execute(counts, statuses).fetchall()}
    last = rows[-1] if more else None
    started = last.started_at if last is not None else None  # (a claim sets it with the status)
    return rows, phases, encode_due_cursor(started, last.id) if last is not None and started is not None else None


def timeline(call: Call) -> list[CallEvent]:
    return CallRecords.timeline(call.id)


def moving(calls: list[Call], now: dt.datetime) -> bool:
    """Whether a page showing these calls should update itself: one is in progress or about to start."""
    soon = now + dt.timedelta(minutes=2)
    for call in calls:
        status = CallStatus(call.status)
        if status in IN_FLIGHT_STATUSES or status == CallStatus.QUEUED:
            return True
        if status == CallStatus.SCHEDULED and call.due_at <= soon:
            return True
    return False
