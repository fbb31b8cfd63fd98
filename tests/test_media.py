"""MediaLibrary.from_url and the fetcher, against a real HTTP server on 127.0.0.1 (port 0).

The private-address guard is opened for the test server explicitly in each test's settings, and one
test checks it is closed by default. Redirect and DNS tests use the injected resolver so that a name
can stand for the test server while 127.0.0.1 itself (or 169.254.169.254) stays forbidden.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest
import soundfile as sf

from daemon.config import Settings
from daemon.media.fetch import AddressGuard, non_public_kind
from daemon.media.library import MediaError, MediaFile, MediaLibrary
from daemon.media.pool import WorkerPool

Handler = Callable[[BaseHTTPRequestHandler], None]


# Test helpers -----------------------------------------------------------------------------------------

def tone_file(freq: float = 440.0, seconds: float = 1.0, rate: int = 8000, fmt: str = "WAV",
              subtype: str | None = None, channels: int = 1) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, np.column_stack([x] * channels) if channels > 1 else x, rate, format=fmt, subtype=subtype)
    return out.getvalue()


class MediaServer:
    """A threaded HTTP server on 127.0.0.1:0 whose routes are plain bodies or handler functions."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Handler] = {}
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        server = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.hits[path] += 1
                    server.hosts.append(self.headers.get("Host", ""))
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                    route(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), RequestHandler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def body(self, path: str, data: bytes, content_type: str = "audio/wav") -> None:
        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        self.routes[path] = send

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        def send(h: BaseHTTPRequestHandler) -> None:
            h.send_response(status)
            h.send_header("Location", location)
            h.send_header("Content-Length", "0")
            h.end_headers()
        self.routes[path] = send

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[MediaServer]:
    srv = MediaServer()
    yield srv
    srv.close()


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"state_dir": str(tmp_path), "media_allow_private": ["127.0.0.1"],
                              "media_connect_timeout": 2.0, "media_read_timeout": 2.0}
    values.update(overrides)
    total = values.pop("media_total_timeout", None)
    settings = Settings(**values)
    if total is not None:  # not a Settings field (yet); the library reads it with getattr
        setattr(settings, "media_total_timeout", total)  # noqa: B010
    return settings


# One pool of worker processes for the whole module: each library would otherwise start its own.
POOL = WorkerPool(2, queue_timeout=60.0, cpu_seconds=10, memory_mb=Settings.media_memory_mb)


def library(tmp_path: Path, resolver: Callable[[str, int], list[str]] | None = None, **overrides: Any
            ) -> MediaLibrary:
    return MediaLibrary(make_settings(tmp_path, **overrides), resolver=resolver, pool=POOL)


def fake_dns(table: dict[str, list[str]], calls: Counter[str] | None = None) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls[host] += 1
        return list(table.get(host, []))
    return resolve


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until true (raising after ``timeout``); not a fixed sleep."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        pause.wait(0.002)


def refusal(lib: MediaLibrary, url: str, kind: str = "play") -> str:
    with pytest.raises(MediaError) as caught:
        lib.from_url(url, kind=kind)
    return str(caught.value)


# Fetching and normalising --------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "data"), [
    ("wav8000.wav", tone_file(rate=8000)),
    ("wav11025.wav", tone_file(rate=11025)),
    ("wav44100.wav", tone_file(rate=44100)),
    ("stereo.wav", tone_file(rate=44100, channels=2)),
    ("eightbit.wav", tone_file(rate=11025, subtype="PCM_U8")),
    ("float.wav", tone_file(rate=22050, subtype="FLOAT")),
    ("tone.mp3", tone_file(rate=44100, fmt="MP3")),
    ("tone.flac", tone_file(rate=16000, fmt="FLAC")),
    ("tone.ogg", tone_file(rate=44100, fmt="OGG")),
    ("mislabelled.txt", tone_file(rate=8000)),  # the name means nothing; the bytes are a WAV
])
def test_audio_is_fetched_normalised_and_stored_by_keyed_hash(tmp_path: Path, server: MediaServer,
                                                        name: str, data: bytes) -> None:
    server.body("/" + name, data, content_type="text/plain")
    media = library(tmp_path).from_url(server.url("/" + name), kind="play")
    stored = Path(media.path).read_bytes()
    key = bytes.fromhex((tmp_path / "media.key").read_text())
    assert media.path == str(tmp_path / "media" / f"{media.name}.wav")
    assert hmac.new(key, stored, hashlib.sha256).hexdigest() == media.name and media.bytes == len(stored)
    assert hashlib.sha256(stored).hexdigest() != media.name  # not computable without the key
    info = sf.info(media.path)
    assert (info.format, info.subtype, info.channels, info.samplerate) == ("WAV", "PCM_16", 1, 8000)
    assert media.seconds == pytest.approx(1.0, abs=0.1)
    assert not [p for p in Path(media.path).parent.iterdir() if p.name.startswith(".tmp-")]


