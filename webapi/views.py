"""The HTTP routes: create, list, read and cancel calls, plus health, readiness, metrics and media.

Each route reads its inputs through :mod:`webapi.validation`, authenticates first (so a request
without a valid token learns nothing about field rules), then checks fields, then asks
:class:`daemon.calls.records.CallRecords` (which owns every call row) and renders the answer. The store
is never written while network I/O is pending: media are fetched before the insert's transaction
opens. Every answer goes through :func:`webapi.envelope.envelope`.
"""

from __future__ import annotations

import codecs
import datetime as dt
import json
import logging
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from flask import Blueprint, Response, current_app, request, send_file
from peewee import OperationalError, SqliteDatabase
from werkzeug.exceptions import RequestEntityTooLarge

from daemon.accounts.endpoints import authenticate
from daemon.calls.records import CallRecords, NewCall, NotCancelable
from daemon.calls.search import CallFilter, find_calls
from daemon.calls.view import call_view, endpoint_zone, timeline_view
from daemon.config import Settings
from daemon.media.library import MediaBusy, SpeechUnavailable, route_allows
from daemon.ops.logs import log_event, one_line
from daemon.ops.metrics import Metrics
from daemon.store import Call, CallStatus, Endpoint, database
from daemon.writer import current as writer
from webapi.envelope import ApiError, envelope
from webapi.idempotency import check_same_request, request_fingerprint
from webapi.ratelimit import AuthFailureLimiter
from webapi.turns import take_turn
from webapi.validation import (
    ListQuery,
    decode_due_cursor,
    decode_id_cursor,
    encode_due_cursor,
    encode_id_cursor,
    parse_callid,
    parse_create,
    parse_idempotency_key,
    parse_list_query,
)

log = logging.getLogger("callbridge.api")

bp = Blueprint("api", __name__)

MEDIA_NAME_RE = re.compile(r"^[0-9a-f]{64}$")
FORM = "application/x-www-form-urlencoded"


class MediaLike(Protocol):
    """What the API needs of daemon.media.library: fetch/normalise a URL, speak a text, find a file by name."""

    def from_url(self, url: str, *, kind: str) -> Any: ...

    def speak(self, text: str, lang: str) -> Any: ...

    def path_for_name(self, name: str) -> str | None: ...


class DispatcherLike(Protocol):
    def wake(self) -> None: ...


@dataclass
class ApiContext:
    """What the routes depend on, injected by :func:`webapi.app.create_app`."""

    settings: Settings
    media: MediaLike
    dispatcher: DispatcherLike | None
    metrics: Metrics
    readiness: Callable[[], Mapping[str, bool]] | None
    clock: Callable[[], dt.datetime]
    limiter: AuthFailureLimiter
    # Every call row is written through it; its status writers (the webhook outbox) write with the
    # statuses the API sets (queued/scheduled, canceled), in the same transaction.
    records: CallRecords
    # The switches and their capacity as the engine sees them (merged into /readyz's body), when there is one.
    switch_status: Callable[[], Mapping[str, Any]] | None = None


def ctx() -> ApiContext:
    """The running app's :class:`ApiContext`."""
    context: ApiContext = current_app.extensions["callbridge"]
    return context


# Request reading ---------------------------------------------------------------------------------

def body_values() -> dict[str, Any]:
    """The request body as a dict: form-urlencoded or a JSON object; no body is ``{}``; else 415."""
    mimetype = request.mimetype
    data = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: RequestEntityTooLarge, answered 413
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # A chunked body is cut at the limit without an error; a body that reached it is too large.
        raise RequestEntityTooLarge()
    if not mimetype:
        if data:
            raise ApiError(415, f"Content-Type: required; use {FORM} or application/json")
        return {}
    if mimetype == "application/json" or mimetype.endswith("+json"):
        if not data.strip():
            return {}
        try:
            parsed = json.loads(data, object_pairs_hook=_object_without_repeats)
        except (ValueError, RecursionError):
            raise ApiError(400, "body: not valid JSON") from None
        if not isinstance(parsed, dict):
            raise ApiError(400, "body: must be a JSON object")
        return parsed
    if mimetype == FORM:
        return _form_values(data, request.mimetype_params.get("charset"))
    raise ApiError(415, f"Content-Type: {mimetype} not supported; use {FORM} or application/json")


