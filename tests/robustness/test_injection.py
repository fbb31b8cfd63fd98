"""Hostile input, end to end: values made to break out of a FreeSWITCH command or variable block go into
every request field of ``POST /v1/calls`` (form and JSON, plain and URL-encoded) and into the endpoint
CLI's caller ID, caller ID name and dial string. Through the real HTTP API of a running service against
the stand-in, which records every ESL message it receives:

* a refused request (400/401) sends nothing at all to FreeSWITCH;
* an accepted one sends exactly the expected messages: one ``bgapi originate`` whose variable block holds
  exactly the expected variables, and ``sendmsg`` to A with exactly the expected applications and
  arguments (prompts as files the daemon made, never a client's text or URL);
* nothing hostile reaches FreeSWITCH in any message.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from daemon.accounts.endpoints import EndpointError, EndpointOptions, create_endpoint
from daemon.calls.sequence import FAILURE_NOTICE
from daemon.store import Call, Endpoint
from daemon.switch import commands as fs
from daemon.switch.link import EVENTS, IGNORED_APPS
from tests.integration.conftest import Harness, needs_standin
from tests.robustness.helpers import (
    FIGURES,
    MediaServer,
    Sent,
    parse_var_block,
    plan_digit,
    request,
    sent_commands,
)

# 0.05: A's far end stays up 300 plan seconds (15 s) while the call is set up, however slow a loaded machine
# is; the calls still end 2 plan seconds after B answers.
pytestmark = [needs_standin(), pytest.mark.timeout(300), pytest.mark.time_scale(0.05)]

ROOT = Path(__file__).resolve().parents[2]

BREAKOUTS = [
    ",origination_caller_id_number=666",
    "}sofia/gateway/evil/1",
    "]",
    "[x=y]",
    "{a=b}",
    "'",
    '"',
    "^^:a:b",
    "${system ls}",
    "$${hostname}",
    "\n\napi hupall",
    "\r\nbgapi originate",
    "\r",
    "\0",
    "%0A%0Aapi hupall",
    "%7Bx%7D",
    "%00",
    "&park()",
    " &bridge(sofia/gateway/evil/1)",
    "|",
    ";",
    "`id`",
    "１５５５",
    "é☎\u202e",
    "\ud800",
]
LONG = ["9" * 300, "x" * 70_000]


def hostile_values(valid: str) -> list[str]:
    """Each break-out alone, and glued to a valid value on either side."""
    out = []
    for b in BREAKOUTS:
        out += [b, valid + b, b + valid]
    return out + LONG


@dataclass
class Rig:
    harness: Harness
    endpoint: Endpoint
    token: str
    base: str
    media: MediaServer

    def post(self, fields: dict[str, Any], *, as_json: bool = False, raw: bytes | None = None,
             headers: dict[str, str] | None = None) -> Any:
        if raw is not None:
            return request(self.base, "POST", "/v1/calls", raw=raw, headers=headers,
                           content_type="application/x-www-form-urlencoded")
        body = {"token": self.token, **fields}
        if as_json:
            return request(self.base, "POST", "/v1/calls", json_body=body, headers=headers)
        encoded = {k: v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for k, v in body.items()}
        return request(self.base, "POST", "/v1/calls", form=encoded, headers=headers)  # type: ignore[arg-type]


@pytest.fixture
def rig(make_harness: Callable[..., Harness], media_server: MediaServer) -> Rig:
    harness = make_harness(media_allow_private=["127.0.0.1"], auth_failures_per_minute=0)
    endpoint, token = create_endpoint(EndpointOptions(
        name="inj", caller_id_number="15551230000", caller_id_name="Acme Sales",
        dial_string="sofia/gateway/carrier/{number}", max_in_flight=50, calls_per_second=1000.0))
    return Rig(harness, endpoint, token, f"http://127.0.0.1:{harness.service.http_port}", media_server)


SESSION_VERBS = {"auth", "filter", "event", "api global_getvar", "api fsctl"}
# Sent on the daemon's own initiative (idle probes), never carrying request data.
PROBES = {"api status", "api uuid_exists"}


def new_commands(rig: Rig, since: int) -> list[Sent]:
    return [s for s in sent_commands(rig.harness.switch)[since:] if s.verb not in PROBES]


def assert_nothing_hostile(commands: list[Sent]) -> None:
    for sent in commands:
        text = "\n".join([sent.line, *(f"{k}: {v}" for k, v in sent.headers.items()), sent.body])
        # "number=666", not "=666": a leg's random UUID may begin with 666 (origination_uuid=666d...).
        for bad in ("${", "$${", "hupall", "system", "evil", "number=666", "\r", "\0", "^^", "`", "&bridge", "%0A",
                    "\u202e"):
            assert bad not in text, (bad, text)


def expected_leg_vars(leg_uuid: str, callid: str) -> dict[str, str]:
    return {"origination_uuid": leg_uuid, "origination_caller_id_number": "15551230000",
            "origination_caller_id_name": "'Acme Sales'", "ignore_early_media": "true",
            "originate_timeout": "30", fs.CALLID_VAR: callid}


def check_call_commands(rig: Rig, call: Call, commands: list[Sent]) -> None:
    """Exactly what one accepted call must send, nothing else."""
    assert_nothing_hostile(commands)
    a_uuid, b_uuid = str(call.a_uuid), str(call.b_uuid)
    mine = [s for s in commands if a_uuid in s.line or a_uuid in s.body]
    assert len(mine) == len(commands), [s.line for s in commands if s not in mine]
    originates = [s for s in mine if s.line.startswith("bgapi originate ")]
    assert len(originates) == 1, [s.line for s in mine]
    originate = originates[0]
    assert set(originate.headers) == {"job-uuid"} and originate.body == ""
    variables, rest = parse_var_block(originate.line[len("bgapi originate "):])
    assert variables == {**expected_leg_vars(a_uuid, call.callid), "hangup_after_bridge": "true",
                         "continue_on_fail": "true", "instant_ringback": "true", "app_disable_expand_variables": "true"}
    assert rest == f"sofia/gateway/carrier/{call.phone_a} &park()"
    apps = [s for s in mine if s.verb == "sendmsg"]
    if call.a_answered_at is None:  # A not reached: the originate was all
        assert apps == [] and call.status == "failed", (call.status, [s.line for s in apps])
        return
    waits = [s for s in apps if "loops" in s.headers]
    for s in apps:
        assert s.line == f"sendmsg {call.a_uuid}"
        assert set(s.headers) - {"loops"} == {"call-command", "execute-app-name", "event-uuid", "event-lock",
                                              "content-type", "content-length"}, s.headers
        assert s.headers["call-command"] == "execute" and s.headers["event-lock"] == "true"
        assert int(s.headers["content-length"]) == len(s.body.encode())
    assert [s.headers["loops"] for s in waits] == ["-1", "-1"]  # the dialtone looped around the bridge
    media = str(rig.harness.settings.media_dir)
    sha_wav = rf"^{re.escape(media)}/[0-9a-f]{{64}}\.wav$"
    got = [(s.app, s.body) for s in apps]
    assert got[0][0] == "multiset", got
    ringback = got[0][1].rsplit("=", 1)[1]
    assert got[:2] == [("multiset", f"cb_stage=queued ringback={ringback} transfer_ringback={ringback}"),
                       ("sched_hangup", "+3600 ALLOTTED_TIMEOUT")], got
    assert re.match(sha_wav, ringback) or ringback == rig.endpoint.ring_tone, ringback
    wait_at = got.index(("playback", waits[0].body))
    prompts = [body for app, body in got[2:wait_at]]
    assert [app for app, _ in got[2:wait_at]] == ["playback"] * len(prompts)
    assert all(re.match(sha_wav, p) for p in prompts), prompts
    assert re.match(sha_wav, waits[0].body) or waits[0].body == f"tone_stream://{rig.endpoint.ring_tone}"
    bridge = got[wait_at + 1]
    assert bridge[0] == "bridge" and got[wait_at + 2] == ("playback", waits[0].body)
    b_vars, b_rest = parse_var_block(bridge[1])
    assert b_vars == expected_leg_vars(b_uuid, call.callid)
    assert b_rest == f"sofia/gateway/carrier/{call.phone_b}"
    # Bridged: nothing more; B failed: the busy notice and the hangup the daemon queued after it.
    assert got[wait_at + 3:] in ([], [("playback", FAILURE_NOTICE), ("hangup", "NORMAL_CLEARING")]), got
    breaks = [s for s in mine if s.verb == "api uuid_break"]
    assert [s.line for s in breaks][:1] == [f"api uuid_break {a_uuid}"]  # B dialed when the daemon said
    assert {s.verb for s in mine} <= {"bgapi originate", "sendmsg", "api uuid_break"}, {s.verb for s in mine}


def valid_fields(rig: Rig) -> dict[str, str]:
    return {"phone_a": "15550000101", "phone_b": "15550006101"}


def send_and_check(rig: Rig, fields: dict[str, Any], *, as_json: bool = False) -> int:
    """POST, then: refused ⇒ nothing sent; accepted ⇒ the call's commands are exactly right."""
    before = len(rig.harness.switch.commands)
    answer = rig.post(fields, as_json=as_json)
    FIGURES["hostile requests sent (injection)"] += 1
    assert answer.status in (200, 400, 401, 413), (answer.status, answer.body[:300], fields)
    data = answer.data() if answer.status != 413 else {}
    if answer.status != 200:
        rig.harness.service.dispatcher.wake()
        assert new_commands(rig, before) == [], (fields, data)
        return answer.status
    call = Call.get(Call.callid == data["callid"])
    rig.harness.wait_final(call, timeout=30)
    call = Call.get_by_id(call.id)
    if plan_digit(call.phone_a) == "x":  # not in the number plan ("+1555…", or random digits): unallocated
        assert (call.status, call.a_cause) == ("failed", "UNALLOCATED_NUMBER"), call.reason
    else:
        assert call.status == "completed", (call.reason, rig.harness.timeline(call))
    check_call_commands(rig, call, new_commands(rig, before))
    FIGURES["accepted hostile-looking requests verified command by command"] += 1
    return 200


