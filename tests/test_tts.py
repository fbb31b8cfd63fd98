"""MediaLibrary.speak: every language, caching, and text that tries to be markup.

Speech comes from the ``espeakng-loader`` wheel (libespeak-ng and its voices, a Python dependency), so
these tests need no system package. The tests of the optional ``espeak-ng`` command engine run only
where that command is installed.
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

from daemon.config import DEFAULT_VOICES, LANGUAGES, ConfigError, Settings
from daemon.media.library import MediaError, MediaLibrary, SpeechUnavailable
from daemon.media.pool import WorkerPool
from daemon.media.tts import CommandEngine, SpeechError, clean_text

SENTENCE = "Hello, your call is being connected now. Please hold the line."
# The same message in each language, so that each voice reads words of its own language.
SENTENCES = {
    "en-GB": SENTENCE,
    "en-US": SENTENCE,
    "fr-FR": "Bonjour, votre appel est en cours de connexion. Veuillez patienter, s'il vous plaît.",
    "de-DE": "Hallo, Ihr Anruf wird jetzt verbunden. Bitte bleiben Sie in der Leitung.",
    "it-IT": "Buongiorno, la sua chiamata sta per essere collegata. Resti in linea, per favore.",
    "pt-BR": "Olá, sua chamada está sendo conectada agora. Por favor, aguarde na linha.",
    "ru-RU": "Здравствуйте, ваш звонок сейчас будет соединён. Пожалуйста, оставайтесь на линии.",
    "es-ES": "Hola, su llamada se está conectando ahora. Por favor, no cuelgue.",
    "es-US": "Hola, su llamada se está conectando ahora. Por favor, no cuelgue.",
}
# The eSpeak NG voice (its data file) each msg_lang must end up with, whatever name the settings use.
EXPECTED_VOICE = {
    "en-GB": "gmw/en", "en-US": "gmw/en-US", "fr-FR": "roa/fr", "de-DE": "gmw/de", "it-IT": "roa/it",
    "pt-BR": "roa/pt-BR", "ru-RU": "zle/ru", "es-ES": "roa/es", "es-US": "roa/es-419",
}


class CountingPool(WorkerPool):
    """The real worker pool, recording the speech jobs it runs."""

    def __init__(self) -> None:
        super().__init__(1, queue_timeout=60.0, cpu_seconds=10, memory_mb=Settings.media_memory_mb)
        self.renders: list[tuple[str, str]] = []

    def run(self, job: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        if job["op"] == "speak":
            self.renders.append((job["text"], job["voice"]))
        return super().run(job, timeout=timeout)


POOL = CountingPool()


def make_library(tmp_path: Path, **overrides: Any) -> MediaLibrary:
    return MediaLibrary(Settings(state_dir=str(tmp_path), **overrides), pool=POOL)


def speak_job(tmp_path: Path, text: str, voice: str, engine: str = "bundled") -> dict[str, Any]:
    """A worker's answer to a speech job, built the way the library builds it."""
    (tmp_path / "out").mkdir(exist_ok=True)
    return POOL.run({"op": "speak", "text": text, "voice": voice, "engine": engine, "rate": 8000,
                     "max_seconds": 600, "limits": {}, "folder": str(tmp_path / "out"), "key": "00" * 32},
                    timeout=60.0)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    lib = make_library(tmp_path_factory.mktemp("tts"))
    return {lang: lib.speak(SENTENCES[lang], lang) for lang in LANGUAGES}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_language_speaks_a_sentence(spoken: dict[str, Any], lang: str) -> None:
    media = spoken[lang]
    samples, rate = sf.read(media.path, dtype="float64")
    info = sf.info(media.path)
    assert (info.subtype, info.channels, rate) == ("PCM_16", 1, 8000)
    assert 2.0 < media.seconds < 10.0, media.seconds  # 11 to 13 words at 175 words a minute
    assert np.sqrt(np.mean(samples ** 2)) > 0.01  # not silence
    assert np.mean(np.abs(samples) > 0.02) > 0.2  # sound through a good part of it, not one click


