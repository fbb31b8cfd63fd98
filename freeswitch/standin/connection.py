"""One inbound ESL connection: auth, commands, event subscriptions and filters."""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

import gevent
from gevent.queue import Queue

from .causes import parse_cause
from .channel import QueuedApp
from .events import KNOWN_EVENTS, Event
from .protocol import (
    AUTH_REQUEST,
    Message,
    MessageReader,
    api_response,
    command_reply,
    disconnect_notice,
    linger_notice,
)

if TYPE_CHECKING:
    from gevent.socket import socket

    from .server import StandIn

# The event types `myevents` subscribes to (mod_event_socket), for the one channel only.
MYEVENTS = frozenset({
    "CHANNEL_ANSWER", "CHANNEL_APPLICATION", "CHANNEL_BRIDGE", "CHANNEL_CREATE", "CHANNEL_DATA", "CHANNEL_DESTROY",
    "CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_ORIGINATE",
    "CHANNEL_UUID", "CHANNEL_OUTGOING", "CHANNEL_PARK", "CHANNEL_PROGRESS", "CHANNEL_PROGRESS_MEDIA",
    "CHANNEL_STATE", "CHANNEL_UNBRIDGE", "CHANNEL_UNPARK", "DETECTED_SPEECH", "DTMF", "NOTALK", "TALK",
})
LOG_LEVELS = {"console": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}
LOG_INVALID = 64  # SWITCH_LOG_INVALID
_CLOSE = b""


