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
    """Written in one write: the set, the prompt, the wait, the bridge, the notice and the hangup."""
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


def no_marker_yet(name: str) -> str:
    """A's variables, asked only when a marker awaited may have run unheard: none is awaited here."""
    raise AssertionError(f"A's {name} asked with no marker awaited")


def marker_of(queue: AppQueue) -> AppStep:
    """The marker awaited; it sets cb_resume to its own event UUID (read after a gap: it ran unheard)."""
    marker = queue.marker
    assert marker is not None and names([marker]) == [f"set cb_resume={marker.event_uuid}"]
    return marker


def test_steps_go_in_order_and_are_known_by_their_event_uuid() -> None:
    link = Link()
    queue, all_steps, bridge = started(link)
    assert link.acked == all_steps and not queue.pending
    assert queue.find(bridge.event_uuid) is bridge and queue.find("unknown") is None


def test_all_the_steps_go_in_one_write() -> None:
    """One write (one send, one wake of the switch's side) for every step, those that must arrive once included."""
    link = Link()
    queue, all_steps, _ = started(link)
    more = [AppStep("set", "more=1"), AppStep("playback", "/media/dialtone.wav", loops=-1)]
    queue.extend(more)
    assert link.batches == [all_steps, more]


def test_a_write_that_found_no_turn_stays_first_in_line() -> None:
    link = Link()
    link.fail_at[0] = (EslNotSent("not connected"), 0)
    queue, all_steps, _ = started(link)
    assert link.acked == [] and queue.unsent == all_steps and not queue.uncertain
    queue.resume(b_created=lambda: pytest.fail("only an uncertain bridge needs to ask"), a_var=no_marker_yet)
    assert link.acked == all_steps


def test_harmless_steps_lost_in_flight_are_resent_then_the_rest_follows() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 4)  # up to the bridge answered; the notice and the hangup: in doubt, both
    queue, all_steps, _ = started(link)
    assert queue.uncertain == all_steps[4:]
    queue.resume(b_created=lambda: pytest.fail("no bridge in doubt"), a_var=no_marker_yet)
    assert link.acked == all_steps and not queue.pending  # the notice may now be queued twice: harmless


def test_steps_answered_before_the_connection_went_are_not_in_doubt() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 1)  # the set answered; the rest in flight
    queue, all_steps, _ = started(link)
    assert link.acked == all_steps[:1] and queue.uncertain == all_steps[1:] and queue.unsent == []


@pytest.mark.parametrize("shows", ["the marker runs", "the wait starts", "the prompt, then the marker"])
def test_a_wait_lost_in_flight_is_held_back_behind_a_marker(shows: str) -> None:
    """A second copy of the wait would hold A once the first is broken: sent again only if the marker says
    it never arrived. (The bridge after it, in doubt with it, is held back too.)"""
    link = Link()
    link.fail_at[0] = (LOST, 1)
    queue, all_steps, bridge = started(link)
    prompt, wait = all_steps[1], all_steps[2]
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    assert link.acked[-1] is marker_of(queue) and wait not in link.acked and bridge not in link.acked
    marker = queue.marker
    assert marker is not None
    if shows == "the wait starts":
        queue.started(wait.event_uuid)  # it arrived; the bridge after it may not have: still held back
        assert queue.marker is marker and link.acked[-1] is marker
        queue.marker_ran()
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
    link.fail_at[0] = (LOST, 3)  # the set, the prompt and the wait answered
    queue, all_steps, bridge = started(link)
    assert queue.uncertain == all_steps[3:]
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    assert link.acked[-1] is marker_of(queue) and bridge not in link.acked
    assert queue.marker is not None and queue.find(queue.marker.event_uuid) is queue.marker
    assert queue.waiting_for_marker == all_steps[3:]


def test_a_bridge_lost_in_flight_that_had_arrived_is_never_resent() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 3)
    queue, all_steps, bridge = started(link)
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    queue.b_appeared()  # B appears before the marker runs: the bridge was queued
    assert bridge not in link.acked and link.acked[-2:] == all_steps[4:]
    assert queue.marker is None and not queue.pending


def test_the_marker_running_first_sends_the_bridge_and_the_rest_once() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 3)
    queue, all_steps, bridge = started(link)
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    queue.marker_ran()
    assert link.acked.count(bridge) == 1 and link.acked[-3:] == all_steps[3:]
    queue.b_appeared()  # B then appears because of that bridge: nothing more is sent
    assert link.acked.count(bridge) == 1 and not queue.pending


