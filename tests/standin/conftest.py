"""Fixtures for the stand-in tests: a fresh stand-in per test (time scale 0.05, or the test's
``@pytest.mark.time_scale(x)``) and a client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from freeswitch.standin import StandIn

from .esl_client import EslClient

# A plan second is 50 ms: a timer late by 200 ms on a loaded machine is 4 plan seconds (helpers.SLACK), and a
# test's commands keep their order against the plan's timers (at 0.01 a recorded 3 s gap was 30 ms).
SCALE = 0.05

# Local stand-ins for the prompts the traces played (same lengths as the real files).
MEDIA = {
    "sounds/hello_8k.wav": (5.655, 8000),
    "sounds/tone_700hz_20s.wav": (20.0, 8000),
    "sounds/beep_1k_1s.wav": (1.0, 8000),
    "sounds/hello_16k.wav": (5.655, 16000),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "standin_limits(**kwargs): the stand-in's sps / max_sessions / far_end_sessions")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the traces' /srv/fs-test (sounds/, rec/)."""
    root = tmp_path_factory.mktemp("fs-test")
    (root / "rec").mkdir()
    (root / "sounds").mkdir()
    for rel, (secs, rate) in MEDIA.items():
        sf.write(root / rel, np.zeros(int(secs * rate), dtype=np.int16), rate)
    sf.write(root / "sounds/hello.mp3", np.zeros(int(5.655 * 8000), dtype=np.int16), 8000, format="MP3")
    return root


@pytest.fixture(scope="session")
def media_server(media_dir: Path) -> Iterator[str]:
    """An HTTP server for media_dir/sounds (what the recording host ran on 127.0.0.1:8765)."""
    from gevent.pywsgi import WSGIServer

    def app(environ: dict, start_response):  # type: ignore[no-untyped-def]
        path = media_dir / "sounds" / environ["PATH_INFO"].lstrip("/")
        if path.is_file():
            start_response("200 OK", [("Content-Type", "audio/wav")])
            return [path.read_bytes()]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found"]

    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.stop()


@pytest.fixture
def standin(request: pytest.FixtureRequest) -> Iterator[StandIn]:
    """A fresh stand-in; ``@pytest.mark.standin_limits(sps=..., max_sessions=..., far_end_sessions=...)``
    changes its session limits (FreeSWITCH's defaults otherwise), ``@pytest.mark.time_scale(s)`` its scale."""
    limits = request.node.get_closest_marker("standin_limits")
    scale = request.node.get_closest_marker("time_scale")
    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=float(scale.args[0]) if scale else SCALE,
                 **(limits.kwargs if limits else {}))
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()


# What the engine subscribes to, plus the media and DTMF events the tests look at.
EVENTS = (
    "CHANNEL_CREATE CHANNEL_PROGRESS CHANNEL_PROGRESS_MEDIA CHANNEL_ANSWER CHANNEL_BRIDGE CHANNEL_UNBRIDGE "
    "CHANNEL_HANGUP CHANNEL_HANGUP_COMPLETE CHANNEL_DESTROY CHANNEL_PARK CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE "
    "BACKGROUND_JOB PLAYBACK_START PLAYBACK_STOP RECORD_START RECORD_STOP DTMF HEARTBEAT"
)


@pytest.fixture
def client(standin: StandIn) -> Iterator[EslClient]:
    """An authenticated client listening, in plain format, to the events the engine uses."""
    c = EslClient(standin.port)
    assert c.auth().h("Reply-Text") == "+OK accepted"
    assert c.cmd(f"event plain {EVENTS}").h("Reply-Text") == "+OK event listener enabled plain"
    try:
        yield c
    finally:
        c.close()
