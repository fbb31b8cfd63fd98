"""SwitchLink's supervision against a scripted fake FreeSWITCH over real loopback TCP."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import pytest
from gevent.event import Event

from daemon.config import Settings, SwitchAddress
from daemon.ops.metrics import Metrics
from daemon.switch.esl import EslNotSent
from daemon.switch.link import EVENTS, SwitchLink
from tests.fake_esl_server import FakeEslServer, FakeSession, api_response, event_plain, reply

pytestmark = pytest.mark.timeout(20)

STATUS = ("1 session(s) - peak 1, last 5min 1 \n0 session(s) per Sec out of max 30, peak 1, last 5min 1 \n"
          "1000 session(s) max\n")


def answer_subscription(session: FakeSession, refuse: str = "") -> None:
    """Read the filters and the event subscription and answer them as FreeSWITCH does (trace 05);
    a filter whose line contains ``refuse`` gets an error instead."""
    while True:
        line = session.read_command().decode().strip()
        if line.startswith("event "):
            session.send(reply("+OK event listener enabled plain"))
            return
        header, _, value = line.removeprefix("filter ").partition(" ")
        refused = refuse and refuse in line
        session.send(reply("-ERR invalid filter" if refused else f"+OK filter added. [{header}]=[{value}]"))


def answer_setup_reads(session: FakeSession) -> None:
    """Answer what the link reads once subscribed: the Core-UUID and the switch's limits."""
    for answer in (api_response("core-1"), api_response("+OK sessions per second: 30\n"),
                   api_response("+OK max sessions: 1000\n"), api_response(STATUS)):
        session.read_command()
        session.send(answer)


@contextlib.contextmanager
def running_link(server: FakeEslServer,
                 on_connected: Callable[[SwitchLink, bool], None] = lambda _link, _restarted: None) -> Iterator[SwitchLink]:
    """A link to the fake switch, started; stopped with the server at the end."""
    link = SwitchLink(SwitchAddress("127.0.0.1", server.port, "ClueCon"), Settings(), Metrics(),
                      on_connected=on_connected, on_lost=lambda _link, _away: None)
    link.start()
    try:
        yield link
    finally:
        link.stop()
        server.stop()


def test_the_link_subscribes_to_the_events_it_reads_and_filters_out_the_apps_nobody_reads() -> None:
    lines: list[str] = []
    done = Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        while not done.is_set():
            line = session.read_command().decode().strip()
            lines.append(line)
            if line.startswith("event "):
                session.send(reply("+OK event listener enabled plain"))
                done.set()
            else:
                session.send(reply("+OK filter added."))
        session.wait_client_close()

    server = FakeEslServer(script).start()
    with running_link(server):
        assert done.wait(10)
        # Every event a call reads has a positive filter (without one, FreeSWITCH would drop it); the
        # negative ones come after and name only apps whose events nothing reads.
        assert lines[-1] == "event plain " + " ".join(EVENTS)
        assert lines[:len(EVENTS)] == [f"filter Event-Name {name}" for name in EVENTS]
        assert lines[len(EVENTS):-1] == [f"filter Application -{app}" for app in ("park", "multiset", "sched_hangup")]


def test_a_switch_that_refuses_a_filter_is_not_used_and_is_tried_again() -> None:
    # A positive filter the switch did not take would silently drop every event of its kind (calls
    # stuck on an answer never heard): such a connection is dropped and made again.
    tried_again = Event()

    def script(session: FakeSession) -> None:
        if len(server.sessions) >= 2:
            tried_again.set()
        session.handshake()
        answer_subscription(session, refuse="CHANNEL_ANSWER")
        answer_setup_reads(session)  # all a connection needs, but for the filter
        session.wait_client_close()

    server = FakeEslServer(script).start()
    told: list[bool] = []
    with running_link(server, lambda _link, _restarted: told.append(True)) as link:
        assert tried_again.wait(15)
        assert not told
        assert not link.connected.is_set()


