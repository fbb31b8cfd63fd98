"""The engine's call shape (traces 16a–16e): prompt, ringback override, bridge app, and what A heard."""

from __future__ import annotations

from pathlib import Path

import pytest

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import audible, bg_originate, job_result, kinds, new_uuid, plan_duration_ok, sendmsg, wait_gone


def call_a(c: EslClient, number: str = "15550000301") -> str:
    uuid, job = bg_originate(c, number, extra="app_disable_expand_variables=true,cb_callid=demo-1")
    assert job_result(c, job) == f"+OK {uuid}\n"
    return uuid


def queue_bridge(c: EslClient, a: str, b: str, b_number: str, media: Path, *extra_sets: str,
                 ringback: str | None = None) -> dict[str, str]:
    """playback prompt; set ringback; set instant_ringback; [extra sets]; bridge B — like the engine."""
    ids: dict[str, str] = {}
    ringback = ringback or str(media / "sounds/tone_700hz_20s.wav")
    steps = [("playback", str(media / "sounds/hello_8k.wav")), ("set", f"ringback={ringback}"),
             ("set", "instant_ringback=true"), *(("set", s) for s in extra_sets),
             ("bridge", f"{{origination_uuid={b},ignore_early_media=true,origination_caller_id_number=15551230000}}"
                        f"sofia/gateway/carrier/{b_number}")]
    for app, arg in steps:
        ev = new_uuid()
        ids[f"{app}:{arg}"] = ev
        assert sendmsg(c, a, app, arg, ev).h("Reply-Text") == "+OK"
    return ids


def complete_of(c: EslClient, a: str, app: str) -> object:
    return c.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Unique-ID") == a
                        and m.e("Application") == app)


def ending_of(client: EslClient, a: str, b: str) -> list[tuple[str, str]]:
    """The two legs' hangup, unbridge and hangup-complete events, in the order they came."""
    names = ("CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "CHANNEL_UNBRIDGE")
    return [(m.e("Unique-ID"), m.name) for m in client.events if m.name in names and m.e("Unique-ID") in (a, b)]


def test_16a_ringback_then_bridge(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client), new_uuid()
    ids = queue_bridge(client, a, b, "15550001301", media_dir)
    bridge = client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    assert (bridge.e("Unique-ID"), bridge.e("Other-Leg-Unique-ID")) == (a, b)
    create_b = client.named("CHANNEL_CREATE", b)[0]
    assert create_b.e("Other-Leg-Unique-ID") == a
    assert create_b.e("variable_originating_leg_uuid") == a
    assert client.api(f"uuid_kill {a}") == "+OK\n"
    wait_gone(standin, a)
    wait_gone(standin, b)
    client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == a)
    assert ending_of(client, a, b) == [(a, "CHANNEL_HANGUP"), (b, "CHANNEL_HANGUP"), (b, "CHANNEL_HANGUP_COMPLETE"),
                                       (a, "CHANNEL_UNBRIDGE"), (a, "CHANNEL_HANGUP_COMPLETE")]  # as in 16a
    done = complete_of(client, a, "bridge")
    assert done.e("Application-Response") == "_none_"  # type: ignore[attr-defined]
    assert done.e("variable_originate_disposition") == "SUCCESS"  # type: ignore[attr-defined]
    assert done.e("variable_DIALSTATUS") == "SUCCESS"  # type: ignore[attr-defined]
    # Every queued app completed in order with its sendmsg's Event-UUID.
    got = [m.e("Application-UUID") for m in client.named("CHANNEL_EXECUTE_COMPLETE", a)]
    assert got[:4] == list(ids.values())
    assert len(client.named("CHANNEL_BRIDGE")) == 1
    for uuid in (a, b):
        hup = client.named("CHANNEL_HANGUP_COMPLETE", uuid)[0]
        assert hup.e("Hangup-Cause") == "NORMAL_CLEARING"
        assert hup.e("variable_sip_hangup_disposition") == "send_bye"
    rb = str(media_dir / "sounds/tone_700hz_20s.wav")
    assert audible(standin.heard(a)) == [("ringing", ""), ("file", str(media_dir / "sounds/hello_8k.wav")),
                                         ("ringback", rb), ("bridge", b)]
    segs = {s["kind"]: s for s in standin.heard(a)}
    assert plan_duration_ok(segs["ringback"]["end"] - segs["ringback"]["start"], 2.0)  # B rang 2 s
    ch_a, ch_b = standin.channel(a), standin.channel(b)
    assert ch_a and ch_b and ch_b.answered_at
    b_answered = (ch_b.answered_at - ch_a.created_at) / standin.time_scale
    assert segs["ringback"]["end"] == pytest.approx(b_answered, abs=1.0)  # ringback stops when B answers
    assert audible(standin.heard(b)) == [("ringing", ""), ("bridge", a)]


