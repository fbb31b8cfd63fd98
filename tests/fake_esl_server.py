"""A scripted fake FreeSWITCH Event Socket server for the ESL client tests.

Each accepted connection runs ``script(session)`` in its own greenlet; the script talks raw bytes
through :class:`FakeSession`. Builders produce messages framed exactly as FreeSWITCH 1.10 does, and
:func:`trace_chunks` loads the byte-exact recordings in ``shared/esl-traces`` (beside the repository; ``CALLBRIDGE_ESL_TRACES``).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
from collections.abc import Callable, Mapping
from pathlib import Path

import gevent
import gevent.socket
import pytest
from gevent.event import Event
from gevent.server import StreamServer

# The recordings of a real FreeSWITCH 1.10.12 live beside the repository (shared/esl-traces), not in it:
# CALLBRIDGE_ESL_TRACES, else beside this clone, else the team's shared folder.
_PLACES = [Path(os.environ["CALLBRIDGE_ESL_TRACES"])] if os.environ.get("CALLBRIDGE_ESL_TRACES") else [
    Path(__file__).resolve().parents[2] / "shared" / "esl-traces", Path("/work/shared/esl-traces")]
TRACES = next((place for place in _PLACES if place.is_dir()), _PLACES[0])


def traces() -> Path:
    """The folder of recorded traces; the test that needs them is skipped, saying where to point, without."""
    if not TRACES.is_dir():
        pytest.skip(f"the FreeSWITCH recordings are not at {TRACES}: set CALLBRIDGE_ESL_TRACES to their folder")
    return TRACES

AUTH_REQUEST = b"Content-Type: auth/request\n\n"
GOODBYE = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"

# Characters FreeSWITCH's switch_url_encode escapes besides controls and non-ASCII bytes.
_FS_UNSAFE = set(b' "#%&+:;<=>?@[\\]^`{|}')


def trace_chunks(name: str, direction: str = "S->C") -> list[bytes]:
    """The exact wire chunks of one recorded trace, in order, for one direction."""
    chunks = []
    with open(traces() / f"{name}.jsonl", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            if record["dir"] == direction:
                chunks.append(record["data"].encode("latin-1"))
    return chunks


def fs_url_encode(value: str) -> bytes:
    """URL-encode a header value the way FreeSWITCH does (always escaping ``%``)."""
    out = bytearray()
    for byte in value.encode("utf-8"):
        if byte < 0x20 or byte > 0x7E or byte in _FS_UNSAFE:
            out += b"%%%02X" % byte
        else:
            out.append(byte)
    return bytes(out)


def reply(text: str, **extra: str) -> bytes:
    """A ``command/reply`` message."""
    lines = ["Content-Type: command/reply", f"Reply-Text: {text}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in extra.items()]
    return ("\n".join(lines) + "\n\n").encode()


def api_response(body: str | bytes) -> bytes:
    """An ``api/response`` message."""
    raw = body.encode() if isinstance(body, str) else body
    return b"Content-Type: api/response\nContent-Length: %d\n\n" % len(raw) + raw


def event_plain(headers: Mapping[str, str | bytes], body: bytes = b"") -> bytes:
    """A ``text/event-plain`` message; str values are URL-encoded, bytes values are sent raw."""
    inner = bytearray()
    for name, value in headers.items():
        encoded = value if isinstance(value, bytes) else fs_url_encode(value)
        inner += name.encode() + b": " + encoded + b"\n"
    if body:
        inner += b"Content-Length: %d\n" % len(body)
    inner += b"\n" + body
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(inner) + bytes(inner)


def disconnect_notice(linger: bool = False) -> bytes:
    """A ``text/disconnect-notice`` as FreeSWITCH sends it (plain goodbye, or linger)."""
    if linger:
        return b"Content-Type: text/disconnect-notice\nContent-Disposition: linger\nLinger-Time: -1\nContent-Length: 0\n\n"
    return b"Content-Type: text/disconnect-notice\nContent-Length: %d\n\n" % len(GOODBYE) + GOODBYE


class SessionClosed(Exception):
    """The client closed the connection while the script was reading."""


class FakeSession:
    """One accepted client connection, driven by a test script."""

    def __init__(self, sock: gevent.socket.socket) -> None:
        self.sock = sock
        self.received: list[bytes] = []
        self.closed_by_client = Event()
        self._buf = b""

    def send(self, data: bytes) -> None:
        """Write raw bytes to the client."""
        self.sock.sendall(data)

    def _fill(self, timeout: float) -> None:
        with gevent.Timeout(timeout):
            data = self.sock.recv(65536)
        if not data:
            self.closed_by_client.set()
            raise SessionClosed()
        self._buf += data

    def read_command(self, timeout: float = 5.0) -> bytes:
        """Read one client message (header block + any content-length body), exact bytes."""
        while b"\n\n" not in self._buf:
            self._fill(timeout)
        head, _, rest = self._buf.partition(b"\n\n")
        length = 0
        for line in head.split(b"\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        self._buf = rest
        while len(self._buf) < length:
            self._fill(timeout)
        body, self._buf = self._buf[:length], self._buf[length:]
        message = head + b"\n\n" + body
        self.received.append(message)
        return message

    def has_unread(self) -> bool:
        """True if the client sent bytes the script has not read yet."""
        if self._buf:
            return True
        readable, _, _ = select.select([self.sock.fileno()], [], [], 0)
        return bool(readable)

    def wait_client_close(self, timeout: float = 5.0) -> bool:
        """Read until the client closes; True if it did within ``timeout``."""
        try:
            while True:
                self._fill(timeout)
        except SessionClosed:
            return True
        except (gevent.Timeout, OSError):
            return self.closed_by_client.is_set()

    def handshake(self, password: str = "ClueCon") -> None:
        """Greet, read ``auth``, accept it when it carries ``password``."""
        self.send(AUTH_REQUEST)
        command = self.read_command()
        if command == f"auth {password}\n\n".encode():
            self.send(reply("+OK accepted"))
        else:
            self.send(reply("-ERR invalid") + disconnect_notice())
            self.close()
            raise SessionClosed()

    def close(self) -> None:
        """Close the connection from the server side."""
        with contextlib.suppress(OSError):
            self.sock.close()


Script = Callable[[FakeSession], None]


class FakeEslServer:
    """A gevent StreamServer on 127.0.0.1:<ephemeral> running ``script`` for every connection."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.sessions: list[FakeSession] = []
        self.session_done = Event()
        self.errors: list[BaseException] = []
        self._server = StreamServer(("127.0.0.1", 0), self._handle)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self._server.server_port)

    def start(self) -> FakeEslServer:
        """Start listening; returns self."""
        self._server.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every session."""
        self._server.stop(timeout=1)
        for session in self.sessions:
            session.close()

    def __enter__(self) -> FakeEslServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handle(self, sock: gevent.socket.socket, _address: object) -> None:
        session = FakeSession(sock)
        self.sessions.append(session)
        try:
            self.script(session)
        except SessionClosed:
            pass
        except (Exception, gevent.Timeout) as exc:  # reported by the test, not lost in a greenlet
            self.errors.append(exc)
        finally:
            self.session_done.set()