def test_a_bridge_lost_in_flight_with_b_already_up_sends_only_what_follows() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 3)
    queue, all_steps, bridge = started(link)
    queue.resume(b_created=lambda: True, a_var=no_marker_yet)
    assert bridge not in link.acked and queue.marker is None and link.acked[-2:] == all_steps[4:]


def test_b_appearing_says_nothing_about_the_wait_after_the_bridge() -> None:
    """B proves the bridge arrived, and what came before it, never what follows it: the wait after the
    bridge, in doubt with it, is not sent again (a second copy would hold A after the first is broken)."""
    link = Link()
    link.fail_at[0] = (LOST, 2)  # the set, the maximum duration answered; the prompt, the waits, the bridge: in doubt
    queue = AppQueue(link.send)
    all_steps, bridge = chain()
    with contextlib.suppress(EslError):
        queue.start(all_steps, bridge=bridge)
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    queue.b_appeared()
    assert queue.marker is not None and queue.waiting_for_marker == all_steps[5:] and queue.doubtful == 0
    assert not any(step in link.acked for step in all_steps[2:])


def test_a_failed_question_about_b_loses_nothing() -> None:
    link = Link()
    link.fail_at[0] = (LOST, 3)
    queue, all_steps, bridge = started(link)

    def asking_fails() -> bool:
        raise EslDisconnected("dropped again")

    with pytest.raises(EslDisconnected):
        queue.resume(b_created=asking_fails, a_var=no_marker_yet)
    assert queue.uncertain == all_steps[3:]  # still known to be in doubt: the next reconnection resolves it
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    assert link.acked[-1] is marker_of(queue) and bridge not in link.acked


def test_a_step_seen_to_start_before_the_resume_settles_it_and_nothing_passes_those_in_doubt() -> None:
    """The look after a reconnect can come late (its questions found no turn): meanwhile nothing is sent past
    the steps in doubt, and one heard to start (the wait) is known to have arrived: it is never sent again."""
    link = Link()
    link.fail_at[0] = (LOST, 1)  # the set answered; the rest in flight
    queue, all_steps, bridge = started(link)
    more = AppStep("set", "more=1")
    queue.extend([more])
    assert link.acked == all_steps[:1] and queue.uncertain == all_steps[1:]  # nothing went past them
    assert queue.in_doubt
    queue.started(all_steps[2].event_uuid)  # the wait starts: it, and the prompt before it, arrived
    assert queue.uncertain == all_steps[3:] and queue.in_doubt  # the bridge after it: still in doubt
    queue.started(bridge.event_uuid)  # the bridge starts: nothing that must arrive once is left in doubt
    assert queue.uncertain == all_steps[4:]
    queue.resume(b_created=lambda: pytest.fail("no bridge in doubt"), a_var=no_marker_yet)
    assert queue.marker is None and link.acked == [all_steps[0], *all_steps[4:], more] and not queue.pending


def chain() -> tuple[list[AppStep], AppStep]:
    """A's steps as the sequence queues them: the set, the maximum duration, a prompt, the wait, the bridge,
    the wait after it: three that must arrive once, in one write."""
    bridge = AppStep("bridge", "sofia/gateway/carrier/15550002002")
    return [AppStep("multiset", "cb_stage=queued"), AppStep("sched_hangup", "+3600 ALLOTTED_TIMEOUT"),
            AppStep("playback", "/media/x.wav"), AppStep("playback", "/media/dialtone.wav", loops=-1), bridge,
            AppStep("playback", "/media/dialtone.wav", loops=-1)], bridge


