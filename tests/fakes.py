"""Test doubles for what the API is given: a media fetcher, a dispatcher and a clock."""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
import threading
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:
    from daemon.media.library import MediaError
except ImportError:  # daemon/media/library.py is written elsewhere; its MediaError is a ValueError
    class MediaError(ValueError):  # type: ignore[no-redef]
        """Stand-in for daemon.media.MediaError."""


@dataclass
class FakeMediaFile:
    path: str
    name: str
    seconds: float
    bytes: int


@dataclass
class FakeMedia:
    """Writes a tiny WAV per distinct request; ``fail[url_or_text] = reason`` makes a fetch fail."""

    root: Path
    fail: dict[str, str] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    before_fetch: Callable[[str], None] | None = None  # runs inside each fetch (to interleave a race)
    files: dict[str, str] = field(default_factory=dict)

    def _make(self, seed: str) -> FakeMediaFile:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.before_fetch is not None:
            self.before_fetch(seed)
        if seed in self.fail:
            raise MediaError(self.fail[seed])
        level = int(hashlib.sha256(seed.encode()).hexdigest()[:3], 16)
        frames = b"".join(struct.pack("<h", level if i % 2 else -level) for i in range(800))
        tmp = self.root / f"tmp-{threading.get_ident()}.wav"
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(frames)
        blob = tmp.read_bytes()
        sha = hashlib.sha256(blob).hexdigest()
        path = self.root / f"{sha}.wav"
        tmp.replace(path)
        self.files[sha] = str(path)
        return FakeMediaFile(path=str(path), name=sha, seconds=0.1, bytes=len(blob))

    def from_url(self, url: str, *, kind: str) -> FakeMediaFile:
        self.requests.append((kind, url))
        return self._make(url)

    def speak(self, text: str, lang: str) -> FakeMediaFile:
        self.requests.append(("speak", f"{lang}:{text}"))
        return self._make(text)

    def path_for_name(self, name: str) -> str | None:
        return self.files.get(name)


class FakeDispatcher:
    """Counts wake-ups."""

    def __init__(self) -> None:
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class FixedClock:
    """A naive-UTC clock that moves only when told."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)
