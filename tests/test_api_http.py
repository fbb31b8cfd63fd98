"""The real app over real HTTP: gevent's WSGI server on 127.0.0.1 (port 0), keep-alive, concurrency."""

from __future__ import annotations

import gc
import http.client
import json
import logging
import re
import socket
import threading
import urllib.parse
from typing import Any

import pytest

from daemon.store import Call
from tests.conftest import LiveServer
from tests.fakes import FakeMedia
from tests.integration.conftest import wait_for


def request(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], http.client.HTTPResponse]:
    """One request on ``conn``; returns (status, data of the envelope, response)."""
    send_headers = dict(headers or {})
    payload: bytes | None = None
    if isinstance(body, dict):
        payload = urllib.parse.urlencode(body).encode()
        send_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif isinstance(body, bytes):
        payload = body
    conn.request(method, path, body=payload, headers=send_headers)
    response = conn.getresponse()
    raw = response.read()
    assert response.getheader("Content-Type", "").startswith("application/json"), raw[:200]
    data = json.loads(raw)["data"]
    assert data["code"] == response.status
    return response.status, data, response


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the server sends on a raw socket until it closes the connection."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def exchange(live_server: LiveServer, raw: bytes) -> bytes:
    """``raw`` sent on a new connection; everything the server answers until it closes it."""
    with socket.create_connection((live_server.host, live_server.port), timeout=10) as sock:
        sock.sendall(raw)
        return read_to_close(sock)


def test_keep_alive_session_of_mixed_requests(live_server: LiveServer, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    status, created, _ = request(conn, "POST", "/v1/calls",
                                 {"token": token, "phone_a": "15550001001", "phone_b": "15550002002",
                                  "msg": "hello", "msg_lang": "en-US", "call_date": "2026-06-16 09:00"})
    assert status == 200 and created["status"] == "scheduled"
    sock = conn.sock
    assert sock is not None
    bearer = {"Authorization": f"Bearer {token}"}
    status, listed, _ = request(conn, "GET", "/v1/calls", headers=bearer)
    assert status == 200 and [c["callid"] for c in listed["calls"]] == [created["callid"]]
    status, one, _ = request(conn, "GET", f"/v1/calls/{created['callid']}?token={urllib.parse.quote(token)}")
    assert status == 200 and one["timeline"][0]["kind"] == "requested"
    status, data, _ = request(conn, "GET", "/nowhere")
    assert status == 404
    status, data, response = request(conn, "PUT", "/v1/calls", b"", {"Content-Length": "0"})
    assert status == 405 and "POST" in (response.getheader("Allow") or "")
    status, data, _ = request(conn, "POST", "/v1/calls", json.dumps({"phone_a": "1"}).encode(),
                              {"Content-Type": "application/json", **bearer})
    assert status == 400 and data["code_desc"].startswith("phone_a: ")
    status, data, _ = request(conn, "DELETE", f"/v1/scheduled/{created['callid']}", headers=bearer)
    assert status == 200 and data["status"] == "canceled"
    assert conn.sock is sock  # every answer kept the connection open
    conn.close()


def test_oversized_body_is_413_over_the_wire(live_server: LiveServer, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    status, data, _ = request(conn, "POST", "/v1/calls", {"token": token, "msg": "x" * 80_000})
    assert status == 413 and data["code_desc"] == "body: larger than 65536 bytes"
    conn.close()


@pytest.mark.stores("sqlite", "postgresql")
def test_concurrent_creates_with_one_idempotency_key_make_one_call(live_server: LiveServer,
                                                                   make_endpoint: Any,
                                                                   media: FakeMedia) -> None:
    """Both requests pass the look-up before either inserts (they meet inside the media fetch); the
    unique index lets one insert win and the other answers with the winner's call."""
    _, token = make_endpoint()
    arrivals: dict[str, Any] = {"count": 0, "event": None}

    def meet(seed: str) -> None:
        import gevent.event

        if arrivals["event"] is None:
            arrivals["event"] = gevent.event.Event()
        arrivals["count"] += 1
        if arrivals["count"] >= 2:
            arrivals["event"].set()
        else:
            assert arrivals["event"].wait(timeout=10)

    media.before_fetch = meet
    results: list[tuple[int, dict[str, Any]]] = []
    start = threading.Barrier(2)

    def client() -> None:
        conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=20)
        start.wait(10)
        status, data, _ = request(conn, "POST", "/v1/calls",
                                  {"token": token, "phone_a": "15550001001", "phone_b": "15550002002",
                                   "play_url": "http://example.com/a.wav"},
                                  {"Idempotency-Key": "same-key"})
        results.append((status, data))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert arrivals["count"] == 2, "the two requests did not overlap"
    assert [s for s, _ in results] == [200, 200]
    assert results[0][1]["callid"] == results[1][1]["callid"]
    assert Call.select().count() == 1


@pytest.mark.stores("sqlite", "postgresql")
@pytest.mark.parametrize("n", [20])
def test_many_parallel_clients(live_server: LiveServer, make_endpoint: Any, n: int) -> None:
    _, token = make_endpoint()
    statuses: list[int] = []

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=20)
        for j in range(5):
            status, _, _ = request(conn, "POST", "/v1/calls",
                                   {"token": token, "phone_a": f"1555000{i:02d}{j:02d}",
                                    "phone_b": "15550002002"})
            statuses.append(status)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert statuses == [200] * (n * 5)
    assert Call.select().count() == n * 5