@pytest.mark.parametrize("field", ["phone_a", "phone_b", "call_date", "msg_lang", "token"])
def test_hostile_values_in_checked_fields_are_refused_and_send_nothing(rig: Rig, field: str) -> None:
    valid = {"phone_a": "15550000101", "phone_b": "15550006101", "call_date": "2026-12-24 18:00",
             "msg_lang": "en-US", "token": rig.token}[field]
    for value in hostile_values(valid):
        for as_json in (False, True):
            if as_json and "\ud800" in value:
                continue  # not encodable as JSON text
            fields = {**valid_fields(rig), field: value}
            if field == "msg_lang":
                fields["msg"] = "hello"
            status = send_and_check(rig, fields, as_json=as_json)
            assert status in (400, 401, 413), (field, value, status)
    # The token in a header: bearer values with break-outs are refused as well.
    for value in BREAKOUTS[:12]:
        if "\n" in value or "\r" in value or "\0" in value:
            continue  # not sendable in an HTTP header at all
        before = len(rig.harness.switch.commands)
        answer = request(rig.base, "POST", "/v1/calls", form=valid_fields(rig),
                         headers={"Authorization": f"Bearer {rig.token}{value}"})
        assert answer.status == 401 and new_commands(rig, before) == []


def test_hostile_text_in_msg_is_spoken_or_refused_never_sent(rig: Rig) -> None:
    results = []
    for value in BREAKOUTS + ["Call me ${system ls} now, {a=b}, [x], 'q' \"q\" ^^:a:b"]:
        fields = {**valid_fields(rig), "msg": value, "msg_lang": "en-US"}
        results.append(send_and_check(rig, fields))
    assert 200 in results and 400 in results  # printable text is spoken; control characters refused


