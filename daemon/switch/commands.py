"""The one place where text bound for FreeSWITCH is composed.

Everything callbridge sends over the Event Socket (originate lines, variable blocks, dial strings,
application arguments, file paths, ``sendmsg`` messages, ``uuid_*`` commands) is built here, from
values that are checked against whitelists first. The rules:

* CR, LF and NUL never pass: on the Event Socket they end a command and start another.
* Values inside ``{...}`` / ``[...]`` variable blocks come from whitelists (digits, UUIDs, a bounded
  set of characters for caller ID names); commas, braces, brackets, quotes, ``^^`` and ``$`` are
  refused, so a value can neither end the block nor expand a variable.
* ``${`` never reaches an application argument, and the A leg is originated with
  ``app_disable_expand_variables=true`` as a second wall.
* Application arguments travel in a ``sendmsg`` body (``content-length``), never in a header.
* FreeSWITCH plays only files the daemon made (paths under its media folder, or its own media URL),
  never a client-chosen scheme such as ``shell_stream://`` or a client path.

Anything that fails a rule raises ``UnsafeValue``; callers treat it as a bug or a bad request, never
as something to send anyway.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from daemon.store import CALLID_RE

CALLID_VAR = "cb_callid"
# What uuid_getvar, uuid_kill, uuid_break and the like answer for a channel that is not there (trace 16d).
NO_SUCH_CHANNEL = "-ERR No such channel!"


class UnsafeValue(ValueError):
    """A value would break out of the FreeSWITCH command or variable it is meant for."""


class DialStringError(ValueError):
    """An endpoint's dial string template is unusable."""


UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
NUMBER_RE = re.compile(r"^\+?[0-9]{1,20}$")
VAR_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Bare values allowed in a variable block: no separators, quotes, braces or expansion characters.
BARE_VALUE_RE = re.compile(r"^[A-Za-z0-9_.:/@+%()=;#-]{0,200}$")
CALLER_NAME_RE = re.compile(r"^[A-Za-z0-9 ._-]{0,40}$")
DIAL_TEMPLATE_RE = re.compile(r"^[A-Za-z0-9_./@:+=-]*\{number\}[A-Za-z0-9_./@:+=-]*$")
FILE_RE = re.compile(r"^/[A-Za-z0-9_./-]{1,400}$")
MEDIA_URL_RE = re.compile(r"^https?://[A-Za-z0-9.:\[\]-]+(/[A-Za-z0-9_./-]*)?$")
TONE_RE = re.compile(r"^(%\([0-9,]{1,60}\)|tone_stream://[%()0-9,;.a-z=]{1,120})$")
CAUSE_RE = re.compile(r"^[A-Z_]{3,40}$")
FORBIDDEN = ("\r", "\n", "\0")


