"""Sign-in state, CSRF protection, sign-in rate limits and security headers of the web pages.

* The session cookie (``cb_session``) holds the session's random key signed with the portal's secret key
  (itsdangerous, with its age): HttpOnly (no script reads it), SameSite=Lax (no cross-site POST carries
  it), Secure over HTTPS. The key is looked up in the store on each request (``WebSession``), so sign-out,
  a password change or a disabled account end it at once.
* Every form carries a CSRF token: an HMAC under the secret key of the session key (signed in) or of the
  ``cb_anon`` cookie (the sign-in and registration forms). A POST without the right token, or whose
  ``Origin`` header names another site, is refused (403) before anything happens.
* Failed sign-ins are counted per account (the email tried, existing or not) and per client address in
  a 15-minute window; at the limit, sign-ins are refused without checking the password. A browser that
  signed in to an account before holds a device cookie (``cb_device``, signed, naming the account by an
  HMAC of its email): its attempts on that account spend a budget of its own instead of the account's,
  so somebody guessing from elsewhere cannot lock the account's owner out (OWASP's "device cookies").
  Once that browser's own budget is spent, its attempts count against the account like anyone's.
* Every page answers with a strict Content-Security-Policy (scripts, styles and media from this server
  only; no inline script, no framing), ``nosniff``, ``Referrer-Policy`` and ``Cache-Control: no-store``.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from flask import Request, Response, request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from daemon.accounts import users
from daemon.config import ConfigError, Settings
from daemon.store import Account
from webapi.ratelimit import AuthFailureLimiter

SESSION_COOKIE = "cb_session"
ANON_COOKIE = "cb_anon"
DEVICE_COOKIE = "cb_device"
DEVICE_DAYS = 180  # a browser that has not signed in for this long is a stranger again
CSRF_FIELD = "csrf_token"
LOGIN_WINDOW = 15 * 60.0  # seconds over which failed sign-ins are counted

CSP = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "media-src 'self'",
    "connect-src 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class Forbidden(Exception):
    """A request the pages refuse (CSRF, foreign origin); the text says what to do."""


def load_secret_key(settings: Settings) -> bytes:
    """The portal's secret key: read from its file, or made (32 random bytes, mode 0600) at the first start."""
    path: Path = settings.portal_secret_key_path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"portal_secret_key_file: cannot create {path}: {exc.strerror}") from None
    else:
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
    try:
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"portal_secret_key_file: cannot read {path}: {exc.strerror}") from None
    if len(key) < 32:
        raise ConfigError(f"portal_secret_key_file: {path} holds fewer than 32 characters; "
                          "delete it to have a new key made")
    return key.encode()


@dataclass
class Signed:
    """The current visitor as the cookies say: the account and session key when signed in."""

    account: Account | None
    session_key: str | None
    anon: str | None  # the cb_anon value, for forms shown before sign-in
    new_anon: bool = False  # a cb_anon cookie must be set on the answer


