"""The daemon's HTTP server: gevent's WSGI server with a deadline on every phase a client controls and
a cap on open connections.

A connection is always in one of two states:

* **receiving**: waiting for a request (``idle_timeout`` on a kept-alive connection), reading its
  request line and headers (``header_timeout``, counted from the accept or from the request's first
  byte), then its whole body (``body_timeout``). The body is read here, before the app runs, so no
  app code ever waits on a slow client. Only the client decides how long this state lasts.
* **serving**: the app runs with the whole request in memory; each write of the answer waits at most
  ``body_timeout`` for the client to read.

At ``max_connections``, a new connection makes room by closing the connection that has been receiving
the longest (an idle keep-alive or a half-sent request), so a flood of half requests cannot keep a real
one out. Only when every connection is serving is the new one refused: 503 with ``Retry-After``. A
request cut at its deadline answers 408 (a connection that sent nothing is just closed). Errors are
answered in the API's envelope, ``{"data": {"code", "code_desc"}}``, and the connection is closed.
A closed connection's socket is released when its greenlet next runs; the accept loop pauses while
``EVICTING_MAX`` of them are still pending (a pool of greenlets), so a fast flood cannot run the
process out of files between the two.

On stop, connections waiting for a request are closed at once and those being served get the grace
period to finish (then they are killed, as gevent's server does).

The cap stays under half the process's open-file limit (raised to its hard limit at start): each
serving request may open more files (media downloads, temporary files), and the rest of the daemon
(database, Event Socket, webhooks) needs its own.
"""

from __future__ import annotations

import io
import json
import logging
import re
import resource
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import gevent
from gevent import GreenletExit
from gevent.pool import Pool
from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler, WSGIServer

from daemon.config import Settings
from daemon.ops.logs import log_event
from webapi.headers import RequestHeaders
from webapi.turns import take_turn

log = logging.getLogger("callbridge.http")

READ_SIZE = 64 * 1024
CAP_LOG_INTERVAL = 60.0  # seconds between two "at the connection cap" warnings
EVICTING_MAX = 64  # connections closed to make room whose sockets may still be open before accepting pauses


@dataclass(frozen=True)
class Limits:
    """Deadlines in seconds, the connection cap, and the largest request body in bytes."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 15.0
    max_connections: int = 1000
    max_body: int = 64 * 1024


def answer_bytes(status: int, desc: str, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP answer in the API's envelope, closing the connection."""
    body = (json.dumps({"data": {"code": status, "code_desc": desc}}) + "\n").encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# pywsgi's refusal notes: "(from ('127.0.0.1', 5000)) Invalid HTTP method: 'GET /?token=... HTTP/1.1'".
FROM_PREFIX = re.compile(r"^\(from .*?\)\)?\s*")
QUOTED_TAIL = re.compile(r"[:'\"]")

BUSY = answer_bytes(503, "server: too many connections in progress; retry later", {"Retry-After": "1"})
# pywsgi's own refusals (it answers them with an empty body), in the envelope and naming what is wrong.
PYWSGI_REFUSALS = {
    "414": answer_bytes(414, f"request line: {MAX_REQUEST_LINE} bytes or more (method, path and query); "
                             "send the token as Authorization: Bearer"),
    "400": answer_bytes(400, "request: not a well-formed HTTP/1.x request"),
}


class Evicted(GreenletExit):
    """Thrown into a receiving connection whose place a newer connection took."""


class BodyTooLarge(Exception):
    """The body was longer than ``Limits.max_body`` (it was read and dropped, under its deadline), or a
    client waiting for ``100 Continue`` announced one."""


