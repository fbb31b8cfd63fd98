"""Endpoints and their tokens: create, list, disable, rotate, and authenticate a presented token.

A token is 192 random bits (``secrets.token_urlsafe``) shown once at creation or rotation. The store
keeps only its SHA-256: tokens are random, not passwords, so an unsalted fast hash is enough and a
lookup is one indexed equality on the hash, whose cost does not depend on how much of a guess is
right. The final comparison uses ``hmac.compare_digest`` all the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from peewee import IntegrityError

from daemon.accounts.users import has_control
from daemon.config import ConfigError, mask_url, zone
from daemon.store import Account, Endpoint, precompiled, select_rows, utcnow
from daemon.switch.commands import (
    CALLER_NAME_RE,
    DialStringError,
    UnsafeValue,
    check_dial_template,
    ring_tone,
)
from daemon.writer import write

TOKEN_PREFIX = "cb_"


class EndpointError(ValueError):
    """An operator gave a wrong value; the message names the option and the rule."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(24)


def token_hint(token: str) -> str:
    """What lists and logs show of a token: enough to tell two apart, useless to an attacker."""
    return token[: len(TOKEN_PREFIX) + 4] + "…"


CALLER_ID_NUMBER = re.compile(r"^\+?[0-9]{1,20}$")
PREFIXES = re.compile(r"^(\+?[0-9]+)(,\+?[0-9]+)*$")
# The store's columns (PostgreSQL refuses what does not fit, SQLite an integer past 64 bits).
RING_TONE_MAX = Endpoint.ring_tone.max_length
EXTENSION_PATTERN_MAX = Endpoint.extension_pattern.max_length
WEBHOOK_URL_MAX = Endpoint.webhook_url.max_length
INTEGER_MAX = 2**31 - 1  # PostgreSQL's INTEGER
NO_CONTROL = "no control characters (line breaks, tabs, NUL ...)"


@dataclass
class EndpointOptions:
    name: str
    caller_id_number: str
    dial_string: str
    caller_id_name: str = ""
    record: bool = False
    timezone: str = "UTC"
    max_in_flight: int = 10
    calls_per_second: float = 5.0
    max_duration: int = 3600
    daily_cap: int = 1000
    allowed_prefixes: str = ""
    extension_pattern: str = ""
    webhook_url: str = ""
    ring_tone: str = "%(2000,4000,440,480)"

    def check(self) -> None:
        if not self.name or len(self.name) > 100:
            raise EndpointError("name: required, at most 100 characters")
        if has_control(self.name):  # shown on pages, in lists and logs, and named on the command line
            raise EndpointError(f"name: {NO_CONTROL}")
        if not CALLER_ID_NUMBER.fullmatch(self.caller_id_number):
            raise EndpointError("caller-id: digits with an optional leading +, at most 20")
        if not CALLER_NAME_RE.fullmatch(self.caller_id_name):  # the rule the originate line is built with
            raise EndpointError("caller-id-name: at most 40 of letters, digits, space and . _ -")
        try:
            check_dial_template(self.dial_string)
        except DialStringError as exc:
            raise EndpointError(f"dial-string: {exc}") from None
        try:
            zone(self.timezone)
        except ConfigError as exc:
            raise EndpointError(str(exc)) from None
        for option, value, least in (("max-in-flight", self.max_in_flight, 1), ("daily-cap", self.daily_cap, 1),
                                     ("max-duration", self.max_duration, 10)):
            if value < least:
                unit = " seconds" if option == "max-duration" else ""
                raise EndpointError(f"{option}: at least {least}{unit}, got {value}")
            if value > INTEGER_MAX:
                raise EndpointError(f"{option}: at most {INTEGER_MAX}")
        if not 0 < self.calls_per_second < math.inf:  # (NaN compares false both ways)
            raise EndpointError(f"calls-per-second: a number above 0, got {self.calls_per_second:g}")
        if self.allowed_prefixes and not PREFIXES.fullmatch(self.allowed_prefixes):
            raise EndpointError("allowed-prefixes: comma-separated digit prefixes, e.g. 1555,1212")
        if self.extension_pattern:
            self._check_extension_pattern()
        if self.webhook_url:
            check_webhook_url(self.webhook_url)
        try:  # the rule the tone is sent to FreeSWITCH by, so that a tone stored is one a call can play
            ring_tone(self.ring_tone)
        except UnsafeValue:
            raise EndpointError("ring-tone: a TGML tone such as %(2000,4000,440,480) or "
                                "tone_stream://%(400,200,400,450);%(400,2000,400,450)") from None
        if len(self.ring_tone) > RING_TONE_MAX:
            raise EndpointError(f"ring-tone: at most {RING_TONE_MAX} characters")

    def _check_extension_pattern(self) -> None:
        if has_control(self.extension_pattern):
            raise EndpointError(f"extension-pattern: {NO_CONTROL}")
        if len(self.extension_pattern) > EXTENSION_PATTERN_MAX:
            raise EndpointError(f"extension-pattern: at most {EXTENSION_PATTERN_MAX} characters")
        try:
            re.compile(self.extension_pattern)
        except (re.error, OverflowError) as exc:  # (OverflowError: a repeat count past what re can count)
            raise EndpointError(f"extension-pattern: not a regular expression ({exc})") from None
        if (problem := slow_to_match(self.extension_pattern)) is not None:
            raise EndpointError(f"extension-pattern: {problem}")