def presented_token(values: Mapping[str, Any]) -> Any:
    """``Authorization: Bearer`` first, then the ``token`` field of the body, then the query string."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    token = values.get("token")
    if token not in (None, ""):
        return token
    return request.args.get("token") or None


def require_endpoint(values: Mapping[str, Any]) -> tuple[Endpoint, str]:
    """The enabled endpoint owning the presented token; else 401, or 429 while this address is over its
    limit of failed attempts. A valid token is never refused (the limit counts failures only)."""
    c = ctx()
    token = presented_token(values)
    endpoint = authenticate(token) if isinstance(token, str) else None
    if endpoint is not None:
        return endpoint, token
    address = request.remote_addr or "unknown"
    wait = c.limiter.retry_after(address)
    if wait is not None:
        raise ApiError(429, "token: too many failed attempts from this address; retry later",
                       {"Retry-After": str(wait)})
    c.limiter.fail(address)
    if token is None:
        raise ApiError(401, "token: missing", {"WWW-Authenticate": 'Bearer realm="callbridge"'})
    log_event(log, "api.auth_failed", logging.WARNING, address=address)
    raise ApiError(401, "token: invalid or disabled", {"WWW-Authenticate": 'Bearer realm="callbridge"'})


LIST_PARAMETERS = ("limit", "cursor", "status", "from", "to", "number")


def query_values() -> dict[str, Any]:
    """Query-string parameters (first value of each)."""
    return request.args.to_dict(flat=True)


def check_list_parameters_given_once() -> None:
    """A list's parameters given twice are a 400, as a body's fields: ``status=a&status=b`` read as ``a``
    alone would silently drop a filter (``status=a,b`` is the list form)."""
    for name in LIST_PARAMETERS:
        if len(request.args.getlist(name)) > 1:
            raise _given_twice(name, "query string")


def _object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's or a form's values, refused when a name repeats: which value counts would be a guess
    (ours the last, a proxy's or a validator's in front of us perhaps the first)."""
    found: dict[str, Any] = {}
    for name, value in pairs:
        if name in found:
            raise _given_twice(name)
        found[name] = value
    return found


def _form_values(data: bytes, charset: str | None) -> dict[str, str]:
    """A form body's values, one per name (a name given twice is a 400: which one counts would be a guess).

    Percent-escapes are read as UTF-8, or as the charset the Content-Type declares (a PHP site in Latin-1
    sending ``caf%E9``). Werkzeug's form parser left an escape that is not UTF-8 as it stood (``caf%E9``
    spoken as written) and dropped every field of a body holding a raw non-ASCII byte (a 401 for a token
    that was there): both are a 400 that says so here."""
    codec = "utf-8"
    if charset is not None:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            raise ApiError(415, f"Content-Type: charset {charset[:40]!r} unknown; send UTF-8") from None
    try:
        pairs = urllib.parse.parse_qsl(data.decode(codec), keep_blank_values=True, encoding=codec,
                                       errors="strict")
    except UnicodeDecodeError:
        raise ApiError(400, f"body: not {codec} text; percent-encode each field as UTF-8 (e.g. caf%C3%A9), "
                            "or declare the charset in Content-Type") from None
    return _object_without_repeats(pairs)


def _given_twice(name: str, where: str = "body") -> ApiError:
    """The answer to a field given twice; its name quoted when short and plain, else just where it was."""
    shown = name if len(name) <= 64 and name.isidentifier() and name.isascii() else where
    return ApiError(400, f"{shown}: given more than once; send each field once")


# Shapes ------------------------------------------------------------------------------------------

def own_call(endpoint: Endpoint, raw_callid: str) -> Call:
    """The endpoint's call by callid; 404 whether it does not exist or belongs to someone else."""
    callid = parse_callid(raw_callid)
    call = CallRecords.owned(endpoint.id, callid) if callid is not None else None
    if call is None:
        raise ApiError(404, "callid: no such call for this token")
    return call


def wake_dispatcher() -> None:
    """Tell the engine a call row changed; the row is committed, so a failure here only logs."""
    dispatcher = ctx().dispatcher
    if dispatcher is None:
        return
    try:
        dispatcher.wake()
    except Exception:
        log.exception("dispatcher wake failed")


