"""Finding calls for a list: ``GET /v1/calls`` and the web pages' Calls page.

Newest first, paged by the call's id (``id < cursor``: no OFFSET, no COUNT). Both run on the event loop
that moves the calls in progress, so no request may walk the store: a page costs about the same at a
million calls as at a hundred, whatever its filters.

* An endpoint's calls come through its (endpoint, id) index, filtered by status through (endpoint,
  status, id): a page is an index walk that stops at ``limit + 1`` rows. An account's endpoints are
  walked one by one and merged (one walk of them all would sort every call they have), up to
  :data:`MERGED_AT_MOST` of them; an account with more (a reseller's endpoint per customer) has its calls
  looked for among all calls, as below: a walk per endpoint, a statement each, held the loop 80-100 ms a
  page for 2,000 endpoints (340 ms with a number to find).
* What no index serves (part of a phone number; a status across every endpoint; the calls of many
  endpoints) is looked for among the calls one request may examine (:data:`EXAMINED_PER_PAGE`), in
  windows of growing size. A page that has examined its share ends there, short, with a cursor to go on
  from: "none of the calls searched so far; search older ones". ``next_cursor`` is null only when nothing
  older matches.
* ``from``/``to`` (the request time) become id bounds first: calls are numbered as they are stored, and a
  call is stored within moments of its request time, so the ids of a time range are found by bisecting
  the ids (a few dozen primary-key probes), with :data:`CLOCK_SLACK` of margin either side for the order
  of concurrent inserts and the clocks of daemons sharing a store. The exact comparison still decides.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from daemon.store import Call, among_sql, among_value, execute, precompiled, select_rows

EXAMINED_PER_PAGE = 2000  # calls one page may look at beyond what an index finds for it
FIRST_WINDOW = 64  # calls examined first; each window after doubles, while the page is not full
MERGED_AT_MOST = 32  # endpoints walked one by one and merged; more are looked for among all calls
CLOCK_SLACK = dt.timedelta(minutes=5)  # how far out of request-time order a call may be stored (clock.skew: 2 s)

# Where a walk looks: one endpoint's calls (its id), those of several among all calls (their ids), or all.
Scope = int | tuple[int, ...] | None


@dataclass(frozen=True)
class CallFilter:
    """What a list asks for beyond its scope: statuses (any when empty), request times (``since`` included,
    ``until`` not; naive UTC) and digits in A's or B's number."""

    statuses: Sequence[str] = ()
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    digits: str = ""


@dataclass(frozen=True)
class Found:
    """A page of calls, newest first, and the id to pass as ``before_id`` for the next one (None: no more)."""

    calls: list[Call]
    before_id: int | None


def find_calls(endpoint_ids: Sequence[int] | None, wanted: CallFilter, *, limit: int,
               before_id: int | None = None) -> Found:
    """Up to ``limit`` of the calls of ``endpoint_ids`` (None: every endpoint) that match ``wanted``, with
    ids below ``before_id``."""
    chosen = None if endpoint_ids is None else sorted(set(endpoint_ids))
    if chosen == []:
        return Found([], None)
    scopes: Sequence[Scope] = ([None] if chosen is None else [tuple(chosen)] if len(chosen) > MERGED_AT_MOST
                               else chosen)
    low, high = _id_range(wanted, before_id)
    if high is not None and high <= low:
        return Found([], None)
    share = max(FIRST_WINDOW, EXAMINED_PER_PAGE // len(scopes))
    walks = [_walk(scope, wanted, limit + 1, low, high, share) for scope in scopes]
    # Every walk knows all its matches down to its floor (None: down to ``low``): the merged page is
    # complete down to the highest floor, no further.
    floors = [floor for _, floor in walks if floor is not None]
    floor = max(floors) if floors else None
    ids = sorted((found for matches, _ in walks for found in matches if floor is None or found >= floor),
                 reverse=True)
    page = ids[:limit]
    calls = select_rows(Call, precompiled(f"search_rows:{len(page)}", lambda p: (
        f'SELECT * FROM "call" WHERE "id" IN ({", ".join([p] * len(page))}) ORDER BY "id" DESC')), page) if page else []
    if len(ids) > limit:
        return Found(calls, page[-1])
    return Found(calls, floor)


def _walk(scope: Scope, wanted: CallFilter, want: int, low: int, high: int | None,
          share: int) -> tuple[list[int], int | None]:
    """The ids of up to ``want`` matches in one scope with ``low <= id < high``, newest first, and the
    floor: every match with an id at or above it is in the list (None: every one). Ids only: the rows of
    the merged page are read once, at the end."""
    if not _needs_windows(scope, wanted):
        found = _ids(scope, wanted, low, high, limit=want)
        return found, (found[-1] if len(found) == want else None)
    matches: list[int] = []
    window, examined = FIRST_WINDOW, 0
    while True:
        window = min(window, share - examined)
        # The window's lowest id: one walk of ``window`` index entries (None: fewer are left).
        edges = _ids(None if isinstance(scope, tuple) else scope, CallFilter(), low, high, limit=1,
                     offset=window - 1)
        edge = edges[0] if edges else None
        matches += _ids(scope, wanted, low if edge is None else edge, high, limit=want - len(matches))
        examined += window
        if len(matches) >= want:
            return matches, matches[-1]
        if edge is None:
            return matches, None
        if examined >= share:
            return matches, edge
        high, window = edge, window * 2


def _needs_windows(scope: Scope, wanted: CallFilter) -> bool:
    """Whether a filter is one no index walks in id order (then the calls examined are bounded)."""
    return bool(isinstance(scope, tuple) or wanted.digits or wanted.since or wanted.until
                or (scope is None and wanted.statuses))


def _ids(scope: Scope, wanted: CallFilter, low: int, high: int | None, *, limit: int,
         offset: int = 0) -> list[int]:
    """The ids of the scope's calls in ``[low, high)`` that match, newest first. A statement built once per
    shape of filter: a walk of an account's endpoints runs a few for each, and peewee's query objects
    cost ten times what SQLite takes to run them."""
    where = "all" if scope is None else "among" if isinstance(scope, tuple) else "one"
    shape = (where, low > 0, high is not None, len(wanted.statuses), wanted.since is not None,
             wanted.until is not None, bool(wanted.digits), offset > 0)
    sql = precompiled(f"search:{shape}", lambda p: _ids_sql(p, *shape))
    params: list[Any] = [among_value(scope)] if isinstance(scope, tuple) else [] if scope is None else [scope]
    params += [value for value, given in ((low, low > 0), (high, high is not None)) if given]
    params += wanted.statuses
    params += [Call.requested_at.db_value(when) for when in (wanted.since, wanted.until) if when is not None]
    if wanted.digits:
        params += [f"%{wanted.digits}%"] * 2
    params.append(limit)
    if offset > 0:
        params.append(offset)
    return [found for (found,) in execute(sql, params).fetchall()]


def _ids_sql(p: str, where: str, low: bool, high: bool, statuses: int, since: bool, until: bool, digits: bool,
             offset: bool) -> str:
    # Among several endpoints: a filter on the walk of the ids (the unary plus keeps the planner off the
    # endpoints' index, which would read every call of each and sort them).
    terms = {"one": ['"endpoint_id" = {p}'], "among": [among_sql('+"endpoint_id"', p)], "all": []}[where]
    terms += ['"id" >= {p}'] if low else []
    terms += ['"id" < {p}'] if high else []
    terms += [f'"status" IN ({", ".join(["{p}"] * statuses)})'] if statuses else []
    terms += ['"requested_at" >= {p}'] if since else []
    terms += ['"requested_at" < {p}'] if until else []
    terms += ['("phone_a" LIKE {p} OR "phone_b" LIKE {p})'] if digits else []  # (digits: nothing to escape)
    where = f' WHERE {" AND ".join(terms)}' if terms else ""
    return (f'SELECT "id" FROM "call"{where} ORDER BY "id" DESC LIMIT {{p}}' + (" OFFSET {p}" if offset else "")).format(p=p)


def _id_range(wanted: CallFilter, before_id: int | None) -> tuple[int, int | None]:
    """The ids the filter's request times can be among: ``low`` included, ``high`` excluded (None: no end)."""
    low, high = 0, before_id
    if wanted.since is not None and wanted.since > dt.datetime.min + CLOCK_SLACK:
        earlier, _ = _crossing(wanted.since - CLOCK_SLACK)
        if earlier is not None:  # it, and every call stored before it, was requested before ``since``
            low = earlier + 1
    if wanted.until is not None and wanted.until < dt.datetime.max - CLOCK_SLACK:
        _, later = _crossing(wanted.until + CLOCK_SLACK)
        if later is not None:  # it, and every call stored after it, was requested at ``until`` or later
            high = later if high is None else min(high, later)
    return low, high


def _crossing(when: dt.datetime) -> tuple[int | None, int | None]:
    """Where the calls' request times cross ``when``, by bisecting their ids: a call requested before it,
    as late as found, and one requested at or after it, as early as found (None: none such probed).

    Each is a real call's id and time, so either is a sound bound with :data:`CLOCK_SLACK` applied by the
    caller, however out of order the calls near ``when`` were stored."""
    # (Two queries: SQLite reads one end of the primary key for each, but scans every row for the two together.)
    lowest = execute('SELECT MIN("id") FROM "call"').fetchone()[0]
    highest = execute('SELECT MAX("id") FROM "call"').fetchone()[0]
    sql = precompiled("crossing", lambda p: (
        f'SELECT "id", "requested_at" < {p} FROM "call" WHERE "id" >= {p} ORDER BY "id" LIMIT 1'))
    stored = Call.requested_at.db_value(when)
    earlier = later = None
    while lowest is not None and highest is not None and lowest <= highest:
        middle = (lowest + highest) // 2
        probe = execute(sql, (stored, middle)).fetchone()
        if probe is None:  # (deleted meanwhile)
            break
        found, before = probe
        if before:
            earlier, lowest = found, found + 1
        else:
            later, highest = found, middle - 1
    return earlier, later
