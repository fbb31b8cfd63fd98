"""``Idempotency-Key`` on ``POST /v1/calls``: a repeat of the same request returns the first call; the
same key with a different request answers 422.

"The same request" is judged on the parsed fields that define the call, so a form-encoded body and a
JSON body of one request match, as do ``call_date`` written as local time or as ISO 8601 with an offset.
``call_date`` counts as the instant written, not as the due time (a date a little in the past is due
"now", which moves between a request and its retry). The fingerprint is kept on the call row; calls
stored before it existed have none, and match any request.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any
from zoneinfo import ZoneInfo

from daemon.store import Call
from webapi.envelope import ApiError
from webapi.validation import CreateRequest, parse_instant, text


def request_fingerprint(req: CreateRequest, values: Mapping[str, Any], tz: ZoneInfo) -> str:
    """sha256 of the checked request's call-defining fields (``values`` already passed parse_create)."""
    call_date = text(values, "call_date")
    fields = {
        "phone_a": req.phone_a, "phone_b": req.phone_b,
        "call_date": parse_instant(call_date, "call_date", tz).isoformat() if call_date else "",
        "play_url": req.play_url, "msg": req.msg, "msg_lang": req.msg_lang, "dialtone_url": req.dialtone_url,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def check_same_request(earlier: Call, fingerprint: str) -> None:
    """422 when the call stored under this key was made by a different request."""
    if earlier.request_fingerprint and earlier.request_fingerprint != fingerprint:
        raise ApiError(422, "Idempotency-Key: reused with a different request; use a new key for a new "
                            "call, or repeat the first request unchanged to get its answer")
