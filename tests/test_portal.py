"""The web pages through Flask's test client: accounts, sessions, CSRF, sign-in limits, ownership,
tokens, the calls pages and their paging, admin pages, and the security headers.

(The same pages in a real browser, against the daemon and the stand-in: tests/integration/test_portal_browser.py.)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import re
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from flask import Flask
from flask.testing import FlaskClient
from peewee import Database

from daemon.accounts import users
from daemon.accounts.endpoints import authenticate, hash_token
from daemon.calls import search
from daemon.calls.records import add_event
from daemon.config import Settings
from daemon.store import Account, Call, CallStatus, Endpoint, WebSession
from tests.conftest import NOW
from tests.fakes import FakeDispatcher, FakeMedia, FixedClock
from tests.portal_helpers import PASSWORD, Browser, csrf_of, errors_of, make_account
from tests.test_api_read import bulk_calls
from webapi.portal import queries
from webapi.portal.security import CSP
from webapi.validation import decode_id_cursor

pytestmark = pytest.mark.stores("sqlite", "postgresql")


@pytest.fixture(autouse=True)
def quick_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id with small parameters here (these tests hash dozens of passwords); the real parameters are
    checked below and used by the CLI and browser tests."""
    from argon2 import PasswordHasher

    monkeypatch.setattr(users, "HASHER", PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@pytest.fixture
def make_app(settings: Settings, db: Database, media: FakeMedia, dispatcher: FakeDispatcher,
             clock: FixedClock) -> Callable[..., Flask]:
    def make(**overrides: Any) -> Flask:
        from webapi.app import create_app

        return create_app(dataclasses.replace(settings, **overrides), media=media, dispatcher=dispatcher,
                          clock=clock)
    return make


@pytest.fixture
def ann(db: Database) -> Account:
    return make_account("ann@example.com")


@pytest.fixture
def bob(db: Database) -> Account:
    return make_account("bob@example.com")


@pytest.fixture
def admin(db: Database) -> Account:
    return make_account("root@example.com", admin=True)


def browser(app: Flask) -> Browser:
    return Browser(app.test_client())


def own_endpoint(make_endpoint: Any, owner: Account, **options: Any) -> tuple[Endpoint, str]:
    endpoint, token = make_endpoint(**options)
    endpoint.owner = owner.id
    endpoint.save()
    return endpoint, token


def call_row(endpoint: Endpoint, callid: str, **fields: Any) -> Call:
    values: dict[str, Any] = {"callid": callid, "endpoint": endpoint.id, "phone_a": "15550001001",
                              "phone_b": "15550003002", "requested_at": NOW, "due_at": NOW, "status": "completed"}
    values.update(fields)
    return Call.create(**values)


# Signing in -----------------------------------------------------------------------------------------

def test_login_form_has_labelled_fields_and_a_csrf_field_and_strict_headers(app: Flask) -> None:
    response = app.test_client().get("/login")
    page = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/html"
    for name in ("email", "password"):
        assert f'<label for="f-{name}">' in page and f'id="f-{name}" name="{name}"' in page
    assert csrf_of(page)
    assert response.headers["Content-Security-Policy"] == CSP
    assert "script-src 'self'" in CSP and "'unsafe-inline'" not in CSP and "frame-ancestors 'none'" in CSP
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-store"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("cb_anon=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_sign_in_sets_a_signed_httponly_session_cookie_and_sign_out_ends_the_session(app: Flask, ann: Account) -> None:
    b = browser(app)
    response = b.login("Ann@Example.com ", PASSWORD)
    assert response.status_code == 303 and response.headers["Location"] == "/calls"
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("cb_session="))
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    value = cookie.split(";")[0].split("=", 1)[1]
    session = WebSession.get()
    assert session.account_id == ann.id and value not in session.key_hash  # only the key's hash is stored
    assert b.text("/endpoints")  # signed in
    out = b.submit("/endpoints", "/logout")
    assert out.status_code == 303 and out.headers["Location"] == "/login?notice=signed_out"
    assert WebSession.select().count() == 0
    # The old cookie, replayed, no longer opens anything.
    replay = app.test_client()
    replay.set_cookie("cb_session", value)
    assert replay.get("/endpoints").status_code == 303


def test_a_forged_or_tampered_session_cookie_is_ignored(app: Flask, ann: Account) -> None:
    b = browser(app).signed_in_as(ann.email)
    value = b.client.get_cookie("cb_session").value
    for forged in (value[:-2] + ("AA" if not value.endswith("AA") else "BB"), "x", "a" * 4000):
        other = app.test_client()
        other.set_cookie("cb_session", forged)
        response = other.get("/calls")
        assert response.status_code == 303 and response.headers["Location"].startswith("/login?next=")


def test_passwords_are_argon2id_with_memory_hard_parameters_and_old_hashes_are_upgraded(
        app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    from argon2 import PasswordHasher
    from argon2.profiles import RFC_9106_LOW_MEMORY

    monkeypatch.undo()  # the real hasher
    assert users.HASHER.time_cost >= 3 and users.HASHER.memory_cost >= 64 * 1024
    assert users.HASHER.type.name == "ID" and RFC_9106_LOW_MEMORY.memory_cost == users.HASHER.memory_cost
    weak = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    account = Account.create(email="old@example.com", password_hash=weak.hash(PASSWORD))
    assert browser(app).login(account.email).status_code == 303
    upgraded = Account.get_by_id(account.id).password_hash
    assert upgraded != account.password_hash and "m=65536,t=3,p=4" in upgraded
    assert users.password_matches(upgraded, PASSWORD)


def test_wrong_password_or_unknown_email_answer_the_same_and_set_no_session(app: Flask, ann: Account) -> None:
    answers = []
    for email, password in (("ann@example.com", "wrong password!"), ("nobody@example.com", PASSWORD)):
        response = browser(app).login(email, password)
        assert response.status_code == 401
        assert not any(c.startswith("cb_session=") for c in response.headers.getlist("Set-Cookie"))
        answers.append(errors_of(response.get_data(as_text=True)))
    assert answers[0] == answers[1] == ["The email or the password is wrong (or the account is disabled)."]


def test_an_email_with_a_control_character_is_a_wrong_sign_in_or_a_named_error_never_a_500(
        app: Flask, ann: Account, admin: Account) -> None:
    # PostgreSQL refuses a NUL in any text: looked up as it was, such an email was a 500 before any password.
    for email in ("ann@example.com\x00", "a\x00nn@example.com", "ann\x7f@example.com"):
        response = browser(app).login(email, PASSWORD)
        assert response.status_code == 401, email
        assert errors_of(response.get_data(as_text=True)) == [
            "The email or the password is wrong (or the account is disabled)."]
    a = browser(app).signed_in_as(admin.email)
    for email in ("cat\x00@example.com", "cat@exam\x1bple.com"):
        response = a.submit("/admin/accounts", "/admin/accounts", {"email": email, "password": "p" * 12})
        assert response.status_code == 400, email
        assert errors_of(response.get_data(as_text=True))[0] == "email: must be an address such as name@example.com"
    assert Account.select().count() == 2

def test_next_goes_back_to_the_page_asked_for_but_never_to_another_site(app: Flask, ann: Account) -> None:
    client = app.test_client()
    response = client.get("/calls?status=failed")
    assert response.headers["Location"] == "/login?next=/calls%3Fstatus%3Dfailed"
    b = Browser(client)
    for target, expected in (("/calls?status=failed", "/calls?status=failed"), ("//evil.example/x", "/calls"),
                             ("https://evil.example/", "/calls"), ("/\\evil.example", "/calls"),
                             # a tab or a line break is dropped by browsers (and a CR/LF cannot be a header)
                             ("/\t/evil.example/x", "/calls"), ("/\n/evil.example", "/calls"),
                             ("/\r/evil.example", "/calls"), ("/ /evil.example", "/calls")):
        token = csrf_of(b.text("/login"))
        response = client.post("/login", data={"email": ann.email, "password": PASSWORD, "next": target,
                                               "csrf_token": token})
        assert (response.status_code, response.headers["Location"]) == (303, expected), target
        if expected == "/calls":  # signed in, a link to the sign-in page goes nowhere else either
            assert client.get("/login?next=" + target.replace("\t", "%09")).headers["Location"] == "/calls"
        b.submit("/account", "/logout")


def test_sign_in_is_limited_per_account_then_per_address(make_app: Callable[..., Flask], ann: Account,
                                                          bob: Account) -> None:
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=5)
    b = browser(app)
    for _ in range(3):
        assert b.login(ann.email, "not the password").status_code == 401
    limited = b.login(ann.email, PASSWORD)  # the right password too: the account is at its limit
    assert limited.status_code == 429
    # The limiter's budget refills one failure per window / limit (15 min / 3): that is the wait it names.
    assert "Try again in 5 minutes" in errors_of(limited.get_data(as_text=True))[0]
    assert not any(c.startswith("cb_session=") for c in limited.headers.getlist("Set-Cookie"))
    # Another account from the same address still signs in, until the address reaches its own limit.
    assert b.login(bob.email, PASSWORD).status_code == 303
    b.submit("/account", "/logout")
    for n in range(2):
        assert b.login(f"guess{n}@example.com", "whatever password").status_code == 401
    assert b.login(bob.email, PASSWORD).status_code == 429
    other_address = Browser(app.test_client())
    other_address.client.environ_base["REMOTE_ADDR"] = "10.9.9.9"
    assert other_address.login(bob.email, PASSWORD).status_code == 303