@pytest.mark.parametrize("lang", LANGUAGES)
def test_each_language_gets_its_own_voice(tmp_path: Path, lang: str) -> None:
    # The default names are Debian's espeak-ng 1.51 names ("en-gb", "fr-fr"); the bundled 1.52 data
    # files are named otherwise ("gmw/en", "roa/fr"), and a name it does not know must not leave the
    # previous voice speaking.
    answer = speak_job(tmp_path, SENTENCES[lang], DEFAULT_VOICES[lang])
    assert answer["ok"], answer
    assert answer["voice"] == EXPECTED_VOICE[lang]


def test_languages_sound_different(spoken: dict[str, Any]) -> None:
    assert len(set(EXPECTED_VOICE.values())) == len(LANGUAGES)
    assert len({media.name for media in spoken.values()}) == len(LANGUAGES)


def test_repeat_request_is_a_cache_hit(tmp_path: Path) -> None:
    lib = make_library(tmp_path)
    before = len(POOL.renders)
    first = lib.speak("Your appointment is tomorrow at nine.", "en-GB")
    assert lib.speak("Your appointment is tomorrow at nine.", "en-GB") == first
    assert make_library(tmp_path).speak("Your appointment is tomorrow at nine.", "en-GB") == first
    assert len(POOL.renders) - before == 1  # the cache survives a new library on the same folder
    lib.speak("Your appointment is tomorrow at nine.", "en-US")
    assert len(POOL.renders) - before == 2


def test_changing_the_voice_renders_again(tmp_path: Path) -> None:
    before = len(POOL.renders)
    one = make_library(tmp_path).speak("Bonjour et bienvenue.", "fr-FR")
    voices = dict(Settings().tts_voices, **{"fr-FR": "fr+f3"})
    other = make_library(tmp_path, tts_voices=voices).speak("Bonjour et bienvenue.", "fr-FR")
    assert POOL.renders[before:] == [("Bonjour et bienvenue.", "fr-fr"), ("Bonjour et bienvenue.", "fr+f3")]
    assert one.name != other.name


