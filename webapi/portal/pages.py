"""The pages an account uses: sign in and out, register, password, endpoints and tokens, calls, scheduled
calls, one call's story, its recording, and the API reference."""

from __future__ import annotations

import logging
import os
import re
import secrets
from typing import Any
from urllib.parse import urlencode

from flask import Response, request, send_file

from daemon.accounts import users
from daemon.accounts.endpoints import rotate_token
from daemon.config import LANGUAGES
from daemon.ops.logs import log_event
from daemon.store import FINAL_STATUSES, CallStatus
from webapi import views
from webapi.envelope import ApiError
from webapi.openapi import openapi_document
from webapi.portal import present, queries
from webapi.portal.base import (
    PageError,
    bp,
    client_address,
    go,
    me,
    render,
    safe_next,
    security,
    signed,
    signed_in,
)
from webapi.validation import ValidationError
from webapi.views import ctx

log = logging.getLogger("callbridge.portal")

MEDIA_NAME_LEN = 64 + len(".wav")


# Signing in and out ------------------------------------------------------------------------------

@bp.route("/", methods=["GET"])
def home() -> Response:
    return go("/calls" if signed().account is not None else "/login")


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response:
    target = safe_next(request.values.get("next"))
    if signed().account is not None:
        return go(target)
    if request.method == "GET":
        return render("login.html", title="Sign in", email="", next=target)
    sec = security()
    email = request.form.get("email", "").strip()[:254]
    password = request.form.get("password", "")
    try:  # the budget is the account's, however its email is spelled (case, Unicode form)
        email_key = users.normalise_email(email)
    except users.AccountError:
        email_key = email.lower()
    address, budget = client_address(), sec.login_budget(request, email_key)
    wait = sec.login_wait(budget, address)
    if wait is not None:
        log_event(log, "portal.login_limited", logging.WARNING, address=address)
        return render("login.html", 429, title="Sign in", email=email, next=target,
                      error=f"Too many failed sign-ins for this account or from this address. "
                            f"Try again in {_minutes(wait)}.")
    if not email or not password:
        missing = "email" if not email else "password"
        return render("login.html", 400, title="Sign in", email=email, next=target,
                      error=f"{missing}: required", bad=missing)
    # Counted before the (slow, off-loop) check and given back on success: attempts arriving together
    # share the budget instead of all passing the check above before any failure is recorded.
    sec.login_failed(budget, address)
    account = users.authenticate(email, password)
    if account is None:
        log_event(log, "portal.login_failed", logging.WARNING, address=address)
        return render("login.html", 401, title="Sign in", email=email, next=target,
                      error="The email or the password is wrong (or the account is disabled).")
    sec.login_succeeded(budget, address)
    response = go(target)
    sec.start(response, account, address, ctx().clock())
    log_event(log, "portal.login", account=account.email, address=address)
    return response


def _minutes(seconds: int) -> str:
    """A limiter's wait as a person reads it: "1 minute", "5 minutes"."""
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


@bp.route("/logout", methods=["POST"])
def logout() -> Response:
    response = go("/login", "signed_out")
    security().end(response, signed())
    return response


@bp.route("/register", methods=["GET", "POST"])
def register() -> Response:
    settings = ctx().settings
    if not settings.portal_registration:
        raise PageError(404, "Accounts are created by the operator here. Ask them for one "
                             "(python -m daemon user add).", "Registration is closed")
    needs_code = bool(settings.portal_invite_code)
    if request.method == "GET":
        return render("register.html", title="Create an account", email="", needs_code=needs_code)
    email = request.form.get("email", "")
    password = request.form.get("password", "")
    error = field = ""
    sec, address = security(), client_address()
    # Wrong invite codes spend the address's sign-in budget: a short code is not guessed by brute force.
    wait = sec.address_limiter.retry_after(address) if needs_code else None
    if wait is not None:
        log_event(log, "portal.register_limited", logging.WARNING, address=address)
        return render("register.html", 429, title="Create an account", email=email, needs_code=needs_code,
                      error=f"Too many wrong invite codes or sign-ins from this address. "
                            f"Try again in {_minutes(wait)}.")
    if needs_code and not _same(request.form.get("invite_code", "").strip(), settings.portal_invite_code):
        sec.address_limiter.fail(address)
        log_event(log, "portal.register_wrong_code", logging.WARNING, address=address)
        error, field = "invite_code: wrong code; ask whoever invited you for it", "invite_code"
    elif password != request.form.get("password_again", ""):
        error, field = "password_again: the two passwords differ", "password_again"
    else:
        try:
            account = users.create_account(email, password)
        except users.AccountError as exc:
            error, field = str(exc), str(exc).split(":", 1)[0]
    if error:
        return render("register.html", 400, title="Create an account", email=email, needs_code=needs_code,
                      error=error, bad=field)
    response = go("/endpoints", "registered")
    sec.start(response, account, address, ctx().clock())
    log_event(log, "portal.registered", account=account.email, address=address)
    return response


