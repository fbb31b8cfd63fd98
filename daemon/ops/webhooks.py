"""Status webhooks: an outbox in the database and a sender greenlet that delivers it.

When a call changes status, :meth:`Webhooks.record_status` (a :class:`daemon.calls.records.CallRecords`
status writer, run inside the change's transaction) inserts one :class:`daemon.store.WebhookDelivery` row
for the call's endpoint if the endpoint has a ``webhook_url``; once that commits, the sender is woken.
That is one short insert: the call never waits on a receiver.

The rows are the queue. The sender picks the pending rows that are due, POSTs each one's frozen JSON
body, and marks it ``delivered`` on a 2xx answer. Anything else (another status, a refused connection,
no answer within ``webhook_timeout``) is retried with exponential backoff and jitter until
``webhook_retry_for`` seconds after the row was created; then the row is marked ``failed``. Each row is
first taken for its attempt (:meth:`Webhooks.take`: a conditional UPDATE that leases it), so daemons
sharing one PostgreSQL send it once between them. A row is
only marked after the attempt, so a crash or restart sends it again: delivery is at least once, and
receivers de-duplicate on the event id.

Each request carries::

    X-Callbridge-Event-Id: <uuid4, the same on every retry>
    X-Callbridge-Timestamp: <unix seconds of this attempt>
    X-Callbridge-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" under the endpoint's secret>

Receivers check them with :func:`verify_signature`. A receiver that never answers cannot stall the
others: requests run in a bounded gevent pool, each endpoint has at most ``per_endpoint`` requests in
flight, and every request has a timeout.

Every event commits with its status change or not at all (see :mod:`daemon.calls.records`). The
sender's own writes (a delivery's state, pruning) go through the store's writer (:mod:`daemon.writer`)
and are waited for. The sender also looks at the outbox at least once a second, so rows written without
a ``wake()`` (another process) go out within a second.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import http.client
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import gevent
import gevent.pool
import gevent.socket
import gevent.ssl

from daemon.calls.view import call_view, iso
from daemon.config import Settings
from daemon.loop import Backoff, Loop
from daemon.ops.logs import log_event
from daemon.ops.metrics import Metrics
from daemon.store import (
    Call,
    CallStatus,
    Endpoint,
    WebhookDelivery,
    database,
    endpoints_in_index,
    execute,
    precompiled,
    utcnow,
)
from daemon.uuids import new_uuid
from daemon.writer import current as writer

log = logging.getLogger("callbridge.webhooks")

# Every status a client hears about. ``scheduled`` is the answer to the request itself, so it is not sent.
WEBHOOK_STATUSES = frozenset(set(CallStatus) - {CallStatus.SCHEDULED})

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
MAX_SLEEP = 1.0  # look at the outbox at least this often (rows written by the API or another process)
KEEP_FINISHED = dt.timedelta(days=7)  # delivered and failed rows are kept this long, for inspection
PRUNE_EVERY = dt.timedelta(hours=1)
PRUNE_BATCH = 2000  # finished rows deleted a write
USER_AGENT = "callbridge-webhooks/1"
# Seconds beyond an attempt's own bound (twice webhook_timeout) that a taken row stays taken.
ATTEMPT_MARGIN = 10.0

# (url, body, headers, timeout) -> HTTP status code; raises OSError (or any Exception) when no answer.
Transport = Callable[[str, bytes, Mapping[str, str], float], int]
Clock = Callable[[], dt.datetime]


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    """The ``X-Callbridge-Signature`` value for ``body`` sent at ``timestamp``."""
    message = str(timestamp).encode("ascii") + b"." + body
    return "sha256=" + hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def verify_signature(secret: str, timestamp: str | int, body: bytes | str, header: str,
                     tolerance: int = 300, now: float | None = None) -> bool:
    """For receivers: True when ``header`` signs ``body`` at ``timestamp`` and the timestamp is fresh.

    ``timestamp`` is the ``X-Callbridge-Timestamp`` header, ``header`` the ``X-Callbridge-Signature``
    header, ``body`` the raw request body (bytes as received, not re-serialised JSON). A timestamp
    more than ``tolerance`` seconds away from ``now`` (default: the current time) is refused, so a
    captured request cannot be replayed later; de-duplicate on ``X-Callbridge-Event-Id`` as well.
    """
    try:
        ts = int(str(timestamp).strip())
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance:
        return False
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return hmac.compare_digest(sign(secret, ts, raw), header.strip())


def _unix(when: dt.datetime) -> int:
    return int(when.replace(tzinfo=dt.UTC).timestamp())


def event_payload(call: Call, status: CallStatus, event_id: str, created_at: dt.datetime,
                  detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON object one webhook carries: the event, then the call as it stands after the change."""
    return {
        "event_id": event_id,
        "type": "call.status",
        "created_at": iso(created_at),
        **call_view(call, call.endpoint),
        "status": status.value,
        "final": status.final,
        "detail": {k: v for k, v in (detail or {}).items() if isinstance(v, str | int | float | bool)},
    }


