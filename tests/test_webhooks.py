"""Status webhooks: the outbox, signing, retries against a local receiver, restarts, a stalled receiver."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.socket
import pytest
from gevent.pywsgi import WSGIServer
from peewee import Database

import daemon.ops.webhooks as webhooks_module
from daemon.accounts.endpoints import EndpointOptions, create_endpoint
from daemon.calls.records import CallRecords
from daemon.config import Settings
from daemon.ops.metrics import Metrics
from daemon.ops.webhooks import WEBHOOK_STATUSES, Webhooks, enqueue_status, http_post, sign, verify_signature
from daemon.store import Call, CallStatus, Endpoint, WebhookDelivery, open_database, utcnow
from tests.conftest import insert_rows, sqlite_work

pytestmark = pytest.mark.stores("sqlite", "postgresql")

WAIT = 5.0  # upper bound of every wait; none is expected to come near it


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1:0: answers ``fail_first`` requests with 500, hangs if ``hang``."""

    fail_first: int = 0
    hang: bool = False
    requests: list[dict[str, Any]] = field(default_factory=list)
    accepted: list[dict[str, Any]] = field(default_factory=list)
    release: gevent.event.Event = field(default_factory=gevent.event.Event)
    changed: gevent.event.Event = field(default_factory=gevent.event.Event)
    server: WSGIServer | None = None

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        body = environ["wsgi.input"].read()
        seen = {"body": body, "event_id": environ.get("HTTP_X_CALLBRIDGE_EVENT_ID", ""),
                "timestamp": environ.get("HTTP_X_CALLBRIDGE_TIMESTAMP", ""),
                "signature": environ.get("HTTP_X_CALLBRIDGE_SIGNATURE", ""),
                "content_type": environ.get("CONTENT_TYPE", ""),
                "authorization": environ.get("HTTP_AUTHORIZATION", "")}
        self.requests.append(seen)
        self.changed.set()
        if self.hang:
            self.release.wait()
        if len(self.requests) <= self.fail_first:
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [b"not yet"]
        self.accepted.append(seen)
        self.changed.set()
        start_response("204 No Content", [])
        return []

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_port}/hook"

    def wait_for(self, check: Callable[[], bool], timeout: float = WAIT) -> bool:
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            self.changed.wait(timeout=min(left, 0.05))
        return True


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(**options: Any) -> Receiver:
        receiver = Receiver(**options)
        receiver.server = WSGIServer(("127.0.0.1", 0), receiver.app, log=None, error_log=None)
        receiver.server.start()
        made.append(receiver)
        return receiver

    yield make
    for receiver in made:
        receiver.release.set()
        assert receiver.server is not None
        receiver.server.stop(timeout=1)


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, webhook_timeout=2.0, webhook_retry_for=60)


def endpoint_with_hook(url: str, name: str | None = None) -> Endpoint:
    endpoint, _ = create_endpoint(EndpointOptions(name=name or f"ep-{secrets.token_hex(3)}",
                                                  caller_id_number="15550000000",
                                                  dial_string="sofia/gateway/carrier/{number}", webhook_url=url))
    assert endpoint.webhook_secret, "create_endpoint gives an endpoint with a webhook a secret"
    return endpoint


def new_call(endpoint: Endpoint, status: CallStatus = CallStatus.QUEUED) -> Call:
    return Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a="15550001001",
                       phone_b="15550002002", due_at=utcnow(), status=status.value)


def deliveries() -> list[WebhookDelivery]:
    return list(WebhookDelivery.select().order_by(WebhookDelivery.id))


# -- signing ----------------------------------------------------------------------------------------

def test_signature_verifies_and_refuses_tampering_and_replay() -> None:
    body = b'{"callid":"abc","status":"completed"}'
    now = 1_800_000_000
    header = sign("s3cret", now, body)
    assert header.startswith("sha256=") and len(header) == len("sha256=") + 64
    assert verify_signature("s3cret", str(now), body, header, now=now)
    assert verify_signature("s3cret", now, body.decode(), header, now=now + 299)
    assert not verify_signature("s3cret", now, body + b" ", header, now=now)
    assert not verify_signature("other", now, body, header, now=now)
    assert not verify_signature("s3cret", now + 1, body, header, now=now)  # timestamp is signed too
    assert not verify_signature("s3cret", now, body, header, now=now + 301)  # replayed later
    assert not verify_signature("s3cret", "soon", body, header, now=now)
    assert not verify_signature("s3cret", now, body, header.replace("sha256=", "sha1="), now=now)


# -- the outbox -------------------------------------------------------------------------------------

