"""A simulated call leg: its state, variables, FreeSWITCH event headers and what its person heard.

Times: ``*_us`` are wall-clock microseconds (as in FreeSWITCH headers); ``*_at`` are
``time.monotonic()`` values; plan times (heard timeline) are real elapsed seconds / time_scale.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event as GEvent

from .causes import SIP_REFUSALS, q850
from .events import Event

if TYPE_CHECKING:
    from .core import Switch

CALLSTATE_NUMBERS = {
    "DOWN": 0, "DIALING": 1, "RINGING": 2, "EARLY": 3, "ACTIVE": 4, "HELD": 5, "RING_WAIT": 6, "HANGUP": 7,
    "UNHELD": 8,
}
STATE_NUMBERS = {
    "CS_NEW": 0, "CS_INIT": 1, "CS_ROUTING": 2, "CS_SOFT_EXECUTE": 3, "CS_EXECUTE": 4,
    "CS_EXCHANGE_MEDIA": 5, "CS_PARK": 6, "CS_CONSUME_MEDIA": 7, "CS_HIBERNATE": 8, "CS_RESET": 9,
    "CS_HANGUP": 10, "CS_REPORTING": 11, "CS_DESTROY": 12,
}


@dataclass
class QueuedApp:
    """An application waiting in a channel's queue (from sendmsg, uuid_broadcast, ...)."""

    name: str
    arg: str
    event_uuid: str | None = None
    loops: int = 1
    event_lock: bool = False  # sendmsg event-lock: nothing else queued runs until this app is done


@dataclass
class Recording:
    """One recording of a channel: where it was written and for how long (plan seconds)."""

    path: str
    started_at: float
    stereo: bool = False
    limit: float | None = None  # plan seconds after which recording stops by itself
    read: bool = True  # what the far end sends (RECORD_WRITE_ONLY turns it off)
    write: bool = True  # what is played to the leg (RECORD_READ_ONLY turns it off)
    stopped_at: float | None = None
    plan_seconds: float = 0.0
    written: bool = False


