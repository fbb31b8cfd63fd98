"""Media through the daemon as it runs in production (``python -m daemon run`` in a subprocess, real HTTP).

* 20 concurrent creates whose play_url is a 49 MB file: downloads go to temporary files and decoding to
  the worker processes, so the daemon's peak RSS (VmHWM) barely moves (it rose by 760 MB when bodies
  were held in memory and decoded in the daemon's threads).
* 50 concurrent creates, each with its own play_url and msg: all answered (9 of 40 hung for good when
  decoding ran in gevent's thread pool).

No FreeSWITCH is needed: the calls are scheduled for tomorrow, and the Event Socket port is closed.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import pytest
import soundfile as sf

from tests.test_media import MediaServer, tone_file

ROOT = Path(__file__).resolve().parents[1]
HANG = 180.0  # seconds: a hang detector, not a speed target
MB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """``python -m daemon run`` on its own state folder, with no FreeSWITCH to talk to."""

    def __init__(self, state: Path, **settings: str) -> None:
        self.env = dict(os.environ, CALLBRIDGE_STATE_DIR=str(state), CALLBRIDGE_ESL_PORT=str(free_port()),
                        CALLBRIDGE_HTTP_PORT=str(free_port()), CALLBRIDGE_LOG_LEVEL="WARNING",
                        CALLBRIDGE_MEDIA_ALLOW_PRIVATE="127.0.0.1",
                        **{f"CALLBRIDGE_{k.upper()}": v for k, v in settings.items()})
        self.base = f"http://127.0.0.1:{self.env['CALLBRIDGE_HTTP_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def __enter__(self) -> Daemon:
        added = subprocess.run([sys.executable, "-m", "daemon", "endpoint", "add", "--name", "media", "--caller-id",
                                "15551230000", "--dial-string", "sofia/gateway/carrier/{number}", "--json"],
                               cwd=ROOT, env=self.env, capture_output=True, check=True)
        self.token = json.loads(added.stdout)["token"]
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + HANG
        while self.request("GET", "/healthz")[0] != 200:
            assert self.proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            gevent.sleep(0.1)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def request(self, method: str, path: str, data: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        body = urllib.parse.urlencode(data).encode() if data else None
        req = urllib.request.Request(self.base + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=HANG) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except (urllib.error.URLError, ConnectionError):
            return 0, {}

    def create(self, i: int, **fields: str) -> tuple[int, dict[str, Any]]:
        tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d %H:%M")
        return self.request("POST", "/v1/calls", {"token": self.token, "phone_a": f"1555000{i:04d}",
                                                  "phone_b": f"1555100{i:04d}", "call_date": tomorrow, **fields})

    def vm_hwm(self, pid: int | None = None) -> int:
        """Peak resident memory of the daemon (or of ``pid``), in bytes."""
        assert self.proc is not None
        status = Path(f"/proc/{pid or self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024

    def workers(self) -> list[int]:
        assert self.proc is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(entry.name))
        return pids


def big_wav(megabytes: float) -> bytes:
    """A 48 kHz stereo 16-bit WAV of about ``megabytes`` MB (a tone; it decodes as real audio)."""
    frames = int(megabytes * MB / 4)
    t = np.arange(frames, dtype=np.float32) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, np.column_stack([tone, tone]), 48000, format="WAV", subtype="PCM_16")
    return out.getvalue()


def run_all(work: list[Any]) -> list[Any]:
    greenlets = [gevent.spawn(w) for w in work]
    gevent.joinall(greenlets, timeout=HANG)
    assert all(g.ready() for g in greenlets), f"{sum(not g.ready() for g in greenlets)} requests never answered"
    return [g.value for g in greenlets]


@pytest.mark.slow
@pytest.mark.timeout(600)  # a gigabyte through loopback and twenty decodes, on a machine that may be busy
def test_twenty_concurrent_49_mb_downloads_barely_move_the_daemons_memory(tmp_path: Path) -> None:
    body = big_wav(49)
    server = MediaServer()
    for i in range(20):
        server.body(f"/big{i}.wav", body)
    server.body("/small.wav", tone_file())
    try:
        # Generous waits: twenty 255-second files on two workers take a while on a busy machine.
        with Daemon(tmp_path / "state", media_queue_timeout="600", media_total_timeout="600") as daemon:
            status, answer = daemon.create(0, play_url=server.url("/small.wav"), msg="Warming up.", msg_lang="en-GB")
            assert status == 200, answer  # the daemon and a worker have done one of each
            before = daemon.vm_hwm()
            started = time.monotonic()
            answers = run_all([lambda i=i: daemon.create(i + 1, play_url=server.url(f"/big{i}.wav"))
                               for i in range(20)])
            elapsed = time.monotonic() - started
            assert [s for s, _ in answers] == [200] * 20, [a for s, a in answers if s != 200][:2]
            after = daemon.vm_hwm()
            workers = {pid: daemon.vm_hwm(pid) for pid in daemon.workers()}
            left = [p.name for p in (tmp_path / "state" / "media").iterdir() if p.name.startswith(".tmp-")]
    finally:
        server.close()
    print(f"\n20 concurrent creates with a {len(body) / MB:.0f} MB play_url each: all answered in {elapsed:.1f} s; "
          f"daemon peak RSS {before / MB:.0f} MB -> {after / MB:.0f} MB (+{(after - before) / MB:.0f} MB); "
          f"worker processes' peak RSS: {', '.join(f'{v / MB:.0f} MB' for v in workers.values())}")
    assert after - before < 200 * MB
    assert not left  # the downloads were removed


def test_fifty_concurrent_creates_with_their_own_play_url_and_msg_are_all_answered(tmp_path: Path) -> None:
    server = MediaServer()
    for i in range(50):
        server.body(f"/p{i}.wav", tone_file(freq=300 + 7 * i, rate=44100))
    try:
        with Daemon(tmp_path / "state") as daemon:
            started = time.monotonic()
            answers = run_all([lambda i=i: daemon.create(i, play_url=server.url(f"/p{i}.wav"),
                                                          msg=f"Your code is {i} {i + 1} {i + 2}.", msg_lang="en-US")
                               for i in range(50)])
            elapsed = time.monotonic() - started
    finally:
        server.close()
    statuses = [s for s, _ in answers]
    print(f"\n50 concurrent creates with distinct play_url and msg: {statuses.count(200)} answered 200 "
          f"in {elapsed:.2f} s")
    assert statuses == [200] * 50, [a for s, a in answers if s != 200][:2]
