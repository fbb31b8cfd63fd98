"""The Event Socket (ESL) client: one authenticated TCP connection to FreeSWITCH.

``EslConnection`` subclasses greenswitch's ``InboundESL`` (the library the project is fixed on) and
keeps its shape: a connection object with ``connect``/``send``/``stop`` and an event handler
registry (``register_handle(name, handler)``). Every part of greenswitch 0.0.19 that misbehaves is
replaced here:

* **One object, one TCP connection.** Reconnecting means building a new ``EslConnection``; a second
  ``connect()`` on a used object raises :class:`EslError` (greenswitch hangs when reused).
* **Everything is bounded.** The TCP connect, the wait for ``auth/request`` and the ``auth`` reply
  are each bounded by ``connect_timeout``; every command by ``command_timeout`` (or its own
  ``timeout``): that long to be written (else it is dropped unsent, :class:`EslNotSent`), and that long
  from its write to its reply. A command whose reply is late, or whose caller is killed or timed out
  from outside after it was written, closes the connection, because a reply that comes later would
  answer the next command.
* **One write in flight, commands coalesced.** Commands queue for the connection's sender greenlet,
  which writes all that are queued in one write, waits for their replies (they come in the order of
  the commands: ``command/reply`` or ``api/response``), then writes the next group. Under load a group
  carries many commands for one round trip instead of one each; idle, a command goes at once. At most
  one command with a ``before_send`` hook (an originate, marked durably right before it leaves) goes
  in a write: if the connection drops, at most one originate's outcome is unknown, as when commands
  went one at a time; the rest stayed queued and are known not sent. FreeSWITCH reads its socket a
  byte at a time and runs each command before reading the next (mod_event_socket's ``read_packet``),
  so commands written together are run and answered one by one. A reply arriving while nothing waits
  is logged and dropped, so it can never shift the replies of later commands.
  :meth:`EslConnection.send_messages` sends several messages of one caller together.
* **Disconnects fail fast.** On EOF, a socket error, a ``text/disconnect-notice`` (other than
  ``linger``), a ``text/rude-rejection`` or ``close()``, the reader stops, the pending command and
  every queued one raise :class:`EslDisconnected`, and ``on_disconnect`` is called exactly once.
* **Parsing is by bytes, header by header** (see :mod:`daemon.switch.protocol`): no forged headers, no
  body glued to a header, no crash on bad UTF-8, no busy loop at EOF.

Events are delivered in the reader greenlet, in wire order: first to ``on_event``, then to the
handlers registered for the event's name (``Event-Subclass`` for ``CUSTOM``, ``log`` for
``log/data``), then to those registered for ``"*"``. Handlers must not block (enqueue and return):
while one runs, no reply can be read either. An exception in a handler is logged and the reader
goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import gevent
import gevent.socket
from gevent.event import AsyncResult, Event
from greenswitch.esl import InboundESL

from daemon.switch.protocol import (
    API_RESPONSE,
    AUTH_REQUEST,
    COMMAND_REPLY,
    DISCONNECT_NOTICE,
    LOG_DATA,
    RUDE_REJECTION,
    EslError,
    EslEvent,
    EslFramer,
    EslProtocolError,
    parse_event_headers,
)

__all__ = [
    "EslAuthError",
    "EslConnection",
    "EslTraffic",
    "EslDisconnected",
    "EslError",
    "EslEvent",
    "EslFramer",
    "EslNotSent",
    "EslProtocolError",
    "EslTimeout",
    "parse_event_headers",
]

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
MAX_WRITE = 100  # commands in one write at most

# Where a queued command is (_Command.state).
QUEUED, TAKEN, SENT, DROPPED = range(4)

EventHandler = Callable[[EslEvent], None]
DisconnectHandler = Callable[[BaseException | None], None]


@dataclass
class EslTraffic:
    """Whole messages over one or more connections (a switch's, across reconnections): what reaches the
    daemon (events, replies, notices) and the commands it sends. Per call, this is most of its CPU."""

    received: int = 0
    sent: int = 0
    writes: int = 0  # the sent commands went in this many writes (one round trip each)


class EslDisconnected(EslError):
    """The connection is gone (or was never made); the command's outcome is unknown."""


class EslNotSent(EslDisconnected):
    """The command never left: no connection, or no turn to send in time. Unlike a command lost in
    flight, it is safe to send again."""


class EslLostInFlight(EslDisconnected):
    """The connection went while several messages sent at once awaited their replies: the first
    ``acknowledged`` were answered; any of the rest may or may not have reached FreeSWITCH (those that
    did form an unbroken run right after the acknowledged ones: it runs them in order)."""

    def __init__(self, message: str, acknowledged: int) -> None:
        super().__init__(message)
        self.acknowledged = acknowledged


class EslTimeout(EslError):
    """Connecting or a command took longer than allowed."""


class EslAuthError(EslError):
    """FreeSWITCH refused us: wrong password (``-ERR invalid``) or an ACL (``text/rude-rejection``)."""


class _Command:
    """One caller's command(s) on their way: queued for the sender, taken (its hook running), sent."""

    __slots__ = ("payloads", "label", "need_auth", "before_send", "on_reply", "done", "replies", "state",
                 "sent_at")

    def __init__(self, payloads: list[bytes], label: str, need_auth: bool,
                 before_send: Callable[[], None] | None, on_reply: Callable[[str], None] | None) -> None:
        self.payloads = payloads
        self.label = label
        self.need_auth = need_auth
        self.before_send = before_send
        self.on_reply = on_reply
        self.done: AsyncResult = AsyncResult()  # every reply, or why there will be none
        self.replies: list[EslEvent] = []
        self.state = QUEUED
        self.sent_at = 0.0


def _check_line(what: str, value: str) -> None:
    # A line break would end the command and start another one on the socket (ESL injection).
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} must not contain CR or LF: {value[:80]!r}")


