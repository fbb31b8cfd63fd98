"""The HTTP server the API runs under: gevent's WSGI server, with Nagle off and its own refusals enveloped.

* Nagle off: pywsgi writes a response's headers and body in two sends, and with Nagle on the body waits
  for the client's delayed ACK (40 ms on a keep-alive connection).
* pywsgi refuses some requests before the app sees them: a request line of 8 KiB or more (414) and a
  request it cannot parse (400). It answers those with an empty body; here they get the API's envelope,
  like every other answer, naming what is wrong.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler, WSGIServer


def _raw_answer(status: int, reason: str, desc: str) -> bytes:
    body = json.dumps({"data": {"code": status, "code_desc": desc}}).encode() + b"\n"
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode("ascii") + body


REFUSALS = {
    "414": _raw_answer(414, "URI Too Long", f"request line: {MAX_REQUEST_LINE} bytes or more (method, path and "
                                            "query); send the token as Authorization: Bearer"),
    "400": _raw_answer(400, "Bad Request", "request: not a well-formed HTTP/1.x request"),
}


class ApiHandler(WSGIHandler):
    """pywsgi's handler, answering its own refusals in the envelope."""

    def handle_one_request(self) -> Any:
        result = super().handle_one_request()
        if isinstance(result, tuple) and result[0] in REFUSALS:
            return result[0], REFUSALS[result[0]]
        return result


class ApiServer(WSGIServer):
    """gevent's WSGI server for the API (see the module's docstring)."""

    handler_class = ApiHandler

    def handle(self, sock: socket.socket, address: Any) -> Any:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return super().handle(sock, address)
