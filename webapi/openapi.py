"""The OpenAPI 3.0 document of the HTTP API, as a Python dict served at ``GET /v1/openapi.json``.

It is the contract property-based tests are generated from, so it says exactly what each route takes
and answers: every field and its rule, every status, and the envelope
``{"data": {..., "code": <status>, "code_desc": "<field>: <rule>" or ""}}`` around every answer
(except the raw documents: this one, ``/metrics`` and the ``/media`` and recording files).
"""

from __future__ import annotations

from typing import Any

from daemon.calls.view import TIMELINE_EVENT_SCHEMA, call_schema
from daemon.config import LANGUAGES, Settings
from daemon.store import CallStatus
from webapi.validation import IDEMPOTENCY_KEY_MAX, LIMIT_DEFAULT, LIMIT_MAX, URL_MAX

STATUSES = [s.value for s in CallStatus]

DST_RULE = (
    "DST rule: a local time that a spring-forward change skips is moved forward by the length of the gap "
    "(America/New_York 2026-03-08 02:30 becomes 03:30 EDT); a local time that a fall-back change repeats "
    "means its first occurrence (America/New_York 2026-11-01 01:30 is 01:30 EDT, 05:30Z)."
)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(kind: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "nullable": True, **extra}


def _envelope(data_schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": ["data"], "properties": {"data": data_schema}}


def _answer(description: str, data_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    schema = _envelope(data_schema) if data_schema is not None else _ref("ErrorEnvelope")
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _raw(description: str, media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A 200 answer that is a raw document, not in the envelope."""
    return {"description": description, "content": {media_type: {"schema": schema}}}


WAV = _raw("WAV audio.", "audio/wav", {"type": "string", "format": "binary"})
# A file route answers ranges and revalidation as HTTP does (players seek, caches revalidate).
FILE_ANSWERS = {
    "200": WAV,
    "206": _raw("The byte range asked for with `Range`.", "audio/wav", {"type": "string", "format": "binary"}),
    "304": {"description": "Unchanged since the `ETag` (`If-None-Match`) or date (`If-Modified-Since`) sent; "
                           "no body."},
}


def _with_code(*schemas: dict[str, Any]) -> dict[str, Any]:
    return {"allOf": [*schemas, _ref("Code")]}


ERR = {
    400: "Invalid request: `code_desc` is `<field>: <rule>`; for any operation also a malformed request head "
         "(`headers: <rule>`, e.g. a Transfer-Encoding other than chunked, or `query string: not UTF-8 ...`).",
    401: "`token: missing` or `token: invalid or disabled`.",
    404: "No such call for this token (another token's call answers the same), or no such route.",
    405: "Method not allowed on this path (`Allow` header lists the allowed ones).",
    409: "The call already started or is already final; nothing changed. `data.status` says which.",
    413: "Body larger than 64 KiB.",
    414: "Request line (method, path and query) of 8 KiB or more; send the token as `Authorization: Bearer`.",
    415: "Body neither application/x-www-form-urlencoded nor application/json.",
    416: "`Range` outside the file; `Content-Range` gives its length.",
    422: "`Idempotency-Key: reused with a different request; ...`: this token already used the key for a "
         "call whose fields differ; nothing was created. Use a new key for a new call.",
    429: "This address sent too many invalid or missing tokens (a burst of `auth_failures_per_minute`, then "
         "that rate); see `Retry-After`. A valid token is never refused.",
    500: "Internal error (never expected for any input); no details are returned.",
    503: "The media store or the database is unavailable or busy; retry later (`Retry-After`).",
}


def _errors(*codes: int) -> dict[str, Any]:
    """The error answers of one operation, plus 400 and 414, which the server itself gives any of them (a
    malformed request head, a request line too long) before the operation runs."""
    out: dict[str, Any] = {}
    for code in sorted({*codes, 400, 414}):
        answer = _answer(ERR[code])
        if code == 429:
            answer["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1},
                                                 "description": "Seconds until this address may try again."}}
        if code == 503:
            answer["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
        if code == 405:
            answer["headers"] = {"Allow": {"schema": {"type": "string"}}}
        out[str(code)] = answer
    return out


AUTH_ERRORS = (401, 405, 429, 500, 503)
TOKEN_QUERY = {"name": "token", "in": "query", "required": False,
               "schema": {"type": "string", "maxLength": 200},
               "description": "The endpoint's token, when not sent as `Authorization: Bearer`."}
CALLID_PATH = {"name": "callid", "in": "path", "required": True, "schema": {"type": "string"},
               "description": "The `callid` from the create answer."}
SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"tokenField": []}]


def _create_request(settings: Settings, *, numbers: bool) -> dict[str, Any]:
    phone: dict[str, Any] = {
        "type": "string",
        "description": "Digits with an optional leading `+`, 7 to 15 digits; or, if the endpoint has an "
                       "`extension_pattern`, a number (digits, optional `+`, at most 20) that fully "
                       "matches it. The endpoint's `allowed_prefixes` (if any) apply to non-extension "
                       "numbers.",
        "example": "15550001234",
    }
    if numbers:
        phone = {"oneOf": [phone, {"type": "integer", "minimum": 0,
                                   "description": "JSON only: the number as an integer."}]}
    return {
        "type": "object",
        "required": ["phone_a", "phone_b"],
        "additionalProperties": True,
        "description": "Unknown fields are ignored. Empty strings count as absent.",
        "properties": {
            "token": {"type": "string", "maxLength": 200,
                      "description": "The endpoint's token; required unless sent as "
                                     "`Authorization: Bearer`."},
            "phone_a": phone,
            "phone_b": phone,
            "call_date": {
                "type": "string",
                "description": "When to call: `YYYY-MM-DD HH:MM` in the endpoint's time zone, or ISO 8601 "
                               "with an offset (`2026-12-24T18:00:00+01:00`, `...Z`). Absent: now. Up to "
                               f"`past_grace` ({settings.past_grace} s) in the past counts as now; further "
                               f"back, or more than `schedule_max_days` ({settings.schedule_max_days}) days "
                               f"ahead, is refused. {DST_RULE}",
                "example": "2026-12-24 18:00",
            },
            "play_url": {"type": "string", "maxLength": URL_MAX,
                         "description": "http(s) URL of printable ASCII to an MP3 or WAV, played to A when A "
                                        "answers. The API fetches and checks it before answering."},
            "msg": {"type": "string", "maxLength": settings.msg_max_chars,
                    "description": "Text spoken to A after `play_url`; no control characters."},
            "msg_lang": {"type": "string", "enum": ["", *LANGUAGES],
                         "description": "Language of `msg`; required when `msg` is given, ignored "
                                        "without it."},
            "dialtone_url": {"type": "string", "maxLength": URL_MAX,
                             "description": "http(s) URL to an MP3 or WAV that A hears instead of B's "
                                            "ringing."},
        },
    }


def _readiness_schema() -> dict[str, Any]:
    return _with_code({
        "type": "object",
        "required": ["ready", "checks"],
        "properties": {
            "ready": {"type": "boolean"},
            "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
            "switches": {
                "type": "array",
                "description": "Each FreeSWITCH as the daemon sees it: `switch` (host:port), `connected`, "
                               "`unreachable_seconds` (null while connected), `calls_in_progress` on it, its "
                               "limits as last read (`sessions_per_second`, `max_sessions`; null until read), "
                               "`sessions` now, `rate_last_second` (sessions created), the caps the daemon "
                               "keeps to (`rate_cap`, `session_cap`: the limits less the margin), legs "
                               "`waiting` for room. The daemon is ready while at least one is connected.",
                "items": {
                    "type": "object",
                    "properties": {
                        "switch": {"type": "string"},
                        "connected": {"type": "boolean"},
                        "unreachable_seconds": {"type": "number", "nullable": True},
                        "calls_in_progress": {"type": "integer"},
                        "known": {"type": "boolean"},
                        "sessions_per_second": {"type": "integer", "nullable": True},
                        "max_sessions": {"type": "integer", "nullable": True},
                        "sessions": {"type": "integer"},
                        "rate_last_second": {"type": "integer"},
                        "rate_cap": {"type": "integer"},
                        "session_cap": {"type": "integer"},
                        "waiting": {"type": "integer"},
                    },
                },
            },
            "switches_not_ready": {
                "type": "array", "items": {"type": "string"},
                "description": "The switches (host:port) not connected now: they get no new calls.",
            },
        },
    })


def _schemas(settings: Settings) -> dict[str, Any]:
    return {
        "Code": {
            "type": "object",
            "required": ["code", "code_desc"],
            "properties": {
                "code": {"type": "integer", "description": "Equals the HTTP status."},
                "code_desc": {"type": "string", "description": "Empty on success; else `<field>: <rule>`."},
            },
        },
        "ErrorEnvelope": _envelope(_with_code({
            "type": "object",
            "properties": {
                "callid": {"type": "string", "description": "409 only."},
                "status": {"type": "string", "enum": STATUSES, "description": "409 only: the call's status."},
            },
        })),
        "CallSummary": call_schema(),
        "CreateAnswer": _with_code(_ref("CallSummary"), {
            "type": "object",
            "required": ["token"],
            "properties": {"token": {"type": "string",
                                     "description": "The token as sent (create answer only)."}},
        }),
        "TimelineEvent": TIMELINE_EVENT_SCHEMA,
        "CallDetail": _with_code(_ref("CallSummary"), {
            "type": "object",
            "required": ["timeline"],
            "properties": {"timeline": {"type": "array", "items": _ref("TimelineEvent")}},
        }),
        "CallList": _with_code({
            "type": "object",
            "required": ["calls", "next_cursor"],
            "properties": {
                "calls": {"type": "array", "items": _ref("CallSummary")},
                "next_cursor": _nullable("string", description=(
                    "Pass as `cursor` for the next page; null on the last page. A page filtered by "
                    "`number` or request time (`from`, `to`) examines a bounded share of the calls, so it "
                    "may hold fewer than `limit` calls, even none, and still give a cursor: follow it "
                    "until null.")),
            },
        }),
        "CreateForm": _create_request(settings, numbers=False),
        "CreateJson": _create_request(settings, numbers=True),
        "Readiness": _readiness_schema(),
        "TokenBody": {
            "type": "object",
            "additionalProperties": True,
            "properties": {"token": {"type": "string", "maxLength": 200}},
        },
    }


def _list_params(scheduled: bool) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        TOKEN_QUERY,
        {"name": "limit", "in": "query", "required": False,
         "schema": {"type": "integer", "minimum": 1, "maximum": LIMIT_MAX, "default": LIMIT_DEFAULT},
         "description": f"Page size, 1 to {LIMIT_MAX}."},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "Opaque `next_cursor` of the previous page; any other value answers 400."},
    ]
    if not scheduled:
        params += [
            {"name": "status", "in": "query", "required": False, "schema": {"type": "string"},
             "description": f"One status or a comma-separated list of: {', '.join(STATUSES)}."},
            {"name": "from", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Requested at or after: `YYYY-MM-DD` or `YYYY-MM-DD HH:MM` in the endpoint's "
                            "time zone, or ISO 8601 with an offset."},
            {"name": "to", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "Requested before (exclusive); a bare `YYYY-MM-DD` means the end of that day. "
                            "Same formats as `from`."},
            {"name": "number", "in": "query", "required": False,
             "schema": {"type": "string", "pattern": "^\\+?[0-9]{1,20}$"},
             "description": "Digits found anywhere in `phone_a` or `phone_b` (all of a number or part of "
                            "it; a leading `+` is ignored)."},
        ]
    return params


def _cancel_op(summary: str, op_id: str, with_body: bool) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "description": "Cancels a call that has not started (status scheduled or queued): the row stays, "
                       "with status `canceled`, `canceled_at` and `canceled_by`. One conditional update "
                       "decides between cancel and start: a call the dispatcher claimed first answers 409 "
                       "and nothing changes.",
        "security": SECURITY,
        "parameters": [CALLID_PATH, TOKEN_QUERY],
        "responses": {"200": _answer("Canceled; the call as it is now.", _with_code(_ref("CallSummary"))),
                      **_errors(400, 401, 404, 405, 409, 413, 415, 429, 500, 503)},
    }
    if with_body:
        op["requestBody"] = {"required": False, "content": {
            "application/x-www-form-urlencoded": {"schema": _ref("TokenBody")},
            "application/json": {"schema": _ref("TokenBody")}}}
    return op


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The whole document for these settings (limits such as ``msg_max_chars`` appear in it)."""
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "callbridge",
            "version": "1",
            "description": (
                "Phone call bridges through FreeSWITCH: call A, play prompts, ring B with a custom tone, "
                "bridge them.\n\nEvery answer is JSON in the envelope `{\"data\": {..., \"code\": <HTTP "
                "status>, \"code_desc\": \"\" | \"<field>: <rule>\"}}`, errors included (404, 405, 413, 415, "
                "429, 500). Authentication comes first: a request without a valid token answers 401 (or "
                "429) before any field is checked; only a body that cannot be read at all (413, 415, not a "
                "JSON object, a field given twice: 400) is answered before it, as the token may be in it. The token is sent as `Authorization: Bearer <token>`, "
                "as the `token` field of the body, or as the `token` query parameter. Unknown fields are "
                f"ignored; empty strings count as absent. {DST_RULE}\n\nThe server itself may answer, on "
                "any path, 408 (request line and headers, or the body, not received in time; the connection "
                "closes) and 503 with `Retry-After` (every connection busy at the server's connection cap)."
            ),
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "tokenField": {"type": "apiKey", "in": "query", "name": "token",
                               "description": "Also accepted as the `token` body field."},
            },
            "schemas": _schemas(settings),
        },
        "paths": {
            "/v1/calls": {
                "post": {
                    "operationId": "createCall",
                    "summary": "Request a call bridge, now or at call_date.",
                    "description": "Checks the token, then the fields in this order: phone_a, phone_b, "
                                   "call_date, play_url, msg, msg_lang, dialtone_url; then fetches the media "
                                   "(a failure answers 400 `play_url: <reason>` etc.). With an "
                                   "`Idempotency-Key`, a repeat of the same request for the same token "
                                   "returns the first call (same callid) and creates nothing; the same key "
                                   "with different fields (phone_a, phone_b, call_date, play_url, msg, "
                                   "msg_lang, dialtone_url) answers 422. Form and JSON bodies of one "
                                   "request are the same request.",
                    "security": SECURITY,
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX},
                                    "description": "Printable ASCII; a retried create returns the same "
                                                   "call; reused for a different request, 422."}],
                    "requestBody": {"required": True, "content": {
                        "application/x-www-form-urlencoded": {"schema": _ref("CreateForm")},
                        "application/json": {"schema": _ref("CreateJson")}}},
                    "responses": {"200": _answer("The call was accepted (status scheduled or queued).",
                                                 _ref("CreateAnswer")),
                                  **_errors(400, 401, 405, 413, 415, 422, 429, 500, 503)},
                },
                "get": {
                    "operationId": "listCalls",
                    "summary": "The token's calls, newest first.",
                    "description": "Keyset-paginated: the cost of a page does not depend on how many calls "
                                   "the token has.",
                    "security": SECURITY,
                    "parameters": _list_params(False),
                    "responses": {"200": _answer("A page of calls.", _ref("CallList")),
                                  **_errors(400, *AUTH_ERRORS)},
                },
            },
            "/v1/calls/{callid}": {
                "get": {
                    "operationId": "readCall",
                    "summary": "One call with its status and timeline.",
                    "security": SECURITY,
                    "parameters": [CALLID_PATH, TOKEN_QUERY],
                    "responses": {"200": _answer("The call.", _ref("CallDetail")),
                                  **_errors(404, *AUTH_ERRORS)},
                },
            },
            "/v1/calls/{callid}/recording": {
                "get": {
                    "operationId": "readRecording",
                    "summary": "The call's recording, when the endpoint records and the file is kept.",
                    "security": SECURITY,
                    "parameters": [CALLID_PATH, TOKEN_QUERY],
                    "responses": {**FILE_ANSWERS, **_errors(404, 416, *AUTH_ERRORS)},
                },
            },
            "/v1/scheduled": {
                "get": {
                    "operationId": "listScheduled",
                    "summary": "The token's scheduled calls that have not started, soonest first.",
                    "security": SECURITY,
                    "parameters": _list_params(True),
                    "responses": {"200": _answer("A page of pending scheduled calls.", _ref("CallList")),
                                  **_errors(400, *AUTH_ERRORS)},
                },
            },
            "/v1/scheduled/{callid}": {
                "delete": _cancel_op("Cancel a call that has not started.", "cancelScheduled", True),
            },
            "/v1/scheduled/{callid}/cancel": {
                "post": _cancel_op("Cancel (POST form, for clients that cannot send DELETE).",
                                   "cancelScheduledPost", True),
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "200 while the process serves.",
                    "responses": {"200": _answer("Alive.", _with_code({
                        "type": "object", "required": ["status"],
                        "properties": {"status": {"type": "string", "enum": ["ok"]}}})),
                        **_errors(405)},
                },
            },
            "/readyz": {
                "get": {
                    "operationId": "ready",
                    "summary": "200 when FreeSWITCH and the database are usable, else 503.",
                    "responses": {
                        "200": _answer("Ready.", _ref("Readiness")),
                        "503": _answer("Not ready; `code_desc` lists the failing checks.", _ref("Readiness")),
                        **_errors(405),
                    },
                },
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Prometheus metrics (text exposition, not in the envelope).",
                    "responses": {"200": _raw("Metrics.", "text/plain", {"type": "string"}), **_errors(405)},
                },
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document (not in the envelope).",
                    "responses": {"200": _raw("The OpenAPI document.", "application/json", {"type": "object"}),
                                  **_errors(405)},
                },
            },
            "/media/{name}.wav": {
                "get": {
                    "operationId": "media",
                    "summary": "A prompt made by callbridge, by its keyed content hash, for FreeSWITCH only "
                               "(media_mode = \"http\", client address in media_route_allow; 404 otherwise).",
                    "parameters": [{"name": "name", "in": "path", "required": True,
                                    "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}],
                    "responses": {**FILE_ANSWERS, **_errors(404, 405, 416)},
                },
            },
        },
    }
