"""The test number plan: what the far end of a leg does, chosen by the 8th digit of 1555000Dxxx."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent

if TYPE_CHECKING:
    from .channel import Channel
    from .core import Switch

_PLAN_NUMBER = re.compile(r"^1555000(\d)\d{3}$")

# A far end answers or refuses "at once" after one RTP/SIP round trip, as in the traces (~20 ms).
SIP_DELAY = 0.02
# What sofia answers an INVITE when the core refuses the session (sofia.c, trace 17/17b).
NO_SESSION_REPLY = (503, "Maximum Calls In Progress")


@dataclass(frozen=True)
class FarEnd:
    """One row of the plan; durations are plan seconds (None = never)."""

    refuse: str | None = None  # hangup cause of a refused INVITE
    ring: bool = False  # 180 Ringing
    early_media: str | None = None  # 183 with this tone, until answer
    answer_after: float | None = SIP_DELAY
    sends: str = "silence"  # what the far end sends once answered
    up_for: float | None = None  # far end hangs up this long after answering
    dtmf: str = ""
    dtmf_after: float = 0.0

    @property
    def settles_after(self) -> float | None:
        """Plan seconds after the INVITE at which this far end answers or refuses (None: it never does)."""
        return SIP_DELAY if self.refuse else self.answer_after


PLAN: dict[str, FarEnd] = {
    "0": FarEnd(up_for=300.0),
    "1": FarEnd(ring=True, answer_after=2.0, sends="tone_stream://%(1000,0,440)", up_for=60.0),
    "2": FarEnd(ring=True, answer_after=1.0, up_for=30.0),
    "3": FarEnd(refuse="USER_BUSY"),
    "4": FarEnd(ring=True, answer_after=None),
    "5": FarEnd(refuse="UNALLOCATED_NUMBER"),
    "6": FarEnd(up_for=2.0),
    "7": FarEnd(early_media="tone_stream://%(1000,0,523)", answer_after=3.0, up_for=30.0),
    "8": FarEnd(refuse="CALL_REJECTED"),
    "9": FarEnd(ring=True, answer_after=1.0, up_for=30.0, dtmf="1234#", dtmf_after=3.0),
}
UNKNOWN = FarEnd(refuse="UNALLOCATED_NUMBER")


def far_end_for(number: str) -> FarEnd:
    """The behaviour of the phone at number."""
    m = _PLAN_NUMBER.match(number)
    return PLAN.get(m.group(1), UNKNOWN) if m else UNKNOWN


def run_far_end(switch: Switch, ch: Channel, far: FarEnd, invited: float) -> None:
    """Play the far end's part of the call (runs in its own greenlet, killed when the leg ends).

    Its times count from ``invited`` (monotonic), as a far end's own clock runs: a stall of this
    process (a loaded machine) must not push its answer back behind the originate's timeout.
    """
    gevent.sleep(max(0.0, invited + switch.real(SIP_DELAY) - time.monotonic()))
    if switch.far_end_sessions and ch.is_up:
        # The INVITE reached a far end living on this same switch: its inbound session needs admission.
        if switch.limits.admit() is None:
            ch.hangup("NORMAL_TEMPORARY_FAILURE", disposition="recv_refuse", sip_reply=NO_SESSION_REPLY)
            return
        ch.far_end_session = True
    if far.refuse:
        ch.hangup(far.refuse, disposition="recv_refuse")
        return
    if far.ring:
        ch.mark_ring_ready()
    if far.early_media:
        ch.send_audio("early_media", far.early_media)
        ch.mark_pre_answered()
    if far.answer_after is None:
        return
    gevent.sleep(max(0.0, invited + switch.real(far.answer_after) - time.monotonic()))
    if not ch.is_up:
        return
    ch.send_audio("tone" if far.sends.startswith("tone_stream://") else "silence", far.sends if far.sends != "silence" else "")
    ch.mark_answered()
    waited = 0.0
    if far.dtmf:
        switch.sleep(far.dtmf_after)
        waited = far.dtmf_after
        for digit in far.dtmf:
            if not ch.is_up:
                return
            send_dtmf(ch, digit)
            switch.sleep(0.2)
            waited += 0.2
    if far.up_for is None:
        return
    switch.sleep(max(0.0, far.up_for - waited))
    far_end_hangup(ch)


def far_end_hangup(ch: Channel, cause: str = "NORMAL_CLEARING") -> bool:
    """The far-end phone hangs up (BYE from the far end)."""
    if ch.answered_us:
        return ch.hangup(cause, disposition="recv_bye")
    return ch.hangup(cause, disposition="recv_refuse")


def send_dtmf(ch: Channel, digit: str, duration: int = 1600) -> None:
    """A DTMF digit from the far end (RFC 2833)."""
    ch.dtmf.append(digit)
    ch.fire("DTMF", ("switch_channel.c", "switch_channel_dequeue_dtmf", 677),
            mid=[("DTMF-Digit", digit), ("DTMF-Duration", str(duration)), ("DTMF-Source", "RTP")])
    ch.queue_ready.set()