def slow_to_match(pattern: str) -> str | None:
    """Why ``pattern`` could take exponential time to match a number, or None. Python's ``re`` backtracks:
    a repeated group (``(1+)+2``) or a back-reference can take minutes on a 20-digit number, and a create
    request's number is matched on the event loop that runs every call. So a group may be optional
    (``(...)?``) but not repeated, and there are no back-references; write ``[0-9]{3,4}``, not ``([0-9])+``."""
    in_class = escaped = False
    after_group = False  # the last thing read closed a group
    for char in pattern:
        if escaped:
            escaped = False
            if not in_class and char.isdigit() and char != "0":
                return "no back-references (\\1 ...): they can take exponential time to match"
            after_group = False
            continue
        if char == "\\":
            escaped = True
        elif in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif after_group and char in "*+{":
            return ("a group may not be repeated (*, + or {m,n} after a group): such a pattern can take "
                    "exponential time to match; repeat a character or a class instead, e.g. [0-9]{3,4}")
        after_group = char == ")" and not in_class
    if "(?P=" in pattern:
        return "no back-references ((?P=name)): they can take exponential time to match"
    return None


def check_webhook_url(url: str) -> None:
    """The rule of a URL the webhook sender can POST to (http.client takes the host and port from it)."""
    if len(url) > WEBHOOK_URL_MAX:
        raise EndpointError(f"webhook-url: at most {WEBHOOK_URL_MAX} characters")
    rule = "webhook-url: an http or https URL with a host, of printable ASCII (percent-encode the rest)"
    if not all("!" <= ch <= "~" for ch in url):
        raise EndpointError(rule)
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname, parts.port  # .port: ValueError when out of range or not a number
    except ValueError:
        raise EndpointError(rule) from None
    if parts.scheme not in ("http", "https") or not host:
        raise EndpointError(rule)


def create_endpoint(options: EndpointOptions, owner: Account | None = None) -> tuple[Endpoint, str]:
    """Store a new endpoint; return it and its token (the only time the token exists in clear)."""
    options.check()
    if Endpoint.select().where(Endpoint.name == options.name).exists():
        raise EndpointError(f"name: an endpoint named {options.name!r} already exists")
    token = new_token()
    fields: dict[str, Any] = vars(options).copy()
    with _name_taken_meanwhile(options.name):
        endpoint = write(lambda: Endpoint.create(
            token_hash=hash_token(token), token_hint=token_hint(token),
            webhook_secret=secrets.token_urlsafe(32) if options.webhook_url else "",
            owner=owner.id if owner is not None else None, **fields))
    return endpoint, token


@contextlib.contextmanager
def _name_taken_meanwhile(name: str) -> Iterator[None]:
    """The name was free when looked at, and another admin (or CLI) took it before the write."""
    try:
        yield
    except IntegrityError:
        raise EndpointError(f"name: an endpoint named {name!r} already exists") from None


def options_of(endpoint: Endpoint) -> EndpointOptions:
    """The endpoint's current options, to edit and store back with :func:`update_endpoint`."""
    names = [f for f in EndpointOptions.__dataclass_fields__]
    return EndpointOptions(**{name: getattr(endpoint, name) for name in names})


