"""Route matching that leaves no garbage for the cycle collector on the API's busy paths.

Werkzeug's matcher (3.1) builds a recursive closure for every match: a reference cycle of eight objects
that only the cyclic garbage collector frees. At hundreds of creates a second that garbage alone made the
collector run every ~80 requests; each run moved the objects of the requests in flight to an older
generation, and every few seconds a full pass over every call in progress (45-70 ms with 2,000 calls
bridged) stopped the loop, calls and all. A path without variables (``POST /v1/calls``, ``/metrics``,
``/readyz``) always matches the same rule with the same values, so its match is kept after the first.
Paths with variables (``/v1/calls/<callid>``) are matched each time.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from werkzeug.routing import BaseConverter, Map, Rule, ValidationError
from werkzeug.routing.matcher import StateMachineMatcher

from webapi.validation import MAX_ROW_ID

MAX_KEPT = 256  # matches kept at most (paths differing only in a trailing slash, methods)


class RowIdConverter(BaseConverter):
    """``<rowid:name>``: a row's id, 1 to 2**63 - 1; any other number matches no route (a 404)."""

    regex = r"[1-9][0-9]{0,18}"

    def to_python(self, value: str) -> int:
        number = int(value)
        if number > MAX_ROW_ID:
            raise ValidationError()
        return number

    def to_url(self, value: int) -> str:
        return str(int(value))


class StaticMatchCache(StateMachineMatcher):
    """Werkzeug's matcher, keeping the matches of rules without variables."""

    def __init__(self, merge_slashes: bool) -> None:
        self._kept: dict[tuple[str, str, str, bool], tuple[Rule, dict[str, Any]]] = {}
        super().__init__(merge_slashes)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "merge_slashes":  # changes what a path matches
            self._kept.clear()
        super().__setattr__(name, value)

    def add(self, rule: Rule) -> None:
        self._kept.clear()
        super().add(rule)

    def update(self) -> None:
        self._kept.clear()
        super().update()

    def match(self, domain: str, path: str, method: str, websocket: bool) -> tuple[Rule, MutableMapping[str, Any]]:
        key = (domain, path, method, websocket)
        kept = self._kept.get(key)
        if kept is not None:
            return kept[0], dict(kept[1])
        rule, values = super().match(domain, path, method, websocket)
        if not rule.arguments and len(self._kept) < MAX_KEPT:
            self._kept[key] = (rule, dict(values))
        return rule, values


def keep_static_matches(url_map: Map) -> None:
    """Give ``url_map`` the caching matcher; call it before any rule is added."""
    if any(True for _ in url_map.iter_rules()):
        raise RuntimeError("keep_static_matches: the map already has rules")
    url_map._matcher = StaticMatchCache(url_map.merge_slashes)  # type: ignore[attr-defined]
