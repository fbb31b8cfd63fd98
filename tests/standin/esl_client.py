"""A tiny blocking ESL client for the stand-in tests (plain sockets, gevent-friendly)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from gevent import socket


@dataclass
class Msg:
    """One message from the server: outer headers, body, and for events the parsed inner headers."""

    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes
    event: list[tuple[str, str]] = field(default_factory=list)
    event_body: str | None = None

    def h(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def content_type(self) -> str | None:
        return self.h("Content-Type")

    def e(self, name: str) -> str | None:
        """First value of an event header (url-decoded)."""
        for k, v in self.event:
            if k == name:
                return v
        return None

    @property
    def name(self) -> str | None:
        return self.e("Event-Name")


def parse_event(body: bytes, ctype: str | None) -> tuple[list[tuple[str, str]], str | None]:
    """Inner headers and body of a text/event-plain or text/event-json message."""
    if ctype == "text/event-json":
        obj = json.loads(body)
        ev_body = obj.pop("_body", None)
        return [(k, str(v)) for k, v in obj.items()], ev_body
    head, sep, rest = body.partition(b"\n\n")
    hdrs = []
    for line in head.decode("utf-8").split("\n"):
        if ": " in line:
            k, v = line.split(": ", 1)
            hdrs.append((k, unquote(v)))
    ev_body = rest.decode("utf-8") if sep and any(k == "Content-Length" for k, _ in hdrs) else None
    return hdrs, ev_body


def split_messages(buf: bytes) -> tuple[list[Msg], bytes]:
    """Cut whole ESL messages off the front of buf."""
    out: list[Msg] = []
    while True:
        idx = buf.find(b"\n\n")
        if idx < 0:
            return out, buf
        head = buf[:idx].decode("utf-8")
        hdrs = [tuple(line.split(": ", 1)) for line in head.split("\n") if ": " in line]
        length = 0
        for k, v in hdrs:
            if k == "Content-Length":
                length = int(v)
        end = idx + 2 + length
        if len(buf) < end:
            return out, buf
        body = buf[idx + 2 : end]
        msg = Msg(headers=hdrs, body=body, raw=buf[:end])  # type: ignore[arg-type]
        if msg.content_type in ("text/event-plain", "text/event-json"):
            msg.event, msg.event_body = parse_event(body, msg.content_type)
        out.append(msg)
        buf = buf[end:]


class EslClient:
    """Connects, keeps every message received, and answers request/response helpers."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.timeout = timeout
        self.buf = b""
        self.pending: list[Msg] = []
        self.events: list[Msg] = []
        self.closed = False

    def close(self) -> None:
        self.sock.close()

    def send(self, data: str | bytes) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return False
        if not data:
            self.closed = True
            return False
        self.buf += data
        msgs, self.buf = split_messages(self.buf)
        for m in msgs:
            if m.event:
                self.events.append(m)
            self.pending.append(m)
        return True

    def read(self, timeout: float | None = None) -> Msg:
        """Next message of any kind."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not self.pending:
            if not self._fill(deadline) and (self.closed or time.monotonic() >= deadline):
                raise TimeoutError("no message")
        return self.pending.pop(0)

    def read_reply(self, timeout: float | None = None) -> Msg:
        """Next non-event message (events are kept in self.events)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for i, m in enumerate(self.pending):
                if not m.event:
                    return self.pending.pop(i)
            if not self._fill(deadline) and (self.closed or time.monotonic() >= deadline):
                raise TimeoutError("no reply")

    def cmd(self, line: str, timeout: float | None = None) -> Msg:
        self.send(line if line.endswith("\n\n") else line + "\n\n")
        return self.read_reply(timeout)

    def api(self, line: str, timeout: float | None = None) -> str:
        return self.cmd(f"api {line}", timeout).body.decode()

    def auth(self, password: str = "ClueCon") -> Msg:
        greeting = self.read_reply()
        assert greeting.content_type == "auth/request"
        return self.cmd(f"auth {password}")

    def wait_event(self, pred, timeout: float | None = None) -> Msg:  # type: ignore[no-untyped-def]
        """First received event (old or new) matching pred."""
        deadline = time.monotonic() + (timeout or self.timeout)
        seen = 0
        while True:
            for m in self.events[seen:]:
                if pred(m):
                    return m
            seen = len(self.events)
            if not self._fill(deadline) and (self.closed or time.monotonic() >= deadline):
                raise TimeoutError("event not received")

    def pump(self, seconds: float) -> None:
        """Read whatever arrives for a while."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._fill(deadline):
            pass

    def named(self, name: str, uuid: str | None = None) -> list[Msg]:
        return [m for m in self.events if m.name == name and (uuid is None or m.e("Unique-ID") == uuid)]