def test_16b_early_media_never_heard(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client), new_uuid()
    queue_bridge(client, a, b, "15550007302", media_dir)
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    assert client.named("CHANNEL_PROGRESS_MEDIA", b) and not client.named("CHANNEL_PROGRESS", b)
    client.api(f"uuid_kill {a}")
    wait_gone(standin, a)
    heard = kinds(standin.heard(a))
    assert ("early_media", b) not in heard
    segs = {s["kind"]: s for s in standin.heard(a)}
    assert plan_duration_ok(segs["ringback"]["end"] - segs["ringback"]["start"], 3.0)


def test_early_media_heard_when_not_ignored(client: EslClient, standin: StandIn) -> None:
    a, b = call_a(client), new_uuid()
    sendmsg(client, a, "bridge", f"{{origination_uuid={b}}}sofia/gateway/carrier/15550007303", "x")
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    assert ("early_media", b) in kinds(standin.heard(a))


def test_16c_a_hangs_up_while_b_rings(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client), new_uuid()
    queue_bridge(client, a, b, "15550004303", media_dir)
    client.wait_event(lambda m: m.name == "CHANNEL_PROGRESS" and m.e("Unique-ID") == b)
    standin.far_end_hangup(a)  # A's person hangs up
    wait_gone(standin, b)
    hup_b = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == b)
    assert hup_b.e("Hangup-Cause") == "ORIGINATOR_CANCEL"
    assert hup_b.e("variable_sip_hangup_disposition") == "send_cancel"
    client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == a)
    assert ending_of(client, a, b)[-3:] == [(b, "CHANNEL_HANGUP"), (b, "CHANNEL_HANGUP_COMPLETE"),
                                            (a, "CHANNEL_HANGUP_COMPLETE")]  # as in 16c
    done = complete_of(client, a, "bridge")
    assert done.e("variable_originate_disposition") == "ORIGINATOR_CANCEL"  # type: ignore[attr-defined]
    assert done.e("variable_DIALSTATUS") == "CANCEL"  # type: ignore[attr-defined]
    assert not client.named("CHANNEL_BRIDGE")
    assert kinds(standin.heard(a))[-1][0] == "ringback"


def test_16d_b_busy_hangs_a_up(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client), new_uuid()
    queue_bridge(client, a, b, "15550003304", media_dir)
    wait_gone(standin, a)
    done = complete_of(client, a, "bridge")
    for var, value in (("originate_disposition", "USER_BUSY"), ("DIALSTATUS", "BUSY"),
                       ("last_bridge_hangup_cause", "USER_BUSY"), ("originate_failed_cause", "USER_BUSY")):
        assert done.e(f"variable_{var}") == value  # type: ignore[attr-defined]
    assert client.named("CHANNEL_HANGUP", a)[0].e("Hangup-Cause") == "USER_BUSY"
    assert client.api(f"uuid_exists {a}") == "false"
    assert client.api(f"uuid_kill {a}") == "-ERR No such channel!\n"


def test_16e_continue_on_fail_keeps_a_parked(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client), new_uuid()
    queue_bridge(client, a, b, "15550003305", media_dir, "continue_on_fail=true")
    notice = new_uuid()
    sendmsg(client, a, "playback", str(media_dir / "sounds/beep_1k_1s.wav"), notice)
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == notice)
    assert client.api(f"uuid_exists {a}") == "true"
    assert client.api(f"uuid_getvar {a} DIALSTATUS") == "BUSY"
    assert client.api(f"uuid_getvar {a} last_bridge_hangup_cause") == "USER_BUSY"
    assert client.api(f"uuid_getvar {a} originated_legs") == f"{b};Outbound Call;15550003305"  # as in 16c-16e
    assert client.api(f"uuid_kill {a}") == "+OK\n"
    wait_gone(standin, a)