def test_hostile_media_urls_are_fetched_as_data_or_refused_never_sent(rig: Rig) -> None:
    served = rig.media.url("/prompt.wav")
    for field in ("play_url", "dialtone_url"):
        accepted = 0
        for suffix in BREAKOUTS:
            for value in (served + "?" + suffix, served + "#" + suffix, suffix + served, suffix):
                accepted += send_and_check(rig, {**valid_fields(rig), field: value}) == 200
        # URL-encoded break-outs in the query are valid URLs: fetched, normalised, played as our own file.
        assert accepted >= 3, field
    for scheme in ("shell_stream:///bin/ls", "file:///etc/passwd", "tone_stream://%(100,0,440)",
                   "http_cache://http://127.0.0.1/x.wav", "/etc/passwd", "local_stream://moh"):
        assert send_and_check(rig, {**valid_fields(rig), "play_url": scheme}) == 400


def test_url_encoded_and_raw_bodies(rig: Rig) -> None:
    """Encodings a client may use to smuggle a line break past a naive decoder."""
    raw_bodies = [
        f"token={rig.token}&phone_a=15550000101%0A%0Aapi%20hupall&phone_b=15550006101",
        f"token={rig.token}&phone_a=15550000101%0D%0Abgapi%20originate&phone_b=15550006101",
        f"token={rig.token}&phone_a=15550000101&phone_b=15550006101%00",
        f"token={rig.token}&phone_a=15550000101%252C&phone_b=15550006101",
        f"token={rig.token}&phone_a=1555%2C0000101&phone_b=15550006101",
        f"token={rig.token}&phone_a=15550000101&phone_a=%7Bx%7D&phone_b=15550006101",
        f"token={rig.token}&phone_a=%2B15550000101&phone_b=15550006101&msg=%24%7Bsystem%20ls%7D&msg_lang=en-US",
    ]
    for body in raw_bodies:
        before = len(rig.harness.switch.commands)
        answer = rig.post({}, raw=body.encode())
        FIGURES["hostile requests sent (injection)"] += 1
        data = answer.data()
        if answer.status == 200:
            call = Call.get(Call.callid == data["callid"])
            rig.harness.wait_final(call, timeout=30)
            check_call_commands(rig, Call.get_by_id(call.id), new_commands(rig, before))
        else:
            assert answer.status == 400 and new_commands(rig, before) == [], (body, data)