def test_sign_ins_arriving_together_share_the_accounts_budget(make_app: Callable[..., Flask],
                                                                ann: Account) -> None:
    """The password check runs off the loop: twenty guesses sent at once must not all be checked before the
    first failure is counted (the limit bounds how many passwords are tried, not how many at a time)."""
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=1000)
    tried: list[str] = []
    real = users.password_matches

    def counting(stored: str, password: str) -> bool:
        tried.append(password)
        return real(stored, password)

    patch = pytest.MonkeyPatch()
    patch.setattr(users, "password_matches", counting)
    try:
        browsers = []
        for n in range(20):
            b = browser(app)
            b.client.environ_base["REMOTE_ADDR"] = f"10.0.0.{n + 1}"
            browsers.append((b, csrf_of(b.text("/login"))))
        jobs = [gevent.spawn(b.client.post, "/login", data={"email": ann.email, "password": f"guess number {i}",
                                                            "csrf_token": token})
                for i, (b, token) in enumerate(browsers)]
        gevent.joinall(jobs, raise_error=True)
    finally:
        patch.undo()
    statuses = sorted(job.value.status_code for job in jobs)
    assert statuses == [401] * 3 + [429] * 17 and len(tried) == 3


def _from(app: Flask, address: str) -> Browser:
    b = browser(app)
    b.client.environ_base["REMOTE_ADDR"] = address
    return b


def test_guesses_from_elsewhere_do_not_lock_out_a_browser_that_signed_in_before(make_app: Callable[..., Flask],
                                                                                 ann: Account) -> None:
    """The account's budget stops strangers; the owner's browser (its device cookie, from an earlier
    sign-in) has a budget of its own, so spending the account's cannot keep the owner out."""
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=1000)
    owner = _from(app, "10.0.0.1").signed_in_as(ann.email)
    device = owner.client.get_cookie("cb_device")
    assert device is not None and device.http_only and device.same_site == "Lax"
    owner.submit("/account", "/logout")
    for n in range(3):
        assert _from(app, f"10.0.1.{n}").login(ann.email, "a guess").status_code == 401
    assert _from(app, "10.0.2.1").login(ann.email, PASSWORD).status_code == 429  # a stranger: locked out
    assert owner.login(ann.email, PASSWORD).status_code == 303
    # The cookie is signed: the same value edited, or another account's, is a stranger's.
    stranger = _from(app, "10.0.2.2")
    value = device.value
    stranger.client.set_cookie("cb_device", value[:-2] + ("AA" if not value.endswith("AA") else "BB"))
    assert stranger.login(ann.email, PASSWORD).status_code == 429
    bobs = _from(app, "10.0.2.3").signed_in_as(make_account("bob@example.com").email)
    bobs.submit("/account", "/logout")
    assert bobs.login(ann.email, PASSWORD).status_code == 429


def test_a_known_browsers_own_budget_is_bounded_then_it_spends_the_accounts(make_app: Callable[..., Flask],
                                                                            ann: Account) -> None:
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=1000)
    owner = _from(app, "10.0.0.1").signed_in_as(ann.email)
    owner.submit("/account", "/logout")
    for _ in range(3):  # its own budget: the account's stays whole
        assert owner.login(ann.email, "a wrong password").status_code == 401
    strangers = [_from(app, f"10.0.1.{n}") for n in range(4)]
    assert [b.login(ann.email, "a guess").status_code for b in strangers] == [401, 401, 401, 429]
    # Its own spent, the browser counts against the account like anyone, which is spent too.
    assert owner.login(ann.email, PASSWORD).status_code == 429


def test_a_wrong_current_password_on_the_account_page_spends_the_browsers_own_budget(
        make_app: Callable[..., Flask], ann: Account) -> None:
    app = make_app(portal_login_failures_per_account=2, portal_login_failures_per_address=1000)
    owner = _from(app, "10.0.0.1").signed_in_as(ann.email)
    for n in range(2):
        assert _from(app, f"10.0.1.{n}").login(ann.email, "a guess").status_code == 401
    change = {"current_password": PASSWORD, "new_password": "another good password",
              "new_password_again": "another good password"}
    assert owner.submit("/account", "/account", change).status_code == 303


def test_the_accounts_budget_is_the_same_however_its_email_is_spelled(make_app: Callable[..., Flask],
                                                                      db: Database) -> None:
    email = "jos\u00e9@example.com"
    make_account(email)
    decomposed = unicodedata.normalize("NFD", email).upper()  # the same account, spelled otherwise
    assert users.authenticate(decomposed, PASSWORD) is not None
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=1000)
    b = browser(app)
    statuses = [b.login(spelling, "not the password").status_code for spelling in [email] * 3 + [decomposed] * 2]
    assert statuses == [401, 401, 401, 429, 429]


def test_ids_too_big_for_a_row_answer_404_or_name_the_field(app: Flask, ann: Account, admin: Account) -> None:
    huge = "9" * 25  # past SQLite's and PostgreSQL's integers
    b = browser(app).signed_in_as(ann.email)
    root = browser(app).signed_in_as(admin.email)
    assert b.client.get(f"/calls?endpoint={huge}").status_code == 400
    assert b.submit("/endpoints", f"/endpoints/{huge}/rotate").status_code == 404
    placed = b.submit("/calls/new", "/calls/new", {"endpoint": huge, "phone_a": "15550001001",
                                                   "phone_b": "15550002002"})
    assert placed.status_code == 400 and "endpoint:" in errors_of(placed.get_data(as_text=True))[0]
    assert root.client.get(f"/admin/endpoints/{huge}").status_code == 404
    assert root.submit("/admin/accounts", f"/admin/accounts/{huge}/disable").status_code == 404


