"""Every row of the number plan, as A and as B, through the whole daemon and a switch over TCP."""

from __future__ import annotations

import datetime as dt

import pytest

from daemon.store import CallEvent
from tests.integration.conftest import Harness

# The outcomes assume the daemon queues A's steps and reaches B well within the far ends' 30 plan seconds:
# 0.3 s at the default 0.01, which a loaded machine can take; 3 s at 0.1. Calls here end after B's 2 s, or
# the 30 s of ringing (3 s) for the number that never answers.
pytestmark = pytest.mark.time_scale(0.1)

# phone -> (status, failed_leg, cause) when that number is A (B answers and hangs up 2 s later).
AS_A = {
    "15550000101": ("completed", "", ""),
    "15550001101": ("completed", "", ""),
    "15550002101": ("completed", "", ""),
    "15550003101": ("failed", "a", "USER_BUSY"),
    "15550004101": ("failed", "a", "NO_ANSWER"),
    "15550005101": ("failed", "a", "UNALLOCATED_NUMBER"),
    "15550006101": ("failed", "a", "NORMAL_CLEARING"),  # hangs up 2 s after answering: during the 3 s of prompts
    "15550007101": ("completed", "", ""),
    "15550008101": ("failed", "a", "CALL_REJECTED"),
    "15550009101": ("completed", "", ""),
    "15551234567": ("failed", "a", "UNALLOCATED_NUMBER"),
}

# phone -> (status, failed_leg, cause) when that number is B (A answers at once and stays up).
AS_B = {
    "15550000201": ("completed", "", ""),
    "15550001201": ("completed", "", ""),
    "15550002201": ("completed", "", ""),
    "15550003201": ("failed", "b", "USER_BUSY"),
    "15550004201": ("failed", "b", "NO_ANSWER"),
    "15550005201": ("failed", "b", "UNALLOCATED_NUMBER"),
    "15550006201": ("completed", "", ""),
    "15550007201": ("completed", "", ""),
    "15550008201": ("failed", "b", "CALL_REJECTED"),
    "15550009201": ("completed", "", ""),
    "15551234567": ("failed", "b", "UNALLOCATED_NUMBER"),
}


@pytest.mark.parametrize("phone", sorted(AS_A))
def test_number_as_a(harness: Harness, phone: str) -> None:
    status, leg, cause = AS_A[phone]
    endpoint = harness.endpoint()
    call = harness.wait_final(harness.place(endpoint, phone, "15550006301"), timeout=60)
    assert (call.status, call.failed_leg) == (status, leg), harness.timeline(call)
    if leg == "a":
        assert call.a_cause == cause
        assert call.bridged_at is None
    else:
        assert call.bridged_at is not None and call.talk_seconds is not None
        assert call.a_cause and call.b_cause


@pytest.mark.parametrize("phone", sorted(AS_B))
def test_number_as_b(harness: Harness, phone: str) -> None:
    status, leg, cause = AS_B[phone]
    # A (and some Bs) would stay up 300 s: FreeSWITCH ends the call 40 s after A's answer (the endpoint's
    # maximum duration), past the prompts and B's longest ring (originate_timeout 30), so a real switch's
    # run takes under a minute a number.
    endpoint = harness.endpoint(max_duration=40)
    call = harness.wait_final(harness.place(endpoint, "15550000302", phone), timeout=60)
    assert (call.status, call.failed_leg) == (status, leg), harness.timeline(call)
    assert call.a_answered_at is not None
    if leg == "b":
        assert call.b_cause == cause
        assert call.bridged_at is None
        assert call.ring_seconds is not None
        # B rang from the bridge's start until its attempt ended, not through the busy notice A hears after.
        ended = CallEvent.get((CallEvent.call == call.id) & (CallEvent.kind == "bridge_ended")).at
        assert call.b_dialed_at + dt.timedelta(seconds=call.ring_seconds) <= ended + dt.timedelta(seconds=0.1), \
            (call.ring_seconds, (ended - call.b_dialed_at).total_seconds())
    else:
        assert call.bridged_at is not None
        timeline = harness.timeline(call)
        assert timeline.index("a_answered") < timeline.index("dialing_b") < timeline.index("bridged")
