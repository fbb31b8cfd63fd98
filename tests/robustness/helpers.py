"""What the robustness tests and the soak runner share: a gevent-friendly HTTP client, the ESL commands the
stand-in received (parsed), the number plan's expected outcomes, and the "nothing lost, nothing dialed
twice, every status true" check.

The test process is not monkey-patched, and the service under test, the stand-in and the test itself
share one gevent hub; so every socket here is a gevent socket, and no helper blocks the hub.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import gevent
import gevent.socket

from daemon.calls.records import DIAL_MARK, THROTTLED

# Figures for the report, printed at the end of the run (see conftest.pytest_terminal_summary).
FIGURES: Counter[str] = Counter()

# ----- HTTP ----------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def mimetype(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip()

    def json(self) -> Any:
        return json.loads(self.body)

    def data(self) -> dict[str, Any]:
        """The envelope's ``data``, checking the envelope on the way (as tests/conftest.data_of does)."""
        assert self.mimetype == "application/json", (self.status, self.body[:200])
        body = self.json()
        assert isinstance(body, dict) and set(body) == {"data"}, body
        inner: dict[str, Any] = body["data"]
        assert inner["code"] == self.status, (inner, self.status)
        assert isinstance(inner["code_desc"], str)
        assert (inner["code_desc"] == "") == (self.status == 200), inner
        return inner


def request(base: str, method: str, path: str, *, form: Mapping[str, str] | None = None,
            json_body: Any = None, raw: bytes | None = None, content_type: str | None = None,
            headers: Mapping[str, str] | None = None, query: Mapping[str, str] | None = None,
            source_address: str | None = None, timeout: float = 20.0) -> Answer:
    """One request over a fresh gevent socket to ``base`` (``http://127.0.0.1:PORT``)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout,
                                      source_address=(source_address, 0) if source_address else None)
    conn._create_connection = gevent.socket.create_connection  # type: ignore[attr-defined]
    sent_headers = dict(headers or {})
    body: bytes | None = raw
    if form is not None:
        body = urllib.parse.urlencode(form).encode()
        sent_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif json_body is not None:
        body = json.dumps(json_body).encode()
        sent_headers.setdefault("Content-Type", "application/json")
    elif content_type is not None:
        sent_headers["Content-Type"] = content_type
    target = path + ("?" + urllib.parse.urlencode(query) if query else "")
    try:
        with gevent.Timeout(timeout * 2, TimeoutError(f"{method} {target}: no answer")):
            conn.request(method, target, body=body, headers=sent_headers)
            response = conn.getresponse()
            data = response.read()
            return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


# ----- what the stand-in received ------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One ESL message the stand-in received: its command line, headers and body."""

    conn_id: int
    line: str
    headers: dict[str, str]
    body: str

    @property
    def verb(self) -> str:
        words = self.line.split(" ", 2)
        if words[0] in ("api", "bgapi") and len(words) > 1:
            return f"{words[0]} {words[1]}"
        return words[0]

    @property
    def app(self) -> str:
        return self.headers.get("execute-app-name", "")


def parse_sent(conn_id: int, raw: str) -> Sent:
    head, _, body = raw.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Sent(conn_id, lines[0], headers, body)


def sent_commands(switch: Any) -> list[Sent]:
    return [parse_sent(c.conn_id, c.text) for c in list(switch.commands)]


def parse_var_block(text: str) -> tuple[dict[str, str], str]:
    """``{a=b,c='x y'}rest`` → ({"a": "b", "c": "'x y'"}, "rest"); raises ValueError if malformed."""
    if not text.startswith("{"):
        raise ValueError(f"no variable block in {text!r}")
    variables: dict[str, str] = {}
    i, quoted, item = 1, False, ""
    while i < len(text):
        ch = text[i]
        if ch == "'":
            quoted = not quoted
        if not quoted and ch in ",}":
            if item:
                name, sep, value = item.partition("=")
                if not sep or name in variables:
                    raise ValueError(f"bad or repeated variable {item!r} in {text!r}")
                variables[name] = value
            item = ""
            if ch == "}":
                return variables, text[i + 1:]
        else:
            item += ch
        i += 1
    raise ValueError(f"unterminated variable block in {text!r}")


def originate_lines(switch: Any) -> list[str]:
    return [s.line for s in sent_commands(switch) if s.line.startswith("bgapi originate ")]


def bridge_args(switch: Any) -> list[str]:
    return [s.body for s in sent_commands(switch) if s.verb == "sendmsg" and s.app == "bridge"]


# ----- the number plan -----------------------------------------------------------------------------

REFUSALS = {"3": "USER_BUSY", "5": "UNALLOCATED_NUMBER", "8": "CALL_REJECTED"}
# Plan seconds a far end that answers stays up (None: it never answers); see freeswitch/standin/plan.py.
UP_FOR = {"0": 300.0, "1": 60.0, "2": 30.0, "6": 2.0, "7": 30.0, "9": 30.0}
PROMPT_SECONDS = 3.0  # the harness's prompt (2 s) and message (1 s)