# Calls -------------------------------------------------------------------------------------------

def _media(field: str, fetch: Callable[[], Any]) -> Any:
    try:
        return fetch()
    except ValueError as exc:  # daemon.media.MediaError is a ValueError; its text is for the client
        raise ApiError(400, f"{field}: {exc}") from None
    except SpeechUnavailable as exc:  # the server's speech settings, not the message: logged for the operator
        raise ApiError(503, f"{field}: {exc}; the server's speech settings need the operator",
                       {"Retry-After": "60"}) from None
    except MediaBusy as exc:
        raise ApiError(503, f"{field}: {exc}", {"Retry-After": str(exc.retry_after)}) from None
    except OSError:
        log.exception("media store failed field=%s", field)
        raise ApiError(503, f"{field}: the media store is unavailable; retry later",
                       {"Retry-After": "5"}) from None


def _create_answer(call: Call, endpoint: Endpoint, token: str) -> Response:
    data = call_view(call, endpoint)
    data["token"] = token  # the seed echoes the token in the create answer, and only there
    return envelope(data)


@bp.route("/v1/calls", methods=["POST"], provide_automatic_options=False)
def create_call() -> Response:
    """Request a call bridge (immediate, or scheduled with ``call_date``)."""
    values = body_values()
    endpoint, token = require_endpoint(values)
    key = parse_idempotency_key(request.headers.get("Idempotency-Key"))
    return _create_answer(place_call(endpoint, values, key), endpoint, token)


def place_call(endpoint: Endpoint, values: Mapping[str, Any], key: str | None = None) -> Call:
    """What ``POST /v1/calls`` does once the token is known: check the fields, fetch and normalise the
    media, store the call (or find the one an earlier request with ``key`` made) and wake the dispatcher.
    The web pages' form comes here too. Raises ValidationError or ApiError (400 naming the field, 503)."""
    c = ctx()
    now = c.clock()
    zone = endpoint_zone(endpoint.timezone)
    earlier = CallRecords.by_idempotency_key(endpoint.id, key) if key is not None else None
    if earlier is not None:
        # A repeat is checked as of the first request: a call_date that has passed since (the client
        # retries minutes later) must not turn the call it made into a 400 and a second call.
        req = parse_create(values, extension_pattern=endpoint.extension_pattern,
                           allowed_prefixes=endpoint.allowed_prefixes, tz=zone, now=earlier.requested_at,
                           settings=c.settings)
        check_same_request(earlier, request_fingerprint(req, values, zone))
        return earlier
    req = parse_create(values, extension_pattern=endpoint.extension_pattern,
                       allowed_prefixes=endpoint.allowed_prefixes, tz=zone, now=now, settings=c.settings)
    fingerprint = None  # only a request with a key is ever compared with another
    if key is not None:
        fingerprint = request_fingerprint(req, values, zone)
    play = _media("play_url", lambda: c.media.from_url(req.play_url, kind="play")) if req.play_url else None
    spoken = _media("msg", lambda: c.media.speak(req.msg, req.msg_lang)) if req.msg else None
    tone = (_media("dialtone_url", lambda: c.media.from_url(req.dialtone_url, kind="dialtone"))
            if req.dialtone_url else None)
    created = c.records.create(endpoint, NewCall(
        phone_a=req.phone_a, phone_b=req.phone_b, due_at=req.due_at, scheduled=req.scheduled,
        play_url=req.play_url, msg=req.msg, msg_lang=req.msg_lang, dialtone_url=req.dialtone_url,
        play_file=play.path if play else "", msg_file=spoken.path if spoken else "",
        dialtone_file=tone.path if tone else "", idempotency_key=key,
        request_fingerprint=fingerprint), now=c.clock())  # media may have taken a while
    # The store's commit answers a whole group of requests at once: they finish one turn at a time too, so
    # that events read meanwhile are not stuck behind all of them (webapi.turns).
    take_turn()
    if created.new:
        # A scheduled call is due more than a second from now, and the dispatcher looks at least once a
        # second: only a call due now needs it woken (at hundreds of creates a second, a look for each
        # scheduled one cost the event loop more than the creates themselves).
        if created.call.status == CallStatus.QUEUED.value:
            wake_dispatcher()
    elif fingerprint is not None:  # a concurrent request with the same key won the insert
        check_same_request(created.call, fingerprint)
    return created.call


