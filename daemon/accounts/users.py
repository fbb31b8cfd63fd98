"""Web accounts: who may sign in to the pages, their passwords, and their signed-in sessions.

Passwords are hashed with argon2id (``argon2-cffi``'s defaults, RFC 9106's low-memory profile: 64 MiB,
3 passes, 4 lanes), a memory-hard function that makes each guess against a stolen database cost real
memory and time. The parameters live inside each hash, so a hash made with older parameters still
verifies and is replaced at the next sign-in (``needs_rehash``).

A session is a random key: the browser's cookie holds it (signed by the web layer), the store keeps only
its SHA-256, so a copy of the database opens no session. Sessions end at their expiry, at sign-out, and
all of an account's at once when its password changes or it is disabled.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import re
import secrets
import unicodedata
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import gevent
import gevent.lock
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from peewee import IntegrityError

from daemon.store import Account, WebSession, utcnow
from daemon.writer import write

PASSWORD_MIN = 10
PASSWORD_MAX = 1024
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,189}$")

HASHER = PasswordHasher()
T = TypeVar("T")
_GATES: weakref.WeakKeyDictionary[Any, gevent.lock.BoundedSemaphore] = weakref.WeakKeyDictionary()


def _off_loop(fn: Callable[..., T], *args: Any) -> T:
    """Run a slow argon2 call in a native thread (argon2 releases the GIL), so the gevent loop (ESL events,
    other requests) keeps running: inline, a hash stalls the loop for its whole quarter second. At most two
    at once per loop, as each takes 64 MiB."""
    hub = gevent.get_hub()
    gate = _GATES.get(hub)
    if gate is None:
        gate = _GATES[hub] = gevent.lock.BoundedSemaphore(2)
    with gate:
        result: T = hub.threadpool.apply(fn, args)
        return result


@functools.cache
def _dummy_hash() -> str:
    """Verified when the email matches no account, so a wrong email costs the time of a wrong password."""
    return hash_password(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A wrong value for an account; the message names the field and the rule."""


def normalise_email(raw: str) -> str:
    """The email as accounts are keyed: trimmed, lower-case; AccountError when it cannot be an address."""
    email = unicodedata.normalize("NFC", raw.strip()).lower()
    if len(email) > 254 or not EMAIL_RE.fullmatch(email) or "." not in email.rsplit("@", 1)[1] \
            or has_control(email):  # (PostgreSQL refuses a NUL)
        raise AccountError("email: must be an address such as name@example.com")
    return email


def has_control(value: str) -> bool:
    """Control characters (NUL, line breaks, escapes) or lone surrogates: no name or address holds one."""
    return any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value)


def check_password(password: str, email: str = "") -> None:
    """The password rule: 10 to 1024 characters, not the email address itself."""
    if len(password) < PASSWORD_MIN:
        raise AccountError(f"password: at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise AccountError(f"password: at most {PASSWORD_MAX} characters")
    if any(unicodedata.category(ch) == "Cc" for ch in password):
        raise AccountError("password: no control characters (line breaks, tabs ...)")
    if email and password.strip().lower() == email:
        raise AccountError("password: must not be the email address")


def hash_password(password: str) -> str:
    return _off_loop(HASHER.hash, password)


def _verify(stored_hash: str, password: str) -> bool:
    try:
        return HASHER.verify(stored_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def password_matches(stored_hash: str, password: str) -> bool:
    return _off_loop(_verify, stored_hash, password)


def create_account(email: str, password: str, *, is_admin: bool = False) -> Account:
    email = normalise_email(email)
    check_password(password, email)
    if Account.select().where(Account.email == email).exists():
        raise AccountError(f"email: an account for {email} already exists")
    password_hash = hash_password(password)
    try:
        return write(lambda: Account.create(email=email, password_hash=password_hash, is_admin=is_admin))
    except IntegrityError:  # made meanwhile (two registrations at once; the hashing takes a while)
        raise AccountError(f"email: an account for {email} already exists") from None


def find_account(email: str) -> Account:
    try:
        wanted = normalise_email(email)
    except AccountError:
        wanted = email  # (an account made before a rule refused its address can still be found)
    # PostgreSQL refuses a NUL in a query, and no stored address holds one.
    account = Account.get_or_none(Account.email == wanted) if "\x00" not in wanted else None
    if account is None:
        raise AccountError(f"account {email!r}: no such account")
    return account


def set_password(account: Account, password: str) -> None:
    """Change the password; every session of the account ends (a stolen session dies with the old password)."""
    check_password(password, account.email)
    account.password_hash = hash_password(password)
    account.password_changed_at = utcnow()
    write(account.save)
    end_all_sessions(account)


def set_enabled(account: Account, enabled: bool) -> None:
    account.enabled = enabled
    account.disabled_at = None if enabled else utcnow()
    write(account.save)
    if not enabled:
        end_all_sessions(account)


def set_admin(account: Account, is_admin: bool) -> None:
    account.is_admin = is_admin
    write(account.save)


def authenticate(email: str, password: str) -> Account | None:
    """The enabled account with this email and password, or None. Takes the same time either way.

    Slow on purpose (argon2: a quarter of a second on a small machine); the web layer runs it off the
    event loop. A hash made with older parameters is upgraded here.
    """
    try:
        wanted = normalise_email(email)
    except AccountError:
        wanted = ""
    account = Account.get_or_none(Account.email == wanted) if wanted else None
    if account is None or len(password) > PASSWORD_MAX:
        password_matches(_dummy_hash(), password[:PASSWORD_MAX])
        return None
    if not password_matches(account.password_hash, password) or not account.enabled:
        return None
    if HASHER.check_needs_rehash(account.password_hash):
        account.password_hash = hash_password(password)
    account.last_login_at = utcnow()
    write(account.save)
    return account


# Sessions ----------------------------------------------------------------------------------------

def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def start_session(account: Account, lifetime: dt.timedelta, address: str = "",
                  now: dt.datetime | None = None) -> str:
    """Open a session; return its key (the only time it exists in clear). Expired rows are swept here."""
    now = now or utcnow()
    key = secrets.token_urlsafe(32)

    def store() -> None:
        WebSession.delete().where(WebSession.expires_at <= now).execute()
        WebSession.create(key_hash=_key_hash(key), account=account.id, created_at=now, expires_at=now + lifetime,
                          address=address[:64])

    write(store)
    return key


def session_account(key: str, now: dt.datetime | None = None) -> tuple[WebSession, Account] | None:
    """The live session for ``key`` and its enabled account, or None."""
    if not key or len(key) > 100:
        return None
    session = WebSession.get_or_none(WebSession.key_hash == _key_hash(key))
    if session is None or session.expires_at <= (now or utcnow()):
        return None
    account = Account.get_or_none(Account.id == session.account_id)
    if account is None or not account.enabled:
        return None
    return session, account


def end_session(key: str) -> None:
    write(WebSession.delete().where(WebSession.key_hash == _key_hash(key)).execute)


def end_all_sessions(account: Account) -> int:
    return int(write(WebSession.delete().where(WebSession.account == account.id).execute))


def describe(account: Account) -> dict[str, Any]:
    """An account as the CLI and the admin page show it (never the hash)."""
    from daemon.store import Endpoint

    return {
        "id": account.id,
        "email": account.email,
        "admin": account.is_admin,
        "enabled": account.enabled,
        "endpoints": [e.name for e in Endpoint.select(Endpoint.name).where(Endpoint.owner == account.id)
                      .order_by(Endpoint.name)],
        "created_at": account.created_at.isoformat() + "Z",
        "last_login_at": account.last_login_at.isoformat() + "Z" if account.last_login_at else None,
    }