class ChannelA:
    """A's channel as FreeSWITCH keeps it: the steps that arrived, in order (of a write lost in flight, a
    prefix of it: ``lose = (answered, arrived)`` for the next write), run one after the other, a wait until
    it is broken; the variables its ``set`` steps set; whether a bridge created B (``originated_legs``). It
    tells the queue what the sequence hears while connected: a step starting (CHANNEL_EXECUTE), B created by
    a bridge (CHANNEL_CREATE), the marker running."""

    def __init__(self, refused: tuple[AppStep, ...] = ()) -> None:
        self.on_a: list[AppStep] = []
        self.lose: tuple[int, int] | None = None
        self.refused = refused  # bridges the switch refuses: no B
        self.ran = self.begun = 0
        self.b_created = False
        self.variables: dict[str, str] = {}
        self.unheard: list[AppStep] = []  # the steps that started while the connection was down

    def send(self, steps: list[AppStep]) -> None:
        if self.lose is not None:
            (answered, arrived), self.lose = self.lose, None
            self.on_a += steps[:arrived]
            if len(steps) == 1:
                raise LOST
            raise EslLostInFlight("closed mid-command", acknowledged=answered)
        self.on_a += steps

    def var(self, name: str) -> str:
        """uuid_getvar: "" when unset."""
        return self.variables.get(name, "")

    def run(self, queue: AppQueue, *, break_waits: bool, starts: int | None = None) -> None:
        """Run what A has, each start heard; a wait holds A unless ``break_waits`` (the sequence breaks it once
        nothing is uncertain: B's turn, or the end of the call). A bridge fails, B (if created) gone.
        ``starts``: the connection drops before the start after that many (a wait heard was broken)."""
        while self.ran < len(self.on_a):
            step = self.on_a[self.ran]
            if self.begun <= self.ran:
                if starts is not None:
                    if starts == 0:
                        return
                    starts -= 1
                self.begun = self.ran + 1
                created = self._begin(step)
                if queue.in_doubt:  # as CallSequence._on_execute
                    queue.started(step.event_uuid)
                if step is queue.marker:
                    queue.marker_ran()
                if created:
                    queue.b_appeared()
            if step.loops == -1 and not break_waits:
                return
            self.ran += 1

    def run_unheard(self) -> None:
        """The connection is down: A runs what it has, and nobody hears it; a wait holds it (nobody breaks it)."""
        while self.ran < len(self.on_a):
            step = self.on_a[self.ran]
            if self.begun <= self.ran:
                self.begun = self.ran + 1
                self.unheard.append(step)
                self._begin(step)
            if step.loops == -1:
                return
            self.ran += 1

    def _begin(self, step: AppStep) -> bool:
        """What FreeSWITCH keeps of a step's start: the variable a ``set`` sets; B created by a bridge (True)."""
        if step.app == "set":
            name, _, value = step.arg.partition("=")
            self.variables[name] = value
        if step.app == "bridge" and step not in self.refused:
            self.b_created = True
            return True
        return False


def reconnect(a: ChannelA, queue: AppQueue) -> None:
    """As CallSequence._reconcile: the queue's look (asking A's variables and whether B was created), then A
    found on a wait is acted on as if its start had just been heard (_resume_wait)."""
    queue.resume(b_created=lambda: a.b_created, a_var=a.var)
    if a.ran < len(a.on_a) and a.on_a[a.ran].loops == -1:
        queue.started(a.on_a[a.ran].event_uuid)


def assert_each_once_in_order(a: ChannelA, expected: list[AppStep], queue: AppQueue) -> None:
    """Every step reached A and ran, in order; those that must arrive once, once (B dialed once, no wait
    twice); nothing left in doubt."""
    for step in expected:
        if step.once:
            assert a.on_a.count(step) == 1, (step, names(a.on_a))
        assert step in a.on_a, (step, names(a.on_a))
    firsts = [a.on_a.index(step) for step in expected]
    assert firsts == sorted(firsts), names(a.on_a)
    assert a.ran == len(a.on_a) and not queue.pending and not queue.in_doubt and queue.marker is None


LOSSES = [(answered, arrived) for answered in range(6) for arrived in range(answered, 7)]


def start_lost(answered: int, arrived: int) -> tuple[ChannelA, AppQueue, list[AppStep]]:
    """A's one write of its steps lost after ``answered`` answers, ``arrived`` of them arrived. Returns A,
    its queue and the steps."""
    a = ChannelA()
    a.lose = (answered, arrived)
    queue = AppQueue(a.send)
    all_steps, bridge = chain()
    with contextlib.suppress(EslError):
        queue.start(all_steps, bridge=bridge)
    return a, queue, all_steps