@dataclass
class Segment:
    """One stretch of what the person on a leg heard."""

    start: float
    kind: str
    source: str = ""
    end: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The segment as the dict tests and `api standin heard` see."""
        return {"start": self.start, "end": self.end, "kind": self.kind, "source": self.source}


@dataclass(eq=False, repr=False)
class Channel:
    """A call leg owned by the switch."""

    switch: Switch
    uuid: str
    number: str
    name: str
    variables: dict[str, str] = field(default_factory=dict)
    direction: str = "outbound"
    caller_id_name: str = ""
    caller_id_number: str = "0000000000"
    session_id: int = 0

    def __post_init__(self) -> None:
        self.created_us = int(time.time() * 1_000_000)
        self.created_at = time.monotonic()
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.answered_us = 0
        self.progress_us = 0
        self.progress_media_us = 0
        self.hangup_us = 0
        self.bridged_us = 0
        self.state = "CS_INIT"  # running state (Channel-State)
        self.state_number = 2  # Channel-State-Number as FreeSWITCH reports it
        self.callstate = "DOWN"
        self.answer_state = "ringing"
        self.hangup_cause: str | None = None
        self.hit_dialplan = False
        self.cid_flipped = False
        self.network_addr = False
        self.media_vars = False
        self.other: Channel | None = None  # Other-Leg-* subject
        self.other_type = ""  # "originator" on B legs, "originatee" on A legs
        self.bridged_to: Channel | None = None
        self.heard: list[Segment] = []
        self.recordings: list[Recording] = []
        self.queue: deque[QueuedApp] = deque()
        self.queue_ready = GEvent()
        self.hungup = GEvent()
        self.answered = GEvent()
        self.ring_ready = GEvent()
        self.early_media = GEvent()
        self.broken = GEvent()  # uuid_break: stop the current playback
        self.destroyed = GEvent()
        self.reported = GEvent()  # CHANNEL_HANGUP_COMPLETE was fired
        self.has_session = False  # True once an executor greenlet drives this channel
        self.far_end_session = False  # its far end holds a session of this switch (far_end_sessions)
        self.far_end_settles_at: float | None = None  # monotonic time its far end answers or refuses
        self.sent: list[Segment] = []  # what this leg's far-end person sends: silence, tone, early_media
        self.greenlets: list[gevent.Greenlet] = []
        self.transfer_apps: list[tuple[str, str]] | None = None
        self.dtmf: deque[str] = deque()
        self.current_app: str | None = None
        self.current_app_data = ""
        self.app_uuids: list[str] = []  # Application-UUIDs of the applications running now, outermost first
        self.app_response: str | None = None
        self.event_locked = 0  # event-locked applications running (CF_EVENT_LOCK)
        self.broadcasting = 0  # queued (sendmsg/broadcast) applications running (CF_BROADCAST)
        self.stop_broadcast = False  # uuid_break during a broadcast (CF_STOP_BROADCAST): no more loops
        self.played: float | None = None  # plan seconds the last playback lasted
        self.callee: str | None = None  # after a bridge: the other party's number (Callee-ID)
        self.call_uuid = self.uuid  # Channel-Call-UUID: the originator's uuid on bridge B legs
        # Caller-profile changes made by transfers (uuid_transfer, uuid_bridge):
        self.profile_index = 1
        self.profile_created_us = self.created_us
        self.dialplan: str | None = None
        self.transfer_source: str | None = None
        self.rdnis: str | None = None
        self.dest_override: str | None = None
        self.inbound_logical = False
        self.cid_override: str | None = None
        self.pending_transfer: tuple[str, str] | None = None  # (kind, target) until the old app completes
        self.transfer_profiled = False
        self.heard.append(Segment(start=0.0, kind="ringing"))

    def __repr__(self) -> str:
        return f"<Channel {self.uuid} {self.number} {self.answer_state} {self.hangup_cause or ''}>"

    # ----- introspection -------------------------------------------------------------------
    @property
    def live(self) -> bool:
        """Not destroyed yet (uuid_exists is true)."""
        return not self.destroyed.is_set()

    @property
    def is_up(self) -> bool:
        """Not hung up yet."""
        return not self.hungup.is_set()

    def plan_now(self) -> float:
        """Plan seconds since this channel was created."""
        return (time.monotonic() - self.created_at) / self.switch.time_scale

    def heard_list(self) -> list[dict[str, Any]]:
        """What the person on this leg heard, oldest first."""
        return [seg.as_dict() for seg in self.heard]

    def _hear(self, kind: str, source: str = "") -> None:
        now = self.plan_now()
        if self.heard:
            last = self.heard[-1]
            if last.end is None:
                if last.kind == kind and last.source == source:
                    return
                last.end = now
                # Between two back-to-back applications the leg hears silence for a few microseconds:
                # not worth a segment (under 2 ms real time).
                if last.kind == "silence" and (now - last.start) * self.switch.time_scale < 0.002 and len(self.heard) > 1:
                    self.heard.pop()
                    prev = self.heard[-1]
                    if prev.kind == kind and prev.source == source:
                        prev.end = None
                        return
        if self.hungup.is_set():
            return
        self.heard.append(Segment(start=now, kind=kind, source=source))

    def send_audio(self, kind: str, source: str = "") -> None:
        """The far-end person starts sending something (kind silence|tone|early_media)."""
        now = self.plan_now()
        if self.sent and self.sent[-1].end is None:
            self.sent[-1].end = now
        if self.is_up:
            self.sent.append(Segment(start=now, kind=kind, source=source))

    def hear(self, kind: str, source: str = "") -> None:
        """Start a new heard segment (closing the current one)."""
        self._hear(kind, source)

    def hear_idle(self) -> None:
        """Back to what the leg hears when nothing is played: the bridged leg, or silence."""
        if self.bridged_to is not None:
            self._hear("bridge", self.bridged_to.uuid)
        else:
            self._hear("silence")

    def _close_heard(self) -> None:
        now = self.plan_now()
        for timeline in (self.heard, self.sent):
            if timeline and timeline[-1].end is None:
                timeline[-1].end = now

    # ----- variables ---------------------------------------------------------------------------
    def var(self, name: str, default: str | None = None) -> str | None:
        """A channel variable, or default."""
        return self.variables.get(name, default)

    def set_var(self, name: str, value: str | None) -> None:
        """Set (or with None, unset) a channel variable, keeping FreeSWITCH's insertion order."""
        if value is None:
            self.variables.pop(name, None)
        else:
            self.variables.pop(name, None)
            self.variables[name] = value

    def true_var(self, name: str) -> bool:
        """Whether a variable holds one of FreeSWITCH's true values."""
        return (self.variables.get(name) or "").lower() in ("true", "yes", "on", "1", "enabled", "active", "allow")

    # ----- events ---------------------------------------------------------------------------
    def event(self, name: str, calling: tuple[str, str, int], pre: list[tuple[str, str]] | None = None,
              post: list[tuple[str, str]] | None = None, mid: list[tuple[str, str]] | None = None,
              body: str | None = None, with_vars: bool = True) -> Event:
        """Build a channel event with FreeSWITCH's header order."""
        ev = self.switch.events.new(name, calling)
        h = ev.headers
        if pre:
            h.extend(pre)
        h.append(("Channel-State", self.state))
        h.append(("Channel-Call-State", self.callstate))
        h.append(("Channel-State-Number", str(self.state_number)))
        h.append(("Channel-Name", self.name))
        h.append(("Unique-ID", self.uuid))
        h.append(("Call-Direction", self.direction))
        h.append(("Presence-Call-Direction", self.direction))
        h.append(("Channel-HIT-Dialplan", "true" if self.hit_dialplan else "false"))
        h.append(("Channel-Call-UUID", self.call_uuid))
        h.append(("Answer-State", self.answer_state))
        if self.hangup_cause:
            h.append(("Hangup-Cause", self.hangup_cause))
        if self.media_vars:
            h.extend([
                ("Channel-Read-Codec-Name", "PCMU"), ("Channel-Read-Codec-Rate", "8000"),
                ("Channel-Read-Codec-Bit-Rate", "64000"), ("Channel-Write-Codec-Name", "PCMU"),
                ("Channel-Write-Codec-Rate", "8000"), ("Channel-Write-Codec-Bit-Rate", "64000"),
            ])
        self._profile_headers(h, "Caller-", full=True)
        if self.other is not None:
            h.append(("Other-Type", self.other_type))
            self.other._profile_headers(h, "Other-Leg-", full=False, originator=self.other_type == "originator")
        if mid:
            h.extend(mid)
        if with_vars:
            h.extend((f"variable_{key}", value) for key, value in self.variables.items())
        if post:
            h.extend(post)
        ev.body = body
        return ev

    def _profile_headers(self, h: list[tuple[str, str]], prefix: str, full: bool, originator: bool = False) -> None:
        h.append((f"{prefix}Direction", self.direction))
        # The originator's profile as a B leg sees it is a clone taken as the inbound side.
        inbound = originator or self.inbound_logical
        h.append((f"{prefix}Logical-Direction", "inbound" if inbound else self.direction))
        if self.dialplan and full:
            h.append((f"{prefix}Dialplan", self.dialplan))
        if self.cid_flipped:
            cid = self.cid_override or self.number
            h.append((f"{prefix}Caller-ID-Name", cid))
            h.append((f"{prefix}Caller-ID-Number", cid))
            h.append((f"{prefix}Orig-Caller-ID-Number", self.caller_id_number))
            if self.callee and not originator:
                h.append((f"{prefix}Callee-ID-Name", self.callee))
                h.append((f"{prefix}Callee-ID-Number", self.callee))
            else:
                h.append((f"{prefix}Callee-ID-Number", self.caller_id_number))
        else:
            if self.caller_id_name:
                h.append((f"{prefix}Caller-ID-Name", self.caller_id_name))
            h.append((f"{prefix}Caller-ID-Number", self.caller_id_number))
            h.append((f"{prefix}Orig-Caller-ID-Number", self.caller_id_number))
            callee_name = self.number if self.answered_us else "Outbound Call"
            h.append((f"{prefix}Callee-ID-Name", callee_name))
            h.append((f"{prefix}Callee-ID-Number", self.number))
        if self.network_addr:
            h.append((f"{prefix}Network-Addr", "127.0.0.1"))
        h.append((f"{prefix}ANI", self.caller_id_number))
        h.append((f"{prefix}Destination-Number", self.dest_override or self.number))
        h.append((f"{prefix}Unique-ID", self.uuid))
        h.append((f"{prefix}Source", "src/switch_ivr_originate.c"))
        if self.transfer_source and full:
            h.append((f"{prefix}Transfer-Source", self.transfer_source))
        h.append((f"{prefix}Context", "default"))
        if self.rdnis and full:
            h.append((f"{prefix}RDNIS", self.rdnis))
        h.append((f"{prefix}Channel-Name", self.name))
        if full:
            h.append((f"{prefix}Profile-Index", str(self.profile_index)))
        times = (0, 0, 0, 0, 0, 0, 0) if originator else (
            self.profile_created_us, self.created_us, self.answered_us, self.progress_us, self.progress_media_us,
            self.hangup_us, self.bridged_us)
        h.append((f"{prefix}Profile-Created-Time", str(times[0])))
        h.append((f"{prefix}Channel-Created-Time", str(times[1])))
        h.append((f"{prefix}Channel-Answered-Time", str(times[2])))
        h.append((f"{prefix}Channel-Progress-Time", str(times[3])))
        h.append((f"{prefix}Channel-Progress-Media-Time", str(times[4])))
        h.append((f"{prefix}Channel-Hangup-Time", str(times[5])))
        h.append((f"{prefix}Channel-Transfer-Time", "0"))
        h.append((f"{prefix}Channel-Resurrect-Time", "0"))
        h.append((f"{prefix}Channel-Bridged-Time", str(times[6])))
        h.append((f"{prefix}Channel-Last-Hold", "0"))
        h.append((f"{prefix}Channel-Hold-Accum", "0"))
        h.append((f"{prefix}Screen-Bit", "true"))
        h.append((f"{prefix}Privacy-Hide-Name", "false"))
        h.append((f"{prefix}Privacy-Hide-Number", "false"))

    def enter(self, state: str, number: int | None = None) -> None:
        """A new running state; FreeSWITCH announces it with a (variable-less) CHANNEL_STATE."""
        changed = state != self.state
        self.state = state
        self.state_number = STATE_NUMBERS[state] if number is None else number
        if changed:
            self.fire_light("CHANNEL_STATE", ("switch_channel.c", "switch_channel_perform_set_running_state", 2408))

    def set_callstate(self, callstate: str) -> None:
        """A new call state, announced with a (variable-less) CHANNEL_CALLSTATE."""
        old, self.callstate = self.callstate, callstate
        if old != callstate:
            pre = [("Original-Channel-Call-State", old),
                   ("Channel-Call-State-Number", str(CALLSTATE_NUMBERS.get(callstate, 0)))]
            self.fire_light("CHANNEL_CALLSTATE", ("switch_channel.c", "switch_channel_perform_set_callstate", 301),
                            pre=pre)

    def fire(self, name: str, calling: tuple[str, str, int], **kw: Any) -> None:
        """Build and dispatch a channel event (not even built when nobody listens)."""
        if self.switch.anyone_wants(name, self.uuid):
            self.switch.fire(self.event(name, calling, **kw))

    def new_transfer_profile(self, kind: str, target: str, dialplan: str | None = None) -> None:
        """A transfer gives the leg a new caller profile (Profile-Index 2, Transfer-Source, inbound)."""
        now = int(time.time() * 1_000_000)
        self.profile_index += 1
        self.profile_created_us = now
        self.transfer_source = f"{now // 1_000_000}:{self.switch.new_uuid()}:{kind}:{target}"
        self.dialplan = dialplan

    # ----- signalling --------------------------------------------------------------------------
    def _sip_answer_vars(self, user_agent: bool = True) -> None:
        """Variables sofia sets once the far end responded (as in the traces)."""
        if self.network_addr:
            return
        self.network_addr = True
        v = self.variables
        v["sip_call_id"] = self.switch.new_uuid()
        v.pop("sip_local_network_addr", None)
        v["sip_local_network_addr"] = "127.0.0.1"
        v["sip_reply_host"] = "127.0.0.1"
        v["sip_reply_port"] = "5090"
        v["sip_network_ip"] = "127.0.0.1"
        v["sip_network_port"] = "5090"
        if user_agent:
            v["sip_user_agent"] = "FreeSWITCH-carrier-sim"

    def _media_up(self) -> None:
        if self.media_vars:
            return
        self.media_vars = True
        v = self.variables
        for key, value in (("rtp_use_codec_name", "PCMU"), ("rtp_use_codec_rate", "8000"),
                           ("rtp_use_codec_ptime", "20"), ("read_codec", "PCMU"), ("read_rate", "8000"),
                           ("write_codec", "PCMU"), ("write_rate", "8000"), ("dtmf_type", "rfc2833")):
            v[key] = value
        # The codecs being set are announced (variable-less, with FreeSWITCH's odd header spellings).
        self.fire_light("CODEC", ("switch_core_codec.c", "switch_core_session_set_real_read_codec", 168),
                        post=[("channel-read-codec-name", "PCMU"), ("channel-read-codec-rate", "8000"),
                              ("channel-read-codec-bit-rate", "64000")])
        self.fire_light("CODEC", ("switch_core_codec.c", "switch_core_session_set_write_codec", 450),
                        post=[("Channel-Write-Codec-Name", "PCMU"), ("Channel-Write-Codec-Rate", "8000"),
                              ("Channel-Write-codec-bit-rate", "64000")])

    def fire_light(self, name: str, calling: tuple[str, str, int], **kw: Any) -> None:
        """A channel event without the channel variables (as FreeSWITCH fires state/codec events)."""
        if self.switch.anyone_wants(name, self.uuid):
            self.switch.fire(self.event(name, calling, with_vars=False, **kw))

    def flip_cid(self) -> None:
        """The originated leg starts its application: caller and callee ids swap (CALL_UPDATE)."""
        if self.cid_flipped:
            return
        self.cid_flipped = True
        self.hit_dialplan = True
        self.variables.setdefault("pre_transfer_caller_id_number", self.caller_id_number)
        self.variables["channel_cid_flipped"] = "yes"
        self.fire("CALL_UPDATE", ("switch_channel.c", "switch_channel_flip_cid", 3277), pre=[("Direction", "RECV")])

    def mark_ring_ready(self) -> None:
        """The far end sent 180 Ringing."""
        if not self.is_up or self.ring_ready.is_set():
            return
        self.progress_us = int(time.time() * 1_000_000)
        self.enter("CS_CONSUME_MEDIA")
        self._sip_answer_vars()
        self.fire("CHANNEL_PROGRESS", ("switch_channel.c", "switch_channel_perform_mark_ring_ready_value", 1140))
        self.set_callstate("RINGING")
        self.ring_ready.set()

    def mark_pre_answered(self) -> None:
        """The far end sent 183 with early media."""
        if not self.is_up or self.early_media.is_set():
            return
        self.progress_media_us = int(time.time() * 1_000_000)
        self.enter("CS_CONSUME_MEDIA")
        self.answer_state = "early"
        self._sip_answer_vars()
        self.variables.setdefault("endpoint_disposition", "EARLY MEDIA")
        self.fire("CHANNEL_PROGRESS_MEDIA", ("switch_channel.c", "switch_channel_perform_mark_pre_answered", 3667))
        self.set_callstate("EARLY")
        self._media_up()
        self.early_media.set()

    def mark_answered(self) -> None:
        """The far end (or the answer app) answered."""
        if not self.is_up or self.answered.is_set():
            return
        self.answered_us = int(time.time() * 1_000_000)
        self.answered_at = time.monotonic()
        if self.state != "CS_EXECUTE":
            self.enter("CS_CONSUME_MEDIA")
        self._sip_answer_vars()
        self._media_up()
        self.answer_state = "answered"
        self.fire("CHANNEL_ANSWER", ("switch_channel.c", "switch_channel_perform_mark_answered", 3846))
        self.variables["endpoint_disposition"] = "ANSWER"
        self.set_callstate("ACTIVE")
        self.hear_idle()
        self.answered.set()

    def hangup(self, cause: str, disposition: str | None = None, sip_reply: tuple[int, str] | None = None) -> bool:
        """Hang this leg up: CHANNEL_HANGUP now; the rest follows when the session unwinds.

        ``sip_reply``: the far end's refusal (status, phrase) when not the number plan's for that cause.
        Returns False if it was already hung up.
        """
        if self.hungup.is_set():
            return False
        self.hangup_cause = cause
        self.hangup_us = int(time.time() * 1_000_000)
        v = self.variables
        if disposition is None:
            disposition = "send_bye" if self.answered_us else "send_cancel"
        after: dict[str, str] = {"sip_hangup_disposition": disposition}
        if disposition == "recv_refuse":
            status, phrase = sip_reply or SIP_REFUSALS.get(cause, (480, "Temporarily Unavailable"))
            self._sip_answer_vars(user_agent=False)
            v["sip_hangup_disposition"] = "recv_refuse"
            v["sip_invite_failure_status"] = str(status)
            v["sip_invite_failure_phrase"] = phrase
            v["sip_term_status"] = str(status)
            v["proto_specific_hangup_cause"] = f"sip:{status}"
            v["sip_term_cause"] = str(q850(cause))
        elif disposition == "recv_bye":
            v["sip_term_status"] = "200"
            v["proto_specific_hangup_cause"] = "sip:200"
            v["sip_term_cause"] = str(q850(cause))
        elif disposition == "send_cancel":
            after["sip_invite_failure_status"] = "487"
            after["sip_invite_failure_phrase"] = "CANCEL"
        self.state_number = 10
        self.answer_state = "hangup"
        self.fire("CHANNEL_HANGUP", ("switch_channel.c", "switch_channel_perform_hangup", 3445))
        # sofia records how the dialog ended only once the BYE/CANCEL went out or came in.
        v.update(after)
        self._close_heard()
        self.ended_at = time.monotonic()
        self.hungup.set()
        self.switch.channel_hungup(self)
        if not self.has_session:
            gevent.spawn(self.finish)
        return True

    def finish(self) -> None:
        """HANGUP_COMPLETE and DESTROY: the end of the leg's life (idempotent)."""
        if self.destroyed.is_set():
            return
        self.destroyed.set()
        self.switch.stop_recordings(self)
        self._final_vars()
        self.enter("CS_HANGUP")
        self.set_callstate("HANGUP")
        self.enter("CS_REPORTING")
        cause = self.hangup_cause or "NORMAL_CLEARING"
        self.fire("CHANNEL_HANGUP_COMPLETE", ("switch_core_state_machine.c", "switch_core_session_reporting_state", 943),
                  pre=[("Hangup-Cause", cause)])
        self.switch.channel_gone(self)
        self.reported.set()
        gevent.sleep(0)  # whoever waited for the report (originate's job result) goes before DESTROY
        self.state_number = 12
        self.call_uuid = self.uuid
        self.variables["call_uuid"] = self.uuid
        self.fire("CHANNEL_DESTROY", ("switch_core_session.c", "switch_core_session_perform_destroy", 1584))
        self.enter("CS_DESTROY")
        for g in self.greenlets:
            if g is not gevent.getcurrent():
                g.kill(block=False)
        self.greenlets = []

    def _final_vars(self) -> None:
        v = self.variables
        cause = self.hangup_cause or "NORMAL_CLEARING"
        v["hangup_cause"] = cause
        v["hangup_cause_q850"] = str(q850(cause))
        v["digits_dialed"] = "none"
        start = self.created_us
        end = self.hangup_us or int(time.time() * 1_000_000)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1e6))
        v["start_stamp"] = stamp
        v["profile_start_stamp"] = stamp
        if self.answered_us:
            v["answer_stamp"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.answered_us / 1e6))
        v["end_stamp"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(end / 1e6))
        v["start_epoch"] = str(start // 1_000_000)
        v["start_uepoch"] = str(start)
        v["answer_epoch"] = str(self.answered_us // 1_000_000)
        v["answer_uepoch"] = str(self.answered_us)
        v["progress_epoch"] = str(self.progress_us // 1_000_000)
        v["progress_uepoch"] = str(self.progress_us)
        v["progress_media_epoch"] = str(self.progress_media_us // 1_000_000)
        v["progress_media_uepoch"] = str(self.progress_media_us)
        v["end_epoch"] = str(end // 1_000_000)
        v["end_uepoch"] = str(end)
        v["caller_id"] = self.caller_id_number
        v["duration"] = str((end - start) // 1_000_000)
        v["billsec"] = str((end - self.answered_us) // 1_000_000 if self.answered_us else 0)
        v["mduration"] = str((end - start) // 1000)
        v["billmsec"] = str((end - self.answered_us) // 1000 if self.answered_us else 0)
        v["uduration"] = str(end - start)
        v["billusec"] = str(end - self.answered_us if self.answered_us else 0)