def test_a_success_clears_the_accounts_failures(make_app: Callable[..., Flask], ann: Account) -> None:
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=100)
    b = browser(app)
    for _ in range(2):
        b.login(ann.email, "not the password")
    b.signed_in_as(ann.email)
    b.submit("/account", "/logout")
    for _ in range(2):
        assert b.login(ann.email, "not the password").status_code == 401
    assert b.login(ann.email, PASSWORD).status_code == 303


# CSRF ---------------------------------------------------------------------------------------------

def test_every_form_without_its_csrf_field_is_refused_and_changes_nothing(app: Flask, ann: Account,
                                                                          admin: Account, make_endpoint: Any) -> None:
    endpoint, token = own_endpoint(make_endpoint, ann)
    b = browser(app).signed_in_as(ann.email)
    for action in (f"/endpoints/{endpoint.id}/rotate", "/logout", "/account"):
        response = b.client.post(action, data={"current_password": PASSWORD, "new_password": "x" * 12,
                                               "new_password_again": "x" * 12})
        assert response.status_code == 403, action
        assert "without its security token (csrf_token)" in errors_of(response.get_data(as_text=True))[0]
    assert authenticate(token) is not None and Endpoint.get_by_id(endpoint.id).token_hash == hash_token(token)
    assert WebSession.select().count() == 1
    # Sign-in itself is protected too (login CSRF), and so are the admin's forms.
    assert app.test_client().post("/login", data={"email": ann.email, "password": PASSWORD}).status_code == 403
    a = browser(app).signed_in_as(admin.email)
    assert a.client.post("/admin/accounts", data={"email": "new@example.com", "password": "p" * 12}).status_code == 403
    assert not Account.select().where(Account.email == "new@example.com").exists()


def test_a_form_that_is_not_utf8_is_named_as_such_not_as_a_missing_token(app: Flask, ann: Account) -> None:
    b = browser(app)
    token = csrf_of(b.text("/login"))
    response = b.client.post("/login", data=f"csrf_token={token}&email=ann%40example.com&password=\xff".encode("latin-1"),
                             content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400 and response.mimetype == "text/html"
    assert "not UTF-8 text" in response.get_data(as_text=True)


def test_a_csrf_token_of_another_session_or_a_foreign_origin_is_refused(app: Flask, ann: Account,
                                                                        make_endpoint: Any) -> None:
    endpoint, token = own_endpoint(make_endpoint, ann)
    mine = browser(app).signed_in_as(ann.email)
    theirs = browser(app).signed_in_as(ann.email)
    foreign_token = csrf_of(theirs.text("/endpoints"))
    response = mine.client.post(f"/endpoints/{endpoint.id}/rotate", data={"csrf_token": foreign_token})
    assert response.status_code == 403 and "does not match your session" in response.get_data(as_text=True)
    own_token = csrf_of(mine.text("/endpoints"))
    response = mine.client.post(f"/endpoints/{endpoint.id}/rotate", data={"csrf_token": own_token},
                                headers={"Origin": "https://evil.example"})
    assert response.status_code == 403 and "sent from another site" in response.get_data(as_text=True)
    for garbled in ("http://[", "http://a]b"):  # not URLs at all: a 500 before
        response = mine.client.post(f"/endpoints/{endpoint.id}/rotate", data={"csrf_token": own_token},
                                    headers={"Origin": garbled})
        assert response.status_code == 403 and "sent from another site" in response.get_data(as_text=True)
    assert authenticate(token) is not None
    response = mine.client.post(f"/endpoints/{endpoint.id}/rotate", data={"csrf_token": own_token},
                                headers={"Origin": "http://localhost"})
    assert response.status_code == 200 and authenticate(token) is None


def test_behind_a_trusted_proxy_the_forms_work_and_cookies_are_secure(make_app: Callable[..., Flask],
                                                                      ann: Account) -> None:
    # Apache's mod_proxy by default: the daemon's own address as Host, the one the browser used in
    # X-Forwarded-Host; the browser's Origin names the latter.
    app = make_app(trust_proxy=True)
    proxy = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
             "X-Forwarded-Host": "calls.example.com"}
    client = app.test_client()
    page = client.get("/login", headers=proxy, base_url="http://127.0.0.1:8080").get_data(as_text=True)
    response = client.post("/login", headers={**proxy, "Origin": "https://calls.example.com"},
                           base_url="http://127.0.0.1:8080",
                           data={"email": ann.email, "password": PASSWORD, "csrf_token": csrf_of(page)})
    assert response.status_code == 303, errors_of(response.get_data(as_text=True))
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith("cb_session="))
    assert "Secure" in cookie and "HttpOnly" in cookie
    # Another site is still refused.
    response = client.post("/logout", headers={**proxy, "Origin": "https://evil.example"},
                           base_url="http://127.0.0.1:8080", data={"csrf_token": "x"})
    assert response.status_code == 403 and "sent from another site" in response.get_data(as_text=True)

# Tokens and ownership -----------------------------------------------------------------------------

def test_rotate_shows_the_new_token_once_and_never_again(app: Flask, ann: Account, make_endpoint: Any) -> None:
    endpoint, old = own_endpoint(make_endpoint, ann, name="acme")
    b = browser(app).signed_in_as(ann.email)
    listing = b.text("/endpoints")
    assert "acme" in listing and endpoint.token_hint in listing and old not in listing
    response = b.submit("/endpoints", f"/endpoints/{endpoint.id}/rotate")
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    page = response.get_data(as_text=True)
    new = re.search(r'id="new-token"[^>]*value="([^"]+)"', page)
    assert new is not None
    token = html.unescape(new.group(1))
    assert authenticate(token).id == endpoint.id and authenticate(old) is None
    assert "shown only this once" in page
    for path in ("/endpoints", "/calls", f"/admin/endpoints/{endpoint.id}"):
        assert token not in b.get(path).get_data(as_text=True)


def test_an_account_sees_only_its_endpoints_and_their_calls(app: Flask, ann: Account, bob: Account,
                                                            admin: Account, make_endpoint: Any,
                                                            tmp_path: Path) -> None:
    ann_ep, ann_token = own_endpoint(make_endpoint, ann, name="ann-endpoint")
    bob_ep, _ = own_endpoint(make_endpoint, bob, name="bob-endpoint")
    recording = tmp_path / "rec.wav"
    recording.write_bytes(b"RIFF....WAVE")
    call_row(ann_ep, "a" * 28, phone_a="15550009911", recording_path=str(recording))
    call_row(ann_ep, "c" * 28, status="scheduled", scheduled=True, due_at=NOW + dt.timedelta(days=1))
    call_row(bob_ep, "b" * 28, phone_a="15550009922")
    b = browser(app).signed_in_as(bob.email)
    assert "ann-endpoint" not in b.text("/endpoints") and "bob-endpoint" in b.text("/endpoints")
    calls = b.text("/calls")
    assert "15550009922" in calls and "15550009911" not in calls
    assert "c" * 28 not in b.text("/scheduled")
    for path in (f"/calls/{'a' * 28}", f"/calls/{'a' * 28}/recording", f"/calls/{'a' * 28}/recording?download=1"):
        assert b.get(path).status_code == 404, path
    # Someone else's call answers exactly like a call that does not exist.
    assert b.get(f"/calls/{'a' * 28}").get_data() == b.get(f"/calls/{'9' * 28}").get_data()
    assert b.submit("/endpoints", f"/endpoints/{ann_ep.id}/rotate").status_code == 404
    assert authenticate(ann_token) is not None
    assert b.get(f"/calls?endpoint={ann_ep.id}").status_code == 400
    assert b.get("/admin/endpoints").status_code == 403
    # The owner and an admin see it.
    for email in (ann.email, admin.email):
        viewer = browser(app).signed_in_as(email)
        assert "15550009911" in viewer.text("/calls")
        assert viewer.get(f"/calls/{'a' * 28}/recording").status_code == 200
    assert "15550009922" in browser(app).signed_in_as(admin.email).text("/calls")