def test_same_content_from_two_urls_is_one_file(tmp_path: Path, server: MediaServer) -> None:
    server.body("/a.wav", tone_file())
    server.body("/b.wav", tone_file())
    lib = library(tmp_path)
    assert lib.from_url(server.url("/a.wav"), kind="play") == lib.from_url(server.url("/b.wav"), kind="dialtone")


@pytest.mark.parametrize(("data", "reason"), [
    (b"Just some text, saved as message.wav\n" * 30, "is not audio (could not decode it)"),
    (b"<!DOCTYPE html><html><body><h1>Welcome</h1>" + b"<p>hello</p>" * 200 + b"</body></html>",
     "is not audio (could not decode it)"),
    (tone_file(seconds=2.0)[:9000], "is truncated (the file ends before its audio data does)"),
    (b"", "is empty (the file has no bytes)"),
])
def test_what_is_not_usable_audio_is_refused_with_a_reason(tmp_path: Path, server: MediaServer,
                                                           data: bytes, reason: str) -> None:
    server.body("/file.wav", data, content_type="audio/wav")
    assert refusal(library(tmp_path), server.url("/file.wav")) == reason


def test_length_limit_depends_on_kind(tmp_path: Path, server: MediaServer) -> None:
    server.body("/long.wav", tone_file(seconds=3.0))
    lib = library(tmp_path, media_max_dialtone_seconds=2, media_max_play_seconds=5)
    assert refusal(lib, server.url("/long.wav"), kind="dialtone") == "is longer than 2 seconds"
    assert lib.from_url(server.url("/long.wav"), kind="play").seconds == pytest.approx(3.0)
    lib = library(tmp_path, media_max_dialtone_seconds=1, media_max_play_seconds=2)
    assert refusal(lib, server.url("/long.wav"), kind="play") == "is longer than 2 seconds"


