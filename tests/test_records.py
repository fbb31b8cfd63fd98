"""A call's record, used directly (as the API and any other front end use it): create, cancel, claim,
transitions and finish, with no Flask in between."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest

from daemon.calls.records import CallRecords, NewCall, NotCancelable
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallEvent, CallStatus, Endpoint

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