@pytest.mark.parametrize(("raw", "clean"), [
    ("<speak>Hello <break time='20s'/> there</speak>", "Hello there"),
    ('<?xml version="1.0"?><speak version="1.1"><prosody rate="x-slow">Hi</prosody></speak>', "Hi"),
    ("say [[h@'loU]] now", "say h@'loU now"),
    ("Hello\x00\x07\x1b[31m world\u200b!\r\n", "Hello 31m world !"),
    ("a < b and c > d", "a b and c d"),
    ("<!-- hidden --> visible", "visible"),
    ("U.S.A. and e.g. J. R. R. Tolkien", "U.S.A. and e.g. J. R. R. Tolkien"),
    ("a.b.c.d.e.f.g.h.i.j", "a.b.c.d.e.f.g.h, i.j"),
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
    lib = make_library(tmp_path)
    before = len(POOL.renders)
    tagged = lib.speak('<speak><voice gender="female"><say-as interpret-as="characters">Hello</say-as>'
                       "</voice></speak>", "en-US")
    assert POOL.renders[before:] == [("Hello", "en-us")]
    assert tagged == lib.speak("Hello", "en-US")
    lib.speak("[[h@'loU]]", "en-US")
    assert POOL.renders[-1] == ("h@'loU", "en-us")


def test_the_bundled_engine_does_not_obey_phoneme_codes_either(tmp_path: Path) -> None:
    # A second wall behind clean_text: the library is called without espeakPHONEMES, so "[[h@'loU]]"
    # is read out as characters instead of being pronounced "hello" (the espeak-ng command obeys it).
    hello = speak_job(tmp_path, "hello", "en-us")
    raw = speak_job(tmp_path, "[[h@'loU]]", "en-us")
    assert raw["seconds"] > 1.5 * hello["seconds"], (raw["seconds"], hello["seconds"])


def test_refusals(tmp_path: Path) -> None:
    lib = make_library(tmp_path, msg_max_chars=20)
    with pytest.raises(MediaError, match="^is longer than 20 characters$"):
        lib.speak("x" * 21, "en-GB")
    with pytest.raises(MediaError, match="^has nothing to say"):
        lib.speak("<speak/>\x00 [[ ]]", "en-GB")
    with pytest.raises(MediaError, match="^is not a supported language"):
        lib.speak("Hello", "en-AU")


def test_an_unknown_voice_is_a_reason_not_the_previous_voice(tmp_path: Path) -> None:
    make_library(tmp_path).speak("Hallo", "de-DE")  # the worker's current voice is now German
    voices = dict(Settings().tts_voices, **{"de-DE": "xx-nowhere"})
    # The server's setting, not the message: SpeechUnavailable (the API's 503), not a MediaError (400).
    with pytest.raises(SpeechUnavailable, match="^could not be spoken with voice xx-nowhere: no such voice"):
        make_library(tmp_path, tts_voices=voices).speak("Hallo zusammen", "de-DE")
    with pytest.raises(SpeechUnavailable, match="is not a voice name"):
        make_library(tmp_path, tts_voices=dict(voices, **{"de-DE": "de;rm -rf"})).speak("Hallo", "de-DE")


def test_the_voices_an_operator_set_are_spoken_once_at_start(tmp_path: Path) -> None:
    good = dict(Settings().tts_voices, **{"fr-FR": "fr+f3", "de-DE": "gmw/de"})
    make_library(tmp_path, tts_voices=good).check_voices()
    assert not [p for p in (tmp_path / "media").rglob("*") if p.is_file() and p.suffix == ".wav"]  # nothing kept
    with pytest.raises(ConfigError, match="^tts_voices: de-DE = 'xx-nowhere': could not be spoken with voice "
                                          "xx-nowhere: no such voice in the bundled speech engine$"):
        make_library(tmp_path, tts_voices=dict(good, **{"de-DE": "xx-nowhere"})).check_voices()


def test_long_message_renders(tmp_path: Path) -> None:
    text = ("This is a reminder from your clinic. Your appointment is on Tuesday at half past nine. "
            "Please arrive ten minutes early and bring your card. Press nothing, just listen. Goodbye!")
    media = make_library(tmp_path, msg_max_chars=500).speak(text[:200], "en-GB")
    assert 8 < media.seconds < 25
    assert sf.info(io.BytesIO(Path(media.path).read_bytes())).samplerate == 8000


def test_a_missing_speech_command_is_a_reason(tmp_path: Path) -> None:
    with pytest.raises(SpeechError, match="^could not be spoken: the speech engine .* is not installed$"):
        CommandEngine(str(tmp_path / "no-espeak")).speak("Hello", "en-gb")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="the optional espeak-ng command is not installed")
def test_the_system_command_engine_speaks_every_language(tmp_path: Path) -> None:
    lib = make_library(tmp_path, tts_engine="espeak-ng")
    for lang in LANGUAGES:
        media = lib.speak(SENTENCES[lang], lang)
        samples, rate = sf.read(media.path, dtype="float64")
        assert rate == 8000 and 2.0 < media.seconds < 10.0 and np.sqrt(np.mean(samples ** 2)) > 0.01
    voices = dict(Settings().tts_voices, **{"de-DE": "xx-nowhere"})
    with pytest.raises(SpeechUnavailable, match="^could not be spoken with voice xx-nowhere"):
        make_library(tmp_path, tts_engine="espeak-ng", tts_voices=voices).speak("Hallo", "de-DE")


@pytest.mark.parametrize("unit", ["a.", "A.b.", "é.", "\U0001d400."])
def test_a_long_run_of_dotted_letters_is_spoken_not_a_crash(tmp_path: Path, unit: str) -> None:
    # eSpeak NG joins "a.b.c." into one word in a fixed stack buffer: 50 to 200 such letters (well
    # within msg_max_chars) smashed its stack and killed the worker, and the request got a 400.
    text = unit * (480 // len(unit))
    media = make_library(tmp_path).speak(text, "en-US")
    assert media.seconds > 5
