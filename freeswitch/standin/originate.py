"""Dial strings and originate: creating outbound legs and waiting for them to answer or fail."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import gevent

from .channel import Channel
from .core import Switch
from .plan import far_end_for, run_far_end

GATEWAY = "carrier"
PROFILES = ("gateway", "carrier")
DEFAULT_ORIGINATE_TIMEOUT = 60.0


class DialError(Exception):
    """A dial string that cannot even create a channel; str(e) is the cause name."""


@dataclass
class Leg:
    """One parsed leg of a dial string."""

    endpoint: str  # sofia | loopback | user | error
    number: str
    name: str
    variables: dict[str, str] = field(default_factory=dict)
    gateway: str | None = None
    profile: str = "gateway"


def split_args(text: str) -> list[str]:
    """Split on spaces that are outside {} [] () and quotes."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    quote = ""
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "'\"" and depth:
            quote = ch
        elif ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth = max(0, depth - 1)
        elif ch == " " and depth == 0:
            if cur:
                out.append("".join(cur))
                cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


def parse_var_block(block: str) -> dict[str, str]:
    """Parse ``a=b,c='x, y'`` into a dict (single quotes protect commas and spaces)."""
    out: dict[str, str] = {}
    parts: list[str] = []
    cur: list[str] = []
    quote = False
    for ch in block:
        if ch == "'":
            quote = not quote
            cur.append(ch)
        elif ch == "," and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    for part in parts:
        if "=" not in part:
            continue
        key, _, value = part.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def _take_block(text: str, open_ch: str, close_ch: str) -> tuple[str | None, str]:
    text = text.lstrip()
    if not text.startswith(open_ch):
        return None, text
    depth = 0
    quote = False
    for i, ch in enumerate(text):
        if ch == "'":
            quote = not quote
        elif not quote and ch == open_ch:
            depth += 1
        elif not quote and ch == close_ch:
            depth -= 1
            if depth == 0:
                return text[1:i], text[i + 1 :]
    return None, text


def parse_dialstring(dial: str) -> tuple[dict[str, str], list[Leg]]:
    """Global {} variables and the legs (``|`` separated, tried in turn) of a dial string."""
    global_vars: dict[str, str] = {}
    block, rest = _take_block(dial, "{", "}")
    if block is not None:
        global_vars = parse_var_block(block)
    legs = []
    for part in rest.split("|"):
        leg_vars: dict[str, str] = {}
        block, part = _take_block(part, "[", "]")
        if block is not None:
            leg_vars = parse_var_block(block)
        legs.append(parse_endpoint(part.strip(), leg_vars))
    return global_vars, legs


def parse_endpoint(target: str, leg_vars: dict[str, str]) -> Leg:
    """One endpoint: sofia/gateway/<gw>/<number>, sofia/<profile>/<user>@host, loopback/, user/, error/."""
    parts = target.split("/")
    kind = parts[0]
    if kind == "sofia" and len(parts) >= 4 and parts[1] == "gateway":
        number = "/".join(parts[3:])
        return Leg("sofia", number, f"sofia/gateway/{number}", leg_vars, gateway=parts[2])
    if kind == "sofia" and len(parts) >= 3:
        user = "/".join(parts[2:])
        number = user.split("@", 1)[0].removeprefix("sip:")
        return Leg("sofia", number, f"sofia/{parts[1]}/{user}", leg_vars, profile=parts[1])
    if kind == "loopback" and len(parts) >= 2:
        return Leg("loopback", parts[1], f"loopback/{parts[1]}-a", leg_vars)
    if kind == "user" and len(parts) >= 2:
        number = parts[1].split("@", 1)[0]
        return Leg("user", number, f"sofia/gateway/{number}", leg_vars)
    if kind == "error" and len(parts) >= 2:
        return Leg("error", parts[1].upper(), target, leg_vars)
    return Leg("unknown", "", target, leg_vars)


def _check_endpoint(leg: Leg) -> None:
    """Failures found before any session is asked for (no endpoint, error/, an unknown user)."""
    if leg.endpoint == "error":
        raise DialError(leg.number)
    if leg.endpoint == "unknown":
        raise DialError("CHAN_NOT_IMPLEMENTED")
    if leg.endpoint == "user" and not leg.number.isdigit():
        raise DialError("USER_NOT_REGISTERED")


def _check_route(leg: Leg) -> None:
    """Failures sofia finds once it holds the new session (it asks for the session first)."""
    if leg.endpoint == "sofia" and leg.gateway is not None and leg.gateway != GATEWAY:
        raise DialError("INVALID_GATEWAY")
    if leg.endpoint == "sofia" and leg.gateway is None and leg.profile not in PROFILES:
        raise DialError("INVALID_PROFILE")


