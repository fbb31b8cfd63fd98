"""Dialplan applications run through sendmsg, one after another, as FreeSWITCH runs them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import soundfile as sf

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import bg_originate, job_result, new_uuid, plan_duration_ok, sendmsg, wait_gone


@pytest.fixture
def leg(client: EslClient) -> str:
    """An answered, parked A leg (plan 0: stays up 300 s)."""
    uuid, job = bg_originate(client, "15550000201", extra="app_disable_expand_variables=true")
    assert job_result(client, job) == f"+OK {uuid}\n"
    client.wait_event(lambda m: m.name == "CHANNEL_PARK" and m.e("Unique-ID") == uuid)
    return uuid


def completes(c: EslClient, uuid: str) -> list[tuple[str, str, str]]:
    return [(m.e("Application") or "", m.e("Application-UUID") or "", m.e("Application-Response") or "")
            for m in c.named("CHANNEL_EXECUTE_COMPLETE", uuid)]


def test_apps_run_in_order_with_application_uuid_echo(client: EslClient, leg: str, media_dir: Path) -> None:
    prompt = str(media_dir / "sounds/hello_8k.wav")
    ids = [new_uuid() for _ in range(4)]
    assert sendmsg(client, leg, "playback", prompt, ids[0]).h("Reply-Text") == "+OK"
    assert sendmsg(client, leg, "set", "foo=bar", ids[1], as_body=False).h("Reply-Text") == "+OK"
    assert sendmsg(client, leg, "playback", "/nonexistent/x.wav", ids[2]).h("Reply-Text") == "+OK"
    assert sendmsg(client, leg, "unset", "foo", ids[3]).h("Reply-Text") == "+OK"
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == ids[3])
    assert completes(client, leg) == [
        ("playback", ids[0], "FILE PLAYED"), ("set", ids[1], "_none_"),
        ("playback", ids[2], "FILE NOT FOUND"), ("unset", ids[3], "_none_"),
    ]
    executes = [m.e("Application-UUID") for m in client.named("CHANNEL_EXECUTE", leg)]
    assert executes[1:] == ids  # [0] is the park from originate
    start, stop = client.named("PLAYBACK_START", leg), client.named("PLAYBACK_STOP", leg)
    assert len(start) == len(stop) == 1  # none for the missing file
    assert stop[0].e("Playback-Status") == "done"
    assert stop[0].e("Playback-File-Path") == prompt
    assert stop[0].e("variable_playback_ms") == "5655"
    heard = [s for s in client.events if s.name == "PLAYBACK_START"]
    assert heard


def test_playback_lasts_as_long_as_the_file(client: EslClient, standin: StandIn, leg: str, media_dir: Path) -> None:
    prompt = str(media_dir / "sounds/hello_8k.wav")
    sendmsg(client, leg, "playback", prompt, "p1")
    start = client.wait_event(lambda m: m.name == "PLAYBACK_START")
    stop = client.wait_event(lambda m: m.name == "PLAYBACK_STOP")
    stamps = [int(m.e("Event-Date-Timestamp") or 0) for m in (start, stop)]  # the switch's clock, in µs
    assert plan_duration_ok((stamps[1] - stamps[0]) / 1e6 / standin.time_scale, 5.655)
    assert start.e("Application") is None
    files = [s for s in standin.heard(leg) if s["kind"] == "file"]
    assert files[0]["source"] == prompt
    assert plan_duration_ok(files[0]["end"] - files[0]["start"], 5.655)


def test_tone_stream_until_break(client: EslClient, standin: StandIn, leg: str) -> None:
    sendmsg(client, leg, "playback", "tone_stream://%(1000,0,350,440);loops=-1", "t1")
    client.wait_event(lambda m: m.name == "PLAYBACK_START")
    assert client.api(f"uuid_break {leg}") == "+OK\n"
    stop = client.wait_event(lambda m: m.name == "PLAYBACK_STOP")
    assert stop.e("Playback-Status") == "break"
    assert [s["kind"] for s in standin.heard(leg)][-2:] == ["tone", "silence"]


def test_a_tone_stream_without_loops_plays_its_tones_once(client: EslClient, leg: str) -> None:
    """mod_tone_stream renders the tones once into a buffer whose loops count stays 0 unless ``;loops=``
    sets it, and switch_buffer_read_loop ends the stream when it runs out with loops 0: a tone_stream
    without ``;loops=`` ends after one pass (here 1 s on + 1 s off), ``;loops=N`` after N (the recording 12:
    ``%(500,500,800);loops=2`` stopped "done" at playback_last_offset_pos 16000, two seconds)."""
    for app_uuid, spec in (("once", "tone_stream://%(1000,1000,440)"), ("twice", "tone_stream://%(500,500,800);loops=2")):
        sendmsg(client, leg, "playback", spec, app_uuid)
        client.wait_event(lambda m, u=app_uuid: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == u, 10)
    stops = client.named("PLAYBACK_STOP", leg)
    assert [(m.e("Playback-Status"), m.e("variable_playback_last_offset_pos")) for m in stops] == [
        ("done", "16000"), ("done", "16000")]


def test_expansion_off_when_disabled(client: EslClient, standin: StandIn, leg: str) -> None:
    sendmsg(client, leg, "set", "greeting=${cb_missing}x", "s1")
    client.wait_event(lambda m: m.e("Application-UUID") == "s1" and m.name == "CHANNEL_EXECUTE_COMPLETE")
    assert client.api(f"uuid_getvar {leg} greeting") == "${cb_missing}x"


def test_expansion_on_by_default(client: EslClient) -> None:
    uuid, job = bg_originate(client, "15550000202", extra="cb_callid=abc123")
    assert job_result(client, job).startswith("+OK")
    sendmsg(client, uuid, "set", "copy=${cb_callid}-${uuid}", "x1")
    client.wait_event(lambda m: m.e("Application-UUID") == "x1" and m.name == "CHANNEL_EXECUTE_COMPLETE")
    assert client.api(f"uuid_getvar {uuid} copy") == f"abc123-{uuid}"


def test_export_sleep_and_hangup_cause(client: EslClient, standin: StandIn, leg: str) -> None:
    sendmsg(client, leg, "export", "cb_tag=t1", "e1")
    sendmsg(client, leg, "sleep", "2000", "e2")
    sendmsg(client, leg, "hangup", "USER_BUSY", "e3")
    hup = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP_COMPLETE" and m.e("Unique-ID") == leg)
    assert hup.e("Hangup-Cause") == "USER_BUSY"
    assert hup.e("variable_export_vars") == "cb_tag"
    assert [a for a, _, _ in completes(client, leg)] == ["export", "sleep", "hangup", "park"]
    slept = client.named("CHANNEL_EXECUTE_COMPLETE", leg)
    assert slept


def test_sched_hangup(client: EslClient, standin: StandIn, leg: str) -> None:
    t0 = time.monotonic()
    sendmsg(client, leg, "sched_hangup", "+3 ALLOTTED_TIMEOUT", "h1")
    hup = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP" and m.e("Unique-ID") == leg)
    assert hup.e("Hangup-Cause") == "ALLOTTED_TIMEOUT"
    assert plan_duration_ok((time.monotonic() - t0) / standin.time_scale, 3.0)


def test_call_command_hangup_and_missing_session(client: EslClient, standin: StandIn, leg: str) -> None:
    reply = client.cmd(f"sendmsg {leg}\ncall-command: hangup\nhangup-cause: CALL_REJECTED")
    assert reply.h("Reply-Text") == "+OK"
    wait_gone(standin, leg)
    assert standin.channel(leg).hangup_cause == "CALL_REJECTED"  # type: ignore[union-attr]
    reply = client.cmd(f"sendmsg {leg}\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING")
    assert reply.h("Reply-Text") == f"-ERR invalid session id [{leg}]"


def test_unknown_app_hangs_up_destination_out_of_order(client: EslClient, standin: StandIn, leg: str) -> None:
    assert sendmsg(client, leg, "nosuchapp", "", "n1").h("Reply-Text") == "+OK"
    hup = client.wait_event(lambda m: m.name == "CHANNEL_HANGUP" and m.e("Unique-ID") == leg)
    assert hup.e("Hangup-Cause") == "DESTINATION_OUT_OF_ORDER"


def test_record_session_writes_wav(client: EslClient, standin: StandIn, leg: str, tmp_path: Path) -> None:
    path = tmp_path / "rec" / "a.wav"
    sendmsg(client, leg, "set", "RECORD_STEREO=true", "r0")
    sendmsg(client, leg, "record_session", str(path), "r1")
    client.wait_event(lambda m: m.name == "RECORD_START")
    sendmsg(client, leg, "sleep", "4000", "r2")
    sendmsg(client, leg, "hangup", "", "r3")
    stop = client.wait_event(lambda m: m.name == "RECORD_STOP")
    assert stop.e("Record-File-Path") == str(path)
    info = sf.info(str(path))
    assert info.channels == 2 and info.samplerate == 8000
    assert plan_duration_ok(info.duration, 4.0)
    recs = standin.channel(leg).recordings  # type: ignore[union-attr]
    assert recs[0].path == str(path) and recs[0].written


def test_uuid_record_start_stop(client: EslClient, standin: StandIn, leg: str, tmp_path: Path) -> None:
    path = tmp_path / "b.wav"
    assert client.api(f"uuid_record {leg} start {path}") == "+OK Success\n"
    client.wait_event(lambda m: m.name == "RECORD_START")
    standin.wait_for(lambda: False, 2 * standin.time_scale)
    assert client.api(f"uuid_record {leg} stop all") == "+OK Success\n"
    client.wait_event(lambda m: m.name == "RECORD_STOP")
    assert plan_duration_ok(sf.info(str(path)).duration, 2.0)
    assert client.api(f"uuid_record {new_uuid()} start /tmp/x.wav") == "-ERR Cannot locate session!\n"


def test_broadcast_and_transfer(client: EslClient, standin: StandIn, leg: str, media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    assert client.api(f"uuid_broadcast {leg} {beep} aleg") == "+OK Message sent\n"
    done = client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application") == "playback")
    assert done.e("Application-Response") == "FILE PLAYED"
    assert client.api(f"uuid_transfer {leg} park inline") == "+OK\n"
    client.wait_event(lambda m: len(client.named("CHANNEL_PARK", leg)) == 2)
    assert client.api(f"uuid_exists {leg}") == "true"


def test_play_and_get_digits_with_far_end_dtmf(client: EslClient, standin: StandIn, leg: str,
                                               media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    sendmsg(client, leg, "play_and_get_digits", f"1 4 2 3000 # {beep} {beep} cb_digits \\d+", "d1")
    client.wait_event(lambda m: m.name == "PLAYBACK_STOP")
    assert standin.send_dtmf(leg, "42#")
    client.wait_event(lambda m: m.name == "CHANNEL_EXECUTE_COMPLETE" and m.e("Application-UUID") == "d1")
    assert client.api(f"uuid_getvar {leg} cb_digits") == "42"
    assert [m.e("DTMF-Digit") for m in client.named("DTMF", leg)] == ["4", "2", "#"]


def test_loops_header(client: EslClient, standin: StandIn, leg: str,
                                                 media_dir: Path) -> None:
    beep = str(media_dir / "sounds/beep_1k_1s.wav")
    reply = client.cmd(f"sendmsg {leg}\ncall-command: execute\nexecute-app-name: playback\n"
                       f"execute-app-arg: {beep}\nloops: 3\nEvent-UUID: l1")
    assert reply.h("Reply-Text") == "+OK"
    client.wait_event(lambda m: len([e for e in client.named("CHANNEL_EXECUTE_COMPLETE", leg)
                                     if e.e("Application-UUID") == "l1"]) == 3)
    assert len(client.named("PLAYBACK_STOP", leg)) == 3
