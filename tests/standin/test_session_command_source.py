"""ESL session commands where no recording covers the case: the replies and behaviour follow
mod_event_socket.c (FreeSWITCH 1.10.12) as cited on each test."""

from __future__ import annotations

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import bg_originate, job_result, new_uuid


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


def send_custom(c: EslClient, tag: str) -> None:
    assert reply(c, f"sendevent CUSTOM\nEvent-Subclass: cb::probe\nX-Tag: {tag}").startswith("+OK ")


def tags_received(c: EslClient, last: str) -> list[str]:
    """X-Tag of every cb::probe event received, up to the one tagged `last` (sent last)."""
    c.wait_event(lambda m: m.e("X-Tag") == last, 10)
    return [m.e("X-Tag") or "" for m in c.events if m.e("Event-Subclass") == "cb::probe"]


def test_filters_compare_without_case_and_a_minus_value_excludes(standin: StandIn) -> None:
    """event_handler: a filter's header is looked up without regard to case and its value compared with
    strcasecmp; a value led by `-` is a negative filter (a match drops the event), `+` a positive one."""
    c = authed(standin)
    try:
        assert reply(c, "event plain ALL") == "+OK event listener enabled plain"
        assert reply(c, "filter event-name custom").startswith("+OK filter added.")
        assert reply(c, "filter X-Tag -drop").startswith("+OK filter added.")
        for tag in ("drop", "keep", "DROP", "last"):
            send_custom(c, tag)
        assert tags_received(c, "last") == ["keep", "last"]
    finally:
        c.close()


def test_event_without_a_format_keeps_the_current_one(standin: StandIn) -> None:
    """parse_command, `event`: only a first word plain|json|xml (strcasecmp) sets listener->format, and it
    is set before the keywords are checked; the reply names the listener's format."""
    c = authed(standin)
    try:
        assert reply(c, "event json CHANNEL_CREATE") == "+OK event listener enabled json"
        assert reply(c, "event CHANNEL_ANSWER") == "+OK event listener enabled json"
        assert reply(c, "event xml") == "-ERR no keywords supplied"
        assert reply(c, "event CHANNEL_HANGUP") == "+OK event listener enabled xml"
        assert reply(c, "event PLAIN CUSTOM") == "+OK event listener enabled plain"
    finally:
        c.close()


def test_custom_without_subclasses_only_gets_custom_events_without_one(standin: StandIn) -> None:
    """event_handler: with CUSTOM subscribed, a CUSTOM event that has a subclass is sent only when that
    subclass was named (`event plain CUSTOM <subclass>`) or ALL is on."""
    c = authed(standin)
    try:
        assert reply(c, "event plain CUSTOM") == "+OK event listener enabled plain"
        send_custom(c, "unnamed")
        assert reply(c, "sendevent CUSTOM\nX-Tag: no-subclass").startswith("+OK ")
        assert reply(c, "event plain CUSTOM cb::probe") == "+OK event listener enabled plain"
        send_custom(c, "named")
        assert tags_received(c, "named") == ["named"]
        assert [m.e("X-Tag") for m in c.events] == ["no-subclass", "named"]
    finally:
        c.close()


def test_nixevent_after_all_drops_only_that_event(standin: StandIn) -> None:
    """parse_command, `nixevent`: a name while ALL is on turns ALL into every single event but that one;
    no known name at all -> `-ERR no keywords supplied`."""
    c = authed(standin)
    try:
        assert reply(c, "event plain ALL") == "+OK event listener enabled plain"
        assert reply(c, "nixevent NOSUCHEVENT") == "-ERR no keywords supplied"
        assert reply(c, "nixevent BACKGROUND_JOB") == "+OK events nixed"
        assert (reply(c, "bgapi status") or "").startswith("+OK Job-UUID: ")
        assert c.api("status").startswith("UP ")
        assert reply(c, "sendevent CUSTOM\nX-Tag: sentinel").startswith("+OK ")
        c.wait_event(lambda m: m.e("X-Tag") == "sentinel", 10)
        assert c.named("BACKGROUND_JOB") == []
        assert c.named("API")  # everything else still comes
    finally:
        c.close()


