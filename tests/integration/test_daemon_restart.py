"""The daemon killed with SIGKILL mid-call and started again: no call dialed twice, none left open."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import gevent
import pytest

from tests.integration.conftest import needs_standin, wait_for

ROOT = Path(__file__).resolve().parents[2]


class Daemon:
    """``python -m daemon run`` in a subprocess, on the given state folder and switch."""

    def __init__(self, state: Path, esl_port: int, database_url: str = "") -> None:
        self.env = dict(os.environ, CALLBRIDGE_STATE_DIR=str(state), CALLBRIDGE_ESL_PORT=str(esl_port),
                        CALLBRIDGE_HTTP_PORT="0", CALLBRIDGE_LOG_LEVEL="WARNING")
        self.env.pop("CALLBRIDGE_DATABASE_URL", None)
        if database_url:  # else SQLite in the state folder
            self.env["CALLBRIDGE_DATABASE_URL"] = database_url
        self.env["CALLBRIDGE_HTTP_PORT"] = str(_free_port())
        self.base = f"http://127.0.0.1:{self.env['CALLBRIDGE_HTTP_PORT']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> Any:
        out = subprocess.run([sys.executable, "-m", "daemon", *args, "--json"], cwd=ROOT, env=self.env,
                             capture_output=True, check=True)
        return json.loads(out.stdout)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=self.env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(lambda: self.get("/readyz")[0] == 200, 20), "daemon did not become ready"

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def request(self, method: str, path: str, data: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        body = urllib.parse.urlencode(data).encode() if data else None
        req = urllib.request.Request(self.base + path, data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        except (urllib.error.URLError, ConnectionError):
            return 0, {}

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        return self.request("GET", path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@needs_standin()
@pytest.mark.slow
@pytest.mark.stores("sqlite", "postgresql")
def test_sigkill_mid_call_then_restart_reconciles_every_call(tmp_path: Path, store_kind: str,
                                                             request: pytest.FixtureRequest) -> None:
    from freeswitch.standin import StandIn

    switch = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.05)
    switch.start()
    url = request.getfixturevalue("postgres_url") if store_kind == "postgresql" else ""
    daemon = Daemon(tmp_path / "state", switch.port, url)
    try:
        token = daemon.cli("endpoint", "add", "--name", "k", "--caller-id", "15551230000", "--dial-string",
                           "sofia/gateway/carrier/{number}", "--max-in-flight", "50")["token"]
        daemon.start()
        callids = []
        # B talks 60 s (3 s here): the kill lands while calls are bridged or still being set up.
        for i in range(20):
            status, answer = daemon.request("POST", "/v1/calls", {"token": token, "phone_a": f"15550000{i:03d}",
                                                                  "phone_b": f"15550001{i:03d}"})
            assert status == 200, answer
            callids.append(answer["data"]["callid"])
        gevent.sleep(0.3)
        daemon.kill()
        live_at_kill = len(switch.channels_live())
        daemon.start()

        def all_final() -> bool:
            for callid in callids:
                _, got = daemon.get(f"/v1/calls/{callid}?token={urllib.parse.quote(token)}")
                if got.get("data", {}).get("status") not in ("completed", "failed"):
                    return False
            return True

        assert wait_for(all_final, 60), "calls not all final after the restart"
        assert live_at_kill > 0, "the kill did not land mid-call"
        originates = [c.text for c in switch.commands if c.text.startswith("bgapi originate")]
        for callid in callids:
            assert sum(callid in text for text in originates) == 1, f"{callid} dialed {originates}"
        assert wait_for(lambda: not switch.channels_live(), 10), "channels left open"
    finally:
        daemon.stop()
        switch.stop()


@needs_standin()
def test_sigterm_leaves_bridged_calls_to_freeswitch_and_the_next_start_follows_them(tmp_path: Path) -> None:
    from freeswitch.standin import StandIn

    # B talks 60 plan seconds, 12 s here: long enough that a stop on a loaded machine ends well inside it.
    switch = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=0.2)
    switch.start()
    daemon = Daemon(tmp_path / "state", switch.port)
    try:
        token = daemon.cli("endpoint", "add", "--name", "t", "--caller-id", "15551230000", "--dial-string",
                           "sofia/gateway/carrier/{number}")["token"]
        daemon.start()
        status, answer = daemon.request("POST", "/v1/calls", {"token": token, "phone_a": "15550000601",
                                                              "phone_b": "15550001601"})
        assert status == 200
        callid = answer["data"]["callid"]
        query = f"/v1/calls/{callid}?token={urllib.parse.quote(token)}"
        assert wait_for(lambda: daemon.get(query)[1]["data"]["status"] == "bridged", 20)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: daemon.proc is not None and daemon.proc.poll() is not None, 15)
        assert daemon.proc.returncode == 0
        assert len(switch.channels_live()) == 2, "the bridged call must go on inside FreeSWITCH"
        daemon.start()
        assert wait_for(lambda: daemon.get(query)[1]["data"]["status"] == "completed", 30)
        kinds = [step["kind"] for step in daemon.get(query)[1]["data"]["timeline"]]
        assert "daemon_stopped" in kinds and "adopted" in kinds
        assert sum(c.text.startswith("bgapi originate") for c in switch.commands) == 1
    finally:
        daemon.stop()
        switch.stop()