def test_http_errors_are_reported(tmp_path: Path, server: MediaServer) -> None:
    assert refusal(library(tmp_path), server.url("/missing.wav")) == \
        "could not be fetched: the server answered 404 Not Found"


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert refusal(library(tmp_path), f"http://127.0.0.1:{port}/x.wav") == \
        "could not be fetched: connection refused"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_checks_the_certificate_for_the_name_it_asked_for(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=media.lan", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: names.append(name)
    tls_server = MediaServer(tls=context)
    try:
        lib = library(tmp_path, fake_dns({"media.lan": ["127.0.0.1"]}), media_allow_private=["media.lan"])
        reason = refusal(lib, tls_server.url("/tone.wav", host="media.lan", scheme="https"))
    finally:
        tls_server.close()
    assert reason.startswith("could not be fetched: its TLS certificate is not valid (self")
    assert names == ["media.lan"]  # connected to 127.0.0.1, but asked for the name (SNI)


@pytest.mark.parametrize("url", ["ftp://example.com/a.wav", "file:///etc/passwd", "gopher://x/", "a.wav"])
def test_only_http_and_https(tmp_path: Path, url: str) -> None:
    assert refusal(library(tmp_path), url) == "must be an http or https URL"


# Size and time limits ----------------------------------------------------------------------------------------

def test_huge_content_length_is_refused_before_reading(tmp_path: Path, server: MediaServer) -> None:
    def never_ending(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(1024 ** 3))
        h.end_headers()
        h.wfile.write(b"RIFF")
        h.wfile.flush()
        server.stop.wait()  # holds the connection open until the test ends
    server.routes["/huge.wav"] = never_ending
    started = time.monotonic()  # the server never sends more: only a read or total timeout would end a read
    lib = library(tmp_path, media_read_timeout=60.0, media_total_timeout=120.0)
    assert refusal(lib, server.url("/huge.wav")) == "is larger than 50 MB"
    assert time.monotonic() - started < 30  # refused on the header, before any read timed out


def test_a_content_length_that_is_not_a_number_is_ignored(tmp_path: Path, server: MediaServer) -> None:
    # "\u00b2" (superscript two) passes str.isdigit() but not int(): it used to escape as a bare
    # ValueError, which the API turned into "play_url: invalid literal for int() with base 10".
    data = tone_file()

    def odd_length(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "\u00b2")
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(data)
        h.close_connection = True
    server.routes["/odd.wav"] = odd_length
    media = library(tmp_path).from_url(server.url("/odd.wav"), kind="play")
    assert abs(media.seconds - 1.0) < 0.01


def test_endless_body_without_length_stops_at_the_cap(tmp_path: Path, server: MediaServer) -> None:
    sent: list[int] = []

    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        chunk = b"\0" * 65536
        while not server.stop.is_set():
            h.wfile.write(chunk)
            sent.append(len(chunk))
    server.routes["/endless.wav"] = endless
    assert refusal(library(tmp_path, media_max_bytes=1024 * 1024), server.url("/endless.wav")) == \
        "is larger than 1 MB"


def trickle(stop: threading.Event, in_headers: bool) -> Handler:
    """A server that sends one byte every 50 ms: each read succeeds, the whole never ends."""
    def send(h: BaseHTTPRequestHandler) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
        slow = b"\0" * 100000
        if in_headers:
            slow = head + slow
        else:
            h.wfile.write(head)
        for i in range(len(slow)):
            h.wfile.write(slow[i:i + 1])
            h.wfile.flush()
            if stop.wait(0.05):
                return
    return send


@pytest.mark.parametrize("in_headers", [True, False], ids=["headers", "body"])
def test_slow_trickle_hits_the_total_deadline(tmp_path: Path, server: MediaServer, in_headers: bool) -> None:
    server.routes["/slow.wav"] = trickle(server.stop, in_headers)
    lib = library(tmp_path, media_read_timeout=0.5, media_total_timeout=1.0)
    started = time.monotonic()
    assert refusal(lib, server.url("/slow.wav")) == "could not be fetched: it took longer than 1 seconds"
    assert time.monotonic() - started < 30  # at the total deadline, not after the trickle's 5,000 s


def test_a_name_server_that_never_answers_hits_the_total_deadline(tmp_path: Path) -> None:
    """The look-up of the host is under the total deadline too: a resolver still silent at the deadline
    (here it would answer only after a minute, and with an address the guard refuses) ends the fetch."""
    def silent_dns(host: str, port: int) -> list[str]:
        gevent.sleep(60)
        return ["127.0.0.2"]

    lib = library(tmp_path, resolver=silent_dns, media_total_timeout=1.0)
    assert refusal(lib, "http://media.example/a.wav") == "could not be fetched: it took longer than 1 seconds"


def test_silent_server_hits_the_read_timeout(tmp_path: Path, server: MediaServer) -> None:
    def silent(h: BaseHTTPRequestHandler) -> None:
        server.stop.wait()
    server.routes["/silent.wav"] = silent
    lib = library(tmp_path, media_read_timeout=0.3)
    assert refusal(lib, server.url("/silent.wav")) == "could not be fetched: the server sent nothing for 0.3 seconds"


# Redirects ------------------------------------------------------------------------------------------------------

def test_redirects_are_followed(tmp_path: Path, server: MediaServer) -> None:
    server.body("/tone.wav", tone_file())
    server.redirect("/old.wav", "/moved.wav", 301)
    server.redirect("/moved.wav", server.url("/tone.wav"), 307)
    assert library(tmp_path).from_url(server.url("/old.wav"), kind="play").seconds == pytest.approx(1.0)
    assert server.hits["/tone.wav"] == 1


def test_redirect_loop(tmp_path: Path, server: MediaServer) -> None:
    server.redirect("/a.wav", "/b.wav")
    server.redirect("/b.wav", "/a.wav")
    assert refusal(library(tmp_path), server.url("/a.wav")) == "could not be fetched: it redirects in a loop"


def test_redirect_cap(tmp_path: Path, server: MediaServer) -> None:
    def onwards(h: BaseHTTPRequestHandler) -> None:
        n = int(h.path.rsplit("=", 1)[1]) if "=" in h.path else 0
        h.send_response(302)
        h.send_header("Location", f"/hop?n={n + 1}")
        h.send_header("Content-Length", "0")
        h.end_headers()
    server.routes["/hop"] = onwards
    assert refusal(library(tmp_path, media_max_redirects=3), server.url("/hop")) == \
        "could not be fetched: more than 3 redirects"
    assert server.hits["/hop"] == 4


# The private-address guard --------------------------------------------------------------------------------------

def test_guard_is_closed_by_default(tmp_path: Path, server: MediaServer) -> None:
    server.body("/tone.wav", tone_file())
    lib = library(tmp_path, media_allow_private=[])
    assert refusal(lib, server.url("/tone.wav")) == \
        "resolves to a loopback address (127.0.0.1), which is not allowed"
    assert refusal(lib, server.url("/tone.wav", host="[::ffff:127.0.0.1]")) == \
        "resolves to a loopback address (127.0.0.1), which is not allowed"
    assert server.hits["/tone.wav"] == 0


def test_guard_opens_for_ranges_and_names(tmp_path: Path, server: MediaServer) -> None:
    server.body("/tone.wav", tone_file())
    assert library(tmp_path, media_allow_private=["127.0.0.0/8"]).from_url(server.url("/tone.wav"), kind="play")
    named = library(tmp_path, fake_dns({"media.lan": ["127.0.0.1"]}), media_allow_private=["media.lan"])
    assert named.from_url(server.url("/tone.wav", host="media.lan"), kind="play")
    # Connected to the checked address, but the request names the host it was asked for.
    assert server.hosts[-1] == f"media.lan:{server.port}"


def test_name_resolving_to_private_address_is_refused(tmp_path: Path) -> None:
    lib = library(tmp_path, fake_dns({"intranet.example": ["10.0.0.5"],
                                      "mixed.example": ["93.184.216.34", "192.168.1.1"]}),
                  media_allow_private=[])
    assert refusal(lib, "http://intranet.example/a.wav") == \
        "resolves to a private address (10.0.0.5), which is not allowed"
    # One bad answer among good ones is enough to refuse: the connection could go to any of them.
    assert refusal(lib, "http://mixed.example/a.wav") == \
        "resolves to a private address (192.168.1.1), which is not allowed"
    assert refusal(lib, "http://nowhere.example/a.wav") == \
        "could not be fetched: the host name nowhere.example does not resolve"


def test_redirect_to_loopback_is_refused(tmp_path: Path, server: MediaServer) -> None:
    # The first hop is the allowed name media.lan (the test server); 127.0.0.1 by address is not allowed.
    server.body("/tone.wav", tone_file())
    server.redirect("/go.wav", server.url("/tone.wav", host="127.0.0.1"))
    lib = library(tmp_path, fake_dns({"media.lan": ["127.0.0.1"]}), media_allow_private=["media.lan"])
    assert lib.from_url(server.url("/tone.wav", host="media.lan"), kind="play")  # the first hop works
    assert refusal(lib, server.url("/go.wav", host="media.lan")) == \
        "redirects to a loopback address (127.0.0.1), which is not allowed"
    assert server.hits == Counter({"/tone.wav": 1, "/go.wav": 1})


def test_redirect_to_cloud_metadata_is_refused(tmp_path: Path, server: MediaServer) -> None:
    server.redirect("/go.wav", "http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    server.redirect("/go6.wav", "http://[::ffff:169.254.169.254]/latest/meta-data/")
    server.redirect("/ftp.wav", "ftp://media.lan/tone.wav")
    lib = library(tmp_path)  # even with 127.0.0.1 allowed
    assert refusal(lib, server.url("/ftp.wav")) == \
        "could not be fetched: it redirects to an unusable URL (must be an http or https URL)"
    assert refusal(lib, server.url("/go.wav")) == \
        "redirects to a link-local address (169.254.169.254), which is not allowed"
    assert refusal(lib, server.url("/go6.wav")) == \
        "redirects to a link-local address (169.254.169.254), which is not allowed"


def test_dns_rebinding_cannot_reach_the_checked_names_second_answer(tmp_path: Path, server: MediaServer) -> None:
    # First answer public, later answers 127.0.0.1 (where the file is). The fetcher resolves once,
    # checks, and connects to what it checked; it never asks again, so it never reaches 127.0.0.1.
    server.body("/tone.wav", tone_file())
    calls: Counter[str] = Counter()
    answers = iter([["1.0.0.1"]])

    def rebinding(host: str, port: int) -> list[str]:
        calls[host] += 1
        return next(answers, ["127.0.0.1"])
    lib = library(tmp_path, rebinding, media_allow_private=[], media_connect_timeout=0.3)
    reason = refusal(lib, server.url("/tone.wav", host="rebind.example"))
    assert reason.startswith("could not be fetched:")
    assert calls == Counter({"rebind.example": 1}) and server.hits["/tone.wav"] == 0


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("10.0.0.5", "private"), ("172.16.3.4", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("::ffff:169.254.169.254", "link-local"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "private"), ("100.64.0.1", "non-public"),
    ("2002:7f00:1::1", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a00:5", "private"),  # NAT64 of 10.0.0.5
    ("fec0::1", "site-local"),  # deprecated, which Python's flags call neither private nor reserved
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])
def test_address_classes(address: str, kind: str | None) -> None:
    import ipaddress
    assert non_public_kind(ipaddress.ip_address(address)) == kind
    assert (AddressGuard().refusal("h", address) is None) == (kind is None)


# Concurrency, cache and paths ---------------------------------------------------------------------------------

def test_concurrent_requests_for_one_url_fetch_once(tmp_path: Path, server: MediaServer) -> None:
    release = threading.Event()
    data = tone_file()

    def held(h: BaseHTTPRequestHandler) -> None:
        release.wait(5)
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    server.routes["/held.wav"] = held
    lib = library(tmp_path)
    url = server.url("/held.wav")
    results: list[MediaFile | Exception] = []

    def ask(kind: str) -> None:
        try:
            results.append(lib.from_url(url, kind=kind))
        except Exception as exc:  # reported by the assertion below
            results.append(exc)
    workers = [threading.Thread(target=ask, args=("play" if i % 2 else "dialtone",)) for i in range(8)]
    for worker in workers:
        worker.start()
    wait_until(lambda: server.hits["/held.wav"] == 1 and lib._flights.waiters(("url", url)) == 7)
    release.set()
    for worker in workers:
        worker.join(5)
    assert server.hits["/held.wav"] == 1
    assert len(results) == 8 and all(r == results[0] for r in results) and isinstance(results[0], MediaFile)


def test_playable_and_path_for_name(tmp_path: Path, server: MediaServer) -> None:
    server.body("/tone.wav", tone_file())
    lib = library(tmp_path)
    media = lib.from_url(server.url("/tone.wav"), kind="play")
    assert lib.playable(media) == media.path == lib.playable(media.path) == lib.playable(media.name)
    assert lib.path_for_name(media.name) == media.path
    for bad in ("../../etc/passwd", media.name.upper(), media.name[:-1], media.name + ".wav", "0" * 64):
        assert lib.path_for_name(bad) is None
    remote = library(tmp_path, media_mode="http", media_base_url="http://10.1.2.3:8080/")
    assert remote.playable(media) == f"http://10.1.2.3:8080/media/{media.name}.wav"


def test_eviction_is_lru_and_keeps_pinned_and_fresh_files(tmp_path: Path, server: MediaServer) -> None:
    for freq in (300, 400, 500, 600):
        server.body(f"/{freq}.wav", tone_file(freq))
    lib = library(tmp_path)
    oldest, old, newer, fresh = (lib.from_url(server.url(f"/{f}.wav"), kind="play") for f in (300, 400, 500, 600))
    now = time.time()
    for age, media in ((4000, oldest), (3000, old), (2000, newer)):
        os.utime(media.path, (now - age, now - age))
    lib = library(tmp_path, media_cache_bytes=3 * oldest.bytes + 10)
    freed = lib.evict(lambda: [oldest.path], now=now)
    assert freed == old.bytes  # `oldest` is pinned; dropping `old` brings the total under the cap
    assert [lib.path_for_name(m.name) is not None for m in (oldest, old, newer, fresh)] == [True, False, True, True]
    lib = library(tmp_path, media_cache_bytes=0)
    lib.evict(lambda: [oldest.name], now=now)
    # `fresh` was used seconds ago (a call may be being created with it); the pinned file stays.
    assert [lib.path_for_name(m.name) is not None for m in (oldest, newer, fresh)] == [True, False, True]


def cached_files(lib: MediaLibrary, count: int, *, age: float, size: int = 1000) -> list[Path]:
    """``count`` files in the media folder as the library names them, last used ``age`` seconds ago."""
    folder = Path(lib.playable("0" * 64)).parent
    made = []
    for n in range(count):
        path = folder / f"{hashlib.sha256(str((n, age)).encode()).hexdigest()}.wav"
        path.write_bytes(b"\0" * size)
        os.utime(path, (time.time() - age, time.time() - age))
        made.append(path)
    return made


def test_eviction_asks_what_calls_will_play_only_when_the_folder_is_over_its_bound(tmp_path: Path) -> None:
    """The question reads the store (every call not yet ended): not asked hourly for nothing."""
    lib = library(tmp_path, media_cache_bytes=10_000)
    cached_files(lib, 5, age=7200)
    asked: list[int] = []

    def in_use() -> list[str]:
        asked.append(1)
        return []

    assert lib.evict(in_use) == 0 and asked == []
    cached_files(lib, 10, age=3600)
    assert lib.evict(in_use) == 5_000 and asked == [1]  # the five oldest went


def test_eviction_reads_the_folder_while_the_event_loop_goes_on(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Tens of thousands of cached messages took seconds to list: calls in progress must not wait for it.
    The folder's listing here waits for a greenlet of the loop to run: it can only end if the listing
    does not hold the loop."""
    lib = library(tmp_path, media_cache_bytes=0)
    old = cached_files(lib, 2, age=7200)
    ran_meanwhile = gevent.monkey.get_original("_thread", "allocate_lock")()
    ran_meanwhile.acquire()
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        assert ran_meanwhile.acquire(timeout=10), "the loop did not run while the folder was read"
        ran_meanwhile.release()
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    gevent.spawn(ran_meanwhile.release)
    assert lib.evict(list) == 2000
    assert not any(path.exists() for path in old)


def test_a_file_used_while_the_folder_was_read_is_not_deleted(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lib = library(tmp_path, media_cache_bytes=0)
    used, unused = cached_files(lib, 2, age=7200)
    listing = lib._listing

    def listing_then_a_call_plays_one(now: float) -> Any:
        found = listing(now)
        os.utime(used)  # a call created meanwhile plays it (as from_url and speak touch a file they reuse)
        return found

    monkeypatch.setattr(lib, "_listing", listing_then_a_call_plays_one)
    assert lib.evict(list) == 1000
    assert used.exists() and not unused.exists()


def test_eviction_drops_spoken_entries_without_audio_and_stale_temporary_files(tmp_path: Path) -> None:
    lib = library(tmp_path, media_cache_bytes=1000)
    evicted, kept = cached_files(lib, 1, age=7200) + cached_files(lib, 1, age=60)
    folder = kept.parent
    for target in (evicted, kept):
        (folder / "tts" / hashlib.sha256(target.name.encode()).hexdigest()).write_text(target.stem)
    stale, young = folder / ".tmp-download-stale", folder / ".tmp-download-young"
    for path, age in ((stale, 7200), (young, 60)):
        path.write_bytes(b"\0" * 10)
        os.utime(path, (time.time() - age, time.time() - age))
    assert lib.evict(list) == 1010
    assert [path.exists() for path in (evicted, kept, stale, young)] == [False, True, False, True]
    assert [entry.read_text() for entry in (folder / "tts").iterdir()] == [kept.stem]


def test_a_used_file_moves_to_the_back_of_the_eviction_queue(tmp_path: Path, server: MediaServer) -> None:
    server.body("/a.wav", tone_file(300))
    server.body("/b.wav", tone_file(400))
    lib = library(tmp_path)
    a, b = lib.from_url(server.url("/a.wav"), kind="play"), lib.from_url(server.url("/b.wav"), kind="play")
    now = time.time()
    os.utime(a.path, (now - 5000, now - 5000))
    os.utime(b.path, (now - 4000, now - 4000))
    lib.from_url(server.url("/a.wav"), kind="play")  # a use: a is now the most recent
    os.utime(a.path, (now - 3000, now - 3000))  # still old enough to be evictable, but newer than b
    assert library(tmp_path, media_cache_bytes=a.bytes).evict(list, now=now) == b.bytes
