"""webapi.headers: the header block as pywsgi used to get it from http.client, and stricter where it
guessed (see the module)."""

from __future__ import annotations

import io
from http import client

import pytest

from webapi.headers import MAX_HEADERS, RequestHeaders


def parsed(block: bytes) -> RequestHeaders:
    return RequestHeaders(io.BytesIO(block + b"\r\n"))


WELL_FORMED = [
    b"Host: 127.0.0.1:8080\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 80\r\n",
    b"host:api\r\nCONTENT-TYPE:   text/plain  \r\naccept: */*\r\nAccept: text/html\r\n",
    b"Authorization: Bearer cb_abc\r\nX-Name: cr\xe8me br\xfbl\xe9e\r\nIdempotency-Key: k-1\r\n",
    b"Transfer-Encoding: chunked\r\nConnection: close\r\n",
    b"",
]


@pytest.mark.parametrize("block", WELL_FORMED)
def test_well_formed_blocks_read_as_the_email_parser_reads_them(block: bytes) -> None:
    ours = parsed(block)
    theirs = client.parse_headers(io.BytesIO(block + b"\r\n"))
    assert ours.status == ""
    names = {name.lower() for name in theirs} | {"missing"}
    for name in names:
        for spelled in (name, name.upper(), name.title()):
            expected = theirs.get(spelled)
            assert ours.get(spelled) == (expected.strip() if expected is not None else None)
    assert ours.typeheader == ours.get("content-type")
    assert ours.headers == [f"{k}: {v.strip()}\r\n" for k, v in theirs.items()]


def test_the_block_ends_at_the_empty_line_and_leaves_the_body_unread() -> None:
    stream = io.BytesIO(b"Content-Length: 4\r\n\r\nbody")
    headers = RequestHeaders(stream)
    assert headers.get("content-length") == "4" and stream.read() == b"body"


def test_deleting_a_field_removes_every_copy() -> None:
    headers = parsed(b"Content-Length: 5\r\nHost: a\r\ncontent-length: 5\r\n")
    del headers["Content-Length"]
    assert headers.get("Content-Length") is None and headers.get("content-length") is None
    assert headers.headers == ["Host: a\r\n"]


@pytest.mark.parametrize("block, status", [
    (b"Host: a\r\nno colon here\r\n", "malformed header line"),
    (b"Host : a\r\n", "malformed header line"),  # a space before the colon (RFC 9112 5.1: reject)
    (b": value\r\n", "malformed header line"),
    (b"X-Caf\xe9: value\r\n", "malformed header line"),  # a field name is a token
    (b"Host: a\r\n folded continuation\r\n", "malformed header line"),  # obs-fold
    (b"Content-Length: 5\r\nContent-Length: 6\r\n", "two different Content-Length values"),
    (b"Host: a\r\nhost: a\r\n", "Host: sent more than once"),
    (b"X-A: one\rtwo\r\n", "header X-A: a CR or NUL in its value"),
    (b"Content-Length: +5\r\n", "Content-Length: '+5' is not a number of bytes"),
    (b"Content-Length: \xb2\r\n", "Content-Length: "),  # a superscript two: str.isdigit, but not a digit
    (b"Transfer-Encoding: gzip, chunked\r\n", "Transfer-Encoding: only chunked is supported"),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n", "Transfer-Encoding: "),
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", "both Transfer-Encoding and Content-Length"),
    (b"X-A: " + b"a" * 70_000 + b"\r\n", "header line too long"),
    (b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)), f"more than {MAX_HEADERS} header lines"),
])
def test_a_malformed_block_gets_a_status(block: bytes, status: str) -> None:
    assert parsed(block).status.startswith(status)


def test_repeated_identical_content_lengths_and_the_most_lines_allowed_are_fine() -> None:
    assert parsed(b"Content-Length: 5\r\nContent-Length: 5\r\n").status == ""
    assert parsed(b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS - 1))).status == ""
