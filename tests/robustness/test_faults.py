"""Faults injected while calls run: each ends with "no call lost, none dialed twice, every call ends with
a true status" (helpers.audit_calls), and the API answers 503, never 500, while the store is unusable.

The whole service runs in this process against the in-process stand-in (tests/integration/conftest.py)
at a time scale of 0.05 (a plan second is 50 ms), so a fault can be aimed at one phase of a call.
Each scenario is arranged so that it is deterministic: the calls are all in the phase under test when
the fault lands.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.server
import gevent.subprocess
import pytest

from daemon.endpoints import EndpointOptions, create_endpoint
from daemon.store import Call, Endpoint, WebhookDelivery, database_file
from tests.integration.conftest import Harness, needs_standin, wait_for
from tests.robustness.helpers import (
    FIGURES,
    Answer,
    Audit,
    audit_calls,
    live_channels_of,
    originate_lines,
    plan_number,
    request,
    sent_commands,
)

pytestmark = [needs_standin(), pytest.mark.timeout(120), pytest.mark.time_scale(0.05)]

FAST = {"esl_command_timeout": 0.5, "esl_heartbeat_timeout": 1.0, "originate_timeout": 10,
        "esl_reconnect_max_delay": 0.5}
# (A digit, B digit): every number-plan outcome, each call over within 60 plan seconds.
MIX = [("1", "6"), ("2", "3"), ("7", "4"), ("9", "5"), ("0", "8"), ("3", "1"), ("4", "2"), ("5", "7"),
       ("8", "9"), ("x", "0"), ("2", "0"), ("9", "6"), ("6", "1"), ("0", "2"), ("1", "9"), ("7", "1")]
FINAL = ("completed", "failed", "canceled", "missed")
