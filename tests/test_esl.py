"""EslConnection against a scripted fake FreeSWITCH over real loopback TCP.

One test per greenswitch 0.0.19 flaw named in the engine issue, plus the handshake recorded from a
real FreeSWITCH 1.10.12. Every wait is an event with a timeout; no test sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.socket
import pytest
from gevent.event import Event
from gevent.queue import Queue

from daemon.switch.esl import (
    EslAuthError,
    EslConnection,
    EslDisconnected,
    EslError,
    EslEvent,
    EslLostInFlight,
    EslNotSent,
    EslTimeout,
    EslTraffic,
)
from tests.fake_esl_server import (
    AUTH_REQUEST,
    FakeEslServer,
    FakeSession,
    SessionClosed,
    api_response,
    disconnect_notice,
    event_plain,
    reply,
    trace_chunks,
)

pytestmark = pytest.mark.timeout(20)

UUID_A = "4dd3ce45-9b4f-4b58-88d8-09f6d131f2d2"
UUID_OTHER = "006211d9-8203-47e7-b187-4c95d21edc40"


class Recorder:
    """Collects events and disconnect reasons from a connection's callbacks."""

    def __init__(self) -> None:
        self.events: Queue[EslEvent] = Queue()
        self.disconnects: list[BaseException | None] = []
        self.disconnected = Event()

    def on_event(self, event: EslEvent) -> None:
        self.events.put(event)

    def on_disconnect(self, reason: BaseException | None) -> None:
        self.disconnects.append(reason)
        self.disconnected.set()

    def next_event(self, timeout: float = 5.0) -> EslEvent:
        return self.events.get(timeout=timeout)


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[FakeSession], None]], FakeEslServer]]:
    servers: list[FakeEslServer] = []

    def start(script: Callable[[FakeSession], None]) -> FakeEslServer:
        server = FakeEslServer(script).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        assert not server.errors, server.errors


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_conn(recorder: Recorder) -> Iterator[Callable[..., EslConnection]]:
    conns: list[EslConnection] = []

    def make(port: int, password: str = "ClueCon", **kwargs: Any) -> EslConnection:
        conn = EslConnection(
            "127.0.0.1",
            port,
            password,
            on_event=recorder.on_event,
            on_disconnect=recorder.on_disconnect,
            **kwargs,
        )
        conns.append(conn)
        return conn

    yield make
    for conn in conns:
        conn.close()


def hold_open(session: FakeSession) -> None:
    """Keep the connection up until the client closes it."""
    session.wait_client_close(timeout=15)


def test_handshake_api_and_exit_replay_real_trace(serve, make_conn, recorder) -> None:
    server_chunks = trace_chunks("01_auth_ok")
    client_chunks = trace_chunks("01_auth_ok", "C->S")

    def script(session: FakeSession) -> None:
        session.send(server_chunks[0])
        assert session.read_command() == client_chunks[0]  # b"auth ClueCon\n\n"
        session.send(server_chunks[1])
        assert session.read_command() == client_chunks[1]  # b"api status\n\n"
        session.send(server_chunks[2])
        assert session.read_command() == client_chunks[2]  # b"exit\n\n"
        session.send(server_chunks[3] + server_chunks[4])
        session.close()

    conn = make_conn(serve(script).port)
    conn.connect()
    assert conn.connected
    status = conn.api("status")
    assert status.startswith("UP 0 years") and status.endswith("Current Stack Size/Max 240K/8192K\n")
    assert len(status.encode()) == 339
    assert conn.command("exit") == "+OK bye"
    assert recorder.disconnected.wait(5)
    assert not conn.connected
    assert len(recorder.disconnects) == 1 and isinstance(recorder.disconnects[0], EslDisconnected)
    assert conn._reader is not None and conn._reader.join(5) is None and conn._reader.dead


