"""The exact application queue callbridge's engine sends (daemon/calls/sequence.py), end to end."""

from __future__ import annotations

from pathlib import Path

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import audible, bg_originate, job_result, new_uuid, plan_duration_ok, sendmsg, wait_gone

NOTICE = "tone_stream://%(500,500,480,620);loops=3"


def engine_call(c: EslClient, media: Path, b_number: str, max_duration: int = 3600) -> tuple[str, str, dict[str, str]]:
    a, job = bg_originate(c, "15550000701",
                          extra="originate_timeout=45,cb_callid=abc12345,app_disable_expand_variables=true")
    assert job_result(c, job) == f"+OK {a}\n"
    b = new_uuid()
    dialtone = str(media / "sounds/tone_700hz_20s.wav")
    steps = [
        ("set", "cb_stage=queued"), ("sched_hangup", f"+{max_duration} ALLOTTED_TIMEOUT"),
        ("set", "hangup_after_bridge=true"), ("set", "continue_on_fail=true"),
        ("playback", str(media / "sounds/beep_1k_1s.wav")),
        ("set", f"ringback={dialtone}"), ("set", f"transfer_ringback={dialtone}"), ("set", "instant_ringback=true"),
        ("set", "RECORD_STEREO=true"),
        ("bridge", f"{{origination_uuid={b},origination_caller_id_number=15551230000,ignore_early_media=true,"
                   f"originate_timeout=45,cb_callid=abc12345}}sofia/gateway/carrier/{b_number}"),
        ("playback", NOTICE), ("hangup", "NORMAL_CLEARING"),
    ]
    ids = {}
    for app, arg in steps:
        ids[f"{app} {arg}"] = ev = new_uuid()
        assert sendmsg(c, a, app, arg, ev).h("Reply-Text") == "+OK"
    return a, b, ids


def test_b_answers_then_hangs_up_ends_a(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b, _ = engine_call(client, media_dir, "15550006701")  # B hangs up 2 s after answering
    wait_gone(standin, a)
    hup_a = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == a)
    assert hup_a.e("Hangup-Cause") == "NORMAL_CLEARING"
    assert hup_a.e("variable_sip_hangup_disposition") == "send_bye"
    hup_b = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == b)
    assert hup_b.e("variable_sip_hangup_disposition") == "recv_bye"
    assert not [m for m in client.named("PLAYBACK_START", a) if m.e("Playback-File-Path") == NOTICE]
    done = client.named("CHANNEL_EXECUTE_COMPLETE", a)
    bridge = next(m for m in done if m.e("Application") == "bridge")
    assert bridge.e("variable_originate_disposition") == "SUCCESS"
    assert [k for k, _ in audible(standin.heard(a))] == ["ringing", "file", "ringback", "bridge"]


def test_b_busy_plays_the_notice_then_hangs_up(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b, ids = engine_call(client, media_dir, "15550003702")
    client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == a)
    done = {m.e("Application-UUID"): m for m in client.named("CHANNEL_EXECUTE_COMPLETE", a)}
    bridge = done[ids[next(k for k in ids if k.startswith("bridge "))]]
    assert (bridge.e("variable_originate_disposition"), bridge.e("variable_DIALSTATUS")) == ("USER_BUSY", "BUSY")
    assert done[ids[f"playback {NOTICE}"]].e("Application-Response") == "FILE PLAYED"
    assert standin.channel(a).hangup_cause == "NORMAL_CLEARING"  # type: ignore[union-attr]
    tone = next(s for s in standin.heard(a) if s["kind"] == "tone")
    assert tone["source"] == NOTICE and plan_duration_ok(tone["end"] - tone["start"], 3.0)
    assert standin.channel(b).hangup_cause == "USER_BUSY"  # type: ignore[union-attr]


def test_max_duration_ends_a_bridged_call(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    # Far past the bridge (the prompt lasts 5.655 s): at 8 the limit could strike before B was bridged on
    # a loaded machine, and B was then canceled instead of hung up.
    a, b, _ = engine_call(client, media_dir, "15550000703", max_duration=30)
    wait_gone(standin, a)
    wait_gone(standin, b)
    assert standin.channel(a).hangup_cause == "ALLOTTED_TIMEOUT"  # type: ignore[union-attr]
    assert standin.channel(b).hangup_cause == "NORMAL_CLEARING"  # type: ignore[union-attr]
    client.wait_event(lambda m: m.name == "CHANNEL_UNBRIDGE" and m.e("Unique-ID") == a)
    assert client.named("CHANNEL_BRIDGE")


def test_daemon_restart_keeps_the_call(client: EslClient, standin: StandIn, media_dir: Path) -> None:
    a, b, _ = engine_call(client, media_dir, "15550000704")
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    standin.drop_connections()
    again = EslClient(standin.port)
    again.auth()
    assert again.api(f"uuid_exists {a}") == "true"
    assert again.api(f"uuid_getvar {a} signal_bond") == b
    assert again.api(f"uuid_kill {a}") == "+OK\n"
    wait_gone(standin, b)
    again.close()
