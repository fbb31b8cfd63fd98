"""Decode audio of any format libsndfile reads and normalise it to what FreeSWITCH plays without work.

``normalise(source, rate=8000, max_seconds=600)`` takes a file (its bytes, or its path) in any format
libsndfile reads (MP3, WAV of any PCM rate, 8/16/24/32-bit or float, mono or stereo, FLAC, OGG ...) and
returns a mono 16-bit PCM WAV at ``rate``. The format is found from the bytes alone; a name or
Content-Type is never trusted. Channels are averaged; the rate is changed by soxr's band-limited
resampler, so content above the new Nyquist frequency is filtered out instead of folding back as
aliases. Decoding streams block by block, so a long file costs bounded memory.

What a file may cost is bounded before and while it is decoded (``Limits``): the header is read first
and a file with too many channels, too high a rate, or more samples (frames x channels) than the
budget is refused without decoding a block; a file whose header does not say its length (or lies) is
stopped as soon as what was decoded passes the length or the sample budget. A 3 MB FLAC can declare
hours of 8-channel audio at 655 kHz; decoding it would cost minutes of CPU.

Errors are ``AudioError`` values whose text completes a sentence about the file ("is not audio (could
not decode it)"); ``TooLong`` says the file passed ``max_seconds``.

This module runs in the media worker processes (daemon.media.worker), never in the daemon's event loop.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Literal

import numpy as np
import soundfile as sf
import soxr

BLOCK_FRAMES = 1 << 16
# MP3 encoders pad a few milliseconds; a file made exactly as long as the limit must still pass.
SLACK_SECONDS = 0.5
# Compressed formats declare a length from their headers; reading far less than it means a cut-off file.
TRUNCATED_RATIO = 0.8
# libsndfile's frame count when the header does not say (a FLAC streamed with total_samples = 0).
UNKNOWN_LENGTH = (1 << 63) - 1
NOT_AUDIO = "is not audio (could not decode it)"


class AudioError(ValueError):
    """The bytes are not usable audio; ``str()`` is the reason, for the user."""


class TooLong(AudioError):
    """The audio is longer than the limit it was decoded under."""

    def __init__(self, limit: float) -> None:
        super().__init__(f"is longer than {limit:g} seconds")
        self.limit = limit


@dataclass(frozen=True)
class Limits:
    """What one file may cost to decode: checked on the header, and again while decoding."""

    max_channels: int = 8
    max_sample_rate: int = 192_000
    max_samples: int = 60_000_000  # frames x channels; about ten minutes of 48 kHz stereo


@dataclass(frozen=True)
class Normalised:
    """A normalised file: the WAV in pieces (its header, then the PCM block by block: joined, a long file
    would be held twice) and how long it plays."""

    pieces: list[bytes]
    seconds: float

    @property
    def size(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    @property
    def wav(self) -> bytes:
        """The WAV's bytes, joined."""
        return b"".join(self.pieces)


def _check_riff_length(fh: BinaryIO, size: int) -> None:
    """Refuse a WAV whose data chunk says it is longer than the bytes that arrived.

    libsndfile quietly plays the part that arrived; a caller would hear a prompt cut off mid-word.
    """
    fh.seek(0)
    head = fh.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
        return
    order: Literal["little", "big"] = "little" if head[:4] == b"RIFF" else "big"
    pos = 12
    while pos + 8 <= size:
        fh.seek(pos)
        chunk = fh.read(8)
        chunk_id, length = chunk[:4], int.from_bytes(chunk[4:8], order)
        if chunk_id == b"data":
            # Writers that stream (ffmpeg to a pipe) leave the size at 0 or all ones.
            if length not in (0, 0xFFFFFFFF) and pos + 8 + length > size:
                raise AudioError("is truncated (the file ends before its audio data does)")
            return
        pos += 8 + length + (length & 1)


