"""The Flask app factory: ``create_app(settings, media=..., ...)`` wires the routes to what they need.

Everything that varies is injected (media fetcher, dispatcher, metrics, readiness checks, clock), so
tests build a fresh app per test with fakes and a fixed clock. The daemon serves the app with
gevent's WSGI server in its own process; the store is whatever ``daemon.store.open_database`` bound.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, g, request
from peewee import OperationalError
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from daemon.calls.records import CallRecords
from daemon.config import Settings
from daemon.ops.metrics import Metrics
from daemon.store import utcnow
from webapi.envelope import ApiError, envelope, error_response
from webapi.portal import register as register_portal
from webapi.portal.base import wrong_method_on_a_page
from webapi.ratelimit import AuthFailureLimiter
from webapi.routing import RowIdConverter, keep_static_matches
from webapi.validation import ValidationError
from webapi.views import ApiContext, DispatcherLike, MediaLike, bp

log = logging.getLogger("callbridge.api")

MAX_BODY = 64 * 1024
# The method label of the latency metric: any other method (the client's to make up) counts as "other",
# so a client cannot add a time series, and its memory, per request.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

HTTP_REASONS = {
    400: "body: malformed request",
    404: "path: no such route",
    413: f"body: larger than {MAX_BODY} bytes",
    416: "Range: outside the file (Content-Range gives its length)",
}


def create_app(settings: Settings, *, media: MediaLike, dispatcher: DispatcherLike | None = None,
               metrics: Metrics | None = None, readiness: Callable[[], Mapping[str, bool]] | None = None,
               clock: Callable[[], dt.datetime] = utcnow, records: CallRecords | None = None,
               switch_status: Callable[[], Mapping[str, Any]] | None = None) -> Flask:
    """Build the API app.

    ``media`` fetches and normalises prompts (``from_url``, ``speak``, ``path_for_name``); ``dispatcher``
    (``wake()``) is told after a call row is committed; ``readiness`` returns named checks for
    ``/readyz``; ``clock`` returns naive-UTC now; ``records`` writes the calls (the daemon's own, whose
    listeners hear the statuses the API sets; by default a fresh one counting into ``metrics``);
    ``switch_status`` describes the switches and their capacity, merged into ``/readyz``'s body.
    """
    app = Flask(__name__, static_folder=None)
    keep_static_matches(app.url_map)  # no garbage cycle per request (see webapi.routing)
    app.url_map.converters["rowid"] = RowIdConverter  # a row's id in a path: too big a number is a 404
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["MAX_FORM_MEMORY_SIZE"] = MAX_BODY
    # One URL per route, no redirects (a redirect would be an HTML page outside the envelope).
    app.url_map.strict_slashes = False
    app.url_map.merge_slashes = False
    if settings.trust_proxy:
        # The client's address, whether it came over HTTPS (the pages' cookies are then Secure), and the host
        # it asked for (a proxy that sends its own upstream address as Host: the pages' Origin check).
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)  # type: ignore[method-assign]
    metrics = metrics or (records.metrics if records is not None else Metrics())
    app.extensions["callbridge"] = ApiContext(
        settings=settings, media=media, dispatcher=dispatcher, metrics=metrics,
        readiness=readiness, clock=clock, limiter=AuthFailureLimiter(settings.auth_failures_per_minute),
        records=records or CallRecords(metrics, clock), switch_status=switch_status)
    app.register_blueprint(bp)
    register_portal(app, settings)

    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def record_latency(response: Response) -> Response:
        started = g.get("started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            context: ApiContext = app.extensions["callbridge"]
            method = request.method if request.method in METRIC_METHODS else "other"
            context.metrics.api_latency.labels(method=method, route=route,
                                               status=str(response.status_code)).observe(
                time.perf_counter() - started)
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(ValidationError)
    def validation_error(error: ValidationError) -> Response:
        return envelope(None, 400, str(error))

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        headers = {k: v for k, v in error.get_headers() if k.lower() != "content-type"}
        if status == 405:
            page = wrong_method_on_a_page(error)
            if page is not None:
                return page
            allowed = headers.get("Allow", "")
            desc = f"method: {request.method} not allowed here; use {allowed}"
        else:
            desc = HTTP_REASONS.get(status, f"{status}: {error.name.lower()}")
        return envelope(None, status, desc, headers)

    @app.errorhandler(OperationalError)
    def store_unavailable(error: OperationalError) -> Response:
        # SQLite busy beyond its timeout, disk full, PostgreSQL gone: the client may simply retry.
        log.warning("store unavailable on %s %s: %s", request.method, request.path, error)
        return envelope(None, 503, "database: unavailable or busy; retry later", {"Retry-After": "1"})

    @app.errorhandler(Exception)
    def unexpected(error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return envelope(None, 500, "internal error; the operator's log has the details")

    return app


def route_rules(app: Flask) -> list[tuple[str, set[str]]]:
    """Every (rule, methods) of the API, without the web pages and static files; for docs and tests."""
    out: list[tuple[str, set[str]]] = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or rule.endpoint.startswith("portal."):
            continue
        methods: Any = rule.methods or set()
        out.append((rule.rule, {m for m in methods if m not in ("HEAD", "OPTIONS")}))
    return out