def calls_page(endpoint_ids: list[int] | None, q: ListQuery) -> tuple[list[Call], str | None]:
    """One page of calls of ``endpoint_ids`` (None: every endpoint), newest first, and the cursor of the
    next (None: no more): the search of ``GET /v1/calls`` and the Calls page (:mod:`daemon.calls.search`)."""
    found = find_calls(endpoint_ids, CallFilter(statuses=q.statuses or (), since=q.since, until=q.until,
                                                digits=q.digits),
                       limit=q.limit, before_id=decode_id_cursor(q.cursor) if q.cursor is not None else None)
    return found.calls, encode_id_cursor(found.before_id) if found.before_id is not None else None


@bp.route("/v1/calls", methods=["GET"], provide_automatic_options=False)
def list_calls() -> Response:
    """The token's calls, newest first, keyset-paginated and filterable by status and request date."""
    args = query_values()
    endpoint, _ = require_endpoint(args)
    check_list_parameters_given_once()
    q = parse_list_query(args, endpoint_zone(endpoint.timezone))
    calls, next_cursor = calls_page([endpoint.id], q)
    return envelope({"calls": [call_view(r, endpoint) for r in calls], "next_cursor": next_cursor})


@bp.route("/v1/calls/<callid>", methods=["GET"], provide_automatic_options=False)
def read_call(callid: str) -> Response:
    """One of the token's calls with its timeline."""
    endpoint, _ = require_endpoint(query_values())
    call = own_call(endpoint, callid)
    data = call_view(call, endpoint)
    data["timeline"] = timeline_view(CallRecords.timeline(call.id))
    return envelope(data)


@bp.route("/v1/calls/<callid>/recording", methods=["GET"], provide_automatic_options=False)
def read_recording(callid: str) -> Response:
    """The call's recording (audio), when the endpoint records and the file is still kept."""
    endpoint, _ = require_endpoint(query_values())
    call = own_call(endpoint, callid)
    path = call.recording_path
    if not path or not os.path.isabs(path) or not os.path.isfile(path):
        raise ApiError(404, "recording: none for this call")
    return send_file(path, mimetype="audio/wav" if path.endswith(".wav") else None, conditional=True)


# Scheduled ---------------------------------------------------------------------------------------

@bp.route("/v1/scheduled", methods=["GET"], provide_automatic_options=False)
def list_scheduled() -> Response:
    """The token's scheduled calls that have not started yet, soonest first."""
    args = query_values()
    endpoint, _ = require_endpoint(args)
    check_list_parameters_given_once()
    for name in ("status", "from", "to", "number"):  # GET /v1/calls's filters: taken here, they would be ignored
        if args.get(name):
            raise ApiError(400, f"{name}: not a filter of GET /v1/scheduled, which lists every pending scheduled "
                                f"call soonest first; filter with GET /v1/calls?{name}=...")
    q = parse_list_query(args, endpoint_zone(endpoint.timezone))
    after = decode_due_cursor(q.cursor) if q.cursor is not None else None
    rows = CallRecords.scheduled_page([endpoint.id], limit=q.limit + 1, after=after)
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    return envelope({"calls": [call_view(r, endpoint) for r in rows],
                     "next_cursor": encode_due_cursor(rows[-1].due_at, rows[-1].id) if more else None})


def _cancel(callid: str, values: Mapping[str, Any]) -> Response:
    endpoint, _ = require_endpoint(values)
    call = own_call(endpoint, callid)
    return envelope(call_view(cancel_call(call, endpoint), endpoint))


def cancel_call(call: Call, endpoint: Endpoint, *, via: str = "the API") -> Call:
    """Cancel the endpoint's call if it has not started (the API's cancel, and the web pages'); the call as
    it stands afterwards. ApiError 409 when it already started or ended."""
    c = ctx()
    outcome = c.records.cancel(call, endpoint, now=c.clock(), via=via)
    if isinstance(outcome, NotCancelable):
        raise ApiError(409, f"callid: {outcome.reason}",
                       extra={"callid": outcome.call.callid, "status": outcome.status.value})
    wake_dispatcher()
    return outcome


