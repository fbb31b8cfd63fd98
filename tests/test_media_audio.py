"""daemon.media.audio: decoding any format from bytes, normalising to 8 kHz mono 16-bit, resampling quality."""

from __future__ import annotations

import io
import resource
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.media.audio import NOT_AUDIO, AudioError, Limits, TooLong, normalise
from tests.flac_bomb import silent_flac


def tone(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.column_stack([x] * channels) if channels > 1 else x


def encode(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def decode(wav: bytes) -> tuple[np.ndarray, sf._SoundFileInfo]:
    info = sf.info(io.BytesIO(wav))
    data, _ = sf.read(io.BytesIO(wav), dtype="float64")
    return data, info


def peak_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


@pytest.mark.parametrize(("fmt", "subtype", "rate", "channels"), [
    ("WAV", "PCM_16", 8000, 1),
    ("WAV", "PCM_16", 11025, 1),
    ("WAV", "PCM_16", 44100, 1),
    ("WAV", "PCM_16", 44100, 2),
    ("WAV", "PCM_U8", 11025, 1),
    ("WAV", "PCM_24", 48000, 2),
    ("WAV", "FLOAT", 22050, 1),
    ("FLAC", "PCM_16", 16000, 1),
    ("OGG", "VORBIS", 44100, 2),
    ("MP3", "MPEG_LAYER_III", 44100, 1),
    ("MP3", "MPEG_LAYER_III", 22050, 2),
])
def test_formats_normalise_to_8k_mono_16bit(fmt: str, subtype: str, rate: int, channels: int) -> None:
    data = encode(tone(440, rate, 1.0, channels=channels), rate, fmt, subtype)
    result = normalise(data, rate=8000, max_seconds=10)
    samples, info = decode(result.wav)
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 8000, 1)
    assert result.seconds == pytest.approx(1.0, abs=0.1)
    assert abs(peak_frequency(samples, 8000) - 440) < 5
    assert rms(samples) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_pcm16_at_target_rate_is_bit_exact() -> None:
    pcm = (tone(300, 8000) * 32767).astype(np.int16)
    result = normalise(encode(pcm, 8000), rate=8000, max_seconds=10)
    back, _ = sf.read(io.BytesIO(result.wav), dtype="int16")
    assert np.array_equal(back, pcm)
    # The WAV (its header made by hand, its PCM block by block) is byte for byte the one libsndfile writes.
    assert result.wav == encode(pcm, 8000, "WAV", "PCM_16")
    assert result.size == len(result.wav) and result.seconds == len(pcm) / 8000


def test_stereo_channels_are_averaged() -> None:
    left = tone(440, 8000)
    stereo = np.column_stack([left, np.zeros_like(left)])
    samples, _ = decode(normalise(encode(stereo, 8000), rate=8000, max_seconds=10).wav)
    assert rms(samples) == pytest.approx(rms(left) / 2, rel=0.01)


def test_passband_tone_keeps_frequency_and_level() -> None:
    source = tone(3400, 44100, 2.0)
    samples, _ = decode(normalise(encode(source, 44100, subtype="FLOAT"), rate=8000, max_seconds=10).wav)
    assert abs(peak_frequency(samples, 8000) - 3400) < 2
    assert 20 * np.log10(rms(samples) / rms(source)) > -1.0


def test_tone_above_nyquist_is_filtered_not_aliased() -> None:
    # Sample dropping would fold 5 kHz down to 3 kHz at full level; a proper filter removes it.
    source = tone(5000, 44100, 2.0)
    samples, _ = decode(normalise(encode(source, 44100, subtype="FLOAT"), rate=8000, max_seconds=10).wav)
    settled = samples[400:-400]  # away from the filter's start-up and tail
    assert 20 * np.log10(max(rms(settled), 1e-12) / rms(source)) <= -40


def test_silence_is_accepted() -> None:
    result = normalise(encode(np.zeros(8000, dtype=np.float32), 8000), rate=8000, max_seconds=10)
    samples, _ = decode(result.wav)
    assert result.seconds == pytest.approx(1.0) and not samples.any()


def test_other_target_rate() -> None:
    result = normalise(encode(tone(1000, 8000), 8000), rate=16000, max_seconds=10)
    samples, info = decode(result.wav)
    assert info.samplerate == 16000 and abs(peak_frequency(samples, 16000) - 1000) < 5


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "is empty (the file has no bytes)"),
    (encode(np.zeros(0, dtype=np.float32), 8000), "is empty (there is no audio in it)"),
    # a frame at 44.1 kHz decodes, then resamples to no sample at 8 kHz: a WAV header alone
    (encode(np.full(1, 0.5, dtype=np.float32), 44100), "is empty (there is no audio in it)"),
    (b"This is a text file that someone named message.wav\n" * 40, NOT_AUDIO),
    (b"<!doctype html><html><head><title>Not found</title></head><body>" + b"<p>nope</p>" * 500
     + b"</body></html>", NOT_AUDIO),
    (b"RIFF\x24\x00\x00\x00WAVEfmt ", NOT_AUDIO),
])
def test_refusals(data: bytes, reason: str) -> None:
    with pytest.raises(AudioError) as caught:
        normalise(data, rate=8000, max_seconds=10)
    assert str(caught.value) == reason


