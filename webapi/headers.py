"""A request's header block, read for gevent's WSGI handler without the ``email`` package.

pywsgi reads headers with ``http.client.parse_headers``, which hands the block to ``email``'s feed parser:
about 30 us of a create's CPU, for what is a few ``Name: value`` lines. :class:`RequestHeaders` reads
them itself and offers what pywsgi uses of the parsed message (``status``, ``get``, ``getheader``,
``del``, ``headers``, ``typeheader``). It is stricter than the feed parser, as RFC 9112 asks of a server:
a line that is not ``token: value`` (no colon, a space before it, a folded continuation line) or two
different ``Content-Length`` values or two ``Host`` lines make the request a 400 instead of a guess at
what the client meant.
So does a body whose end would be a guess (RFC 9112 6.1, 6.3): a ``Content-Length`` that is not digits
(Python's ``int`` reads ``+5`` and ``1_0``), a transfer coding other than ``chunked`` alone (pywsgi
ignored the header then), or both headers at once. A proxy in front may take such a body's end
elsewhere, and a request it forwarded as part of a body must not be answered here.
The limits are http.client's: 64 KiB per line, 100 lines.
"""

from __future__ import annotations

import re
from typing import Any, BinaryIO

MAX_LINE = 65536
MAX_HEADERS = 100
# RFC 9110 field-name: a token.
NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class RequestHeaders:
    """The header block of one request; ``status`` is non-empty (and pywsgi answers 400) when malformed."""

    def __init__(self, fp: BinaryIO, *_args: Any) -> None:
        self.status = ""
        self._fields: list[tuple[str, str]] = []  # (name as sent, value without surrounding whitespace)
        self._first: dict[str, str] = {}  # lower-case name -> its first value
        for _ in range(MAX_HEADERS + 1):
            line = fp.readline(MAX_LINE + 1)
            if len(line) > MAX_LINE:
                self.status = "header line too long"
                return
            if line in (b"\r\n", b"\n", b""):
                self.status = self._framing_problem()
                return
            if not self._add(line.decode("iso-8859-1")):
                return
        self.status = f"more than {MAX_HEADERS} header lines"

    def _add(self, line: str) -> bool:
        name, colon, value = line.partition(":")
        if not colon or not NAME.fullmatch(name):
            self.status = f"malformed header line {line[:40]!r}"
            return False
        value = value.strip(" \t\r\n")
        if "\r" in value or "\x00" in value:
            self.status = f"header {name}: a CR or NUL in its value"
            return False
        key = name.lower()
        if key == "host" and key in self._first:  # RFC 9112 3.2: which host was meant is a guess
            self.status = "Host: sent more than once"
            return False
        first = self._first.setdefault(key, value)
        if key == "content-length" and first != value:
            self.status = "two different Content-Length values"
            return False
        self._fields.append((name, value))
        return True

    def _framing_problem(self) -> str:
        """What makes the body's length ambiguous, or ``""``."""
        length = self._first.get("content-length")
        if length is not None and not (length.isascii() and length.isdigit()):
            return f"Content-Length: {length[:20]!r} is not a number of bytes"
        codings = [coding.strip().lower() for name, value in self._fields
                   if name.lower() == "transfer-encoding" for coding in value.split(",")]
        if codings and codings != ["chunked"]:
            return "Transfer-Encoding: only chunked is supported"
        if codings and length is not None:
            return "both Transfer-Encoding and Content-Length"
        return ""

    def get(self, name: str, default: Any = None) -> Any:
        """The first value of ``name`` (any case), else ``default``."""
        return self._first.get(name.lower(), default)

    getheader = get

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._first.pop(key, None)
        self._fields = [(n, v) for n, v in self._fields if n.lower() != key]

    @property
    def headers(self) -> list[str]:
        """The fields as ``Name: value\\r\\n`` lines (what pywsgi builds the environ's ``HTTP_*`` from)."""
        return [f"{name}: {value}\r\n" for name, value in self._fields]

    @property
    def typeheader(self) -> str | None:
        return self.get("content-type")