def test_listener_writes_one_row_per_change_only_for_endpoints_with_a_url(db: Database, hook_settings: Settings,
                                                                        make_endpoint: Any) -> None:
    plain, _ = make_endpoint()
    hooked = endpoint_with_hook("http://127.0.0.1:9/hook")
    webhooks = Webhooks(hook_settings, Metrics())  # not started: the listener only writes rows
    quiet, loud = new_call(plain), new_call(hooked)
    for status in CallStatus:
        webhooks.on_status(quiet, status, {})
        webhooks.on_status(loud, status, {"note": "x", "nested": {"dropped": True}})
    rows = deliveries()
    assert [r.status for r in rows] == [s.value for s in CallStatus if s in WEBHOOK_STATUSES]
    assert CallStatus.SCHEDULED not in WEBHOOK_STATUSES
    assert {r.callid for r in rows} == {loud.callid}
    assert len({r.event_id for r in rows}) == len(rows)
    first = json.loads(rows[0].payload)
    assert first["event_id"] == rows[0].event_id and first["callid"] == loud.callid
    assert first["status"] == "queued" and first["detail"] == {"note": "x"}
    assert all(r.state == "pending" and r.attempts == 0 for r in rows)


def test_status_changes_reach_the_outbox(db: Database, hook_settings: Settings) -> None:
    records = CallRecords(Metrics())
    webhooks = Webhooks(hook_settings, records.metrics)
    records.listeners.append(webhooks.on_status)
    call = new_call(endpoint_with_hook("http://127.0.0.1:9/hook"))
    assert records.claim(call, a_uuid="a" * 36, b_uuid="b" * 36, now=utcnow())
    records.a_answered(call, at=utcnow())
    records.finish(call, CallStatus.FAILED, reason="B busy", failed_leg="b", b_cause="USER_BUSY")
    assert [r.status for r in deliveries()] == ["dialing_a", "a_answered", "failed"]
    final = json.loads(deliveries()[-1].payload)
    assert (final["final"], final["failed_leg"], final["b_cause"]) == (True, "b", "USER_BUSY")


def test_enqueue_status_for_the_api_cancel(db: Database) -> None:
    call = new_call(endpoint_with_hook("http://127.0.0.1:9/hook"), CallStatus.SCHEDULED)
    assert enqueue_status(call, CallStatus.SCHEDULED) is None
    row = enqueue_status(call, CallStatus.CANCELED)
    assert row is not None and row.status == "canceled"


# -- delivery ---------------------------------------------------------------------------------------

def test_retries_until_the_receiver_accepts_with_a_stable_signed_event(db: Database, hook_settings: Settings,
                                                                     receivers: Any) -> None:
    receiver = receivers(fail_first=2)
    endpoint = endpoint_with_hook(receiver.url)
    metrics = Metrics()
    webhooks = Webhooks(hook_settings, metrics, backoff_base=0.02)
    webhooks.start()
    try:
        webhooks.on_status(new_call(endpoint), CallStatus.BRIDGED, {})
        assert receiver.wait_for(lambda: len(receiver.accepted) == 1), receiver.requests
        assert receiver.wait_for(lambda: deliveries()[0].state == "delivered")
    finally:
        webhooks.stop()
    row = deliveries()[0]
    assert (row.attempts, row.last_status_code, row.last_error) == (3, 204, "")
    assert len(receiver.requests) == 3
    assert {r["event_id"] for r in receiver.requests} == {row.event_id}
    assert {r["body"] for r in receiver.requests} == {row.payload.encode()}
    for request in receiver.requests:
        assert request["content_type"] == "application/json"
        assert verify_signature(endpoint.webhook_secret, request["timestamp"], request["body"], request["signature"])
        assert abs(int(request["timestamp"]) - time.time()) < 60
    assert json.loads(receiver.accepted[0]["body"])["status"] == "bridged"
    assert metrics.webhooks.labels(result="retry")._value.get() == 2
    assert metrics.webhooks.labels(result="delivered")._value.get() == 1


def test_gives_up_after_retry_for(db: Database, hook_settings: Settings, receivers: Any) -> None:
    receiver = receivers(fail_first=1000)
    endpoint = endpoint_with_hook(receiver.url)
    clock_now = [utcnow()]
    webhooks = Webhooks(dataclasses.replace(hook_settings, webhook_retry_for=30), Metrics(),
                        clock=lambda: clock_now[0], backoff_base=10.0)
    webhooks.on_status(new_call(endpoint), CallStatus.COMPLETED, {})
    row_id = deliveries()[0].id
    assert webhooks.deliver(row_id) == "pending"
    row = deliveries()[0]
    assert row.next_attempt_at > clock_now[0]  # backed off
    assert row.next_attempt_at <= row.created_at + dt.timedelta(seconds=30)  # never past the deadline
    clock_now[0] = row.created_at + dt.timedelta(seconds=30)
    assert webhooks.deliver(row_id) == "failed"
    row = deliveries()[0]
    assert (row.state, row.attempts, row.last_error) == ("failed", 2, "HTTP 500")