def test_a_switch_gone_right_after_the_connection_reads_is_not_reported_connected() -> None:
    # FreeSWITCH shutting down as we connect: it answers our last read, then closes. The reader hears
    # the close before the connect goes on; that drop must count as a failed connect (backoff), never as
    # a connection handed to the calls.
    tried_again = Event()

    def script(session: FakeSession) -> None:
        if len(server.sessions) >= 2:
            tried_again.set()
        session.handshake()
        answer_subscription(session)
        answer_setup_reads(session)
        session.close()

    server = FakeEslServer(script).start()
    told: list[bool] = []

    def on_connected(link: SwitchLink, _restarted: bool) -> None:
        told.append(link.conn is not None and link.conn.connected)

    with running_link(server, on_connected):
        assert tried_again.wait(10)
        assert False not in told


def test_sessions_created_and_ended_right_after_a_status_reply_count_on_top_of_it() -> None:
    # FreeSWITCH writes the events queued meanwhile right behind a reply, often in the same segment: the
    # reader handles them before the greenlet that asked for `status` runs again. Had that greenlet taken
    # the count in then, it would have dropped them: two legs created right after "1 session(s)" read as
    # 1 session, not 3, letting legs through into a switch with less room than that.
    created = [event_plain({"Event-Name": "CHANNEL_CREATE", "Unique-ID": f"leg-{n}"}) for n in range(3)]
    ended = event_plain({"Event-Name": "CHANNEL_HANGUP_COMPLETE", "Unique-ID": "leg-0"})

    def script(session: FakeSession) -> None:
        session.handshake()
        answer_subscription(session)
        for answer in (api_response("core-1"), api_response("+OK sessions per second: 30\n"),
                       api_response("+OK max sessions: 1000\n")):
            session.read_command()
            session.send(answer)
        session.read_command()
        session.send(api_response(STATUS) + b"".join(created) + ended)  # one write: 1 session, +3, -1
        session.wait_client_close()

    server = FakeEslServer(script).start()
    connected = Event()
    with running_link(server, lambda _link, _restarted: connected.set()) as link:
        assert connected.wait(10)
        assert link.capacity.sessions == 1 + 3 - 1


class BusyConnection:
    """A connected EslConnection as the link sees it, whose first commands find no turn (EslNotSent: never
    sent; a write held back by a stalled store commit does this while the connection stays up)."""

    def __init__(self, no_turn: int) -> None:
        self.connected = True
        self.last_received = time.monotonic()
        self.no_turn = no_turn
        self.sent: list[str] = []

    def api(self, command: str) -> str:
        if self.no_turn:
            self.no_turn -= 1
            raise EslNotSent("api: no turn to send within 5s (other commands in flight)")
        self.sent.append(command)
        return "+OK\n"


def test_legs_left_to_the_link_whose_kill_found_no_turn_are_killed_at_its_next_look_not_its_next_connection(
) -> None:
    """Legs nobody follows (a call ended while its switch was away, or a sequence that gave up on it) are
    killed by the link. A kill that found no turn on a connection that stays up is tried again at the next
    look, about a second later: a healthy connection may never be made anew."""
    link = SwitchLink(SwitchAddress("127.0.0.1", 1, "ClueCon"), Settings(), Metrics(),
                      on_connected=lambda _link, _restarted: None, on_lost=lambda _link, _away: None)
    legs = ["0b3e7a1c-0000-4000-8000-00000000000a", "0b3e7a1c-0000-4000-8000-00000000000b"]
    link.hang_up_later(legs)
    conn = BusyConnection(no_turn=1)
    link.conn = conn  # type: ignore[assignment]
    assert link._supervise(time.monotonic()) <= 1.0
    assert link.abandoned == set(legs) and conn.sent == []
    link._supervise(time.monotonic())
    assert conn.sent == [f"uuid_kill {leg} NORMAL_CLEARING" for leg in legs]
    assert link.abandoned == set()
