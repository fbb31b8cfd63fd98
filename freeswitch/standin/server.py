"""The stand-in as a whole: the listening socket, its connections, and the faults tests inject."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import socket
from gevent.event import Event as GEvent

from .channel import Channel
from .commands import Api, uptime_text
from .connection import Connection
from .core import Switch
from .limits import DEFAULT_MAX_SESSIONS, DEFAULT_SPS
from .plan import far_end_hangup
from .protocol import RUDE_REJECTION

HEARTBEAT_INTERVAL = 20.0  # plan seconds


@dataclass(frozen=True)
class ReceivedCommand:
    """One message received on an ESL connection."""

    conn_id: int
    at: float
    text: str


class StandIn:
    """A FreeSWITCH Event Socket stand-in following the test number plan."""

    def __init__(self, host: str = "127.0.0.1", port: int = 8021, password: str = "ClueCon",
                 time_scale: float = 1.0, sps: int = DEFAULT_SPS, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 far_end_sessions: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.port = port
        self.password = password
        self.time_scale = time_scale
        # switch.conf.xml's values: what a (re)started switch begins with, whatever fsctl changed since.
        self.sps, self.max_sessions, self.far_end_sessions = sps, max_sessions, far_end_sessions
        self.clock = clock  # the sessions-per-second tick's clock (tests pass one they move by hand)
        self.switch = self._new_switch()
        self.api = Api(self.switch, self._introspect, self.channel)
        self.commands: list[ReceivedCommand] = []
        self.connections: set[Connection] = set()
        self.gate = GEvent()
        self.gate.set()
        self.reply_delay = 0.0
        self._hang_until = 0.0
        self._listener: socket.socket | None = None
        self._accepter: gevent.Greenlet | None = None
        self._heartbeat: gevent.Greenlet | None = None
        self._conn_seq = 0
        self._refusing = False
        self._rude = False
        self._history: dict[str, Channel] = {}
        self._refused: Counter[str] = Counter()  # refusals of the switches before a restart
        self._created: Counter[str] = Counter()  # legs created by the switches before a restart
        # Tests' faults aimed at one received message (fault_after): (matches its text, the fault), each once.
        self._after_message: list[tuple[Callable[[str], bool], Callable[[], None]]] = []

    # ----- lifecycle -------------------------------------------------------------------------
    def _new_switch(self) -> Switch:
        return Switch(self.time_scale, sps=self.sps, max_sessions=self.max_sessions,
                      far_end_sessions=self.far_end_sessions, clock=self.clock)

    @property
    def core_uuid(self) -> str:
        """Core-UUID of the current switch (changes on restart())."""
        return self.switch.core_uuid

    def start(self) -> StandIn:
        """Bind and listen; returns once connections are accepted (self.port is the bound port)."""
        self._listen()
        self._heartbeat = gevent.spawn(self._heartbeat_loop)
        return self

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        self._listener = sock
        self._accepter = gevent.spawn(self._accept_loop, sock)

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                client, _ = sock.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._rude:
                gevent.spawn(self._reject, client)
                continue
            self._conn_seq += 1
            conn = Connection(self, client, self._conn_seq)
            self.connections.add(conn)
            gevent.spawn(conn.run)

    @staticmethod
    def _reject(client: socket.socket) -> None:
        try:
            client.sendall(RUDE_REJECTION)
        except OSError:
            pass
        finally:
            client.close()

    def _unlisten(self) -> None:
        # The accepter first: a listening socket closed while a greenlet still waits in accept() on it stays
        # open until that greenlet runs, and listening again at once would find the port taken.
        if self._accepter is not None:
            self._accepter.kill(block=True)
            self._accepter = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def stop(self) -> None:
        """Stop listening, drop every connection and end every channel silently."""
        self._unlisten()
        if self._heartbeat is not None:
            self._heartbeat.kill(block=False)
        self.drop_connections()
        self.switch.vanish()

    def _heartbeat_loop(self) -> None:
        while True:
            gevent.sleep(self.switch.real(HEARTBEAT_INTERVAL))
            self.gate.wait()
            sw = self.switch
            ev = sw.events.new("HEARTBEAT", ("switch_core.c", "send_heartbeat", 95))
            up = sw.uptime()
            ev.add("Event-Info", "System Ready")
            ev.add("Up-Time", uptime_text(sw))
            ev.add("FreeSWITCH-Version", "1.10.12-release~64bit")
            ev.add("Uptime-msec", int(up * 1000))
            for name, value in sw.limits.heartbeat_headers():
                ev.add(name, value)
            ev.add("Idle-CPU", "98.000000")
            sw.fire(ev)
            # The core scheduler re-arms the heartbeat task and says so.
            again = sw.events.new("RE_SCHEDULE", ("switch_scheduler.c", "switch_scheduler_execute", 73))
            again.add("Task-ID", 1)
            again.add("Task-Desc", "heartbeat")
            again.add("Task-Group", "core")
            again.add("Task-Runtime", int(time.time() + sw.real(HEARTBEAT_INTERVAL)))
            sw.fire(again)

    # ----- connection bookkeeping ---------------------------------------------------------------
    def subscribe(self, conn: Connection) -> None:
        """An authenticated connection starts receiving events it subscribes to."""
        self.switch.sinks.add(conn)

    def forget(self, conn: Connection) -> None:
        """A connection went away."""
        self.connections.discard(conn)
        self.switch.sinks.discard(conn)

    def receive(self, conn_id: int, sock: socket.socket) -> bytes:
        """Read what a connection's client sent next (b"" at its end). A seam for the bench's timing tap."""
        return sock.recv(65536)

    def sent(self, conn_id: int, data: bytes) -> None:
        """``data`` was handed to a connection's socket. A seam for the bench's timing tap."""

    def record_command(self, conn_id: int, text: str) -> None:
        """Log one received message (StandIn.commands)."""
        self.commands.append(ReceivedCommand(conn_id, time.monotonic(), text))

    def handled(self, text: str) -> None:
        """A received message was handled: inject the fault aimed at it, if any (:meth:`fault_after`)."""
        for aimed in self._after_message:
            matches, fault = aimed
            if matches(text):
                self._after_message.remove(aimed)
                fault()
                return

    # ----- introspection ---------------------------------------------------------------------
    def channel(self, uuid: str) -> Channel | None:
        """The channel with that uuid, live or ended (across restarts), or None."""
        return self.switch.all_channels.get(uuid) or self._history.get(uuid)

    def refusals(self, uuid: str) -> int:
        """How many times the switch refused a session asked for under that origination_uuid (over its
        limits: nothing was created), across restarts."""
        return self._refused[uuid] + self.switch.refused[uuid]

    def creations(self, uuid: str) -> int:
        """How many times a leg with that uuid was created (its session admitted, so dialed), across
        restarts."""
        return self._created[uuid] + self.switch.created[uuid]

    def channels_live(self) -> list[Channel]:
        """Channels that still exist."""
        return list(self.switch.channels.values())

    def heard(self, uuid: str) -> list[dict[str, Any]]:
        """What the person on that leg heard: [{start, end, kind, source}], plan seconds."""
        ch = self.channel(uuid)
        return ch.heard_list() if ch else []

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.002) -> bool:
        """Wait (cooperatively) until predicate() is true; False on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate():
                return True
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(interval)

    def far_end_hangup(self, uuid: str) -> bool:
        """The far-end phone of that leg hangs up (BYE: NORMAL_CLEARING, recv_bye)."""
        ch = self.switch.locate(uuid)
        return far_end_hangup(ch) if ch else False

    def send_dtmf(self, uuid: str, digits: str) -> bool:
        """The far end of that leg presses digits (DTMF events; feeds play_and_get_digits)."""
        from .plan import send_dtmf

        ch = self.switch.locate(uuid)
        if ch is None:
            return False
        for d in digits:
            send_dtmf(ch, d)
        return True

    def _introspect(self, args: str) -> str:
        parts = args.split()
        if parts[:1] == ["commands"]:
            return json.dumps([{"conn_id": c.conn_id, "at": c.at, "text": c.text} for c in self.commands]) + "\n"
        return "-ERR unknown standin command\n"

    # ----- faults ----------------------------------------------------------------------------
    def drop_connections(self) -> None:
        """Close every ESL connection abruptly (channels stay up)."""
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()

    def fault_after(self, matches: Callable[[str], bool], fault: Callable[[], None]) -> None:
        """Stand-in only, for tests (FreeSWITCH has no such control): once, right after the first received
        message whose text ``matches`` has been handled, call ``fault``, before anything else is read or
        written, its reply included (for the commands answered at once, such as ``sendmsg`` and ``api
        uuid_break``). With :meth:`drop_connections` it loses a write in flight at a chosen message: that
        one and those before it took effect, the rest of the write never arrives, and no reply leaves."""
        self._after_message.append((matches, fault))

    def hang(self, seconds: float) -> None:
        """Stop reading and writing for that many real seconds (sockets stay open)."""
        until = time.monotonic() + seconds
        self._hang_until = max(self._hang_until, until)
        self.gate.clear()
        gevent.spawn_later(seconds, self._unhang)

    def _unhang(self) -> None:
        # gevent's timers run on its cached loop time, which can lag the monotonic clock: re-arm for
        # whatever is left rather than stay hung for good.
        left = self._hang_until - time.monotonic()
        if left > 0.001:
            gevent.spawn_later(left, self._unhang)
        else:
            self.gate.set()

    def restart(self) -> None:
        """All channels vanish without events, connections drop, a new Core-UUID; keep listening."""
        self.drop_connections()
        self._history.update(self.switch.all_channels)
        self._refused.update(self.switch.refused)
        self._created.update(self.switch.created)
        self.switch.vanish()
        self.switch = self._new_switch()
        self.api = Api(self.switch, self._introspect, self.channel)

    def refuse_connections(self, flag: bool, rude: bool = False) -> None:
        """While True, connection attempts are refused: the port is closed (switch down), or with
        rude=True accepted and answered ``text/rude-rejection`` as FreeSWITCH's ACL does."""
        self._rude = flag and rude
        if flag and not rude and not self._refusing:
            self._refusing = True
            self._unlisten()
        elif (not flag or rude) and self._refusing:
            self._refusing = False
            self._listen()

    def slow_replies(self, seconds: float) -> None:
        """Delay every command reply by that many real seconds (0 to stop)."""
        self.reply_delay = max(0.0, seconds)