def test_recording_plays_and_downloads_as_wav(app: Flask, ann: Account, make_endpoint: Any, tmp_path: Path) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann, record=True)
    path = tmp_path / "recordings" / "x.wav"
    path.parent.mkdir()
    path.write_bytes(b"RIFF" + bytes(4000))
    call_row(endpoint, "d" * 28, recording_path=str(path), recording_seconds=3.2, recording_bytes=4004)
    b = browser(app).signed_in_as(ann.email)
    page = b.text(f"/calls/{'d' * 28}")
    assert f'<audio id="recording" controls preload="metadata" src="/calls/{"d" * 28}/recording">' in page
    play = b.get(f"/calls/{'d' * 28}/recording", headers={"Range": "bytes=0-99"})
    assert play.status_code == 206 and play.mimetype == "audio/wav" and len(play.data) == 100
    download = b.get(f"/calls/{'d' * 28}/recording?download=1")
    assert download.status_code == 200
    assert download.headers["Content-Disposition"] == f"attachment; filename=call-{'d' * 28}.wav"


# The calls pages ----------------------------------------------------------------------------------

def test_calls_page_newest_first_with_the_apis_keyset_paging(app: Flask, ann: Account, make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann)
    bulk_calls(endpoint, 120)
    b = browser(app).signed_in_as(ann.email)
    seen: list[str] = []
    path = "/calls"
    for _ in range(5):
        page = b.text(path)
        ids = re.findall(r'<tr data-callid="([0-9a-z]+)">', page)
        seen += ids
        older = re.search(r'href="([^"]+)" rel="next">Older calls', page)
        if older is None:
            break
        path = html.unescape(older.group(1))
        cursor = re.search(r"cursor=([^&]+)", path)
        assert cursor is not None and decode_id_cursor(cursor.group(1))  # the API's own cursor
    assert len(seen) == 120 == len(set(seen))
    rows = {c.callid: c.id for c in Call.select()}
    assert [rows[c] for c in seen] == sorted(rows.values(), reverse=True)


def test_calls_filters_by_status_number_and_dates_with_the_apis_messages(app: Flask, ann: Account,
                                                                         make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann, timezone="Europe/Berlin")
    call_row(endpoint, "1" * 28, status="failed", phone_b="15550003777", failed_leg="b", b_cause="USER_BUSY",
             reason="B was not reached", requested_at=NOW - dt.timedelta(days=2))
    call_row(endpoint, "2" * 28, status="completed", phone_a="15550000888", requested_at=NOW)
    b = browser(app).signed_in_as(ann.email)
    failed = b.text("/calls?status=failed")
    assert "1" * 28 in failed and "2" * 28 not in failed
    assert "B was not reached: the line was busy" in failed
    by_number = b.text("/calls?number=0888")
    assert "2" * 28 in by_number and "1" * 28 not in by_number
    day = (NOW - dt.timedelta(days=2)).strftime("%Y-%m-%d")
    by_date = b.text(f"/calls?from={day}&to={day}")
    assert "1" * 28 in by_date and "2" * 28 not in by_date
    assert "Dates and times are in Europe/Berlin" in by_date
    for query, message in (("status=ringing", "status: unknown status"), ("from=yesterday", "from: must be"),
                           ("number=12a", "number: digits"), ("cursor=zzz", "cursor: not a cursor this API gave out")):
        response = b.get(f"/calls?{query}")
        assert response.status_code == 400, query
        assert errors_of(response.get_data(as_text=True))[0].startswith(message), query


def test_a_number_search_says_where_it_stopped_and_goes_on_from_there(
        app: Flask, ann: Account, make_endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page examines a share of the calls (the event loop moves calls meanwhile): one that found too
    little says so and links to the older calls; following it finds the match."""
    monkeypatch.setattr(search, "EXAMINED_PER_PAGE", 64)
    endpoint, _ = own_endpoint(make_endpoint, ann)
    call_row(endpoint, "1" * 28, phone_b="15550003777", requested_at=NOW - dt.timedelta(days=2))
    bulk_calls(endpoint, 150)
    b = browser(app).signed_in_as(ann.email)
    path, notes = "/calls?number=3777", []
    for _ in range(5):
        page = b.text(path)
        if "1" * 28 in page:
            break
        notes.append("None of the calls searched so far match these filters" in page)
        older = re.search(r'href="([^"]+)">search older calls', page)
        assert older is not None, page
        path = html.unescape(older.group(1))
    assert "1" * 28 in page and notes == [True, True]
    assert "search older calls" not in page and 'rel="next"' not in page  # nothing older left


def test_an_account_of_many_endpoints_sees_its_calls_page_by_page_and_only_its_own(
        app: Flask, ann: Account, bob: Account, make_endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reseller's account (an endpoint per customer): past ``MERGED_AT_MOST`` endpoints its calls are looked
    for among everyone's, a share a page; a page that found too few says so and goes on from there."""
    monkeypatch.setattr(search, "EXAMINED_PER_PAGE", 64)
    mine = [own_endpoint(make_endpoint, ann, timezone="Europe/Berlin")[0] for _ in range(search.MERGED_AT_MOST + 1)]
    theirs, _ = own_endpoint(make_endpoint, bob)
    ours = [call_row(mine[n % len(mine)], f"a{n:027d}", requested_at=NOW - dt.timedelta(minutes=300 - n))
            for n in range(3)]
    bulk_calls(theirs, 150)  # newer than ann's
    b = browser(app).signed_in_as(ann.email)
    path, notes, seen = "/calls", [], []
    for _ in range(10):
        page = b.text(path)
        seen += [callid for callid in re.findall(r"/calls/(a\d{27})", page) if callid not in seen]
        older = re.search(r'href="([^"]+)">search older calls', page)
        if older is None:
            break
        notes.append("None of the calls searched so far are your endpoints'" in page)
        path = html.unescape(older.group(1))
    assert seen == [call.callid for call in reversed(ours)] and notes == [True, True]
    assert page.count("<option value=") == len(mine) + 2 + len(CallStatus)  # ann's endpoints, statuses, "any"s
    assert "Europe/Berlin" in page  # all of ann's endpoints share a zone: the page's dates are in it


def test_the_endpoint_tables_come_a_page_at_a_time(app: Flask, ann: Account, admin: Account,
                                                  make_endpoint: Any) -> None:
    """A reseller's account has an endpoint per customer: 2,000 in one table held the event loop 120-270 ms
    a view. By name, a page at a time, the next page after the last name shown."""
    names = sorted(own_endpoint(make_endpoint, ann, name=f"shop-{n:03d}")[0].name
                   for n in range(queries.ENDPOINTS_PAGE + 20))
    for who, path in ((ann, "/endpoints"), (admin, "/admin/endpoints")):
        b = browser(app).signed_in_as(who.email)
        shown: list[str] = []
        pages = 0
        while path:
            page = b.text(path)
            pages += 1
            shown += re.findall(r'data-endpoint="([^"]+)"', page) or re.findall(r'>(shop-\d{3})</a></th>', page)
            more = re.search(r'href="([^"]+)" rel="next">More endpoints', page)
            path = html.unescape(more.group(1)) if more else ""
        assert shown == names and pages == 2, who.email
    assert browser(app).signed_in_as(ann.email).get("/endpoints?after=%00").status_code == 400


def test_call_page_tells_the_story_in_plain_words_and_local_time(app: Flask, ann: Account,
                                                                make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann, timezone="Europe/Berlin")
    call = call_row(endpoint, "e" * 28, status="failed", failed_leg="b", b_cause="USER_BUSY", a_cause="NORMAL_CLEARING",
                    reason="B was not reached", started_at=NOW, a_answered_at=NOW + dt.timedelta(seconds=2),
                    msg="Hello <script>alert(1)</script>", msg_lang="en-US", play_url="https://media.example/a.wav",
                    ended_at=NOW + dt.timedelta(seconds=9))
    add_event(call.id, "claimed", at=NOW)
    add_event(call.id, "bridge_ended", at=NOW + dt.timedelta(seconds=8), disposition="USER_BUSY",
              cause="USER_BUSY")
    b = browser(app).signed_in_as(ann.email)
    page = b.text(f"/calls/{'e' * 28}")
    assert "B was not reached: B — the line was busy (USER_BUSY)" in page
    assert "14:00:02 CEST" in page  # NOW is 12:00 UTC; Berlin is UTC+2 in June
    assert "Connection to B ended" in page and "cause: USER_BUSY (the line was busy)" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'data-live="0"' in page  # final: the page does not poll


def test_the_players_of_what_a_was_played_play_for_the_owner_and_no_one_else(
        app: Flask, ann: Account, bob: Account, make_endpoint: Any, tmp_path: Path) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann)
    files = {}
    for which, digit in (("play", "1"), ("msg", "2"), ("dialtone", "3")):
        path = tmp_path / f"{digit * 64}.wav"
        path.write_bytes(b"RIFF" + digit.encode() * 60)
        files[which] = path
    call_row(endpoint, "e" * 28, play_url="https://media.example/a.wav", msg="Hello", msg_lang="en-US",
             dialtone_url="https://media.example/tone.wav", play_file=str(files["play"]),
             msg_file=str(files["msg"]), dialtone_file=str(files["dialtone"]))
    b = browser(app).signed_in_as(ann.email)
    page = b.text(f"/calls/{'e' * 28}")
    sources = re.findall(r'<audio controls preload="none" src="([^"]+)"', page)
    assert len(sources) == 3
    for src, which in zip(sources, ("play", "msg", "dialtone"), strict=True):
        played = b.get(src)  # the browser's own request, as the page's player makes it
        assert played.status_code == 200, src
        assert played.mimetype == "audio/wav" and played.data == files[which].read_bytes()
        other = browser(app).signed_in_as(bob.email).get(src)
        assert other.status_code == 404 and files[which].read_bytes() not in other.data
        assert app.test_client().get(src).status_code == 303  # not signed in: to the sign-in page