def _same(given: str, expected: str) -> bool:
    import hmac

    return hmac.compare_digest(given.encode(), expected.encode())


@bp.route("/account", methods=["GET", "POST"])
@signed_in
def account() -> Response:
    if request.method == "GET":
        return render("account.html", title="Your account")
    account = me()
    current = request.form.get("current_password", "")
    new = request.form.get("new_password", "")
    # A wrong current password is a guess like a failed sign-in: the same budgets (this browser's or the
    # account's, and the address's), so an open session is no way around them.
    sec, address = security(), client_address()
    budget = sec.login_budget(request, users.normalise_email(account.email))
    wait = sec.login_wait(budget, address)
    if wait is not None:
        log_event(log, "portal.password_check_limited", logging.WARNING, account=account.email, address=address)
        return render("account.html", 429, title="Your account", bad="current_password",
                      error=f"current_password: too many wrong passwords for this account or from this "
                            f"address; try again in {_minutes(wait)}")
    sec.login_failed(budget, address)  # counted before the slow check, given back when it matches
    if not users.password_matches(account.password_hash, current):
        log_event(log, "portal.password_check_failed", logging.WARNING, account=account.email, address=address)
        return render("account.html", 400, title="Your account", error="current_password: wrong password",
                      bad="current_password")
    sec.login_succeeded(budget, address)
    error = field = ""
    if new != request.form.get("new_password_again", ""):
        error, field = "new_password_again: the two new passwords differ", "new_password_again"
    else:
        try:
            users.set_password(account, new)
        except users.AccountError as exc:
            error, field = "new_" + str(exc), "new_password"
    if error:
        return render("account.html", 400, title="Your account", error=error, bad=field)
    # Every session ended with the old password; this browser gets a new one.
    response = go("/account", "password_changed")
    sec.start(response, account, address, ctx().clock())
    log_event(log, "portal.password_changed", account=account.email)
    return response


# Endpoints ---------------------------------------------------------------------------------------

@bp.route("/endpoints", methods=["GET"])
@signed_in
def endpoints() -> Response:
    try:
        rows, next_after = queries.endpoints_page(me(), request.args.to_dict(flat=True))
    except ValidationError as exc:
        raise PageError(400, str(exc)) from exc
    return render("endpoints.html", title="Endpoints", endpoints=rows, next_after=next_after)


@bp.route("/endpoints/<rowid:endpoint_id>/rotate", methods=["POST"])
@signed_in
def rotate(endpoint_id: int) -> Response:
    endpoint = queries.own_endpoint(me(), endpoint_id)
    if endpoint is None:
        raise PageError(404, "No such endpoint among yours.")
    token = rotate_token(endpoint)
    log_event(log, "portal.token_rotated", endpoint=endpoint.name, account=me().email, token=endpoint.token_hint)
    # Shown on this answer only: it is not stored, and the page is not cached (Cache-Control: no-store).
    return render("token.html", title="New token", endpoint=endpoint, token=token, rotated=True)


# Calls -------------------------------------------------------------------------------------------

PLACE_FIELDS = ("phone_a", "phone_b", "call_date", "play_url", "msg", "msg_lang", "dialtone_url")
FORM_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what the form is given (token_urlsafe), kept as a key
REUSED_FORM = ("form_id: this form already placed a call (your browser's Back button brought it back); "
               "check the numbers and send it again to place a new call")


