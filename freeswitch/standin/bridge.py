"""Bridging legs: the bridge application (originate B, ringback, failure handling) and uuid_bridge."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import gevent

from .causes import DIALSTATUS, NO_HANGUP_ON_FAIL, q850
from .channel import Channel
from .originate import originate

if TYPE_CHECKING:
    from .apps import Session


def _ringback_source(a: Channel) -> str | None:
    if a.answered_us and a.var("transfer_ringback"):
        return a.var("transfer_ringback")
    return a.var("ringback")


def run_bridge(s: Session, dial: str) -> None:
    """The bridge application: originate B with A as originator, then bridge or report failure."""
    sw, a = s.sw, s.ch
    # switch_ivr_originate presets these and overwrites them with the outcome.
    a.set_var("originate_disposition", "failure")
    a.set_var("DIALSTATUS", "INVALIDARGS")
    ringback = _ringback_source(a)

    def on_created(b: Channel) -> None:
        # Ringback starts once there is a B leg to wait for: none when the switch refused B's session.
        if ringback and a.true_var("instant_ringback"):
            a.hear("ringback", ringback)

    def on_ring(b: Channel) -> None:
        a.callee = b.number
        a.set_callstate("RING_WAIT")
        if ringback and a.is_up:
            a.hear("ringback", ringback)

    def on_early(b: Channel) -> None:
        a.callee = b.number
        if a.is_up:
            a.hear("early_media", b.uuid)

    b, cause = originate(sw, dial, originator=a, on_ring=on_ring, on_early=on_early, on_created=on_created)
    if b is not None:
        a.set_var("originated_legs", f"{b.uuid};Outbound Call;{b.number}")  # B's callee name as it starts (16c-e)
    if cause or b is None or not a.is_up:
        if b is not None and b.is_up and not cause:
            b.hangup("ORIGINATOR_CANCEL")
            cause = "ORIGINATOR_CANCEL"
        if not a.is_up:
            cause = "ORIGINATOR_CANCEL"
        _bridge_failed(a, b, cause)
        return
    _bridged(s, a, b)


def _bridge_failed(a: Channel, b: Channel | None, cause: str) -> None:
    if a.callstate == "RING_WAIT" and a.is_up:
        a.set_callstate("ACTIVE")
    if b is not None:
        for var in ("sip_invite_failure_status", "sip_invite_failure_phrase"):
            if b.var(var) is not None:
                a.set_var(var, b.var(var))
    a.set_var("originate_disposition", cause)
    a.set_var("DIALSTATUS", DIALSTATUS.get(cause, cause))
    if b is not None:
        a.set_var("originate_causes", f"{b.uuid};{cause}")
    a.set_var("originate_failed_cause", cause)
    if b is not None and cause != "ORIGINATOR_CANCEL":
        # B's hangup sets it on its partner (switch_channel_set_variable_partner): no B, no value.
        a.set_var("last_bridge_hangup_cause", cause)
    if not a.is_up:
        return
    a.hear_idle()
    cof = (a.var("continue_on_fail") or "").strip()
    keep = cof.lower() == "true" or cause in {c.strip().upper() for c in cof.split(",")} or str(q850(cause)) in {
        c.strip() for c in cof.split(",")}
    if not keep and cause not in NO_HANGUP_ON_FAIL:
        # switch_channel_handle_cause(): the caller is hung up with the failure cause.
        a.hangup(cause)


def _bridged(s: Session, a: Channel, b: Channel) -> None:
    a.set_var("originate_disposition", "SUCCESS")
    a.set_var("DIALSTATUS", "SUCCESS")
    a.set_var("originate_causes", f"{b.uuid};NONE")
    link(a, b)
    a.fire("CHANNEL_BRIDGE", ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1681),
           pre=[("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)])
    b.enter("CS_EXCHANGE_MEDIA")
    announce_bridged(a, b)
    s.bridged_wait(b)
    a_first = not a.is_up
    if a_first:
        b.set_var("last_bridge_hangup_cause", a.hangup_cause or "NORMAL_CLEARING")
        a.set_var("bridge_hangup_cause", a.hangup_cause or "NORMAL_CLEARING")
        b.set_var("bridge_hangup_cause", a.hangup_cause or "NORMAL_CLEARING")
        b.hangup("NORMAL_CLEARING")
        b.reported.wait(timeout=1.0)  # B's HANGUP_COMPLETE comes before A's UNBRIDGE (trace 16a)
    else:
        a.set_var("bridge_hangup_cause", b.hangup_cause or "NORMAL_CLEARING")
        a.set_var("last_bridge_hangup_cause", b.hangup_cause or "NORMAL_CLEARING")
    unlink(a, b)
    a.fire("CHANNEL_UNBRIDGE", ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1816),
           pre=[("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)])
    if not a_first and a.is_up and a.true_var("hangup_after_bridge"):
        a.hangup(b.hangup_cause or "NORMAL_CLEARING")


def announce_bridged(a: Channel, b: Channel) -> None:
    """sofia tells each far end who it is now talking to (CALL_UPDATE, B first)."""
    shown = {b: b.cid_override or a.number, a: a.caller_id_number}
    for x, y in ((b, a), (a, b)):
        x.fire("CALL_UPDATE", ("mod_sofia.c", "sofia_receive_message", 2100),
               pre=[("Direction", "SEND"), ("Sent-Callee-ID-Name", shown[x]), ("Sent-Callee-ID-Number", shown[x]),
                    ("Bridged-To", y.uuid)])


def link(a: Channel, b: Channel) -> None:
    """Mark two answered legs as bridged (variables, Other-Leg headers, heard timelines)."""
    now = int(time.time() * 1_000_000)
    a.bridged_us = b.bridged_us = now
    a.other, a.other_type = b, "originatee"
    b.other, b.other_type = a, "originator"
    a.bridged_to, b.bridged_to = b, a
    a.callee = b.number
    a.set_callstate("ACTIVE")
    for x, y in ((a, b), (b, a)):
        x.set_var("last_bridge_to", y.uuid)
        x.set_var("bridge_channel", y.name)
        x.set_var("bridge_uuid", y.uuid)
        x.set_var("signal_bond", y.uuid)
        x.hear("bridge", y.uuid)
    a.set_var("last_bridge_role", "originator")
    b.set_var("last_bridge_role", "originatee")


def unlink(a: Channel, b: Channel) -> None:
    """Undo link() (the Other-Leg headers stay, as in FreeSWITCH)."""
    a.bridged_to = b.bridged_to = None
    a.hear_idle()
    b.hear_idle()


def uuid_bridge_run(s: Session, other_uuid: str) -> None:
    """The first leg of uuid_bridge drives the bridge until either side hangs up."""
    sw, a = s.sw, s.ch
    b = sw.locate(other_uuid)
    if b is None:
        return
    for _ in range(100):  # let the peer leave its park first, as in the recordings
        if b.pending_transfer is None:
            break
        gevent.sleep(0.001)
    if not (a.is_up and b.is_up):
        (a if a.is_up else b).hangup("NORMAL_CLEARING")
        return
    for x in (a, b):
        x.enter("CS_SOFT_EXECUTE")
    for x, y in ((a, b), (b, a)):
        x.fire("CHANNEL_EXECUTE", ("switch_ivr_bridge.c", "uuid_bridge_on_soft_execute", 1236),
               post=[("Application", "uuid_bridge"), ("Application-Data", y.uuid)])
    b.enter("CS_CONSUME_MEDIA")
    b.call_uuid = a.uuid
    link(a, b)
    a.callee = None  # unlike the bridge app, uuid_bridge leaves the callee id alone
    a.fire("CHANNEL_BRIDGE", ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1681),
           pre=[("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)])
    b.enter("CS_EXCHANGE_MEDIA")
    announce_bridged(a, b)
    s.bridged_wait(b)
    first, survivor = (a, b) if not a.is_up else (b, a)
    cause = first.hangup_cause or "NORMAL_CLEARING"
    a.set_var("bridge_hangup_cause", cause)
    b.set_var("bridge_hangup_cause", cause)
    survivor.set_var("last_bridge_hangup_cause", cause)
    survivor.hangup("NORMAL_CLEARING")
    unlink(a, b)
    a.fire("CHANNEL_UNBRIDGE", ("switch_ivr_bridge.c", "switch_ivr_multi_threaded_bridge", 1816),
           pre=[("Bridge-A-Unique-ID", a.uuid), ("Bridge-B-Unique-ID", b.uuid)])
