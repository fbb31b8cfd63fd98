"""MediaLibrary.speak with eSpeak NG: every language, caching, and text that tries to be markup.

Needs the ``espeak-ng`` package (Debian/Ubuntu: ``apt-get install espeak-ng``; CI installs it).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given
from hypothesis import strategies as st

from daemon.config import LANGUAGES, Settings
from daemon.media.library import MediaError, MediaLibrary
from daemon.media.tts import Speaker, clean_text

SENTENCE = "Hello, your call is being connected now. Please hold the line."


@pytest.fixture(autouse=True, scope="module")
def _engine() -> None:
    assert shutil.which("espeak-ng"), "espeak-ng is not installed: apt-get install espeak-ng"


class CountingSpeaker(Speaker):
    """The real engine, counting how many times it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.renders: list[tuple[str, str]] = []

    def render(self, text: str, voice: str) -> bytes:
        self.renders.append((text, voice))
        return super().render(text, voice)


def make_library(tmp_path: Path, speaker: Speaker | None = None, **overrides: Any) -> MediaLibrary:
    return MediaLibrary(Settings(state_dir=str(tmp_path), **overrides), speaker=speaker)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lib = make_library(tmp_path_factory.mktemp("tts"))
    return {lang: lib.speak(SENTENCE, lang) for lang in LANGUAGES}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_language_speaks_a_sentence(spoken: dict[str, Any], lang: str) -> None:
    media = spoken[lang]
    samples, rate = sf.read(media.path, dtype="float64")
    info = sf.info(media.path)
    assert (info.subtype, info.channels, rate) == ("PCM_16", 1, 8000)
    assert 2.0 < media.seconds < 10.0, media.seconds  # about 11 words at 175 words a minute
    assert np.sqrt(np.mean(samples ** 2)) > 0.01  # not silence
    assert np.mean(np.abs(samples) > 0.02) > 0.2  # sound through a good part of it, not one click


def test_languages_sound_different(spoken: dict[str, Any]) -> None:
    assert len({media.sha256 for media in spoken.values()}) == len(LANGUAGES)


def test_repeat_request_is_a_cache_hit(tmp_path: Path) -> None:
    speaker = CountingSpeaker()
    lib = make_library(tmp_path, speaker)
    first = lib.speak("Your appointment is tomorrow at nine.", "en-GB")
    assert lib.speak("Your appointment is tomorrow at nine.", "en-GB") == first
    assert make_library(tmp_path, speaker).speak("Your appointment is tomorrow at nine.", "en-GB") == first
    assert len(speaker.renders) == 1  # the cache survives a new library on the same folder
    lib.speak("Your appointment is tomorrow at nine.", "en-US")
    assert len(speaker.renders) == 2


def test_changing_the_voice_renders_again(tmp_path: Path) -> None:
    speaker = CountingSpeaker()
    one = make_library(tmp_path, speaker).speak("Bonjour et bienvenue.", "fr-FR")
    voices = dict(Settings().tts_voices, **{"fr-FR": "fr+f3"})
    other = make_library(tmp_path, speaker, tts_voices=voices).speak("Bonjour et bienvenue.", "fr-FR")
    assert speaker.renders == [("Bonjour et bienvenue.", "fr-fr"), ("Bonjour et bienvenue.", "fr+f3")]
    assert one.sha256 != other.sha256


@pytest.mark.parametrize(("raw", "clean"), [
    ("<speak>Hello <break time='20s'/> there</speak>", "Hello there"),
    ('<?xml version="1.0"?><speak version="1.1"><prosody rate="x-slow">Hi</prosody></speak>', "Hi"),
    ("say [[h@'loU]] now", "say h@'loU now"),
    ("Hello\x00\x07\x1b[31m world\u200b!\r\n", "Hello 31m world !"),
    ("a < b and c > d", "a b and c d"),
    ("<!-- hidden --> visible", "visible"),
])
def test_markup_and_control_characters_are_neutralised(raw: str, clean: str) -> None:
    assert clean_text(raw) == clean


@given(st.text(max_size=300))
def test_clean_text_leaves_nothing_the_engine_would_interpret(raw: str) -> None:
    clean = clean_text(raw)
    assert not any(ch in clean for ch in "<>[]{}\\|")
    assert all(ch == " " or ch.isprintable() for ch in clean)
    assert clean == clean.strip() and "  " not in clean


def test_markup_is_spoken_as_the_plain_words(tmp_path: Path) -> None:
    speaker = CountingSpeaker()
    lib = make_library(tmp_path, speaker)
    tagged = lib.speak('<speak><voice gender="female"><say-as interpret-as="characters">Hello</say-as>'
                       "</voice></speak>", "en-US")
    assert speaker.renders == [("Hello", "en-us")]
    assert tagged == lib.speak("Hello", "en-US")
    lib.speak("[[h@'loU]]", "en-US")
    assert speaker.renders[-1] == ("h@'loU", "en-us")
    # Why it matters: given the raw text, the engine obeys the phoneme codes and says something else.
    assert Speaker().render("[[h@'loU]]", "en-us") != Speaker().render("h@'loU", "en-us")


def test_refusals(tmp_path: Path) -> None:
    lib = make_library(tmp_path, msg_max_chars=20)
    with pytest.raises(MediaError, match="^is longer than 20 characters$"):
        lib.speak("x" * 21, "en-GB")
    with pytest.raises(MediaError, match="^has nothing to say"):
        lib.speak("<speak/>\x00 [[ ]]", "en-GB")
    with pytest.raises(MediaError, match="^is not a supported language"):
        lib.speak("Hello", "en-AU")


def test_engine_failures_are_reasons(tmp_path: Path) -> None:
    missing = make_library(tmp_path, Speaker(engine=str(tmp_path / "no-espeak")))
    with pytest.raises(MediaError, match="^could not be spoken: the speech engine .* is not installed$"):
        missing.speak("Hello", "en-GB")
    voices = dict(Settings().tts_voices, **{"de-DE": "xx-nowhere"})
    with pytest.raises(MediaError, match="^could not be spoken with voice xx-nowhere"):
        make_library(tmp_path, tts_voices=voices).speak("Hallo", "de-DE")


def test_long_message_renders_quickly_enough(tmp_path: Path) -> None:
    text = ("This is a reminder from your clinic. Your appointment is on Tuesday at half past nine. "
            "Please arrive ten minutes early and bring your card. Press nothing, just listen. Goodbye!")
    media = make_library(tmp_path, msg_max_chars=500).speak(text[:200], "en-GB")
    assert 8 < media.seconds < 25
    assert sf.info(io.BytesIO(Path(media.path).read_bytes())).samplerate == 8000
