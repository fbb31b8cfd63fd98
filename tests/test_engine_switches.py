"""The engine with several switches, none reachable (no traffic leaves the test): which switch a call found
at start is followed on, and the bound after which a switch's calls end."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from daemon.calls.records import DIAL_MARK, CallRecords, add_event
from daemon.config import Settings, SwitchAddress
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallEvent, CallStatus, Endpoint
from daemon.switch.engine import Engine


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def engine(settings: Settings, db: Any) -> Iterator[Engine]:
    settings.switches = [SwitchAddress("127.0.0.1", closed_port(), "pw-first-9f3a"),
                         SwitchAddress("127.0.0.1", closed_port(), "pw-second-7c1e")]
    engine = Engine(settings, CallRecords(Metrics()))
    yield engine
    engine.stop(timeout=2)


def in_flight(endpoint: Endpoint, switch: str | None, status: CallStatus = CallStatus.BRIDGED) -> Call:
    call = Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a="15550000001",
                       phone_b="15550000002", due_at=Call.requested_at.default(), status=status.value,
                       a_uuid=secrets.token_hex(18), b_uuid=secrets.token_hex(18), switch=switch)
    add_event(call, DIAL_MARK)  # its originate was sent: it is reconciled, never dialed again
    return call


def test_calls_found_at_start_are_followed_on_the_switch_stored_with_them(
        engine: Engine, make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    first, second = engine.links
    on_second = in_flight(endpoint, second.name)
    from_before = in_flight(endpoint, None)  # claimed before several switches: the first one
    gone = in_flight(endpoint, "10.9.9.9:8021")  # a switch since taken out of the settings
    assert engine.adopt_in_flight() == 3
    assert set(second.sequences) == {on_second.id} and set(first.sequences) == {from_before.id}
    assert engine.active[on_second.id].switch is second
    ended = Call.get_by_id(gone.id)
    assert (ended.status, ended.reason) == ("failed", "the switch 10.9.9.9:8021 is not in this daemon's settings")
    adopted = CallEvent.get((CallEvent.call == on_second.id) & (CallEvent.kind == "adopted"))
    assert adopted.detail_dict["switch"] == second.name


def test_a_switch_unreachable_past_the_bound_ends_its_calls_and_only_its_own(
        engine: Engine, settings: Settings, make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    first, second = engine.links
    settings.switch_lost_after = 30.0
    lost = [in_flight(endpoint, first.name), in_flight(endpoint, first.name, CallStatus.DIALING_B)]
    kept = in_flight(endpoint, second.name)
    engine.adopt_in_flight()
    now = time.monotonic()
    first.down_since = second.down_since = now - 29.0
    assert first._check_lost(now) == pytest.approx(1.0)  # not yet: look again in a second
    first.down_since = now - 31.0
    assert first._check_lost(now) == float("inf") and first.lost
    for call in lost:
        sequence = engine.active.get(call.id)
        if sequence is not None and sequence.greenlet is not None:
            sequence.greenlet.join(timeout=10)
        done = Call.get_by_id(call.id)
        assert (done.status, done.failed_leg, done.reason) == (
            "failed", "", f"the switch {first.name} was unreachable for 31 s")
        step = CallEvent.get((CallEvent.call == call.id) & (CallEvent.kind == "switch_lost"))
        assert step.detail_dict["switch"] == first.name
        assert {call.a_uuid, call.b_uuid} <= first.abandoned  # hung up if the switch comes back
    assert Call.get_by_id(kept.id).status == "bridged" and kept.id in second.sequences
    assert first.sequences == {}
    # a call adopted on that switch later in the same outage ends at once, the same way
    late = in_flight(endpoint, first.name)
    engine.launch(late, endpoint, adopted=True)
    sequence = engine.active.get(late.id)
    if sequence is not None and sequence.greenlet is not None:
        sequence.greenlet.join(timeout=10)
    assert Call.get_by_id(late.id).reason.startswith(f"the switch {first.name} was unreachable for ")


def test_no_bound_means_the_calls_wait_for_their_switch(
        engine: Engine, settings: Settings, make_endpoint: Callable[..., Any]) -> None:
    endpoint, _ = make_endpoint()
    first, _ = engine.links
    settings.switch_lost_after = 0.0
    call = in_flight(endpoint, first.name)
    engine.adopt_in_flight()
    first.down_since = time.monotonic() - 3600
    assert first._check_lost(time.monotonic()) == float("inf") and not first.lost
    gevent.sleep(0.05)
    assert Call.get_by_id(call.id).status == "bridged" and call.id in first.sequences


def test_switch_status_names_each_switch_and_those_not_ready_never_a_password(engine: Engine) -> None:
    status = engine.switch_status()
    names = [link.name for link in engine.links]
    assert [s["switch"] for s in status["switches"]] == names
    assert status["switches_not_ready"] == names
    assert all(s["connected"] is False and s["unreachable_seconds"] >= 0 for s in status["switches"])
    assert "pw-first-9f3a" not in repr(status) and "pw-second-7c1e" not in repr(status)
    assert not engine.ready


def test_connection_attempts_are_logged_by_switch_never_with_its_password(
        engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    engine.start()
    names = {link.name for link in engine.links}

    def failed() -> set[str]:
        return {r.__dict__.get("switch", "") for r in caplog.records if r.getMessage() == "esl.connect_failed"}

    deadline = time.monotonic() + 10
    while failed() != names and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert failed() == names
    everything = " ".join(repr(r.__dict__) for r in caplog.records)
    assert "pw-first-9f3a" not in everything and "pw-second-7c1e" not in everything


def test_a_call_already_followed_is_never_launched_a_second_time(
        engine: Engine, make_endpoint: Callable[..., Any]) -> None:
    """Two sequences for one call would each dial A. On PostgreSQL a claim round that stalled past the
    lease can find its call adopted by this daemon's own lease keeper before the round's launch."""
    endpoint, _ = make_endpoint()
    link = engine.links[0]
    call = in_flight(endpoint, link.name, status=CallStatus.DIALING_A)
    first = engine.launch(call, endpoint, switch=link)
    assert engine.launch(call, endpoint, switch=link) is first
    assert engine.active == {call.id: first} and link.sequences == {call.id: first}
    assert engine.in_flight_by_endpoint[endpoint.id] == 1