class ConnectionHandler(WSGIHandler):
    """pywsgi's handler with the receiving phases under deadlines (see the module's docstring)."""

    server: ApiServer
    MessageClass = RequestHeaders  # the header block read without the email package (webapi.headers)
    # A client that stops reading its answer: the write times out (socket.timeout's args[0] is this text);
    # the connection just closes, without a traceback in the log (pywsgi's documented hook).
    ignored_socket_errors = (*WSGIHandler.ignored_socket_errors, "timed out")

    def __init__(self, sock: Any, address: Any, server: ApiServer) -> None:
        super().__init__(sock, address, server)
        self.greenlet = gevent.getcurrent()
        self.evicted = False
        self.requests = 0
        self.phase = "idle"  # idle (nothing of the next request yet), head, body, serving
        self.bad_query = False  # the request line's query string is not UTF-8
        self._deadline: gevent.Timeout | None = None

    def log_error(self, msg: str, *args: Any) -> None:
        """pywsgi's note on a request it refused: its words only, one line at INFO. Its text quotes the raw
        request line or header line, which may carry a token (a query string, a folded Authorization)."""
        try:
            message = msg % args if args else msg
        except (TypeError, ValueError):
            message = msg
        message = FROM_PREFIX.sub("", message)
        words = QUOTED_TAIL.split(message, maxsplit=1)[0].strip(" :") or "malformed request"
        host = self.client_address[0] if isinstance(self.client_address, tuple) else str(self.client_address)
        log_event(log, "http.malformed_request", logging.INFO, address=host, problem=words[:80])

    def evict(self) -> None:
        """Close this receiving connection; it never reaches the app (checked again before it would)."""
        self.evicted = True
        self.greenlet.kill(Evicted, block=False)

    # Deadlines -----------------------------------------------------------------------------------

    def _start_deadline(self, seconds: float) -> None:
        self._stop_deadline()
        self._deadline = gevent.Timeout.start_new(seconds)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None

    # Receiving ------------------------------------------------------------------------------------

    def handle_one_request(self) -> Any:
        if self.server.closed:  # stopping: no further request on this connection
            return None
        limits = self.server.limits
        self.phase = "idle"
        self.server.receiving(self)
        self.socket.settimeout(None)  # the phase deadlines bound every read
        # A new connection has header_timeout from its accept; a kept-alive one idle_timeout to start.
        self._start_deadline(limits.idle_timeout if self.requests else limits.header_timeout)
        try:
            result = super().handle_one_request()
        except gevent.Timeout as timeout:
            if timeout is not self._deadline:
                raise
            return self._timed_out()
        except Evicted:
            return None
        except BodyTooLarge:
            return self._refuse(413, f"body: larger than {limits.max_body} bytes")
        except (OSError, ValueError):  # the body's framing was broken, or the client left mid-body
            return self._refuse(400, "body: incomplete or malformed (Content-Length or chunked framing)")
        finally:
            self._stop_deadline()
        if isinstance(result, tuple):  # pywsgi's own refusal of a malformed head (400, 414)
            self._send_quietly(self._head_refusal(str(result[0]), result[1]))
            return None
        return result

    def _head_refusal(self, status: str, pywsgi_answer: bytes) -> bytes:
        problem = self.headers.status if isinstance(self.headers, RequestHeaders) else ""
        if status == "400" and self.bad_query:
            return answer_bytes(400, "query string: not UTF-8 (percent-encode other bytes, e.g. %C3%A9 for é)")
        if status == "400" and problem:  # the header block was the problem: say what was wrong with it
            return answer_bytes(400, f"headers: {problem}")
        return PYWSGI_REFUSALS.get(status) or pywsgi_answer

    def read_request(self, raw_requestline: str) -> bool:
        self.bad_query = False
        ok: bool = super().read_request(raw_requestline)
        if ok and self.request_version == "HTTP/1.1" and self.headers.get("host") is None:
            self.headers.status = "Host: required in HTTP/1.1 (RFC 9112 3.2)"
            return False  # pywsgi's 400, which _head_refusal words from the status
        if ok and not _utf8(self.path.partition("?")[2]):
            # Werkzeug decodes the query as UTF-8 wherever a page or route reads it, and fails there: 500.
            self.bad_query = True
            return False
        return ok

    def read_requestline(self) -> str:
        if not self.rfile.peek(1):  # the client closed the connection
            return ""
        self.phase = "head"
        if self.requests:
            self._start_deadline(self.server.limits.header_timeout)
        line: str = super().read_requestline()
        if line in ("\r\n", "\n"):  # RFC 9112 2.2: an empty line before a request line is ignored
            # It asks nothing: the connection is idle again until the next request's first byte.
            self.phase = "idle"
            if self.requests:
                self._start_deadline(self.server.limits.idle_timeout)
            if not self.rfile.peek(1):
                return ""
            self.phase = "head"
            if self.requests:
                self._start_deadline(self.server.limits.header_timeout)
            line = super().read_requestline()
        return line

    def get_environ(self) -> dict[str, Any]:
        """Called once the head is parsed: read the whole body, then hand the request to the app."""
        environ: dict[str, Any] = super().get_environ()
        self.phase = "body"
        if self._announced_too_large():
            raise BodyTooLarge
        self._start_deadline(self.server.limits.body_timeout)
        body = self._receive_body()
        self._stop_deadline()
        if self.evicted:
            raise Evicted
        self.phase = "serving"
        self.server.serving(self)
        self.requests += 1
        self.socket.settimeout(self.server.limits.body_timeout)  # each write of the answer
        if self.content_length is not None or self.wsgi_input.chunked_input:
            environ.pop("HTTP_TRANSFER_ENCODING", None)  # the app gets the body as received, not chunked
            environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input"] = io.BytesIO(body)
        environ["wsgi.input_terminated"] = True
        take_turn()  # calls come first: the app runs when the loop has nothing else ready (webapi.turns)
        return environ

    def _announced_too_large(self) -> bool:
        """A client waiting for ``100 Continue`` announced a body over the limit: refuse it before it is sent
        (RFC 9110 10.1.1), instead of letting the client upload what would only be read and dropped."""
        length = self.content_length
        return (self.wsgi_input.socket is not None and length is not None
                and length > self.server.limits.max_body)

    def _receive_body(self) -> bytes:
        """The body (Content-Length or chunked), or BodyTooLarge once a larger one was read and dropped."""
        limit = self.server.limits.max_body
        parts: list[bytes] = []
        size = 0
        while chunk := self.wsgi_input.read(READ_SIZE):
            size += len(chunk)
            if size <= limit:
                parts.append(chunk)
            else:
                parts.clear()
                gevent.sleep(0)  # a fast sender never makes recv wait: let other connections run
        if size > limit:
            raise BodyTooLarge
        return b"".join(parts)

    # Refusals -------------------------------------------------------------------------------------

    def _timed_out(self) -> None:
        self.server.serving(self)  # no longer a candidate for eviction
        self.server.timed_out += 1
        limits = self.server.limits
        if self.phase == "head":
            self._send_quietly(answer_bytes(
                408, f"request: headers not received within {limits.header_timeout:g} s"))
        elif self.phase == "body":
            self._send_quietly(answer_bytes(408, f"body: not received within {limits.body_timeout:g} s"))
        # idle: nothing was asked, so nothing is answered; the connection just closes.

    def _refuse(self, status: int, desc: str) -> None:
        self.server.serving(self)
        self._send_quietly(answer_bytes(status, desc))

    def _send_quietly(self, data: bytes) -> None:
        """Send a short final answer; a client that is gone or does not read only loses it."""
        try:
            self.socket.settimeout(self.server.limits.body_timeout)
            self.socket.sendall(data)
        except OSError:
            pass


