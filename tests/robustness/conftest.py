"""Fixtures of the robustness suite.

The API fixtures of tests/conftest.py (``settings``, ``db``, ``app``, ``client``, ``make_endpoint``,
``live_server``, ...) apply here as they are. The integration fixtures (``make_harness``, ``harness``)
and ``switch`` are imported from tests/integration/conftest.py; a test chooses the stand-in's time scale
with ``@pytest.mark.time_scale(x)`` (a fault aimed at one phase of a call needs that phase to last long
enough to be hit).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import harness as harness
from tests.integration.conftest import make_harness as make_harness
from tests.integration.conftest import switch as switch
from tests.robustness.helpers import MediaServer


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The suite's figures (requests generated, faults injected, calls checked), for the issue note."""
    from tests.robustness.helpers import FIGURES

    if FIGURES:
        terminalreporter.write_sep("-", "robustness figures")
        for name, value in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture
def media_server(tmp_path: Path) -> Iterator[MediaServer]:
    server = MediaServer(tmp_path / "served")
    try:
        yield server
    finally:
        server.stop()
