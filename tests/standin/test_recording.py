"""Recordings are synthesised from what the leg heard and what its far end sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from freeswitch.standin import StandIn

from .esl_client import EslClient
from .helpers import bg_originate, job_result, new_uuid, sendmsg, wait_gone


def tone_file(path: Path, freq: float, seconds: float, rate: int = 8000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t) * 32767).astype(np.int16), rate)
    return str(path)


def dominant(samples: np.ndarray, rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    if spectrum.max() < 1.0:
        return 0.0
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def window(data: np.ndarray, start: float, end: float, rate: int = 8000) -> np.ndarray:
    return data[int(start * rate): int(end * rate)]


def test_stereo_recording_of_the_engine_call(client: EslClient, standin: StandIn, tmp_path: Path) -> None:
    prompt = tone_file(tmp_path / "prompt_1k.wav", 1000, 3.0)
    dialtone = tone_file(tmp_path / "dial_700.wav", 700, 0.5, rate=16000)  # looped, resampled
    rec = tmp_path / "a.wav"
    a, job = bg_originate(client, "15550000601")
    assert job_result(client, job) == f"+OK {a}\n"
    b = new_uuid()
    for app, arg in [("set", "RECORD_STEREO=true"), ("record_session", str(rec)), ("playback", prompt),
                     ("set", f"ringback={dialtone}"), ("set", "instant_ringback=true"),
                     ("bridge", f"{{origination_uuid={b},ignore_early_media=true}}sofia/gateway/carrier/15550001601")]:
        sendmsg(client, a, app, arg)
    client.wait_event(lambda m: m.name == "CHANNEL_BRIDGE")
    standin.wait_for(lambda: False, 0.03)  # ~3 plan seconds bridged
    client.api(f"uuid_kill {a}")
    wait_gone(standin, a)
    client.wait_event(lambda m: m.name == "RECORD_STOP")
    data, rate = sf.read(str(rec), dtype="float32")
    assert rate == 8000 and data.shape[1] == 2
    read, played = data[:, 0], data[:, 1]
    assert np.abs(read).max() < 0.01  # plan 0's far end is silent
    assert dominant(window(played, 0.5, 2.5)) == pytest.approx(1000, abs=10)  # the prompt
    heard = standin.heard(a)
    ring = next(s for s in heard if s["kind"] == "ringback")
    prompt_start = next(s for s in heard if s["kind"] == "file")["start"]  # the recording began just before
    mid = (ring["start"] + ring["end"]) / 2 - prompt_start
    assert dominant(window(played, mid - 0.4, mid + 0.4)) == pytest.approx(700, abs=10)  # the dialtone
    assert dominant(played[-int(1.0 * rate):]) == pytest.approx(440, abs=10)  # B's far end


def test_mono_uuid_record_hears_the_far_end(client: EslClient, standin: StandIn, tmp_path: Path) -> None:
    a, job = bg_originate(client, "15550001602")  # far end plays 440 Hz once answered
    job_result(client, job)
    rec = tmp_path / "m.wav"
    client.api(f"uuid_record {a} start {rec}")
    standin.wait_for(lambda: False, 0.02)
    client.api(f"uuid_record {a} stop {rec}")
    client.wait_event(lambda m: m.name == "RECORD_STOP")
    data, _ = sf.read(str(rec), dtype="float32")
    assert data.ndim == 1
    assert dominant(data) == pytest.approx(440, abs=10)


def test_uuid_record_limit_stops_by_itself(client: EslClient, standin: StandIn, tmp_path: Path) -> None:
    a, job = bg_originate(client, "15550000603")
    job_result(client, job)
    rec = tmp_path / "limited.wav"
    assert client.api(f"uuid_record {a} start {rec} 2") == "+OK Success\n"
    client.wait_event(lambda m: m.name == "RECORD_STOP")
    assert sf.info(str(rec)).duration == pytest.approx(2.0, abs=0.3)  # the limit, not the clock
    assert client.api(f"uuid_exists {a}") == "true"
