"""Offline speech: eSpeak NG renders a message to WAV, after the text is cleaned of anything it would obey.

The engine is Debian's ``espeak-ng`` package, installed with the system (nothing is downloaded at run
time). One process per message: text on stdin, the WAV to a temporary file, no shell. eSpeak NG reads
SSML only with ``-m``, which is never passed; it does read ``[[...]]`` as phoneme codes and acts on
control characters, so ``clean_text`` removes those, strips tag-shaped markup (``<speak>``, ``<break
time="9s"/>``) and leaves plain words. The caller turns the WAV into the stored format (daemon.media.audio).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import unicodedata

ENGINE = "espeak-ng"
# eSpeak NG voice names: "en-gb", "es-419", "mb/mb-de1", "en+f3".
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+/-]{0,63}")
_TAG = re.compile(r"<[!?/]?[A-Za-z][^<>]{0,500}>|<!--.*?-->", re.DOTALL)
_MARKUP_CHARS = re.compile(r"[\[\]<>{}\\|]+")
_SPACES = re.compile(r"\s+")


class SpeechError(ValueError):
    """The message cannot be spoken; ``str()`` is the reason, for the user."""


def clean_text(text: str) -> str:
    """``text`` as plain words: control and format characters, tags and bracket markup become spaces."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = _TAG.sub(" ", text)
    text = _MARKUP_CHARS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


class Speaker:
    """Renders text with eSpeak NG; ``render`` returns the WAV bytes the engine wrote."""

    def __init__(self, engine: str = ENGINE, *, timeout: float = 30.0) -> None:
        self.engine = engine
        self.timeout = timeout

    def render(self, text: str, voice: str) -> bytes:
        """WAV bytes of ``text`` (already cleaned) spoken by ``voice``; SpeechError with a reason otherwise."""
        if not _VOICE.fullmatch(voice):
            raise SpeechError(f"could not be spoken: {voice!r} is not a voice name")
        with tempfile.TemporaryDirectory(prefix="callbridge-tts-") as folder:
            out = os.path.join(folder, "speech.wav")
            command = [self.engine, "-v", voice, "-b", "1", "--stdin", "-w", out]
            try:
                done = subprocess.run(command, input=text.encode("utf-8"), capture_output=True,
                                      timeout=self.timeout, check=False)
            except FileNotFoundError:
                raise SpeechError(f"could not be spoken: the speech engine {self.engine} is not installed"
                                  ) from None
            except subprocess.TimeoutExpired:
                raise SpeechError(f"could not be spoken: the speech engine took longer than "
                                  f"{self.timeout:g} seconds") from None
            if done.returncode != 0 or not os.path.exists(out):
                detail = done.stderr.decode("utf-8", "replace").strip().splitlines()
                why = detail[-1] if detail else f"exit status {done.returncode}"
                raise SpeechError(f"could not be spoken with voice {voice}: {why}")
            with open(out, "rb") as fh:
                return fh.read()
