"""ESL session commands where no recording covers the case: the replies and behaviour follow
mod_event_socket.c (FreeSWITCH 1.10.12) as cited on each test."""

from __future__ import annotations

from freeswitch.standin import StandIn

from .esl_client import EslClient


def authed(standin: StandIn) -> EslClient:
    c = EslClient(standin.port)
    assert c.auth().h("Reply-Text") == "+OK accepted"
    return c


def reply(c: EslClient, line: str) -> str:
    return c.cmd(line).h("Reply-Text") or ""


def test_filter_needs_a_value_and_skips_the_add_keyword(standin: StandIn) -> None:
    """parse_command, `filter `: no value -> `-ERR invalid syntax`; `filter add H V` adds H=V."""
    c = authed(standin)
    try:
        assert reply(c, "filter Event-Name") == "-ERR invalid syntax"
        assert reply(c, "filter add Event-Name CHANNEL_ANSWER") == "+OK filter added. [Event-Name]=[CHANNEL_ANSWER]"
        assert reply(c, "filter delete Event-Name") == "+OK filter deleted. [Event-Name][]"
    finally:
        c.close()
