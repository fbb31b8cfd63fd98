"""The apps queued on A: in order, and after a lost connection finished without ever dialing B twice."""

from __future__ import annotations

import contextlib

import pytest

from daemon.calls.appqueue import AppQueue, AppStep
from daemon.switch.esl import EslDisconnected, EslError, EslNotSent


class Link:
    """What FreeSWITCH acknowledged, in order; ``fail_at[n]`` makes the n-th send (from 0) raise."""

    def __init__(self) -> None:
        self.acked: list[AppStep] = []
        self.attempts = 0
        self.fail_at: dict[int, EslError] = {}

    def send(self, step: AppStep) -> None:
        n, self.attempts = self.attempts, self.attempts + 1
        if n in self.fail_at:
            raise self.fail_at.pop(n)
        self.acked.append(step)


def steps() -> tuple[list[AppStep], AppStep]:
    bridge = AppStep("bridge", "sofia/gateway/carrier/15550002002")
    return [AppStep("set", "cb_stage=queued"), AppStep("playback", "/media/x.wav"), bridge,
            AppStep("playback", "tone_stream://%(500,500,480,620);loops=3"), AppStep("hangup", "NORMAL_CLEARING")], bridge


def names(sent: list[AppStep]) -> list[str]:
    return [step.app + " " + step.arg for step in sent]


def started(link: Link) -> tuple[AppQueue, list[AppStep], AppStep]:
    queue = AppQueue(link.send)
    all_steps, bridge = steps()
    with contextlib.suppress(EslError):  # the sequence notes a lost connection and resumes once reconnected
        queue.start(all_steps, bridge=bridge)
    return queue, all_steps, bridge


def test_steps_go_in_order_and_are_known_by_their_event_uuid() -> None:
    link = Link()
    queue, all_steps, bridge = started(link)
    assert link.acked == all_steps and not queue.pending
    assert queue.find(bridge.event_uuid) is bridge and queue.find("unknown") is None


def test_a_step_never_sent_stays_first_in_line() -> None:
    link = Link()
    link.fail_at[1] = EslNotSent("not connected")
    queue, all_steps, _ = started(link)
    assert link.acked == all_steps[:1] and queue.pending and queue.uncertain is None
    queue.resume(b_exists=lambda: pytest.fail("only an uncertain bridge needs to ask"))
    assert link.acked == all_steps


def test_a_step_lost_in_flight_is_resent_then_the_rest_follows() -> None:
    link = Link()
    link.fail_at[1] = EslDisconnected("closed mid-command")
    queue, all_steps, _ = started(link)
    assert queue.uncertain is all_steps[1]
    queue.resume(b_exists=lambda: False)
    assert link.acked == all_steps and not queue.pending  # the playback may now be queued twice: harmless


def test_a_bridge_lost_in_flight_is_held_back_behind_a_marker() -> None:
    link = Link()
    link.fail_at[2] = EslDisconnected("closed mid-command")
    queue, all_steps, bridge = started(link)
    assert queue.uncertain is bridge
    queue.resume(b_exists=lambda: False)
    assert names(link.acked)[-1] == "set cb_resume=marker" and bridge not in link.acked
    assert queue.marker is not None and queue.find(queue.marker.event_uuid) is queue.marker
    assert queue.waiting_for_marker == all_steps[2:]


def test_a_bridge_lost_in_flight_that_had_arrived_is_never_resent() -> None:
    link = Link()
    link.fail_at[2] = EslDisconnected("closed mid-command")
    queue, all_steps, bridge = started(link)
    queue.resume(b_exists=lambda: False)
    queue.b_appeared()  # B appears before the marker runs: the bridge was queued
    assert bridge not in link.acked and link.acked[-2:] == all_steps[3:]
    assert queue.marker is None and not queue.pending


def test_the_marker_running_first_sends_the_bridge_and_the_rest_once() -> None:
    link = Link()
    link.fail_at[2] = EslDisconnected("closed mid-command")
    queue, all_steps, bridge = started(link)
    queue.resume(b_exists=lambda: False)
    queue.marker_ran()
    assert link.acked.count(bridge) == 1 and link.acked[-3:] == all_steps[2:]
    queue.b_appeared()  # B then appears because of that bridge: nothing more is sent
    assert link.acked.count(bridge) == 1 and not queue.pending


def test_a_bridge_lost_in_flight_with_b_already_up_sends_only_what_follows() -> None:
    link = Link()
    link.fail_at[2] = EslDisconnected("closed mid-command")
    queue, all_steps, bridge = started(link)
    queue.resume(b_exists=lambda: True)
    assert bridge not in link.acked and queue.marker is None and link.acked[-2:] == all_steps[3:]


def test_a_failed_question_about_b_loses_nothing() -> None:
    link = Link()
    link.fail_at[2] = EslDisconnected("closed mid-command")
    queue, _, bridge = started(link)

    def asking_fails() -> bool:
        raise EslDisconnected("dropped again")

    with pytest.raises(EslDisconnected):
        queue.resume(b_exists=asking_fails)
    assert queue.uncertain is bridge  # still known to be in doubt: the next reconnection resolves it
    queue.resume(b_exists=lambda: False)
    assert names(link.acked)[-1] == "set cb_resume=marker" and bridge not in link.acked
