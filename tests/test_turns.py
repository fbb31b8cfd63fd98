"""HTTP work gives way to call control: a request's turn comes once the loop has run the events it had
already read, a few requests per turn, never later than MAX_WAIT however busy the loop stays."""

from __future__ import annotations

import time

import gevent
import gevent.event
import gevent.socket

from webapi.turns import MAX_WAIT, PER_TURN, Turns, take_turn

DEADLINE = 10.0  # seconds no test waits out unless something is broken


def test_an_event_already_received_is_handled_before_the_turn() -> None:
    ours, theirs = gevent.socket.socketpair()
    handled: list[bytes] = []

    def reader() -> None:  # as the Event Socket's reader waits for the switch
        handled.append(ours.recv(100))

    greenlet = gevent.spawn(reader)
    gevent.sleep(0)  # the reader now waits on its socket
    theirs.sendall(b"CHANNEL_ANSWER")
    take_turn()
    assert handled == [b"CHANNEL_ANSWER"]
    greenlet.join(DEADLINE)
    ours.close()
    theirs.close()


def test_requests_get_their_turns_in_the_order_they_asked() -> None:
    turns = Turns(gevent.get_hub())
    order: list[int] = []

    def request(i: int) -> None:
        turns.take()
        order.append(i)

    requests = [gevent.spawn(request, i) for i in range(2 * PER_TURN + 1)]
    gevent.joinall(requests, timeout=DEADLINE, raise_error=True)
    assert order == list(range(2 * PER_TURN + 1))
    assert turns.waiting == 0


def test_a_loop_that_never_idles_still_gives_turns_after_max_wait() -> None:
    turns = Turns(gevent.get_hub())
    taken = gevent.event.Event()
    stop_at = time.monotonic() + DEADLINE

    def busy() -> None:  # always something ready: the loop is never idle
        while not taken.is_set() and time.monotonic() < stop_at:
            gevent.sleep(0)

    spinner = gevent.spawn(busy)
    gevent.sleep(0)
    started = time.monotonic()
    turns.take()
    waited = time.monotonic() - started
    taken.set()
    assert spinner.join(DEADLINE) or spinner.dead
    assert MAX_WAIT * 0.5 <= waited < DEADLINE / 2, waited  # the guard's timer, not the spinner's end


def test_a_request_killed_while_waiting_leaves_the_queue() -> None:
    turns = Turns(gevent.get_hub())
    stop_at = time.monotonic() + DEADLINE
    spinning = gevent.event.Event()

    def busy() -> None:
        spinning.set()
        while time.monotonic() < stop_at and not done.is_set():
            gevent.sleep(0)

    done = gevent.event.Event()
    spinner = gevent.spawn(busy)
    spinning.wait(DEADLINE)
    waiting = gevent.spawn(turns.take)
    gevent.sleep(0)
    assert turns.waiting == 1
    waiting.kill(block=True, timeout=DEADLINE)
    assert turns.waiting == 0
    done.set()
    spinner.join(DEADLINE)
