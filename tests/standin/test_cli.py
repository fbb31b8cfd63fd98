"""The command line: one line when listening, then serve until SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from .esl_client import EslClient

ROOT = Path(__file__).resolve().parents[2]


def test_cli_prints_one_line_and_serves() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "freeswitch.standin", "--port", "0", "--time-scale", "0.01"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.fullmatch(r"freeswitch stand-in listening on 127\.0\.0\.1:(\d+) "
                         r"\(time scale 0\.01, 30 sessions per second, 1000 max\)\n", line)
        assert m, line
        c = EslClient(int(m.group(1)))
        assert c.auth().h("Reply-Text") == "+OK accepted"
        assert c.api("originate sofia/gateway/carrier/15550003001 &park()") == "-ERR USER_BUSY\n"
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_defaults() -> None:
    out = subprocess.run([sys.executable, "-m", "freeswitch.standin", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0
    for flag in ("--host", "--port", "--password", "--time-scale"):
        assert flag in out.stdout