class ApiServer(WSGIServer):
    """gevent's WSGI server with :class:`ConnectionHandler`, the connection cap, and Nagle off."""

    handler_class = ConnectionHandler

    def __init__(self, listener: Any, application: Any, limits: Limits, **kwargs: Any) -> None:
        open_sockets = limits.max_connections + min(EVICTING_MAX, limits.max_connections)
        super().__init__(listener, application, spawn=Pool(open_sockets), **kwargs)
        self.limits = limits
        self.connections: set[ConnectionHandler] = set()
        # Receiving connections, longest receiving first: the ones to close when the cap is reached.
        self._receiving: OrderedDict[ConnectionHandler, None] = OrderedDict()
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self._cap_logged_at = -CAP_LOG_INTERVAL

    @classmethod
    def for_settings(cls, settings: Settings, application: Any, *, max_body: int) -> ApiServer:
        """The daemon's server: the open-file limit raised, the cap fitted under it, both logged."""
        before, open_files = raise_open_file_limit()
        cap = connection_cap(settings.http_max_connections, open_files)
        limits = Limits(header_timeout=settings.http_header_timeout, body_timeout=settings.http_body_timeout,
                        idle_timeout=settings.http_idle_timeout, max_connections=cap, max_body=max_body)
        log_event(log, "http.limits", open_files=open_files, open_files_before=before, max_connections=cap,
                  header_timeout=limits.header_timeout, body_timeout=limits.body_timeout,
                  idle_timeout=limits.idle_timeout)
        if cap < settings.http_max_connections:
            log_event(log, "http.max_connections_lowered", logging.WARNING, wanted=settings.http_max_connections,
                      used=cap, reason=f"at most half the open-file limit ({open_files}); raise LimitNOFILE")
        return cls((settings.http_host, settings.http_port), application, limits, log=None, error_log=log)

    def handle(self, sock: socket.socket, address: Any) -> None:
        # pywsgi writes an answer's headers and body in two sends; with Nagle on, the body waits for
        # the client's delayed ACK (40 ms on a keep-alive connection).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.connections) >= self.limits.max_connections and not self._make_room():
            self.refused += 1
            self._log_cap()
            try:
                sock.settimeout(self.limits.body_timeout)
                sock.sendall(BUSY)
            except OSError:
                pass
            return
        handler = self.handler_class(sock, address, self)
        self.connections.add(handler)
        try:
            handler.handle()
        finally:
            self.connections.discard(handler)
            self._receiving.pop(handler, None)

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, close the connections waiting for a request, give the others ``timeout`` s."""
        self.close()
        while self._receiving:
            victim, _ = self._receiving.popitem(last=False)
            victim.evict()
        super().stop(timeout)

    def receiving(self, handler: ConnectionHandler) -> None:
        """``handler`` waits for or reads a request from now on (it goes to the back of the line)."""
        self._receiving[handler] = None
        self._receiving.move_to_end(handler)

    def serving(self, handler: ConnectionHandler) -> None:
        """``handler`` has its whole request (or is answering a refusal): it may no longer be closed."""
        self._receiving.pop(handler, None)

    def _make_room(self) -> bool:
        """Close the connection receiving the longest; False when every connection is serving."""
        if not self._receiving:
            return False
        victim, _ = self._receiving.popitem(last=False)
        self.connections.discard(victim)  # counted out now: its greenlet closes it at its next switch
        victim.evict()
        self.evicted += 1
        self._log_cap()
        return True

    def _log_cap(self) -> None:
        now = time.monotonic()
        if now - self._cap_logged_at >= CAP_LOG_INTERVAL:
            self._cap_logged_at = now
            log_event(log, "http.at_connection_cap", logging.WARNING, max_connections=self.limits.max_connections,
                      evicted=self.evicted, refused=self.refused)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


def connection_cap(wanted: int, open_files: int) -> int:
    """``wanted``, kept to at most half the open-file limit (the other half is for what requests open)."""
    if open_files == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, open_files // 2))


def _utf8(text: str) -> bool:
    """Whether ``text`` (the bytes of the request line, as pywsgi decodes them: latin-1) is UTF-8."""
    try:
        text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return False
    return True