def enqueue_status(call: Call, status: CallStatus, detail: Mapping[str, Any] | None = None,
                   now: dt.datetime | None = None) -> WebhookDelivery | None:
    """Put one event for this status change in the outbox; None when the endpoint has no webhook.

    One indexed read and one insert, no network: safe inside the caller's transaction (the API's
    cancel calls it there, so the event commits with the cancel or not at all).
    """
    status = CallStatus(status)
    if status not in WEBHOOK_STATUSES:
        return None
    endpoint_id = call.endpoint_id
    # Read at every status change of every call: a plain statement, not a query object built each time.
    row = execute(f'SELECT "webhook_url" FROM "endpoint" WHERE "id" = {database.param}', (endpoint_id,)).fetchone()
    url = row[0] if row else None
    if not url:
        return None
    created = now or utcnow()
    event_id = new_uuid()
    body = json.dumps(event_payload(call, status, event_id, created, detail), separators=(",", ":"),
                      sort_keys=True)
    return WebhookDelivery.create(event_id=event_id, endpoint=endpoint_id, callid=call.callid,
                                  status=status.value, payload=body, created_at=created,
                                  next_attempt_at=created)


def endpoints_with_pending() -> list[int]:
    """The endpoints that have pending rows, one index probe each (``state, endpoint_id``): the sender asks
    at every tick, and a GROUP BY would read every pending row."""
    return endpoints_in_index("webhookdelivery", '"state" = {p}', (PENDING,))


