"""The operator commands: endpoints and their tokens, calls in flight, a call's timeline."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.accounts.endpoints import authenticate, hash_token
from daemon.calls.records import add_event
from daemon.cli import main
from daemon.store import Call, Endpoint, utcnow
from tests.fake_esl_server import FakeEslServer, FakeSession, api_response

pytestmark = pytest.mark.stores("sqlite", "postgresql")


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> Path:
    """The commands' state directory; their store is this test's (SQLite in it, or PostgreSQL)."""
    monkeypatch.delenv("CALLBRIDGE_CONFIG", raising=False)
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL", database_url)
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


def test_a_number_that_is_one_endpoints_name_and_anothers_id_is_refused_not_guessed(
        capsys: pytest.CaptureFixture[str]) -> None:
    def add(name: str) -> dict[str, Any]:
        added: dict[str, Any] = json.loads(run(capsys, *[name if a == "acme" else a for a in ADD])[1])
        return added

    acme = add("acme")
    clash = add(str(acme["id"]))  # customer numbers as names: this one's name is acme's id
    for action in ("rotate", "disable"):
        code, out, err = run(capsys, "endpoint", action, str(acme["id"]), "--json")
        assert (code, out) == (2, "")
        assert err == (f"callbridge: endpoint {str(acme['id'])!r}: both the endpoint named {str(acme['id'])!r} "
                       f"(id {clash['id']}) and the endpoint with id {acme['id']} (named 'acme'); "
                       f"give the other name or id of the one you mean\n")
    assert authenticate(acme["token"]) is not None and authenticate(clash["token"]) is not None
    # Unambiguous ways still work: the other name, the other id, and a name that is its own id.
    assert run(capsys, "endpoint", "disable", "acme")[0] == 0 and authenticate(acme["token"]) is None
    assert run(capsys, "endpoint", "disable", str(clash["id"]))[0] == 0 and authenticate(clash["token"]) is None
    same = add(str(clash["id"] + 1))
    assert same["id"] == clash["id"] + 1
    assert run(capsys, "endpoint", "disable", same["name"])[0] == 0 and authenticate(same["token"]) is None
    # A number past any row id is no endpoint, not a traceback.
    assert run(capsys, "endpoint", "rotate", "9" * 20) == (2, "", f"callbridge: endpoint {'9' * 20!r}: no such endpoint\n")


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--max-in-flight", "99999999999999999999", "max-in-flight: at most 2147483647"),
    ("--daily-cap", "2147483648", "daily-cap: at most 2147483647"),
    ("--name", "acme\x1b[2J", "name: no control characters"),
])
def test_values_the_store_cannot_hold_are_refused_with_the_rule(capsys: pytest.CaptureFixture[str], option: str,
                                                               value: str, message: str) -> None:
    argv = [a for a in ADD if a not in ("--name", "acme")] + ["--name", "acme", option, value]
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "") and err.startswith(f"callbridge: {message}")
    assert Endpoint.select().count() == 0


def test_calls_in_flight_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, *ADD)
    assert run(capsys, "calls", "in-flight")[1] == "(none)\n"  # said, not an empty answer
    endpoint = Endpoint.get(Endpoint.name == "acme")
    call = Call.create(callid="abc123abc123", endpoint=endpoint, phone_a="15550000001", phone_b="15550000002",
                       due_at=utcnow(), status="dialing_b", started_at=utcnow())
    add_event(call.id, "claimed", a_uuid="x")
    rows = json.loads(run(capsys, "calls", "in-flight", "--json")[1])
    assert [(r["callid"], r["phase"]) for r in rows] == [("abc123abc123", "dialing_b")]
    assert rows[0]["started_at"].endswith("Z")  # ISO 8601 UTC, as every other answer
    shown = json.loads(run(capsys, "calls", "show", "abc123abc123", "--json")[1])
    assert shown["status"] == "dialing_b" and [t["kind"] for t in shown["timeline"]] == ["claimed"]
    text = run(capsys, "calls", "show", "abc123abc123")[1]
    assert "\ntimeline:\n  at=" in text and '  kind=claimed  detail={"a_uuid": "x"}' in text, text
    assert "None" not in text and "{'" not in text  # no Python reprs
    code, _, err = run(capsys, "calls", "show", "nope", "--json")
    assert code == 2 and "no such call" in err


ROOT = Path(__file__).resolve().parent.parent


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.stores("sqlite")
def test_calls_hangup_goes_to_the_switch_that_has_the_call(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """With several switches, ``uuid_kill`` goes to the one the call's legs were sent to (``call.switch``)."""
    def script(session: FakeSession) -> None:
        session.handshake("pw")
        session.read_command()
        session.send(api_response("+OK\n"))
        session.wait_client_close()

    with FakeEslServer(script) as first, FakeEslServer(script) as second:
        monkeypatch.setenv("CALLBRIDGE_SWITCHES", f"127.0.0.1:{first.port}:pw,127.0.0.1:{second.port}:pw")
        monkeypatch.setenv("CALLBRIDGE_ESL_PORT", str(_closed_port()))  # not a switch of this daemon
        run(capsys, *ADD)
        call = Call.create(callid="abc123abc123", endpoint=Endpoint.get(Endpoint.name == "acme"),
                           phone_a="15550000001", phone_b="15550000002", due_at=utcnow(), status="bridged",
                           started_at=utcnow(), a_uuid="a" * 8 + "-0000-4000-8000-" + "0" * 12,
                           switch=f"127.0.0.1:{second.port}")
        code, out, err = run(capsys, "calls", "hangup", "abc123abc123", "--json")
        assert code == 0, err
        assert json.loads(out) == {"callid": "abc123abc123", "freeswitch": "+OK"}
        assert second.sessions[0].received[-1] == f"api uuid_kill {call.a_uuid} NORMAL_CLEARING\n\n".encode()
        assert not first.sessions and not first.errors and not second.errors