def _request_session(sw: Switch, leg: Leg, uuid: str | None) -> int:
    """The new leg's session id; DialError when the core refuses it or sofia cannot route it."""
    _check_endpoint(leg)
    session_id = sw.limits.admit()
    if session_id is None:
        # switch_core_session_request_uuid said no (sps or max sessions): sofia_outgoing_channel's
        # default cause, and nothing was created.
        sw.refused[uuid or ""] += 1
        raise DialError("DESTINATION_OUT_OF_ORDER")
    try:
        _check_route(leg)
    except DialError:
        sw.limits.release()
        raise
    return session_id


def _new_channel(sw: Switch, leg: Leg, gvars: dict[str, str], originator: Channel | None, session_id: int) -> Channel:
    merged = {**gvars, **leg.variables}
    if originator is not None:
        for name in (originator.var("export_vars") or "").split(","):
            name = name.strip()
            if name and name not in merged and originator.var(name) is not None:
                merged[name] = originator.var(name) or ""
    uuid = merged.get("origination_uuid") or sw.new_uuid()
    default_name = ""
    default_cid = "0000000000"
    if originator is not None:
        flipped = originator.cid_flipped
        default_cid = originator.number if flipped else originator.caller_id_number
        default_name = originator.number if flipped else originator.caller_id_name
    ch = Channel(
        switch=sw, uuid=uuid, number=leg.number, name=leg.name,
        caller_id_name=merged.get("origination_caller_id_name", default_name),
        caller_id_number=merged.get("origination_caller_id_number", default_cid), session_id=session_id,
    )
    sw.add_channel(ch)
    v = ch.variables
    v["direction"] = "outbound"
    v["is_outbound"] = "true"
    v["uuid"] = uuid
    v["call_uuid"] = uuid
    v["session_id"] = str(ch.session_id)
    if leg.endpoint == "sofia" or leg.endpoint == "user":
        v["sip_gateway_name"] = leg.gateway or GATEWAY
        v["sip_local_network_addr"] = "127.0.0.1"
        v["sip_profile_name"] = leg.profile
    v["video_media_flow"] = "disabled"
    v["text_media_flow"] = "disabled"
    v["channel_name"] = leg.name
    v["sip_destination_url"] = f"sip:{leg.number}@127.0.0.1:5090"
    if originator is not None:
        v["max_forwards"] = "70"
        v["originator_codec"] = "PCMU@8000h@20i"
        v["originator"] = originator.uuid
        v["signal_bond"] = originator.uuid
        v["call_uuid"] = ch.call_uuid = originator.call_uuid
        ch.network_addr = originator.network_addr
    v.update(merged)
    if originator is not None and originator.var("instant_ringback") is not None:
        v["instant_ringback"] = originator.var("instant_ringback") or ""
    v["originate_early_media"] = "false"
    if originator is not None:
        v["originating_leg_uuid"] = originator.uuid
        ch.other = originator
        ch.other_type = "originator"
    v["originate_endpoint"] = leg.endpoint if leg.endpoint != "user" else "sofia"
    v["rtp_use_codec_string"] = "PCMU,PCMA"
    v["local_media_ip"] = "127.0.0.1"
    v["advertised_media_ip"] = "127.0.0.1"
    v["audio_media_flow"] = "sendrecv"
    v["sip_req_uri"] = f"{leg.number}@127.0.0.1:5090"
    v["sip_to_host"] = "127.0.0.1:5090"
    v["sip_from_host"] = "127.0.0.1"
    v["sofia_profile_name"] = leg.profile
    v["recovery_profile_name"] = leg.profile
    v["sofia_profile_url"] = "sip:mod_sofia@127.0.0.1:5080"
    ch.state, ch.state_number = "CS_NONE", 1
    ch.fire_light("CHANNEL_OUTGOING", ("switch_core_session.c", "switch_core_session_outgoing_channel", 768))
    ch.enter("CS_INIT", 1)
    ch.state_number = 2
    ch.fire("CHANNEL_CREATE", ("switch_core_state_machine.c", "switch_core_session_run", 626))
    ch.fire("CHANNEL_ORIGINATE", ("switch_core_state_machine.c", "switch_core_session_run", 632))
    ch.enter("CS_ROUTING")
    ch.enter("CS_CONSUME_MEDIA")  # originate holds new legs there until they answer
    far = far_end_for(leg.number)
    invited = time.monotonic()
    if far.settles_after is not None:
        ch.far_end_settles_at = invited + sw.real(far.settles_after)
    g = gevent.spawn(run_far_end, sw, ch, far, invited)
    ch.greenlets.append(g)
    return ch


