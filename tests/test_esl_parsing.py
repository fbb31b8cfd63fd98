"""ESL framing and parsing without sockets: real FreeSWITCH recordings and property tests."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.switch.esl import EslEvent, EslFramer, EslProtocolError, parse_event_headers
from daemon.switch.protocol import EventHeaders, _parse_header_block, parse_envelope_headers
from tests.fake_esl_server import event_plain, fs_url_encode, trace_chunks, traces

pytestmark = pytest.mark.timeout(60)


def snapshot(events: list[EslEvent]) -> list[tuple[str, dict[str, str], str, dict[str, str]]]:
    return [(e.content_type, e.headers, e.body, e.envelope) for e in events]


def feed_in_pieces(data: bytes, cuts: list[int]) -> list[EslEvent]:
    framer = EslFramer()
    events: list[EslEvent] = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        events += framer.feed(data[start:cut])
        start = cut
    assert framer.buffered == 0
    return events


@pytest.mark.parametrize("trace", ["09_full_call_plain_filtered", "16a_bridge_app_ringback"])
def test_trace_byte_at_a_time_equals_whole(trace: str) -> None:
    chunks = trace_chunks(trace)
    stream = b"".join(chunks)
    whole = EslFramer().feed(stream)

    framer = EslFramer()
    one_by_one: list[EslEvent] = []
    for i in range(len(stream)):
        one_by_one += framer.feed(stream[i : i + 1])
    assert framer.buffered == 0
    assert snapshot(one_by_one) == snapshot(whole)

    # The recorder cut S->C chunks at message boundaries: one message per chunk.
    assert len(whole) == len(chunks)
    for chunk, event in zip(chunks, whole, strict=True):
        assert snapshot(EslFramer().feed(chunk)) == snapshot([event])
        name = re.search(rb"\nEvent-Name: ([A-Z_]+)\n", chunk)
        uuid = re.search(rb"\nUnique-ID: ([0-9a-f-]{36})\n", chunk)
        assert event.name == (name.group(1).decode() if name else None)
        assert event.uuid == (uuid.group(1).decode() if uuid else None)


def test_trace_16a_shape() -> None:
    events = EslFramer().feed(b"".join(trace_chunks("16a_bridge_app_ringback")))
    kinds = [e.content_type for e in events]
    assert kinds[0] == "auth/request"
    assert {"auth/request", "command/reply", "api/response", "text/event-plain"} <= set(kinds)
    job = next(e for e in events if e.name == "BACKGROUND_JOB")
    a_leg = next(e for e in events if e.name == "CHANNEL_CREATE").uuid
    assert job.body == f"+OK {a_leg}\n"
    completes = [e for e in events if e.name == "CHANNEL_EXECUTE_COMPLETE" and e.uuid == a_leg]
    assert {e.get("Application") for e in completes} >= {"playback", "set", "bridge", "park"}
    assert all(e.get("Application-UUID") for e in completes)
    # Encoded values are decoded once, header by header.
    create = next(e for e in events if e.name == "CHANNEL_CREATE")
    assert create.headers["FreeSWITCH-IPv6"] == "fd00::2"
    assert create.get("variable_cb_callid") == "demo-1"
    assert "\r\n" in create.headers["variable_rtp_local_sdp_str"]
    assert create.body == ""


def test_every_trace_parses_cleanly_in_random_pieces() -> None:
    for path in sorted(traces().glob("*.jsonl")):
        chunks = trace_chunks(path.stem)
        stream = b"".join(chunks)
        whole = EslFramer().feed(stream)
        assert len(whole) == len(chunks), path.name
        cuts = list(range(0, len(stream), 997)) + list(range(0, len(stream), 4093))
        assert snapshot(feed_in_pieces(stream, cuts)) == snapshot(whole), path.name


def reference_parse(stream: bytes) -> list[tuple[str, dict[str, str], str, dict[str, str]]]:
    """The wire format read the plain way (partition at each blank line, every header parsed): what the
    framer's offsets, its search for an event's blank line and the lazy headers must all agree with."""
    out = []
    while stream:
        block, _, stream = stream.partition(b"\n\n")
        if not block:
            continue
        envelope = dict(line.split(": ", 1) for line in block.decode().split("\n"))
        length = int(envelope.get("Content-Length", "0"))
        body, stream = stream[:length], stream[length:]
        if envelope.get("Content-Type") != "text/event-plain":
            out.append((envelope.get("Content-Type", ""), envelope, body.decode("utf-8", "replace"), envelope))
            continue
        inner, _, rest = body.partition(b"\n\n")
        headers = parse_event_headers(inner)
        rest = rest[: int(headers["Content-Length"])] if "Content-Length" in headers else rest
        out.append(("text/event-plain", headers, rest.decode("utf-8", "replace"), envelope))
    return out


def test_every_trace_frames_as_the_reference_parse_does() -> None:
    for path in sorted(traces().glob("*.jsonl")):
        stream = b"".join(trace_chunks(path.stem))
        if b"text/event-json" in stream or b"text/event-xml" in stream:
            continue  # bodies parsed by json; compared with plain ones in test_json_events_match_plain_events
        expected = reference_parse(stream)
        events = EslFramer().feed(stream)
        for event, (_, headers, _, _) in zip(events, expected, strict=True):
            for name in headers:  # each found on its own in the raw block, before any whole parse
                assert event.get(name) == headers[name], (path.name, name)
        assert snapshot(events) == expected, path.name
        assert snapshot(feed_in_pieces(stream, list(range(0, len(stream), 1499)))) == expected, path.name


@pytest.mark.parametrize(
    "block",
    [
        b"Content-Length: 6817\nContent-Type: text/event-plain",
        b"Content-Length: 0\nContent-Type: text/event-plain",
        b"Content-Length: \nContent-Type: text/event-plain",
        b"Content-Length: 12\r\nContent-Type: text/event-plain",
        b"Content-Length: 1\nX: y\nContent-Type: text/event-plain",
        b"Content-Length: 1 \nContent-Type: text/event-plain",
        b"Content-Length: -1\nContent-Type: text/event-plain",
        b"Content-Length: 7\nContent-Type: text/event-plainx",
        b"Content-Length: 7\nContent-Type: text/event-json",
        b"Content-Length: \xd9\xa1\nContent-Type: text/event-plain",
    ],
)
def test_plain_event_envelopes_read_as_the_general_parse_does(block: bytes) -> None:
    assert parse_envelope_headers(block) == _parse_header_block(block, url_decoded=False)


def test_every_trace_envelope_reads_as_the_general_parse_does() -> None:
    for path in sorted(traces().glob("*.jsonl")):
        for event in EslFramer().feed(b"".join(trace_chunks(path.stem))):
            block = "".join(f"{k}: {v}\n" for k, v in event.envelope.items()).encode()[:-1]
            assert parse_envelope_headers(block) == _parse_header_block(block, url_decoded=False) == event.envelope


def test_json_events_match_plain_events() -> None:
    events = EslFramer().feed(b"".join(trace_chunks("10_full_call_json_filtered")))
    json_events = [e for e in events if e.content_type == "text/event-json"]
    assert json_events
    job = next(e for e in json_events if e.name == "BACKGROUND_JOB")
    assert re.fullmatch(r"\+OK [0-9a-f-]{36}\n", job.body)
    assert "_body" not in job.headers
    assert job.headers["FreeSWITCH-IPv6"] == "fd00::2"  # JSON values are not URL-decoded again


def test_api_response_without_trailing_newline() -> None:
    events = EslFramer().feed(b"".join(trace_chunks("03_api_basics")))
    bodies = [e.body for e in events if e.content_type == "api/response"]
    assert "false" in bodies  # uuid_exists: no newline, nothing lost or added
    assert '{"row_count": 0}\n' in bodies


def test_disconnect_notices() -> None:
    linger = EslFramer().feed(b"".join(trace_chunks("11b_myevents_linger_json")))
    notices = [e for e in linger if e.content_type == "text/disconnect-notice"]
    assert [n.get("Content-Disposition") for n in notices] == ["linger", "disconnect"]
    assert notices[0].body == "" and notices[1].body.startswith("Disconnected, goodbye.")


def test_forged_header_stays_in_its_value() -> None:
    headers = parse_event_headers(
        b"Event-Name: CHANNEL_ANSWER\nUnique-ID: aaa\nvariable_x: Hello%0AUnique-ID%3A%20bbb\n"
    )
    assert headers == {
        "Event-Name": "CHANNEL_ANSWER",
        "Unique-ID": "aaa",
        "variable_x": "Hello\nUnique-ID: bbb",
    }


def test_invalid_utf8_becomes_replacement_char() -> None:
    headers = parse_event_headers(b"A: caf\xe9\nB: %C3%A9t%E9\n\xff: x")
    assert headers == {"A": "caf\ufffd", "B": "\u00e9t\ufffd", "\ufffd": "x"}


def test_value_with_colon_space_and_empty_value() -> None:
    assert parse_event_headers(b"Reply-Text: +OK Job-UUID: x\nEmpty: \nBare:\nnoise") == {
        "Reply-Text": "+OK Job-UUID: x",
        "Empty": "",
        "Bare": "",
    }


def test_event_body_not_glued_to_last_header() -> None:
    message = event_plain({"Event-Name": "BACKGROUND_JOB", "Job-UUID": "j"}, b"+OK abc\n")
    (event,) = EslFramer().feed(message)
    assert event.headers == {"Event-Name": "BACKGROUND_JOB", "Job-UUID": "j", "Content-Length": "8"}
    assert event.body == "+OK abc\n"
    assert event.envelope["Content-Type"] == "text/event-plain"


def test_envelope_headers_are_verbatim() -> None:
    # FreeSWITCH writes command/reply headers unencoded; a literal %20 must survive.
    (event,) = EslFramer().feed(b"Content-Type: command/reply\nReply-Text: +OK filter added. [x]=[a%20b]\n\n")
    assert event.get("Reply-Text") == "+OK filter added. [x]=[a%20b]"


def test_many_messages_in_one_feed_and_stray_blank_lines() -> None:
    data = b"\n" + b"Content-Type: command/reply\nReply-Text: +OK\n\n" * 3 + b"Content-Type: api/resp"
    framer = EslFramer()
    assert [e.get("Reply-Text") for e in framer.feed(data)] == ["+OK"] * 3
    assert framer.buffered > 0
    (event,) = framer.feed(b"onse\nContent-Length: 2\n\nok")
    assert (event.content_type, event.body) == ("api/response", "ok")


def test_huge_body() -> None:
    body = b"x" * (5 * 1024 * 1024)
    data = b"Content-Type: api/response\nContent-Length: %d\n\n" % len(body) + body
    events = feed_in_pieces(data, list(range(0, len(data), 65536)))
    assert len(events) == 1 and len(events[0].body) == len(body)


@pytest.mark.parametrize(
    "data",
    [
        b"Content-Type: api/response\nContent-Length: abc\n\n",
        b"Content-Type: api/response\nContent-Length: -1\n\n",
        b"Content-Type: api/response\nContent-Length: 999999999999\n\n",
        b"Content-Type: x" + b"y" * 70000,
    ],
)
def test_protocol_errors(data: bytes) -> None:
    with pytest.raises(EslProtocolError):
        EslFramer().feed(data)


def test_bad_json_event_does_not_raise() -> None:
    body = b'{"Event-Name": "X", "_body'
    (event,) = EslFramer().feed(b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body)
    assert event.headers == {} and event.body == body.decode()


def test_json_event_non_string_values() -> None:
    body = json.dumps({"Event-Name": "X", "n": 5, "arr": ["a", "b"]}).encode()
    (event,) = EslFramer().feed(b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(body) + body)
    assert event.headers == {"Event-Name": "X", "n": "5", "arr": '["a", "b"]'}


# -- properties -------------------------------------------------------------------------------

header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_-]{0,30}\Z").filter(lambda n: n != "Content-Length")
header_values = st.lists(
    st.one_of(
        st.sampled_from(
            ["\n", "\r", ": ", "%", "%0A", "%25", "Unique-ID: x", " ", "\x00", "é", "☎", "\U0001f600"]
        ),
        st.characters(codec="utf-8"),
    ),
    max_size=20,
).map("".join)
headers_strategy = st.dictionaries(header_names, header_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(headers=headers_strategy, body=st.binary(max_size=60), data=st.data())
def test_event_round_trip_split_anywhere(headers: dict[str, str], body: bytes, data: st.DataObject) -> None:
    message = event_plain(headers, body)
    stream = message + event_plain({"Event-Name": "HEARTBEAT"})
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    events = feed_in_pieces(stream, cuts)
    assert len(events) == 2
    expected = dict(headers)
    if body:
        expected["Content-Length"] = str(len(body))
    assert events[0].headers == expected
    assert events[0].body == body.decode("utf-8", errors="replace")
    assert events[1].headers == {"Event-Name": "HEARTBEAT"}


@settings(max_examples=300, deadline=None)
@given(headers=headers_strategy)
def test_parse_event_headers_inverts_fs_encoding(headers: dict[str, str]) -> None:
    block = b"".join(name.encode() + b": " + fs_url_encode(value) + b"\n" for name, value in headers.items())
    assert parse_event_headers(block) == headers


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=300), cuts=st.lists(st.integers(0, 300), max_size=10))
def test_arbitrary_bytes_never_crash_the_framer(stream: bytes, cuts: list[int]) -> None:
    framer = EslFramer(max_header_bytes=200, max_body_bytes=200)
    start = 0
    try:
        for cut in sorted(c for c in set(cuts) if c <= len(stream)) + [len(stream)]:
            for event in framer.feed(stream[start:cut]):
                assert isinstance(event.body, str)
            start = cut
    except EslProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.text(alphabet="AB:% \r\n\xe9-_x", max_size=12), max_size=8),
       probes=st.lists(st.text(alphabet="AB: %\r\xe9-_x", max_size=6), max_size=6))
def test_an_events_headers_read_lazily_are_what_the_whole_parse_gives(lines: list[str], probes: list[str]) -> None:
    block = "\n".join(line.replace("\n", "") for line in lines).encode("utf-8", errors="surrogatepass")
    whole = parse_event_headers(block)
    lazy = EventHeaders(block)
    for name in [*whole, *probes]:  # looked up one by one first, as the daemon reads them
        assert lazy.get(name) == whole.get(name), name
    assert dict(lazy) == whole and len(lazy) == len(whole)