class Connection:
    """Serves one client socket until exit, auth failure, drop or stop."""

    def __init__(self, standin: StandIn, sock: socket, conn_id: int) -> None:
        self.standin = standin
        self.sock = sock
        self.conn_id = conn_id
        self.authed = False
        self.fmt = "plain"
        self.listening = False
        self.all_events = False
        self.events: set[str] = set()
        self.custom: set[str] = set()
        self.filters: list[tuple[str, str]] = []
        self.log_level: int | None = None
        self.myevents: str | None = None
        self.myevents_done = False
        self.controls_session = False
        self.linger = False
        self.closed = False
        self.outq: Queue[bytes] = Queue()
        # Like mod_event_socket's single listener thread: events raised while a command runs
        # (e.g. a synchronous `api originate`) go out after that command's reply.
        self.holding = False
        self.held: list[bytes] = []
        self._close_pending = False
        self._writer: gevent.Greenlet | None = None

    # ----- lifecycle -------------------------------------------------------------------------
    def run(self) -> None:
        """Reader loop (the writer runs in its own greenlet)."""
        self._writer = gevent.spawn(self._write_loop)
        self.outq.put(AUTH_REQUEST)
        reader = MessageReader()
        try:
            while not self.closed:
                try:
                    data = self.standin.receive(self.conn_id, self.sock)
                except OSError:
                    break
                if not data:
                    break
                for msg in reader.feed(data):
                    self.standin.gate.wait()
                    if self.closed:
                        break
                    self.standin.record_command(self.conn_id, msg.raw)
                    self.handle(msg)
                    self.standin.handled(msg.raw)
        finally:
            self.close(flush=False)

    def _write_loop(self) -> None:
        while True:
            data = self.outq.get()
            self.standin.gate.wait()
            if data is _CLOSE:
                break
            try:
                self.sock.sendall(data)
            except OSError:
                break
            self.standin.sent(self.conn_id, data)
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        self.closed = True
        self.standin.forget(self)
        with contextlib.suppress(OSError):
            self.sock.close()

    def close(self, flush: bool = True) -> None:
        """Close after everything queued is written (flush) or at once."""
        if self.closed and not flush:
            return
        self.closed = True
        self.standin.forget(self)
        if flush and self.holding:
            self._close_pending = True  # after the held events
        elif flush:
            self.outq.put(_CLOSE)
        else:
            self.abort()

    def abort(self) -> None:
        """Drop the TCP connection abruptly."""
        self.closed = True
        self.standin.forget(self)
        if self._writer is not None and self._writer is not gevent.getcurrent():
            self._writer.kill(block=False)
        with contextlib.suppress(OSError):
            self.sock.close()

    # ----- output ------------------------------------------------------------------------------
    def reply(self, data: bytes) -> None:
        """Queue a command reply (after the injected reply delay, if any)."""
        delay = self.standin.reply_delay
        if delay > 0:
            gevent.sleep(delay)
        if not self.closed:
            self.outq.put(data)

    def wants(self, name: str, uuid: str | None) -> bool:
        """Cheap pre-check (before an event is even built): could this connection want it?"""
        if self.closed or not self.authed:
            return False
        if self.myevents is not None:
            return uuid == self.myevents and not self.myevents_done and name in MYEVENTS
        return self.listening and (self.all_events or name in self.events or name == "CUSTOM")

    def deliver(self, event: Event) -> None:
        """Queue an event if this connection subscribed to it and its filters let it through."""
        if self.closed or not self.authed:
            return
        if self.myevents is not None:
            if event.get("Unique-ID") != self.myevents or self.myevents_done or event.name not in MYEVENTS:
                return
            self._queue(event.frame("plain"))
            if event.name == "CHANNEL_HANGUP_COMPLETE":
                self._myevents_ended(event)
            return
        if not self.listening:
            return
        if not self.all_events:
            if event.name not in self.events:
                return
            if event.name == "CUSTOM" and event.subclass and event.subclass not in self.custom:
                return
        if self.filters and not self._passes_filters(event):
            return
        self._queue(event.frame(self.fmt))

    def _queue(self, data: bytes) -> None:
        if self.holding:
            self.held.append(data)
        else:
            self.outq.put(data)

    def _passes_filters(self, event: Event) -> bool:
        """mod_event_socket's event_handler: positive filters let an event through when one matches, a
        negative one (value led by `-`) that matches drops it; filters on headers the event lacks
        do not count."""
        send = False
        for header, value in self.filters:
            actual = _header(event, header)
            if actual is None:
                continue
            positive, wanted = _filter_sign(value)
            if (send and positive) or not wanted:
                continue
            if _filter_matches(actual, wanted, regex=value.startswith("/")):
                if not positive:
                    return False
                send = True
        return send

    def _myevents_ended(self, event: Event) -> None:
        self.myevents_done = True
        uuid = self.myevents or ""
        self._queue(linger_notice(uuid, event.get("Channel-Name") or "", self.linger))
        if not self.linger:
            self.close()

    # ----- commands ---------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Dispatch one client message."""
        cmd, _, args = msg.command.partition(" ")
        cmd, args = cmd.lower(), args.strip()  # parse_command matches with strncasecmp
        if msg.command[:4].lower() == "exit" or msg.command.startswith("..."):
            cmd = "exit"  # parse_command's first test, made before the auth check
        if not self.authed:
            if cmd == "exit":
                self.cmd_exit(args, msg)
            elif cmd == "auth":
                self._auth(args)
            else:
                self.reply(command_reply("-ERR command not found"))
            return
        handler = getattr(self, f"cmd_{cmd}", None)
        if handler is None:
            self.reply(command_reply("-ERR command not found"))
            return
        self.holding = True
        try:
            handler(args, msg)
        finally:
            self.holding = False
            held, self.held = self.held, []
            for data in held:
                self.outq.put(data)
            if self._close_pending:
                self.outq.put(_CLOSE)

    def _auth(self, password: str) -> None:
        if password == self.standin.password:
            self.authed = True
            self.standin.subscribe(self)
            self.reply(command_reply("+OK accepted"))
        else:
            self.reply(command_reply("-ERR invalid"))
            self.held = []
            self.outq.put(disconnect_notice())
            self.close()

    def cmd_exit(self, args: str, msg: Message) -> None:
        """exit: +OK bye, the disconnect notice, then close."""
        self.reply(command_reply("+OK bye"))
        self.held = []  # nothing follows the goodbye
        # A connection that controls a session (myevents) says goodbye naming that session.
        controlled = self.myevents if self.controls_session else None
        self.outq.put(disconnect_notice() if controlled is None else linger_notice(controlled, "", False))
        self.close()

    def cmd_api(self, args: str, msg: Message) -> None:
        """api <command>: run it and answer api/response."""
        result = self.standin.api.execute(args)
        # api_exec: an empty output is answered "-ERR no reply\n" (bgapi's BACKGROUND_JOB keeps it empty).
        self.reply(api_response(result or "-ERR no reply\n"))

    def cmd_bgapi(self, args: str, msg: Message) -> None:
        """bgapi <command>: +OK Job-UUID now, BACKGROUND_JOB with the output later."""
        job = msg.header("Job-UUID") or self.standin.switch.new_uuid()
        self.reply(command_reply(f"+OK Job-UUID: {job}", [("Job-UUID", job)]))
        gevent.spawn(self._bg_job, job, args)

    def _bg_job(self, job: str, line: str) -> None:
        sw = self.standin.switch
        result = self.standin.api.execute(line)
        if sw is not self.standin.switch:
            return  # the switch restarted meanwhile: the job died with it
        ev = sw.events.new("BACKGROUND_JOB", ("mod_event_socket.c", "api_exec", 1572))
        cmd, _, cargs = line.strip().partition(" ")
        ev.add("Job-UUID", job)
        ev.add("Job-Command", cmd)
        if cargs.strip():
            ev.add("Job-Command-Arg", cargs.strip())
        ev.body = result
        sw.fire(ev)

    def cmd_event(self, args: str, msg: Message) -> None:
        """event [plain|json|xml] <names...|ALL|CUSTOM subclasses...>.

        As parse_command: a first word naming a format sets it at once (even when no keyword follows);
        without one the listener keeps its format. Every word after CUSTOM is a subclass."""
        words = args.split()
        if words and words[0].lower() in ("plain", "json", "xml"):
            self.fmt = words.pop(0).lower()
        if not self._subscribe(words):
            self.reply(command_reply("-ERR no keywords supplied"))
            return
        self.listening = True
        self.reply(command_reply(f"+OK event listener enabled {self.fmt}"))

    def _subscribe(self, words: list[str]) -> bool:
        """Add the event names (and CUSTOM subclasses) in words; False when none was an event name."""
        custom = False
        found = False
        for w in words:
            if custom:
                self.custom.add(w)
            elif w == "ALL":
                self.all_events = found = True
            elif w in KNOWN_EVENTS:
                self.events.add(w)
                found = True
                custom = w == "CUSTOM"
        return found

    def cmd_nixevent(self, args: str, msg: Message) -> None:
        """nixevent <names...>: stop receiving those events (parse_command's `nixevent` branch)."""
        if not self._unsubscribe(args.split()):
            self.reply(command_reply("-ERR no keywords supplied"))
            return
        self.listening = True
        self.reply(command_reply("+OK events nixed"))

    def _unsubscribe(self, words: list[str]) -> bool:
        """Drop the named events; a name while ALL is on leaves every other event on. After CUSTOM the
        words are subclasses (CUSTOM itself stays on). False when no word was an event name."""
        custom = False
        found = False
        for w in words:
            if custom:
                self.custom.discard(w)
            elif w in KNOWN_EVENTS:
                found = True
                if w == "CUSTOM":
                    custom = True
                elif w == "ALL":
                    self.all_events = False
                    self.events.clear()
                else:
                    self._drop_event(w)
        return found

    def _drop_event(self, name: str) -> None:
        if self.all_events:
            self.all_events = False
            self.events = set(KNOWN_EVENTS - {"ALL"})
        self.events.discard(name)

    def cmd_noevents(self, args: str, msg: Message) -> None:
        """noevents: stop receiving events."""
        if not self.listening:
            self.reply(command_reply("-ERR not listening for events"))
            return
        self.listening = False
        self.all_events = False
        self.events.clear()
        self.custom.clear()
        self.reply(command_reply("+OK no longer listening for events"))

    def cmd_filter(self, args: str, msg: Message) -> None:
        """filter [add] <header> <value|/regex/> and filter delete <header> [value]|all.

        As mod_event_socket's parse_command: a header without a value is `-ERR invalid syntax`, and
        an `add` keyword before the header is skipped."""
        header, value = _first_word(args)
        if not header:
            self.reply(command_reply("-ERR command not found"))
        elif not value:
            self.reply(command_reply("-ERR invalid syntax"))
        elif header.lower() == "delete":
            self._delete_filter(*_first_word(value))
        else:
            self._add_filter(*_first_word(value) if header.lower() == "add" else (header, value))

    def _add_filter(self, header: str, value: str) -> None:
        """Add one filter; `filter add <header>` alone adds nothing (a NULL value) yet says +OK."""
        if value:
            self.filters.append((header, value))
        self.reply(command_reply(f"+OK filter added. [{header}]=[{value or '(null)'}]"))

    def _delete_filter(self, header: str, value: str) -> None:
        """filter delete all | <header> (all its filters) | <header> <value> (that one)."""
        if header.lower() == "all":
            self.filters.clear()
        else:
            self.filters = [f for f in self.filters if f[0] != header or (value and f[1] != value)]
        self.reply(command_reply(f"+OK filter deleted. [{header}][{value}]"))

    def cmd_log(self, args: str, msg: Message) -> None:
        """log [level]: accepted (the stand-in sends no log lines); replies as parse_command's `log`."""
        level = args.strip()
        num = _log_level(level) if level else LOG_LEVELS["debug"]
        if num is None:
            self.reply(command_reply("-ERR invalid log level"))
            return
        self.log_level = num
        self.reply(command_reply(f"+OK log level {level} [{num}]"))

    def cmd_nolog(self, args: str, msg: Message) -> None:
        """nolog."""
        if self.log_level is None:
            self.reply(command_reply("-ERR not loging"))
            return
        self.log_level = None
        self.reply(command_reply("+OK no longer logging"))

    def cmd_linger(self, args: str, msg: Message) -> None:
        """linger: only for a myevents (controlled) session."""
        self._set_linger(True)

    def cmd_nolinger(self, args: str, msg: Message) -> None:
        """nolinger: only for a myevents (controlled) session."""
        self._set_linger(False)

    def _set_linger(self, linger: bool) -> None:
        if self.myevents is None:
            self.reply(command_reply("-ERR not controlling a session"))
            return
        self.linger = linger
        self.reply(command_reply("+OK will linger" if linger else "+OK will not linger"))

    def cmd_divert_events(self, args: str, msg: Message) -> None:
        """divert_events: needs a controlled session (outbound mode)."""
        self.reply(command_reply("-ERR not controlling a session."))

    def cmd_myevents(self, args: str, msg: Message) -> None:
        """myevents <uuid> [format]: only that channel's events (always plain, as 1.10.12)."""
        words = args.split()
        if not words:
            self.reply(command_reply("-ERR command not found"))
            return
        if self.myevents is not None:
            self.reply(command_reply("-ERR aready enabled."))
            return
        ch = self.standin.switch.locate(words[0])
        if ch is None and len(words) > 1:
            self.reply(command_reply("-ERR invalid uuid"))
            return
        # 1.10.12 ignores the format argument: events stay text/event-plain.
        self.myevents = words[0]
        self.controls_session = ch is not None
        self.reply(command_reply("+OK Events Enabled"))

    def cmd_sendmsg(self, args: str, msg: Message) -> None:
        """sendmsg <uuid>: call-command execute (queued app) or hangup."""
        uuid = args.strip() or (msg.header("session-id") or "")
        ch = self.standin.switch.locate(uuid)
        if ch is None:
            self.reply(command_reply(f"-ERR invalid session id [{uuid}]"))
            return
        command = (msg.header("call-command") or "").lower()
        if command == "execute":
            name = msg.header("execute-app-name") or ""
            arg = msg.header("execute-app-arg") or _text_body(msg)
            try:
                loops = int(msg.header("loops") or "1")
            except ValueError:
                loops = 1
            lock = (msg.header("event-lock") or "").lower() == "true"
            ch.queue.append(QueuedApp(name=name, arg=arg, event_uuid=msg.header("Event-UUID"), loops=loops,
                                      event_lock=lock))
            ch.queue_ready.set()
        elif command == "hangup":
            ch.hangup(parse_cause(msg.header("hangup-cause")))
        self.reply(command_reply("+OK"))

    def cmd_sendevent(self, args: str, msg: Message) -> None:
        """sendevent <NAME>: fire an event built from the message's headers."""
        sw = self.standin.switch
        name = args.split()[0] if args.split() else "CUSTOM"
        ev_uuid = sw.new_uuid()
        base = sw.events.new(name, ("mod_event_socket.c", "parse_command", 2275))
        hdrs = [(k, v) for k, v in msg.headers if k.lower() != "content-length"]
        ev = Event(name)
        # FreeSWITCH puts the subclass first, then the command line, then the other given headers.
        ev.headers = [h for h in hdrs if h[0] == "Event-Subclass"]
        ev.headers.append(("Command", f"sendevent {args}".strip()))
        ev.headers.extend(h for h in hdrs if h[0] != "Event-Subclass")
        ev.add("Event-UUID", ev_uuid)
        seen = {k for k, _ in ev.headers}
        ev.headers.extend((k, v) for k, v in base.headers if k not in seen)
        if msg.body:
            ev.body = msg.body
        self.reply(command_reply(f"+OK {ev_uuid}"))
        sw.fire(ev)