class EslConnection(InboundESL):
    """An inbound Event Socket connection to FreeSWITCH; use a new object for each connection.

    ``on_event(event)`` and ``on_disconnect(reason)`` run in the reader greenlet (``on_disconnect``
    may instead run in the greenlet that called :meth:`close` or whose command timed out, or in the
    sender's when a write failed) and must not block. ``reason`` is None after :meth:`close`, else the
    exception that ended the connection.
    """

    def __init__(
        self,
        host: str,
        port: int,
        password: str,
        *,
        connect_timeout: float = 5.0,
        command_timeout: float = 5.0,
        on_event: EventHandler | None = None,
        on_disconnect: DisconnectHandler | None = None,
        traffic: EslTraffic | None = None,
    ) -> None:
        # greenswitch's __init__ is not called on purpose: it builds the FIFO reply list, the event
        # queue and the plain ``connected`` attribute that this class replaces. The attributes its
        # remaining helpers (register_handle/unregister_handle) and callers use are set here.
        _check_line("password", password)
        self.host, self.port, self.password = host, port, password
        self.timeout = self.connect_timeout = connect_timeout  # greenswitch's helpers read .timeout
        self.command_timeout = command_timeout
        self.on_event, self.on_disconnect = on_event, on_disconnect
        self.traffic = traffic if traffic is not None else EslTraffic()
        self.event_handlers: dict[str, list[EventHandler]] = {}
        #: ``time.monotonic()`` of the last byte received (for HEARTBEAT / idle watchdogs).
        self.last_received: float = time.monotonic()
        #: True once FreeSWITCH sent a ``linger`` disconnect-notice (the socket stays open).
        self.lingering = False
        self._sock: socket.socket | None = None
        self._framer = EslFramer()
        # Waiting for the sender: commands with a before_send hook (originates, one a write) apart.
        self._queue: collections.deque[_Command] = collections.deque()
        self._hooked: collections.deque[_Command] = collections.deque()
        self._queued = Event()  # wakes the sender
        # Replies awaited, in order: whose, and its reader (run by the reader greenlet on that reply, before
        # the events framed after it: api's on_reply).
        self._pending: collections.deque[tuple[_Command, Callable[[str], None] | None]] = collections.deque()
        self._auth_requested = Event()
        self._reader: gevent.Greenlet | None = None
        self._sender: gevent.Greenlet | None = None
        self._used = False
        self._authenticated = False
        self._closed = False
        self._close_reason: BaseException | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the TCP connection is up and authenticated."""
        return self._authenticated and not self._closed

    @property
    def close_reason(self) -> BaseException | None:
        """Why the connection ended (None while open or after a plain :meth:`close`)."""
        return self._close_reason

    @property
    def address(self) -> str:
        """``host:port`` for messages."""
        return f"{self.host}:{self.port}"

    # -- connecting ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Open the TCP connection, wait for ``auth/request`` and authenticate.

        Each step is bounded by ``connect_timeout``. Raises :class:`EslTimeout`,
        :class:`EslAuthError` (wrong password, ACL refusal) or :class:`EslDisconnected`; on any
        failure the connection is closed. An ``EslConnection`` connects once only.
        """
        if self._used:
            raise EslError("an EslConnection is single-use: build a new one to reconnect")
        self._used = True
        limit = self.connect_timeout
        try:
            sock = gevent.socket.create_connection((self.host, self.port), timeout=limit)
        except TimeoutError as exc:
            raise self._fail(EslTimeout(f"TCP connect to {self.address} took over {limit}s")) from exc
        except OSError as exc:
            raise self._fail(EslDisconnected(f"cannot connect to {self.address}: {exc}")) from exc
        if self._closed:  # close() was called while we were connecting
            sock.close()
            raise self._closed_error()
        sock.settimeout(None)  # the reader waits for events indefinitely; commands use gevent.Timeout
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock = sock
        self.last_received = time.monotonic()
        self._reader = gevent.spawn(self.receive_events)
        self._reader.name = f"esl-reader-{self.address}"
        self._sender = gevent.spawn(self._send_queued)
        self._sender.name = f"esl-sender-{self.address}"

        try:
            if not self._auth_requested.wait(limit):
                raise self._fail(EslTimeout(f"no auth/request from {self.address} within {limit}s"))
            if self._closed:
                raise self._closed_error()
            self.authenticate()
        except BaseException as exc:
            # Also an outer gevent.Timeout or a kill: never leave a half-open socket behind.
            self._shutdown(EslDisconnected(f"connect to {self.address} interrupted: {exc!r}"))
            raise
        log.info("ESL connected and authenticated to %s", self.address)

    def authenticate(self) -> None:
        """Send ``auth``; raise :class:`EslAuthError` (and close) unless FreeSWITCH accepts it."""
        reply = self._transact(
            f"auth {self.password}\n\n".encode(), self.connect_timeout, label="auth", need_auth=False
        )
        text = reply.get("Reply-Text") or ""
        if not text.startswith("+OK"):
            raise self._fail(EslAuthError(f"{self.address} refused the password: {text or reply.body!r}"))
        self._authenticated = True

    # -- commands ------------------------------------------------------------------------------

    def api(self, command: str, timeout: float | None = None, *,
            on_reply: Callable[[str], None] | None = None) -> str:
        """Run ``api <command>`` and return the api/response body (e.g. ``"+OK <uuid>\\n"``).

        If FreeSWITCH answers with a command/reply instead (it does so for ``-ERR command not
        found``), its Reply-Text is returned. A synchronous api that runs long (``originate``)
        needs a ``timeout`` longer than its own run time, or the connection is closed.
        ``on_reply`` gets the same text in the reader greenlet, before any event read after the reply
        is handled: a figure of the switch's (``status``'s sessions) that the events after it adjust.
        """
        _check_line("api command", command)
        return self._text_of(self._transact(f"api {command}\n\n".encode(), timeout, label="api",
                                            on_reply=on_reply))

    def bgapi(self, command: str, job_uuid: str, timeout: float | None = None,
              before_send: Callable[[], None] | None = None) -> str:
        """Run ``bgapi <command>`` under our ``Job-UUID``; return the Reply-Text (``+OK Job-UUID: …``).

        The result arrives later as a ``BACKGROUND_JOB`` event carrying the same ``Job-UUID``.
        ``before_send`` runs once this command has its turn on the connection, right before its bytes
        are written (it holds the turn: at most a short wait, such as a store commit); if it raises,
        nothing is sent and its exception propagates.
        """
        _check_line("bgapi command", command)
        _check_line("job uuid", job_uuid)
        payload = f"bgapi {command}\nJob-UUID: {job_uuid}\n\n".encode()
        return self._text_of(self._transact(payload, timeout, label="bgapi", before_send=before_send))

    def command(self, line: str, timeout: float | None = None) -> str:
        """Send one command/reply command (``event plain …``, ``filter …``, ``noevents``…); return Reply-Text."""
        _check_line("command", line)
        return self._text_of(self._transact(f"{line}\n\n".encode(), timeout, label=line.split(" ", 1)[0]))

    def send_message(self, message: str, timeout: float | None = None) -> EslEvent:
        """Send a whole pre-built message (e.g. ``sendmsg <uuid>`` + headers + body) and return the reply.

        A message without a body gets its terminating blank line added when missing. A message with
        a body must declare it with a matching ``content-length`` header, or FreeSWITCH would read
        the body as further commands; a mismatch raises ValueError before anything is sent.
        """
        payload, label = self._message_payload(message)
        return self._transact(payload, timeout, label=label)

    def send_messages(self, messages: list[str], timeout: float | None = None) -> list[EslEvent]:
        """Send several pre-built messages in one write (each checked as :meth:`send_message` does) and
        return their replies, in order: one round trip and one wake-up of the switch instead of one per
        message. The whole batch has ``timeout``. If the connection goes before every reply is read,
        raises :class:`EslLostInFlight` saying how many were answered (the rest may or may not have
        arrived); :class:`EslNotSent` means none left."""
        built = [self._message_payload(message) for message in messages]
        return self._exchange([payload for payload, _ in built], timeout,
                              label=f"{len(built)} x {built[0][1]}" if built else "nothing")

    @staticmethod
    def _message_payload(message: str) -> tuple[bytes, str]:
        if "\n\n" not in message:
            message += "\n" if message.endswith("\n") else "\n\n"
        head, _, body = message.partition("\n\n")
        payload = message.encode()
        declared = None
        for line in head.split("\n"):
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == "content-length":
                declared = value.strip()
        body_bytes = len(body.encode())
        if body_bytes and (declared is None or not declared.isdigit() or int(declared) != body_bytes):
            raise ValueError(f"message body is {body_bytes} bytes but content-length is {declared!r}")
        return payload, head.split(" ", 1)[0].split("\n", 1)[0]

    def send(self, data: str, timeout: float | None = None) -> EslEvent:
        """greenswitch's name for :meth:`send_message`."""
        return self.send_message(data, timeout)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection (idempotent): pending commands raise EslDisconnected."""
        self._shutdown(None)

    def stop(self) -> None:
        """greenswitch's name for :meth:`close`."""
        self.close()

    def __enter__(self) -> EslConnection:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the reader ----------------------------------------------------------------------------

    def receive_events(self) -> None:
        """The reader greenlet: socket → framer → :meth:`handle_event`, until EOF or error."""
        sock = self._sock
        assert sock is not None
        reason: BaseException = EslDisconnected(f"ESL reader for {self.address} stopped")
        try:
            while not self._closed:
                try:
                    data = sock.recv(READ_SIZE)
                except OSError as exc:
                    reason = EslDisconnected(f"socket error on {self.address}: {exc}")
                    break
                if not data:
                    reason = EslDisconnected(f"{self.address} closed the connection")
                    if self._framer.buffered:
                        log.warning("ESL EOF with %d bytes of a partial message", self._framer.buffered)
                    break
                self.last_received = time.monotonic()
                try:
                    messages = self._framer.feed(data)
                except EslProtocolError as exc:
                    reason = exc
                    break
                self.traffic.received += len(messages)
                for message in messages:
                    try:
                        self.handle_event(message)
                    except Exception:
                        log.exception("ESL message handling failed: %r", message)
        finally:
            self._shutdown(reason)

    def handle_event(self, message: EslEvent) -> None:
        """Route one framed message by its Content-Type (called in the reader greenlet)."""
        kind = message.content_type
        if kind in (COMMAND_REPLY, API_RESPONSE):
            command, reader = self._pending.popleft() if self._pending else (None, None)
            if command is None or command.done.ready():
                log.warning(
                    "dropped a %s nobody was waiting for: %r",
                    kind,
                    (message.get("Reply-Text") or message.body)[:200],
                )
                return
            if reader is not None:
                self._call_handler(lambda reply: reader(self._text_of(reply)), message)
            command.replies.append(message)
            if len(command.replies) == len(command.payloads):
                command.done.set(command.replies)
        elif message.is_event:
            self._dispatch(message)
        elif kind == AUTH_REQUEST:
            self._auth_requested.set()
        elif kind == DISCONNECT_NOTICE:
            self._run_handler(self.event_handlers.get("DISCONNECT", ()), message)
            if message.get("Content-Disposition") == "linger":
                log.info("ESL %s: session ended, socket lingering (%s)", self.address, message.headers)
                self.lingering = True
            else:
                self._shutdown(EslDisconnected(f"{self.address} said: {message.body.strip()!r}"))
        elif kind == RUDE_REJECTION:
            self._shutdown(EslAuthError(f"{self.address} rejected the connection: {message.body.strip()!r}"))
        else:
            log.warning("ignored ESL message with Content-Type %r", kind)

    # -- internals -----------------------------------------------------------------------------

    def _dispatch(self, event: EslEvent) -> None:
        if self.on_event is not None:
            self._call_handler(self.on_event, event)  # not through _run_handler's copied list: every event
        if not self.event_handlers:  # the daemon's own connections route through on_event alone
            return
        if event.content_type == LOG_DATA:
            key = "log"
        elif event.name == "CUSTOM":
            key = event.get("Event-Subclass") or "CUSTOM"
        else:
            key = event.name or ""
        self._run_handler(self.event_handlers.get(key, ()), event)
        self._run_handler(self.event_handlers.get("*", ()), event)

    @staticmethod
    def _run_handler(handlers: tuple[EventHandler, ...] | list[EventHandler], event: EslEvent) -> None:
        for handler in list(handlers):
            EslConnection._call_handler(handler, event)

    @staticmethod
    def _call_handler(handler: EventHandler, event: EslEvent) -> None:
        """A handler's failure is logged, never raised into the reader (the next events still arrive)."""
        try:
            handler(event)
        except Exception:
            log.exception("ESL event handler %r failed on %r", handler, event)

    @staticmethod
    def _text_of(reply: EslEvent) -> str:
        if reply.content_type == API_RESPONSE:
            return reply.body
        return reply.get("Reply-Text") or ""

    def _transact(
        self, payload: bytes, timeout: float | None, *, label: str, need_auth: bool = True,
        before_send: Callable[[], None] | None = None, on_reply: Callable[[str], None] | None = None,
    ) -> EslEvent:
        """Send one command and wait for its reply."""
        return self._exchange([payload], timeout, label=label, need_auth=need_auth, before_send=before_send,
                              on_reply=on_reply)[0]

    def _exchange(
        self, payloads: list[bytes], timeout: float | None, *, label: str, need_auth: bool = True,
        before_send: Callable[[], None] | None = None, on_reply: Callable[[str], None] | None = None,
    ) -> list[EslEvent]:
        """Queue the commands for the sender (they go in one write) and wait for their replies; ``on_reply``
        reads the last one's text in the reader (see :meth:`api`)."""
        limit = self.command_timeout if timeout is None else timeout
        current = gevent.getcurrent()
        if current is self._reader or current is self._sender:
            # The reply could only be read (or the command written) by this very greenlet.
            raise EslError(f"{label}: commands cannot be sent from an event handler or a before_send hook")
        self._usable_or_not_sent(need_auth)
        command = _Command(payloads, label, need_auth, before_send, on_reply)
        self._line_of(command).append(command)
        self._queued.set()
        done = command.done
        try:
            done.wait(limit)
            while not done.ready():
                if command.state == QUEUED:
                    # Waiting for a write sends nothing, so running out of time here leaves the stream intact.
                    self._unqueue(command)
                    raise EslNotSent(f"{label}: no turn to send within {limit}s (other commands in flight)")
                if command.state == SENT:
                    left = command.sent_at + limit - time.monotonic()
                    if left <= 0:
                        error: EslError = EslTimeout(
                            f"{label}: no reply from {self.address} within {limit}s; connection closed")
                        raise self._lost(self._fail(error), len(payloads), len(command.replies))
                    done.wait(left)
                else:  # TAKEN: its hook runs (a store commit, bounded by the store's own wait)
                    done.wait(limit)
        except EslError:
            raise
        except BaseException as exc:
            # Killed, or an outer gevent.Timeout: never sent is safe; written, its reply can no longer be read.
            if command.state == QUEUED:
                self._unqueue(command)
            elif command.state == TAKEN:
                command.state = DROPPED
            elif command.state == SENT and not done.ready():
                self._abandon(label, exc)
            raise
        if done.successful():
            return command.replies
        error = done.exception
        if isinstance(error, EslError) and not isinstance(error, EslNotSent) and command.state == SENT:
            raise self._lost(error, len(payloads), len(command.replies))  # the connection went meanwhile
        raise error

    def _line_of(self, command: _Command) -> collections.deque[_Command]:
        """Where it waits: originates (a hook) apart, one a write; the other commands all go in the next."""
        return self._queue if command.before_send is None else self._hooked

    def _unqueue(self, command: _Command) -> None:
        with contextlib.suppress(ValueError):  # (gone already if the connection closed)
            self._line_of(command).remove(command)

    def _send_queued(self) -> None:
        """The sender greenlet: writes what is queued, a write at a time, until the connection closes."""
        try:
            while not self._closed:
                if not self._queue and not self._hooked:
                    self._queued.clear()
                    self._queued.wait()
                    continue
                hooked = self._run_first_hook()
                self._write(hooked + self._take_unhooked())
        except BaseException as exc:  # a bug, or killed: never leave callers waiting on a sender that is gone
            if not isinstance(exc, gevent.GreenletExit):
                log.exception("ESL sender for %s failed", self.address)
            self._shutdown(EslDisconnected(f"ESL sender for {self.address} stopped: {exc!r}"))
            raise

    def _run_first_hook(self) -> list[_Command]:
        """Take the first queued command with a ``before_send`` hook (an originate) and run its hook: it goes
        in the next write unless the hook raised (its caller gets the error; nothing of it is sent) or its
        caller left meanwhile. One such command a write: the rest wait for the writes after, in order."""
        if not self._hooked:
            return []
        command = self._hooked.popleft()
        command.state = TAKEN
        assert command.before_send is not None
        try:
            command.before_send()
        except Exception as exc:
            command.done.set_exception(exc)
            return []
        return [command] if command.state == TAKEN else []

    def _take_unhooked(self) -> list[_Command]:
        """Every queued command without a hook (up to MAX_WRITE), in order."""
        queue = self._queue
        taken: list[_Command] = []
        while queue and len(taken) < MAX_WRITE:
            command = queue.popleft()
            command.state = TAKEN
            taken.append(command)
        return taken

    def _write(self, commands: list[_Command]) -> None:
        """Write the commands in one write, then wait until they are all answered or the connection went
        (their callers time the replies out)."""
        if not commands:
            return
        try:
            sock = self._check_usable(any(command.need_auth for command in commands))
        except EslDisconnected as exc:  # it may have gone while a hook waited: then nothing left
            for command in commands:
                command.done.set_exception(EslNotSent(str(exc)))
            return
        now = time.monotonic()
        for command in commands:
            command.state, command.sent_at = SENT, now
            last = len(command.payloads) - 1
            # Registered before sending: a reply may be read before the send returns.
            self._pending.extend((command, command.on_reply if i == last else None) for i in range(last + 1))
        payloads = [payload for command in commands for payload in command.payloads]
        payload = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        try:
            sent = sock.send(payload)  # commands fit the send buffer: one call, not sendall's three
            if sent < len(payload):
                sock.sendall(payload[sent:])
        except OSError as exc:
            self._fail(EslDisconnected(f"{commands[-1].label}: send to {self.address} failed: {exc}"))
            return
        self.traffic.sent += len(payloads)
        self.traffic.writes += 1
        # The last command's replies come after all the others' (or the connection goes, failing them all).
        commands[-1].done.wait()

    @staticmethod
    def _lost(error: EslError, sent: int, answered: int) -> EslError:
        """A single command's own error; for several, how many of them were answered."""
        if sent == 1:
            return error
        return EslLostInFlight(f"{error} ({answered} of {sent} commands answered)", acknowledged=answered)

    def _abandon(self, label: str, exc: BaseException) -> None:
        # The caller was killed or timed out from outside while its bytes may be out: the reply that
        # comes later would be taken as the next command's, so the connection cannot be trusted.
        self._shutdown(EslDisconnected(f"{label}: abandoned before its reply ({exc!r}); connection closed"))

    def _usable_or_not_sent(self, need_auth: bool) -> socket.socket:
        try:
            return self._check_usable(need_auth)
        except EslDisconnected as exc:
            raise EslNotSent(str(exc)) from None

    def _check_usable(self, need_auth: bool) -> socket.socket:
        if self._closed:
            raise self._closed_error()
        if self._sock is None or (need_auth and not self._authenticated):
            raise EslDisconnected(f"not connected to {self.address}: call connect() first")
        return self._sock

    def _closed_error(self) -> EslError:
        reason = self._close_reason
        if isinstance(reason, EslAuthError):
            return EslAuthError(str(reason))
        if reason is None:
            return EslDisconnected(f"connection to {self.address} was closed")
        return EslDisconnected(f"connection to {self.address} is gone: {reason}")

    def _fail(self, error: EslError) -> EslError:
        """Close because of ``error`` and return it for the caller to raise."""
        self._shutdown(error)
        return error

    def _shutdown(self, reason: BaseException | None) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_reason = reason
        self._authenticated = False
        if reason is not None:
            log.warning("ESL connection to %s closed: %s", self.address, reason)
        sock, self._sock = self._sock, None
        if sock is not None:
            # Wakes the reader if it waits in recv() (gevent raises EBADF there).
            sock.close()
        pending, self._pending = self._pending, collections.deque()
        for command, _ in pending:
            if not command.done.ready():
                command.done.set_exception(self._closed_error())
        queued = [*self._hooked, *self._queue]
        self._hooked, self._queue = collections.deque(), collections.deque()
        for command in queued:  # never written: safe to send again
            command.done.set_exception(EslNotSent(str(self._closed_error())))
        self._queued.set()  # the sender sees the connection closed and ends
        self._auth_requested.set()
        if self.on_disconnect is not None:
            try:
                self.on_disconnect(reason)
            except Exception:
                log.exception("ESL on_disconnect handler failed")

    # greenswitch internals this class replaces; they must not run on an EslConnection.
    def start_event_handlers(self) -> None:
        """Not used: :meth:`connect` starts the single reader greenlet."""
        raise NotImplementedError("EslConnection delivers events from its reader greenlet")

    def process_events(self) -> None:
        """Not used: events are delivered by the reader greenlet, without an unbounded queue."""
        raise NotImplementedError("EslConnection delivers events from its reader greenlet")

    def _read_socket(self, *args: object) -> None:
        raise NotImplementedError("EslConnection reads through EslFramer")
