"""The apps queued on A: in order, and after a lost connection finished without ever dialing B twice."""

from __future__ import annotations

import contextlib

import pytest

from daemon.calls.appqueue import AppQueue, AppStep
from daemon.switch.esl import EslDisconnected, EslError, EslLostInFlight, EslNotSent


class Link:
    """What FreeSWITCH acknowledged, in order; ``fail_at[n] = (error, answered)`` makes the n-th write (from
    0) raise ``error`` with its first ``answered`` steps acknowledged (several steps: EslLostInFlight)."""

    def __init__(self) -> None:
        self.acked: list[AppStep] = []
        self.batches: list[list[AppStep]] = []
        self.fail_at: dict[int, tuple[EslError, int]] = {}

    def send(self, steps: list[AppStep]) -> None:
        n = len(self.batches)
        self.batches.append(list(steps))
        if n in self.fail_at:
            error, answered = self.fail_at.pop(n)
            if isinstance(error, EslNotSent):
                raise error
            self.acked.extend(steps[:answered])
            raise EslLostInFlight(str(error), acknowledged=answered) if len(steps) > 1 else error
        self.acked.extend(steps)


def steps() -> tuple[list[AppStep], AppStep]:
    """Written in three batches: the set, the prompt and the wait; the bridge; the notice and the hangup."""
    bridge = AppStep("bridge", "sofia/gateway/carrier/15550002002")
    return [AppStep("set", "cb_stage=queued"), AppStep("playback", "/media/x.wav"),
            AppStep("playback", "/media/dialtone.wav", loops=-1), bridge,
            AppStep("playback", "tone_stream://%(500,500,480,620);loops=3"), AppStep("hangup", "NORMAL_CLEARING")], bridge


def names(sent: list[AppStep]) -> list[str]:
    return [step.app + " " + step.arg for step in sent]


def started(link: Link) -> tuple[AppQueue, list[AppStep], AppStep]:
    queue = AppQueue(link.send)
    all_steps, bridge = steps()
    with contextlib.suppress(EslError):  # the sequence notes a lost connection and resumes once reconnected
        queue.start(all_steps, bridge=bridge)
    return queue, all_steps, bridge


LOST = EslDisconnected("closed mid-command")


def test_steps_go_in_order_and_are_known_by_their_event_uuid() -> None:
    link = Link()
    queue, all_steps, bridge = started(link)
    assert link.acked == all_steps and not queue.pending
    assert queue.find(bridge.event_uuid) is bridge and queue.find("unknown") is None


def test_each_write_ends_at_a_step_that_must_arrive_once() -> None:
    link = Link()
    _, all_steps, _ = started(link)
    assert link.batches == [all_steps[:3], all_steps[3:4], all_steps[4:]]


def test_a_write_that_found_no_turn_stays_first_in_line() -> None:
    link = Link()
    link.fail_at[1] = (EslNotSent("not connected"), 0)
    queue, all_steps, _ = started(link)
    assert link.acked == all_steps[:3] and queue.pending and not queue.uncertain
    queue.resume(b_exists=lambda: pytest.fail("only an uncertain bridge needs to ask"))
    assert link.acked == all_steps


def test_harmless_steps_lost_in_flight_are_resent_then_the_rest_follows() -> None:
    link = Link()
    link.fail_at[2] = (LOST, 0)  # the notice and the hangup: in doubt, both
    queue, all_steps, _ = started(link)
    assert queue.uncertain == all_steps[4:]
    queue.resume(b_exists=lambda: pytest.fail("no bridge in doubt"))
    assert link.acked == all_steps and not queue.pending  # the notice may now be queued twice: harmless


def test_steps_answered_before_the_connection_went_are_not_in_doubt() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 1)  # the set answered; the prompt and the wait in flight
    queue, all_steps, _ = started(link)
    assert link.acked == all_steps[:1] and queue.uncertain == all_steps[1:3] and queue.unsent == all_steps[3:]


