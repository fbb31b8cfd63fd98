"""Decode audio of any format libsndfile reads and normalise it to what FreeSWITCH plays without work.

``normalise(data, rate=8000, max_seconds=600)`` takes the bytes of a file (MP3, WAV of any PCM rate,
8/16/24/32-bit or float, mono or stereo, FLAC, OGG ...) and returns a mono 16-bit PCM WAV at ``rate``.
The format is found from the bytes alone; a name or Content-Type is never trusted. Channels are
averaged; the rate is changed by soxr's band-limited resampler, so content above the new Nyquist
frequency is filtered out instead of folding back as aliases. Decoding streams block by block, so a
long file costs bounded memory and is refused as soon as it passes the length limit.

Errors are ``AudioError`` values whose text completes a sentence about the file ("is not audio (could
not decode it)"); ``TooLong`` says the file passed ``max_seconds``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import soundfile as sf
import soxr

BLOCK_FRAMES = 1 << 16
# MP3 encoders pad a few milliseconds; a file made exactly as long as the limit must still pass.
SLACK_SECONDS = 0.5
# Compressed formats declare a length from their headers; reading far less than it means a cut-off file.
TRUNCATED_RATIO = 0.8
NOT_AUDIO = "is not audio (could not decode it)"


class AudioError(ValueError):
    """The bytes are not usable audio; ``str()`` is the reason, for the user."""


class TooLong(AudioError):
    """The audio is longer than the limit it was decoded under."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"is longer than {limit:g} seconds")
        self.limit = limit


@dataclass(frozen=True)
class Normalised:
    """A normalised file: the WAV bytes and how long it plays."""

    wav: bytes
    seconds: float


def _check_riff_length(data: bytes) -> None:
    """Refuse a WAV whose data chunk says it is longer than the bytes that arrived.

    libsndfile quietly plays the part that arrived; a caller would hear a prompt cut off mid-word.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    order: Literal["little", "big"] = "little" if data[:4] == b"RIFF" else "big"
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos:pos + 4]
        size = int.from_bytes(data[pos + 4:pos + 8], order)
        if chunk_id == b"data":
            # Writers that stream (ffmpeg to a pipe) leave the size at 0 or all ones.
            if size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data):
                raise AudioError("is truncated (the file ends before its audio data does)")
            return
        pos += 8 + size + (size & 1)


def normalise(data: bytes, *, rate: int, max_seconds: float) -> Normalised:
    """Decode ``data`` and return it as mono 16-bit PCM WAV at ``rate`` Hz, or raise AudioError."""
    if not data:
        raise AudioError("is empty (the file has no bytes)")
    _check_riff_length(data)
    try:
        source = sf.SoundFile(io.BytesIO(data))
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError):
        raise AudioError(NOT_AUDIO) from None
    limit_frames: float
    pieces: list[np.ndarray] = []
    read = 0
    with source:
        in_rate, channels, declared = source.samplerate, source.channels, source.frames
        if in_rate <= 0 or channels <= 0:
            raise AudioError(NOT_AUDIO)
        limit_frames = (max_seconds + SLACK_SECONDS) * in_rate
        if declared > limit_frames:
            raise TooLong(max_seconds)
        resampler = None
        if in_rate != rate:
            resampler = soxr.ResampleStream(in_rate, rate, 1, dtype="float32", quality="HQ")
        try:
            while True:
                # read() rather than blocks(): blocks() pads a short read to the declared length.
                block = source.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                if not len(block):
                    break
                read += len(block)
                if read > limit_frames:
                    raise TooLong(max_seconds)
                mono = np.ascontiguousarray(block.mean(axis=1, dtype=np.float32))
                pieces.append(resampler.resample_chunk(mono) if resampler else mono)
        except (sf.SoundFileError, RuntimeError):
            raise AudioError(NOT_AUDIO) from None
        if resampler is not None:
            pieces.append(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    if read == 0:
        raise AudioError("is empty (there is no audio in it)")
    if declared > 0 and read < declared * TRUNCATED_RATIO:
        raise AudioError("is truncated (the file ends before its audio does)")
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    # soundfile reads int16 as value / 32768; scaling back by 32768 keeps 16-bit input bit-exact.
    samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    pcm = np.clip(np.rint(samples * 32768.0), -32768, 32767).astype(np.int16)
    out = io.BytesIO()
    sf.write(out, pcm, rate, format="WAV", subtype="PCM_16")
    return Normalised(out.getvalue(), len(pcm) / rate)