def test_truncated_wav_is_refused() -> None:
    whole = encode(tone(440, 8000, 2.0), 8000)
    with pytest.raises(AudioError, match="is truncated"):
        normalise(whole[: len(whole) // 2], rate=8000, max_seconds=10)


def test_truncated_mp3_is_refused() -> None:
    whole = encode(tone(440, 44100, 3.0), 44100, "MP3")
    with pytest.raises(AudioError, match="is truncated"):
        normalise(whole[: len(whole) // 3], rate=8000, max_seconds=10)


def test_too_long_is_refused_with_the_limit() -> None:
    data = encode(tone(440, 8000, 3.0), 8000)
    with pytest.raises(TooLong) as caught:
        normalise(data, rate=8000, max_seconds=2)
    assert str(caught.value) == "is longer than 2 seconds"
    assert normalise(data, rate=8000, max_seconds=3).seconds == pytest.approx(3.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_give_audio_or_an_audio_error(data: bytes) -> None:
    try:
        result = normalise(data, rate=8000, max_seconds=10)
    except AudioError:
        return
    assert sf.info(io.BytesIO(result.wav)).samplerate == 8000


# What a file may cost -------------------------------------------------------------------------------------

def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize(("data", "limits", "reason"), [
    (encode(np.zeros((800, 9), dtype=np.float32), 8000), Limits(),
     "has 9 channels; at most 8 are allowed"),
    (encode(tone(440, 384000, 0.1), 384000), Limits(),
     "has a sample rate of 384000 Hz; at most 192000 Hz is allowed"),
    (encode(tone(440, 48000, 0.5), 48000), Limits(max_sample_rate=44100),
     "has a sample rate of 48000 Hz; at most 44100 Hz is allowed"),
    (encode(tone(440, 48000, 2.0, channels=2), 48000), Limits(max_samples=100_000),
     "is too costly to decode: 192000 samples (frames x channels); at most 100000 are allowed"),
])
def test_costly_files_are_refused_from_the_header(data: bytes, limits: Limits, reason: str) -> None:
    with pytest.raises(AudioError) as caught:
        normalise(data, rate=8000, max_seconds=600, limits=limits)
    assert str(caught.value) == reason


def test_the_flac_bomb_is_refused_before_decoding() -> None:
    # 600 s of 8-channel silence at 655,350 Hz: 3.1 billion samples in 0.4 MB, ~15 s of CPU to decode.
    bomb = silent_flac(600, 655350, 8)
    with sf.SoundFile(io.BytesIO(bomb)) as check:  # it is a real FLAC, as long as it says
        assert (check.samplerate, check.channels, check.frames) == (655350, 8, 600 * 655350)
        assert not check.read(65536).any()
    start = cpu_seconds()
    with pytest.raises(AudioError, match="^has a sample rate of 655350 Hz; at most 192000 Hz is allowed$"):
        normalise(bomb, rate=8000, max_seconds=600)
    used = cpu_seconds() - start
    print(f"\nFLAC bomb ({len(bomb) / 1e6:.1f} MB, 600 s, 655350 Hz, 8 channels): refused in {used:.3f} s of CPU")
    assert used < 2.0
    # Within the rate limit, the sample budget refuses it just as early.
    with pytest.raises(AudioError, match="^is too costly to decode: 921600000 samples"):
        normalise(silent_flac(600, 192000, 8), rate=8000, max_seconds=600)


def test_a_file_within_the_limits_passes() -> None:
    data = encode(tone(440, 192000, 1.0, channels=2), 192000, "FLAC", "PCM_24")
    result = normalise(data, rate=8000, max_seconds=600, limits=Limits(max_samples=384000))
    samples, info = decode(result.wav)
    assert info.samplerate == 8000 and abs(peak_frequency(samples, 8000) - 440) < 5


def test_a_file_from_a_path_is_the_same_as_from_bytes(tmp_path: Path) -> None:
    data = encode(tone(440, 44100, 1.0, channels=2), 44100)
    (tmp_path / "in.wav").write_bytes(data)
    assert normalise(tmp_path / "in.wav", rate=8000, max_seconds=10) == normalise(data, rate=8000, max_seconds=10)
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="is truncated"):
        normalise(str(tmp_path / "cut.wav"), rate=8000, max_seconds=10)
