"""Keeping the matches of rules without variables changes nothing a request sees."""

from __future__ import annotations

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, Rule

from webapi.routing import keep_static_matches


def make_map() -> Map:
    url_map = Map(strict_slashes=False, merge_slashes=False)
    keep_static_matches(url_map)
    url_map.add(Rule("/v1/calls", endpoint="create", methods=["POST"]))
    url_map.add(Rule("/v1/calls/<callid>", endpoint="one", methods=["GET"]))
    return url_map


def test_matches_are_those_of_werkzeug_each_time() -> None:
    adapter = make_map().bind("localhost")
    for _ in range(3):
        assert adapter.match("/v1/calls", method="POST") == ("create", {})
        assert adapter.match("/v1/calls/", method="POST") == ("create", {})
        assert adapter.match("/v1/calls/abc", method="GET") == ("one", {"callid": "abc"})
        assert adapter.match("/v1/calls/xyz", method="GET") == ("one", {"callid": "xyz"})
        with pytest.raises(MethodNotAllowed):
            adapter.match("/v1/calls", method="GET")
        with pytest.raises(NotFound):
            adapter.match("/nowhere", method="GET")


def test_values_handed_out_are_copies() -> None:
    adapter = make_map().bind("localhost")
    _, values = adapter.match("/v1/calls", method="POST")
    values["injected"] = "x"
    assert adapter.match("/v1/calls", method="POST") == ("create", {})


def test_a_rule_added_later_is_matched() -> None:
    url_map = make_map()
    assert url_map.bind("localhost").match("/v1/calls", method="POST") == ("create", {})
    url_map.add(Rule("/v1/calls", endpoint="list", methods=["GET"]))
    assert url_map.bind("localhost").match("/v1/calls", method="GET") == ("list", {})


def test_the_cache_goes_in_before_the_rules() -> None:
    with pytest.raises(RuntimeError):
        keep_static_matches(make_map())