def test_calls_in_progress_mark_the_page_live(app: Flask, ann: Account, make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann)
    call_row(endpoint, "f" * 28, status="bridged", started_at=NOW)
    b = browser(app).signed_in_as(ann.email)
    assert 'id="live" data-live="1"' in b.text("/calls")
    assert 'id="live" data-live="1"' in b.text(f"/calls/{'f' * 28}")
    Call.update(status="completed").execute()
    assert 'id="live" data-live="0"' in b.text("/calls")


# Accounts -----------------------------------------------------------------------------------------

def test_password_change_checks_the_old_one_and_signs_out_other_browsers(app: Flask, ann: Account) -> None:
    here = browser(app).signed_in_as(ann.email)
    elsewhere = browser(app).signed_in_as(ann.email)
    wrong = here.submit("/account", "/account", {"current_password": "nope nope nope", "new_password": "n" * 12,
                                                 "new_password_again": "n" * 12})
    assert wrong.status_code == 400 and errors_of(wrong.get_data(as_text=True))[0] == "current_password: wrong password"
    short = here.submit("/account", "/account", {"current_password": PASSWORD, "new_password": "short",
                                                 "new_password_again": "short"})
    assert "new_password: at least 10 characters" in errors_of(short.get_data(as_text=True))
    done = here.submit("/account", "/account", {"current_password": PASSWORD, "new_password": "a new passphrase",
                                                "new_password_again": "a new passphrase"})
    assert done.status_code == 303
    assert here.get("/calls").status_code == 200  # this browser got a fresh session
    assert elsewhere.get("/calls").status_code == 303  # the other one is signed out
    assert browser(app).login(ann.email, PASSWORD).status_code == 401
    assert browser(app).login(ann.email, "a new passphrase").status_code == 303


def test_guessing_the_current_password_on_the_account_page_is_limited_like_signing_in(
        make_app: Callable[..., Flask], ann: Account) -> None:
    """A session left open (a shared computer, a stolen cookie) must not become a way to guess the password
    without limit: wrong current passwords spend this browser's budget (it signed in: its device cookie),
    then the account's sign-in budget, like failed sign-ins."""
    app = make_app(portal_login_failures_per_account=3, portal_login_failures_per_address=50)
    here = browser(app).signed_in_as(ann.email)
    guess = {"current_password": "not it at all", "new_password": "n" * 12, "new_password_again": "n" * 12}
    for _ in range(3 + 3):
        assert here.submit("/account", "/account", guess).status_code == 400
    limited = here.submit("/account", "/account", {**guess, "current_password": PASSWORD})
    assert limited.status_code == 429
    assert errors_of(limited.get_data(as_text=True))[0].startswith("current_password: too many wrong passwords")
    assert browser(app).login(ann.email, PASSWORD).status_code == 429  # the same budget as signing in
    assert browser(app).login(ann.email, "n" * 12).status_code == 429  # and the password was not changed


def test_a_disabled_account_is_signed_out_and_cannot_sign_in(app: Flask, ann: Account) -> None:
    b = browser(app).signed_in_as(ann.email)
    users.set_enabled(Account.get_by_id(ann.id), False)
    assert b.get("/calls").status_code == 303
    assert browser(app).login(ann.email).status_code == 401


def test_registration_is_closed_by_default(app: Flask) -> None:
    response = app.test_client().get("/register")
    assert response.status_code == 404 and "python -m daemon user add" in response.get_data(as_text=True)
    assert "Create one" not in app.test_client().get("/login").get_data(as_text=True)


def test_registration_with_an_invite_code(make_app: Callable[..., Flask]) -> None:
    app = make_app(portal_registration=True, portal_invite_code="open sesame")
    b = browser(app)
    form = {"email": "new@example.com", "password": "long enough pw", "password_again": "long enough pw"}
    wrong = b.submit("/register", "/register", {**form, "invite_code": "guess"})
    assert wrong.status_code == 400 and "invite_code: wrong code" in errors_of(wrong.get_data(as_text=True))[0]
    assert not Account.select().exists()
    differ = b.submit("/register", "/register", {**form, "password_again": "other", "invite_code": "open sesame"})
    assert "password_again: the two passwords differ" in errors_of(differ.get_data(as_text=True))
    done = b.submit("/register", "/register", {**form, "invite_code": "open sesame"})
    assert done.status_code == 303 and b.get("/endpoints").status_code == 200
    account = Account.get(Account.email == "new@example.com")
    assert not account.is_admin and account.password_hash.startswith("$argon2id$")


