"""The soak runner (tests/robustness/soak.py) for about a minute: mixed traffic at a steady rate, then every
call final and as its number plan says, counts exact, the daemon's memory and descriptors flat.

The full run is ``python -m tests.robustness.soak --minutes 10``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import needs_standin
from tests.robustness.helpers import FIGURES
from tests.robustness.soak import run_soak, summary

pytestmark = [needs_standin(), pytest.mark.slow, pytest.mark.timeout(300)]


def test_soak_for_a_minute(tmp_path: Path) -> None:
    # 0.1: the plan's outcomes keep 1.4 s of margin for the daemon's delays on a loaded machine (0.7 at 0.05).
    report = run_soak(50, rate=8.0, time_scale=0.1, workdir=tmp_path)
    FIGURES["soak operations (1 min)"] += sum(report.operations.values())
    FIGURES["soak calls checked (1 min)"] += report.calls_checked
    assert report.ok, summary(report)
    assert report.calls_stored == report.calls_requested > 150
    assert report.calls_canceled > 0 and report.final_statuses.get("completed", 0) > 50
    assert sum(report.final_statuses.values()) == report.calls_requested
