"""systemd integration: the notify protocol over a fake NOTIFY_SOCKET, the watchdog interval, and the unit."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.config import Settings
from daemon.ops.systemd import notify, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "scripts" / "callbridge.service"


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket playing systemd's side; yields it and its NOTIFY_SOCKET address.

    A short folder under the system temp dir: a unix socket path must fit in 108 bytes.
    """
    folder = tempfile.mkdtemp(prefix="cbn")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield sock, path
    sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_notify_sends_each_message_as_one_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path}
    assert notify("READY=1\nSTATUS=serving on 127.0.0.1:8080", environ=env)
    assert receive(sock) == "READY=1\nSTATUS=serving on 127.0.0.1:8080"
    assert notify("WATCHDOG=1", environ=env)
    assert receive(sock) == "WATCHDOG=1"
    assert notify("STOPPING=1", environ=env)
    assert receive(sock) == "STOPPING=1"


def test_notify_reaches_an_abstract_socket() -> None:
    name = "callbridge-test-" + secrets.token_hex(6)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        assert notify("READY=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert receive(sock) == "READY=1"


def test_notify_outside_systemd_is_a_no_op() -> None:
    assert notify("READY=1", environ={}) is False
    assert notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False


def test_a_notify_socket_that_cannot_be_reached_is_not_the_callers_failure(tmp_path: Path) -> None:
    """A stale NOTIFY_SOCKET (inherited from a shell run under systemd) must not stop a start or a stop."""
    assert notify("STOPPING=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_daemon_speaks_the_protocol_as_systemd_runs_it(notify_socket: tuple[socket.socket, str],
                                                          tmp_path: Path) -> None:
    """``python -m daemon run`` under a fake systemd: READY=1 once up, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    sock, path = notify_socket
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")}
    env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="400000",  # 0.4 s: a ping every 0.2 s
               CALLBRIDGE_STATE_DIR=str(tmp_path / "state"), CALLBRIDGE_HTTP_PORT="0",
               CALLBRIDGE_ESL_PORT=str(_closed_port()),  # no switch: the daemon is up, not ESL-ready
               CALLBRIDGE_SHUTDOWN_GRACE="1")
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        ready = receive(sock)
        assert ready.startswith("READY=1"), ready
        assert re.search(r"STATUS=serving on 127\.0\.0\.1:\d+", ready), ready
        assert receive(sock) == "WATCHDOG=1"
        assert receive(sock) == "WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        while (message := receive(sock)) == "WATCHDOG=1":
            pass
        assert message == "STOPPING=1"
        _, errors = proc.communicate(timeout=15)
        assert proc.returncode == 0, errors.decode(errors="replace")[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_a_port_in_use_stops_the_start_with_one_line_before_anything_runs(
        notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    """The API's port taken: one line naming http_host/http_port, exit 2, no READY, no switch dialed."""
    sock, path = notify_socket
    with socket.socket() as taken, socket.socket() as switch:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        switch.bind(("127.0.0.1", 0))
        switch.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")}
        env.update(NOTIFY_SOCKET=path, CALLBRIDGE_STATE_DIR=str(tmp_path / "state"),
                   CALLBRIDGE_HTTP_PORT=str(port), CALLBRIDGE_ESL_PORT=str(switch.getsockname()[1]))
        proc = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith(
            f"callbridge: http_host/http_port 127.0.0.1:{port}: cannot listen: "), proc.stderr[-2000:]
        switch.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing started before the port was known to be free
            switch.accept()
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(4096)


# -- the unit ---------------------------------------------------------------------------------------

def unit_options() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            options.setdefault(key.strip(), []).append(value.strip())
    return options


def test_unit_has_what_the_daemon_relies_on() -> None:
    options = unit_options()
    assert options["Type"] == ["notify"] and options["NotifyAccess"] == ["main"]
    assert options["WatchdogSec"] == ["30"] and options["Restart"] == ["on-failure"]
    assert options["User"] == ["callbridge"] and options["Group"] == ["callbridge"]
    assert options["StateDirectory"] == ["callbridge"] and options["ConfigurationDirectory"] == ["callbridge"]
    assert options["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]  # AF_UNIX: notify + journald
    assert options["MemoryDenyWriteExecute"] == ["no"]  # soundfile's cffi callbacks need W+X memory
    # SIGTERM waits shutdown_grace for HTTP requests, then shutdown_grace for the last commit.
    assert float(options["TimeoutStopSec"][0]) > 2 * Settings().shutdown_grace
    start = options["ExecStart"][0].split()
    assert start[:3] == ["/opt/callbridge/.venv/bin/python", "-m", "daemon"] and start[-1] == "run"


def test_every_unit_option_says_why() -> None:
    """Each option, or the group of options it belongs to, has a comment right above it."""
    lines = UNIT.read_text().splitlines()
    commented = False
    for line in lines:
        if line.startswith("#"):
            commented = True
        elif not line.strip() or line.startswith("["):
            commented = False
        elif line.split("=", 1)[0] not in ("User", "Group", "WorkingDirectory", "WantedBy", "Description",
                                           "Documentation"):
            assert commented, f"no comment says why: {line}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (apt-get install systemd)")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point a copy at this venv's python and this checkout.
    text = UNIT.read_text().replace("/opt/callbridge/.venv/bin/python", sys.executable)
    text = text.replace("WorkingDirectory=/opt/callbridge", f"WorkingDirectory={ROOT}")
    copy = tmp_path / "callbridge.service"
    copy.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"})
    about_us = [line for line in (result.stdout + result.stderr).splitlines() if "callbridge" in line]
    assert result.returncode == 0 and not about_us, result.stdout + result.stderr