def test_logs_never_hold_the_whole_token(live_server: LiveServer, make_endpoint: Any,
                                         caplog: pytest.LogCaptureFixture) -> None:
    endpoint, token = make_endpoint()
    caplog.set_level("DEBUG")
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    request(conn, "POST", "/v1/calls", {"token": token, "phone_a": "15550001001", "phone_b": "15550002002"})
    request(conn, "GET", "/v1/calls?token=" + urllib.parse.quote(token + "x"))
    conn.close()
    everything = caplog.text + " ".join(str(vars(record)) for record in caplog.records)
    assert endpoint.token_hint in everything
    assert token not in everything


def test_chunked_bodies_are_read_and_bounded(live_server: LiveServer, make_endpoint: Any) -> None:
    _, token = make_endpoint()
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    body = json.dumps({"token": token, "phone_a": "15550001001", "phone_b": "15550002002"}).encode()
    conn.request("POST", "/v1/calls", body=iter([body[:10], body[10:]]), encode_chunked=True,
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["data"]["status"] == "queued"
    conn.close()
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    big = b'{"token": "' + b"x" * 100_000 + b'"}'
    conn.request("POST", "/v1/calls", body=iter([big[i:i + 8192] for i in range(0, len(big), 8192)]),
                 encode_chunked=True, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["data"]["code"] == 413
    conn.close()


@pytest.mark.parametrize("raw, status, desc", [
    (b"GET /v1/calls?token=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: api\r\n\r\n", 414, "request line: "),
    (b"THIS IS NOT HTTP\r\n\r\n", 400, "request: "),
    (b"GET /v1/calls HTTP/1.1\r\nHost: api\r\nnot a header\r\n\r\n", 400,
     "headers: malformed header line 'not a header\\r\\n'"),
    (b"GET /v1/calls HTTP/1.1\r\nHost: api\r\n folded\r\n\r\n", 400, "headers: malformed header line"),
    (b"POST /v1/calls HTTP/1.1\r\nHost: api\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}", 400,
     "headers: two different Content-Length values"),
    (b"GET /v1/calls HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 101 + b"\r\n", 400, "headers: more than 100 header lines"),
    # Werkzeug decodes a query as UTF-8 wherever a route or page reads it, and failed there: a 500 (pages:
    # gevent's own plain-text one, their error page reading the query too).
    (b"GET /v1/calls?token=x&status=\xff HTTP/1.1\r\nHost: api\r\n\r\n", 400, "query string: not UTF-8"),
    (b"GET /login?next=\xe9 HTTP/1.1\r\nHost: api\r\n\r\n", 400, "query string: not UTF-8"),
])
def test_requests_the_http_server_refuses_itself_get_the_envelope(live_server: LiveServer, raw: bytes,
                                                                  status: int, desc: str) -> None:
    """A request line of 8 KiB or more, a request that is not HTTP, or a malformed header block is refused
    by the server before the app sees it; the answer is still the envelope naming what is wrong (it was an
    empty body)."""
    answer = exchange(live_server, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].startswith(f"HTTP/1.1 {status} ".encode()), head
    assert b"Content-Type: application/json" in head, head
    data = json.loads(body)["data"]
    assert data["code"] == status and data["code_desc"].startswith(desc), data


def test_a_refused_request_line_or_header_is_logged_without_its_text(live_server: LiveServer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """pywsgi's notes on what it refused quote the raw line: a token in a query string (an unencoded space
    breaks the request line) or in a folded Authorization header would land whole in the log."""
    token = "cb_" + "S3cr3tT0kenValue" * 2
    caplog.set_level(logging.DEBUG)
    for raw in (f"GET /v1/calls?token={token}&from=2026-12-02 10:00 HTTP/1.1\r\nHost: api\r\n\r\n",
                f"GET /v1/calls?token={token} HTTP/9.9\r\nHost: api\r\n\r\n",
                f"GET /v1/calls HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer\r\n {token}\r\n\r\n"):
        answer = exchange(live_server, raw.encode())
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert wait_for(lambda: sum("http.malformed_request" in r.getMessage() for r in caplog.records) >= 3, 10)
    assert token not in caplog.text and "S3cr3t" not in caplog.text
    notes = [r for r in caplog.records if "http.malformed_request" in r.getMessage()]
    assert all(r.levelno == logging.INFO and r.address == "127.0.0.1" for r in notes)  # type: ignore[attr-defined]
    assert [r.problem for r in notes] == ["Invalid HTTP method", "Invalid http version",  # type: ignore[attr-defined]
                                          "Invalid headers status"], [r.problem for r in notes]  # type: ignore[attr-defined]


def test_creating_calls_leaves_no_garbage_for_the_cycle_collector(live_server: LiveServer,
                                                                  make_endpoint: Any) -> None:
    # Each reference cycle made per request is garbage only the cyclic collector frees: at hundreds of
    # creates a second it ran every few dozen requests and, promoting what the requests in flight held,
    # led to full passes over every call in progress, stopping the loop for tens of milliseconds.
    _, token = make_endpoint()
    conn = http.client.HTTPConnection(live_server.host, live_server.port, timeout=10)
    fields = {"token": token, "phone_a": "15550001001", "phone_b": "15550002002", "call_date": "2026-06-16 09:00"}
    for _ in range(5):  # first requests fill caches (routes, compiled statements)
        assert request(conn, "POST", "/v1/calls", fields)[0] == 200
    gc.collect()
    gc.disable()
    try:
        for _ in range(100):
            assert request(conn, "POST", "/v1/calls", fields)[0] == 200
        unreachable = gc.collect()
    finally:
        gc.enable()
    conn.close()
    assert unreachable < 20, f"{unreachable} objects in reference cycles after 100 creates"


def test_a_client_that_waits_for_100_continue_gets_it_then_its_answer(live_server: LiveServer,
                                                                      make_endpoint: Any) -> None:
    """curl sends ``Expect: 100-continue`` before a large body (over 1 KiB) and waits for the go-ahead."""
    _, token = make_endpoint()
    body = urllib.parse.urlencode({"token": token, "phone_a": "15550001001", "phone_b": "15550002002",
                                   "msg": "x" * 500, "msg_lang": "en-US"}).encode()
    head = (f"POST /v1/calls HTTP/1.1\r\nHost: api\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((live_server.host, live_server.port), timeout=10) as sock:
        sock.sendall(head)
        go_ahead = b""
        while not go_ahead.endswith(b"\r\n\r\n"):
            go_ahead += sock.recv(1)
        assert go_ahead.startswith(b"HTTP/1.1 100 Continue"), go_ahead
        sock.sendall(body)
        answer = read_to_close(sock)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["data"]["status"] == "queued"


HIDDEN = b"GET /healthz HTTP/1.1\r\nHost: api\r\n\r\n"  # a request inside another's body, for a proxy


@pytest.mark.parametrize("framing, body, desc", [
    (b"Content-Length: +2\r\n", b"{}", "headers: Content-Length: "),
    (b"Content-Length: 1_0\r\n", b"{}" + b" " * 8, "headers: Content-Length: "),
    (b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n" + HIDDEN, "headers: Transfer-Encoding: "),
    (b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", b"0\r\n\r\n" + HIDDEN,
     "headers: Transfer-Encoding: "),
    (b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % (5 + len(HIDDEN)), b"0\r\n\r\n" + HIDDEN,
     "headers: both Transfer-Encoding and Content-Length"),
])
def test_a_body_whose_length_is_ambiguous_is_refused_and_nothing_in_it_is_answered(
        live_server: LiveServer, framing: bytes, body: bytes, desc: str) -> None:
    """RFC 9112 6.1 and 6.3: a Content-Length that is not digits, a transfer coding other than chunked, or
    both headers at once make the body's end a guess, which a proxy in front may guess differently: a
    request it saw as part of a body must not be answered here. 400, naming the header, and the close."""
    head = b"POST /v1/calls HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n" + framing + b"\r\n"
    answer = exchange(live_server, head + body)
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    head_back, _, rest = answer.partition(b"\r\n\r\n")
    assert head_back.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(rest)["data"]["code_desc"].startswith(desc), rest


def test_a_body_announced_over_the_limit_is_refused_before_the_client_sends_it(live_server: LiveServer) -> None:
    """With ``Expect: 100-continue`` the client waits for the go-ahead before a large upload; one whose
    Content-Length is over the limit gets the 413 instead, and never uploads what would be thrown away
    (nor, if slower than the body deadline, gets a 408 that hides the real reason)."""
    head = (b"POST /v1/calls HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n")
    answer = exchange(live_server, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["data"]["code_desc"].startswith("body: larger than ")


@pytest.mark.parametrize("raw", [
    b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: api\r\nHost: elsewhere\r\nConnection: close\r\n\r\n",
])
def test_an_http_1_1_request_needs_exactly_one_host(live_server: LiveServer, raw: bytes) -> None:
    """RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host or with two (a proxy and
    this server could otherwise take the request for different hosts)."""
    answer = exchange(live_server, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert json.loads(body)["data"]["code_desc"].startswith("headers: Host: "), body


def test_an_empty_line_after_a_body_before_the_next_request_is_ignored(live_server: LiveServer,
                                                                        make_endpoint: Any) -> None:
    """Some clients end a POST body with an extra CRLF; RFC 9112 2.2: a server ignores at least one empty
    line before a request line. Both requests on the kept-alive connection are answered."""
    _, token = make_endpoint()
    body = urllib.parse.urlencode({"token": token, "phone_a": "15550001001", "phone_b": "15550002002"}).encode()
    first = (f"POST /v1/calls HTTP/1.1\r\nHost: api\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             f"Content-Length: {len(body)}\r\n\r\n").encode() + body + b"\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"
    answer = exchange(live_server, first + second)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200"], answer[:400]