def update_endpoint(endpoint: Endpoint, options: EndpointOptions) -> None:
    """Store edited options (limits, caller ID, recording...), checked by the same rules as ``add``.

    The token stays; a webhook secret is made when a webhook URL is first set.
    """
    options.check()
    if options.name != endpoint.name and Endpoint.select().where(Endpoint.name == options.name).exists():
        raise EndpointError(f"name: an endpoint named {options.name!r} already exists")
    for name, value in vars(options).items():
        setattr(endpoint, name, value)
    if options.webhook_url and not endpoint.webhook_secret:
        endpoint.webhook_secret = secrets.token_urlsafe(32)
    with _name_taken_meanwhile(options.name):
        write(endpoint.save)


def assign_owner(endpoint: Endpoint, owner: Account | None) -> None:
    """Give the endpoint (and so its calls, past and future) to ``owner``; None: admins only."""
    endpoint.owner = owner.id if owner is not None else None
    write(endpoint.save)


def find_endpoint(name_or_id: str) -> Endpoint:
    """The endpoint named ``name_or_id``, or with that id; EndpointError when none, or when the number is one
    endpoint's name and another's id (the commands rotate and disable: they must not pick one by chance)."""
    query = Endpoint.select().where(Endpoint.name == name_or_id)
    if name_or_id.isascii() and name_or_id.isdigit() and int(name_or_id) <= 2**63 - 1:
        query = Endpoint.select().where((Endpoint.name == name_or_id) | (Endpoint.id == int(name_or_id)))
    found = list(query.order_by(Endpoint.id).limit(2))
    if not found:
        raise EndpointError(f"endpoint {name_or_id!r}: no such endpoint")
    if len(found) > 1:
        named, numbered = found if found[0].name == name_or_id else found[::-1]
        raise EndpointError(f"endpoint {name_or_id!r}: both the endpoint named {name_or_id!r} (id {named.id}) and "
                            f"the endpoint with id {numbered.id} (named {numbered.name!r}); give the other name or "
                            "id of the one you mean")
    return found[0]


def rotate_token(endpoint: Endpoint) -> str:
    """Give the endpoint a new token; the old one stops working at once."""
    token = new_token()
    endpoint.token_hash = hash_token(token)
    endpoint.token_hint = token_hint(token)
    write(endpoint.save)
    return token


def disable_endpoint(endpoint: Endpoint) -> None:
    endpoint.enabled = False
    endpoint.disabled_at = utcnow()
    write(endpoint.save)


def enable_endpoint(endpoint: Endpoint) -> None:
    endpoint.enabled = True
    endpoint.disabled_at = None
    write(endpoint.save)


def authenticate(token: str | None) -> Endpoint | None:
    """The enabled endpoint that owns ``token``, or None."""
    if not token or len(token) > 200:
        return None
    wanted = hash_token(token)
    # Asked at every request: precompiled (peewee's select of an endpoint took ten times SQLite's answer).
    sql = precompiled("endpoint_by_token", lambda p: f'SELECT * FROM "endpoint" WHERE "token_hash" = {p}')
    endpoint = next(iter(select_rows(Endpoint, sql, (wanted,))), None)
    if endpoint is None or not hmac.compare_digest(endpoint.token_hash, wanted) or not endpoint.enabled:
        return None
    return endpoint


def describe(endpoint: Endpoint) -> dict[str, Any]:
    """An endpoint as the CLI prints it (never the token or its hash)."""
    return {
        "id": endpoint.id,
        "name": endpoint.name,
        "token_hint": endpoint.token_hint,
        "caller_id_number": endpoint.caller_id_number,
        "caller_id_name": endpoint.caller_id_name,
        "dial_string": endpoint.dial_string,
        "record": endpoint.record,
        "timezone": endpoint.timezone,
        "ring_tone": endpoint.ring_tone,
        "max_in_flight": endpoint.max_in_flight,
        "calls_per_second": endpoint.calls_per_second,
        "max_duration": endpoint.max_duration,
        "daily_cap": endpoint.daily_cap,
        "allowed_prefixes": endpoint.allowed_prefixes,
        "extension_pattern": endpoint.extension_pattern,
        "webhook_url": mask_url(endpoint.webhook_url),  # a password in it: sent, never printed
        "enabled": endpoint.enabled,
        "owner": owner_email(endpoint),
        "created_at": endpoint.created_at.isoformat() + "Z",
    }


def owner_email(endpoint: Endpoint) -> str | None:
    if endpoint.owner_id is None:
        return None
    owner = Account.get_or_none(Account.id == endpoint.owner_id)
    return owner.email if owner is not None else None