class PortalSecurity:
    """Cookies, sessions, CSRF and sign-in limits for one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.secret = load_secret_key(settings)
        self.lifetime = dt.timedelta(hours=settings.portal_session_hours)
        self.session_signer = URLSafeTimedSerializer(self.secret, salt="callbridge.portal.session")
        self.anon_signer = URLSafeTimedSerializer(self.secret, salt="callbridge.portal.anon")
        self.account_limiter = AuthFailureLimiter(settings.portal_login_failures_per_account, LOGIN_WINDOW)
        self.address_limiter = AuthFailureLimiter(settings.portal_login_failures_per_address, LOGIN_WINDOW)
        self.device_signer = URLSafeTimedSerializer(self.secret, salt="callbridge.portal.device")
        self.device_limiter = AuthFailureLimiter(settings.portal_login_failures_per_account, LOGIN_WINDOW)

    # Who is asking ------------------------------------------------------------------------------

    def load(self, req: Request, now: dt.datetime) -> Signed:
        """Read the cookies of ``req``: the signed-in account (if its session is alive) and the anon id."""
        account = key = anon = None
        raw = req.cookies.get(SESSION_COOKIE)
        if raw:
            try:
                key = self.session_signer.loads(raw, max_age=int(self.lifetime.total_seconds()))
            except BadSignature:
                key = None
            found = users.session_account(key, now) if isinstance(key, str) else None
            if found is not None:
                account = found[1]
            else:
                key = None
        raw_anon = req.cookies.get(ANON_COOKIE)
        if raw_anon:
            try:
                anon = self.anon_signer.loads(raw_anon, max_age=7 * 86400)
            except BadSignature:
                anon = None
        return Signed(account=account, session_key=key, anon=anon if isinstance(anon, str) else None)

    def ensure_anon(self, signed: Signed) -> None:
        """Give a visitor without a session an anon id, so the sign-in form can carry a CSRF token."""
        if signed.session_key is None and signed.anon is None:
            signed.anon = secrets.token_urlsafe(24)
            signed.new_anon = True

    # CSRF ---------------------------------------------------------------------------------------

    def csrf_token(self, signed: Signed) -> str:
        seed = signed.session_key or signed.anon
        if seed is None:
            return ""
        mac = hmac.new(self.secret, b"csrf|" + seed.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def check_post(self, req: Request, signed: Signed) -> None:
        """Refuse a form post that does not come from one of our own pages."""
        origin = req.headers.get("Origin")
        if origin is not None and (origin == "null" or _netloc(origin) != req.host.lower()):
            raise Forbidden("This form was sent from another site. Open the page on this server and send it "
                            "from there.")
        sent = req.form.get(CSRF_FIELD, "")
        expected = self.csrf_token(signed)
        if not sent:
            raise Forbidden("The form arrived without its security token (csrf_token). Reload the page and "
                            "send the form again.")
        if not expected:
            raise Forbidden("Your browser did not send the cookie this form needs. Allow cookies for this "
                            "site, reload the page and send the form again.")
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise Forbidden("The form's security token does not match your session (it may have expired or "
                            "you signed in or out in another tab). Reload the page and send the form again.")

    # Sessions -----------------------------------------------------------------------------------

    def start(self, response: Response, account: Account, address: str, now: dt.datetime) -> str:
        """A new session for ``account``, and a device cookie: this browser has proved the password."""
        key = users.start_session(account, self.lifetime, address, now)
        response.set_cookie(SESSION_COOKIE, self.session_signer.dumps(key),
                            max_age=int(self.lifetime.total_seconds()), path="/", httponly=True, samesite="Lax",
                            secure=self._secure())
        response.delete_cookie(ANON_COOKIE, path="/")
        device = [self._account_mark(users.normalise_email(account.email)), secrets.token_urlsafe(16)]
        response.set_cookie(DEVICE_COOKIE, self.device_signer.dumps(device), max_age=DEVICE_DAYS * 86400,
                            path="/", httponly=True, samesite="Lax", secure=self._secure())
        return key

    def end(self, response: Response, signed: Signed) -> None:
        if signed.session_key:
            users.end_session(signed.session_key)
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="Lax")

    def finish(self, response: Response, signed: Signed) -> Response:
        """Headers every page gets; the anon cookie when one was made for this answer."""
        if signed.new_anon and signed.anon:
            response.set_cookie(ANON_COOKIE, self.anon_signer.dumps(signed.anon), max_age=7 * 86400, path="/",
                                httponly=True, samesite="Lax", secure=self._secure())
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _secure(self) -> bool:
        return self.settings.portal_secure_cookies or request.is_secure

    # Sign-in limits -----------------------------------------------------------------------------

    def login_budget(self, req: Request, email_key: str) -> Budget:
        """Whose failures an attempt on the account ``email_key`` spends: this browser's own when its device
        cookie names that account and it has budget left, else the account's."""
        raw = req.cookies.get(DEVICE_COOKIE)
        if raw:
            try:
                mark, device = self.device_signer.loads(raw, max_age=DEVICE_DAYS * 86400)
            except (BadSignature, TypeError, ValueError):
                mark = device = None
            if (isinstance(mark, str) and isinstance(device, str)
                    and hmac.compare_digest(mark, self._account_mark(email_key))
                    and self.device_limiter.retry_after(device) is None):
                return Budget(self.device_limiter, device)
        return Budget(self.account_limiter, email_key)

    def login_wait(self, budget: Budget, address: str) -> int | None:
        """Seconds before this budget or address may try again, or None."""
        waits = [w for w in (budget.limiter.retry_after(budget.key), self.address_limiter.retry_after(address))
                 if w is not None]
        return max(waits) if waits else None

    def login_failed(self, budget: Budget, address: str) -> None:
        budget.limiter.fail(budget.key)
        self.address_limiter.fail(address)

    def login_succeeded(self, budget: Budget, address: str) -> None:
        """The budget's failures are forgotten (a device's alone: what others spent of the account's stays
        spent); the attempt counted in advance from the address goes back."""
        budget.limiter.forget(budget.key)
        self.address_limiter.refund(address)

    def _account_mark(self, email_key: str) -> str:
        """An account as a device cookie names it: not its email, which the cookie would show in clear."""
        return hmac.new(self.secret, b"device|" + email_key.encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Budget:
    """The failed sign-ins an attempt spends: a limiter and its key (an account's email, or a device)."""

    limiter: AuthFailureLimiter
    key: str


def _netloc(origin: str) -> str | None:
    """The host[:port] of an Origin header; None when it is not a URL (then it is no origin of ours)."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:
        return None