def test_wrong_invite_codes_spend_the_addresss_budget_so_a_short_code_cannot_be_guessed(
        make_app: Callable[..., Flask]) -> None:
    app = make_app(portal_registration=True, portal_invite_code="4821", portal_login_failures_per_address=3)
    b = browser(app)
    form = {"email": "new@example.com", "password": "long enough pw", "password_again": "long enough pw"}
    for guess in ("0000", "0001", "0002"):
        assert b.submit("/register", "/register", {**form, "invite_code": guess}).status_code == 400
    limited = b.submit("/register", "/register", {**form, "invite_code": "4821"})
    assert limited.status_code == 429
    assert errors_of(limited.get_data(as_text=True))[0].startswith("Too many wrong invite codes")
    assert not Account.select().exists()
    # Signing in from that address is held back too (one budget per address), and nothing else is.
    assert browser(make_app(portal_registration=True, portal_invite_code="4821")).submit(
        "/register", "/register", {**form, "invite_code": "4821"}).status_code == 303


# Admin --------------------------------------------------------------------------------------------

def test_admin_creates_an_endpoint_for_an_account_and_sees_its_token_once(app: Flask, admin: Account,
                                                                          ann: Account) -> None:
    a = browser(app).signed_in_as(admin.email)
    form = {"name": "clinic", "caller_id_number": "15551230000", "caller_id_name": "Front desk",
            "dial_string": "sofia/gateway/carrier/{number}", "timezone": "America/New_York", "record": "on",
            "max_in_flight": "3", "calls_per_second": "1.5", "daily_cap": "200", "max_duration": "600",
            "allowed_prefixes": "1555", "extension_pattern": "", "ring_tone": "%(2000,4000,440,480)",
            "webhook_url": "", "owner": ann.email}
    bad = a.submit("/admin/endpoints", "/admin/endpoints", {**form, "caller_id_number": "12ab"})
    assert bad.status_code == 400
    assert errors_of(bad.get_data(as_text=True))[0] == "caller_id_number: digits with an optional leading +, at most 20"
    assert 'value="Front desk"' in bad.get_data(as_text=True)  # what was typed stays in the form
    response = a.submit("/admin/endpoints", "/admin/endpoints", form)
    assert response.status_code == 200
    token = html.unescape(re.search(r'id="new-token"[^>]*value="([^"]+)"', response.get_data(as_text=True)).group(1))
    endpoint = authenticate(token)
    assert endpoint is not None and endpoint.owner_id == ann.id and endpoint.record
    assert (endpoint.max_in_flight, endpoint.calls_per_second, endpoint.timezone) == (3, 1.5, "America/New_York")
    assert token not in a.text("/admin/endpoints")
    assert "clinic" in browser(app).signed_in_as(ann.email).text("/endpoints")


def test_a_webhook_url_set_by_an_edit_shows_its_new_signing_secret_once(app: Flask, admin: Account, ann: Account,
                                                                        make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann, name="acme")
    assert endpoint.webhook_secret == ""
    a = browser(app).signed_in_as(admin.email)
    page = f"/admin/endpoints/{endpoint.id}"
    form = {"name": "acme", "caller_id_number": "15551230000", "dial_string": "sofia/gateway/carrier/{number}",
            "webhook_url": "https://hooks.example/callbridge", "owner": ann.email}
    response = a.submit(page, page, form)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    secret = Endpoint.get_by_id(endpoint.id).webhook_secret
    shown = re.search(r'id="webhook-secret"[^>]*value="([^"]+)"', response.get_data(as_text=True))
    assert secret and shown is not None and html.unescape(shown.group(1)) == secret
    # Shown that once: a later save keeps the secret and does not show it again.
    again = a.submit(page, page, {**form, "max_in_flight": "3"})
    assert again.status_code == 303 and Endpoint.get_by_id(endpoint.id).webhook_secret == secret
    for path in (page, "/admin/endpoints", "/endpoints"):
        assert secret not in a.text(path)

@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_in_flight", "99999999999999999999", "max_in_flight: at most 2147483647"),
    ("daily_cap", "2147483648", "daily_cap: at most 2147483647"),
    ("name", "acme\x00", "name: no control characters (line breaks, tabs, NUL ...)"),
    ("extension_pattern", "^1\x00$", "extension_pattern: no control characters (line breaks, tabs, NUL ...)"),
    ("webhook_url", "https://hooks.example/" + "a" * 500, "webhook_url: at most 500 characters"),
    ("owner", "ann@example.com\x00", "owner: no account 'ann@example.com\\x00'; create it on the Accounts page first"),
])
def test_admin_endpoint_form_names_a_value_the_store_cannot_hold_never_a_500(
        app: Flask, admin: Account, ann: Account, make_endpoint: Any, field: str, value: str, message: str) -> None:
    endpoint, token = own_endpoint(make_endpoint, ann, name="acme")
    a = browser(app).signed_in_as(admin.email)
    form = {"name": "acme", "caller_id_number": "15551230000", "dial_string": "sofia/gateway/carrier/{number}",
            "owner": ann.email, field: value}
    page = f"/admin/endpoints/{endpoint.id}"
    for action in (page, "/admin/endpoints"):  # edit, and create
        response = a.submit(page, action, {**form, "name": "other"} if action != page and field != "name" else form)
        assert response.status_code == 400, action
        body = response.get_data(as_text=True)
        assert errors_of(body)[0] == message
        assert f'<p class="field-error" id="e-{field}">' in body or field == "owner"  # (a select: marked invalid)
    assert Endpoint.select().count() == 1 and Endpoint.get_by_id(endpoint.id).max_in_flight == 10

def test_admin_edits_limits_reassigns_and_disables(app: Flask, admin: Account, ann: Account, bob: Account,
                                                   make_endpoint: Any) -> None:
    endpoint, token = own_endpoint(make_endpoint, ann, name="acme")
    a = browser(app).signed_in_as(admin.email)
    page = f"/admin/endpoints/{endpoint.id}"
    form = {"name": "acme", "caller_id_number": "15551230000", "caller_id_name": "",
            "dial_string": "sofia/gateway/carrier/{number}", "timezone": "UTC", "max_in_flight": "0",
            "calls_per_second": "5", "daily_cap": "10", "max_duration": "3600", "allowed_prefixes": "",
            "extension_pattern": "", "ring_tone": "%(2000,4000,440,480)", "webhook_url": "", "owner": bob.email}
    bad = a.submit(page, page, form)
    assert bad.status_code == 400 and errors_of(bad.get_data(as_text=True))[0].startswith("max_in_flight: ")
    assert a.submit(page, page, {**form, "max_in_flight": "many"}).status_code == 400
    saved = a.submit(page, page, {**form, "max_in_flight": "4"})
    assert saved.status_code == 303
    fresh = Endpoint.get_by_id(endpoint.id)
    assert (fresh.max_in_flight, fresh.daily_cap, fresh.owner_id) == (4, 10, bob.id)
    assert fresh.token_hash == hash_token(token)  # editing keeps the token
    assert a.submit("/admin/endpoints", f"/admin/endpoints/{endpoint.id}/disable").status_code == 303
    assert authenticate(token) is None