def plan_digit(number: str) -> str:
    m = re.fullmatch(r"1555000(\d)\d{3}", number)
    return m.group(1) if m else "x"


@dataclass(frozen=True)
class Expected:
    """What a call must end as, by the number plan: the fields that are certain."""

    status: str
    failed_leg: str = ""
    a_cause: str | None = None
    b_cause: str | None = None
    reason: str | None = None

    def mismatches(self, call: Any) -> list[str]:
        out = []
        for name in ("status", "failed_leg", "a_cause", "b_cause", "reason"):
            want = getattr(self, name)
            got = getattr(call, name) if not isinstance(call, Mapping) else call.get(name)
            if want is not None and got != want:
                out.append(f"{name}={got!r}, expected {want!r}")
        return out


def expected_outcome(phone_a: str, phone_b: str, *, prompts: bool) -> Expected | None:
    """The final status the number plan dictates, or None where timing makes it a race.

    Holds for originate_timeout ≤ 25 plan seconds (a B that never answers gives up before an A that
    stays up 30 s hangs up).
    """
    a, b = plan_digit(phone_a), plan_digit(phone_b)
    if a in REFUSALS:
        return Expected("failed", "a", a_cause=REFUSALS[a], reason="A was not reached")
    if a == "x":
        return Expected("failed", "a", a_cause="UNALLOCATED_NUMBER", reason="A was not reached")
    if a == "4":
        return Expected("failed", "a", a_cause="NO_ANSWER", reason="A was not reached")
    if a == "6":  # A hangs up 2 s after answering
        return Expected("failed", "a", reason="A hung up during the prompts") if prompts else None
    if b in REFUSALS or b == "x":
        return Expected("failed", "b", b_cause=REFUSALS.get(b, "UNALLOCATED_NUMBER"), reason="B was not reached")
    if b == "4":
        return Expected("failed", "b", b_cause="NO_ANSWER", reason="B was not reached")
    return Expected("completed", "")


def plan_number(digit: str, n: int) -> str:
    return f"1555000{digit}{n % 1000:03d}"


# ----- nothing lost, nothing dialed twice, every status true ----------------------------------------

FINAL = {"completed", "failed", "canceled", "missed"}
RESTARTED = "FreeSWITCH restarted during the call"


@dataclass
class Audit:
    """The result of :func:`audit_calls`, and figures for the report.

    ``problems``: a call lost (not final), dialed twice, or a leg bridged twice. ``untrue``: a final
    status that disagrees with what the switch did (or with the number plan).
    """

    problems: list[str] = field(default_factory=list)
    untrue: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    checked: int = 0
    never_sent: int = 0

    @property
    def all_problems(self) -> list[str]:
        return self.problems + self.untrue