def check_header(in_rate: int, channels: int, declared: int, *, max_seconds: float, limits: Limits) -> None:
    """Refuse, from the header alone, a file that would cost more than ``limits`` to decode."""
    if in_rate <= 0 or channels <= 0:
        raise AudioError(NOT_AUDIO)
    if channels > limits.max_channels:
        raise AudioError(f"has {channels} channels; at most {limits.max_channels} are allowed")
    if in_rate > limits.max_sample_rate:
        raise AudioError(f"has a sample rate of {in_rate} Hz; at most {limits.max_sample_rate} Hz is allowed")
    if declared == UNKNOWN_LENGTH:
        return  # counted while decoding
    if declared > (max_seconds + SLACK_SECONDS) * in_rate:
        raise TooLong(max_seconds)
    if declared * channels > limits.max_samples:
        raise AudioError(f"is too costly to decode: {declared * channels} samples (frames x channels); "
                         f"at most {limits.max_samples} are allowed")


def normalise(source: bytes | str | os.PathLike[str], *, rate: int, max_seconds: float,
              limits: Limits | None = None) -> Normalised:
    """Decode ``source`` (bytes, or a file's path) into mono 16-bit PCM WAV at ``rate`` Hz, or raise AudioError."""
    limits = limits or Limits()
    if isinstance(source, bytes):
        fh: BinaryIO = io.BytesIO(source)
        size = len(source)
    else:
        fh = open(source, "rb")  # noqa: SIM115 - closed below
        size = os.fstat(fh.fileno()).st_size
    with fh:
        if size == 0:
            raise AudioError("is empty (the file has no bytes)")
        _check_riff_length(fh, size)
        fh.seek(0)
        return _decode(fh, rate=rate, max_seconds=max_seconds, limits=limits)


def _decode(fh: BinaryIO, *, rate: int, max_seconds: float, limits: Limits) -> Normalised:
    try:
        source = sf.SoundFile(fh)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError):
        raise AudioError(NOT_AUDIO) from None
    # Each block is kept as 16-bit PCM as soon as it is resampled, and the WAV stays in those pieces: the
    # whole file held as float32 and converted at the end took about 17 bytes a sample at its peak (600 s
    # at 48 kHz: 490 MB), against 2 now. The header is made here, not by libsndfile writing to a BytesIO:
    # that goes through a callback whose errors (a MemoryError) libsndfile cannot see.
    pieces: list[bytes] = []
    read = 0
    with source:
        in_rate, channels, declared = source.samplerate, source.channels, source.frames
        check_header(in_rate, channels, declared, max_seconds=max_seconds, limits=limits)
        limit_frames = min((max_seconds + SLACK_SECONDS) * in_rate, limits.max_samples // channels)
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
                    if read > (max_seconds + SLACK_SECONDS) * in_rate:
                        raise TooLong(max_seconds)
                    raise AudioError(f"is too costly to decode: more than {limits.max_samples} samples "
                                     "(frames x channels)")
                mono = np.ascontiguousarray(block.mean(axis=1, dtype=np.float32))
                pieces.append(_pcm16(resampler.resample_chunk(mono) if resampler else mono))
        except (sf.SoundFileError, RuntimeError):
            raise AudioError(NOT_AUDIO) from None
        if resampler is not None:
            pieces.append(_pcm16(resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)))
    if read == 0:
        raise AudioError("is empty (there is no audio in it)")
    if declared != UNKNOWN_LENGTH and declared > 0 and read < declared * TRUNCATED_RATIO:
        raise AudioError("is truncated (the file ends before its audio does)")
    size = sum(len(piece) for piece in pieces)
    if size == 0:  # a frame or two at a higher rate resamples to nothing: a WAV header alone
        raise AudioError("is empty (there is no audio in it)")
    return Normalised([_wav_header(size, rate), *pieces], size / 2 / rate)


def _pcm16(samples: np.ndarray) -> bytes:
    """Float samples as 16-bit little-endian PCM."""
    # soundfile reads int16 as value / 32768; scaling back by 32768 keeps 16-bit input bit-exact.
    samples = np.nan_to_num(samples, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint(samples * 32768.0), -32768, 32767).astype("<i2").tobytes()


def _wav_header(data_bytes: int, rate: int) -> bytes:
    """The 44-byte header of a mono 16-bit PCM WAV, as libsndfile writes it."""
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


def pcm16_wav(samples: bytes, rate: int) -> bytes:
    """Mono 16-bit little-endian PCM ``samples`` at ``rate`` Hz as WAV bytes."""
    return _wav_header(len(samples), rate) + samples