@pytest.mark.parametrize("heard_before_resume", [False, True], ids=["heard after", "heard before"])
@pytest.mark.parametrize(("answered", "arrived"), LOSSES)
def test_the_one_write_lost_at_any_point_reaches_a_once_whatever_arrived(
        answered: int, arrived: int, heard_before_resume: bool) -> None:
    """The one write of A's steps lost after each number of answers, each prefix of the rest having arrived;
    A runs what it has (up to its wait: nothing breaks it before the resume) before or after the look
    that follows the reconnect. B is dialed once, no wait is queued twice, and nothing is lost."""
    a, queue, all_steps = start_lost(answered, arrived)
    assert queue.uncertain == all_steps[answered:]
    if heard_before_resume:
        a.run(queue, break_waits=False)
    queue.resume(b_created=lambda: a.b_created, a_var=a.var)
    a.run(queue, break_waits=True)
    assert_each_once_in_order(a, all_steps, queue)


@pytest.mark.parametrize(("answered", "arrived"), [(k, j) for k in range(3) for j in range(k, 4)])
def test_a_bridge_sent_again_lost_at_any_point_reaches_a_once(answered: int, arrived: int) -> None:
    """The switch refused the first bridge; A waits on the wait after it while the bridge, ``cb_wait`` and
    the next wait are queued again in one write, which is lost: the break that would dial B waits for the
    resume, then whatever arrived runs once, and the rest is sent once."""
    a, queue, all_steps = retry_lost_after_a_refused_bridge(answered, arrived)
    a.run(queue, break_waits=False)  # nothing moves: A holds its wait
    queue.resume(b_created=lambda: a.b_created, a_var=a.var)
    a.run(queue, break_waits=True)
    assert_each_once_in_order(a, all_steps, queue)
    assert a.b_created


def retry_lost_after_a_refused_bridge(answered: int, arrived: int) -> tuple[ChannelA, AppQueue, list[AppStep]]:
    """The switch refused the first bridge (B's turn broke the first wait); A holds the wait after it while
    the bridge, ``cb_wait`` and the next wait are queued again in one write, lost after ``answered``
    answers with ``arrived`` of them arrived. Returns A, its queue and every step sent, the retry last."""
    all_steps, first = chain()
    a = ChannelA(refused=(first,))
    queue = AppQueue(a.send)
    queue.start(all_steps, bridge=first)
    a.run(queue, break_waits=False)
    a.ran += 1  # B's turn broke the first wait; the bridge was refused; A is on the wait after it
    a.run(queue, break_waits=False)
    assert a.on_a[a.ran] is all_steps[5]
    again = AppStep("bridge", "sofia/gateway/carrier/15550002002")
    retry = [again, AppStep("set", "cb_wait=2"), AppStep("playback", "/media/dialtone.wav", loops=-1)]
    a.lose = (answered, arrived)
    with pytest.raises(EslError):
        queue.extend(retry, bridge=again)
    return a, queue, all_steps + retry


@pytest.mark.parametrize("refused", [False, True], ids=["B created", "B refused"])
@pytest.mark.parametrize(("answered", "arrived"), [(k, j) for k in range(2) for j in range(k, 3)])
def test_a_bridge_queued_on_a_flushed_a_lost_at_any_point_runs_once(answered: int, arrived: int,
                                                                   refused: bool) -> None:
    """An adopted call flushed A's queue (nothing holds A) and queued the bridge and the wait after it, lost
    in flight: the bridge runs as it arrives, before the resume; B found at the resume proves it arrived."""
    bridge = AppStep("bridge", "sofia/gateway/carrier/15550002002")
    steps = [bridge, AppStep("playback", "/media/dialtone.wav", loops=-1)]
    a = ChannelA(refused=(bridge,) if refused else ())
    a.lose = (answered, arrived)
    queue = AppQueue(a.send)
    with pytest.raises(EslError):
        queue.start(steps, bridge=bridge)
    a.run(queue, break_waits=False)
    queue.resume(b_created=lambda: a.b_created, a_var=a.var)
    a.run(queue, break_waits=True)
    assert_each_once_in_order(a, steps, queue)


def lost_then_dropped_again(a: ChannelA, queue: AppQueue, heard: int) -> AppStep | None:
    """A's write was lost (A ran what arrived of it, unheard); the reconnect queued the marker (its write
    acknowledged) and A ran on, ``heard`` starts heard, each wait heard broken; then the connection dropped
    again and A ran on unheard, the marker too if it reached it; then the next reconnect, and the rest of the
    call, heard. Returns the marker queued at the first reconnect."""
    a.run_unheard()
    reconnect(a, queue)
    marker = queue.marker
    a.run(queue, break_waits=True, starts=heard)
    a.run_unheard()
    reconnect(a, queue)
    a.run(queue, break_waits=True)
    return marker