def test_admin_endpoint_forms_lacking_fields_name_them_or_keep_what_is_stored(app: Flask, admin: Account,
                                                                              ann: Account, make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann, name="acme", record=True)
    a = browser(app).signed_in_as(admin.email)
    # A new endpoint's form without a required field: the field named, not a 500.
    for missing in ("name", "caller_id_number", "dial_string"):
        form = {"name": "clinic", "caller_id_number": "15551230000", "dial_string": "sofia/gateway/carrier/{number}"}
        del form[missing]
        response = a.submit("/admin/endpoints", "/admin/endpoints", form)
        assert response.status_code == 400, missing
        assert errors_of(response.get_data(as_text=True))[0].startswith(f"{missing}: "), missing
    assert Endpoint.select().count() == 1
    # An edit that sends only one field changes that field: the owner and the recording stay.
    page = f"/admin/endpoints/{endpoint.id}"
    assert a.submit(page, page, {"max_in_flight": "20"}).status_code == 303
    fresh = Endpoint.get_by_id(endpoint.id)
    assert (fresh.max_in_flight, fresh.owner_id, fresh.record, fresh.name) == (20, ann.id, True, "acme")
    # The page's own form (its checkbox unticked is not sent at all) still turns recording off.
    form_page = a.text(page)
    assert 'name="record_shown"' in form_page
    assert a.submit(page, page, {"record_shown": "1", "owner": ann.email}).status_code == 303
    assert Endpoint.get_by_id(endpoint.id).record is False


def test_an_admin_who_sets_their_own_password_stays_signed_in_here_only(app: Flask, admin: Account) -> None:
    here = browser(app).signed_in_as(admin.email)
    elsewhere = browser(app).signed_in_as(admin.email)
    done = here.submit("/admin/accounts", f"/admin/accounts/{admin.id}/password", {"password": "a new passphrase"})
    assert done.status_code == 303 and done.headers["Location"] == "/admin/accounts?notice=saved"
    assert here.get("/admin/accounts").status_code == 200
    assert elsewhere.get("/admin/accounts").status_code == 303  # signed out, like every other session
    assert browser(app).login(admin.email, "a new passphrase").status_code == 303


def test_a_method_a_page_does_not_take_answers_with_a_page_and_the_api_with_its_envelope(
        app: Flask, ann: Account) -> None:
    b = browser(app).signed_in_as(ann.email)
    for method, path, allowed in (("GET", "/logout", {"POST"}), ("PUT", "/calls/new", {"GET", "POST"})):
        response = b.client.open(path, method=method)
        assert response.status_code == 405 and response.mimetype == "text/html", path
        assert f"This page does not take {method} requests." in response.get_data(as_text=True)
        assert allowed <= set(response.headers["Allow"].split(", ")) and method not in response.headers["Allow"]
        assert response.headers["Content-Security-Policy"] == CSP
        assert 'href="/calls"' in response.get_data(as_text=True)  # the signed-in header
    api = b.client.put("/v1/calls")
    assert api.status_code == 405 and api.get_json()["data"]["code"] == 405


def test_admin_accounts_page_creates_and_disables_accounts(app: Flask, admin: Account) -> None:
    a = browser(app).signed_in_as(admin.email)
    bad = a.submit("/admin/accounts", "/admin/accounts", {"email": "not-an-email", "password": "p" * 12})
    assert errors_of(bad.get_data(as_text=True))[0] == "email: must be an address such as name@example.com"
    assert a.submit("/admin/accounts", "/admin/accounts", {"email": "cat@example.com", "password": "p" * 12}).status_code == 303
    cat = Account.get(Account.email == "cat@example.com")
    session = browser(app).signed_in_as(cat.email, "p" * 12)
    assert a.submit("/admin/accounts", f"/admin/accounts/{cat.id}/disable").status_code == 303
    assert session.get("/calls").status_code == 303
    assert a.submit("/admin/accounts", f"/admin/accounts/{admin.id}/disable").status_code == 409


def test_admin_pages_are_for_admins_only(app: Flask, ann: Account) -> None:
    b = browser(app).signed_in_as(ann.email)
    for path in ("/admin/endpoints", "/admin/live", "/admin/accounts"):
        response = b.get(path)
        assert response.status_code == 403 and "for administrators" in response.get_data(as_text=True), path