def audit_calls(switch: Any, calls: Iterable[Any], *, prompts: bool = True, restarted: bool = False,
                crashed: bool = False, expect_plan: bool = True,
                timeline: Callable[[Any], list[str]] | None = None) -> Audit:
    """Check each call row against what the stand-in really did.

    * final: every call ends in a final status;
    * once: each claimed call's A leg was originated exactly once, not counting the times the switch refused
      the session over its limits (nothing was created: the daemon sends it again, with the same UUID), and
      its B leg created at most once (a bridge queued on A may be dropped unstarted and queued again by a
      next start, ``uuid_break all``: what counts is B's leg). The exception (counted in ``never_sent``): an originate on its way when the daemon was killed (then
      failed 'interrupted') or the switch restarted (failed as such) may never have arrived, and no one
      can know; it is not sent again. With ``timeline`` (a call's step kinds), such a call must show a
      ``dialing_a`` mark after its last ``throttled`` (a mark is committed right before each originate
      leaves; an unmarked one, or one refused and not sent again, was never sent and must be dialed).
      One originate a write and one write in flight, so a test can bound ``never_sent`` by its faults;
    * true: the status agrees with the stand-in's channels (completed ⇒ B answered; failed ⇒ B never
      answered; A's cause is A's) and, with ``expect_plan``, with the number plan.
    """
    audit = Audit()
    originated = Counter(_uuid_in(line, "origination_uuid") for line in originate_lines(switch))
    bridged = Counter(_uuid_in(arg, "origination_uuid") for arg in bridge_args(switch))
    for call in calls:
        audit.checked += 1
        audit.statuses[call.status] += 1
        where = (f"call {call.callid} ({call.phone_a}->{call.phone_b}, {call.status}, {call.reason!r}, "
                 f"a_cause {call.a_cause!r}, b_cause {call.b_cause!r})")
        if call.status not in FINAL:
            audit.problems.append(f"{where}: not final")
            continue
        if call.status in ("canceled", "missed"):
            if call.a_uuid and originated[call.a_uuid]:
                audit.problems.append(f"{where}: dialed although {call.status}")
            continue
        if call.a_uuid is None:
            if not call.reason.startswith("daily cap"):
                audit.problems.append(f"{where}: final without ever being claimed")
            continue
        sent = originated[call.a_uuid] - switch.refusals(call.a_uuid)
        caught = (crashed and call.reason.startswith("interrupted")) or (restarted and call.reason == RESTARTED)
        if sent == 0 and caught:
            if timeline is not None:
                # Each originate is marked before it leaves; a refusal of A (nothing created: with sent == 0
                # any refusal is A's) after the last mark means it was not sent again: it must be dialed.
                marks = [kind for kind in timeline(call) if kind in (DIAL_MARK, THROTTLED)]
                if marks[-1:] != [DIAL_MARK]:
                    audit.problems.append(f"{where}: never dialed, and not marked as being sent since its "
                                          f"last refusal: {marks}")
            audit.never_sent += 1
            continue
        if sent != 1:
            audit.problems.append(f"{where}: A originated {sent} times")
        if switch.creations(call.b_uuid) > 1:
            audit.problems.append(f"{where}: B dialed {switch.creations(call.b_uuid)} times "
                                  f"({bridged[call.b_uuid]} bridges queued on A, "
                                  f"{switch.refusals(call.b_uuid)} refused by the switch)")
        if call.reason.startswith("internal error"):
            audit.untrue.append(f"{where}: ended by an internal error")
        if call.reason == RESTARTED:
            if not restarted:
                audit.untrue.append(f"{where}: says FreeSWITCH restarted; it did not")
            continue
        a_ch, b_ch = switch.channel(call.a_uuid), switch.channel(call.b_uuid)
        if call.reason.startswith("interrupted"):
            # Both legs ended while the switch could not be heard: the daemon cannot know which leg
            # failed or why, so it must not name one; and it must not claim a bridge it never saw.
            if call.failed_leg != "":
                audit.untrue.append(f"{where}: 'interrupted' but blames leg {call.failed_leg}")
            if call.status != "failed" or call.bridged_at is not None:
                audit.untrue.append(f"{where}: 'interrupted' with status {call.status} after a bridge")
            continue
        b_answered = b_ch is not None and b_ch.answered_us > 0
        # B answering as A hung up (A's BYE and B's 200 OK crossing): the switch cancels B and never bridges,
        # so A and B never talked: a failure, and "A hung up ..." is what the daemon can know.
        b_answered_too_late = (b_answered and not b_ch.bridged_us and b_ch.hangup_cause == "ORIGINATOR_CANCEL"
                               and call.reason.startswith("A hung up"))
        if call.status == "completed" and not b_answered:
            audit.untrue.append(f"{where}: completed but B never answered")
        if call.status == "failed" and b_answered and not b_answered_too_late:
            audit.untrue.append(f"{where}: failed but B answered")
        if call.failed_leg == "a" and call.a_cause and a_ch is not None and a_ch.hangup_cause \
                and a_ch.hangup_cause != call.a_cause:
            audit.untrue.append(f"{where}: a_cause {call.a_cause}, the switch says {a_ch.hangup_cause}")
        # A far end that hung up by itself (BYE from A's phone) while the daemon was away or slow makes
        # "A hung up ..." the truth, whatever the plan says would have happened next.
        a_left = (call.failed_leg == "a" and call.reason.startswith("A hung up") and a_ch is not None
                  and a_ch.var("sip_hangup_disposition") == "recv_bye")
        if expect_plan and not (crashed and a_left):
            want = expected_outcome(call.phone_a, call.phone_b, prompts=prompts)
            if want is not None and (wrong := want.mismatches(call)):
                audit.untrue.append(f"{where}: {'; '.join(wrong)}")
    return audit


def _uuid_in(text: str, name: str) -> str:
    m = re.search(rf"[{{,]{name}=([0-9a-f-]{{36}})", text)
    return m.group(1) if m else ""


def live_channels_of(switch: Any, calls: Iterable[Any]) -> list[str]:
    """UUIDs of these calls' legs still up in the stand-in."""
    mine = {u for c in calls for u in (c.a_uuid, c.b_uuid) if u}
    return [ch.uuid for ch in switch.channels_live() if ch.uuid in mine]


# ----- a process's memory and file descriptors ------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ----- media over HTTP ---------------------------------------------------------------------------------


class MediaServer:
    """WAV files over HTTP on 127.0.0.1 from a real thread (the daemon's media fetch uses blocking
    sockets, so the server must not share the test's gevent hub). Any path ending in ``.wav`` answers
    the same short tone; ``requests`` lists the paths asked for."""

    def __init__(self, folder: Path) -> None:
        from tests.integration.conftest import tone_wav

        self.wav = Path(tone_wav(folder, 0.5, 440.0)).read_bytes()
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (the stdlib's name)
                owner.requests.append(self.path)
                if self.path.split("?")[0].endswith(".wav"):
                    self.send_response(200)
                    self.send_header("Content-Type", "audio/wav")
                    self.send_header("Content-Length", str(len(owner.wav)))
                    self.end_headers()
                    self.wfile.write(owner.wav)
                else:
                    self.send_error(404)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="media-server", daemon=True)
        self.thread.start()

    def url(self, path: str = "/tone.wav") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