def test_two_daemons_senders_send_each_event_once(db: Database, hook_settings: Settings, receivers: Any) -> None:
    """Two daemons' senders on one outbox (a shared PostgreSQL): each row is taken by one of them for its
    attempt, so every event reaches the receiver once."""
    receiver = receivers()
    endpoint = endpoint_with_hook(receiver.url)
    senders = [Webhooks(hook_settings, Metrics(), per_endpoint=4) for _ in range(2)]
    for _ in range(40):
        enqueue_status(new_call(endpoint), CallStatus.COMPLETED)
    for sender in senders:
        sender.start()
    try:
        assert receiver.wait_for(lambda: all(r.state == "delivered" for r in deliveries()), timeout=30)
    finally:
        for sender in senders:
            sender.stop()
    event_ids = [r["event_id"] for r in receiver.requests]
    assert len(event_ids) == 40 and len(set(event_ids)) == 40
    assert {r.attempts for r in deliveries()} == {1}


def test_a_taken_row_falls_due_again_when_its_senders_lease_ends(db: Database, hook_settings: Settings) -> None:
    """The daemon that took a row died before its attempt's outcome was written: another sends it once the
    lease (twice the timeout and a margin) has passed, not before."""
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    enqueue_status(new_call(endpoint), CallStatus.COMPLETED)
    row = deliveries()[0]
    now = row.next_attempt_at
    dead, alive = Webhooks(hook_settings, Metrics()), Webhooks(hook_settings, Metrics())
    assert dead.take(row.id, now)
    assert not alive.take(row.id, now)
    lease = dt.timedelta(seconds=2 * hook_settings.webhook_timeout + 10)
    assert not alive.take(row.id, now + lease - dt.timedelta(seconds=1))
    assert alive.take(row.id, now + lease)


def test_an_attempt_that_fails_after_another_sender_delivered_the_row_leaves_it_delivered(
        db: Database, hook_settings: Settings) -> None:
    """This sender's attempt outlived its lease (a receiver slow to refuse, daemons' clocks apart): another
    daemon's sender took the row and delivered it meanwhile. The late failure must not undo 'delivered'."""
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    enqueue_status(new_call(endpoint), CallStatus.COMPLETED)
    row = deliveries()[0]

    def delivered_elsewhere_then_refused(*_args: Any) -> int:
        WebhookDelivery.update(state="delivered", attempts=1, finished_at=utcnow()).where(
            WebhookDelivery.id == row.id).execute()
        return 503

    late = Webhooks(hook_settings, Metrics(), transport=delivered_elsewhere_then_refused)
    assert late.deliver(row.id) == "delivered"
    after = deliveries()[0]
    assert (after.state, after.attempts, after.last_status_code) == ("delivered", 1, None)