@bp.route("/calls/new", methods=["GET", "POST"])
@signed_in
def place() -> Response:
    """Place or schedule a call with one of the account's endpoints: the API's own create path, so the same
    rules and the same messages; a form sent twice (a double click, a reload) makes one call."""
    usable = queries.place_choices(me())
    values = request.form.to_dict(flat=True) if request.method == "POST" else {}
    values.setdefault("form_id", secrets.token_urlsafe(12))
    error = field = ""
    status = 200
    if request.method == "POST":
        endpoint = queries.own_endpoint(me(), values.get("endpoint"))
        if not FORM_ID_RE.fullmatch(values["form_id"]):
            error, field = "form_id: not one this page gave; send the form again", "form_id"
            values["form_id"] = secrets.token_urlsafe(12)
        elif endpoint is None or not endpoint.enabled:
            error, field = "endpoint: choose one of your enabled endpoints", "endpoint"
        else:
            try:
                call = views.place_call(endpoint, {k: values.get(k, "") for k in PLACE_FIELDS},
                                        key="web:" + values["form_id"][:64])
            except ValidationError as exc:
                error, field = str(exc), exc.field
            except ApiError as exc:
                error, field = exc.desc, exc.desc.split(":", 1)[0]
                status = exc.status
                if field == "Idempotency-Key":
                    # This form already placed a call and came back changed (the browser's Back button
                    # restores its form_id): a new one, so that sending it again places the new call.
                    error, field = REUSED_FORM, "form_id"
                    values["form_id"] = secrets.token_urlsafe(12)
            else:
                log_event(log, "portal.call_placed", callid=call.callid, endpoint=endpoint.name, by=me().email)
                return go(f"/calls/{call.callid}")
        status = status if status != 200 else 400
    return render("place.html", status, title="Place a call", endpoints=usable, values=values, error=error,
                  bad=field, languages=LANGUAGES, msg_max=ctx().settings.msg_max_chars)


@bp.route("/calls/<callid>/cancel", methods=["POST"])
@signed_in
def cancel(callid: str) -> Response:
    """Cancel a call that has not started, through the API's own cancel."""
    call = _call_or_404(callid)
    try:
        views.cancel_call(call, call.endpoint, via=f"the web pages ({me().email})")
    except ApiError as exc:
        raise PageError(409, f"This call can no longer be canceled: {exc.desc.removeprefix('callid: ')}.") from None
    back = request.form.get("back", "")
    return go(back if back == "/scheduled" else f"/calls/{call.callid}", "canceled")

@bp.route("/calls", methods=["GET"])
@signed_in
def calls() -> Response:
    account = me()
    args = request.args.to_dict(flat=True)
    mine = queries.endpoint_choices(account)
    try:
        f = queries.parse_filter(account, args)
        rows, next_cursor = queries.calls_page(account, f)
    except ValidationError as exc:
        return render("calls.html", 400, title="Calls", rows=[], args=args, endpoints=mine,
                      error=str(exc), bad=exc.field, zone_name="UTC", live=False,
                      statuses=[s.value for s in CallStatus])
    return render("calls.html", title="Calls", rows=rows, args=args, endpoints=mine,
                  zone_name=f.zone_name, live=queries.moving(rows, ctx().clock()),
                  statuses=[s.value for s in CallStatus],
                  newest_url=_calls_url(args, None) if f.query.cursor is not None else "",
                  older_url=_calls_url(args, next_cursor) if next_cursor else "",
                  # a search (part of a number, a status, dates) ends its page where it has examined its
                  # share of the calls (daemon.calls.search): the page says so, and where to go on
                  searched_part=bool(next_cursor) and len(rows) < f.query.limit)


def _calls_url(args: dict[str, str], cursor: str | None) -> str:
    """/calls with the same filters, at ``cursor`` (None: the newest page)."""
    query = {k: v for k, v in args.items() if k != "cursor" and v}
    if cursor:
        query["cursor"] = cursor
    return "/calls" + ("?" + urlencode(query) if query else "")


def _call_or_404(callid: str) -> Any:
    call = queries.own_call(me(), callid)
    if call is None:
        raise PageError(404, "No such call among your endpoints' calls. Check the link, or find the call on "
                             "the Calls page.")
    return call


def _prompt_file(call: Any, which: str) -> str:
    """The path of one of our normalised files a call played, if it is still in the cache, else ``""``."""
    path = getattr(call, f"{which}_file") or ""
    name = os.path.basename(path)
    if len(name) != MEDIA_NAME_LEN or not name.endswith(".wav") or not os.path.isfile(path):
        return ""
    return str(path)


def _media_player(call: Any, which: str) -> str:
    """The URL the page's player fetches the prompt from: behind the call's own ownership check (the API's
    /media/ route serves FreeSWITCH only)."""
    return f"/calls/{call.callid}/prompts/{which}" if _prompt_file(call, which) else ""