def http_post(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> int:
    """POST with gevent sockets (cooperative with or without monkey patching); returns the status code.

    ``timeout`` bounds the connection and each read; the whole exchange is also bounded by a
    gevent.Timeout of twice that, so a receiver trickling bytes cannot hold a pool slot forever.
    """
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, timeout=timeout,
                                           context=gevent.ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    conn._create_connection = gevent.socket.create_connection  # type: ignore[attr-defined]
    headers = dict(headers)
    if parts.username is not None:  # a receiver behind basic auth: https://user:password@host/path
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    try:
        with gevent.Timeout(timeout * 2, TimeoutError(f"no complete answer within {timeout * 2:g} s")):
            conn.request("POST", target, body=body, headers=headers)
            response = conn.getresponse()
        status = int(response.status)  # the answer: a body that stalls after it does not undo it
        with contextlib.suppress(OSError, http.client.HTTPException), \
                gevent.Timeout(min(timeout, 1.0), TimeoutError("slow body")):
            response.read(64 * 1024)  # drain a little so keep-alive servers see a clean close
        return status
    finally:
        conn.close()


class Webhooks:
    """The outbox's writer (a CallRecords listener) and its sender greenlet."""

    def __init__(self, settings: Settings, metrics: Metrics, clock: Clock = utcnow, *,
                 transport: Transport = http_post, pool_size: int = 20, per_endpoint: int = 2,
                 backoff_base: float = 5.0, backoff_max: float = 3600.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.transport = transport
        self.per_endpoint = per_endpoint
        # Receivers coming back after an outage are not stampeded: each delay is jittered down to half.
        self.retry = Backoff(backoff_base, backoff_max, jitter=(0.5, 1.0))
        self.wall_clock = wall_clock
        self.pool = gevent.pool.Pool(pool_size)
        self.loop = Loop("webhook tick", self.tick, clock, log=log, max_sleep=MAX_SLEEP, error_delay=MAX_SLEEP)
        self._in_flight: dict[int, int] = {}  # row id -> endpoint id
        self._pruned_at: dt.datetime | None = None

    # -- the outbox's writer -------------------------------------------------------------------------
    def record_status(self, call: Call, status: CallStatus, detail: dict[str, Any]) -> Callable[[], None] | None:
        """Status writer (inside the change's transaction, maybe in the store's writer thread): one outbox
        row for this change if the endpoint has a webhook; returns the sender's wake-up for after the commit."""
        return self.wake if enqueue_status(call, status, detail, now=self.clock()) is not None else None

    def on_status(self, call: Call, status: CallStatus, detail: dict[str, Any]) -> None:
        """Status listener (outside the change's transaction): the row in a write of its own, then wake."""
        writer().submit(lambda: self.record_status(call, status, detail), durable=False,
                        committed=lambda wake: wake() if wake is not None else None)

    # -- control ------------------------------------------------------------------------------------
    def wake(self) -> None:
        """Rows were added: look at the outbox now."""
        self.loop.wake()

    def start(self) -> None:
        """Start sending; pending rows left by a previous run go first (they are already due)."""
        self.loop.start()

    def stop(self, grace: float = 1.0) -> None:
        """Stop sending. Requests still running after ``grace`` are dropped; their rows stay pending."""
        self.loop.stop()
        self.pool.join(timeout=grace)
        self.pool.kill(block=True, timeout=2)
        self._in_flight.clear()

    # -- the sender ---------------------------------------------------------------------------------
    def tick(self, now: dt.datetime) -> float:
        """Hand the due pending rows to the pool (within its limits); return seconds until the next is due."""
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
            self.prune(now)
        busy: dict[int, int] = {}
        for endpoint_id in self._in_flight.values():
            busy[endpoint_id] = busy.get(endpoint_id, 0) + 1
        is_due = (WebhookDelivery.state == PENDING) & (WebhookDelivery.next_attempt_at <= now)
        # Endpoint by endpoint, oldest due first, so a backlog for one receiver cannot hide the others'.
        # Only the rows that could go now are read: a slow receiver's backlog (its places all taken) grows
        # by every call's status changes, and reading it at every tick made call control wait behind it.
        ready: list[tuple[dt.datetime, int, list[WebhookDelivery]]] = []
        for endpoint_id in endpoints_with_pending():
            room = self.per_endpoint - busy.get(endpoint_id, 0)
            if room <= 0:
                continue
            rows = list(WebhookDelivery.select(WebhookDelivery.id, WebhookDelivery.next_attempt_at)
                        .where(is_due & (WebhookDelivery.endpoint == endpoint_id)
                               & WebhookDelivery.id.not_in(list(self._in_flight) or [0]))
                        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id).limit(room))
            if rows:
                ready.append((rows[0].next_attempt_at, endpoint_id, rows))
        for _, endpoint_id, rows in sorted(ready, key=lambda found: found[:2]):
            for row in rows:
                if self.pool.free_count() == 0:
                    return MAX_SLEEP  # woken again as soon as a request finishes
                if not self.take(int(row.id), now):
                    continue  # another daemon's sender took it first
                self._in_flight[int(row.id)] = endpoint_id
                self.pool.spawn(self._attempt, int(row.id))
        following = (WebhookDelivery.select(WebhookDelivery.next_attempt_at)
                     .where((WebhookDelivery.state == PENDING) & (WebhookDelivery.next_attempt_at > now))
                     .order_by(WebhookDelivery.next_attempt_at).limit(1).scalar())
        if following is None:
            return MAX_SLEEP
        return max(0.0, (following - now).total_seconds())

    def take(self, row_id: int, now: dt.datetime) -> bool:
        """Take a due row for one attempt: one conditional UPDATE that moves its next attempt past the
        longest an attempt can take (a lease), so the senders of other daemons sharing the store pass it
        by and it is sent once. The attempt then writes its outcome; if this daemon dies first, the row
        falls due again when the lease ends."""
        hold = now + dt.timedelta(seconds=2 * self.settings.webhook_timeout + ATTEMPT_MARGIN)
        due = (WebhookDelivery.id == row_id) & (WebhookDelivery.state == PENDING) & (WebhookDelivery.next_attempt_at <= now)
        # Waited for: the row is sent only once this sender holds it (the row count says).
        taken = writer().submit(lambda: WebhookDelivery.update(next_attempt_at=hold).where(due).execute(),
                                durable=False, wait=True)
        return bool(taken == 1)

    def prune(self, now: dt.datetime) -> int:
        """Delete delivered and failed rows finished more than KEEP_FINISHED ago; pending rows stay.

        Through the index of the finished rows by finish time, PRUNE_BATCH rows a write: the store's one
        writer (SQLite's write lock) is never held for the walk of a week's rows, nor for an hour's
        deletes at once, while calls wait to write their steps."""
        self._pruned_at = now
        cutoff = WebhookDelivery.finished_at.db_value(now - KEEP_FINISHED)
        sql = precompiled("webhook_prune", lambda p: (
            f'DELETE FROM "webhookdelivery" WHERE "id" IN (SELECT "id" FROM "webhookdelivery" '
            f'WHERE "state" != \'{PENDING}\' AND "finished_at" < {p} ORDER BY "finished_at" LIMIT {p})'))
        pruned = 0
        while True:
            deleted = int(writer().submit(lambda: execute(sql, (cutoff, PRUNE_BATCH)).rowcount, durable=False,
                                          wait=True, bulk=True))
            pruned += deleted
            if deleted < PRUNE_BATCH:
                return pruned

    def backoff(self, attempts: int) -> float:
        """Seconds before retry number ``attempts`` + 1: doubling from ``backoff_base``, capped, jittered."""
        return self.retry.delay(attempts)

    def _attempt(self, row_id: int) -> None:
        try:
            self.deliver(row_id)
        except Exception:
            log.exception("webhook delivery failed", extra={"row": row_id})
        finally:
            self._in_flight.pop(row_id, None)
            self.loop.wake()  # a slot is free

    def deliver(self, row_id: int) -> str:
        """One attempt at one row; returns its state afterwards."""
        row = WebhookDelivery.get_or_none(WebhookDelivery.id == row_id)
        if row is None or row.state != PENDING:
            return row.state if row is not None else FAILED
        endpoint = Endpoint.get_by_id(row.endpoint_id)  # type: ignore[attr-defined]
        code: int | None = None
        error = ""
        if not endpoint.webhook_url:
            error = "the endpoint has no webhook_url any more"
        else:
            body = row.payload.encode("utf-8")
            timestamp = int(self.wall_clock())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "X-Callbridge-Event-Id": row.event_id,
                "X-Callbridge-Timestamp": str(timestamp),
                "X-Callbridge-Signature": sign(endpoint.webhook_secret, timestamp, body),
            }
            try:
                code = self.transport(endpoint.webhook_url, body, headers, self.settings.webhook_timeout)
                if not 200 <= code < 300:
                    error = f"HTTP {code}"
            except Exception as exc:  # refused, reset, timed out, bad URL: all retried the same way
                error = f"{type(exc).__name__}: {exc}"[:200]
        now = self.clock()
        attempts = row.attempts + 1
        fields: dict[str, Any] = {"attempts": attempts, "last_status_code": code, "last_error": error}
        deadline = row.created_at + dt.timedelta(seconds=self.settings.webhook_retry_for)
        if not error:
            fields.update(state=DELIVERED, finished_at=now)
            result = DELIVERED
        elif now >= deadline or not endpoint.webhook_url:
            fields.update(state=FAILED, finished_at=now)
            result = FAILED
        else:
            retry_at = min(now + dt.timedelta(seconds=self.backoff(attempts)), deadline)
            fields.update(next_attempt_at=retry_at)
            result = "retry"
        # Waited for: the row is picked again only once its new state is committed. Only a row still pending:
        # one another daemon's sender finished meanwhile (it took the row once this attempt's lease ran out)
        # keeps that outcome; a late failure here must not turn its 'delivered' into a retry or 'failed'.
        still_pending = (WebhookDelivery.id == row_id) & (WebhookDelivery.state == PENDING)
        written = writer().submit(lambda: WebhookDelivery.update(**fields).where(still_pending).execute(),
                                  durable=False, wait=True)
        if written != 1:
            log_event(log, "webhook.finished_elsewhere", logging.WARNING, callid=row.callid, event_id=row.event_id,
                      note="another sender finished this event while this attempt ran; its outcome stands")
            finished = WebhookDelivery.get_or_none(WebhookDelivery.id == row_id)
            return str(finished.state) if finished is not None else FAILED
        self.metrics.webhooks.labels(result=result).inc()
        log_event(log, f"webhook.{result}", logging.INFO if result == DELIVERED else logging.WARNING,
                  callid=row.callid, event_id=row.event_id, status=row.status, attempts=attempts,
                  http_status=code, error=error or None)
        return PENDING if result == "retry" else result