@pytest.mark.parametrize("heard", range(8))
@pytest.mark.parametrize(("answered", "arrived"), LOSSES)
def test_a_marker_that_ran_while_the_connection_was_down_again_is_found_at_the_next_reconnect(
        answered: int, arrived: int, heard: int) -> None:
    """The marker's start went unheard (the connection dropped again after its write was answered): A's
    cb_resume, set to the marker's own UUID, tells it ran, and the steps that waited for it are sent. No wait
    in doubt had arrived (A would still hold it: only a wait heard to start is broken); a bridge in doubt had
    if B was created. B is dialed once, no wait is queued twice, nothing is lost."""
    a, queue, all_steps = start_lost(answered, arrived)
    lost_then_dropped_again(a, queue, heard)
    assert_each_once_in_order(a, all_steps, queue)


@pytest.mark.parametrize("heard", range(6))
@pytest.mark.parametrize(("answered", "arrived"), [(k, j) for k in range(3) for j in range(k, 4)])
def test_a_bridge_sent_again_whose_marker_ran_while_the_connection_was_down_again_reaches_a_once(
        answered: int, arrived: int, heard: int) -> None:
    """As above, for the retry after a refused bridge (the bridge, cb_wait and the next wait, lost in flight
    while A holds the wait after the refused bridge)."""
    a, queue, all_steps = retry_lost_after_a_refused_bridge(answered, arrived)
    lost_then_dropped_again(a, queue, heard)
    assert_each_once_in_order(a, all_steps, queue)
    assert a.b_created


@pytest.mark.parametrize("b_created", [True, False], ids=["B created", "B never created"])
def test_the_marker_run_unheard_after_the_bridge_sends_only_what_a_lacks(b_created: bool) -> None:
    """The write is lost with the wait arrived, not the bridge (or the bridge too, not the wait after it).
    A's wait is heard and broken (B's turn), then the connection drops: A runs the bridge if it arrived,
    then the marker, unheard, and parks: the call would sit there until its sched_hangup. At the next
    reconnect cb_resume names the marker: the bridge is sent only if B was never created, then the wait."""
    a = ChannelA()
    a.lose = (3, 5 if b_created else 4)  # the set, the maximum duration, the prompt answered
    queue = AppQueue(a.send)
    all_steps, bridge = chain()
    with contextlib.suppress(EslError):
        queue.start(all_steps, bridge=bridge)
    a.run_unheard()  # A reaches its wait
    reconnect(a, queue)  # A found on it: the bridge and the wait after it wait for the marker
    marker = queue.marker
    assert marker is not None and queue.waiting_for_marker == all_steps[4:]
    a.run(queue, break_waits=True, starts=0)  # the wait broken; the connection drops before the next start
    a.run_unheard()
    assert a.unheard[-1] is marker and a.ran == len(a.on_a) and a.b_created == b_created  # A parked
    assert queue.marker is marker and a.on_a.count(all_steps[5]) == 0  # (before the fix: no one looked)
    reconnect(a, queue)
    assert queue.marker is None and not queue.in_doubt
    assert a.on_a[a.ran:] == ([all_steps[5]] if b_created else all_steps[4:])
    a.run(queue, break_waits=True)
    assert_each_once_in_order(a, all_steps, queue)


def test_a_marker_not_yet_run_at_the_reconnect_is_waited_for() -> None:
    """cb_resume does not name the marker yet (A is on a prompt before it): nothing is sent; its start is
    heard on the new connection and settles the chain as before."""
    a = ChannelA()
    a.lose = (2, 2)  # the set and the maximum duration answered; the prompt, the waits, the bridge in doubt
    queue = AppQueue(a.send)
    all_steps, bridge = chain()
    with contextlib.suppress(EslError):
        queue.start(all_steps, bridge=bridge)
    reconnect(a, queue)
    marker = queue.marker
    sent = list(a.on_a)
    reconnect(a, queue)  # dropped again before A ran anything: the marker is still to run
    assert queue.marker is marker and a.on_a == sent
    a.run(queue, break_waits=True)
    assert_each_once_in_order(a, all_steps, queue)


