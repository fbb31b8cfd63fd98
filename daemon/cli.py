"""Command line: ``python -m daemon run|check-config|endpoint ...|user ...|calls ...``.

Operator commands work on the same database as the service (``--config`` / ``CALLBRIDGE_*``), so
they run beside a live daemon; ``calls hangup`` talks to FreeSWITCH directly by the leg UUID the
daemon stored.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from peewee import OperationalError

from daemon.accounts import users
from daemon.accounts.endpoints import (
    EndpointError,
    EndpointOptions,
    assign_owner,
    create_endpoint,
    describe,
    disable_endpoint,
    enable_endpoint,
    find_endpoint,
    rotate_token,
)
from daemon.calls.records import CallRecords
from daemon.calls.view import call_view, iso, timeline_view
from daemon.config import ConfigError, Settings, load_settings, mask_url, switch_sent_to, unknown_variables
from daemon.store import Account, Call, CallStatus, Endpoint, open_database


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, default=str, ensure_ascii=False))
    elif isinstance(obj, list):
        if not obj:
            print("(none)")
        for row in obj:
            print(_row(row))
    else:
        for key, value in obj.items():
            if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
                print(f"{key}:")  # a call's timeline: a step a line
                for item in value:
                    print("  " + _row(item))
            else:
                print(f"{key}: {_shown(value)}")


def _row(row: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_shown(v)}" for k, v in row.items())


def _shown(value: Any) -> str:
    """A value as a person reads it: nested objects as JSON, not Python's repr."""
    if isinstance(value, dict | list):
        return json.dumps(value, default=str, ensure_ascii=False)
    return "" if value is None else str(value)


CONFIG_HELP = "TOML settings file (default: $CALLBRIDGE_CONFIG)"