@pytest.mark.stores("sqlite")
def test_a_store_folder_that_cannot_be_made_is_a_one_line_error(capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    not_a_folder = tmp_path / "state-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.delenv("CALLBRIDGE_DATABASE_URL")  # the default store, in the state folder
    monkeypatch.setenv("CALLBRIDGE_STATE_DIR", str(not_a_folder))
    code, out, err = run(capsys, "endpoint", "list")
    assert code == 2 and out == ""
    assert err.startswith(f"callbridge: database_url sqlite:///{not_a_folder}/callbridge.db: cannot open the store: ")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.stores("sqlite")
@pytest.mark.parametrize(("setting", "below", "message"), [
    ("STATE_DIR", "state", "state_dir: cannot create {path}/media: Not a directory"),
    ("PORTAL_SECRET_KEY_FILE", "portal.key", "portal_secret_key_file: cannot read {path}: Not a directory"),
])
def test_run_with_a_path_that_cannot_be_made_is_a_one_line_error(tmp_path: Path, setting: str, below: str,
                                                                  message: str) -> None:
    """A folder to make at start sits under a file (or is read-only): named with why, exit 2, no traceback."""
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")}
    env.update(CALLBRIDGE_STATE_DIR=str(tmp_path / "state"), CALLBRIDGE_HTTP_PORT="0",
               CALLBRIDGE_ESL_PORT=str(_closed_port()), CALLBRIDGE_DATABASE_URL=f"sqlite:///{tmp_path}/cb.db")
    env[f"CALLBRIDGE_{setting}"] = str(not_a_folder / below)
    proc = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    expected = "callbridge: configuration error: " + message.format(path=not_a_folder / below)
    assert proc.stderr.splitlines()[-1] == expected, proc.stderr[-2000:]


def test_check_config_shows_values_as_they_are_written(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_SWITCHES", "fs1:8021:pw1,fs2:8022:pw2")
    monkeypatch.setenv("CALLBRIDGE_TTS_VOICES", "fr-FR=fr+f3")
    code, out, _ = run(capsys, "check-config")
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    assert code == 0 and lines["trust_proxy"] == "false" and lines["media_allow_private"] == "(none)"
    assert lines["switches"] == "fs1:8021:****, fs2:8022:****" and "pw1" not in out
    assert "fr-FR=fr+f3" in lines["tts_voices"].split(", ")
    # A default path is shown as the file it stands for.
    assert lines["portal_secret_key_file"] == str(Path(lines["state_dir"]) / "portal-secret.key")


def test_check_config_masks_the_password(capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_ESL_PASSWORD", "s3cretpw")
    code, out, _ = run(capsys, "check-config")
    assert code == 0 and "esl_password: ****" in out and "s3cretpw" not in out
    monkeypatch.setenv("CALLBRIDGE_ESL_PORT", "0")
    code, _, err = run(capsys, "check-config")
    assert code == 2 and "esl_port: must be 1..65535" in err


@pytest.mark.stores("sqlite")
def test_check_config_masks_the_database_password(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL",
                       "postgresql://callbridge:s3cr%40t@db.example:5432/callbridge?sslmode=require&password=s3cr")
    code, out, _ = run(capsys, "check-config")
    assert code == 0 and "s3cr" not in out
    assert "database_url: postgresql://callbridge:****@db.example:5432/callbridge?sslmode=require&password=****" in out


@pytest.mark.stores("sqlite")
@pytest.mark.parametrize(("url", "message"), [
    ("mysql://cb:pw@db/cb", "database_url: must be sqlite:///path/to/file.db or postgresql://"),
    ("postgresql://cb:pw@db.example/", "database_url: a PostgreSQL store is postgresql://user:password@host:port/dbname"
                                       " (the database name is missing) (got 'postgresql://cb:****@db.example/')"),
    ("sqlite://callbridge.db", "database_url: a SQLite store is sqlite:////absolute/path/file.db (four slashes)"),
])
def test_a_malformed_database_url_is_named_and_its_password_kept_out(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, url: str, message: str) -> None:
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL", url)
    code, _, err = run(capsys, "check-config")
    assert code == 2 and message in err and ":pw@" not in err


@pytest.mark.stores("sqlite")
def test_run_with_a_voice_the_engine_lacks_stops_before_serving(tmp_path: Path) -> None:
    """A voice the operator set is spoken once at start: one the engine lacks is named, exit 2, rather than
    every message in that language failing later."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")}
    env.update(CALLBRIDGE_STATE_DIR=str(tmp_path / "state"), CALLBRIDGE_HTTP_PORT="0",
               CALLBRIDGE_ESL_PORT=str(_closed_port()), CALLBRIDGE_TTS_VOICES="de-DE=xx-nowhere")
    proc = subprocess.run([sys.executable, "-m", "daemon", "run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "callbridge: configuration error: tts_voices: de-DE = 'xx-nowhere': could not be spoken with voice "
        "xx-nowhere: no such voice in the bundled speech engine")


@pytest.mark.stores("sqlite")
def test_a_sqlite_path_is_shown_as_the_file_every_command_opens_and_an_unmakeable_folder_is_one_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Three slashes: a path from the working directory (what an operator writing sqlite:///var/lib/... gets).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL", "sqlite:///var/lib/cb.db")
    code, out, _ = run(capsys, "check-config")
    assert code == 0 and f"database_url: sqlite:///{tmp_path}/var/lib/cb.db" in out
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL", f"sqlite:///{tmp_path}/file/cb.db")
    for command in (("endpoint", "list"), ("run",)):
        code, _, err = run(capsys, *command)
        assert code == 2, command
        assert err.strip() == (f"callbridge: database_url sqlite:///{tmp_path}/file/cb.db: cannot open the store: "
                               f"cannot make the folder {tmp_path}/file: File exists"), command


@pytest.mark.stores("sqlite")
def test_a_postgresql_store_that_cannot_be_reached_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL", f"postgresql://cb:hunter2@127.0.0.1:{port}/cb")
    code, out, err = run(capsys, "endpoint", "list")
    assert code == 2 and out == ""
    assert err.startswith(f"callbridge: database_url postgresql://cb:****@127.0.0.1:{port}/cb: cannot open the store: ")
    assert "hunter2" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.stores("sqlite")
def test_output_into_a_pipe_whose_reader_left_ends_quietly(tmp_path: Path) -> None:
    """``python -m daemon check-config | head``: head leaves before the output ends; no traceback, exit 0."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")}
    env.update(CALLBRIDGE_STATE_DIR=str(tmp_path / "state"))
    try:
        proc = subprocess.run([sys.executable, "-m", "daemon", "check-config"], cwd=ROOT, env=env, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)
    assert proc.returncode == 0 and proc.stderr == ""


@pytest.mark.stores("sqlite")
def test_config_is_taken_before_or_after_any_command(tmp_path: Path) -> None:
    config = tmp_path / "callbridge.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\ndatabase_url = "sqlite:///{tmp_path}/from-file.db"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBRIDGE_")}
    for args in (["--config", str(config), "endpoint", "list"], ["endpoint", "list", "--config", str(config)],
                 ["user", "list", "--config", str(config)], ["calls", "in-flight", "--config", str(config)]):
        proc = subprocess.run([sys.executable, "-m", "daemon", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, (args, proc.stderr)
    assert (tmp_path / "from-file.db").exists()