def test_admin_live_page_shows_the_oldest_calls_in_progress_a_page_at_a_time(
        app: Flask, admin: Account, make_endpoint: Any) -> None:
    """It reads itself again every second while open: with thousands of calls in progress it shows the
    phases' counts and a page of them, oldest first (those most likely stuck), not every one."""
    endpoint, _ = make_endpoint()
    phases = ["bridged"] * 110 + ["dialing_b"] * 10 + ["completed"] * 5
    for n, status in enumerate(phases):
        call_row(endpoint, f"{n:028x}", status=status, started_at=NOW + dt.timedelta(seconds=n % 60, minutes=n // 60))
    a = browser(app).signed_in_as(admin.email)
    first = a.text("/admin/live")
    assert "120 in progress" in first and "Oldest first, 100 on this page" in first
    assert 'data-status="bridged">A and B are talking</span>&nbsp;110' in first
    assert 'data-status="dialing_b">Calling B (A hears the dial tone)</span>&nbsp;10' in first
    assert 'data-status="dialing_a"' not in first  # (no call in that phase)
    shown = re.findall(r'<tr data-callid="([0-9a-f]+)">', first)
    later = re.search(r'href="([^"]+)" rel="next">Later-started calls', first)
    assert later is not None
    rest = a.text(html.unescape(later.group(1)))
    shown += re.findall(r'<tr data-callid="([0-9a-f]+)">', rest)
    assert shown == [f"{n:028x}" for n in range(120)] and 'rel="next"' not in rest
    assert a.get("/admin/live?cursor=zzz").status_code == 400


def test_admin_hang_up_of_a_call_not_in_progress_says_so(app: Flask, admin: Account, make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    call_row(endpoint, "7" * 28, status="completed")
    a = browser(app).signed_in_as(admin.email)
    response = a.submit("/admin/live", f"/admin/calls/{'7' * 28}/hangup")
    assert response.status_code == 409 and "not in progress (status completed)" in response.get_data(as_text=True)


# The pages as shipped -----------------------------------------------------------------------------

TEMPLATES = Path(__file__).resolve().parent.parent / "webapi" / "portal" / "templates" / "portal"


def test_templates_hold_no_inline_script_style_or_handlers() -> None:
    """The Content-Security-Policy forbids inline code: a template that had any would break in browsers."""
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text()
        assert "<script" not in text or template.name == "base.html", template.name
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert not re.search(r"\son[a-z]+\s*=", text), template.name
        assert " style=" not in text and "<style" not in text, template.name
        assert not re.search(r"""(src|href|action)=["']?(https?:)?//""", text), template.name  # nothing from elsewhere


def test_static_files_are_served_and_listed_as_package_data(app: Flask) -> None:
    import tomllib

    for name, mimetype in (("portal.css", "text/css"), ("portal.js", "text/javascript")):
        response = app.test_client().get(f"/portal-static/{name}")
        assert response.status_code == 200 and response.mimetype == mimetype
    pyproject = tomllib.loads((TEMPLATES.parents[3] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["webapi.portal"]
    package = TEMPLATES.parents[1]
    for pattern in shipped:
        assert list(package.glob(pattern)), pattern
    every = {str(p.relative_to(package)) for p in package.rglob("*") if p.is_file() and p.suffix in (".html", ".css", ".js")}
    assert every <= {str(p.relative_to(package)) for pattern in shipped for p in package.glob(pattern)}


def test_api_answers_stay_json_and_pages_stay_out_of_the_openapi_routes(client: FlaskClient) -> None:
    response = client.get("/v1/calls")
    assert response.status_code == 401 and response.mimetype == "application/json"


# Placing and canceling --------------------------------------------------------------------------

PLACE = {"phone_a": "15550001001", "phone_b": "15550002002", "call_date": "", "play_url": "", "msg": "",
         "msg_lang": "", "dialtone_url": ""}


@pytest.mark.parametrize("fields", [
    {"phone_b": "12"}, {"phone_a": ""}, {"call_date": "tomorrow"}, {"call_date": "2020-01-01 10:00"},
    {"play_url": "ftp://example.com/a.wav"}, {"msg": "Hello"}, {"msg": "Hi", "msg_lang": "xx-XX"},
    {"dialtone_url": "http://exa mple.com/"},
])
def test_the_form_refuses_what_the_api_refuses_with_the_same_words(app: Flask, client: FlaskClient, ann: Account,
                                                                   make_endpoint: Any, fields: dict[str, str]) -> None:
    endpoint, token = own_endpoint(make_endpoint, ann)
    api = client.post("/v1/calls", data={**PLACE, **fields, "token": token})
    assert api.status_code == 400
    expected = api.get_json()["data"]["code_desc"]
    b = browser(app).signed_in_as(ann.email)
    response = b.submit("/calls/new", "/calls/new", {**PLACE, **fields, "endpoint": str(endpoint.id)})
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    field = expected.split(":")[0]
    assert errors_of(page)[0] == expected and f'<p class="field-error" id="e-{field}">' in page
    assert not Call.select().exists()


def test_the_form_offers_the_enabled_endpoints_with_their_caller_id_and_zone(app: Flask, ann: Account, bob: Account,
                                                                             make_endpoint: Any) -> None:
    own_endpoint(make_endpoint, ann, name="recorded", timezone="Europe/Berlin", record=True)
    off, _ = own_endpoint(make_endpoint, ann, name="switched-off")
    off.enabled = False
    off.save()
    own_endpoint(make_endpoint, bob, name="bobs")
    page = browser(app).signed_in_as(ann.email).text("/calls/new")
    offered = re.findall(r'<option value="\d+"[^>]*>([^<]+)</option>', page)
    assert offered == ["recorded — caller ID 15550000000, Europe/Berlin, recorded"]


def test_the_form_places_a_call_once_even_when_sent_twice(app: Flask, ann: Account, make_endpoint: Any,
                                                          dispatcher: FakeDispatcher) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann, timezone="Europe/Berlin")
    b = browser(app).signed_in_as(ann.email)
    page = b.text("/calls/new")
    form = {**PLACE, "endpoint": str(endpoint.id), "msg": "Hello", "msg_lang": "en-GB",
            "call_date": "2026-06-16 09:30", "csrf_token": csrf_of(page),
            "form_id": re.search(r'name="form_id" value="([^"]+)"', page).group(1)}
    first = b.client.post("/calls/new", data=form)
    again = b.client.post("/calls/new", data=form)  # a double click or a reload of the POST
    assert first.status_code == again.status_code == 303
    assert first.headers["Location"] == again.headers["Location"]
    call = Call.get()
    assert first.headers["Location"] == f"/calls/{call.callid}" and Call.select().count() == 1
    assert (call.status, call.scheduled, call.msg_lang) == ("scheduled", True, "en-GB")
    assert call.due_at == dt.datetime(2026, 6, 16, 7, 30)  # 09:30 in Berlin (summer time) is 07:30 UTC
    assert call.msg_file and dispatcher.wakes == 0  # due tomorrow: the dispatcher's own looks find it


def test_a_form_brought_back_changed_after_it_placed_a_call_gets_a_new_form_id(app: Flask, ann: Account,
                                                                               make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann)
    b = browser(app).signed_in_as(ann.email)
    page = b.text("/calls/new")
    form = {**PLACE, "endpoint": str(endpoint.id), "csrf_token": csrf_of(page),
            "form_id": re.search(r'name="form_id" value="([^"]+)"', page).group(1)}
    assert b.client.post("/calls/new", data=form).status_code == 303
    # The browser's Back button restores the form, its form_id too; B is changed and the form sent.
    changed = b.client.post("/calls/new", data={**form, "phone_b": "15550002999"})
    assert changed.status_code == 422
    body = changed.get_data(as_text=True)
    assert errors_of(body)[0].startswith("form_id: this form already placed a call")
    fresh = re.search(r'name="form_id" value="([^"]+)"', body).group(1)
    assert fresh != form["form_id"] and 'value="15550002999"' in body  # what was typed stays
    again = b.client.post("/calls/new", data={**form, "phone_b": "15550002999", "form_id": fresh})
    assert again.status_code == 303
    assert sorted(c.phone_b for c in Call.select()) == ["15550002002", "15550002999"]


@pytest.mark.parametrize("form_id", ["\x00", "a" * 65, "id with spaces", "é"])
def test_a_form_id_the_page_never_gave_is_refused_by_name_not_a_500(app: Flask, ann: Account, make_endpoint: Any,
                                                                     form_id: str) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann)
    b = browser(app).signed_in_as(ann.email)
    response = b.submit("/calls/new", "/calls/new", {**PLACE, "endpoint": str(endpoint.id), "form_id": form_id})
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert errors_of(page)[0].startswith("form_id: ")
    assert not Call.select().exists()
    fresh = re.search(r'name="form_id" value="([^"]+)"', page).group(1)  # the form sent again places the call
    again = b.submit("/calls/new", "/calls/new", {**PLACE, "endpoint": str(endpoint.id), "form_id": fresh})
    assert again.status_code == 303 and Call.select().count() == 1

def test_only_ones_own_enabled_endpoints_place_calls(app: Flask, ann: Account, bob: Account,
                                                     make_endpoint: Any) -> None:
    theirs, _ = own_endpoint(make_endpoint, bob, name="bobs")
    off, _ = own_endpoint(make_endpoint, ann, name="off")
    off.enabled = False
    off.save()
    b = browser(app).signed_in_as(ann.email)
    assert "None of your endpoints can place calls" in b.text("/calls/new")
    for endpoint in (theirs, off):
        response = b.submit("/calls/new", "/calls/new", {**PLACE, "endpoint": str(endpoint.id)})
        assert errors_of(response.get_data(as_text=True))[0] == "endpoint: choose one of your enabled endpoints"
    assert not Call.select().exists()


def test_cancel_from_the_pages_uses_the_apis_cancel(app: Flask, ann: Account, bob: Account,
                                                    make_endpoint: Any) -> None:
    endpoint, _ = own_endpoint(make_endpoint, ann)
    call_row(endpoint, "5" * 28, status="scheduled", scheduled=True, due_at=NOW + dt.timedelta(days=1))
    call_row(endpoint, "6" * 28, status="completed")
    intruder = browser(app).signed_in_as(bob.email)
    assert intruder.submit("/calls", f"/calls/{'5' * 28}/cancel").status_code == 404
    b = browser(app).signed_in_as(ann.email)
    assert 'data-callid="' + "5" * 28 in b.text("/scheduled")
    done = b.submit("/scheduled", f"/calls/{'5' * 28}/cancel", {"back": "/scheduled"})
    assert done.status_code == 303 and done.headers["Location"] == "/scheduled?notice=canceled"
    canceled = Call.get(Call.callid == "5" * 28)
    assert canceled.status == "canceled" and canceled.reason == "canceled through the web pages (ann@example.com)"
    assert 'data-callid="' + "5" * 28 not in b.text("/scheduled")
    late = b.submit("/calls", f"/calls/{'6' * 28}/cancel")
    assert late.status_code == 409
    assert "can no longer be canceled: the call is already final (status completed)" in late.get_data(as_text=True)
