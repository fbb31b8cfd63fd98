"""The HTTP server's deadlines and connection cap (webapi/server.py), through real HTTP on 127.0.0.1.

* 3,000 connections that send half a request (half a head, a head and half a body, or nothing) and
  stay cost a normal client no answer: in process (where the server's own counts are visible) and
  against ``python -m daemon run`` under a 1024 open-file limit (where, before the cap, healthz and
  creates failed with "Too many open files");
* at the cap the connection receiving the longest is closed, never one being served; when every one is
  served, a newcomer gets 503 with Retry-After;
* a kept-alive connection is closed after the idle timeout; a slow header or body sender is cut at its
  deadline with 408; a connection that sends nothing is closed without an answer.

Deadlines are short here (settings), and every wait is for an event with a generous bound.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from daemon.ops.metrics import Metrics
from daemon.store import Call
from tests.conftest import NOW
from tests.fakes import FakeMedia
from tests.integration.conftest import wait_for
from tests.robustness.helpers import FIGURES, open_fds, request
from webapi.app import MAX_BODY
from webapi.server import ApiServer, Limits, connection_cap

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
FLOOD = 3000
HALF_HEAD = b"POST /v1/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty"
HALF_BODY = (b"POST /v1/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
             b"Content-Length: 200\r\n\r\ntoken=cb_")
CALL = {"phone_a": "15550001001", "phone_b": "15550002002"}


def raise_own_file_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def flood_size(fds_per_connection: int) -> int:
    """FLOOD, or as many as this machine's open-file limit allows (printed when scaled down)."""
    soft = raise_own_file_limit(FLOOD * fds_per_connection + 512)
    count = min(FLOOD, (soft - 512) // fds_per_connection)
    if count < FLOOD:
        print(f"open-file hard limit {soft}: flood scaled down to {count} connections")
        FIGURES["half-request flood scaled down to (connections)"] = count
    return count


def open_flood(port: int, count: int) -> list[socket.socket]:
    """``count`` connections each sending a third of a request (head cut, body cut) or nothing."""
    flood = []
    for i in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        if i % 3 == 0:
            sock.sendall(HALF_HEAD)
        elif i % 3 == 1:
            sock.sendall(HALF_BODY)
        flood.append(sock)
    return flood


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed ``sock`` (EOF or reset), without waiting."""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def timed(action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = action()
    return result, (time.perf_counter() - started) * 1000


@pytest.fixture
def serve(app: Flask) -> Iterator[Callable[..., ApiServer]]:
    """``serve(**limits)``: the app under the daemon's server in this process, on 127.0.0.1:0."""
    servers: list[ApiServer] = []

    def start(**limits: Any) -> ApiServer:
        server = ApiServer(("127.0.0.1", 0), app, Limits(max_body=MAX_BODY, **limits), log=None, error_log=None)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(timeout=1)


def base(server: ApiServer) -> str:
    return f"http://127.0.0.1:{server.server_port}"


def kept_alive_after_one_request(server: ApiServer) -> socket.socket:
    """A connection that has had one request answered (GET /healthz) and is kept alive."""
    sock = socket.create_connection(("127.0.0.1", server.server_port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = b""
    while b'"code": 200' not in first and b'"code":200' not in first:
        first += sock.recv(4096)
    return sock


def read_until_closed(sock: socket.socket, limit: float = 30.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    started = time.monotonic()
    sock.settimeout(limit)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def envelope_of(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)["data"]


# The flood ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cap", [1000, 4000])
def test_a_flood_of_half_requests_costs_a_normal_client_no_answer(serve: Callable[..., ApiServer],
                                                                   make_endpoint: Any, cap: int) -> None:
    """Under the cap all are held; over it the oldest are closed, one for each newcomer."""
    count = flood_size(fds_per_connection=2)  # both ends of each connection live in this process
    server = serve(header_timeout=120, body_timeout=120, idle_timeout=120, max_connections=cap)
    _, token = make_endpoint()
    flood, opened_ms = timed(lambda: open_flood(server.server_port, count))
    held = min(count, cap)
    assert wait_for(lambda: len(server.connections) == held and server.evicted == count - held, 60), (
        len(server.connections), server.evicted)
    # The oldest were closed, the newest are still held (eviction order: receiving the longest).
    assert wait_for(lambda: all(closed_by_peer(s) for s in flood[:count - held]), 60)
    assert not any(closed_by_peer(s) for s in flood[count - held:])
    evicted = server.evicted

    health, health_ms = timed(lambda: request(base(server), "GET", "/healthz", timeout=30))
    created, create_ms = timed(lambda: request(base(server), "POST", "/v1/calls", form={"token": token, **CALL},
                                               timeout=30))
    assert health.status == 200, health.body
    assert created.status == 200 and created.data()["status"] == "queued", created.body
    assert server.refused == 0
    FIGURES[f"flood cap {cap}: half-request connections opened"] = count
    FIGURES[f"flood cap {cap}: connections the server held"] = held
    FIGURES[f"flood cap {cap}: connections closed to make room"] = evicted
    FIGURES[f"flood cap {cap}: ms to open the flood"] = round(opened_ms)
    FIGURES[f"flood cap {cap}: normal GET /healthz answered in ms"] = round(health_ms, 1)
    FIGURES[f"flood cap {cap}: normal POST /v1/calls answered in ms"] = round(create_ms, 1)
    print(f"cap {cap}: {count} half requests, {held} held, {evicted} closed to make room; "
          f"healthz {health_ms:.1f} ms, create {create_ms:.1f} ms")
    for sock in flood:
        sock.close()
    assert wait_for(lambda: not server.connections, 60), len(server.connections)


def daemon_env(state: Path) -> dict[str, str]:
    with socket.socket() as unused:  # an ESL port nobody listens on: the API does not need the switch
        unused.bind(("127.0.0.1", 0))
        esl_port = unused.getsockname()[1]
    return dict(os.environ, CALLBRIDGE_STATE_DIR=str(state), CALLBRIDGE_HTTP_PORT="0",
                CALLBRIDGE_ESL_PORT=str(esl_port), CALLBRIDGE_LOG_FORMAT="json", CALLBRIDGE_LOG_LEVEL="INFO",
                CALLBRIDGE_HTTP_HEADER_TIMEOUT="120", CALLBRIDGE_HTTP_BODY_TIMEOUT="120",
                CALLBRIDGE_HTTP_IDLE_TIMEOUT="120")


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # gevent's own lines are not JSON
            events.append(json.loads(line))
    return events


def test_the_daemon_under_a_1024_file_limit_answers_through_a_flood(tmp_path: Path) -> None:
    """``python -m daemon run`` with RLIMIT_NOFILE 1024/1024: the cap fits itself under the limit."""
    count = flood_size(fds_per_connection=1)
    env = daemon_env(tmp_path / "state")
    token = json.loads(subprocess.run(
        [sys.executable, "-m", "daemon", "endpoint", "add", "--name", "flood", "--caller-id", "15551230000",
         "--dial-string", "sofia/gateway/carrier/{number}", "--json"],
        cwd=ROOT, env=env, capture_output=True, check=True).stdout)["token"]
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=env, stdout=log_file, stderr=log_file,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)))
    flood: list[socket.socket] = []
    try:
        assert wait_for(lambda: any(e["event"] == "service.started" for e in log_events(log_path)), 60), (
            log_path.read_text()[-2000:])
        events = log_events(log_path)
        started = next(e for e in events if e["event"] == "service.started")
        limits = next(e for e in events if e["event"] == "http.limits")
        assert limits["open_files"] == 1024 and limits["max_connections"] == connection_cap(1000, 1024) == 512
        assert any(e["event"] == "http.max_connections_lowered" for e in events)
        url = "http://" + started["http"]
        port = int(started["http"].rsplit(":", 1)[1])

        flood, opened_ms = timed(lambda: open_flood(port, count))
        # Everything beyond the cap was closed, oldest first; the daemon never ran out of files.
        assert wait_for(lambda: sum(closed_by_peer(s) for s in flood) >= count - 512, 120)
        fds_under_flood = open_fds(daemon.pid)
        health, health_ms = timed(lambda: request(url, "GET", "/healthz", timeout=30))
        created, create_ms = timed(lambda: request(url, "POST", "/v1/calls", form={"token": token, **CALL},
                                                   timeout=30))
        assert health.status == 200, health.body
        assert created.status == 200, created.body
        assert fds_under_flood < 1024
        held = count - sum(closed_by_peer(s) for s in flood)
        assert 0 < held <= 512
        assert any(e["event"] == "http.at_connection_cap" for e in log_events(log_path))
        assert "Too many open files" not in log_path.read_text()
        FIGURES["daemon at 1024 files: half-request connections opened"] = count
        FIGURES["daemon at 1024 files: connections it held (cap 512)"] = held
        FIGURES["daemon at 1024 files: its open files under the flood"] = fds_under_flood
        FIGURES["daemon at 1024 files: normal GET /healthz answered in ms"] = round(health_ms, 1)
        FIGURES["daemon at 1024 files: normal POST /v1/calls answered in ms"] = round(create_ms, 1)
        print(f"daemon at 1024 files: {count} half requests in {opened_ms:.0f} ms, {held} held, "
              f"{fds_under_flood} fds; healthz {health_ms:.1f} ms, create {create_ms:.1f} ms")
    finally:
        for sock in flood:
            sock.close()
        daemon.terminate()
        daemon.wait(timeout=30)


# The cap: who is closed, who is refused ---------------------------------------------------------------

def blocked_creates(media: FakeMedia) -> gevent.event.Event:
    """Make creates with a play_url wait inside the app (serving) until the returned event is set."""
    release = gevent.event.Event()
    media.before_fetch = lambda seed: release.wait(60)
    return release


def test_at_the_cap_a_served_request_is_never_closed_and_a_newcomer_gets_503(
        serve: Callable[..., ApiServer], make_endpoint: Any, media: FakeMedia) -> None:
    server = serve(max_connections=2)
    _, token = make_endpoint()
    release = blocked_creates(media)
    served = [gevent.spawn(request, base(server), "POST", "/v1/calls", timeout=30,
                           form={"token": token, "play_url": f"http://example.com/{i}.wav", **CALL})
              for i in range(2)]
    assert wait_for(lambda: len(media.requests) == 2, 30)  # both inside the app
    refused = request(base(server), "GET", "/healthz", timeout=30)
    assert refused.status == 503 and refused.headers["retry-after"] == "1"
    assert refused.data()["code_desc"] == "server: too many connections in progress; retry later"
    assert server.refused == 1 and server.evicted == 0
    # /metrics reads the same counts (the daemon's Metrics watch its server).
    metrics = Metrics()
    metrics.watch_http_server(server)
    samples = {(s.name, tuple(s.labels.values())): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("callbridge_http_connections_closed_total", ("refused",))] == 1
    assert samples[("callbridge_http_connections_closed_total", ("evicted",))] == 0
    assert samples[("callbridge_http_connections", ())] == 2 == samples[("callbridge_http_connections_max", ())]
    release.set()
    assert [g.get(timeout=30).status for g in served] == [200, 200]
    assert request(base(server), "GET", "/healthz", timeout=30).status == 200


def test_at_the_cap_the_longest_receiving_connection_makes_room(
        serve: Callable[..., ApiServer], make_endpoint: Any, media: FakeMedia) -> None:
    server = serve(max_connections=3, header_timeout=60, idle_timeout=60)
    _, token = make_endpoint()
    release = blocked_creates(media)
    serving = gevent.spawn(request, base(server), "POST", "/v1/calls", timeout=30,
                           form={"token": token, "play_url": "http://example.com/a.wav", **CALL})
    assert wait_for(lambda: len(media.requests) == 1, 30)
    half = socket.create_connection(("127.0.0.1", server.server_port))
    half.sendall(HALF_HEAD)
    assert wait_for(lambda: len(server.connections) == 2, 30)

    def kept_alive() -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()
        return conn

    idle = kept_alive()  # third connection: now idle, receiving since after the half request
    assert len(server.connections) == 3
    # At the cap, each newcomer closes the connection receiving the longest: the half request first...
    newer = kept_alive()
    assert wait_for(lambda: closed_by_peer(half), 30)
    assert idle.sock is not None and not closed_by_peer(idle.sock)
    # ...then the idle keep-alive; the one being served is never touched.
    assert request(base(server), "GET", "/healthz", timeout=30).status == 200
    assert wait_for(lambda: idle.sock is not None and closed_by_peer(idle.sock), 30)
    assert newer.sock is not None and not closed_by_peer(newer.sock)
    assert server.evicted == 2 and server.refused == 0
    release.set()
    assert serving.get(timeout=30).status == 200
    for conn in (idle, newer):
        conn.close()
    half.close()


# Deadlines ----------------------------------------------------------------------------------------------

def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(serve: Callable[..., ApiServer]) -> None:
    server = serve(idle_timeout=0.5)
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    for _ in range(2):  # kept alive between requests that come in time
        conn.request("GET", "/healthz")
        assert conn.getresponse().read()
    assert conn.sock is not None
    received, waited = read_until_closed(conn.sock)
    assert received == b""  # closed without a word: nothing was asked
    # The server's idle time starts as its answer leaves, a moment before this side has read it (0.499 s
    # was seen): not closed early is what counts.
    assert 0.4 <= waited < 30
    FIGURES["idle keep-alive closed after (s, idle_timeout 0.5)"] = round(waited, 2)
    conn.close()


def test_a_slow_header_sender_is_cut_at_the_header_deadline(serve: Callable[..., ApiServer]) -> None:
    server = serve(header_timeout=1.0)
    started = time.monotonic()  # before the connect: the deadline counts from the accept
    sock = socket.create_connection(("127.0.0.1", server.server_port))
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    def drip() -> None:  # one header byte every 50 ms: each read succeeds, the request never ends
        try:
            while True:
                sock.sendall(b"X")
                gevent.sleep(0.05)
        except OSError:
            pass

    dripper = gevent.spawn(drip)
    received, _ = read_until_closed(sock)
    cut_after = time.monotonic() - started
    dripper.kill()
    status, headers, data = envelope_of(received)
    assert status == 408 and headers["connection"] == "close"
    assert data == {"code": 408, "code_desc": "request: headers not received within 1 s"}
    assert 1.0 <= cut_after < 30
    assert server.timed_out == 1 and not server.connections
    FIGURES["slow header sender cut after (s, header_timeout 1)"] = round(cut_after, 2)
    sock.close()


def test_the_header_deadline_counts_from_the_first_byte_on_a_kept_alive_connection(
        serve: Callable[..., ApiServer]) -> None:
    server = serve(header_timeout=1.0, idle_timeout=60)
    sock = kept_alive_after_one_request(server)
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request stalls after its first line
    received, waited = read_until_closed(sock)
    assert envelope_of(received)[0] == 408 and 1.0 <= waited < 30
    sock.close()


def test_a_slow_body_sender_is_cut_at_the_body_deadline(serve: Callable[..., ApiServer]) -> None:
    server = serve(body_timeout=1.0)
    sock = socket.create_connection(("127.0.0.1", server.server_port))
    started = time.monotonic()
    sock.sendall(HALF_BODY)
    received, _ = read_until_closed(sock)
    status, _, data = envelope_of(received)
    assert status == 408 and data["code_desc"] == "body: not received within 1 s"
    assert 1.0 <= time.monotonic() - started < 30
    sock.close()


def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(serve: Callable[..., ApiServer]) -> None:
    server = serve(header_timeout=0.5)
    started = time.monotonic()  # before the connect: the deadline counts from the accept
    sock = socket.create_connection(("127.0.0.1", server.server_port))
    received, _ = read_until_closed(sock)
    assert received == b"" and 0.5 <= time.monotonic() - started < 30
    sock.close()


def test_a_client_that_stops_reading_its_answer_is_let_go_at_the_write_timeout(
        serve: Callable[..., ApiServer], make_endpoint: Any, tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    server = serve(body_timeout=1.0)
    endpoint, token = make_endpoint()
    recording = tmp_path / "long.wav"
    recording.write_bytes(b"\0" * (32 * 1024 * 1024))  # far more than the socket buffers hold
    call = Call.create(callid="r" * 28, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                       due_at=NOW, status="completed", recording_path=str(recording))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.server_port))
    started = time.monotonic()
    sock.sendall(f"GET /v1/calls/{call.callid}/recording HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {token}\r\n\r\n".encode())  # and never read
    assert wait_for(lambda: len(server.connections) == 1, 30)
    assert wait_for(lambda: not server.connections, 30)
    assert 1.0 <= time.monotonic() - started < 30
    assert "Traceback" not in capfd.readouterr().err  # a client going silent is not an error of ours
    sock.close()


