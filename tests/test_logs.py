"""The log lines operators read (journald, a terminal, a shipper): one line per event, each value unambiguous."""

from __future__ import annotations

import io
import json
import logging
import shlex
from collections.abc import Iterator

import pytest

from daemon.ops.logs import JsonFormatter, KeyValueFormatter, log_event

# Values a client or FreeSWITCH can send that a line-based reader or a terminal takes as something else:
# a carriage return (the line seems to start again), an ANSI escape (the terminal obeys it), C1 and
# Unicode line breaks (split lines in readers that honour them), DEL, NUL.
HOSTILE = ["evil\rlevel", "a\x1b[2J\x1b]0;owned\x07@example.com", "x\u2028y", "x\x85y", "x\x7fy", "x\x00y",
           "x\x0by", "x\x0cy"]


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("callbridge.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


@pytest.mark.parametrize("value", HOSTILE)
def test_a_kv_line_shows_a_control_character_escaped_and_reads_back(
        captured: tuple[logging.Logger, io.StringIO, logging.Handler], value: str) -> None:
    logger, stream, handler = captured
    handler.setFormatter(KeyValueFormatter())
    log_event(logger, "portal.registered", account=value, address="192.0.2.7")
    line = stream.getvalue().removesuffix("\n")
    assert line.isprintable(), repr(line)
    fields = dict(part.split("=", 1) for part in shlex.split(line, posix=False))
    assert json.loads(fields["account"]) == value
    assert fields["address"] == "192.0.2.7"


@pytest.mark.parametrize("value", HOSTILE)
def test_a_json_line_shows_a_control_character_escaped(
        captured: tuple[logging.Logger, io.StringIO, logging.Handler], value: str) -> None:
    logger, stream, handler = captured
    handler.setFormatter(JsonFormatter())
    log_event(logger, "portal.registered", account=value)
    line = stream.getvalue().removesuffix("\n")
    assert line.isprintable(), repr(line)
    assert json.loads(line)["account"] == value


def test_plain_values_stay_bare(captured: tuple[logging.Logger, io.StringIO, logging.Handler]) -> None:
    logger, stream, handler = captured
    handler.setFormatter(KeyValueFormatter())
    log_event(logger, "api.call_requested", callid="c_1", endpoint="acmé", note="two words")
    line = stream.getvalue().removesuffix("\n")
    assert line.endswith('event=api.call_requested callid=c_1 endpoint=acmé note="two words"')