def test_wrong_password_replay_real_trace(serve, make_conn, recorder) -> None:
    server_chunks = trace_chunks("02_auth_fail")

    def script(session: FakeSession) -> None:
        session.send(server_chunks[0])
        assert session.read_command() == b"auth WrongPassword\n\n"
        session.send(server_chunks[1])
        session.send(server_chunks[2])
        session.close()

    conn = make_conn(serve(script).port, password="WrongPassword")
    with pytest.raises(EslAuthError, match="-ERR invalid"):
        conn.connect()
    assert not conn.connected
    assert recorder.disconnected.wait(5) and len(recorder.disconnects) == 1
    with pytest.raises(EslDisconnected):
        conn.api("status")


def test_rude_rejection_is_an_auth_error(serve, make_conn) -> None:
    body = b"Access Denied, go away.\n"

    def script(session: FakeSession) -> None:
        session.send(b"Content-Type: text/rude-rejection\nContent-Length: %d\n\n" % len(body) + body)
        session.close()

    conn = make_conn(serve(script).port)
    with pytest.raises(EslAuthError, match="Access Denied"):
        conn.connect()


def test_connect_times_out_without_auth_request(serve, make_conn) -> None:
    server = serve(hold_open)
    conn = make_conn(server.port, connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(EslTimeout, match=r"no auth/request from .* within 0\.3s"):
        conn.connect()
    assert time.monotonic() - started < 10  # its own deadline, not the server's close 15 s later
    assert server.session_done.wait(5)
    assert server.sessions[0].closed_by_client.is_set()


def test_connect_refused_is_disconnected(make_conn) -> None:
    probe = gevent.socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with pytest.raises(EslDisconnected, match="cannot connect"):
        make_conn(port).connect()


def test_auth_reply_timeout(serve, make_conn) -> None:
    def script(session: FakeSession) -> None:
        session.send(AUTH_REQUEST)
        session.read_command()
        session.wait_client_close()

    conn = make_conn(serve(script).port, connect_timeout=0.3)
    with pytest.raises(EslTimeout):
        conn.connect()
    assert not conn.connected


def test_connection_object_is_single_use(serve, make_conn) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.close()

    conn = make_conn(serve(script).port)
    conn.connect()
    with pytest.raises(EslError, match="single-use"):
        conn.connect()


def test_command_timeout_closes_connection_and_fails_queued(serve, make_conn, recorder) -> None:
    server_closed = Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        session.read_command()  # never answered
        if session.wait_client_close():
            server_closed.set()

    conn = make_conn(serve(script).port, command_timeout=0.3)
    conn.connect()
    first = gevent.spawn(conn.api, "status")
    queued = gevent.spawn(conn.api, "version", timeout=5)
    gevent.joinall([first, queued], timeout=5)
    assert isinstance(first.exception, EslTimeout)
    assert isinstance(queued.exception, EslDisconnected)
    assert not conn.connected
    assert server_closed.wait(5)
    assert len(recorder.disconnects) == 1 and isinstance(recorder.disconnects[0], EslTimeout)


def test_pending_command_fails_when_server_closes(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.read_command()
        session.close()  # mid-command

    conn = make_conn(serve(script).port, command_timeout=60)
    conn.connect()
    started = time.monotonic()
    with pytest.raises(EslDisconnected):
        conn.api("status")
    assert time.monotonic() - started < 30  # at the close, not at the command's timeout
    assert recorder.disconnected.wait(5)
    assert len(recorder.disconnects) == 1


def test_close_fails_pending_command_and_notifies_once(serve, make_conn, recorder) -> None:
    command_read = Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        session.read_command()
        command_read.set()
        session.wait_client_close()

    conn = make_conn(serve(script).port, command_timeout=10)
    conn.connect()
    pending = gevent.spawn(conn.api, "status")
    assert command_read.wait(5)
    conn.close()
    conn.close()
    pending.join(5)
    assert isinstance(pending.exception, EslDisconnected)
    assert recorder.disconnects == [None]


def test_waiting_for_a_turn_times_out_without_closing(serve, make_conn) -> None:
    first_read, release = Event(), Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        session.read_command()
        first_read.set()
        assert release.wait(5)
        session.send(api_response("first\n"))
        assert session.read_command() == b"api third\n\n"
        session.send(api_response("third\n"))
        hold_open(session)

    conn, first = send_first(make_conn, serve(script).port, first_read)
    with pytest.raises(EslNotSent, match="no turn"):  # never sent: safe to send again
        conn.api("second", timeout=0.05)
    assert conn.connected
    release.set()
    assert first.get(timeout=5) == "first\n"
    assert conn.api("third") == "third\n"


def test_command_from_event_handler_fails_fast(serve, make_conn) -> None:
    errors: Queue[BaseException] = Queue()

    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(event_plain({"Event-Name": "HEARTBEAT"}))
        hold_open(session)

    def handler(event: EslEvent) -> None:
        try:
            conn.api("status")
        except EslError as exc:
            errors.put(exc)

    conn = make_conn(serve(script).port)
    conn.register_handle("HEARTBEAT", handler)
    conn.connect()
    assert "event handler" in str(errors.get(timeout=5))
    assert conn.connected


def test_stray_replies_do_not_shift_later_replies(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(reply("+OK stray") + api_response("stray body\n"))
        session.send(event_plain({"Event-Name": "HEARTBEAT"}))
        assert session.read_command() == b"api version\n\n"
        session.send(api_response("FreeSWITCH Version 1.10.12-release\n"))
        assert session.read_command() == b"noevents\n\n"
        session.send(reply("+OK no longer listening for events"))
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    assert recorder.next_event().name == "HEARTBEAT"  # the strays were read before it
    assert conn.api("version") == "FreeSWITCH Version 1.10.12-release\n"
    assert conn.command("noevents") == "+OK no longer listening for events"


def read_write(session: FakeSession) -> list[bytes]:
    """The commands of one write: read until nothing more is buffered (on loopback a write arrives whole,
    and the client writes again only once this one is answered)."""
    commands = [session.read_command()]
    while session.has_unread():
        commands.append(session.read_command())
    return commands


def hold_first_write(session: FakeSession, first_read: Event, release: Event) -> list[bytes]:
    """Handshake, read the first write and hold its reply until ``release`` (the script sends it): the
    commands sent meanwhile queue behind it."""
    session.handshake()
    first = read_write(session)
    first_read.set()
    assert release.wait(5)
    return first


def send_first(make_conn: Callable[..., EslConnection], port: int,
               first_read: Event) -> tuple[EslConnection, gevent.Greenlet]:
    """Connect and send ``api first``: once the switch read it (and holds its reply), what is sent next
    queues behind it."""
    conn = make_conn(port)
    conn.connect()
    first = gevent.spawn(conn.api, "first")
    assert first_read.wait(5)
    return conn, first


def wait_queued(conn: EslConnection, count: int) -> None:
    """Until ``count`` commands wait for the connection's next write."""
    with gevent.Timeout(5):
        while len(conn._queue) + len(conn._hooked) < count:
            gevent.sleep(0.001)


def test_commands_queued_behind_a_write_go_in_the_next_one_each_with_its_own_reply(serve, make_conn) -> None:
    """Nothing is written while a write awaits its replies: the commands queued meanwhile go together in the
    next write, in order, and each caller gets its own reply (FreeSWITCH answers them one by one)."""
    writes: list[list[bytes]] = []
    first_read, release = Event(), Event()
    written_early: list[bool] = []

    def script(session: FakeSession) -> None:
        writes.append(hold_first_write(session, first_read, release))
        written_early.append(session.has_unread())
        session.send(api_response("first"))
        writes.append(read_write(session))
        for command in writes[-1]:
            session.send(api_response(command.decode().strip()))
        hold_open(session)

    conn, first = send_first(make_conn, serve(script).port, first_read)
    jobs = [gevent.spawn(conn.api, f"echo {i}") for i in range(4)]
    wait_queued(conn, 4)
    release.set()
    gevent.joinall([first, *jobs], timeout=5, raise_error=True)
    assert first.value == "first" and [job.value for job in jobs] == [f"api echo {i}" for i in range(4)]
    assert written_early == [False]
    assert writes == [[b"api first\n\n"], [f"api echo {i}\n\n".encode() for i in range(4)]]
    assert (conn.traffic.sent, conn.traffic.writes) == (1 + 5, 1 + 2)  # auth, then each command once


def test_one_originate_a_write_and_the_other_commands_go_with_it(serve, make_conn) -> None:
    """A command with a before_send hook (an originate, marked right before it leaves) goes one a write, so
    that a drop leaves at most one originate's outcome unknown; its hook runs when its write is next. The
    commands without a hook queued meanwhile go in the same write; the other originates in later ones,
    in their order."""
    writes: list[list[bytes]] = []
    marks_at_write: list[list[str]] = []
    marks: list[str] = []
    first_read, release = Event(), Event()

    def script(session: FakeSession) -> None:
        writes.append(hold_first_write(session, first_read, release))
        session.send(api_response("first"))
        while len(writes) < 4:
            writes.append(read_write(session))
            marks_at_write.append(list(marks))
            for command in writes[-1]:
                if command.startswith(b"bgapi"):
                    job = command.split(b"Job-UUID: ")[1].split(b"\n")[0].decode()
                    session.send(reply(f"+OK Job-UUID: {job}", Job_UUID=job))
                else:
                    session.send(api_response(command.decode().strip()))
        hold_open(session)

    conn, first = send_first(make_conn, serve(script).port, first_read)
    jobs = []
    for name in ("one", "two", "three"):
        jobs.append(gevent.spawn(conn.bgapi, f"originate {name} &park()", f"j-{name}",
                                 before_send=lambda name=name: marks.append(name)))
        jobs.append(gevent.spawn(conn.api, f"status {name}"))
    wait_queued(conn, 6)
    assert marks == []  # queued behind the first write: no hook runs before its write is next
    release.set()
    gevent.joinall([first, *jobs], timeout=5, raise_error=True)
    assert [job.value for job in jobs] == ["+OK Job-UUID: j-one", "api status one", "+OK Job-UUID: j-two",
                                           "api status two", "+OK Job-UUID: j-three", "api status three"]
    originate = "bgapi originate {0} &park()\nJob-UUID: j-{0}\n\n".format
    assert writes[1:] == [
        [originate("one").encode(), b"api status one\n\n", b"api status two\n\n", b"api status three\n\n"],
        [originate("two").encode()],
        [originate("three").encode()],
    ]
    assert marks_at_write == [["one"], ["one", "two"], ["one", "two", "three"]]


def test_a_drop_during_a_write_leaves_its_commands_unknown_and_the_queued_ones_unsent(
        serve, make_conn, recorder) -> None:
    """The connection goes after the first reply of a write: the commands written after it may or may not
    have run (EslDisconnected, never EslNotSent); those still queued were not sent (EslNotSent: safe to send
    again), and the hook of a queued originate never ran."""
    first_read, release = Event(), Event()
    marks: list[str] = []

    def script(session: FakeSession) -> None:
        hold_first_write(session, first_read, release)
        session.send(api_response("first"))
        written = read_write(session)
        assert len(written) == 3
        session.send(reply("+OK Job-UUID: j-one", Job_UUID="j-one"))
        session.close()

    conn, first = send_first(make_conn, serve(script).port, first_read)
    one = gevent.spawn(conn.bgapi, "originate one &park()", "j-one", before_send=lambda: marks.append("one"))
    two = gevent.spawn(conn.bgapi, "originate two &park()", "j-two", before_send=lambda: marks.append("two"))
    others = [gevent.spawn(conn.api, f"status {n}") for n in range(2)]
    wait_queued(conn, 4)
    release.set()
    gevent.joinall([first, one, two, *others], timeout=5)
    assert first.value == "first" and one.value == "+OK Job-UUID: j-one"
    for job in others:
        assert isinstance(job.exception, EslDisconnected) and not isinstance(job.exception, EslNotSent)
    assert isinstance(two.exception, EslNotSent)
    assert marks == ["one"]
    assert recorder.disconnected.wait(5)


def test_an_originate_whose_caller_left_while_its_hook_ran_is_not_sent(serve, make_conn) -> None:
    """Killed (an outer timeout, a stopping engine) while its mark commits: nothing of it is written; the
    commands that were to go with it still go."""
    hook_started, finish_hook = Event(), Event()
    writes: list[list[bytes]] = []

    def script(session: FakeSession) -> None:
        session.handshake()
        writes.append(read_write(session))
        session.send(api_response("after"))
        hold_open(session)

    def slow_mark() -> None:
        hook_started.set()
        assert finish_hook.wait(5)

    conn = make_conn(serve(script).port)
    conn.connect()
    originate = gevent.spawn(conn.bgapi, "originate one &park()", "j-one", before_send=slow_mark)
    assert hook_started.wait(5)
    after = gevent.spawn(conn.api, "after")
    wait_queued(conn, 1)
    originate.kill(block=True, timeout=5)
    finish_hook.set()
    assert after.get(timeout=5) == "after"
    assert writes == [[b"api after\n\n"]]
    assert conn.connected


def test_bgapi_sends_job_uuid_header(serve, make_conn) -> None:
    job = "d673fbac-777b-4fc7-a16e-08c3e584e32f"
    received: list[bytes] = []

    def script(session: FakeSession) -> None:
        session.handshake()
        received.append(session.read_command())
        session.send(reply(f"+OK Job-UUID: {job}", Job_UUID=job))
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    assert conn.bgapi("originate x &park()", job) == f"+OK Job-UUID: {job}"
    assert received == [f"bgapi originate x &park()\nJob-UUID: {job}\n\n".encode()]


def test_bgapi_before_send_runs_at_its_turn_and_if_it_raises_nothing_is_sent(serve, make_conn) -> None:
    """The hook runs when the command has its turn on the connection, not while it waits behind another
    (the originate's "about to be sent" mark is written then); a hook that raises sends nothing."""
    order: list[str] = []
    got_first, answer_first = Event(), Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        for job in ("j1", "j2"):
            order.append("switch got " + session.read_command().decode().split("\n")[0])
            if job == "j1":
                got_first.set()
                answer_first.wait(timeout=10)
            session.send(reply(f"+OK Job-UUID: {job}", Job_UUID=job))
        command = session.read_command().decode()
        order.append("switch got " + command.split("\n")[0])
        session.send(api_response("+OK"))
        hold_open(session)

    def refuse() -> None:
        order.append("mark three")
        raise RuntimeError("store refused the mark")

    conn = make_conn(serve(script).port)
    conn.connect()
    first = gevent.spawn(conn.bgapi, "originate one &park()", "j1", before_send=lambda: order.append("mark one"))
    second = gevent.spawn(conn.bgapi, "originate two &park()", "j2", before_send=lambda: order.append("mark two"))
    assert got_first.wait(timeout=10)
    assert "mark two" not in order  # waiting behind the first: not its turn yet
    answer_first.set()
    gevent.joinall([first, second], timeout=10, raise_error=True)
    with pytest.raises(RuntimeError):
        conn.bgapi("originate three &park()", "j3", before_send=refuse)
    assert conn.api("status") == "+OK"
    assert order == ["mark one", "switch got bgapi originate one &park()", "mark two",
                     "switch got bgapi originate two &park()", "mark three", "switch got api status"]


def test_connection_lost_during_before_send_is_not_sent(serve, make_conn, recorder) -> None:
    """The hook may yield (a store commit); if the connection goes meanwhile, the command never left and
    says so (EslNotSent: safe to send again), rather than "outcome unknown"."""
    drop = Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        assert drop.wait(timeout=10)
        session.close()

    def commit() -> None:
        drop.set()
        assert recorder.disconnected.wait(timeout=10)

    conn = make_conn(serve(script).port)
    conn.connect()
    with pytest.raises(EslNotSent):
        conn.bgapi("originate one &park()", "j1", before_send=commit)


def test_send_message_sends_body_as_is(serve, make_conn) -> None:
    received: list[bytes] = []
    arg = "{origination_uuid=x}sofia/gateway/carrier/15550001161"
    message = (
        f"sendmsg {UUID_A}\ncall-command: execute\nexecute-app-name: bridge\nevent-lock: true\n"
        f"content-type: text/plain\ncontent-length: {len(arg)}\n\n{arg}"
    )

    def script(session: FakeSession) -> None:
        session.handshake()
        received.append(session.read_command())
        session.send(reply("+OK"))
        received.append(session.read_command())
        session.send(reply("+OK"))
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    assert conn.send_message(message).get("Reply-Text") == "+OK"
    assert conn.send_message(f"sendmsg {UUID_A}\ncall-command: hangup").get("Reply-Text") == "+OK"
    assert received == [message.encode(), f"sendmsg {UUID_A}\ncall-command: hangup\n\n".encode()]
    with pytest.raises(ValueError, match="content-length"):
        conn.send_message(f"sendmsg {UUID_A}\ncontent-length: 3\n\nplayback x")


def test_messages_sent_at_once_get_their_replies_in_order(serve, make_conn) -> None:
    """Several sendmsg in one write, as FreeSWITCH reads them (a command at a time, each answered in turn)."""
    received: list[bytes] = []
    messages = [f"sendmsg {UUID_A}\ncall-command: execute\nexecute-app-name: {app}" for app in ("park", "answer")]

    def script(session: FakeSession) -> None:
        session.handshake()
        for n in range(2):
            received.append(session.read_command())
            session.send(reply(f"+OK {n}"))
        session.read_command()
        session.send(api_response("up"))
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    sent_before = conn.traffic.sent
    assert [r.get("Reply-Text") for r in conn.send_messages(messages)] == ["+OK 0", "+OK 1"]
    assert received == [(m + "\n\n").encode() for m in messages] and conn.traffic.sent == sent_before + 2
    assert conn.api("status") == "up"  # the next command's reply is its own


def test_messages_sent_at_once_say_how_many_were_answered_when_the_connection_goes(serve, make_conn) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.read_command()
        session.send(reply("+OK"))
        session.read_command()
        session.close()  # the second in flight: it may or may not have run

    conn = make_conn(serve(script).port)
    conn.connect()
    messages = [f"sendmsg {UUID_A}\ncall-command: execute\nexecute-app-name: app{n}" for n in range(3)]
    with pytest.raises(EslLostInFlight) as lost:
        conn.send_messages(messages)
    assert lost.value.acknowledged == 1 and not conn.connected
    with pytest.raises(EslNotSent):
        conn.send_messages(messages)


def test_line_breaks_in_commands_are_refused(serve, make_conn) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    for bad in ("status\n\napi hupall", "status\rx"):
        with pytest.raises(ValueError):
            conn.api(bad)
        with pytest.raises(ValueError):
            conn.command(bad)
    with pytest.raises(ValueError):
        conn.bgapi("status", "x\nevent plain ALL")
    assert conn.connected


def test_forged_header_via_encoded_newline(serve, make_conn, recorder) -> None:
    forged = f"Hello%0AUnique-ID%3A%20{UUID_OTHER}".encode()

    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(event_plain({"Event-Name": "CHANNEL_ANSWER", "Unique-ID": UUID_A, "variable_x": forged}))
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    event = recorder.next_event()
    assert event.uuid == UUID_A
    assert event.headers["variable_x"] == f"Hello\nUnique-ID: {UUID_OTHER}"
    assert list(event.headers) == ["Event-Name", "Unique-ID", "variable_x"]


def test_background_job_body_kept_apart_real_trace(serve, make_conn, recorder) -> None:
    chunk = next(c for c in trace_chunks("09_full_call_plain_filtered") if b"Event-Name: BACKGROUND_JOB" in c)

    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(chunk)
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    event = recorder.next_event()
    assert event.name == "BACKGROUND_JOB"
    assert event.body == f"+OK {UUID_A}\n"
    assert event.headers["Job-UUID"] == "d673fbac-777b-4fc7-a16e-08c3e584e32f"
    assert event.headers["Job-Command-Arg"].endswith("sofia/gateway/carrier/15550001001 &park()")
    assert event.headers["Content-Length"] == "41"
    assert event.content_type == "text/event-plain"


def test_eof_ends_reader_without_spinning(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(b"Content-Type: api/resp")  # a partial message, then EOF
        session.close()

    conn = make_conn(serve(script).port)
    conn.connect()
    assert recorder.disconnected.wait(5)
    assert conn._reader is not None
    conn._reader.join(2)
    assert conn._reader.dead
    assert not conn.connected and len(recorder.disconnects) == 1
    with pytest.raises(EslDisconnected):
        conn.api("status")


def test_bad_utf8_and_failing_handler_do_not_kill_reader(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(event_plain({"Event-Name": "CUSTOM", "Unique-ID": UUID_A, "variable_x": b"caf\xe9%FF!"}))
        session.send(event_plain({"Event-Name": "CHANNEL_HANGUP", "Unique-ID": UUID_A}, b"\xff\xfe body"))
        session.send(event_plain({"Event-Name": "CHANNEL_DESTROY", "Unique-ID": UUID_A}))
        assert session.read_command() == b"api status\n\n"
        session.send(api_response(b"UP \xff\n"))
        hold_open(session)

    seen: list[str] = []

    def explode(event: EslEvent) -> None:
        seen.append(event.name or "")
        raise RuntimeError("handler bug")

    conn = make_conn(serve(script).port)
    conn.register_handle("*", explode)
    conn.connect()
    first, second, third = (recorder.next_event() for _ in range(3))
    assert first.headers["variable_x"] == "caf\ufffd\ufffd!"
    assert second.body == "\ufffd\ufffd body"
    assert third.name == "CHANNEL_DESTROY"
    assert seen == ["CUSTOM", "CHANNEL_HANGUP", "CHANNEL_DESTROY"]
    assert conn.api("status") == "UP \ufffd\n"
    assert conn.connected


def test_named_handlers_from_the_registry(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(event_plain({"Event-Name": "CUSTOM", "Event-Subclass": "callbridge::test"}))
        session.send(event_plain({"Event-Name": "CHANNEL_ANSWER", "Unique-ID": UUID_A}))
        hold_open(session)

    got: Queue[str] = Queue()
    conn = make_conn(serve(script).port)
    conn.register_handle("callbridge::test", lambda e: got.put("custom"))
    conn.register_handle("CHANNEL_ANSWER", lambda e: got.put(f"answer {e.uuid}"))
    conn.connect()
    assert [got.get(timeout=5), got.get(timeout=5)] == ["custom", f"answer {UUID_A}"]


def test_linger_notice_keeps_connection(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        session.send(disconnect_notice(linger=True))
        session.send(event_plain({"Event-Name": "HEARTBEAT"}))
        assert session.read_command() == b"exit\n\n"
        session.send(reply("+OK bye") + disconnect_notice())
        session.close()

    conn = make_conn(serve(script).port)
    conn.connect()
    assert recorder.next_event().name == "HEARTBEAT"
    assert conn.lingering and conn.connected
    assert conn.command("exit") == "+OK bye"
    assert recorder.disconnected.wait(5)
    assert not conn.connected


def test_new_connection_after_a_drop(serve, make_conn, recorder) -> None:
    count = []

    def script(session: FakeSession) -> None:
        count.append(1)
        session.handshake()
        if len(count) == 1:
            session.close()  # the first connection drops
            return
        assert session.read_command() == b"api status\n\n"
        session.send(api_response("UP\n"))
        hold_open(session)

    port = serve(script).port
    first = make_conn(port)
    first.connect()
    assert recorder.disconnected.wait(5)
    with pytest.raises(EslError):
        first.connect()
    second = make_conn(port)
    second.connect()
    assert second.api("status") == "UP\n"
    assert not first.connected and second.connected


def test_last_received_tracks_incoming_bytes(serve, make_conn, recorder) -> None:
    def script(session: FakeSession) -> None:
        session.handshake()
        assert session.read_command() == b"api status\n\n"
        session.send(event_plain({"Event-Name": "HEARTBEAT"}) + api_response("UP\n"))
        hold_open(session)

    conn = make_conn(serve(script).port)
    conn.connect()
    before = conn.last_received
    assert conn.api("status") == "UP\n"
    assert conn.last_received > before
    assert recorder.next_event().name == "HEARTBEAT"


def test_traffic_counts_whole_messages_across_connections(serve, make_conn, recorder) -> None:
    """A switch's traffic (its /metrics figures) counts each message once however TCP cuts the stream, and
    goes on counting on the connection that replaces a dropped one."""
    answer = event_plain({"Event-Name": "CHANNEL_ANSWER", "Unique-ID": UUID_A})

    def script(session: FakeSession) -> None:
        session.handshake()  # auth/request in, auth out, its reply in
        assert session.read_command() == b"api status\n\n"
        both = api_response("UP\n") + answer
        session.send(both[:10])  # one reply and one event, cut in the reply's head and in the event
        session.send(both[10:-5])
        session.send(both[-5:])
        hold_open(session)

    traffic = EslTraffic()
    server = serve(script)
    first = make_conn(server.port, traffic=traffic)
    first.connect()
    assert first.api("status") == "UP\n"
    assert recorder.next_event().uuid == UUID_A
    assert (traffic.received, traffic.sent, traffic.writes) == (4, 2, 2)
    first.close()
    second = make_conn(server.port, traffic=traffic)
    second.connect()
    assert second.api("status") == "UP\n"
    assert recorder.next_event().uuid == UUID_A
    assert (traffic.received, traffic.sent, traffic.writes) == (8, 4, 4)
    assert first.traffic is second.traffic is traffic


def test_command_abandoned_by_its_caller_closes_connection(serve, make_conn, recorder) -> None:
    # An outer gevent.Timeout or a kill (engine.stop kills stuck sequences) abandons a command whose bytes
    # are out: its late reply must never become the answer to the next command.
    first_read = Event()

    def script(session: FakeSession) -> None:
        session.handshake()
        assert session.read_command() == b"api first\n\n"
        first_read.set()
        try:
            session.read_command()  # only if the connection outlived the abandoned command
        except SessionClosed:
            return
        session.send(api_response("late answer to first\n") + api_response("second\n"))
        hold_open(session)

    conn = make_conn(serve(script).port, command_timeout=10)
    conn.connect()
    first = gevent.spawn(conn.api, "first")
    assert first_read.wait(5)
    first.kill(block=True, timeout=5)
    assert first.dead
    with pytest.raises(EslDisconnected):
        conn.api("second", timeout=5)
    assert not conn.connected
    assert recorder.disconnected.wait(5)