# What the server reads itself --------------------------------------------------------------------------

def test_bodies_are_read_before_the_app_chunked_or_not_and_nagle_is_off(
        serve: Callable[..., ApiServer], make_endpoint: Any) -> None:
    server = serve()
    _, token = make_endpoint()
    body = urllib.parse.urlencode({"token": token, **CALL}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    conn.request("POST", "/v1/calls", body=iter([body[:10], body[10:]]),  # an iterable: sent chunked
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
    chunked = conn.getresponse()
    assert chunked.status == 200, chunked.read()
    assert json.loads(chunked.read())["data"]["status"] == "queued"
    conn.request("POST", "/v1/calls", body=json.dumps({"token": token, **CALL}),
                 headers={"Content-Type": "application/json"})
    assert conn.getresponse().status == 200
    assert conn.sock is not None and len(server.connections) == 1  # one kept-alive connection throughout
    handler = next(iter(server.connections))
    assert handler.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    conn.close()


def test_a_body_over_the_limit_is_413_in_the_envelope_chunked_or_not(serve: Callable[..., ApiServer]) -> None:
    server = serve()
    big = b"x" * (MAX_BODY + 1)
    sized = request(base(server), "POST", "/v1/calls", raw=big, content_type="application/json", timeout=30)
    assert sized.status == 413 and sized.data()["code_desc"] == f"body: larger than {MAX_BODY} bytes"
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
    conn.request("POST", "/v1/calls", body=iter([big[:40_000], big[40_000:]]),  # sent chunked
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["data"]["code"] == 413
    conn.close()


def test_a_broken_chunked_body_is_400_in_the_envelope(serve: Callable[..., ApiServer]) -> None:
    server = serve()
    sock = socket.create_connection(("127.0.0.1", server.server_port))
    sock.sendall(b"POST /v1/calls HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n")
    status, _, data = envelope_of(read_until_closed(sock)[0])
    assert status == 400 and data["code_desc"].startswith("body: incomplete or malformed")
    sock.close()


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    script = ("import json, resource; s, h = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, h), h)); "
              "from webapi.server import raise_open_file_limit; print(json.dumps([*raise_open_file_limit(), h]))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    before, now, hard = json.loads(out.stdout)
    assert before == min(256, hard) and now == hard
    assert connection_cap(1000, 1024) == 512 and connection_cap(1000, 65536) == 1000


def test_an_empty_line_between_requests_leaves_the_connection_idle(serve: Callable[..., ApiServer]) -> None:
    """The empty line a client may send after a request (an extra CRLF after a POST body; RFC 9112 2.2)
    asks nothing: the kept-alive connection is idle again, closed at the idle deadline without a word.
    A 408 there would wait in the socket and be read as the answer to the client's next request."""
    server = serve(header_timeout=0.5, idle_timeout=0.5)
    sock = kept_alive_after_one_request(server)
    sock.sendall(b"\r\n")
    received, waited = read_until_closed(sock)
    assert received == b"", received
    assert 0.5 <= waited < 30
    sock.close()
