"""Fixtures of the robustness suite.

The API fixtures of tests/conftest.py (``settings``, ``db``, ``app``, ``client``, ``make_endpoint``,
``live_server``, ...) apply here as they are. The integration fixtures (``make_harness``, ``harness``)
are imported from tests/integration/conftest.py; ``switch`` is redefined so that a test can choose the
stand-in's time scale with ``@pytest.mark.time_scale(x)`` (a fault aimed at one phase of a call needs
that phase to last long enough to be hit).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import REAL_ESL, SCALE, RealSwitch
from tests.integration.conftest import harness as harness
from tests.integration.conftest import make_harness as make_harness
from tests.robustness.helpers import MediaServer


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "time_scale(scale): the stand-in's time scale for this test")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The suite's figures (requests generated, faults injected, calls checked), for the issue note."""
    from tests.robustness.helpers import FIGURES

    if FIGURES:
        terminalreporter.write_sep("-", "robustness figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture
def switch(request: pytest.FixtureRequest) -> Iterator[Any]:
    """The stand-in at the test's time scale (default that of the integration tests), or a real switch."""
    if REAL_ESL:
        host, port, password = REAL_ESL.rsplit(":", 2)
        yield RealSwitch(host, int(port), password)
        return
    from freeswitch.standin import StandIn

    marker = request.node.get_closest_marker("time_scale")
    scale = float(marker.args[0]) if marker else SCALE
    sw = StandIn(host="127.0.0.1", port=0, password="ClueCon", time_scale=scale)
    sw.start()
    try:
        yield sw
    finally:
        sw.stop()


@pytest.fixture
def media_server(tmp_path: Path) -> Iterator[MediaServer]:
    server = MediaServer(tmp_path / "served")
    try:
        yield server
    finally:
        server.stop()
