"""Dialplan applications and the per-channel executor that runs them one after another.

A channel's session greenlet runs the originate's application (usually ``park``); ``park``
then runs queued applications (sendmsg execute, uuid_broadcast) in order, as FreeSWITCH's
park loop does, until the channel hangs up or is transferred.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import gevent

from .bridge import run_bridge, uuid_bridge_run
from .causes import parse_cause
from .channel import Channel, QueuedApp
from .core import Switch
from .media import INFINITE, media_kind, media_seconds

_VAR = re.compile(r"\$\{([^${}]+)\}")

AppFn = Callable[["Session", str], "str | None"]
# A looped application whose round took less than this (plan seconds) is not run again
# (switch_ivr_parse_event: ``aftr - b4 < 500000``).
MIN_LOOP_SECONDS = 0.5
APPS: dict[str, AppFn] = {}


def app(name: str) -> Callable[[AppFn], AppFn]:
    """Register a dialplan application under name."""
    def register(fn: AppFn) -> AppFn:
        APPS[name] = fn
        return fn

    return register


def expand(sw: Switch, ch: Channel, text: str) -> str:
    """Expand ${var} from channel variables, then globals (unknown ones expand to empty)."""
    if "${" not in text:
        return text
    for _ in range(5):
        new = _VAR.sub(lambda m: ch.variables.get(m.group(1), sw.globals.get(m.group(1), "")), text)
        if new == text:
            break
        text = new
    return text


class Session:
    """The executor of one channel (its FreeSWITCH session thread)."""

    def __init__(self, sw: Switch, ch: Channel) -> None:
        self.sw = sw
        self.ch = ch
        self.depth = 0  # nesting of applications (queued apps run inside park)

    def run(self, apps: list[tuple[str, str]], flip_cid: bool = True) -> None:
        """Run an extension (list of apps), then the queue; hang up when it ends, then finish."""
        ch = self.ch
        ch.has_session = True
        try:
            if flip_cid:
                ch.flip_cid()
            ch.hit_dialplan = True
            ch.enter("CS_EXECUTE")
            todo = list(apps)
            while ch.is_up:
                if not todo:
                    if ch.transfer_apps:
                        todo, ch.transfer_apps = ch.transfer_apps, None
                        continue
                    if ch.queue:
                        self.run_queue()
                        continue
                    break
                name, arg = todo.pop(0)
                self.execute(name, arg)
                if ch.transfer_apps:
                    todo, ch.transfer_apps = ch.transfer_apps, None
            if ch.is_up:
                # The extension ran out of applications: FreeSWITCH hangs the channel up.
                ch.hangup("NORMAL_CLEARING")
        finally:
            ch.finish()

    def run_queue(self) -> None:
        """Execute every queued application, in order."""
        ch = self.ch
        while ch.queue and ch.is_up and not ch.transfer_apps:
            self.broadcast(ch.queue.popleft())

    def broadcast(self, item: QueuedApp) -> None:
        """One queued application as switch_ivr_parse_event runs it: CF_BROADCAST while it runs, its
        ``loops`` times (fewer than 0: until stopped), ending early when uuid_break stops the broadcast
        or when one round took under half a second (FreeSWITCH's guard against a busy loop)."""
        ch = self.ch
        ch.stop_broadcast = False
        ch.broadcasting += 1
        try:
            done = 0
            while item.loops < 0 or done < max(1, item.loops):
                if not ch.is_up:
                    break
                if item.event_uuid:
                    # Set for each round; the round's application takes it (execute).
                    ch.set_var("app_uuid", item.event_uuid)
                # Which round this is, and of how many (-1: until stopped), while it runs.
                ch.set_var("current_loop", str(done + 1))
                ch.set_var("total_loops", str(item.loops))
                started = ch.plan_now()
                ch.played = None
                self.execute(item.name, item.arg, item.event_uuid, item.event_lock)
                done += 1
                # A round's length: what it played (scheduling lateness inflates measured plan time).
                took = ch.played if ch.played is not None else ch.plan_now() - started
                if not ch.is_up or ch.stop_broadcast or took < MIN_LOOP_SECONDS:
                    break
        finally:
            ch.set_var("current_loop", None)
            ch.set_var("total_loops", None)
            ch.broadcasting -= 1
        if ch.stop_broadcast:
            # The broadcast was stopped: FreeSWITCH leaves CF_BREAK set; the next application clears it.
            ch.stop_broadcast = False
            ch.broken.set()

    def execute(self, name: str, arg: str, app_uuid: str | None = None, event_lock: bool = False) -> None:
        """Run one application with CHANNEL_EXECUTE / CHANNEL_EXECUTE_COMPLETE around it."""
        ch = self.ch
        if name in INTERNAL:
            # Not dialplan applications: states uuid_bridge puts a leg in (no EXECUTE events).
            INTERNAL[name](self, arg)
            return
        fn = APPS.get(name)
        if fn is None:
            # switch_core_session_execute_application: "Invalid Application" hangs the leg up.
            ch.hangup("DESTINATION_OUT_OF_ORDER")
            return
        # switch_core_session_exec: the application takes its UUID from the channel variable app_uuid and
        # removes it (while it runs, and after, uuid_getvar <uuid> app_uuid is _undef_); else a new one.
        named = ch.var("app_uuid")
        if named is not None:
            ch.set_var("app_uuid", None)
        app_uuid = app_uuid or named or self.sw.new_uuid()
        if not ch.true_var("app_disable_expand_variables"):
            arg = expand(self.sw, ch, arg)
        prev = (ch.current_app, ch.current_app_data)
        ch.current_app, ch.current_app_data = name, arg
        if arg:
            ch.set_var("current_application_data", arg)
        ch.set_var("current_application", name)
        if ch.is_up:
            ch.enter("CS_EXECUTE")
        info = [("Application", name)]
        if arg:
            info.append(("Application-Data", arg))
        ch.fire("CHANNEL_EXECUTE", ("switch_core_session.c", "switch_core_session_exec", 2944),
                post=[*info, ("Application-UUID", app_uuid)])
        ch.app_uuids.append(app_uuid)
        # switch_core_session_exec clears CF_BREAK before the application runs: a uuid_break that came
        # between two applications is lost.
        ch.broken.clear()
        ch.app_response = None
        self.depth += 1
        ch.event_locked += event_lock
        try:
            response = fn(self, arg)
        finally:
            self.depth -= 1
            ch.event_locked -= event_lock
            ch.app_uuids.pop()
        if response is not None:
            ch.app_response = response
        # A parked leg reports the response its last nested application left behind (FreeSWITCH
        # reads one channel-wide "current application response").
        response = ch.app_response
        ch.set_var("last_app", name)
        if arg:
            ch.set_var("last_arg", arg)
        # A transfer ends the extension's own application (park), not the nested ones.
        transfer = ch.pending_transfer if ch.is_up and self.depth == 0 else None
        if transfer and not ch.transfer_profiled:
            self.transfer_profile()
        ch.fire("CHANNEL_EXECUTE_COMPLETE", ("switch_core_session.c", "switch_core_session_exec", 2974),
                post=[*info, ("Application-Response", response or "_none_"), ("Application-UUID", app_uuid)])
        if transfer:
            ch.pending_transfer = None
            ch.transfer_profiled = False
            ch.dest_override = ch.rdnis = None
            if transfer[0].startswith("uuid_br"):
                # The leg leaves its thread to the bridge: hibernate, reset, then soft-execute.
                ch.enter("CS_HIBERNATE")
                ch.enter("CS_RESET")
            else:
                ch.enter("CS_ROUTING")
        if prev[0] is not None:
            ch.current_app, ch.current_app_data = prev

    def transfer_profile(self) -> None:
        """The caller profile a pending transfer creates (seen from the interrupted app's end on)."""
        ch = self.ch
        if ch.pending_transfer is None:
            return
        kind, target = ch.pending_transfer
        ch.transfer_profiled = True
        ch.inbound_logical = True
        if kind == "bl_xfer":
            ch.new_transfer_profile(kind, f"{target}/default/inline", dialplan="inline")
            ch.rdnis, ch.dest_override = ch.number, target
            ch.state_number = 2  # CS_ROUTING
        elif kind == "uuid_br_peer":
            # The second leg of uuid_bridge keeps its direction but shows the other party's number.
            ch.inbound_logical = False
            ch.hit_dialplan = False
            ch.new_transfer_profile("uuid_br", target)
            ch.cid_override = ch.other.number if ch.other is not None else None
            ch.state_number = 8  # CS_HIBERNATE
        else:
            ch.new_transfer_profile(kind, target)
            ch.state_number = 8  # CS_HIBERNATE

    # ----- helpers for applications -------------------------------------------------------
    def wait(self, plan_seconds: float, breakable: bool = False) -> str:
        """Wait a plan duration; returns "done", "hangup" or "break"."""
        ch = self.ch
        events = [ch.hungup]
        if breakable:
            events.append(ch.broken)
        timeout = None if plan_seconds == INFINITE else self.sw.real(plan_seconds)
        gevent.wait(events, timeout=timeout, count=1)
        if not ch.is_up:
            return "hangup"
        if breakable and ch.broken.is_set():
            ch.broken.clear()
            return "break"
        return "done"

    def bridged_wait(self, other: Channel) -> None:
        """While bridged to other: queued apps still run here (the bridge pauses for them) unless an
        event-locked application (the bridge itself, when sent with event-lock) holds the queue."""
        ch = self.ch
        while ch.is_up and other.is_up:
            if ch.queue and not ch.event_locked:
                self.run_queue()
                continue
            ch.queue_ready.clear()
            gevent.wait([ch.hungup, other.hungup, ch.queue_ready], count=1)

    def idle(self) -> None:
        """The park loop: run queued apps as they arrive until hangup or transfer."""
        ch = self.ch
        while ch.is_up and not ch.transfer_apps:
            if ch.queue:
                self.run_queue()
                continue
            ch.queue_ready.clear()
            gevent.wait([ch.queue_ready, ch.hungup], count=1)

    def play(self, target: str, kind: str | None = None) -> str:
        """Play a file/tone to the leg with PLAYBACK_START/STOP; returns the app response."""
        ch = self.ch
        target = target.strip()
        if target.startswith("playback::"):
            target = target[len("playback::"):]
        secs = media_seconds(target)
        if secs is None:
            return "FILE NOT FOUND"
        ch.broken.clear()
        scheme = target.split("://", 1)[0] if "://" in target else ""
        where = [("Playback-File-Path", target)]
        if scheme in ("tone_stream", "local_stream"):
            where.insert(0, ("Playback-File-Type", scheme))
        ch.fire("PLAYBACK_START", ("switch_ivr_play_say.c", "switch_ivr_play_file", 1535), post=where)
        ch.hear(kind or media_kind(target), target)
        started = time.monotonic()
        status = self.wait(secs, breakable=True)
        elapsed = (time.monotonic() - started) / self.sw.time_scale
        if status == "done" and secs != INFINITE:
            elapsed = secs
        ch.hear_idle()
        ch.played = elapsed
        ch.set_var("playback_last_offset_pos", str(int(elapsed * 8000)))
        ch.set_var("playback_seconds", str(int(elapsed)))
        ch.set_var("playback_ms", str(int(elapsed * 1000)))
        ch.set_var("playback_samples", str(int(elapsed * 8000)))
        ch.fire("PLAYBACK_STOP", ("switch_ivr_play_say.c", "switch_ivr_play_file", 2088),
                post=[*where, ("Playback-Status", "done" if status == "done" else "break")])
        return "FILE PLAYED"


# ----- applications --------------------------------------------------------------------------
@app("park")
def _park(s: Session, arg: str) -> str | None:
    s.ch.fire("CHANNEL_PARK", ("switch_ivr.c", "switch_ivr_park", 1003))
    s.ch.hear_idle()
    s.idle()
    if s.depth == 1 and s.ch.is_up and s.ch.pending_transfer:
        s.transfer_profile()
    s.ch.fire("CHANNEL_UNPARK", ("switch_ivr.c", "switch_ivr_park", 1249))
    return None


@app("playback")
def _playback(s: Session, arg: str) -> str | None:
    return s.play(arg)


@app("endless_playback")
def _endless(s: Session, arg: str) -> str | None:
    while s.ch.is_up:
        if s.play(arg) != "FILE PLAYED" or s.wait(0, breakable=True) != "done":
            break
    return "FILE PLAYED"


@app("set")
def _set(s: Session, arg: str) -> str | None:
    name, _, value = arg.partition("=")
    if name:
        s.ch.set_var(name.strip(), value if value != "" else None)
    return None


@app("export")
def _export(s: Session, arg: str) -> str | None:
    name, _, value = arg.partition("=")
    local = True
    if name.startswith("nolocal:"):
        name, local = name[len("nolocal:"):], False
    name = name.strip()
    if local:
        s.ch.set_var(name, value if value != "" else None)
    exported = [n for n in (s.ch.var("export_vars") or "").split(",") if n]
    if name and name not in exported:
        exported.append(name)
    s.ch.set_var("export_vars", ",".join(exported))
    if not local:
        s.ch.set_var(f"nolocal:{name}", value)
    return None


@app("unset")
def _unset(s: Session, arg: str) -> str | None:
    s.ch.set_var(arg.strip(), None)
    return None


@app("multiset")
def _multiset(s: Session, arg: str) -> str | None:
    for part in arg.split():
        _set(s, part)
    return None


@app("sleep")
def _sleep(s: Session, arg: str) -> str | None:
    try:
        ms = int(arg.strip() or 0)
    except ValueError:
        ms = 0
    s.wait(ms / 1000.0)
    return None


def _signal(mark: Callable[[Channel], None]) -> AppFn:
    def run(s: Session, arg: str) -> str | None:
        mark(s.ch)
        return None

    return run


# Applications that only signal the call's progress to the far end.
for _name, _mark in (("answer", Channel.mark_answered), ("pre_answer", Channel.mark_pre_answered),
                     ("ring_ready", Channel.mark_ring_ready)):
    APPS[_name] = _signal(_mark)


@app("hangup")
def _hangup(s: Session, arg: str) -> str | None:
    s.ch.hangup(parse_cause(arg))
    return None


@app("sched_hangup")
def _sched_hangup(s: Session, arg: str) -> str | None:
    schedule_hangup(s.sw, s.ch, arg)
    return None


def schedule_hangup(sw: Switch, ch: Channel, arg: str) -> bool:
    """``+N [cause]`` (seconds from now) or ``N`` (an epoch, treated as from now)."""
    parts = arg.split()
    if not parts:
        return False
    when = parts[0]
    try:
        secs = float(when[1:]) if when.startswith("+") else max(0.0, float(when) - time.time())
    except ValueError:
        return False
    cause = parse_cause(parts[1] if len(parts) > 1 else None, "ALLOTTED_TIMEOUT")
    g = sw.later(secs, ch.hangup, cause)
    ch.greenlets.append(g)
    return True


@app("record_session")
def _record_session(s: Session, arg: str) -> str | None:
    parts = arg.split()
    if parts:
        limit = parts[1].lstrip("+") if len(parts) > 1 else ""
        s.sw.start_recording(s.ch, parts[0], float(limit) if limit.replace(".", "", 1).isdigit() else None)
    return None


@app("stop_record_session")
def _stop_record_session(s: Session, arg: str) -> str | None:
    s.sw.stop_recordings(s.ch, arg.strip() or "all")
    return None


@app("transfer")
def _transfer(s: Session, arg: str) -> str | None:
    s.ch.transfer_apps = transfer_target(arg)
    return None


def transfer_target(arg: str) -> list[tuple[str, str]]:
    """Applications a transfer leads to: ``app:arg inline`` lists, anything else parks."""
    parts = arg.split()
    if len(parts) >= 2 and parts[1] == "inline":
        apps = []
        for item in parts[0].split(","):
            name, _, a = item.partition(":")
            apps.append((name, a))
        return apps
    return [("park", "")]


@app("log")
@app("info")
@app("event")
@app("displace_session")
@app("start_dtmf")
@app("ringback")
def _noop(s: Session, arg: str) -> str | None:
    return None


@app("play_and_get_digits")
def _play_and_get_digits(s: Session, arg: str) -> str | None:
    """min max tries timeout terminators file invalid_file var_name [regexp] [digit_timeout]."""
    parts = arg.split()
    if len(parts) < 8:
        return None
    try:
        mn, mx, tries, timeout_ms = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None
    terminators, prompt, var = parts[4], parts[5], parts[7]
    regexp = parts[8] if len(parts) > 8 else None
    ch = s.ch
    for _ in range(max(1, tries)):
        if not ch.dtmf:
            s.play(prompt)
        digits = ""
        while ch.is_up and len(digits) < mx:
            if ch.dtmf:
                d = ch.dtmf.popleft()
                if d in terminators:
                    break
                digits += d
                continue
            ch.queue_ready.clear()
            gevent.wait([ch.queue_ready, ch.hungup], timeout=s.sw.real(timeout_ms / 1000.0), count=1)
            if not ch.dtmf:
                break
        if len(digits) >= mn and (regexp is None or re.fullmatch(regexp, digits)):
            ch.set_var(var, digits)
            return None
        if not ch.is_up:
            break
    return None


@app("bridge")
def _bridge(s: Session, arg: str) -> str | None:
    run_bridge(s, arg)
    return None


def _wait_hangup(s: Session, arg: str) -> None:
    """The peer side of uuid_bridge: only queued apps (uuid_broadcast) run until the leg hangs up."""
    other = s.sw.locate(arg)
    if other is not None:
        s.bridged_wait(other)
    gevent.wait([s.ch.hungup])


def _uuid_bridge(s: Session, other_uuid: str) -> None:
    uuid_bridge_run(s, other_uuid)


INTERNAL: dict[str, Callable[[Session, str], None]] = {"__wait_hangup": _wait_hangup, "__uuid_bridge": _uuid_bridge}
