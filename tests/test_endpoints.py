"""Endpoints and tokens: only a hash at rest, constant-cost look-up, disable and rotate act at once."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from peewee import Database

from daemon.accounts import endpoints
from daemon.accounts.endpoints import (
    EndpointError,
    EndpointOptions,
    authenticate,
    create_endpoint,
    describe,
    disable_endpoint,
    rotate_token,
    token_hint,
)
from daemon.config import Settings
from daemon.store import Endpoint, database_file
from daemon.switch import commands as fs


def test_token_is_random_and_only_its_hash_is_stored(make_endpoint: Any, settings: Settings,
                                                     db: Database) -> None:
    endpoint, token = make_endpoint()
    _, other = make_endpoint()
    assert token != other and len(token) >= 3 + 22  # "cb_" + at least 128 bits of urlsafe base64
    assert endpoint.token_hash == hashlib.sha256(token.encode()).hexdigest()
    row = db.execute_sql("SELECT * FROM endpoint WHERE id = ?", (endpoint.get_id(),)).fetchone()
    assert token not in [str(v) for v in row]
    db.execute_sql("PRAGMA wal_checkpoint(FULL)")
    path = database_file(settings.database_url)
    assert path is not None
    for file in Path(path).parent.glob("callbridge.db*"):
        assert token.encode() not in file.read_bytes()
    assert endpoint.token_hint == token_hint(token) and len(endpoint.token_hint) < len(token) // 2


def test_authenticate(make_endpoint: Any) -> None:
    endpoint, token = make_endpoint()
    found = authenticate(token)
    assert found is not None and found.get_id() == endpoint.get_id()
    for wrong in (None, "", token + "x", token[:-1], token.upper(), "x" * 201, "\ud800"):
        assert authenticate(wrong) is None


def test_disabled_token_stops(make_endpoint: Any) -> None:
    endpoint, token = make_endpoint()
    disable_endpoint(endpoint)
    assert authenticate(token) is None
    assert Endpoint.get_by_id(endpoint.get_id()).disabled_at is not None


def test_rotation_replaces_the_token_at_once(make_endpoint: Any) -> None:
    endpoint, old = make_endpoint()
    new = rotate_token(endpoint)
    assert new != old
    assert authenticate(old) is None
    found = authenticate(new)
    assert found is not None and found.get_id() == endpoint.get_id()
    assert Endpoint.get_by_id(endpoint.get_id()).token_hint == token_hint(new)


def test_describe_never_shows_the_token_or_its_hash(make_endpoint: Any) -> None:
    endpoint, token = make_endpoint()
    shown = describe(endpoint)
    assert token not in str(shown) and endpoint.token_hash not in str(shown)
    assert shown["token_hint"] == endpoint.token_hint


@pytest.mark.parametrize(("options", "message"), [
    ({"timezone": "Mars/Olympus"}, "timezone: unknown zone"),
    # ZoneInfo raises OSError for a folder of zones or a name too long for a file: it was a 500
    ({"timezone": "Europe"}, "timezone: unknown zone"),
    ({"timezone": "a" * 300}, "timezone: unknown zone"),
    ({"extension_pattern": "a{99999999999}"}, "extension-pattern: not a regular expression"),
    # Python's re backtracks: these took minutes on a 20-digit number, on the loop that runs every call
    ({"extension_pattern": "((1+)+)+2"}, "extension-pattern: a group may not be repeated"),
    ({"extension_pattern": "^(12)*$"}, "extension-pattern: a group may not be repeated"),
    ({"extension_pattern": "^(?:[0-9]{2}){1,3}$"}, "extension-pattern: a group may not be repeated"),
    ({"extension_pattern": r"^(1)\1$"}, "extension-pattern: no back-references"),
    ({"extension_pattern": "^(?P<d>1)(?P=d)$"}, "extension-pattern: no back-references"),
    ({"allowed_prefixes": "1555,abc"}, "allowed-prefixes:"),
    ({"extension_pattern": "("}, "extension-pattern:"),
    ({"caller_id_number": "call me"}, "caller-id:"),
    ({"dial_string": "sofia/gateway/carrier/"}, "dial-string:"),
    ({"calls_per_second": float("nan")}, "calls-per-second: a number above 0, got nan"),
    ({"calls_per_second": float("inf")}, "calls-per-second: a number above 0, got inf"),
    ({"calls_per_second": 0.0}, "calls-per-second: a number above 0, got 0"),
    ({"max_in_flight": -1}, "max-in-flight: at least 1, got -1"),
    ({"daily_cap": 0}, "daily-cap: at least 1, got 0"),
    ({"max_duration": 5}, "max-duration: at least 10 seconds, got 5"),
    ({"ring_tone": "%(2000,4000,440,480"}, "ring-tone: a TGML tone"),
    # what the switch would be sent must pass the same rule: a stutter tone past its length is refused here
    ({"ring_tone": "tone_stream://" + ";".join(["%(100,100,350,440)"] * 6 + ["%(1000,4000,350,440)"])},
     "ring-tone: a TGML tone"),
    # what the store cannot hold was a 500 on the admin page and a traceback from the CLI
    ({"max_in_flight": 10**20}, "max-in-flight: at most 2147483647"),
    ({"daily_cap": 2**31}, "daily-cap: at most 2147483647"),
    ({"max_duration": 2**40}, "max-duration: at most 2147483647"),
    ({"name": "acme\x00"}, "name: no control characters"),
    ({"name": "acme\ntoken: cb_x"}, "name: no control characters"),
    ({"extension_pattern": "^1\x00$"}, "extension-pattern: no control characters"),
    ({"extension_pattern": "^[0-9]{3}$" + "|1" * 100}, "extension-pattern: at most 128 characters"),
    # a webhook URL no request can be sent to was taken, and every call's webhook then failed
    ({"webhook_url": "http://"}, "webhook-url: an http or https URL with a host"),
    ({"webhook_url": "http://hooks.example/a\r\nX-Evil: 1"}, "webhook-url: an http or https URL with a host"),
    ({"webhook_url": "http://hooks.example/a b"}, "webhook-url: an http or https URL with a host"),
    ({"webhook_url": "http://hooks.example:99999/"}, "webhook-url: an http or https URL with a host"),
    ({"webhook_url": "https://hooks.example/" + "a" * 500}, "webhook-url: at most 500 characters"),
])
def test_endpoint_options_are_checked(db: Database, options: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "x", "caller_id_number": "15550000000",
                            "dial_string": "sofia/gateway/carrier/{number}"}
    base.update(options)
    with pytest.raises(EndpointError, match=message.replace("(", r"\(")):
        create_endpoint(EndpointOptions(**base))


def test_a_ring_tone_an_endpoint_takes_is_one_a_call_can_play(make_endpoint: Any) -> None:
    tone = "tone_stream://" + ";".join(["%(100,100,350,440)"] * 4 + ["%(1000,4000,350,440)"])
    endpoint = make_endpoint(ring_tone=tone)[0]
    assert fs.tone_playback(endpoint.ring_tone) == tone and fs.ring_tone(endpoint.ring_tone) == tone


def test_duplicate_name(make_endpoint: Any) -> None:
    make_endpoint(name="same")
    with pytest.raises(EndpointError, match="already exists"):
        make_endpoint(name="same")


def test_a_name_taken_between_the_look_and_the_write_is_a_named_error(
        make_endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another admin (or the CLI) takes the name after it was looked at: the unique index refuses ours.
    first, _ = make_endpoint(name="first")
    new_token = endpoints.new_token

    def token_while_another_takes_the_name() -> str:
        Endpoint.update(name="same").where(Endpoint.id == first.id).execute()
        return new_token()

    monkeypatch.setattr(endpoints, "new_token", token_while_another_takes_the_name)
    with pytest.raises(EndpointError, match="name: an endpoint named 'same' already exists"):
        make_endpoint(name="same")
    second, _ = make_endpoint(name="second")
    options = endpoints.options_of(second)
    options.name, options.webhook_url = "renamed", "https://hooks.example.com/calls"
    token_urlsafe = endpoints.secrets.token_urlsafe

    def secret_while_another_takes_the_name(size: int) -> str:  # made after the look, before the write
        Endpoint.update(name="renamed").where(Endpoint.id == first.id).execute()
        return token_urlsafe(size)

    monkeypatch.setattr(endpoints.secrets, "token_urlsafe", secret_while_another_takes_the_name)
    with pytest.raises(EndpointError, match="name: an endpoint named 'renamed' already exists"):
        endpoints.update_endpoint(second, options)
    assert Endpoint.get_by_id(second.id).name == "second"


@pytest.mark.parametrize("pattern", [r"^[0-9]{3,4}$", r"^(100|200|3[0-9]{2})$", r"^9(00)?[0-9]{2}$", r"^[)(]+\d$",
                                     r"^\)+$"])
def test_extension_patterns_that_match_in_linear_time_are_taken(db: Database, pattern: str) -> None:
    endpoint, _ = create_endpoint(EndpointOptions(name="x", caller_id_number="15550000000",
                                                  dial_string="sofia/gateway/carrier/{number}",
                                                  extension_pattern=pattern))
    assert endpoint.extension_pattern == pattern


def test_the_cli_shows_a_webhook_urls_password_as_stars(make_endpoint: Any) -> None:
    """Basic auth for the receiver goes in the URL; what `endpoint list` prints lands in tickets and logs."""
    endpoint = make_endpoint(webhook_url="https://hooks:s3cret@hooks.example/cb?x=1")[0]
    assert describe(endpoint)["webhook_url"] == "https://hooks:****@hooks.example/cb?x=1"
    assert endpoint.webhook_url == "https://hooks:s3cret@hooks.example/cb?x=1"  # sent as it is
