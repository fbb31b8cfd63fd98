"""The pages' blueprint and what every page shares: who is signed in, CSRF on every POST, rendering,
errors as pages (the JSON API keeps its envelope), and the security headers."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote

from flask import Blueprint, Response, current_app, g, redirect, render_template, request
from markupsafe import Markup, escape
from peewee import OperationalError
from werkzeug.exceptions import HTTPException

from daemon.store import Account
from webapi.portal import present
from webapi.portal.security import CSRF_FIELD, Forbidden, PortalSecurity, Signed
from webapi.views import ctx

log = logging.getLogger("callbridge.portal")

bp = Blueprint("portal", __name__, template_folder="templates", static_folder="static",
               static_url_path="/portal-static")

F = TypeVar("F", bound=Callable[..., Any])

# Notices a redirect may ask the next page to show (a code in the query string, never free text).
NOTICES = {
    "signed_out": "You are signed out.",
    "password_changed": "Your password is changed. Other browsers signed in to this account were signed out.",
    "canceled": "The call is canceled.",
    "account_created": "The account is created.",
    "hung_up": "Hang-up sent to FreeSWITCH; the call ends in a moment.",
    "saved": "Saved.",
    "registered": "Your account is created and you are signed in.",
}


class PageError(Exception):
    """A page answer other than 200 (404, 409...), with a sentence that says what to do."""

    def __init__(self, status: int, message: str, title: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.title = title


def security() -> PortalSecurity:
    sec: PortalSecurity = current_app.extensions["callbridge_portal"]
    return sec


def signed() -> Signed:
    value: Signed = g.portal_signed
    return value


def me() -> Account:
    """The signed-in account (only in views behind :func:`signed_in`)."""
    account = signed().account
    assert account is not None
    return account


def client_address() -> str:
    return request.remote_addr or "unknown"


def safe_next(target: str | None) -> str:
    """A local path to go to after sign-in; anything else goes to /calls: another site, ``//host``, and
    any whitespace or control character (``/\t/host``: browsers and the Location header drop a tab or a
    line break, leaving ``//host``; a CR or LF could not be sent at all)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/calls"
    if any(ch.isspace() or not ch.isprintable() for ch in target):
        return "/calls"
    return target


def signed_in(view: F) -> F:
    """Send visitors who are not signed in to /login, coming back here afterwards."""
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if signed().account is None:
            target = request.full_path if request.method == "GET" else "/calls"
            return redirect("/login?next=" + quote(target.rstrip("?"), safe="/"), code=303)
        return view(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def admin_only(view: F) -> F:
    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if signed().account is None:
            return redirect("/login?next=" + quote(request.path, safe="/"), code=303)
        if not me().is_admin:
            raise PageError(403, "This page is for administrators. Ask one to give your account the admin role "
                                 "if you need it.", "Administrators only")
        return view(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


def render(template: str, status: int = 200, **context: Any) -> Response:
    notice = NOTICES.get(request.args.get("notice", ""), "")
    html = render_template(f"portal/{template}", notice=notice, **context)
    return Response(html, status=status, mimetype="text/html")


def go(path: str, notice: str = "") -> Response:
    """Redirect after a successful POST (303: the browser GETs the next page)."""
    if notice:
        path += ("&" if "?" in path else "?") + "notice=" + notice
    return redirect(path, code=303)  # type: ignore[return-value]


@bp.before_request
def load_visitor() -> Response | None:
    sec = security()
    g.portal_signed = sec.load(request, ctx().clock())
    if request.endpoint == "portal.static":
        return None
    if request.method == "POST" and request.mimetype == "application/x-www-form-urlencoded" \
            and (request.content_length or 0) > 0 and not request.form:
        # Werkzeug drops every field of a body that is not UTF-8: said so, not "no security token".
        raise PageError(400, "The form arrived unreadable (not UTF-8 text). Reload the page and send it again.")
    if request.method == "POST" and not (request.endpoint == "portal.logout" and g.portal_signed.account is None):
        sec.check_post(request, g.portal_signed)
    return None


@bp.after_request
def finish(response: Response) -> Response:
    visitor = g.get("portal_signed")
    if visitor is not None:
        security().finish(response, visitor)
    if request.endpoint == "portal.static":
        response.headers["Cache-Control"] = "public, max-age=300"
    return response


@bp.context_processor
def common() -> dict[str, Any]:
    visitor: Signed | None = g.get("portal_signed")
    if visitor is not None and visitor.account is None:
        security().ensure_anon(visitor)  # the page may hold a form (sign-in): give it a CSRF seed
    token = security().csrf_token(visitor) if visitor is not None else ""
    return {
        "me": visitor.account if visitor is not None else None,
        "csrf_token": token,
        "csrf_input": Markup(f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(token)}">'),
        "status_words": present.status_words,
        "cause_words": present.cause_words,
        "local_time": present.local_time,
        "iso_utc": present.iso_utc,
        "web_link": present.web_link,
        "duration": present.duration,
        "registration_open": ctx().settings.portal_registration,
    }


@bp.errorhandler(Forbidden)
def forbidden(error: Forbidden) -> Response:
    log.warning("portal: refused %s %s from %s: %s", request.method, request.path, client_address(), error)
    return render("error.html", 403, title="Refused", message=str(error))


@bp.errorhandler(PageError)
def page_error(error: PageError) -> Response:
    titles = {404: "Not found", 403: "Not allowed", 409: "Not possible now", 429: "Too many attempts"}
    return render("error.html", error.status, title=error.title or titles.get(error.status, "Error"),
                  message=error.message)


WRONG_METHOD = "This page does not take {method} requests."


@bp.errorhandler(HTTPException)
def http_error(error: HTTPException) -> Response:
    status = error.code or 500
    messages = {405: WRONG_METHOD.format(method=request.method),
                413: "The form is too large. Shorten what you typed and send it again.",
                400: "The request was malformed. Reload the page and try again."}
    return render("error.html", status, title=error.name,
                  message=messages.get(status, "This page could not be shown."))


def wrong_method_on_a_page(error: HTTPException) -> Response | None:
    """A 405 at a page's address as the pages answer it (with the visitor's header and the pages' security
    headers), or None for any other address. Routing refuses the method before the request reaches the
    pages' blueprint, so the app's own handler asks here first."""
    allowed = sorted(getattr(error, "valid_methods", None) or [], key=lambda m: m in ("HEAD", "OPTIONS"))
    if not allowed:
        return None
    try:
        endpoint, _ = current_app.url_map.bind_to_environ(request.environ).match(method=allowed[0])
    except HTTPException:
        return None
    if not str(endpoint).startswith(f"{bp.name}."):
        return None
    visitor = security().load(request, ctx().clock())
    g.portal_signed = visitor
    # Rendered outside the blueprint's request: its context (the visitor, the header's forms) is given here.
    response = render("error.html", 405, title=error.name, message=WRONG_METHOD.format(method=request.method),
                      **common())
    response.headers.extend(error.get_headers())  # Allow (its Content-Type is the page's own)
    response.headers["Content-Type"] = "text/html; charset=utf-8"
    return security().finish(response, visitor)


@bp.errorhandler(OperationalError)
def store_unavailable(error: OperationalError) -> Response:
    log.warning("portal: store unavailable on %s %s: %s", request.method, request.path, error)
    response = render("error.html", 503, title="Busy",
                      message="The database is busy or unavailable. Wait a moment and reload the page.")
    response.headers["Retry-After"] = "1"
    return response


@bp.errorhandler(Exception)
def unexpected(error: Exception) -> Response:
    log.exception("portal: unhandled error on %s %s", request.method, request.path)
    return render("error.html", 500, title="Something went wrong",
                  message="Something went wrong on our side. The operator's log has the details; "
                          "try again in a moment.")