def test_a_2xx_whose_body_stalls_counts_as_delivered() -> None:
    """README: any 2xx answer counts as delivered. A receiver that answers 200 and then dribbles (or never
    ends) its body must not get the event again at every backoff for a day."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    done = gevent.event.Event()

    def receiver() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")  # 8 bytes short
        done.wait(10)
        conn.close()

    serving = gevent.spawn(receiver)
    try:
        assert http_post(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", b"{}", {}, 0.5) == 200
    finally:
        done.set()
        serving.join(timeout=5)
        listener.close()


def test_credentials_in_the_webhook_url_are_sent_as_basic_auth(receivers: Any) -> None:
    """A receiver behind HTTP basic auth is named as https://user:password@host/path (percent-encoded
    as URLs are); the credentials go in the Authorization header, not the request line."""
    receiver = receivers()
    url = receiver.url.replace("http://", "http://hooks:p%40ss%3Aword@")
    assert http_post(url, b"{}", {"Content-Type": "application/json"}, 5.0) == 204
    sent = receiver.requests[0]["authorization"]
    assert sent == "Basic " + base64.b64encode(b"hooks:p@ss:word").decode()
    assert http_post(receiver.url, b"{}", {}, 5.0) == 204
    assert receiver.requests[1]["authorization"] == ""


def test_backoff_doubles_with_jitter_and_a_cap(hook_settings: Settings) -> None:
    webhooks = Webhooks(hook_settings, Metrics(), backoff_base=5.0, backoff_max=60.0)
    for attempts, full in ((1, 5.0), (2, 10.0), (3, 20.0), (4, 40.0), (5, 60.0), (30, 60.0)):
        delays = [webhooks.backoff(attempts) for _ in range(50)]
        assert all(full * 0.5 <= d <= full for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_rows_survive_a_restart(hook_settings: Settings, receivers: Any) -> None:
    receiver = receivers()
    db = open_database(hook_settings.database_url)
    endpoint = endpoint_with_hook(receiver.url)
    first = Webhooks(hook_settings, Metrics())  # the process "dies" before sending anything
    for status in (CallStatus.QUEUED, CallStatus.DIALING_A, CallStatus.MISSED):
        first.on_status(new_call(endpoint), status, {})
    first.stop()
    db.close()

    db = open_database(hook_settings.database_url)  # the next start
    second = Webhooks(hook_settings, Metrics())
    second.start()
    try:
        assert receiver.wait_for(lambda: len(receiver.accepted) == 3)
        assert receiver.wait_for(lambda: all(r.state == "delivered" for r in deliveries()))
    finally:
        second.stop()
        db.close()
    assert sorted(json.loads(r["body"])["status"] for r in receiver.accepted) == ["dialing_a", "missed", "queued"]
    assert len({r["event_id"] for r in receiver.accepted}) == 3


def test_a_receiver_that_never_answers_does_not_block_a_good_one(db: Database, hook_settings: Settings,
                                                                 receivers: Any) -> None:
    stuck = receivers(hang=True)
    good = receivers()
    slow_endpoint, good_endpoint = endpoint_with_hook(stuck.url), endpoint_with_hook(good.url)
    # The stuck requests' timeout far longer than a good delivery may take on a loaded machine: a good one
    # that waited for a stuck one would take 60 s, not the few milliseconds it takes.
    hook_settings = dataclasses.replace(hook_settings, webhook_timeout=60.0)
    webhooks = Webhooks(hook_settings, Metrics(), pool_size=3, per_endpoint=2)
    webhooks.start()
    try:
        for _ in range(6):  # more than the whole pool, all for the stuck receiver, queued first
            webhooks.on_status(new_call(slow_endpoint), CallStatus.COMPLETED, {})
        assert stuck.wait_for(lambda: len(stuck.requests) == 2)
        started = time.monotonic()
        webhooks.on_status(new_call(good_endpoint), CallStatus.COMPLETED, {})
        assert good.wait_for(lambda: len(good.accepted) == 1, timeout=hook_settings.webhook_timeout / 2)
        assert time.monotonic() - started < hook_settings.webhook_timeout / 2
        assert len(stuck.requests) == 2  # at most per_endpoint requests to one endpoint at a time
        # The receiver has the request; the sender's write that follows it may still be on its way (on
        # PostgreSQL that write yields): wait for it before stopping.
        assert good.wait_for(lambda: any(r.state == "delivered" for r in deliveries()))
    finally:
        webhooks.stop(grace=0)
    states = {r.callid: r.state for r in deliveries()}
    assert list(states.values()).count("delivered") == 1
    assert list(states.values()).count("pending") == 6  # the stuck ones are kept for later, not lost


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_a_slow_receivers_backlog_costs_a_tick_nothing_while_its_places_are_taken(
        db: Database, hook_settings: Settings, receivers: Any) -> None:
    """A receiver that answers slowly holds its places while every call's status changes add rows for it:
    the sender's tick must not read that backlog (it read every due row, at every tick, and a daemon with
    tens of thousands of them spent its event loop there, its calls waiting)."""
    stuck = receivers(hang=True)
    slow = endpoint_with_hook(stuck.url)
    webhooks = Webhooks(dataclasses.replace(hook_settings, webhook_timeout=60.0), Metrics(), per_endpoint=2)
    webhooks.start()
    try:
        for _ in range(3):
            webhooks.on_status(new_call(slow), CallStatus.COMPLETED, {})
        assert stuck.wait_for(lambda: len(stuck.requests) == 2)  # both its places taken

        def work_of_a_tick(backlog: int) -> int:
            due = utcnow() - dt.timedelta(seconds=1)
            insert_rows(WebhookDelivery, (
                {"event_id": secrets.token_hex(16), "endpoint": slow.id, "callid": "c", "status": "queued",
                 "payload": "{}", "created_at": due, "next_attempt_at": due} for _ in range(backlog)))
            return sqlite_work(lambda: webhooks.tick(utcnow()))

        small = work_of_a_tick(200)
        large = work_of_a_tick(20_000)
        assert large <= 2 * small + 10, (small, large)  # about the same, not a hundred times more
        assert len(stuck.requests) == 2
    finally:
        webhooks.stop(grace=0)


def test_event_ids_are_unique_across_many_events(db: Database, hook_settings: Settings) -> None:
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    webhooks = Webhooks(hook_settings, Metrics())
    call = new_call(endpoint)
    for _ in range(200):
        webhooks.on_status(call, CallStatus.DIALING_A, {})
    ids = [r.event_id for r in deliveries()]
    assert len(ids) == 200 and len(set(ids)) == 200


def test_a_refused_connection_is_retried_not_lost(db: Database, hook_settings: Settings) -> None:
    probe = gevent.socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connection refused
    endpoint = endpoint_with_hook(f"http://127.0.0.1:{port}/hook")
    webhooks = Webhooks(hook_settings, Metrics())
    webhooks.on_status(new_call(endpoint), CallStatus.FAILED, {})
    assert webhooks.deliver(deliveries()[0].id) == "pending"
    row = deliveries()[0]
    assert row.attempts == 1 and "Refused" in row.last_error and row.last_status_code is None


def test_finished_rows_are_pruned_after_a_week_pending_ones_never(db: Database, hook_settings: Settings) -> None:
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    webhooks = Webhooks(hook_settings, Metrics())
    for _ in range(3):
        webhooks.on_status(new_call(endpoint), CallStatus.COMPLETED, {})
    old_delivered, recent_failed, old_pending = deliveries()
    now = utcnow()
    WebhookDelivery.update(state="delivered", finished_at=now - dt.timedelta(days=8)).where(
        WebhookDelivery.id == old_delivered.id).execute()
    WebhookDelivery.update(state="failed", finished_at=now - dt.timedelta(days=6)).where(
        WebhookDelivery.id == recent_failed.id).execute()
    WebhookDelivery.update(created_at=now - dt.timedelta(days=30)).where(WebhookDelivery.id == old_pending.id).execute()
    assert webhooks.prune(now) == 1
    assert [r.id for r in deliveries()] == [recent_failed.id, old_pending.id]


def _finished_rows(endpoint: Endpoint, count: int, finished: dt.datetime) -> None:
    insert_rows(WebhookDelivery, (
        {"event_id": secrets.token_hex(16), "endpoint": endpoint.id, "callid": "c", "status": "completed",
         "payload": "{}", "created_at": finished, "next_attempt_at": finished, "state": "delivered",
         "finished_at": finished} for _ in range(count)))


def test_the_prune_deletes_what_expired_a_batch_at_a_time_until_none_is_left(
        db: Database, hook_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    now = utcnow()
    _finished_rows(endpoint, 12, now - dt.timedelta(days=8))
    _finished_rows(endpoint, 3, now - dt.timedelta(days=6))
    monkeypatch.setattr(webhooks_module, "PRUNE_BATCH", 5)
    assert Webhooks(hook_settings, Metrics()).prune(now) == 12
    assert WebhookDelivery.select().count() == 3


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_the_hourly_prune_reads_the_expired_rows_not_the_weeks_kept(db: Database, hook_settings: Settings) -> None:
    """The prune runs in the store's one writer, whose lock every call's steps wait for: it must go to the
    rows that expired, not walk the week of rows kept (500,000 took it 0.2 s, the lock held)."""
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    webhooks = Webhooks(hook_settings, Metrics())
    now = utcnow()

    def work_of_a_prune(kept: int) -> int:
        _finished_rows(endpoint, kept, now - dt.timedelta(days=1))
        _finished_rows(endpoint, 3, now - dt.timedelta(days=8))
        pruned: list[int] = []
        work = sqlite_work(lambda: pruned.append(webhooks.prune(now)))
        assert pruned == [3]
        return work

    small = work_of_a_prune(1000)
    large = work_of_a_prune(20_000)
    assert large <= 2 * small + 10, (small, large)


def test_a_v1_database_gains_the_outbox(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from daemon import store

    url = "sqlite:///" + str(tmp_path / "old.db")
    monkeypatch.setattr(store, "MIGRATIONS", store.MIGRATIONS[:1])
    old = open_database(url)
    endpoint = endpoint_with_hook("http://127.0.0.1:9/hook")
    assert "webhookdelivery" not in old.get_tables()
    old.close()
    monkeypatch.undo()
    db = open_database(url)
    try:
        assert store.schema_version(db) == len(store.MIGRATIONS) and "webhookdelivery" in db.get_tables()
        assert enqueue_status(new_call(Endpoint.get_by_id(endpoint.id)), CallStatus.QUEUED) is not None
    finally:
        db.close()