def _plain(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise UnsafeValue(f"{what}: not text")
    if "\r" in value or "\n" in value or "\0" in value:  # FORBIDDEN, spelled out: read for every value sent
        raise UnsafeValue(f"{what}: contains a line break or NUL")
    if "${" in value:  # (also "$${")
        raise UnsafeValue(f"{what}: contains a variable expansion")
    return value


def _whitelisted(value: str, what: str, rule: re.Pattern[str], unless: str) -> str:
    """``value`` when it is plain and fully matches ``rule``; else UnsafeValue saying what it is not."""
    if not rule.fullmatch(_plain(value, what)):
        raise UnsafeValue(f"{what}: {value!r} {unless}")
    return value


def uuid(value: str) -> str:
    return _whitelisted(value, "uuid", UUID_RE, "is not a lowercase UUID")


def number(value: str) -> str:
    return _whitelisted(value, "number", NUMBER_RE, "is not digits with an optional leading +")


def cause(value: str) -> str:
    return _whitelisted(value, "cause", CAUSE_RE, "is not a hangup cause name")


def check_dial_template(template: str) -> str:
    """Accept a template such as ``sofia/gateway/carrier/{number}``; raise DialStringError otherwise."""
    if any(ch in template for ch in FORBIDDEN) or not DIAL_TEMPLATE_RE.fullmatch(template):
        raise DialStringError("must hold {number} once and otherwise only letters, digits and _ . / @ : + = -")
    if template.count("{number}") != 1:
        raise DialStringError("must hold {number} exactly once")
    return template


def dial_string(template: str, phone: str) -> str:
    return check_dial_template(template).replace("{number}", number(phone))


def _var_value(name: str, value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    _plain(value, name)
    if name.endswith("caller_id_name"):
        if not CALLER_NAME_RE.fullmatch(value):
            raise UnsafeValue(f"{name}: {value!r} has characters outside letters, digits, space . _ -")
        # FreeSWITCH splits originate arguments on spaces; single quotes keep a name whole.
        return f"'{value}'" if " " in value else value
    if not BARE_VALUE_RE.fullmatch(value):
        raise UnsafeValue(f"{name}: {value!r} has characters that could end the variable block")
    return value


def var_block(variables: Mapping[str, str | int | bool], brackets: str = "{}") -> str:
    """``{name=value,...}`` from checked names and values, in the given order."""
    parts = []
    for name, value in variables.items():
        if not VAR_NAME_RE.fullmatch(name):
            raise UnsafeValue(f"variable name {name!r} is not allowed")
        parts.append(f"{name}={_var_value(name, value)}")
    return brackets[0] + ",".join(parts) + brackets[1]


def leg_variables(*, leg_uuid: str, callid: str, caller_id_number: str, caller_id_name: str,
                  originate_timeout: int) -> dict[str, str | int | bool]:
    """The variables every leg we originate carries."""
    _whitelisted(callid, "callid", CALLID_RE, "is not ours")
    variables: dict[str, str | int | bool] = {
        "origination_uuid": uuid(leg_uuid),
        "origination_caller_id_number": number(caller_id_number),
    }
    if caller_id_name:
        variables["origination_caller_id_name"] = caller_id_name
    variables.update({
        "ignore_early_media": True,
        "originate_timeout": int(originate_timeout),
        CALLID_VAR: callid,
    })
    return variables


def originate_a(*, template: str, phone: str, variables: Mapping[str, str | int | bool]) -> str:
    """The ``originate`` line for leg A, parked on answer; expansion is switched off on the channel."""
    block = dict(variables)
    block["app_disable_expand_variables"] = True
    return f"originate {var_block(block)}{dial_string(template, phone)} &park()"


def bridge_target(*, template: str, phone: str, variables: Mapping[str, str | int | bool]) -> str:
    """The ``bridge`` application's argument that dials B."""
    return f"{var_block(variables)}{dial_string(template, phone)}"


def media_path(path: str, *, media_root: str) -> str:
    """A file the daemon made: absolute, plain characters, inside its media folder."""
    _plain(path, "file")
    if not FILE_RE.fullmatch(path) or "/../" in path or path.endswith("/.."):
        raise UnsafeValue(f"file: {path!r} is not a plain absolute path")
    if not path.startswith(media_root.rstrip("/") + "/"):
        raise UnsafeValue(f"file: {path!r} is not under {media_root}")
    return path


def http_cache_url(url: str) -> str:
    """Our own media URL wrapped for FreeSWITCH's mod_http_cache."""
    if not MEDIA_URL_RE.fullmatch(_plain(url, "media url")):
        raise UnsafeValue(f"media url: {url!r} is not a plain http(s) URL")
    return "http_cache://" + url


def media_target(target: str, *, media_root: str, media_base_url: str) -> str:
    """What FreeSWITCH is told to play: one of our files, or our own media route through http_cache."""
    _plain(target, "media")
    if target.startswith("/"):
        return media_path(target, media_root=media_root)
    prefix = "http_cache://" + media_base_url.rstrip("/") + "/media/"
    name = target[len(prefix):] if media_base_url and target.startswith(prefix) else ""
    if not re.fullmatch(r"[0-9a-f]{64}\.wav", name) or not MEDIA_URL_RE.fullmatch(target[len("http_cache://"):]):
        raise UnsafeValue(f"media: {target!r} is neither our file nor our media URL")
    return target


def ring_tone(tone: str) -> str:
    if not TONE_RE.fullmatch(_plain(tone, "ring tone")):
        raise UnsafeValue(f"ring tone: {tone!r} is not a TGML tone")
    return tone


def set_arg(name: str, value: str | int | bool) -> str:
    """Argument of the ``set`` application: ``name=value``."""
    if not VAR_NAME_RE.fullmatch(name):
        raise UnsafeValue(f"variable name {name!r} is not allowed")
    if isinstance(value, bool):
        value = "true" if value else "false"
    value = _plain(str(value), name)
    if not (BARE_VALUE_RE.fullmatch(value) or FILE_RE.fullmatch(value) or TONE_RE.fullmatch(value)
            or value.startswith("http_cache://") and MEDIA_URL_RE.fullmatch(value[len("http_cache://"):])):
        raise UnsafeValue(f"{name}: {value!r} is not a plain value")
    return f"{name}={value}"


def tone_playback(tone: str) -> str:
    """A ring tone as something ``playback`` plays: TGML ``%(...)`` becomes ``tone_stream://%(...)``
    (which FreeSWITCH repeats until broken)."""
    tone = ring_tone(tone)
    return tone if tone.startswith("tone_stream://") else "tone_stream://" + tone


def multiset_arg(variables: Mapping[str, str | int | bool]) -> str:
    """Argument of the ``multiset`` application: ``name=value`` pairs, checked as :func:`set_arg` checks
    one, separated by spaces (no checked value holds a space)."""
    pairs = [set_arg(name, value) for name, value in variables.items()]
    if any(" " in pair for pair in pairs) or any(pair.startswith("^^") for pair in pairs):
        raise UnsafeValue("multiset: a value holds a space or a delimiter change")
    return " ".join(pairs)


def sendmsg_execute(channel: str, app: str, arg: str, *, event_uuid: str, lock: bool = True,
                    loops: int | None = None) -> str:
    """A ``sendmsg`` that queues ``app arg`` on a channel; the argument goes in the body. ``loops``: run it
    that many times (-1: until ``uuid_break``; a round under half a second is not repeated).

    Returns the whole ESL message including the blank line and body; send it as is.
    """
    if not re.fullmatch(r"^[a-z_]{2,40}$", app):
        raise UnsafeValue(f"application {app!r} is not allowed")
    _plain(arg, app)
    body = arg.encode("utf-8")
    headers = [
        f"sendmsg {uuid(channel)}",
        "call-command: execute",
        f"execute-app-name: {app}",
        f"Event-UUID: {uuid(event_uuid)}",
    ]
    if lock:
        headers.append("event-lock: true")
    if loops is not None:
        if not isinstance(loops, int) or isinstance(loops, bool) or loops == 0 or loops < -1:
            raise UnsafeValue(f"loops: {loops!r} is not a positive count or -1")
        headers.append(f"loops: {loops}")
    if body:
        headers += ["content-type: text/plain", f"content-length: {len(body)}"]
    return "\n".join(headers) + "\n\n" + arg


def uuid_kill(channel: str, hangup_cause: str = "NORMAL_CLEARING") -> str:
    return f"uuid_kill {uuid(channel)} {cause(hangup_cause)}"


def uuid_break(channel: str, *, flush: bool = False) -> str:
    """Stop what the channel plays (a looped application stops looping); ``flush`` also drops every
    application queued on it."""
    return f"uuid_break {uuid(channel)}" + (" all" if flush else "")


def core_status() -> str:
    """``status``: uptime, the sessions now, the sessions-per-second limit and max sessions."""
    return "status"


FSCTL_READABLE = ("sps", "max_sessions")


def fsctl_read(name: str) -> str:
    """``fsctl sps`` / ``fsctl max_sessions`` with no value: reads the limit, changes nothing."""
    if name not in FSCTL_READABLE:
        raise UnsafeValue(f"fsctl {name!r} is not a read-only query callbridge makes")
    return f"fsctl {name}"


def core_uuid_query() -> str:
    """The switch's Core-UUID (a new one means FreeSWITCH restarted)."""
    return "global_getvar core_uuid"


def uuid_exists(channel: str) -> str:
    return f"uuid_exists {uuid(channel)}"


def uuid_setvar(channel: str, name: str, value: str | int | bool) -> str:
    """``uuid_setvar <uuid> <name> <value>``: a plain value (checked as ``set`` checks one), no space."""
    pair = set_arg(name, value)
    if " " in pair:
        raise UnsafeValue(f"{name}: a value with a space")
    return f"uuid_setvar {uuid(channel)} {pair.replace('=', ' ', 1)}"


def uuid_getvar(channel: str, name: str) -> str:
    if not VAR_NAME_RE.fullmatch(name):
        raise UnsafeValue(f"variable name {name!r} is not allowed")
    return f"uuid_getvar {uuid(channel)} {name}"


def uuid_record_start(channel: str, path: str, *, recordings_dir: str) -> str:
    return f"uuid_record {uuid(channel)} start {media_path(path, media_root=recordings_dir)}"


def _event_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    for name in names:
        if not re.fullmatch(r"^[A-Z_]+$", name):
            raise UnsafeValue(f"event name {name!r} is not allowed")
    return names


def event_subscription(names: Iterable[str]) -> str:
    return "event plain " + " ".join(_event_names(names))


def event_filters(names: Iterable[str], *, ignored_apps: Iterable[str] = ()) -> list[str]:
    """The ``filter`` commands that let through the events ``names`` only, and of those not the app
    events (CHANNEL_EXECUTE, CHANNEL_EXECUTE_COMPLETE: the only ones with an ``Application`` header) of
    ``ignored_apps``. mod_event_socket's event_handler (1.10): once a connection has a filter, an event
    passes only when a positive filter matches it, and a matching negative one (value led by ``-``)
    drops it whatever matched before; a filter on a header the event lacks does not count."""
    apps = list(ignored_apps)
    for app in apps:
        if not re.fullmatch(r"^[a-z_]+$", app):
            raise UnsafeValue(f"application name {app!r} is not allowed")
    return [f"filter Event-Name {name}" for name in _event_names(names)] + [f"filter Application -{app}" for app in apps]
