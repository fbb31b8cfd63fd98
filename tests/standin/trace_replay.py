"""Replay a recorded FreeSWITCH ESL session against the stand-in and compare the answers.

The C->S chunks of a trace's .jsonl are sent in order, each once every S->C message that
preceded it in the recording has come back (and no earlier than its scaled trace time).
Received messages are paired with recorded ones by kind, Event-Name and (mapped) Unique-ID,
then compared header by header, ignoring values unique to a run (UUIDs, dates, sequence numbers,
host names and addresses, timings).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent

from tests.fake_esl_server import traces

from .esl_client import EslClient, Msg, split_messages

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# UUIDs the client itself chooses (a bgapi's Job-UUID, a leg's origination_uuid): the same in the recording
# and in the replay, whatever order the server's answers about them arrive in.
CHOSEN_RE = re.compile(r"(?:^Job-UUID: *|origination_uuid=)(" + UUID_RE.pattern + ")", re.MULTILINE)

# Headers whose values differ per run (or per build) and are not compared.
VOLATILE = {
    "Core-UUID", "FreeSWITCH-Hostname", "FreeSWITCH-Switchname", "FreeSWITCH-IPv4", "FreeSWITCH-IPv6",
    "Event-Date-Local", "Event-Date-GMT", "Event-Date-Timestamp", "Event-Sequence", "Event-Calling-Line-Number",
    "Content-Length", "Up-Time", "Uptime-msec", "Idle-CPU",
}
# Headers whose values are compared (after mapping UUIDs) when both sides carry them.
COMPARED = (
    "Event-Name", "Channel-State", "Channel-Call-State", "Channel-State-Number", "Answer-State", "Hangup-Cause",
    "Call-Direction", "Channel-Name", "Unique-ID", "Other-Type", "Other-Leg-Unique-ID",
    "Application", "Application-Data", "Application-Response", "Application-UUID", "Playback-Status",
    "Job-UUID", "Job-Command", "Job-Command-Arg", "Caller-Destination-Number", "Caller-Caller-ID-Number",
    "Caller-Caller-ID-Name", "Caller-Callee-ID-Number", "Caller-Orig-Caller-ID-Number", "Bridge-A-Unique-ID",
    "Bridge-B-Unique-ID", "Channel-HIT-Dialplan", "Event-Calling-File", "Event-Calling-Function",
)
# Channel variables compared by value when the recording has them.
KEY_VARIABLES = (
    "direction", "is_outbound", "uuid", "sip_gateway_name", "sip_profile_name", "channel_name",
    "origination_uuid", "origination_caller_id_number", "ignore_early_media", "app_disable_expand_variables",
    "cb_callid", "originate_endpoint", "originating_leg_uuid", "sip_hangup_disposition", "sip_term_status",
    "sip_invite_failure_status", "proto_specific_hangup_cause", "hangup_cause", "hangup_cause_q850",
    "originate_disposition", "DIALSTATUS", "last_bridge_hangup_cause", "originate_failed_cause",
    "bridge_hangup_cause", "current_application", "ringback", "instant_ringback", "continue_on_fail",
    "signal_bond", "last_bridge_to", "endpoint_disposition", "channel_cid_flipped",
)
SHOW_COUNT = re.compile(r"\n\d+ total\.\n")


@dataclass
class Expected:
    index: int
    msg: Msg
    matched: Msg | None = None


@dataclass
class Chunk:
    t: float
    data: str
    after: int  # number of S->C messages recorded before this chunk


@dataclass
class Trace:
    name: str
    chunks: list[Chunk]
    expected: list[Expected]
    closes: bool


def load(name: str) -> Trace:
    """Parse NAME.jsonl into client chunks and the server messages (in recorded order)."""
    buf = b""
    chunks: list[Chunk] = []
    expected: list[Expected] = []
    closes = False
    for line in (traces() / f"{name}.jsonl").read_text().splitlines():
        o = json.loads(line)
        if o["dir"] == "C->S":
            chunks.append(Chunk(o["t"], o["data"], len(expected)))
        elif o["dir"] == "S->C":
            buf += o["data"].encode("latin-1")
            msgs, buf = split_messages(buf)
            expected.extend(Expected(len(expected) + i, m) for i, m in enumerate(msgs))
        elif o["dir"] == "eof":
            closes = True
    assert not buf, "trace has a partial message"
    return Trace(name, chunks, expected, closes)


def fix_paths(data: str, media_dir: str, rewrite: dict[str, str] | None = None) -> str:
    """Point /srv/fs-test/ at the test's media folder (and apply rewrite), keeping content-length right."""
    subs = {"/srv/fs-test/": media_dir + "/", **(rewrite or {})}
    if not any(k in data for k in subs):
        return data
    head, sep, body = data.partition("\n\n")
    for old, new in subs.items():
        head = head.replace(old, new)
    if not sep:
        return head
    for old, new in subs.items():
        body = body.replace(old, new)
    head = re.sub(r"(?im)^(content-length): *\d+$", lambda m: f"{m.group(1)}: {len(body.encode())}", head)
    return head + sep + body


