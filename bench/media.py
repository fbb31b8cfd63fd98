"""Media (issues 5, 13, 14): audio normalised per second, the time to speak 200 characters, the worker pool.

* ``daemon.media.audio.normalise(data, rate=8000, max_seconds=600)`` on a 60 s 44.1 kHz stereo WAV and the same
  audio as MP3 (when this libsndfile writes MP3): audio seconds / wall seconds, best of 3 (what one worker
  process does per file).
* The same WAV through the worker pool (``media_workers`` processes, the default 2), 8 files at once from
  greenlets: audio seconds / wall seconds, as the daemon gets it (file hand-over and result file included).
* ``MediaLibrary(settings).speak(text, "en-GB")`` with a fresh media folder and a started worker: a
  200-character message (bundled libespeak-ng, then normalised and stored), median of 3 different texts;
  and the same text again (cache).
"""

from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import gevent
import numpy as np
import soundfile as sf

from bench.common import workdir
from bench.report import Report
from daemon.config import load_settings
from daemon.media.audio import normalise
from daemon.media.library import MediaLibrary

TEXTS = (
    "Good morning. This is a reminder from the clinic about your appointment tomorrow at half past ten. "
    "Please stay on the line and we will connect you to the reception desk now. Thank you for waiting.",
    "Hello, your parcel is ready for delivery this afternoon between two and four o'clock. If nobody is "
    "at home, please hold the line and a member of our team will take your new delivery instructions.",
    "Welcome back. Your account manager asked us to call you about the offer you requested last week. "
    "Please wait a moment while we put you through; the call may be recorded to improve our service.",
)


def _audio(seconds: float, rate: int = 44100) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(5)
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.3 * np.sin(2 * np.pi * 660 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([left, right], axis=1).astype(np.float32)


def _encode(audio: np.ndarray, fmt: str, subtype: str) -> bytes:
    out = io.BytesIO()
    sf.write(out, audio, 44100, format=fmt, subtype=subtype)
    return out.getvalue()


def _throughput(data: bytes) -> tuple[float, float]:
    best = float("inf")
    seconds = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        result = normalise(data, rate=8000, max_seconds=600)
        best = min(best, time.perf_counter() - t0)
        seconds = result.seconds
    return seconds / best, seconds


def _pool_throughput(report: Report, library: MediaLibrary, folder: Path, wav: bytes) -> None:
    source = folder / "bench-source.wav"
    source.write_bytes(wav)
    job = {"op": "normalise", "source": str(source), "rate": 8000, "max_seconds": 600, "limits": {},
           "folder": str(folder), "key": "00" * 32}
    at_once = 8
    t0 = time.perf_counter()
    jobs = [gevent.spawn(library.pool.run, job, timeout=600) for _ in range(at_once)]
    gevent.joinall(jobs, raise_error=True)
    wall = time.perf_counter() - t0
    seconds = sum(j.value["seconds"] for j in jobs)
    cpu = sum(j.value["cpu"] for j in jobs)
    for j in jobs:
        Path(j.value["temp"]).unlink()
    report.add(
        "media",
        f"normalise through the worker pool ({library.pool.size} processes, {at_once} files at once)",
        seconds / wall,
        "audio s/s",
        size=f"{at_once} x {seconds / at_once:.0f} s WAV 44.1 kHz stereo; {wall:.2f} s wall, {cpu:.2f} s worker CPU",
    )


def run(report: Report, full: bool) -> None:
    length = 120.0 if full else 60.0
    audio = _audio(length)
    inputs = [("WAV 44.1 kHz stereo 16-bit", _encode(audio, "WAV", "PCM_16"))]
    try:
        inputs.append(("MP3 44.1 kHz stereo", _encode(audio, "MP3", "MPEG_LAYER_III")))
    except (sf.LibsndfileError, ValueError, TypeError) as exc:
        report.errors["media mp3"] = f"this libsndfile cannot write MP3 ({exc}); MP3 figure skipped"
    for name, data in inputs:
        rate, seconds = _throughput(data)
        report.add(
            "media",
            f"normalise {name} to 8 kHz mono",
            rate,
            "audio s/s",
            size=f"{seconds:.0f} s of audio, {len(data) / 2**20:.1f} MiB, best of 3",
        )

    with workdir("media") as folder:
        settings = load_settings(environ={}, state_dir=str(folder / "state"))
        settings.media_dir.mkdir(parents=True, exist_ok=True)
        library = MediaLibrary(settings)
        library.pool.warm_up()
        _pool_throughput(report, library, settings.media_dir, inputs[0][1])
        timings = []
        spoken = 0.0
        for text in TEXTS:
            text = text[:200]
            t0 = time.perf_counter()
            media = library.speak(text, "en-GB")
            timings.append(time.perf_counter() - t0)
            spoken = media.seconds
        t0 = time.perf_counter()
        library.speak(TEXTS[0][:200], "en-GB")
        cached = time.perf_counter() - t0
        library.close()
    report.add(
        "media",
        "speak a 200-character message (en-GB, bundled eSpeak NG in a worker, normalised, stored)",
        statistics.median(timings) * 1000,
        "ms",
        size=f"median of {len(timings)} texts, {spoken:.1f} s of speech each; cached again "
        f"{cached * 1000:.1f} ms",
    )
