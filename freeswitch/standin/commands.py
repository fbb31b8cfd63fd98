"""The ``api`` commands (mod_commands, mod_sofia status) with FreeSWITCH's reply texts."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

import gevent

from .apps import Session, schedule_hangup, transfer_target
from .causes import parse_cause
from .channel import Channel, QueuedApp
from .core import Switch
from .originate import originate, split_args
from .plan import far_end_hangup, send_dtmf

VERSION = "FreeSWITCH Version 1.10.12-release~64bit ( 64bit)\n"
NO_CHANNEL = "-ERR No such channel!\n"
INVALID_UUID = "-ERR Invalid uuid\n"
ORIGINATE_USAGE = (
    "-USAGE: <call url> <exten>|&<application_name>(<app_args>) [<dialplan>] [<context>] [<cid_name>] "
    "[<cid_num>] [<timeout_sec>]\n"
)
SHOW_USAGE = (
    "-USAGE: codec|endpoint|application|api|dialplan|file|timer|calls [count]|channels [count|like <match string>]"
    "|calls|detailed_calls|bridged_calls|detailed_bridged_calls|aliases|complete|chat|management|modules|nat_map"
    "|say|interfaces|interface_types|tasks|limits|status\n"
)
SHOW_COLUMNS = [
    "uuid", "direction", "created", "created_epoch", "name", "state", "cid_name", "cid_num", "ip_addr",
    "dest", "application", "application_data", "dialplan", "context", "read_codec", "read_rate",
    "read_bit_rate", "write_codec", "write_rate", "write_bit_rate", "secure", "hostname", "presence_id",
    "presence_data", "accountcode", "callstate", "callee_name", "callee_num", "callee_direction",
    "call_uuid", "sent_callee_name", "sent_callee_num", "initial_cid_name", "initial_cid_num",
    "initial_ip_addr", "initial_dest", "initial_dialplan", "initial_context",
]

CALL_COLUMNS = [
    "uuid", "direction", "created", "created_epoch", "name", "state", "cid_name", "cid_num", "ip_addr",
    "dest", "presence_id", "presence_data", "accountcode", "callstate", "callee_name", "callee_num",
    "callee_direction", "call_uuid", "hostname", "sent_callee_name", "sent_callee_num",
]
B_COLUMNS = [c for c in CALL_COLUMNS if c not in ("call_uuid", "hostname")]

# Rows appear in `show channels` this long (plan seconds) after CHANNEL_CREATE: the core db is async.
# The lag is never under SHOW_DB_MIN_LAG real seconds, so a quick look right after originate is empty.
SHOW_DB_DELAY = 1.0
SHOW_DB_MIN_LAG = 0.1

Handler = Callable[["Api", str], str]


class Api:
    """Executes api command lines against a switch."""

    handlers: dict[str, Handler] = {}

    def __init__(self, sw: Switch, introspect: Callable[[str], str] | None = None,
                 find: Callable[[str], Channel | None] | None = None) -> None:
        self.sw = sw
        self.introspect = introspect
        self.find = find or sw.all_channels.get  # any channel ever seen, for introspection

    @classmethod
    def command(cls, *names: str) -> Callable[[Handler], Handler]:
        """Register an api command handler under one or more names."""
        def register(fn: Handler) -> Handler:
            for name in names:
                cls.handlers[name] = fn
            return fn

        return register

    def execute(self, line: str) -> str:
        """Run ``cmd args``; unknown commands answer ``-ERR <cmd> Command not found!``."""
        cmd, _, args = line.strip().partition(" ")
        fn = self.handlers.get(cmd)
        if fn is None:
            return f"-ERR {cmd} Command not found!\n"
        result = fn(self, args.strip())
        if cmd != "standin" and self.sw.anyone_wants("API", None):
            # switch_api_execute announces every command it ran.
            ev = self.sw.events.new("API", ("switch_loadable_module.c", "switch_api_execute", 2954))
            ev.add("API-Command", cmd)
            if args.strip():
                ev.add("API-Command-Argument", args.strip())
            self.sw.fire(ev)
        return result

    def chan(self, uuid: str) -> Channel | None:
        """A live channel by uuid."""
        return self.sw.locate(uuid)


cmd = Api.command


def uptime_text(sw: Switch) -> str:
    """FreeSWITCH's uptime wording ("0 years, 0 days, 0 hours, ... microseconds"; "1 hour")."""
    up = sw.uptime()
    secs = int(up)
    ms = int((up - secs) * 1000)
    us = int((up - secs) * 1_000_000) % 1000
    d, rem = divmod(secs, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    y, d = divmod(d, 365)
    units = ((y, "year"), (d, "day"), (h, "hour"), (m, "minute"), (s, "second"), (ms, "millisecond"),
             (us, "microsecond"))
    return ", ".join(f"{n} {unit}{'' if n == 1 else 's'}" for n, unit in units)


@cmd("status")
def _status(api: Api, args: str) -> str:
    return (
        f"UP {uptime_text(api.sw)}\n"
        "FreeSWITCH (Version 1.10.12-release  64bit) is ready\n"
        f"{api.sw.limits.status_lines()}"
        "min idle cpu 0.00/98.70\nCurrent Stack Size/Max 240K/8192K\n"
    )


FSCTL_SYNTAX = (
    "[recover|send_sighup|hupall|pause [inbound|outbound]|resume [inbound|outbound]|shutdown "
    "[cancel|elegant|asap|now|restart]|sps|sync_clock|sync_clock_when_idle|reclaim_mem|max_sessions|"
    "min_dtmf_duration [num]|max_dtmf_duration [num]|default_dtmf_duration [num]|min_idle_cpu|"
    "loglevel [level]|debug_level [level]]"
)

# Real fsctl subcommands the stand-in does not act on (it says so rather than pretend).
FSCTL_NOT_SIMULATED = frozenset({
    "hupall", "recover", "flush_db_handles", "pause", "send_sighup", "resume", "calibrate_clock", "crash",
    "verbose_events", "api_expansion", "threaded_system_exec", "save_history", "pause_check", "ready_check",
    "shutdown_check", "shutdown", "debug_sql", "sql", "reclaim_mem", "min_idle_cpu", "max_dtmf_duration",
    "min_dtmf_duration", "default_dtmf_duration", "loglevel", "debug_level", "sync_clock", "sync_clock_when_idle",
})


def c_atoi(text: str) -> int:
    """C's atoi: leading blanks, a sign and digits; anything else ends the number (no digits: 0)."""
    digits = re.match(r"\s*([+-]?\d+)", text)
    return int(digits.group(1)) if digits else 0


@cmd("fsctl")
def _fsctl(api: Api, args: str) -> str:
    """The session-limit controls of mod_commands' fsctl: sps, max_sessions, last_sps."""
    parts = args.split()
    if not parts:
        return f"-USAGE: {FSCTL_SYNTAX}\n"
    what, value = parts[0].lower(), c_atoi(parts[1]) if len(parts) > 1 else 0
    limits = api.sw.limits
    if what == "sps":
        return f"+OK sessions per second: {limits.set_sps(value)}\n"
    if what == "max_sessions":
        return f"+OK max sessions: {limits.set_max_sessions(value)}\n"
    if what == "last_sps":
        limits.catch_up()
        return f"+OK last sessions per second: {limits.sps_last}\n"
    if what in FSCTL_NOT_SIMULATED:
        return f"-ERR fsctl {what} is not simulated by the stand-in\n"
    return f"-ERR INVALID COMMAND\nUSAGE: fsctl {FSCTL_SYNTAX}"


@cmd("version")
def _version(api: Api, args: str) -> str:
    return VERSION


@cmd("create_uuid")
def _create_uuid(api: Api, args: str) -> str:
    return api.sw.new_uuid()


@cmd("global_getvar")
def _global_getvar(api: Api, args: str) -> str:
    if not args:
        return "".join(f"{k}={v}\n" for k, v in api.sw.globals.items())
    return api.sw.globals.get(args, "")


@cmd("global_setvar")
def _global_setvar(api: Api, args: str) -> str:
    name, _, value = args.partition("=")
    api.sw.globals[name.strip()] = value.strip()
    return "+OK"


@cmd("eval")
def _eval(api: Api, args: str) -> str:
    return re.sub(r"\$\{([^${}]+)\}", lambda m: api.sw.globals.get(m.group(1), ""), args)


@cmd("hostname")
def _hostname(api: Api, args: str) -> str:
    return api.sw.events.hostname


@cmd("uptime")
def _uptime(api: Api, args: str) -> str:
    return str(int(api.sw.uptime()))


ChannelHandler = Callable[[Api, Channel, list[str]], str]


def uuid_cmd(*names: str, nargs: int = 1, usage: str | None = None, missing: str = NO_CHANNEL,
             maxsplit: int = -1, at: int = 0) -> Callable[[ChannelHandler], ChannelHandler]:
    """Register an api command that acts on one live channel: ``fn(api, channel, other_args)``.

    The arguments are split on spaces (``maxsplit`` as str.split); fewer than ``nargs`` answer
    ``usage`` (or ``missing`` when the command has no usage text), and a uuid (argument ``at``) that
    names no live channel answers ``missing``: each command's own FreeSWITCH wording.
    """
    def register(fn: ChannelHandler) -> ChannelHandler:
        def handler(api: Api, args: str) -> str:
            parts = args.split(" ", maxsplit) if maxsplit >= 0 else args.split()
            if len(parts) < nargs or not parts[at]:
                return usage or missing
            ch = api.chan(parts[at])
            if ch is None:
                return missing
            return fn(api, ch, parts[:at] + parts[at + 1:])

        for name in names:
            Api.handlers[name] = handler
        return fn

    return register


@uuid_cmd("uuid_exists", missing="false")
def _uuid_exists(api: Api, ch: Channel, args: list[str]) -> str:
    return "true"


@uuid_cmd("uuid_kill")
def _uuid_kill(api: Api, ch: Channel, args: list[str]) -> str:
    ch.hangup(parse_cause(args[0] if args else None))
    return "+OK\n"


@uuid_cmd("uuid_getvar", nargs=2, usage="-USAGE: <uuid> <var>\n")
def _uuid_getvar(api: Api, ch: Channel, args: list[str]) -> str:
    return ch.var(args[0], "_undef_") or "_undef_"


@uuid_cmd("uuid_setvar", nargs=2, usage="-USAGE: <uuid> <var> [value]\n", maxsplit=2)
def _uuid_setvar(api: Api, ch: Channel, args: list[str]) -> str:
    value = args[1] if len(args) > 1 else None
    ch.set_var(args[0], value if value not in ("", "undef") else None)
    return "+OK\n"


@uuid_cmd("uuid_setvar_multi", maxsplit=1)
def _uuid_setvar_multi(api: Api, ch: Channel, args: list[str]) -> str:
    for pair in (args[0] if args else "").split(";"):
        name, _, value = pair.partition("=")
        if name.strip():
            ch.set_var(name.strip(), value if value != "" else None)
    return "+OK\n"


@uuid_cmd("uuid_answer", missing="-ERROR\n")
def _uuid_answer(api: Api, ch: Channel, args: list[str]) -> str:
    ch.mark_answered()
    return "+OK\n"


@uuid_cmd("uuid_break")
def _uuid_break(api: Api, ch: Channel, args: list[str]) -> str:
    """mod_commands' break: ``all`` flushes the queued applications first; a running broadcast (a queued
    application, looped or not) is stopped (CF_STOP_BROADCAST), anything else just breaks (CF_BREAK)."""
    if args[:1] == ["all"]:
        ch.queue.clear()
    if ch.broadcasting:
        ch.stop_broadcast = True
    ch.broken.set()
    return "+OK\n"


def _queue_app(ch: Channel, target: str) -> None:
    if "::" in target and not target.startswith(("tone_stream", "http")):
        name, _, arg = target.partition("::")
    else:
        name, arg = "playback", target
    ch.queue.append(QueuedApp(name=name, arg=arg, event_lock=True))
    ch.queue_ready.set()


@uuid_cmd("uuid_broadcast", nargs=2, usage="-USAGE: <uuid> <path> [aleg|bleg|holdb|both]\n",
          missing="-ERR invalid uuid\n")
def _uuid_broadcast(api: Api, ch: Channel, args: list[str]) -> str:
    path = args[0]
    leg = args[1] if len(args) > 1 else "aleg"
    if leg in ("aleg", "both"):
        _queue_app(ch, path)
    if leg in ("bleg", "both") and ch.bridged_to is not None:
        _queue_app(ch.bridged_to, path)
    return "+OK Message sent\n"


@uuid_cmd("uuid_record", nargs=3, usage="-USAGE: <uuid> [start|stop|mask|unmask] <path> [<limit>] [<recording_vars>]\n",
          missing="-ERR Cannot locate session!\n")
def _uuid_record(api: Api, ch: Channel, args: list[str]) -> str:
    action, path = args[0], args[1]
    if action == "start":
        try:
            limit = float(args[2]) if len(args) > 2 else None
        except ValueError:
            limit = None
        api.sw.start_recording(ch, path, limit)
    elif action == "stop" and not api.sw.stop_recordings(ch, path):
        return "-ERR Cannot stop record session!\n"
    return "+OK Success\n"


@uuid_cmd("uuid_transfer", nargs=2, usage="-USAGE: <uuid> [-bleg|-both] <dest-exten> [<dialplan>] [<context>]\n")
def _uuid_transfer(api: Api, ch: Channel, args: list[str]) -> str:
    rest = [p for p in args if p not in ("-bleg", "-both")]
    ch.transfer_apps = transfer_target(" ".join(rest))
    ch.pending_transfer = ("bl_xfer", rest[0])
    ch.broken.set()
    ch.queue_ready.set()
    return "+OK\n"


@uuid_cmd("uuid_bridge", nargs=2, usage="-USAGE: <uuid> <other_uuid>\n", missing=INVALID_UUID)
def _uuid_bridge(api: Api, a: Channel, args: list[str]) -> str:
    b = api.chan(args[0])
    if b is None:
        return INVALID_UUID
    # Both legs leave what they run (EXECUTE_COMPLETE) before A's session announces the bridge.
    a.other, a.other_type = b, "originatee"
    b.other, b.other_type = a, "originator"
    a.set_var("signal_bond", b.uuid)
    b.set_var("signal_bond", a.uuid)
    a.pending_transfer = ("uuid_br", b.uuid)
    b.pending_transfer = ("uuid_br_peer", a.uuid)
    a.transfer_apps = [("__uuid_bridge", b.uuid)]
    b.transfer_apps = [("__wait_hangup", a.uuid)]
    for ch in (a, b):
        ch.broken.set()
        ch.queue_ready.set()
    return f"+OK {b.uuid}\n"


@uuid_cmd("uuid_send_dtmf", nargs=2, usage="-USAGE: <uuid> <dtmf_data>\n", missing="-ERR no such channel\n")
def _uuid_send_dtmf(api: Api, ch: Channel, args: list[str]) -> str:
    return f"+OK {ch.uuid} sent DTMF {args[0]}.\n"


@cmd("hupall")
def _hupall(api: Api, args: str) -> str:
    parts = args.split()
    cause = parse_cause(parts[0] if parts else None, "MANAGER_REQUEST")
    var = parts[1] if len(parts) > 2 else None
    val = parts[2] if len(parts) > 2 else None
    for ch in list(api.sw.channels.values()):
        if var is None or ch.var(var) == val:
            ch.hangup(cause)
    return f"+OK hangup all channels with cause {cause}\n"


@uuid_cmd("sched_hangup", "uuid_sched_hangup", nargs=2, usage="-USAGE: [+]<time> <uuid> [<cause>]\n", at=1)
def _sched_hangup(api: Api, ch: Channel, args: list[str]) -> str:
    schedule_hangup(api.sw, ch, " ".join(args))
    return "+OK\n"


@cmd("sched_api")
def _sched_api(api: Api, args: str) -> str:
    parts = args.split(" ", 2)
    if len(parts) < 3 or not parts[0].startswith("+"):
        return "-ERR Invalid syntax\n"
    try:
        secs = float(parts[0][1:])
    except ValueError:
        return "-ERR Invalid syntax\n"
    line = parts[2]  # parts[1] is the task group (or "none"): groups are not tracked
    api.sw.task_seq += 1
    api.sw.later(secs, api.execute, line)
    return f"+OK Added: {api.sw.task_seq}\n"


@cmd("originate")
def _originate(api: Api, args: str) -> str:
    parts = split_args(args)
    if len(parts) < 2:
        return ORIGINATE_USAGE
    dial, target = parts[0], parts[1]
    timeout = None
    if len(parts) > 6:
        try:
            timeout = float(parts[6])
        except ValueError:
            timeout = None
    ch, cause = originate(api.sw, dial, timeout=timeout)
    if cause or ch is None:
        return f"-ERR {cause or 'NORMAL_TEMPORARY_FAILURE'}\n"
    start_session(api.sw, ch, target)
    return f"+OK {ch.uuid}\n"


def parse_target(target: str) -> list[tuple[str, str]]:
    """``&app(args)`` → [(app, args)]; an extension (no dialplan here) parks."""
    if target.startswith("&"):
        body = target[1:]
        if "(" in body and body.endswith(")"):
            name, _, arg = body[:-1].partition("(")
        else:
            name, _, arg = body.partition(" ")
        return [(name, arg)]
    return [("park", "")]


def start_session(sw: Switch, ch: Channel, target: str) -> None:
    """Start the leg's executor with the originate's application (after the reply is out)."""
    session = Session(sw, ch)
    ch.has_session = True
    ch.flip_cid()  # before originate's result goes out, as in FreeSWITCH
    g = gevent.spawn(session.run, parse_target(target))
    ch.greenlets.append(g)


def _visible(api: Api, like: str | None = None) -> list[Channel]:
    now = time.monotonic()
    out = []
    for ch in list(api.sw.channels.values()):
        if now - ch.created_at < max(SHOW_DB_MIN_LAG, api.sw.real(SHOW_DB_DELAY)):
            continue
        if like and like not in ch.uuid and like not in ch.name and like not in ch.number:
            continue
        out.append(ch)
    return out


def _channel_row(api: Api, ch: Channel) -> dict[str, str]:
    created = time.localtime(ch.created_us / 1e6)
    row = dict.fromkeys(SHOW_COLUMNS, "")
    row.update({
        "uuid": ch.uuid, "direction": ch.direction, "created": time.strftime("%Y-%m-%d %H:%M:%S", created),
        "created_epoch": str(ch.created_us // 1_000_000), "name": ch.name, "state": ch.state,
        "cid_name": ch.number if ch.cid_flipped else ch.caller_id_name,
        "cid_num": ch.number if ch.cid_flipped else ch.caller_id_number,
        "dest": ch.number, "application": ch.current_app or "", "application_data": ch.current_app_data,
        "context": "default", "read_codec": "PCMU", "read_rate": "8000", "read_bit_rate": "64000",
        "write_codec": "PCMU", "write_rate": "8000", "write_bit_rate": "64000",
        "hostname": api.sw.events.hostname, "callstate": ch.callstate,
        "callee_num": ch.caller_id_number if ch.cid_flipped else "",
        "callee_direction": "RECV" if ch.cid_flipped else "",
        "call_uuid": ch.call_uuid, "initial_cid_num": ch.caller_id_number, "initial_dest": ch.number,
        "initial_context": "default",
    })
    return row


def _show_rows(api: Api, like: str | None = None) -> list[dict[str, str]]:
    return [_channel_row(api, ch) for ch in _visible(api, like)]


def _call_rows(api: Api, like: str | None = None) -> list[dict[str, str]]:
    """One row per call: a bridged pair shares a row (B in the b_* columns)."""
    rows = []
    for ch in _visible(api, like):
        if ch.bridged_to is not None and ch.other_type == "originator":
            continue
        full = _channel_row(api, ch)
        row = {c: full[c] for c in CALL_COLUMNS}
        peer = _channel_row(api, ch.bridged_to) if ch.bridged_to is not None else dict.fromkeys(SHOW_COLUMNS, "")
        row.update({f"b_{c}": peer[c] for c in B_COLUMNS})
        row["call_created_epoch"] = str(ch.bridged_us // 1_000_000) if ch.bridged_to is not None else ""
        rows.append(row)
    return rows


@cmd("show")
def _show(api: Api, args: str) -> str:
    parts = args.split()
    as_json = len(parts) >= 2 and parts[-2] == "as" and parts[-1] == "json"
    if as_json:
        parts = parts[:-2]
    if not parts or parts[0] not in ("channels", "calls", "detailed_calls", "bridged_calls"):
        return SHOW_USAGE
    like = parts[2] if len(parts) >= 3 and parts[1] == "like" else None
    rows = _show_rows(api, like) if parts[0] == "channels" else _call_rows(api, like)
    if len(parts) >= 2 and parts[1] == "count":
        if as_json:
            return json.dumps({"row_count": len(rows)}) + "\n"
        return f"\n{len(rows)} total.\n"
    if as_json:
        if not rows:
            return '{"row_count": 0}\n'
        return json.dumps({"row_count": len(rows), "rows": rows}, separators=(",", ":")) + "\n"
    if not rows:
        return "\n0 total.\n"
    columns = list(rows[0])
    lines = [",".join(columns)] + [",".join(r[c] for c in columns) for r in rows]
    return "\n".join(lines) + f"\n\n{len(rows)} total.\n"


SOFIA_STATUS = (
    "                     Name\t   Type\t                                      Data\tState\n"
    "=================================================================================================\n"
    "                  gateway\tprofile\t              sip:mod_sofia@127.0.0.1:5080\tRUNNING (0)\n"
    "         gateway::carrier\tgateway\t             sip:FreeSWITCH@127.0.0.1:5090\tNOREG\n"
    "                  carrier\tprofile\t              sip:mod_sofia@127.0.0.1:5090\tRUNNING (0)\n"
    "=================================================================================================\n"
    "2 profiles 0 aliases\n"
)


@cmd("sofia")
def _sofia(api: Api, args: str) -> str:
    parts = args.split()
    if parts[:1] != ["status"]:
        return "-ERR Usage: sofia status|...\n"
    if len(parts) == 1:
        return SOFIA_STATUS
    if parts[1] == "gateway" and len(parts) >= 3:
        if parts[2] != "carrier":
            return "Invalid Gateway!\n"
        rows = [
            ("Name", "carrier"), ("Profile", "gateway"), ("Scheme", "Digest"), ("Realm", "127.0.0.1:5090"),
            ("Username", "FreeSWITCH"), ("Password", "no"), ("From", "<sip:FreeSWITCH@127.0.0.1:5090>"),
            ("Contact", "<sip:gw+carrier@127.0.0.1:5080;transport=udp;gw=carrier>"), ("Exten", "FreeSWITCH"),
            ("To", "sip:FreeSWITCH@127.0.0.1:5090"), ("Proxy", "sip:127.0.0.1:5090"), ("Context", "public"),
            ("Expires", "3600"), ("Freq", "3600"), ("Ping", "0"), ("PingFreq", "0"), ("PingTime", "0.00"),
            ("PingState", "0/0/0"), ("State", "NOREG"), ("Status", "UP"), ("Uptime", f"{int(api.sw.uptime())}s"),
            ("CallsIN", "0"), ("CallsOUT", str(api.sw.calls_out)), ("FailedCallsIN", "0"),
            ("FailedCallsOUT", "0"),
        ]
        bar = "=" * 97 + "\n"
        return bar + "".join(f"{k:<8}\t{v}\n" for k, v in rows) + bar
    return "Invalid Profile!\n"


@cmd("standin")
def _standin(api: Api, args: str) -> str:
    """The stand-in's own introspection: heard <uuid>, channel <uuid>, channels, commands, limits, hangup/dtmf."""
    parts = args.split()
    if not parts:
        return ("-USAGE: heard <uuid>|channel <uuid>|channels|commands|limits|far_end_hangup <uuid>"
                "|dtmf <uuid> <digits>\n")
    sub = parts[0]
    if sub == "limits":
        return json.dumps(api.sw.limits.describe()) + "\n"
    ch = api.find(parts[1]) if len(parts) > 1 else None
    if sub == "heard":
        return json.dumps(ch.heard_list() if ch else None) + "\n"
    if sub == "channel":
        return json.dumps(describe(ch) if ch else None) + "\n"
    if sub == "channels":
        return json.dumps([describe(c) for c in api.sw.channels.values()]) + "\n"
    if sub == "far_end_hangup" and ch is not None:
        return "+OK\n" if far_end_hangup(ch) else "-ERR already hung up\n"
    if sub == "dtmf" and ch is not None and len(parts) > 2:
        for d in parts[2]:
            send_dtmf(ch, d)
        return "+OK\n"
    if api.introspect is not None:
        return api.introspect(args)
    return "-ERR unknown standin command\n"


def describe(ch: Channel) -> dict[str, Any]:
    """A JSON-able summary of a channel for introspection."""
    return {
        "uuid": ch.uuid, "number": ch.number, "name": ch.name, "state": ch.state,
        "answer_state": ch.answer_state, "hangup_cause": ch.hangup_cause, "live": ch.live,
        "variables": dict(ch.variables), "heard": ch.heard_list(), "sent": [s.as_dict() for s in ch.sent],
        "recordings": [{"path": r.path, "seconds": r.plan_seconds, "written": r.written} for r in ch.recordings],
    }