@dataclass
class Replay:
    """Runs one trace; afterwards .problems lists every difference found."""

    trace: Trace
    port: int
    time_scale: float
    media_dir: str
    timeout: float = 30.0  # for each awaited message; only a replay that fails waits it out
    uuids: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    received: list[Msg] = field(default_factory=list)
    skip: set[str] = field(default_factory=set)
    rewrite: dict[str, str] = field(default_factory=dict)
    skip_channels: str | None = None  # recorded events of channels whose name starts so are not expected
    # Hooks for traces recorded side by side: before sending chunk i (its preceding replies are in),
    # and right after sending chunk i.
    before_chunk: dict[int, Callable[[], object]] = field(default_factory=dict)
    after_send: dict[int, Callable[[], object]] = field(default_factory=dict)

    def run(self) -> Replay:
        if self.skip_channels:
            self.skip.add("<skipped channel>")
        client = EslClient(self.port, timeout=self.timeout)
        start = time.monotonic()
        taken = 0
        try:
            for i, chunk in enumerate(self.trace.chunks):
                taken = self._collect(client, chunk.after, taken)
                if i in self.before_chunk:
                    self.before_chunk[i]()
                due = start + chunk.t * self.time_scale
                gevent.sleep(max(0.0, due - time.monotonic()))
                for chosen in CHOSEN_RE.findall(chunk.data):
                    self.uuids.setdefault(chosen, chosen)
                data = fix_paths(self._to_ours(chunk.data), self.media_dir, self.rewrite)
                client.send(data.encode("latin-1", "replace"))
                if i in self.after_send:
                    self.after_send[i]()
            self._collect(client, len(self.trace.expected), taken)
            if self.trace.closes:
                client.pump(0.3)
                if not client.closed:
                    self.problems.append("server did not close the connection")
        finally:
            client.close()
        for exp in self.trace.expected:
            if exp.matched is None and self._name(exp.msg) not in self.skip:
                self.problems.append(f"missing #{exp.index}: {self._label(exp.msg)}")
        self._check_order()
        return self

    def _check_order(self) -> None:
        """Per leg, events must come in the recorded order."""
        legs: dict[str, tuple[list[str], list[str]]] = {}
        for exp in self.trace.expected:
            uid = exp.msg.e("Unique-ID") if exp.msg.event else None
            if uid and self._name(exp.msg) not in self.skip:
                legs.setdefault(self.uuids.get(uid, uid), ([], []))[0].append(self._label(exp.msg))
        for got in self.received:
            uid = got.e("Unique-ID") if got.event else None
            if uid in legs and self._name(got) not in self.skip:
                legs[uid][1].append(self._label(got))
        for uid, (want, have) in legs.items():
            if [self._norm(w) for w in want] != [self._norm(h) for h in have]:
                self.problems.append(f"order of {uid}'s events: {want} != {have}")

    # ----- pairing -----------------------------------------------------------------------------
    def _collect(self, client: EslClient, upto: int, taken: int) -> int:
        deadline = time.monotonic() + self.timeout
        while any(e.matched is None and self._name(e.msg) not in self.skip for e in self.trace.expected[:upto]):
            while client.pending:
                self._pair(client.pending.pop(0))
            if all(e.matched is not None or self._name(e.msg) in self.skip for e in self.trace.expected[:upto]):
                break
            if time.monotonic() > deadline or client.closed:
                break
            client.pump(0.01)
        while client.pending:
            self._pair(client.pending.pop(0))
        return upto

    def _name(self, m: Msg) -> str:
        if self.skip_channels and (m.e("Channel-Name") or "").startswith(self.skip_channels):
            return "<skipped channel>"
        return m.name or m.content_type or ""

    @staticmethod
    def _label(m: Msg) -> str:
        if m.event:
            return f"{m.name} {m.e('Unique-ID') or ''} {m.e('Application') or ''}"
        return f"{m.content_type} {m.h('Reply-Text') or m.body[:60]!r}"

    def _pair(self, got: Msg) -> None:
        self.received.append(got)
        for exp in self.trace.expected:
            if exp.matched is not None or exp.msg.content_type != got.content_type:
                continue
            if self._name(exp.msg) in self.skip:
                continue
            if got.event:
                if exp.msg.name != got.name or not self._same_id(exp.msg.e("Unique-ID"), got.e("Unique-ID")):
                    continue
                if exp.msg.name == "BACKGROUND_JOB" and not self._same_id(exp.msg.e("Job-UUID"), got.e("Job-UUID")):
                    continue
                if exp.msg.e("API-Command") != got.e("API-Command"):
                    continue
                if exp.msg.e("Application-UUID") and not self._same_id(
                        exp.msg.e("Application-UUID"), got.e("Application-UUID")):
                    continue
            else:
                theirs = UUID_RE.findall(exp.msg.body.decode())
                ours = UUID_RE.findall(got.body.decode())
                if len(theirs) == len(ours) == 1 and not UUID_RE.fullmatch(exp.msg.body.decode()):
                    self._same_id(theirs[0], ours[0])
            exp.matched = got
            self._compare(exp.msg, got)
            return
        if self._name(got) not in self.skip:
            self.problems.append(f"unexpected: {self._label(got)} {got.e('API-Command') or ''}")

    def _same_id(self, theirs: str | None, ours: str | None) -> bool:
        if theirs is None or ours is None:
            return theirs == ours
        if theirs in self.uuids:
            return self.uuids[theirs] == ours
        if ours in self.uuids.values():
            return False
        self.uuids[theirs] = ours
        return True

    def _to_ours(self, text: str) -> str:
        return UUID_RE.sub(lambda m: self.uuids.get(m.group(0), m.group(0)), text)

    def _norm(self, text: str) -> str:
        text = self._to_ours(text).replace("/srv/fs-test/", self.media_dir + "/")
        for old, new in self.rewrite.items():
            text = text.replace(old, new)
        return UUID_RE.sub(lambda m: m.group(0) if m.group(0) in self.uuids.values() else "<uuid>", text)

    # ----- comparing ----------------------------------------------------------------------------
    def _compare(self, exp: Msg, got: Msg) -> None:
        where = self._label(exp)
        if [k for k, _ in exp.headers] != [k for k, _ in got.headers]:
            self.problems.append(f"{where}: outer headers {exp.headers} != {got.headers}")
        if not exp.event:
            self._compare_plain_message(exp, got, where)
            return
        e_names = [k for k, _ in exp.event if not k.startswith("variable_")]
        g_names = [k for k, _ in got.event if not k.startswith("variable_")]
        if e_names != g_names:
            self.problems.append(f"{where}: header names differ: missing {_diff(e_names, g_names)}, "
                                 f"extra {_diff(g_names, e_names)}, or order")
        exp_d, got_d = dict(exp.event), dict(got.event)
        for key in COMPARED:
            if key in exp_d and key in got_d and self._norm(exp_d[key]) != self._norm(got_d[key]):
                self.problems.append(f"{where}: {key} {exp_d[key]!r} != {got_d[key]!r}")
        for var in KEY_VARIABLES:
            key = f"variable_{var}"
            if key in exp_d:
                if key not in got_d:
                    self.problems.append(f"{where}: missing {key}")
                elif self._norm(exp_d[key]) != self._norm(got_d[key]):
                    self.problems.append(f"{where}: {key} {exp_d[key]!r} != {got_d[key]!r}")
        has_body = exp.event_body is not None or got.event_body is not None
        if has_body and self._norm(exp.event_body or "") != self._norm(got.event_body or ""):
            self.problems.append(f"{where}: body {exp.event_body!r} != {got.event_body!r}")

    def _compare_plain_message(self, exp: Msg, got: Msg, where: str) -> None:
        for (k, v), (_, v2) in zip(exp.headers, got.headers, strict=False):
            if k not in VOLATILE and self._norm(v) != self._norm(v2):
                self.problems.append(f"{where}: {k} {v!r} != {v2!r}")
        e_body, g_body = exp.body.decode(), got.body.decode()
        if e_body.startswith("UP ") or UUID_RE.fullmatch(e_body) or e_body.startswith("====") or e_body == "vm":
            return  # status / create_uuid / gateway status / hostname: values are per run
        if SHOW_COUNT.fullmatch(e_body):
            # The recording host also counted the far-end simulator's legs.
            if not SHOW_COUNT.fullmatch(g_body):
                self.problems.append(f"{where}: body {e_body!r} != {g_body!r}")
            return
        if e_body == '{"row_count": 0}\n' and g_body.startswith('{"row_count":'):
            return  # rows appear once the async core db caught up: timing, not content
        if e_body.startswith('{"row_count":') and '"rows"' in e_body:
            exp_rows, got_rows = json.loads(e_body)["rows"], json.loads(g_body or "{}").get("rows", [])
            if not got_rows or list(exp_rows[0]) != list(got_rows[0]):
                self.problems.append(f"{where}: show rows differ: {g_body[:200]}")
            return
        if self._norm(e_body) != self._norm(g_body):
            self.problems.append(f"{where}: body {e_body!r} != {g_body!r}")


def _diff(a: list[str], b: list[str]) -> list[str]:
    return [x for x in a if x not in b]
