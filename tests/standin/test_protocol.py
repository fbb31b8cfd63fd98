"""Wire framing units: URL encoding, message parsing and event serialisation."""

from __future__ import annotations

import json

from freeswitch.standin.events import Event
from freeswitch.standin.protocol import MessageReader, api_response, command_reply, url_encode


def test_url_encode_like_freeswitch() -> None:
    assert url_encode("fd00::2") == "fd00%3A%3A2"
    assert url_encode("INVITE, ACK") == "INVITE,%20ACK"
    assert url_encode("sofia/gateway/15550000161") == "sofia/gateway/15550000161"
    assert url_encode("{a=b}x &park()") == "%7Ba%3Db%7Dx%20%26park()"
    assert url_encode("<sip:gw+carrier@127.0.0.1>") == "%3Csip%3Agw%2Bcarrier%40127.0.0.1%3E"
    assert url_encode("é") == "%C3%A9"


def test_reader_handles_split_messages_and_bodies() -> None:
    r = MessageReader()
    raw = b"sendmsg abc\ncall-command: execute\ncontent-length: 5\n\nhel"
    assert r.feed(raw) == []
    msgs = r.feed(b"loapi status\n\n")
    assert [m.command for m in msgs] == ["sendmsg abc", "api status"]
    assert msgs[0].body == "hello"
    assert msgs[0].header("Call-Command") == "execute"


def test_replies() -> None:
    assert command_reply("+OK accepted") == b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n"
    assert api_response("false") == b"Content-Type: api/response\nContent-Length: 5\n\nfalse"


def test_event_framing_plain_and_json() -> None:
    ev = Event("BACKGROUND_JOB", [("Event-Name", "BACKGROUND_JOB"), ("Job-Command-Arg", "a b")], body="+OK x\n")
    plain = ev.frame("plain")
    head, _, inner = plain.partition(b"\n\n")
    assert head == b"Content-Length: %d\nContent-Type: text/event-plain" % len(inner)
    assert inner == b"Event-Name: BACKGROUND_JOB\nJob-Command-Arg: a%20b\nContent-Length: 6\n\n+OK x\n"
    js = ev.frame("json")
    obj = json.loads(js.partition(b"\n\n")[2])
    assert obj == {"Event-Name": "BACKGROUND_JOB", "Job-Command-Arg": "a b", "Content-Length": "6", "_body": "+OK x\n"}
    no_body = Event("X", [("Event-Name", "X")]).frame("plain")
    assert no_body.endswith(b"Event-Name: X\n\n")