@pytest.mark.parametrize("shows", ["the marker runs", "the wait starts", "the prompt, then the marker"])
def test_a_wait_lost_in_flight_is_held_back_behind_a_marker(shows: str) -> None:
    """A second copy of the wait would hold A once the first is broken: sent again only if the marker says
    it never arrived."""
    link = Link()
    link.fail_at[0] = (LOST, 1)
    queue, all_steps, bridge = started(link)
    prompt, wait = all_steps[1], all_steps[2]
    queue.resume(b_exists=lambda: pytest.fail("the bridge was never sent"))
    assert names(link.acked)[-1] == "set cb_resume=marker" and wait not in link.acked
    marker = queue.marker
    assert marker is not None
    if shows == "the wait starts":
        queue.started(wait.event_uuid)
        assert link.acked.count(wait) == 0 and link.acked[-3:] == all_steps[3:]
    elif shows == "the marker runs":
        queue.marker_ran()
        assert link.acked[-5:] == all_steps[1:]  # the prompt in doubt with it: heard twice at worst
    else:
        queue.started(prompt.event_uuid)  # it arrived, and so did everything before it
        assert queue.marker is marker
        queue.marker_ran()
        assert link.acked.count(prompt) == 0 and link.acked[-4:] == all_steps[2:]
    assert queue.marker is None and not queue.pending and link.acked.count(bridge) == 1
    queue.started(marker.event_uuid)  # the marker's own start, later: nothing more is sent
    queue.b_appeared()
    assert link.acked.count(bridge) == 1 and not queue.pending


def test_a_bridge_lost_in_flight_is_held_back_behind_a_marker() -> None:
    link = Link()
    link.fail_at[1] = (LOST, 0)
    queue, all_steps, bridge = started(link)
    assert queue.uncertain == [bridge]
    queue.resume(b_exists=lambda: False)
    assert names(link.acked)[-1] == "set cb_resume=marker" and bridge not in link.acked
    assert queue.marker is not None and queue.find(queue.marker.event_uuid) is queue.marker
    assert queue.waiting_for_marker == all_steps[3:]


def test_a_bridge_lost_in_flight_that_had_arrived_is_never_resent() -> None:
    link = Link()
    link.fail_at[1] = (LOST, 0)
    queue, all_steps, bridge = started(link)
    queue.resume(b_exists=lambda: False)
    queue.b_appeared()  # B appears before the marker runs: the bridge was queued
    assert bridge not in link.acked and link.acked[-2:] == all_steps[4:]
    assert queue.marker is None and not queue.pending


def test_the_marker_running_first_sends_the_bridge_and_the_rest_once() -> None:
    link = Link()
    link.fail_at[1] = (LOST, 0)
    queue, all_steps, bridge = started(link)
    queue.resume(b_exists=lambda: False)
    queue.marker_ran()
    assert link.acked.count(bridge) == 1 and link.acked[-3:] == all_steps[3:]
    queue.b_appeared()  # B then appears because of that bridge: nothing more is sent
    assert link.acked.count(bridge) == 1 and not queue.pending


def test_a_bridge_lost_in_flight_with_b_already_up_sends_only_what_follows() -> None:
    link = Link()
    link.fail_at[1] = (LOST, 0)
    queue, all_steps, bridge = started(link)
    queue.resume(b_exists=lambda: True)
    assert bridge not in link.acked and queue.marker is None and link.acked[-2:] == all_steps[4:]


def test_b_appearing_says_nothing_about_a_wait_in_doubt() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 2)
    queue, all_steps, _ = started(link)
    queue.resume(b_exists=lambda: pytest.fail("the bridge was never sent"))
    queue.b_appeared()
    assert queue.marker is not None and all_steps[2] not in link.acked


def test_a_failed_question_about_b_loses_nothing() -> None:
    link = Link()
    link.fail_at[1] = (LOST, 0)
    queue, _, bridge = started(link)

    def asking_fails() -> bool:
        raise EslDisconnected("dropped again")

    with pytest.raises(EslDisconnected):
        queue.resume(b_exists=asking_fails)
    assert queue.uncertain == [bridge]  # still known to be in doubt: the next reconnection resolves it
    queue.resume(b_exists=lambda: False)
    assert names(link.acked)[-1] == "set cb_resume=marker" and bridge not in link.acked


def test_a_step_seen_to_start_before_the_resume_settles_it_and_nothing_passes_those_in_doubt() -> None:
    """The look after a reconnect can come late (its questions found no turn): meanwhile nothing is sent past
    the steps in doubt, and one heard to start (the wait) is known to have arrived: it is never sent again."""
    link = Link()
    link.fail_at[0] = (LOST, 1)  # the set answered; the prompt and the wait in flight
    queue, all_steps, _ = started(link)
    more = AppStep("set", "more=1")
    queue.extend([more])
    assert link.acked == all_steps[:1] and queue.uncertain == all_steps[1:3]  # nothing went past them
    assert queue.in_doubt
    queue.started(all_steps[2].event_uuid)  # the wait starts: it, and the prompt before it, arrived
    assert not queue.uncertain and not queue.in_doubt
    queue.resume(b_exists=lambda: pytest.fail("no bridge in doubt"))
    assert queue.marker is None and link.acked == [all_steps[0], *all_steps[3:], more] and not queue.pending
