"""Administrators' pages: every endpoint (create, edit limits and options, owner, disable), the calls in
progress (hang up), and the accounts (create, disable, admin role, password)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from flask import Response, request

from daemon.accounts import users
from daemon.accounts.endpoints import (
    EndpointError,
    EndpointOptions,
    assign_owner,
    create_endpoint,
    disable_endpoint,
    enable_endpoint,
    options_of,
    update_endpoint,
)
from daemon.cli import hangup_call
from daemon.ops.logs import log_event
from daemon.store import Account, Call, Endpoint
from webapi.portal import queries
from webapi.portal.base import PageError, admin_only, bp, client_address, go, me, render, security
from webapi.validation import ValidationError
from webapi.views import ctx

log = logging.getLogger("callbridge.portal")

# EndpointOptions.check names the CLI's options; the form's fields carry the stored names.
OPTION_FIELDS = {"name": "name", "caller-id": "caller_id_number", "caller-id-name": "caller_id_name",
                 "dial-string": "dial_string", "timezone": "timezone", "calls-per-second": "calls_per_second",
                 "max-in-flight": "max_in_flight", "daily-cap": "daily_cap", "max-duration": "max_duration",
                 "allowed-prefixes": "allowed_prefixes", "extension-pattern": "extension_pattern",
                 "webhook-url": "webhook_url", "ring-tone": "ring_tone"}
NUMBERS = {"max_in_flight": int, "calls_per_second": float, "max_duration": int, "daily_cap": int}
REQUIRED_BLANK = {"name": "", "caller_id_number": "", "dial_string": ""}  # a new endpoint's form lacking them
RECORD_SHOWN = "record_shown"  # sent by every endpoint form, beside the record checkbox


def _options_from_form(form: Mapping[str, str], base: EndpointOptions | None = None) -> EndpointOptions:
    """The endpoint form as options; EndpointError (naming the form field) for a number that is not one.

    A field the form does not hold keeps ``base``'s value (an edit), or the default (a new endpoint,
    whose required fields then fail their check by name). An unticked checkbox is not sent at all:
    ``record`` is read only from a form that showed it (its ``record_shown`` marker)."""
    values: dict[str, Any] = vars(base).copy() if base is not None else dict(REQUIRED_BLANK)
    for name in ("name", "caller_id_number", "caller_id_name", "dial_string", "timezone", "allowed_prefixes",
                 "extension_pattern", "webhook_url", "ring_tone"):
        if name in form:
            values[name] = form[name].strip()
    for name, kind in NUMBERS.items():
        if name in form:
            try:
                values[name] = kind(form[name].strip())
            except ValueError:
                rule = "a whole number" if kind is int else "a number"
                raise EndpointError(f"{name}: must be {rule}") from None
    if RECORD_SHOWN in form or base is None:
        values["record"] = form.get("record") == "on"
    values.setdefault("timezone", "UTC")
    return EndpointOptions(**values)


def _field_of(message: str) -> str:
    key = message.split(":", 1)[0].strip()
    return OPTION_FIELDS.get(key, key)


def _form_message(message: str) -> str:
    """``caller-id: digits ...`` → ``caller_id_number: digits ...`` (the form's field names)."""
    key, _, rule = message.partition(":")
    field = OPTION_FIELDS.get(key.strip())
    return f"{field}:{rule}" if field and rule else message


def _owner_from_form(form: Mapping[str, str], current: Account | None = None) -> Account | None:
    """The owner the form names (none when it names none); ``current`` when the form has no owner field."""
    if "owner" not in form:
        return current
    raw = form["owner"].strip()
    if not raw:
        return None
    try:
        account = users.find_account(raw)
    except users.AccountError:
        account = None
    if account is None:
        raise EndpointError(f"owner: no account {raw!r}; create it on the Accounts page first")
    return account


def _form_values(options: EndpointOptions, owner_email: str, form: Mapping[str, str]) -> dict[str, Any]:
    """What the endpoint form shows: what was posted (after an error), else the stored or default values."""
    values: dict[str, Any] = {**vars(options), "owner": owner_email}
    if form:
        values.update({k: v for k, v in form.items() if k in values})
        values["record"] = form.get("record") == "on"
    return values


def _endpoint_or_404(endpoint_id: int) -> Endpoint:
    endpoint = Endpoint.get_or_none(Endpoint.id == endpoint_id)
    if endpoint is None:
        raise PageError(404, "No such endpoint.")
    return endpoint


def _accounts() -> list[Account]:
    return list(Account.select().order_by(Account.email))


# Endpoints ---------------------------------------------------------------------------------------

@bp.route("/admin", methods=["GET"])
@admin_only
def admin_home() -> Response:
    return go("/admin/endpoints")


@bp.route("/admin/endpoints", methods=["GET", "POST"])
@admin_only
def admin_endpoints() -> Response:
    form: dict[str, str] = {}
    error = field = ""
    if request.method == "POST":
        form = request.form.to_dict(flat=True)
        try:
            options = _options_from_form(form)
            owner = _owner_from_form(form)
            endpoint, token = create_endpoint(options, owner=owner)
        except EndpointError as exc:
            error, field = _form_message(str(exc)), _field_of(str(exc))
        else:
            log_event(log, "portal.endpoint_created", endpoint=endpoint.name, by=me().email,
                      token=endpoint.token_hint)
            return render("token.html", title="Endpoint created", endpoint=endpoint, token=token, rotated=False)
    try:
        endpoints, next_after = queries.endpoints_page(me(), request.args.to_dict(flat=True))  # (an admin's: all of them)
    except ValidationError as exc:
        raise PageError(400, str(exc)) from exc
    owners = {a.id: a.email for a in _accounts()}
    defaults = EndpointOptions(name="", caller_id_number="", dial_string="sofia/gateway/carrier/{number}")
    return render("admin_endpoints.html", 400 if error else 200, title="All endpoints", endpoints=endpoints,
                  next_after=next_after, owners=owners, accounts=_accounts(), error=error, bad=field,
                  values=_form_values(defaults, "", form))


@bp.route("/admin/endpoints/<rowid:endpoint_id>", methods=["GET", "POST"])
@admin_only
def admin_endpoint(endpoint_id: int) -> Response:
    endpoint = _endpoint_or_404(endpoint_id)
    error = field = ""
    form: dict[str, str] = {}
    if request.method == "POST":
        form = request.form.to_dict(flat=True)
        had_secret = bool(endpoint.webhook_secret)
        try:
            options = _options_from_form(form, options_of(endpoint))
            owner = _owner_from_form(form, endpoint.owner)
            update_endpoint(endpoint, options)
            assign_owner(endpoint, owner)
        except EndpointError as exc:
            error, field = _form_message(str(exc)), _field_of(str(exc))
            endpoint = _endpoint_or_404(endpoint_id)  # show what is stored, with the form's values on top
        else:
            log_event(log, "portal.endpoint_saved", endpoint=endpoint.name, by=me().email)
            if endpoint.webhook_secret and not had_secret:
                # Made by this save (the first webhook URL): shown on this answer only, like a token.
                return render("webhook_secret.html", title="Webhook signing secret", endpoint=endpoint)
            return go(f"/admin/endpoints/{endpoint.id}", "saved")
    owner = Account.get_or_none(Account.id == endpoint.owner_id) if endpoint.owner_id else None
    return render("admin_endpoint.html", 400 if error else 200, title=f"Endpoint {endpoint.name}",
                  endpoint=endpoint, accounts=_accounts(), error=error, bad=field,
                  values=_form_values(options_of(endpoint), owner.email if owner else "", form))


@bp.route("/admin/endpoints/<rowid:endpoint_id>/<any(disable, enable):action>", methods=["POST"])
@admin_only
def admin_endpoint_toggle(endpoint_id: int, action: str) -> Response:
    endpoint = _endpoint_or_404(endpoint_id)
    (disable_endpoint if action == "disable" else enable_endpoint)(endpoint)
    log_event(log, f"portal.endpoint_{action}d", endpoint=endpoint.name, by=me().email)
    return go("/admin/endpoints", "saved")


# Calls in progress -------------------------------------------------------------------------------

@bp.route("/admin/live", methods=["GET"])
@admin_only
def admin_live() -> Response:
    try:
        rows, phases, next_cursor = queries.live_page(request.args.to_dict(flat=True))
    except ValidationError as exc:
        raise PageError(400, f"{exc}. Start again from the first page of calls in progress.") from None
    return render("admin_live.html", title="Calls in progress", rows=rows, phases=phases, live=True,
                  first_url="/admin/live" if request.args.get("cursor") else "",
                  next_url=f"/admin/live?{urlencode({'cursor': next_cursor})}" if next_cursor else "")


@bp.route("/admin/calls/<callid>/hangup", methods=["POST"])
@admin_only
def admin_hangup(callid: str) -> Response:
    call = queries.own_call(me(), callid)
    if call is None:
        raise PageError(404, "No such call.")
    try:
        hangup_call(Call.get_by_id(call.id), ctx().settings, by=me().email)
    except EndpointError as exc:
        raise PageError(409, f"{exc}. Reload the list: the call may have ended already.") from None
    log_event(log, "portal.hangup", callid=call.callid, by=me().email)
    return go("/admin/live", "hung_up")


# Accounts ----------------------------------------------------------------------------------------

@bp.route("/admin/accounts", methods=["GET", "POST"])
@admin_only
def admin_accounts() -> Response:
    error = field = ""
    email = ""
    if request.method == "POST":
        email = request.form.get("email", "")
        try:
            account = users.create_account(email, request.form.get("password", ""),
                                           is_admin=request.form.get("is_admin") == "on")
        except users.AccountError as exc:
            error, field = str(exc), str(exc).split(":", 1)[0]
        else:
            log_event(log, "portal.account_created", account=account.email, by=me().email)
            return go("/admin/accounts", "account_created")
    rows = [users.describe(a) for a in _accounts()]
    return render("admin_accounts.html", 400 if error else 200, title="Accounts", rows=rows, error=error,
                  bad=field, email=email)


@bp.route("/admin/accounts/<rowid:account_id>/<any(disable, enable, grant, revoke, password):action>",
          methods=["POST"])
@admin_only
def admin_account_action(account_id: int, action: str) -> Response:
    account = Account.get_or_none(Account.id == account_id)
    if account is None:
        raise PageError(404, "No such account.")
    if account.id == me().id and action in ("disable", "revoke"):
        raise PageError(409, "You cannot disable your own account or remove your own admin role here; ask "
                             "another administrator, or use python -m daemon user on the server.")
    if action == "password":
        try:
            users.set_password(account, request.form.get("password", ""))
        except users.AccountError as exc:
            raise PageError(400, f"{exc}. Go back and choose another password.") from None
    elif action in ("disable", "enable"):
        users.set_enabled(account, action == "enable")
    else:
        users.set_admin(account, action == "grant")
    log_event(log, f"portal.account_{action}", account=account.email, by=me().email)
    response = go("/admin/accounts", "saved")
    if action == "password" and account.id == me().id:
        # A new password ends every session of the account, this one too: as on /account, this
        # browser stays signed in with a new one (the others are signed out).
        security().start(response, account, client_address(), ctx().clock())
    return response