@pytest.mark.parametrize(("cause_number", "cause", "a_survives"), [
    ("15550004306", "NO_ANSWER", True),
    ("15550005306", "UNALLOCATED_NUMBER", False),
    ("15550008306", "CALL_REJECTED", False),
])
def test_bridge_failures_and_handle_cause(client: EslClient, standin: StandIn, cause_number: str, cause: str,
                                          a_survives: bool) -> None:
    a, b = call_a(client), new_uuid()
    sendmsg(client, a, "set", "call_timeout=5", "t")
    sendmsg(client, a, "bridge", f"{{origination_uuid={b},originate_timeout=5}}sofia/gateway/carrier/{cause_number}",
            "br")
    done = client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == "br")
    assert done.e("variable_originate_disposition") == cause
    assert (client.api(f"uuid_exists {a}") == "true") is a_survives


def test_b_hangs_up_first(client: EslClient, standin: StandIn) -> None:
    """Default: A goes back to park; with hangup_after_bridge=true A is hung up with B's cause."""
    a, b = call_a(client), new_uuid()
    sendmsg(client, a, "bridge", f"{{origination_uuid={b}}}sofia/gateway/carrier/15550000307", "br1")
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    standin.far_end_hangup(b)
    complete_of(client, a, "bridge")
    assert client.named("CHANNEL_UNBRIDGE", a)
    assert client.api(f"uuid_exists {a}") == "true"
    b2 = new_uuid()
    sendmsg(client, a, "set", "hangup_after_bridge=true", "s")
    sendmsg(client, a, "bridge", f"{{origination_uuid={b2}}}sofia/gateway/carrier/15550006307", "br2")
    wait_gone(standin, a)  # plan 6: B hangs up 2 s after answering
    assert standin.channel(a).hangup_cause == "NORMAL_CLEARING"  # type: ignore[union-attr]
    assert audible(standin.heard(a))[-2:] == [("bridge", b), ("bridge", b2)]


def test_ringback_tone_and_transfer_ringback(client: EslClient, standin: StandIn) -> None:
    a, b = call_a(client), new_uuid()
    sendmsg(client, a, "set", "ringback=%(2000,4000,440,480)", "r1")
    sendmsg(client, a, "set", "transfer_ringback=tone_stream://%(1000,0,425)", "r2")
    sendmsg(client, a, "bridge", f"{{origination_uuid={b}}}sofia/gateway/carrier/15550002308", "r3")
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    # A is answered, so transfer_ringback wins; without instant_ringback it starts with B's 180.
    assert ("ringback", "tone_stream://%(1000,0,425)") in kinds(standin.heard(a))


def test_prompt_interrupted_by_a_hanging_up(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client), new_uuid()
    queue_bridge(client, a, b, "15550001309", media_dir)
    client.wait_event(lambda m: m.name == "PLAYBACK_START")
    standin.far_end_hangup(a)
    wait_gone(standin, a)
    stop = client.wait_event(lambda m: m.name == "PLAYBACK_STOP")
    assert stop.e("Playback-Status") == "break"
    assert standin.channel(b) is None  # the queued bridge never ran
    hup = client.named("CHANNEL_HANGUP_COMPLETE", a)[0]
    assert hup.e("variable_sip_hangup_disposition") == "recv_bye"


def test_ringback_from_vars_xml_ring_tone(client: EslClient, standin: StandIn) -> None:
    uuid, job = bg_originate(client, "15550000310")  # variables expand on this leg
    job_result(client, job)
    b = new_uuid()
    sendmsg(client, uuid, "set", "ringback=${us-ring}", "u1")
    sendmsg(client, uuid, "bridge", f"{{origination_uuid={b}}}sofia/gateway/carrier/15550002310", "u2")
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    assert ("ringback", "%(2000,4000,440,480)") in audible(standin.heard(uuid))


def test_bridge_early_media_bridges_at_183(client: EslClient, standin: StandIn) -> None:
    a, b = call_a(client), new_uuid()
    sendmsg(client, a, "bridge", f"{{origination_uuid={b},bridge_early_media=true}}sofia/gateway/carrier/15550007311",
            "e1")
    bridge = client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    assert not client.named("CHANNEL_ANSWER", b)  # bridged on early media, before B answered
    assert bridge.e("Other-Leg-Unique-ID") == b
    client.wait_event(lambda m: m.name == "CHANNEL_ANSWER" and m.e("Unique-ID") == b)
    assert audible(standin.heard(a))[-1] == ("bridge", b)


def test_broadcast_to_both_legs_of_a_uuid_bridge(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b = call_a(client, "15550000312"), call_a(client, "15550000313")
    assert client.api(f"uuid_bridge {a} {b}") == f"+OK {b}\n"
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    assert client.api(f"uuid_broadcast {a} {beep} both") == "+OK Message sent\n"
    assert standin.wait_for(lambda: any(s["kind"] == "file" for s in standin.heard(a)), 30)