def _timeout(value: str | None, default: float) -> float:
    try:
        t = float(value) if value else default
    except ValueError:
        t = default
    return t if t > 0 else default


def originate(
    sw: Switch,
    dial: str,
    originator: Channel | None = None,
    timeout: float | None = None,
    on_ring: Callable[[Channel], None] | None = None,
    on_early: Callable[[Channel], None] | None = None,
    on_created: Callable[[Channel], None] | None = None,
) -> tuple[Channel | None, str]:
    """Place a call; return (channel, "") when it answers, else (channel or None, cause).

    Without an originator (the api command) early media counts as success unless
    ignore_early_media is set; with one (the bridge app) only answer does, unless
    bridge_early_media=true. A leg whose session the switch refuses is never created
    (cause DESTINATION_OUT_OF_ORDER); ``|`` then tries the next leg.
    """
    try:
        gvars, legs = parse_dialstring(dial)
    except ValueError:
        return None, "INVALID_URL"
    cause = "NORMAL_TEMPORARY_FAILURE"
    last: Channel | None = None
    for leg in legs:
        try:
            session_id = _request_session(sw, leg, {**gvars, **leg.variables}.get("origination_uuid"))
        except DialError as e:
            cause = str(e)
            continue
        ch = _new_channel(sw, leg, gvars, originator, session_id)
        if on_created:
            on_created(ch)
        cause = _wait_for_answer(sw, ch, originator, timeout, on_ring, on_early)
        last = ch
        if not cause or (originator is not None and not originator.is_up):
            return ch, cause
    return last, cause


STALL_GRACE = 30.0  # real seconds a stalled originate waits for what its far end did before the timeout


def _wait_for_answer(sw: Switch, ch: Channel, originator: Channel | None, timeout: float | None,
                     on_ring: Callable[[Channel], None] | None,
                     on_early: Callable[[Channel], None] | None) -> str:
    """Wait until the new leg answers (""), or fails (its cause)."""
    limit = _timeout(ch.var("originate_timeout") or ch.var("call_timeout") or ch.var("leg_timeout"),
                     timeout or DEFAULT_ORIGINATE_TIMEOUT)
    ignore_early = ch.true_var("ignore_early_media")
    if originator is None:
        early_ok = not ignore_early
    else:
        early_ok = ch.true_var("bridge_early_media") or originator.true_var("bridge_early_media")
    ring_ok = ch.true_var("return_ring_ready")
    deadline = time.monotonic() + sw.real(limit)
    rang = early = stalled = False
    while True:
        if ch.answered.is_set():
            return ""
        if not ch.is_up:
            ch.reported.wait(timeout=1.0)  # FreeSWITCH reports the failed leg before the result
            return ch.hangup_cause or "NORMAL_CLEARING"
        if originator is not None and not originator.is_up:
            ch.set_var("last_bridge_hangup_cause", originator.hangup_cause or "NORMAL_CLEARING")
            ch.hangup("ORIGINATOR_CANCEL", disposition="send_cancel")
            ch.reported.wait(timeout=1.0)  # B's HANGUP_COMPLETE comes before A's bridge ends (trace 16c)
            return "ORIGINATOR_CANCEL"
        if ch.ring_ready.is_set() and not rang:
            rang = True
            if on_ring:
                on_ring(ch)
            if ring_ok:
                return ""
        if ch.early_media.is_set() and not early:
            early = True
            if on_early and not ignore_early:
                on_early(ch)
            if early_ok:
                return ""
        left = deadline - time.monotonic()
        settles_at = ch.far_end_settles_at
        if left <= 0 and not stalled and settles_at is not None and settles_at <= deadline:
            # This process stalled (a loaded machine) past the timeout, but the far end (another machine,
            # whose clock did not stall) answered or refused before it: wait to see which, as a switch
            # that had not stalled would have seen it.
            stalled = True
            deadline = time.monotonic() + STALL_GRACE
            continue
        if left <= 0:
            # Our own timeout (trace 07, #28-#31): CHANNEL_HANGUP, the result (BACKGROUND_JOB), then
            # HANGUP_COMPLETE and DESTROY as the leg's session unwinds; a far end's refusal is reported first.
            ch.hangup("NO_ANSWER", disposition="send_cancel")
            return "NO_ANSWER"
        waits = [ch.answered, ch.hungup]
        if not rang:
            waits.append(ch.ring_ready)
        if not early:
            waits.append(ch.early_media)
        if originator is not None:
            waits.append(originator.hungup)
        gevent.wait(waits, timeout=left, count=1)
