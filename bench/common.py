"""What every section shares: child processes (always cleaned up), the daemon and the stand-in as they run
in production, a keep-alive HTTP/1.1 load generator on gevent sockets, and percentiles.

The bench process is monkey-patched by ``bench.__main__`` before anything else is imported, so the
load generator, the ESL clients and ``subprocess`` all cooperate on one gevent hub.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
HOST = "127.0.0.1"
DIAL = "sofia/gateway/carrier/{number}"

# ------------------------------------------------------------------------------------------------
# Child processes


_CHILDREN: list[subprocess.Popen[bytes]] = []


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the bench process dies (even by SIGKILL)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    stdout_pipe: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session (the terminal's Ctrl-C reaches us, and we stop it)."""
    logfile: Any = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    out: Any = subprocess.PIPE if stdout_pipe else logfile
    proc = subprocess.Popen(
        list(args),
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=logfile,
        start_new_session=True,
        preexec_fn=_die_with_parent,
    )
    if log:
        logfile.close()  # the child has its own copy
    _CHILDREN.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; only this process (by its pid)."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=5)
    if proc in _CHILDREN:
        _CHILDREN.remove(proc)
    if proc.stdout is not None:
        proc.stdout.close()


def stop_all() -> None:
    for proc in list(reversed(_CHILDREN)):
        stop(proc, timeout=5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary folder on the same disk as production state (not tmpfs), removed afterwards unless
    ``BENCH_KEEP=1`` (then its path is printed: daemon and stand-in logs are in it)."""
    if os.environ.get("BENCH_KEEP"):
        folder = tempfile.mkdtemp(prefix=f"callbridge-bench-{prefix}-")
        print(f"   (keeping {folder})", flush=True)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix=f"callbridge-bench-{prefix}-") as name:
        yield Path(name)


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, KiB."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def cpu_times(pid: int, thread: int | None = None) -> tuple[float, float]:
    """User and system CPU seconds a process (or one of its threads: the main one's id is ``pid``) has
    used so far."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    return sum(cpu_times(pid))


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(interval)
    return predicate()


# ------------------------------------------------------------------------------------------------
# Statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return float(ordered[rank])


# ------------------------------------------------------------------------------------------------
# HTTP: a minimal keep-alive HTTP/1.1 client (one request at a time per connection)


class HttpConn:
    def __init__(self, port: int, host: str = HOST, timeout: float = 30.0) -> None:
        self.host, self.port = host, port
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def roundtrip(self, raw: bytes) -> tuple[int, bytes]:
        self.sock.sendall(raw)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._fill()
        head = self.buf[:end]
        rest = self.buf[end + 4 :]
        status = int(head[9:12])
        length = -1
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        if length < 0:
            raise ConnectionError("response without Content-Length")
        self.buf = rest
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body

    def get(self, path: str) -> tuple[int, bytes]:
        return self.roundtrip(request_bytes("GET", path, host=f"{self.host}:{self.port}"))


def request_bytes(
    method: str,
    path: str,
    *,
    body: bytes = b"",
    content_type: str | None = None,
    host: str = HOST,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_json(
    port: int, method: str, path: str, *, body: bytes = b"", content_type: str | None = None
) -> tuple[int, Any]:
    conn = HttpConn(port)
    try:
        status, data = conn.roundtrip(request_bytes(method, path, body=body, content_type=content_type))
    finally:
        conn.close()
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode(errors="replace")


@dataclass
class LoadResult:
    clients: int
    seconds: float
    ok: int
    errors: int
    latencies_ms: list[float] = field(default_factory=list)
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def p50(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p99(self) -> float:
        return percentile(self.latencies_ms, 99)


def load(
    port: int,
    make_request: Callable[[int], bytes],
    *,
    clients: int,
    seconds: float,
    warmup: float = 1.0,
    max_requests: int | None = None,
    check: Callable[[int, bytes], bool] | None = None,
) -> LoadResult:
    """``clients`` greenlets, each on its own keep-alive connection, send requests back to back.

    Requests started during the first ``warmup`` seconds are not counted; the run stops by itself after
    ``warmup + seconds`` (or ``max_requests`` counted requests). Rate = counted successes / window.
    """
    check = check or (lambda status, _body: status == 200)
    started = time.perf_counter()
    window_start = started + warmup
    deadline = window_start + seconds
    result = LoadResult(clients=clients, seconds=seconds, ok=0, errors=0)
    counter = [0]
    last_done = [window_start]

    def client(index: int) -> None:
        conn = HttpConn(port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= deadline or (max_requests is not None and counter[0] >= max_requests):
                    return
                n = counter[0]
                counter[0] += 1 if t0 >= window_start else 0
                try:
                    status, body = conn.roundtrip(make_request(n))
                except (OSError, ConnectionError) as exc:
                    result.errors += 1
                    result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                    conn.close()
                    gevent.sleep(0.05)
                    conn = HttpConn(port)
                    continue
                t1 = time.perf_counter()
                if t0 < window_start:
                    continue
                last_done[0] = max(last_done[0], t1)
                if check(status, body):
                    result.ok += 1
                    result.latencies_ms.append((t1 - t0) * 1000)
                else:
                    result.errors += 1
                    result.first_error = result.first_error or f"HTTP {status}: {body[:200]!r}"
        finally:
            conn.close()

    gevent.joinall([gevent.spawn(client, i) for i in range(clients)], raise_error=True)
    if max_requests is not None:
        result.seconds = max(1e-6, last_done[0] - window_start)
    return result


# ------------------------------------------------------------------------------------------------
# The stand-in (with the bench's tap) and the daemon, each in its own process


# The session limits of the switch the bench runs against, as an operator sets them in switch.conf.xml
# for a big box: 2,000 bridged calls are 4,000 sessions (FreeSWITCH's default max is 1,000), and 30
# sessions a second (its default) would hold the engine to 13 calls a second, which measures the switch,
# not the daemon. The daemon reads them and paces under them as it would under any limits.
BIG_SWITCH_SPS = 10_000
BIG_SWITCH_MAX_SESSIONS = 100_000


class Switch:
    """``python -m bench.switch``: the FreeSWITCH stand-in plus the bench's timing tap."""

    def __init__(self, time_scale: float, log: Path, *, sps: int = BIG_SWITCH_SPS,
                 max_sessions: int = BIG_SWITCH_MAX_SESSIONS) -> None:
        self.proc = spawn(
            [PY, "-m", "bench.switch", "--port", "0", "--time-scale", str(time_scale), "--sps", str(sps),
             "--max-sessions", str(max_sessions)],
            log=log,
            stdout_pipe=True,
        )
        self.sps, self.max_sessions = sps, max_sessions
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening on" not in line:
            stop(self.proc)
            raise RuntimeError(f"the stand-in did not start: {line!r}; see {log}")
        self.port = int(line.split("listening on ", 1)[1].split()[0].rsplit(":", 1)[1])
        self.time_scale = time_scale

    def api(self, command: str) -> str:
        return esl_api(self.port, command)

    def tap(self) -> dict[str, Any]:
        """{"a": {uuid: {"originate_wall", "answered", "first_sendmsg"}}} (monotonic s, one clock)."""
        data: dict[str, Any] = json.loads(self.api("standin benchtap"))
        return data

    def stop(self) -> None:
        stop(self.proc)


def esl_api(port: int, command: str, password: str = "ClueCon", timeout: float = 60) -> str:
    """One ``api`` command over a fresh raw Event Socket connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        stream = sock.makefile("rb")

        def read_message() -> tuple[dict[str, str], bytes]:
            headers: dict[str, str] = {}
            while line := stream.readline().decode().rstrip("\n"):
                key, _, value = line.partition(": ")
                headers[key] = value
            return headers, stream.read(int(headers.get("Content-Length", "0")))

        read_message()
        sock.sendall(f"auth {password}\n\n".encode())
        read_message()
        sock.sendall(f"api {command}\n\n".encode())
        return read_message()[1].decode()


class Daemon:
    """``python -m daemon run`` as production runs it, with its own state folder and ports."""

    def __init__(self, folder: Path, esl_port: int, **settings: Any) -> None:
        self.folder = folder
        self.command = [PY, "-m", "daemon", "run"]
        self.http_port = free_port()
        self.env = dict(
            os.environ,
            CALLBRIDGE_STATE_DIR=str(folder / "state"),
            CALLBRIDGE_ESL_PORT=str(esl_port),
            CALLBRIDGE_HTTP_PORT=str(self.http_port),
            CALLBRIDGE_LOG_LEVEL="WARNING",
            CALLBRIDGE_CALLS_PER_SECOND="0",  # no operator's cap: the switch's limits pace the calls
            CALLBRIDGE_MAX_IN_FLIGHT="1000",
            PYTHONUNBUFFERED="1",
        )
        self.env.pop("CALLBRIDGE_CONFIG", None)
        for name, value in settings.items():
            self.env["CALLBRIDGE_" + name.upper()] = str(value)
        self.log = folder / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def database(self) -> Path:
        return self.folder / "state" / "callbridge.db"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def add_endpoint(self, name: str = "bench", **options: Any) -> dict[str, Any]:
        args = [
            PY,
            "-m",
            "daemon",
            "endpoint",
            "add",
            "--name",
            name,
            "--caller-id",
            "15551230000",
            "--dial-string",
            DIAL,
            "--max-in-flight",
            "100000",
            "--calls-per-second",
            "100000",
            "--daily-cap",
            "100000000",
            "--json",
        ]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        done = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"endpoint add failed: {done.stderr.strip()}")
        out: dict[str, Any] = json.loads(done.stdout)
        return out

    def start(self, ready_timeout: float = 60) -> None:
        self.proc = spawn(self.command, env=self.env, log=self.log)
        profile_dir = os.environ.get("BENCH_PYSPY")
        if profile_dir:  # sample the daemon for the whole of its life: collapsed stacks for py-spy's users
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            out = Path(profile_dir) / f"daemon-{self.folder.name}-{self.proc.pid}.txt"
            spawn(
                [
                    str(Path(PY).parent / "py-spy"),
                    "record",
                    "--pid",
                    str(self.proc.pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--output",
                    str(out),
                    "--nonblocking",
                    *os.environ.get("BENCH_PYSPY_ARGS", "").split(),
                ],
                log=Path(profile_dir) / "py-spy.log",
            )
        ok = wait_until(self._ready, ready_timeout, 0.05)
        if not ok:
            self.stop()
            raise RuntimeError(f"the daemon did not become ready; see {self.log}")

    def start_unready(self, timeout: float = 60) -> None:
        """Start without a switch: wait for ``/healthz`` only (``/readyz`` stays 503)."""
        self._path = "/healthz"
        self.start(timeout)

    _path = "/readyz"

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}); see {self.log}")
        try:
            status, _ = http_json(self.http_port, "GET", self._path)
        except OSError:
            return False
        return status == 200

    def metrics(self) -> dict[str, float]:
        """Prometheus samples summed by name plus ``name{labels}`` keys."""
        conn = HttpConn(self.http_port)
        try:
            status, body = conn.get("/metrics")
        finally:
            conn.close()
        out: dict[str, float] = {}
        for line in body.decode().splitlines():
            if not line or line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            out[key] = number
            name = key.split("{", 1)[0]
            if "{" in key:
                out[name] = out.get(name, 0.0) + number
        return out

    def stop(self) -> None:
        stop(self.proc, timeout=20)
        self.proc = None


# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh database on a PostgreSQL started for the bench (durable, as in production)."""
    from tests.postgres_server import start_server, stop_server

    server = start_server(durable=True)
    try:
        yield server.url(server.new_database())
    finally:
        stop_server(server)


# Calls written straight into the store (before the daemon starts), as the API would have


def insert_calls(database: Path | str, endpoint_id: int, rows: Sequence[dict[str, Any]]) -> None:
    """Insert pending call rows with the daemon's own models (defaults filled in by peewee), into a SQLite
    file or the store at a URL."""
    import secrets

    from daemon.store import Call, open_database, utcnow

    db = open_database(database if isinstance(database, str) else f"sqlite:///{database}")
    try:
        now = utcnow()
        full = []
        for row in rows:
            values = {
                "callid": secrets.token_hex(14),
                "endpoint": endpoint_id,
                "requested_at": now,
                "scheduled": False,
                "status": "queued",
                "due_at": now,
            }
            values.update(row)
            full.append(values)
        with db.atomic():
            for start in range(0, len(full), 500):
                Call.insert_many(full[start : start + 500]).execute()
    finally:
        db.close()


def tone_file(media_dir: Path, seconds: float, freq: float, rate: int = 8000) -> str:
    """A tone stored as the media library stores its files: ``<sha256>.wav`` in the media folder."""
    import hashlib
    import io
    import math
    import struct
    import wave

    media_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(
            b"".join(
                struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
                for i in range(int(seconds * rate))
            )
        )
    data = buffer.getvalue()
    path = media_dir / f"{hashlib.sha256(data).hexdigest()}.wav"
    path.write_bytes(data)
    return str(path)


def read_calls(database: Path, columns: str, where: str = "1") -> list[tuple[Any, ...]]:
    """Rows from the daemon's store, read-only (the daemon may still be running)."""
    import sqlite3

    con = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)
    try:
        return list(con.execute(f"SELECT {columns} FROM call WHERE {where}"))
    finally:
        con.close()