def test_exit_before_auth_says_goodbye(standin: StandIn) -> None:
    """parse_command tests `exit` (and `...`) before the auth check: +OK bye, then listener_run's
    disconnect notice, then the socket closes - authenticated or not."""
    for line in ("exit", "..."):
        c = EslClient(standin.port, timeout=10)
        try:
            assert c.read_reply().content_type == "auth/request"
            assert reply(c, line) == "+OK bye"
            notice = c.read()
            assert notice.content_type == "text/disconnect-notice"
            assert notice.body == b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"
            c.pump(0.5)
            assert c.closed
        finally:
            c.close()


def test_api_with_no_output_answers_no_reply(standin: StandIn) -> None:
    """api_exec: a synchronous api whose output is empty is answered `-ERR no reply\\n` (global_getvar of
    an unset variable writes "%s" of switch_str_nil(NULL), i.e. nothing)."""
    c = authed(standin)
    try:
        answer = c.cmd("api global_getvar cb_no_such_variable")
        assert answer.headers == [("Content-Type", "api/response"), ("Content-Length", "14")]
        assert answer.body == b"-ERR no reply\n"
    finally:
        c.close()


def test_sendmsg_body_is_the_argument_only_as_text_plain(client: EslClient) -> None:
    """switch_ivr_parse_event: the body is the application's argument only when execute-app-arg is absent
    and content-type is text/plain; without that content-type the application runs with no argument."""
    uuid, job = bg_originate(client, "15550000531")
    assert job_result(client, job).startswith("+OK")
    for ctype, var in (("", "cb_untyped"), ("content-type: text/plain\n", "cb_typed")):
        event_uuid = new_uuid()
        body = f"{var}=1"
        head = (f"sendmsg {uuid}\ncall-command: execute\nexecute-app-name: set\nEvent-UUID: {event_uuid}\n"
                f"{ctype}content-length: {len(body)}\n\n")
        client.send(head + body)
        assert client.read_reply().h("Reply-Text") == "+OK"
        done = client.wait_event(lambda m, e=event_uuid: m.name == "CHANNEL_EXECUTE_COMPLETE"
                                 and m.e("Application-UUID") == e)
        assert done.e("Application-Data") == (body if ctype else None)
    assert client.api(f"uuid_getvar {uuid} cb_untyped") == "_undef_"
    assert client.api(f"uuid_getvar {uuid} cb_typed") == "1"


def test_log_levels_as_switch_log_str2level(standin: StandIn) -> None:
    """parse_command, `log`: no argument keeps SWITCH_LOG_DEBUG and prints an empty name; the level is
    switch_log_str2level's (a number clamped below SWITCH_LOG_INVALID, or a name without regard to case);
    anything else -> `-ERR invalid log level`."""
    c = authed(standin)
    try:
        assert reply(c, "log") == "+OK log level  [7]"
        assert reply(c, "log bogus") == "-ERR invalid log level"
        assert reply(c, "log WARNING") == "+OK log level WARNING [4]"
        assert reply(c, "log 99") == "+OK log level 99 [63]"
    finally:
        c.close()


def test_command_words_are_matched_without_regard_to_case(standin: StandIn) -> None:
    """parse_command compares every command word with strncasecmp (`auth `, `api `, `event`, ...)."""
    c = EslClient(standin.port)
    try:
        assert c.read_reply().content_type == "auth/request"
        assert reply(c, "AUTH ClueCon") == "+OK accepted"
        assert c.cmd("API version").body == b"FreeSWITCH Version 1.10.12-release~64bit ( 64bit)\n"
        assert reply(c, "Event plain CHANNEL_CREATE") == "+OK event listener enabled plain"
    finally:
        c.close()
