"""Integration fixtures: the daemon's whole service against a switch over real TCP, and its API over HTTP.

The switch is the stand-in, in this process at a small time scale; or, when
``CALLBRIDGE_TEST_ESL=host:port:password`` is set, a real FreeSWITCH with the test number plan and a
``carrier`` gateway (then tests that need the stand-in's own controls skip, saying so).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import struct
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from daemon.accounts.endpoints import EndpointOptions, create_endpoint
from daemon.config import Settings, SwitchAddress, load_settings
from daemon.service import Service
from daemon.store import Call, CallEvent, CallStatus, Endpoint, utcnow

REAL_ESL = os.environ.get("CALLBRIDGE_TEST_ESL", "")
SCALE = 1.0 if REAL_ESL else 0.01


def needs_standin() -> pytest.MarkDecorator:
    return pytest.mark.skipif(bool(REAL_ESL), reason="needs the stand-in's own controls (CALLBRIDGE_TEST_ESL is set)")


@dataclass
class RealSwitch:
    host: str
    port: int
    password: str


@pytest.fixture
def switch(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The stand-in at the test's time scale (``@pytest.mark.time_scale(x)``, default SCALE), or a real
    FreeSWITCH when CALLBRIDGE_TEST_ESL is set."""
    if REAL_ESL:
        host, port, password = REAL_ESL.rsplit(":", 2)
        yield RealSwitch(host, int(port), password)
        return
    with standins(request, 1) as (sw,):
        yield sw


@pytest.fixture
def more_switches(request: pytest.FixtureRequest) -> Iterator[list[Any]]:
    """More stand-ins (``@pytest.mark.switches(n)``: n of them, default 1) beside ``switch``, for the tests
    of several switches (stand-in only: ``needs_standin()``)."""
    marker = request.node.get_closest_marker("switches")
    with standins(request, int(marker.args[0]) if marker else 1) as made:
        yield list(made)


@contextlib.contextmanager
def standins(request: pytest.FixtureRequest, count: int) -> Iterator[tuple[Any, ...]]:
    from freeswitch.standin import StandIn

    marker = request.node.get_closest_marker("time_scale")
    made = [StandIn(host="127.0.0.1", port=0, password="ClueCon",
                    time_scale=float(marker.args[0]) if marker else SCALE) for _ in range(count)]
    try:
        for sw in made:
            sw.start()
        yield tuple(made)
    finally:
        for sw in made:
            sw.stop()


def switch_address(switch: Any) -> SwitchAddress:
    return SwitchAddress(getattr(switch, "host", "127.0.0.1"), switch.port, getattr(switch, "password", "ClueCon"))


