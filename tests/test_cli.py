"""The operator commands: endpoints and their tokens, calls in flight, a call's timeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.accounts.endpoints import authenticate, hash_token
from daemon.calls.records import add_event
from daemon.cli import main
from daemon.store import Call, Endpoint, utcnow


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("CALLBRIDGE_CONFIG", "CALLBRIDGE_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CALLBRIDGE_STATE_DIR", str(tmp_path))
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


ADD = ("endpoint", "add", "--name", "acme", "--caller-id", "15551230000", "--caller-id-name", "Acme Sales",
       "--dial-string", "sofia/gateway/carrier/{number}", "--timezone", "Europe/Berlin", "--json")


def test_add_prints_the_token_once_and_stores_only_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *ADD)
    assert code == 0
    added = json.loads(out)
    token = added["token"]
    assert token.startswith("cb_") and len(token) >= 3 + 32
    endpoint = Endpoint.get(Endpoint.name == "acme")
    assert endpoint.token_hash == hash_token(token) and token not in endpoint.token_hash
    assert authenticate(token).id == endpoint.id
    code, out, _ = run(capsys, "endpoint", "list", "--json")
    listed = json.loads(out)
    assert [e["name"] for e in listed] == ["acme"] and "token" not in listed[0]
    assert token not in out


def test_rotate_and_disable_stop_the_old_token_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    old = json.loads(run(capsys, *ADD)[1])["token"]
    new = json.loads(run(capsys, "endpoint", "rotate", "acme", "--json")[1])["token"]
    assert new != old and authenticate(old) is None and authenticate(new) is not None
    assert run(capsys, "endpoint", "disable", "acme", "--json")[0] == 0
    assert authenticate(new) is None


@pytest.mark.parametrize(("args", "message"), [
    (("--caller-id", "12ab"), "caller-id: digits"),
    (("--dial-string", "sofia/gateway/carrier/{number},user/1"), "dial-string:"),
    (("--timezone", "Mars/Olympus"), "timezone: unknown zone"),
    (("--caller-id-name", "Evil,Name"), "caller-id-name:"),
])
def test_wrong_options_are_refused_with_the_rule(capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                                 message: str) -> None:
    argv = list(ADD)
    for i in range(0, len(args), 2):
        argv[argv.index(args[i]) + 1] = args[i + 1]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err
    assert Endpoint.select().count() == 0


def test_calls_in_flight_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, *ADD)
    endpoint = Endpoint.get(Endpoint.name == "acme")
    call = Call.create(callid="abc123abc123", endpoint=endpoint, phone_a="15550000001", phone_b="15550000002",
                       due_at=utcnow(), status="dialing_b", started_at=utcnow())
    add_event(call.id, "claimed", a_uuid="x")
    rows = json.loads(run(capsys, "calls", "in-flight", "--json")[1])
    assert [(r["callid"], r["phase"]) for r in rows] == [("abc123abc123", "dialing_b")]
    shown = json.loads(run(capsys, "calls", "show", "abc123abc123", "--json")[1])
    assert shown["status"] == "dialing_b" and [t["kind"] for t in shown["timeline"]] == ["claimed"]
    code, _, err = run(capsys, "calls", "show", "nope", "--json")
    assert code == 2 and "no such call" in err


def test_check_config_masks_the_password(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_ESL_PASSWORD", "s3cretpw")
    code, out, _ = run(capsys, "check-config")
    assert code == 0 and "esl_password: ****" in out and "s3cretpw" not in out
    monkeypatch.setenv("CALLBRIDGE_ESL_PORT", "0")
    code, _, err = run(capsys, "check-config")
    assert code == 2 and "esl_port: must be 1..65535" in err
