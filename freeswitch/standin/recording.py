"""Synthetic recordings: render what a leg heard and what its far end sent into 8 kHz audio.

The stand-in carries no real media, so a recording is rebuilt from the leg's timelines: played
files are read from disk, tones are synthesised from their tone_stream spec, a bridged leg
contributes what its own far end sent. Mono mixes both directions; stereo puts the far end
(read) left and what was played to the leg (write) right, as FreeSWITCH's RECORD_STEREO does.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from .media import fetch

if TYPE_CHECKING:
    from .channel import Channel, Recording, Segment

RATE = 8000
LEVEL = 0.25
_TONE = re.compile(r"%\(([^)]*)\)")


@lru_cache(maxsize=64)
def _load(path: str) -> np.ndarray | None:
    """A file as mono float32 at 8 kHz (linear resampling is good enough for a stand-in)."""
    if path.startswith(("http://", "https://", "http_cache://")):
        local = fetch(path.removeprefix("http_cache://"))
        if local is None:
            return None
        path = local
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, sf.LibsndfileError):
        return None
    mono = data.mean(axis=1)
    if rate != RATE and len(mono):
        n = int(round(len(mono) * RATE / rate))
        mono = np.interp(np.linspace(0, len(mono) - 1, n), np.arange(len(mono)), mono).astype(np.float32)
    return mono


def _tone(spec: str, start: int, count: int) -> np.ndarray:
    """count samples of a tone spec (first %(on,off,freqs) group, repeating), from sample start."""
    m = _TONE.search(spec)
    if not m:
        return np.zeros(count, dtype=np.float32)
    parts = [p for p in m.group(1).split(",") if p.strip()]
    try:
        on, off = float(parts[0]), float(parts[1])
        freqs = [float(f) for f in parts[2:]] or [0.0]
    except (ValueError, IndexError):
        return np.zeros(count, dtype=np.float32)
    t = (np.arange(count) + start) / RATE
    wave = np.zeros(count, dtype=np.float64)
    for f in freqs:
        wave += np.sin(2 * np.pi * f * t)
    wave /= len(freqs)
    period = (on + off) / 1000.0
    if off > 0 and period > 0:
        wave = np.where((t % period) < on / 1000.0, wave, 0.0)
    return (LEVEL * wave).astype(np.float32)


def _source(ch: Channel, seg: Segment, abs_start: float, count: int, offset: int) -> np.ndarray:
    """count samples of one segment's sound, offset samples after the segment began."""
    kind, src = seg.kind, seg.source
    if kind in ("file", "ringback") and src and not src.startswith(("tone_stream://", "%(")):
        audio = _load(src)
        if audio is None or not len(audio):
            return np.zeros(count, dtype=np.float32)
        if kind == "ringback":  # ringback files loop
            idx = (np.arange(count) + offset) % len(audio)
            return audio[idx] * 1.0
        out = np.zeros(count, dtype=np.float32)
        piece = audio[offset: offset + count]
        out[: len(piece)] = piece
        return out
    if kind in ("tone", "ringback"):
        return _tone(src, offset, count)
    if kind in ("bridge", "early_media"):
        other = ch.switch.all_channels.get(src)
        if other is not None:
            return track(other, "sent", abs_start, count)
    return np.zeros(count, dtype=np.float32)


def track(ch: Channel, which: str, abs_start: float, count: int) -> np.ndarray:
    """count samples from absolute plan time abs_start of the leg's "heard" or "sent" timeline."""
    out = np.zeros(count, dtype=np.float32)
    origin = ch.created_at / ch.switch.time_scale
    abs_end = abs_start + count / RATE
    for seg in ch.heard if which == "heard" else ch.sent:
        s0 = origin + seg.start
        s1 = origin + (seg.end if seg.end is not None else abs_end - origin)
        lo, hi = max(s0, abs_start), min(s1, abs_end)
        if hi <= lo:
            continue
        i0 = int((lo - abs_start) * RATE)
        i1 = min(count, int((hi - abs_start) * RATE))
        if i1 <= i0:
            continue
        out[i0:i1] = _source(ch, seg, lo, i1 - i0, int((lo - s0) * RATE))
    return out


def render(ch: Channel, rec: Recording) -> np.ndarray:
    """The recording's samples as int16: mono (mixed) or stereo (far end left, played right)."""
    scale = ch.switch.time_scale
    start = rec.started_at / scale
    count = max(0, int(round(rec.plan_seconds * RATE)))
    silent = np.zeros(count, dtype=np.float32)
    read = track(ch, "sent", start, count) if rec.read else silent
    write = track(ch, "heard", start, count) if rec.write else silent
    data = np.stack([read, write], axis=1) if rec.stereo else read + write
    return (np.clip(data, -1.0, 1.0) * 32767).astype(np.int16)
