"""Offline speech: eSpeak NG renders a message, after the text is cleaned of anything it would obey.

Two engines, chosen by the ``tts_engine`` setting:

* ``bundled`` (the default): libespeak-ng and its voice data from the ``espeakng-loader`` wheel, a Python
  dependency, so speech needs no system package. The library is called through ctypes in synchronous
  mode: ``espeak_Synth`` returns once the whole message went through the callback. It keeps global
  state and is not thread-safe, and the call blocks, so it only ever runs in a media worker process
  (daemon.media.worker), one message at a time, never in the daemon's event loop.
* ``espeak-ng``: the ``espeak-ng`` command of the system (Debian's package), one process per message,
  text on stdin, no shell.

Neither reads SSML (``espeakSSML`` / ``-m`` are never given). The library is also called without
``espeakPHONEMES``, so ``[[...]]`` is not taken as phoneme codes; the command does take them, and acts
on control characters. ``clean_text`` removes those for both, strips tag-shaped markup (``<speak>``,
``<break time="9s"/>``) and leaves plain words, with long runs of dotted letters cut into short ones
(they crash the library).

Voice names: the library looks a name up as a voice file ("en-us", "fr", "gmw/en", "fr+f3"), then as a
language ("en-gb", "fr-fr"), as the espeak-ng command does; the voice it settled on is reported, and a
name that matches nothing is an error, never a silent fall back to the previous voice.
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

COMMAND = "espeak-ng"
# eSpeak NG voice names: "en-gb", "es-419", "gmw/en", "mb/mb-de1", "en+f3".
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+/-]{0,63}")
_TAG = re.compile(r"<[!?/]?[A-Za-z][^<>]{0,500}>|<!--.*?-->", re.DOTALL)
_MARKUP_CHARS = re.compile(r"[\[\]<>{}\\|]+")
_SPACES = re.compile(r"\s+")
# eSpeak NG joins dotted single letters ("U.S.A.", "J. R. R.") into one word in a fixed stack buffer, and
# 50 to 200 of them in a row overflow it (the process aborts or corrupts memory). Only a clause break ends
# such a word, so every eighth letter of a run gets a comma instead of its dot.
_DOTTED_LETTERS = re.compile(r"((?:[^\W\d_]\.\s*){7}[^\W\d_])\.(?=\s*[^\W\d_]\.)")

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS = 2
INITIALIZE_DONT_EXIT = 0x8000
CHARS_UTF8 = 1
ENDPAUSE = 0x1000
POS_CHARACTER = 1
EE_OK = 0
EE_NOT_FOUND = 2
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SpeechError(ValueError):
    """The message cannot be spoken; ``str()`` is the reason, for the user."""


class SpeechSetupError(SpeechError):
    """The server's speech engine or a configured voice failed, whatever the message: the operator's
    settings (tts_engine, tts_voices) to mend, not the client's request."""


def clean_text(text: str) -> str:
    """``text`` as plain words: control and format characters, tags and bracket markup become spaces."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = _TAG.sub(" ", text)
    text = _MARKUP_CHARS.sub(" ", text)
    text = _DOTTED_LETTERS.sub(r"\1, ", text)
    return _SPACES.sub(" ", text).strip()


@dataclass(frozen=True)
class Speech:
    """Rendered speech: mono 16-bit little-endian PCM at ``rate`` Hz, and the voice that spoke it."""

    pcm: bytes
    rate: int
    voice: str


def check_voice(voice: str) -> None:
    if not _VOICE.fullmatch(voice):
        raise SpeechSetupError(f"could not be spoken: {voice!r} is not a voice name")


class _Voice(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


class BundledEngine:
    """libespeak-ng from the espeakng-loader wheel, through ctypes. One per process; not thread-safe."""

    name = "bundled"

    def __init__(self, max_samples: int) -> None:
        try:
            import espeakng_loader

            lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except (ImportError, OSError) as exc:
            raise SpeechSetupError(f"could not be spoken: the bundled speech engine did not load ({exc})") from None
        self._max_samples = max_samples
        self._lib = lib
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_GetCurrentVoice.argtypes = []
        lib.espeak_GetCurrentVoice.restype = ctypes.POINTER(_Voice)
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_Synth.restype = ctypes.c_int
        # The path is the folder that holds espeak-ng-data.
        home = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, home, INITIALIZE_DONT_EXIT)
        if self.rate <= 0:
            raise SpeechSetupError("could not be spoken: the bundled speech engine did not start")
        self._pieces: list[bytes] = []
        self._samples = 0
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: ctypes._Pointer[ctypes.c_short] | None, count: int, _events: int | None) -> int:
        if wav and count > 0:
            self._pieces.append(ctypes.string_at(wav, count * 2))
            self._samples += count
        return 1 if self._samples > self._max_samples else 0  # 1 stops the synthesis

    def _select(self, voice: str) -> str:
        """Make ``voice`` current (by voice file name, else by language); the identifier it settled on."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != EE_OK:
            wanted = _Voice(languages=voice.encode())
            if "+" in voice or self._lib.espeak_SetVoiceByProperties(ctypes.byref(wanted)) != EE_OK:
                raise SpeechSetupError(f"could not be spoken with voice {voice}: no such voice in the bundled "
                                  "speech engine")
        current = self._lib.espeak_GetCurrentVoice()
        identifier = current.contents.identifier if current else None
        return identifier.decode("utf-8", "replace") if identifier else voice

    def speak(self, text: str, voice: str) -> Speech:
        check_voice(voice)
        chosen = self._select(voice)
        self._pieces, self._samples = [], 0
        data = text.encode("utf-8")
        status = self._lib.espeak_Synth(data, len(data) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8 | ENDPAUSE, None, None)
        if status != EE_OK:
            raise SpeechSetupError(f"could not be spoken with voice {voice}: the speech engine failed ({status})")
        if self._samples > self._max_samples:
            raise SpeechError("could not be spoken: the speech is too long")
        return Speech(b"".join(self._pieces), self.rate, chosen)


class CommandEngine:
    """The system's ``espeak-ng`` command (Debian's package), one process per message."""

    name = "espeak-ng"

    def __init__(self, command: str = COMMAND, *, timeout: float = 30.0) -> None:
        self.command = command
        self.timeout = timeout

    def speak(self, text: str, voice: str) -> Speech:
        check_voice(voice)
        with tempfile.TemporaryDirectory(prefix="callbridge-tts-") as folder:
            out = os.path.join(folder, "speech.wav")
            argv = [self.command, "-v", voice, "-b", "1", "--stdin", "-w", out]
            try:
                done = subprocess.run(argv, input=text.encode("utf-8"), capture_output=True,
                                      timeout=self.timeout, check=False)
            except FileNotFoundError:
                raise SpeechSetupError(f"could not be spoken: the speech engine {self.command} is not installed"
                                  ) from None
            except subprocess.TimeoutExpired:
                raise SpeechSetupError(f"could not be spoken: the speech engine took longer than "
                                  f"{self.timeout:g} seconds") from None
            if done.returncode != 0 or not os.path.exists(out):
                detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
                why = detail[-1] if detail else f"exit status {done.returncode}"
                raise SpeechSetupError(f"could not be spoken with voice {voice}: {why}")
            import soundfile as sf

            samples, rate = sf.read(out, dtype="int16")
        if samples.ndim > 1:
            samples = samples.mean(axis=1).astype("int16")
        return Speech(samples.astype("<i2").tobytes(), int(rate), voice)