@bp.route("/v1/scheduled/<callid>", methods=["DELETE"], provide_automatic_options=False)
def cancel_scheduled(callid: str) -> Response:
    """Cancel a call that has not started (the row stays, status ``canceled``)."""
    values = dict(query_values())
    values.update(body_values())
    return _cancel(callid, values)


@bp.route("/v1/scheduled/<callid>/cancel", methods=["POST"], provide_automatic_options=False)
def cancel_scheduled_post(callid: str) -> Response:
    """The same as DELETE, for clients that can only POST."""
    values = dict(query_values())
    values.update(body_values())
    return _cancel(callid, values)


# Service -----------------------------------------------------------------------------------------

@bp.route("/healthz", methods=["GET"], provide_automatic_options=False)
def healthz() -> Response:
    """200 while the process serves."""
    return envelope({"status": "ok"})


def database_ready() -> bool:
    """True when the store answers and can take its write lock right now."""
    try:
        db = database.obj
        if isinstance(db, SqliteDatabase):
            writer().probe()  # through the store's writer: it holds the write lock when the daemon writes
        else:  # PostgreSQL: writable means a primary whose sessions are not read-only
            writable = database.execute_sql(
                "SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off'").fetchone()[0]
            if not writable:
                log.warning("readiness: the database is read-only (a standby, or read-only by setting)")
            return bool(writable)
        return True
    except OperationalError as exc:  # down, locked, full: what the probe is for, in one line
        log_event(log, "readiness.database_unavailable", logging.WARNING, error=one_line(exc))
        return False
    except Exception:
        log.warning("readiness: database check failed", exc_info=True)
        return False


@bp.route("/readyz", methods=["GET"], provide_automatic_options=False)
def readyz() -> Response:
    """200 when every check (the injected ones and the database) passes, else 503; JSON either way."""
    checks: dict[str, bool] = {}
    readiness = ctx().readiness
    if readiness is not None:
        try:
            checks.update({str(k): bool(v) for k, v in readiness().items()})
        except Exception:
            log.exception("readiness callable failed")
            checks["readiness"] = False
    checks["database"] = checks.get("database", True) and database_ready()
    failing = sorted(name for name, ok in checks.items() if not ok)
    status = 503 if failing else 200
    body: dict[str, Any] = {"ready": not failing, "checks": checks}
    switch_status = ctx().switch_status
    if switch_status is not None:
        try:
            body.update(switch_status())
        except Exception:
            log.exception("switch status failed")
    return envelope(body, status, f"not ready: {', '.join(failing)}" if failing else "")


@bp.route("/metrics", methods=["GET"], provide_automatic_options=False)
def metrics() -> Response:
    """Prometheus text exposition (not in the envelope: scrapers expect the raw format)."""
    m = ctx().metrics
    return Response(m.render(), status=200, content_type=m.content_type)


@bp.route("/media/<name>.wav", methods=["GET"], provide_automatic_options=False)
def media_file(name: str) -> Response:
    """A prompt for a FreeSWITCH on another host (``media_mode = "http"``), by its keyed name.

    Only there, and only to the addresses in ``media_route_allow``; anything else is answered as if the
    file did not exist. The name is an HMAC of the content under this installation's key: nobody can
    compute it from a text they guess.
    """
    settings = ctx().settings
    if settings.media_mode != "http" or not route_allows(settings.media_route_addresses, request.remote_addr):
        raise ApiError(404, "media: no such file")
    if not MEDIA_NAME_RE.fullmatch(name):
        raise ApiError(404, "media: no such file")
    path = ctx().media.path_for_name(name)
    if not path or not os.path.isfile(path):
        raise ApiError(404, "media: no such file")
    response = send_file(path, mimetype="audio/wav", conditional=True, max_age=86400)
    response.headers["Cache-Control"] = "private, max-age=86400, immutable"  # for FreeSWITCH, not shared caches
    return response


@bp.route("/v1/openapi.json", methods=["GET"], provide_automatic_options=False)
def openapi() -> Response:
    """The OpenAPI document (the raw document, not in the envelope, so tools can read it)."""
    from webapi.openapi import openapi_document

    document = openapi_document(ctx().settings)
    return Response(json.dumps(document, indent=1) + "\n", mimetype="application/json")