def test_a_clean_call_sends_exactly_the_expected_session(rig: Rig) -> None:
    """The whole conversation with FreeSWITCH for one call, from the connection's first message."""
    before = 0
    status = send_and_check(rig, {**valid_fields(rig), "play_url": rig.media.url("/a.wav"),
                                  "msg": "Hello there", "msg_lang": "en-GB",
                                  "dialtone_url": rig.media.url("/ring.wav")})
    assert status == 200
    session = [s for s in sent_commands(rig.harness.switch)[before:] if s.verb in SESSION_VERBS]
    filters = [f"filter Event-Name {name}" for name in EVENTS] + [
        f"filter Application -{app}" for app in IGNORED_APPS]
    assert [s.verb for s in session] == ["auth"] + ["filter"] * len(filters) + [
        "event", "api global_getvar", "api fsctl", "api fsctl"]
    assert session[0].line == "auth ClueCon"
    assert [s.line for s in session[1:len(filters) + 1]] == filters
    assert session[-3].line == "api global_getvar core_uuid"
    # The switch's session limits, read without changing them.
    assert [s.line for s in session[-2:]] == ["api fsctl sps", "api fsctl max_sessions"]
    verbs = {s.verb for s in sent_commands(rig.harness.switch)}
    assert verbs <= SESSION_VERBS | PROBES | {"bgapi originate", "sendmsg", "api uuid_break"}, verbs


# ----- the endpoint CLI -------------------------------------------------------------------------------

CLI_FIELDS = {"--caller-id": "15551230000", "--caller-id-name": "Acme", "--dial-string": "sofia/gateway/carrier/{number}"}