def _header(event: Event, name: str) -> str | None:
    """An event header by name, without regard to case (switch_event_get_header)."""
    low = name.lower()
    return next((v for k, v in event.headers if k.lower() == low), None)


def _filter_sign(value: str) -> tuple[bool, str]:
    """(positive, the value to compare) of a filter value: leading `+` / `-` / blanks set the sign."""
    positive = True
    rest = value.lstrip("+- ")
    for ch in value[: len(value) - len(rest)]:
        if ch in "+-":
            positive = ch == "+"
    return positive, rest


def _filter_matches(actual: str, wanted: str, regex: bool) -> bool:
    """A /regex/ (switch_regex_perform) or a comparison without regard to case (strcasecmp)."""
    if not regex:
        return actual.lower() == wanted.lower()
    pattern = wanted[1:-1] if len(wanted) > 1 and wanted.startswith("/") and wanted.endswith("/") else wanted
    try:
        return re.search(pattern, actual) is not None
    except re.error:
        return False


def _text_body(msg: Message) -> str:
    """switch_ivr_parse_event: the body is the argument only when content-type is text/plain."""
    return msg.body if (msg.header("content-type") or "").lower() == "text/plain" else ""


def _log_level(text: str) -> int | None:
    """switch_log_str2level: a number (clamped to 0..SWITCH_LOG_INVALID-1) or a level name; None if invalid."""
    if re.fullmatch(r"-?\d+", text):
        num = max(0, int(text))
        return LOG_INVALID - 1 if num > LOG_INVALID else (None if num == LOG_INVALID else num)
    return LOG_LEVELS.get(text.lower())


def _first_word(text: str) -> tuple[str, str]:
    """(the text up to the first space, the rest without surrounding blanks)."""
    word, _, rest = text.partition(" ")
    return word, rest.strip()