def lost_chain(answered: int) -> tuple[AppQueue, Link, list[AppStep], AppStep]:
    link = Link()
    link.fail_at[0] = (LOST, answered)
    queue = AppQueue(link.send)
    all_steps, bridge = chain()
    with contextlib.suppress(EslError):
        queue.start(all_steps, bridge=bridge)
    return queue, link, all_steps, bridge


def test_a_chain_in_doubt_is_held_behind_one_marker_up_to_its_last_step_that_must_arrive_once() -> None:
    queue, link, all_steps, bridge = lost_chain(2)  # the prompt, the wait, the bridge, the wait after it
    asked = []
    queue.resume(b_created=lambda: asked.append(1) or False, a_var=no_marker_yet)
    assert asked == [1]  # a bridge in doubt: is B there?
    assert link.acked[-1] is queue.marker and link.acked[:-1] == all_steps[:2]
    assert queue.waiting_for_marker == all_steps[2:] and queue.doubtful == 3  # the wait after the bridge


def test_the_wait_seen_to_start_then_the_marker_sends_the_bridge_and_the_wait_after_once() -> None:
    """A reached the wait (it arrived) but B's turn, breaking it, ran the marker: the bridge never arrived."""
    queue, link, all_steps, bridge = lost_chain(3)
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    queue.started(all_steps[3].event_uuid)
    assert queue.waiting_for_marker == all_steps[4:] and queue.doubtful == 1
    assert queue.marker is not None and link.acked[-1] is queue.marker  # the bridge may have arrived: held
    queue.marker_ran()
    assert link.acked[-2:] == all_steps[4:] and link.acked.count(all_steps[3]) == 0 and not queue.in_doubt


def test_b_appearing_settles_the_wait_before_the_bridge() -> None:
    """The bridge arrived (B exists), so did the wait before it: never sent again, even if the marker runs."""
    queue, link, all_steps, bridge = lost_chain(3)
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    queue.b_appeared()
    assert queue.waiting_for_marker == all_steps[5:] and queue.doubtful == 0
    queue.marker_ran()  # the bridge failed; A had no wait after it
    assert link.acked[-1] is all_steps[5] and link.acked.count(all_steps[3]) == 0 and link.acked.count(bridge) == 0


def test_b_appearing_before_the_resume_settles_the_bridge_and_what_came_before() -> None:
    queue, link, all_steps, bridge = lost_chain(1)
    queue.b_appeared()
    assert queue.uncertain == all_steps[5:]
    queue.resume(b_created=lambda: pytest.fail("no bridge in doubt"), a_var=no_marker_yet)
    assert queue.waiting_for_marker == all_steps[5:]


def test_b_up_at_the_resume_leaves_only_the_wait_after_the_bridge_in_doubt() -> None:
    queue, link, all_steps, bridge = lost_chain(0)
    queue.resume(b_created=lambda: True, a_var=no_marker_yet)
    assert queue.waiting_for_marker == all_steps[5:] and queue.doubtful == 0
    queue.started(all_steps[5].event_uuid)  # the bridge failed and A plays the wait after it: it arrived
    assert link.acked[-1] is not all_steps[5] and not queue.in_doubt and not queue.pending


def test_the_doubtful_step_seen_to_start_sends_what_follows_it() -> None:
    queue, link, all_steps, bridge = lost_chain(3)
    more = AppStep("set", "more=1")
    queue.extend([more])
    assert queue.unsent == [more]  # nothing passes the steps in doubt
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    queue.started(all_steps[5].event_uuid)  # the wait after the bridge: everything before it arrived
    assert link.acked[-1] is more and link.acked.count(bridge) == 0 and not queue.in_doubt


def test_steps_queued_while_the_marker_is_awaited_go_after_those_waiting_for_it() -> None:
    """A runs its queue in order: a step queued now must not run before the steps waiting for the marker."""
    queue, link, all_steps, bridge = lost_chain(3)
    queue.resume(b_created=lambda: False, a_var=no_marker_yet)
    notice = AppStep("playback", "tone_stream://%(500,500,480,620);loops=3")
    queue.extend([notice])
    assert notice not in link.acked and queue.waiting_for_marker[-1] is notice
    queue.marker_ran()
    assert link.acked[-4:] == [*all_steps[3:], notice]
