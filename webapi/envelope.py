"""The seed's answer envelope: every response, success or error, is ``{"data": {..., "code", "code_desc"}}``.

Errors a client can cause are raised as :class:`ApiError` (status, reason, optional headers) and turned
into the same envelope by the app's error handlers, so no route ever answers HTML or a stack trace.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from flask import Response


class ApiError(Exception):
    """An answer other than 200: its HTTP status, a ``code_desc`` naming the field and the rule."""

    def __init__(self, status: int, desc: str, headers: Mapping[str, str] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(desc)
        self.status = status
        self.desc = desc
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def envelope(data: Mapping[str, Any] | None = None, status: int = 200, desc: str = "",
             headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response in the envelope; ``code`` always equals the HTTP status.

    Non-ASCII is escaped (as the seed's PHP service does), so even a lone surrogate cannot fail encoding.
    """
    body = dict(data or {})
    body["code"] = status
    body["code_desc"] = desc
    response = Response(json.dumps({"data": body}) + "\n", status=status,
                        mimetype="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def error_response(error: ApiError) -> Response:
    """The envelope for an :class:`ApiError`."""
    return envelope(error.extra, error.status, error.desc, error.headers)