def cli_add(state: Path, name: str, **options: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "daemon", "endpoint", "add", "--name", name, "--json"]
    for flag, default in CLI_FIELDS.items():
        args += [flag, options.get(flag, default)]
    env = dict(os.environ, CALLBRIDGE_STATE_DIR=str(state))
    env.pop("CALLBRIDGE_DATABASE_URL", None)
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("flag", list(CLI_FIELDS))
def test_cli_refuses_hostile_endpoint_values(tmp_path: Path, flag: str) -> None:
    values = [",x=1", "}", "{number}}", "${system ls}", "a\nb", "^^:a", "`id`", '"', "[x]", "x" * 300]
    if flag == "--dial-string":
        values = [v + "{number}" if "{number}" not in v else v for v in values[:-1]] + ["sofia/gateway/c/{number},x"]
    for i, value in enumerate(values):
        done = cli_add(tmp_path / "state", f"e{i}", **{flag: value})
        FIGURES["hostile endpoint CLI runs"] += 1
        option = flag.lstrip("-")
        assert done.returncode == 2, (flag, value, done.stdout)
        assert done.stderr.startswith(f"callbridge: {option}:"), done.stderr
    listed = subprocess.run([sys.executable, "-m", "daemon", "endpoint", "list", "--json"], cwd=ROOT,
                            env=dict(os.environ, CALLBRIDGE_STATE_DIR=str(tmp_path / "state")),
                            capture_output=True, text=True, check=True)
    assert json.loads(listed.stdout) == []


NAME_CHARS = st.one_of(st.text(alphabet=st.characters(codec="utf-8"), max_size=45),
                       st.text(alphabet="Acme Sales.'_-,{}$\"^[]", max_size=45))
NUMBER_TEXT = st.text(alphabet="0123456789+,{}$ -'", max_size=22)
DIAL_TEXT = st.text(alphabet="sofia/gateway/carrier{number}_.@:+=-,'\"$ ", max_size=40)


@given(name=NAME_CHARS, caller_id=NUMBER_TEXT, dial=DIAL_TEXT)
@example(name="Pat O'Brien", caller_id="15551230000", dial="sofia/gateway/carrier/{number}")
@hsettings(max_examples=400, deadline=None, database=None)
def test_whatever_the_cli_accepts_the_engine_can_send(name: str, caller_id: str, dial: str) -> None:
    """The CLI's rules and fscommands' rules agree: a value the CLI stores can always be sent safely."""
    options = EndpointOptions(name="p", caller_id_number=caller_id or "1", caller_id_name=name,
                              dial_string=dial or "{number}")
    try:
        options.check()
    except EndpointError:
        return
    leg = fs.leg_variables(leg_uuid="6f1f4c6e-5b7a-4f5e-9d3e-2a1b0c9d8e7f", callid="abcdef0123456789",
                           caller_id_number=options.caller_id_number, caller_id_name=options.caller_id_name,
                           originate_timeout=30)
    line = fs.originate_a(template=options.dial_string, phone="15550001001", variables=leg)
    variables, _ = parse_var_block(line[len("originate "):])
    assert len(variables) == 6 + bool(options.caller_id_name)


def test_an_apostrophe_in_the_caller_id_name_is_refused_by_the_cli(tmp_path: Path) -> None:
    """The CLI uses fscommands' rule: a name the originate line could not carry is refused up front."""
    done = cli_add(tmp_path / "cli", "obrien", **{"--caller-id-name": "Pat O'Brien"})
    assert done.returncode == 2
    assert done.stderr.startswith("callbridge: caller-id-name:"), done.stderr


def test_every_field_rule_holds_for_random_text(rig: Rig) -> None:
    """Random text in every field at once: refused ones send nothing, accepted ones send only our values."""
    cases = 0

    @given(fields=st.fixed_dictionaries({}, optional={
        "phone_a": st.one_of(st.sampled_from(["15550000101", "+15550000101"]), st.text(max_size=20)),
        "phone_b": st.one_of(st.just("15550006101"), st.text(max_size=20)),
        "msg": st.text(max_size=30), "msg_lang": st.sampled_from(["en-US", "fr-FR", "xx", "", "en-US,fr-FR"]),
        "call_date": st.one_of(st.just(""), st.text(max_size=20)),
    }))
    @hsettings(max_examples=60, deadline=None, database=None)
    def one(fields: dict[str, str]) -> None:
        nonlocal cases
        cases += 1
        fields.setdefault("phone_a", "15550000101")
        fields.setdefault("phone_b", "15550006101")
        if any("\ud800" <= ch <= "\udfff" for v in fields.values() for ch in v):
            return
        send_and_check(rig, fields, as_json=True)

    one()
    assert cases > 0