def tone_wav(folder: Path, seconds: float, freq: float, rate: int = 8000) -> str:
    """A tone stored as the media library stores files: ``<sha256 of the WAV>.wav`` in its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * freq * i / rate)))
                                 for i in range(int(seconds * rate))))
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()}.wav"
    path.write_bytes(data)
    return str(path)


class Harness:
    """A running Service plus helpers to place calls and wait for their outcome."""

    def __init__(self, settings: Settings, switch: Any) -> None:
        self.settings = settings
        self.switch = switch
        self.service = Service(settings)
        self.finals: dict[str, gevent.event.AsyncResult] = {}
        self.statuses: dict[str, list[str]] = {}
        self.service.records.listeners.append(self._on_status)
        media = settings.media_dir
        self.prompt = tone_wav(media, 2.0, 523.0)
        self.message = tone_wav(media, 1.0, 659.0)
        self.dialtone = tone_wav(media, 1.5, 700.0)

    def _on_status(self, call: Call, status: CallStatus, detail: dict[str, Any]) -> None:
        self.statuses.setdefault(call.callid, []).append(status.value)
        if status.final:
            self.finals.setdefault(call.callid, gevent.event.AsyncResult()).set(status.value)

    def start(self) -> None:
        self.service.start()
        for link in self.service.engine.links:
            assert link.connected.wait(timeout=10), f"engine did not connect to the switch {link.name}"

    def endpoint(self, **options: Any) -> Endpoint:
        opts: dict[str, Any] = {"name": f"ep{Endpoint.select().count() + 1}", "caller_id_number": "15551230000",
                                "dial_string": "sofia/gateway/carrier/{number}", "max_in_flight": 50,
                                "calls_per_second": 1000.0}
        opts.update(options)
        return create_endpoint(EndpointOptions(**opts))[0]

    def place(self, endpoint: Endpoint, phone_a: str, phone_b: str, *, prompts: bool = True,
              dialtone: bool = True, due_in: float = 0.0, play_file: str | None = None) -> Call:
        now = utcnow()
        import datetime as dt
        import secrets

        call = Call.create(callid=secrets.token_hex(14), endpoint=endpoint, phone_a=phone_a, phone_b=phone_b,
                           play_file=(play_file or self.prompt) if prompts else "",
                           msg_file=self.message if prompts else "",
                           dialtone_file=self.dialtone if dialtone else "",
                           due_at=now + dt.timedelta(seconds=due_in), scheduled=due_in > 0,
                           status=(CallStatus.SCHEDULED if due_in > 0 else CallStatus.QUEUED).value)
        self.finals.setdefault(call.callid, gevent.event.AsyncResult())
        self.service.dispatcher.wake()
        return call

    def wait_final(self, call: Call, timeout: float = 30.0) -> Call:
        if REAL_ESL:  # real time: the longest plan row keeps a leg up for 300 s
            timeout = max(timeout, 400.0)
        result = self.finals.setdefault(call.callid, gevent.event.AsyncResult())
        try:
            result.get(timeout=timeout)
        except gevent.Timeout:
            fresh = Call.get_by_id(call.id)
            raise AssertionError(f"call {call.callid} still {fresh.status} after {timeout} s; "
                                 f"timeline: {self.timeline(call)}") from None
        return Call.get_by_id(call.id)

    def wait_status(self, call: Call, status: str, timeout: float = 10.0) -> None:
        ok = wait_for(lambda: status in self.statuses.get(call.callid, []), timeout)
        assert ok, f"call never reached {status}: {self.statuses.get(call.callid)}"

    def timeline(self, call: Call) -> list[str]:
        return [e.kind for e in CallEvent.select().where(CallEvent.call == call.id).order_by(CallEvent.id)]

    def stop(self) -> None:
        self.service.stop()


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = gevent.get_hub().loop.now() + timeout
    while not predicate():
        if gevent.get_hub().loop.now() > deadline:
            return False
        gevent.sleep(0.005)
    return True


@pytest.fixture
def make_harness(tmp_path: Path, switch: Any, store_kind: str,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., Harness]]:
    """Services on SQLite in their state folders, or (``stores`` marker) on this test's PostgreSQL (asked
for here, before any service starts, so that it is dropped only after they stopped)."""
    made: list[Harness] = []
    postgres_url = request.getfixturevalue("postgres_url") if store_kind == "postgresql" else ""

    def make(*, switches: list[Any] | None = None, **overrides: Any) -> Harness:
        """``switches``: several switches (stand-ins) for the daemon instead of ``switch`` alone."""
        values: dict[str, Any] = {
            "state_dir": str(tmp_path / f"state{len(made)}"), "esl_host": getattr(switch, "host", "127.0.0.1"),
            "esl_port": switch.port, "esl_password": getattr(switch, "password", "ClueCon"), "http_port": 0,
            "calls_per_second": 1000.0, "max_in_flight": 500, "originate_timeout": 30,
            "esl_heartbeat_timeout": 5.0, "esl_command_timeout": 5.0,
        }
        if postgres_url:
            values["database_url"] = postgres_url
            # A call's writes cost this process about twice the CPU on PostgreSQL (bench "records"), and the
            # stand-in shares the process: on a loaded machine a command waits longer for its turn on the one
            # ESL connection. The production default, not the 2 s above.
            values["esl_command_timeout"] = 5.0
        if switches:
            values["switches"] = [switch_address(sw) for sw in switches]
        values.update(overrides)
        harness = Harness(load_settings(environ={}, **values), switch)
        made.append(harness)
        harness.start()
        return harness

    yield make
    for harness in made:
        harness.stop()


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()
