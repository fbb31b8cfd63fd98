"""Web accounts: rules, sessions, the store step that added them, and the ``user`` / ``--owner`` commands."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import pytest
from peewee import Database

from daemon import store
from daemon.accounts import users
from daemon.cli import main
from daemon.config import Settings
from daemon.store import Account, Endpoint, WebSession, close_database, open_database, schema_version, utcnow

pytestmark = pytest.mark.stores("sqlite", "postgresql")

PASSWORD = "correct horse battery"


@pytest.fixture(autouse=True)
def quick_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    from argon2 import PasswordHasher

    monkeypatch.setattr(users, "HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.mark.parametrize(("email", "message"), [
    ("", "email: must be an address"), ("ann", "email: must be an address"), ("ann@example", "email: must be"),
    ("a b@example.com", "email: must be"), ("a@b@example.com", "email: must be"), ("x" * 250 + "@e.com", "email:"),
    ("a\x00b@example.com", "email: must be"), ("ann@example.com\x7f", "email: must be"),
    ("ann@exa\x1bmple.com", "email: must be"),
])
def test_email_rule(email: str, message: str) -> None:
    with pytest.raises(users.AccountError, match=message):
        users.normalise_email(email)


def test_email_is_trimmed_and_lower_case(db: Database) -> None:
    assert users.create_account("  Ann@Example.COM ", PASSWORD).email == "ann@example.com"
    with pytest.raises(users.AccountError, match="email: an account for ann@example.com already exists"):
        users.create_account("ANN@example.com", PASSWORD)


def test_two_registrations_of_one_email_at_once_give_one_account_and_a_named_error(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    # The other registration lands while this one's password is being hashed (argon2: a while), after
    # the look for an existing account: the unique index refuses the second, which must read like the look.
    hash_password = users.hash_password

    def slow_hash(password: str) -> str:
        Account.create(email="ann@example.com", password_hash=hash_password(password))
        return hash_password(password)

    monkeypatch.setattr(users, "hash_password", slow_hash)
    with pytest.raises(users.AccountError, match="email: an account for ann@example.com already exists"):
        users.create_account("ann@example.com", PASSWORD)
    assert Account.select().where(Account.email == "ann@example.com").count() == 1


@pytest.mark.parametrize(("password", "message"), [
    ("short", "password: at least 10 characters"), ("x" * 1025, "password: at most 1024 characters"),
    ("tab\tinside pw", "password: no control characters"), ("ann@example.com", "password: must not be the email"),
])
def test_password_rule(db: Database, password: str, message: str) -> None:
    with pytest.raises(users.AccountError, match=message):
        users.create_account("ann@example.com", password)


def test_authenticate_checks_password_and_enabled(db: Database) -> None:
    account = users.create_account("ann@example.com", PASSWORD)
    assert account.password_hash.startswith("$argon2id$") and PASSWORD not in account.password_hash
    assert users.authenticate("ANN@example.com", PASSWORD).id == account.id
    assert users.authenticate("ann@example.com", PASSWORD + "x") is None
    assert users.authenticate("nobody@example.com", PASSWORD) is None
    assert users.authenticate("not an email", PASSWORD) is None
    users.set_enabled(account, False)
    assert users.authenticate("ann@example.com", PASSWORD) is None


def test_sessions_expire_and_end_with_a_password_change(db: Database) -> None:
    account = users.create_account("ann@example.com", PASSWORD)
    now = utcnow()
    key = users.start_session(account, dt.timedelta(hours=1), "127.0.0.1", now)
    assert users.session_account(key, now)[1].id == account.id
    assert users.session_account(key, now + dt.timedelta(hours=1)) is None  # expired
    assert users.session_account(key + "x", now) is None
    users.set_password(account, "another passphrase")
    assert users.session_account(key, now) is None and WebSession.select().count() == 0


def test_expired_sessions_are_swept_at_the_next_sign_in(db: Database) -> None:
    account = users.create_account("ann@example.com", PASSWORD)
    now = utcnow()
    users.start_session(account, dt.timedelta(minutes=1), now=now - dt.timedelta(hours=1))
    users.start_session(account, dt.timedelta(hours=1), now=now)
    assert WebSession.select().count() == 1


def test_a_store_from_before_accounts_gains_them_and_keeps_its_rows(settings: Settings) -> None:
    """A v3 store (no account tables, no endpoint.owner_id) is brought up to date in place."""
    db = open_database(settings.database_url)
    Endpoint.create(name="old", token_hash="h" * 64, token_hint="cb_old…", caller_id_number="1555",
                    dial_string="sofia/gateway/carrier/{number}")
    for statement in ("DROP INDEX endpoint_owner_id", "ALTER TABLE endpoint DROP COLUMN owner_id",
                      "DROP TABLE websession", "DROP TABLE account", "DELETE FROM schemaversion WHERE version > 3"):
        db.execute_sql(statement)
    close_database(db)
    db = open_database(settings.database_url)
    assert schema_version(db) == len(store.MIGRATIONS)
    assert "owner_id" in {c.name for c in db.get_columns("endpoint")}
    old = Endpoint.get(Endpoint.name == "old")
    assert old.owner_id is None and old.token_hint == "cb_old…"
    owner = users.create_account("ann@example.com", PASSWORD)
    old.owner = owner.id
    old.save()
    assert [e.name for e in owner.endpoints] == ["old"]
    close_database(db)


# The commands -------------------------------------------------------------------------------------

@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, database_url: str) -> Path:
    """The commands' state directory; their store is this test's (SQLite in it, or PostgreSQL)."""
    monkeypatch.delenv("CALLBRIDGE_CONFIG", raising=False)
    monkeypatch.setenv("CALLBRIDGE_DATABASE_URL", database_url)
    monkeypatch.setenv("CALLBRIDGE_STATE_DIR", str(tmp_path))
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str,
        stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_user_commands(state: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, monkeypatch, "user", "add", "--email", "Root@Example.com", "--password-stdin",
                       "--admin", "--json", stdin=PASSWORD + "\n")
    assert code == 0
    added = json.loads(out)
    assert added["email"] == "root@example.com" and added["admin"] is True and "password" not in out
    assert users.authenticate("root@example.com", PASSWORD) is not None  # the line break is not part of it
    code, _, err = run(capsys, monkeypatch, "user", "add", "--email", "ann@example.com")
    assert code == 2 and "password: give it on standard input with --password-stdin" in err
    code, _, err = run(capsys, monkeypatch, "user", "add", "--email", "ann@example.com", "--password-stdin",
                       stdin="short\n")
    assert code == 2 and "password: at least 10 characters" in err
    assert run(capsys, monkeypatch, "user", "add", "--email", "ann@example.com", "--password-stdin",
               stdin=PASSWORD + "\n")[0] == 0
    code, out, _ = run(capsys, monkeypatch, "user", "list", "--json")
    assert [a["email"] for a in json.loads(out)] == ["ann@example.com", "root@example.com"]
    code, out, _ = run(capsys, monkeypatch, "user", "password", "ann@example.com", "--password-stdin", "--json",
                       stdin="a new passphrase\n")
    assert code == 0 and users.authenticate("ann@example.com", "a new passphrase") is not None
    code, out, _ = run(capsys, monkeypatch, "user", "disable", "ann@example.com", "--json")
    assert code == 0 and json.loads(out)["enabled"] is False
    assert users.authenticate("ann@example.com", "a new passphrase") is None
    assert run(capsys, monkeypatch, "user", "enable", "ann@example.com")[0] == 0
    code, _, err = run(capsys, monkeypatch, "user", "disable", "nobody@example.com")
    assert code == 2 and "account 'nobody@example.com': no such account" in err


def test_endpoint_owner_on_add_and_assign(state: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run(capsys, monkeypatch, "user", "add", "--email", "ann@example.com", "--password-stdin", stdin=PASSWORD)
    add = ("endpoint", "add", "--name", "acme", "--caller-id", "15551230000",
           "--dial-string", "sofia/gateway/carrier/{number}", "--json")
    code, _, err = run(capsys, monkeypatch, *add, "--owner", "nobody@example.com")
    assert code == 2 and "owner: account 'nobody@example.com': no such account" in err
    assert not Endpoint.select().exists()
    code, out, _ = run(capsys, monkeypatch, *add, "--owner", "Ann@example.com")
    assert code == 0 and json.loads(out)["owner"] == "ann@example.com"
    code, out, _ = run(capsys, monkeypatch, "endpoint", "assign", "acme", "--no-owner", "--json")
    assert json.loads(out)["owner"] is None and Endpoint.get().owner_id is None
    code, out, _ = run(capsys, monkeypatch, "endpoint", "assign", "acme", "--owner", "ann@example.com", "--json")
    assert json.loads(out)["owner"] == "ann@example.com"
    assert Endpoint.get().owner_id == Account.get().id
    code, out, _ = run(capsys, monkeypatch, "user", "list", "--json")
    assert json.loads(out)[0]["endpoints"] == ["acme"]