def _as_configured(settings: Settings) -> dict[str, str]:
    """The effective settings (secrets masked) as they are written in the file: true/false, lists and
    lang=voice pairs comma-separated, and the paths a default stands for."""
    def text(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            return ", ".join(f"{k}={v}" for k, v in value.items())
        if isinstance(value, list):
            return ", ".join(text(v) for v in value) or "(none)"
        return str(value)

    shown = settings.masked()
    shown["switches"] = [f"{sw['host']}:{sw['port']}:{sw['password']}" for sw in shown["switches"]] or [
        "(the one at esl_host:esl_port)"]
    shown["portal_secret_key_file"] = str(settings.portal_secret_key_path)
    return {name: text(value) for name, value in shown.items()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m daemon", description="callbridge: phone call bridge daemon")
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--check-config", action="store_true", help="print the effective settings and exit")
    sub = p.add_subparsers(dest="command")
    for name, text in (("run", "run the service (also what no command does)"),
                       ("check-config", "print the effective settings (secrets masked) and exit")):
        sub.add_parser(name, help=text)

    ep = sub.add_parser("endpoint", help="manage endpoints and their tokens").add_subparsers(dest="action",
                                                                                             required=True)
    add = ep.add_parser("add", help="create an endpoint; prints its token once")
    add.add_argument("--name", required=True)
    add.add_argument("--caller-id", required=True, help="caller ID number shown to A and B")
    add.add_argument("--caller-id-name", default="", help="caller ID name sent with the number")
    add.add_argument("--dial-string", required=True, help="FreeSWITCH dial string with {number}")
    add.add_argument("--record", action="store_true", help="record bridged calls")
    add.add_argument("--timezone", default="UTC", help="IANA zone of call_date (default UTC; e.g. America/New_York)")
    add.add_argument("--max-in-flight", type=int, default=10, help="calls in progress at once (default 10)")
    add.add_argument("--calls-per-second", type=float, default=5.0, help="new calls started per second (default 5)")
    add.add_argument("--max-duration", type=int, default=3600,
                     help="seconds from A's answer until FreeSWITCH hangs up (default 3600, at least 10)")
    add.add_argument("--daily-cap", type=int, default=1000,
                     help="calls started per UTC day (from 00:00 UTC); "
                          "a call past it fails 'daily cap of N calls reached'")
    add.add_argument("--allowed-prefixes", default="", help="comma-separated digit prefixes; empty: any")
    add.add_argument("--extension-pattern", default="", help="regex for short internal numbers")
    add.add_argument("--webhook-url", default="", help="POST each status change here (prints a webhook_secret once)")
    add.add_argument("--ring-tone", default="%(2000,4000,440,480)",
                     help="TGML tone A hears while B rings when a call has no dialtone_url")
    add.add_argument("--owner", metavar="EMAIL", help="the web account that sees this endpoint and its calls")
    for name, text in (("list", "every endpoint"), ("disable", "refuse its token at once; its pending calls fail when due"),
                       ("enable", "undo disable"), ("rotate", "a new token, printed once; the old one stops working"),
                       ("assign", "give the endpoint to a web account")):
        action = ep.add_parser(name, help=text)
        if name != "list":
            action.add_argument("endpoint", help="name or id")
    owner = ep.choices["assign"].add_mutually_exclusive_group(required=True)
    owner.add_argument("--owner", metavar="EMAIL", help="give the endpoint and its calls to this account")
    owner.add_argument("--no-owner", action="store_true", help="take it from its owner (admins only see it)")
    for action in ep.choices.values():
        action.add_argument("--json", action="store_true", help="print JSON")

    user = sub.add_parser("user", help="web accounts (the pages at /login)").add_subparsers(dest="action",
                                                                                          required=True)
    user_add = user.add_parser("add", help="create an account")
    user_add.add_argument("--email", required=True)
    user_add.add_argument("--admin", action="store_true", help="sees and manages every endpoint and account")
    user.add_parser("list", help="every account")
    for name, text in (("disable", "stop an account signing in (its sessions end)"),
                       ("enable", "let a disabled account sign in again"),
                       ("password", "set a new password (the account's sessions end)")):
        user.add_parser(name, help=text).add_argument("email")
    for name in ("add", "password"):
        user.choices[name].add_argument("--password-stdin", action="store_true",
                                        help="read the password from standard input (one line; on a terminal, asked twice); at least 10 characters")
    for action in user.choices.values():
        action.add_argument("--json", action="store_true", help="print JSON")

    calls = sub.add_parser("calls", help="look at and act on calls").add_subparsers(dest="action", required=True)
    calls.add_parser("in-flight", help="calls in progress with their phase").add_argument("--json", action="store_true")
    show = calls.add_parser("show", help="one call with its timeline")
    show.add_argument("callid")
    show.add_argument("--json", action="store_true")
    hang = calls.add_parser("hangup", help="hang up a call in progress")
    hang.add_argument("callid")
    hang.add_argument("--json", action="store_true")
    # --config is accepted after any command too: `run --config PATH`, `endpoint list --config PATH`.
    for command in (sub.choices["run"], sub.choices["check-config"], *ep.choices.values(), *user.choices.values(),
                    *calls.choices.values()):
        command.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
    return p


def _endpoint_command(args: argparse.Namespace) -> Any:
    if args.action == "add":
        endpoint, token = create_endpoint(EndpointOptions(
            name=args.name, caller_id_number=args.caller_id, caller_id_name=args.caller_id_name,
            dial_string=args.dial_string, record=args.record, timezone=args.timezone,
            max_in_flight=args.max_in_flight, calls_per_second=args.calls_per_second,
            max_duration=args.max_duration, daily_cap=args.daily_cap, allowed_prefixes=args.allowed_prefixes,
            extension_pattern=args.extension_pattern, webhook_url=args.webhook_url, ring_tone=args.ring_tone),
            owner=_owner(args.owner) if args.owner else None)
        out = describe(endpoint)
        out["token"] = token
        if endpoint.webhook_secret:
            out["webhook_secret"] = endpoint.webhook_secret
        return out
    if args.action == "list":
        return [describe(e) for e in Endpoint.select().order_by(Endpoint.id)]
    endpoint = find_endpoint(args.endpoint)
    if args.action == "disable":
        disable_endpoint(endpoint)
        return describe(endpoint)
    if args.action == "enable":
        enable_endpoint(endpoint)
        return describe(endpoint)
    if args.action == "assign":
        assign_owner(endpoint, None if args.no_owner else _owner(args.owner))
        return describe(endpoint)
    token = rotate_token(endpoint)
    return {**describe(endpoint), "token": token}


def _owner(email: str) -> Account:
    try:
        return users.find_account(email)
    except users.AccountError as exc:
        raise EndpointError(f"owner: {exc}") from None


def _read_password(args: argparse.Namespace) -> str:
    if not args.password_stdin:
        raise users.AccountError("password: give it on standard input with --password-stdin "
                                 "(e.g. printf '%s\\n' \"$PW\" | python -m daemon user add ...)")
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise users.AccountError("password: the two entries differ")
        return first
    return sys.stdin.readline().removesuffix("\n").removesuffix("\r")


def _user_command(args: argparse.Namespace) -> Any:
    if args.action == "add":
        return users.describe(users.create_account(args.email, _read_password(args), is_admin=args.admin))
    if args.action == "list":
        return [users.describe(a) for a in Account.select().order_by(Account.email)]
    account = users.find_account(args.email)
    if args.action == "password":
        users.set_password(account, _read_password(args))
    else:
        users.set_enabled(account, args.action == "enable")
    return users.describe(account)


def _calls_command(args: argparse.Namespace, settings: Settings) -> Any:
    if args.action == "in-flight":
        rows = CallRecords.in_flight()
        return [{"callid": c.callid, "phase": c.status, "phone_a": c.phone_a, "phone_b": c.phone_b,
                 "started_at": iso(c.started_at)} for c in rows]
    call = CallRecords.find(args.callid)
    if call is None:
        raise EndpointError(f"callid {args.callid!r}: no such call")
    if args.action == "show":
        return {**call_view(call, call.endpoint), "timeline": timeline_view(CallRecords.timeline(call))}
    return hangup_call(call, settings)


# How long a hangup goes on trying to kill an A whose originate may be on its way to the switch.
HANGUP_CHASE = 3.0  # seconds


def hangup_call(call: Call, settings: Settings, *, by: str = "the operator") -> dict[str, Any]:
    """Hang up a call in progress: ``uuid_kill`` of A over a connection of its own (the daemon's engine
    sees the hangup events and ends the call as usual). The operator command and the admin page use it.

    The request is committed first (``CallRecords.request_hangup``): from then on the daemon sends no
    originate of A, so a call whose A is not up yet (waiting for the switch's room, or between refused
    attempts) ends ``canceled`` instead of ringing later. An originate that may already be on its way is
    chased: the kill is tried again for a few seconds until A's channel exists or the call has ended."""
    import gevent

    from daemon.switch import commands as fs
    from daemon.switch.esl import EslConnection, EslError

    if not CallStatus(call.status).in_flight or not call.a_uuid:
        raise EndpointError(f"callid {call.callid}: not in progress (status {call.status})")
    switch = switch_sent_to(settings.switch_addresses, call.switch)
    if switch is None:
        raise EndpointError(f"callid {call.callid}: its switch {call.switch} is not in the settings; give this "
                            "command the daemons' switches (--config, or CALLBRIDGE_SWITCHES)")
    try:
        a_may_be_dialed = CallRecords.request_hangup(call, by=by)
    except OperationalError as exc:
        raise EndpointError(f"callid {call.callid}: the store did not take the hangup: {exc}") from None
    conn = EslConnection(switch.host, switch.port, switch.password,
                         connect_timeout=settings.esl_command_timeout, command_timeout=settings.esl_command_timeout)
    deadline = time.monotonic() + HANGUP_CHASE
    try:
        conn.connect()
        while True:
            reply = conn.api(fs.uuid_kill(call.a_uuid, "NORMAL_CLEARING")).strip()
            if reply.startswith("+OK") or not a_may_be_dialed or time.monotonic() >= deadline:
                break
            if CallStatus(Call.get_by_id(call.id).status).final:
                break
            gevent.sleep(0.1)
    except EslError as exc:
        raise EndpointError(f"FreeSWITCH at {switch.name}: {exc}") from None
    finally:
        conn.close()
    result: dict[str, Any] = {"callid": call.callid, "freeswitch": reply}
    if not reply.startswith("+OK"):
        result["note"] = ("A's channel was not found: the daemon sends no originate of A from now on; a call "
                          "whose A was not dialed yet ends canceled")
    return result


def _store_unavailable(settings: Settings, exc: Exception) -> int:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"callbridge: database_url {mask_url(settings.database_url)}: cannot open the store: {reason}",
          file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"callbridge: configuration error: {exc}", file=sys.stderr)
        return 2
    for warning in unknown_variables():
        print(f"callbridge: warning: {warning}", file=sys.stderr)
    if args.check_config or args.command == "check-config":
        for name, value in _as_configured(settings).items():
            print(f"{name}: {value}")
        return 0
    if args.command in (None, "run"):
        from daemon.ops.instance import AlreadyRunning
        from daemon.ops.logs import configure
        from daemon.service import ListenError, Service

        configure(settings.log_format, settings.log_level)
        try:
            service = Service(settings)
        except OperationalError as exc:
            return _store_unavailable(settings, exc)
        except ConfigError as exc:  # a path to make at start (state_dir, portal_secret_key_file)
            print(f"callbridge: configuration error: {exc}", file=sys.stderr)
            return 2
        try:
            service.run_forever()
        except (ListenError, AlreadyRunning) as exc:
            print(f"callbridge: {exc}", file=sys.stderr)
            return 2
        except ConfigError as exc:  # the store's lock file cannot be made
            print(f"callbridge: configuration error: {exc}", file=sys.stderr)
            return 2
        return service.exit_code
    try:
        open_database(settings.database_url)
    except OperationalError as exc:
        return _store_unavailable(settings, exc)
    try:
        if args.command == "endpoint":
            result = _endpoint_command(args)
        elif args.command == "user":
            result = _user_command(args)
        else:
            result = _calls_command(args, settings)
    except (EndpointError, users.AccountError) as exc:
        print(f"callbridge: {exc}", file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0