@bp.route("/calls/<callid>", methods=["GET"])
@signed_in
def call_detail(callid: str) -> Response:
    call = _call_or_404(callid)
    steps = queries.timeline(call)
    files = {os.path.basename(path): label for path, label in ((call.play_file, "the play_url file"),
                                                                (call.msg_file, "the spoken message"),
                                                                (call.dialtone_file, "the dialtone_url file"))
             if path}
    played = _played_times(steps, call)
    recording = bool(call.recording_path) and os.path.isfile(call.recording_path)
    zone_name = call.endpoint.timezone
    return render("call.html", title=f"Call {call.callid}", call=call, endpoint=call.endpoint, steps=steps,
                  played=played, outcome=present.outcome(call), step_words=present.step_words,
                  step_details=lambda detail: present.step_details(detail, zone_name, files), recording=recording,
                  play_player=_media_player(call, "play"), msg_player=_media_player(call, "msg"),
                  dialtone_player=_media_player(call, "dialtone"),
                  final=CallStatus(call.status) in FINAL_STATUSES,
                  live=queries.moving([call], ctx().clock()),
                  cancelable=CallStatus(call.status) in (CallStatus.SCHEDULED, CallStatus.QUEUED))


def _played_times(steps: list[Any], call: Any) -> dict[str, tuple[Any, Any]]:
    """When each prompt played to A: ``{"play": (started, finished), "msg": (...)}`` from the timeline."""
    which = {os.path.basename(call.play_file): "play", os.path.basename(call.msg_file): "msg"}
    out: dict[str, tuple[Any, Any]] = {}
    for step in steps:
        if step.kind not in ("prompt_started", "prompt_finished"):
            continue
        name = which.get(step.detail_dict.get("file", ""))
        if name is None:
            continue
        started, finished = out.get(name, (None, None))
        out[name] = (step.at, finished) if step.kind == "prompt_started" else (started, step.at)
    return out


@bp.route("/calls/<callid>/recording", methods=["GET"])
@signed_in
def recording(callid: str) -> Response:
    call = _call_or_404(callid)
    path = call.recording_path
    if not path or not os.path.isabs(path) or not os.path.isfile(path):
        raise PageError(404, "This call has no recording (the endpoint does not record, the call was never "
                             "bridged, or the recording was deleted after its retention period).")
    download = request.args.get("download") == "1"
    return send_file(path, mimetype="audio/wav", conditional=True, as_attachment=download,
                     download_name=f"call-{call.callid}.wav")


@bp.route("/calls/<callid>/prompts/<any(play, msg, dialtone):which>", methods=["GET"])
@signed_in
def prompt(callid: str, which: str) -> Response:
    """What A was played (the file, the spoken message, the dial tone), as normalised for the call."""
    path = _prompt_file(_call_or_404(callid), which)
    if not path:
        raise PageError(404, "This sound is no longer kept on the server.")
    return send_file(path, mimetype="audio/wav", conditional=True)


@bp.route("/scheduled", methods=["GET"])
@signed_in
def scheduled() -> Response:
    args = request.args.to_dict(flat=True)
    try:
        rows, next_cursor = queries.scheduled_page(me(), args)
    except ValidationError as exc:
        return render("scheduled.html", 400, title="Scheduled calls", rows=[], next_cursor=None, error=str(exc),
                      live=False)
    return render("scheduled.html", title="Scheduled calls", rows=rows, next_cursor=next_cursor,
                  live=queries.moving(rows, ctx().clock()))


# API reference -----------------------------------------------------------------------------------

@bp.route("/api", methods=["GET"])
@signed_in
def api_reference() -> Response:
    document = openapi_document(ctx().settings)
    operations = []
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            operations.append({"path": path, "method": method.upper(), "op": op,
                               "body": _request_fields(document, op), "anchor": op.get("operationId", "")})
    return render("api.html", title="API reference", doc=document, operations=operations,
                  md=present.inline_markdown, schema_text=present.schema_text)


def _request_fields(document: dict[str, Any], op: dict[str, Any]) -> list[dict[str, Any]]:
    """The fields of an operation's form body, with their rules, resolved from the components."""
    content = op.get("requestBody", {}).get("content", {})
    schema = (content.get("application/x-www-form-urlencoded") or content.get("application/json") or {}).get("schema")
    schema = present.resolve(document, schema or {})
    required = set(schema.get("required", []))
    return [{"name": name, "required": name in required, "schema": present.resolve(document, prop)}
            for name, prop in schema.get("properties", {}).items()]
