"""The media library: everything a caller hears, validated when the request arrives and kept by content.

``MediaLibrary.from_url(url, kind="play" | "dialtone")`` fetches a URL (daemon.media.fetch: public
addresses only, bounded in time, size and redirects), decodes and normalises it (daemon.media.audio: mono
16-bit PCM WAV at ``sample_rate``) and stores it as ``<media_dir>/<sha256>.wav``. ``speak(text, lang)``
renders a message offline (daemon.media.tts) into the same format, cached by (language, voice, rate, text).
Both return a ``MediaFile``; both raise ``MediaError`` whose text completes a sentence about the field
("play_url " + "is not audio (could not decode it)"), so the API can answer 400 with it.

A call keeps the path or hash of what was validated, so a scheduled call plays exactly that even if
the URL changes or dies. ``playable`` turns it into what FreeSWITCH should open: the local path, or
the daemon's own ``/media/<sha256>.wav`` URL when FreeSWITCH runs on another host (``media_mode``).
``evict`` keeps the folder under ``media_cache_bytes``, least recently used first, never touching the
files of pending calls. Use counts as a touch of the file's mtime, so the order survives restarts.

Concurrent requests for one URL (or one message) do the work once; the others wait for its result.
Decoding and resampling are CPU work: under gevent they run in the hub's thread pool so the event
loop (and the Event Socket connection) stays responsive.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import soundfile as sf

from daemon.config import DEFAULT_VOICES, LANGUAGES, Settings
from daemon.media.audio import SLACK_SECONDS, AudioError, Normalised, TooLong, normalise
from daemon.media.fetch import FetchError, FetchPolicy, Resolver, fetch
from daemon.media.tts import Speaker, SpeechError, clean_text

T = TypeVar("T")
_SHA = re.compile(r"[0-9a-f]{64}")
# A file used this recently may belong to a call that is being created right now and is not yet
# among the pending calls the daemon passes to evict().
EVICT_GRACE_SECONDS = 600.0
STALE_TEMP_SECONDS = 3600.0


class MediaError(ValueError):
    """Media that cannot be used; ``str()`` is the reason, for the user (it follows the field name)."""


@dataclass(frozen=True)
class MediaFile:
    """A normalised file in the media folder, named by the SHA-256 of its content."""

    path: str
    sha256: str
    seconds: float
    bytes: int


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.waiters = 0
        self.finished = False
        self.result: T | None = None
        self.error: Exception | None = None


class SingleFlight(Generic[T]):
    """Runs one function per key at a time; callers that arrive meanwhile share its result or error.

    With gevent's monkey patching, ``threading`` is greenlet-aware, so this works for greenlets and
    threads alike.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[T]] = {}

    def waiters(self, key: Hashable) -> int:
        """How many callers wait for the flight under ``key`` now (0 when none is running)."""
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight else 0

    def run(self, key: Hashable, work: Callable[[], T]) -> T:
        """The result of ``work()``, shared with every caller that asks for ``key`` while it runs."""
        while True:
            with self._lock:
                flight = self._flights.get(key)
                leader = flight is None
                if flight is None:
                    flight = self._flights[key] = _Flight()
                else:
                    flight.waiters += 1
            if leader:
                try:
                    flight.result = work()
                    flight.finished = True
                    return flight.result
                except Exception as exc:
                    flight.error = exc
                    raise
                finally:
                    with self._lock:
                        del self._flights[key]
                    flight.done.set()
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.finished:
                return flight.result  # type: ignore[return-value]
            # The leader was killed (not failed): try again, perhaps as the leader.


def _offload(work: Callable[[], T]) -> T:
    """Run CPU-bound ``work`` off the gevent hub when gevent is in charge, else right here."""
    try:
        from gevent import get_hub, monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return work()
    if not monkey.is_module_patched("threading"):
        return work()
    return get_hub().threadpool.apply(work)


def _sha_of(ref: str) -> str | None:
    """The hash in a MediaFile reference: the hash itself or a path ending in ``<hash>.wav``."""
    name = os.path.basename(ref)
    name = name[:-4] if name.endswith(".wav") else name
    return name if _SHA.fullmatch(name) else None


class MediaLibrary:
    """Fetches, renders, stores and finds the daemon's media; see the module docstring."""

    def __init__(self, settings: Settings, *, resolver: Resolver | None = None,
                 speaker: Speaker | None = None) -> None:
        self._settings = settings
        self._dir = Path(settings.media_dir)
        self._tts_dir = self._dir / "tts"
        self._tts_dir.mkdir(parents=True, exist_ok=True)
        self._policy = FetchPolicy.from_settings(settings)
        self._resolver = resolver
        self._speaker = speaker or Speaker(timeout=settings.tts_timeout)
        self._flights: SingleFlight[MediaFile] = SingleFlight()

    # Public interface ---------------------------------------------------------------------------------

    def from_url(self, url: str, *, kind: str) -> MediaFile:
        """Fetch, validate, normalise and store ``url``; ``kind`` "play" or "dialtone" sets the limit."""
        limits = {"play": self._settings.media_max_play_seconds,
                  "dialtone": self._settings.media_max_dialtone_seconds}
        if kind not in limits:
            raise ValueError(f"kind must be 'play' or 'dialtone', not {kind!r}")
        limit = limits[kind]
        try:
            # One flight per URL whatever the kind: decode under the larger limit, judge per caller.
            media = self._flights.run(("url", url), lambda: self._fetch_and_store(url, max(limits.values())))
        except TooLong:
            raise MediaError(f"is longer than {limit:g} seconds") from None
        except (FetchError, AudioError) as exc:
            raise MediaError(str(exc)) from None
        if media.seconds > limit + SLACK_SECONDS:
            raise MediaError(f"is longer than {limit:g} seconds")
        return media

    def speak(self, text: str, lang: str) -> MediaFile:
        """``text`` spoken in ``lang`` (one of config.LANGUAGES) with the configured voice, cached."""
        if lang not in LANGUAGES:
            raise MediaError(f"is not a supported language; use one of {', '.join(LANGUAGES)}")
        limit = self._settings.msg_max_chars
        if len(text) > limit:
            raise MediaError(f"is longer than {limit} characters")
        words = clean_text(text)
        if not words:
            raise MediaError("has nothing to say once control characters and markup are removed")
        voice = self._settings.tts_voices.get(lang) or DEFAULT_VOICES[lang]
        rate = self._settings.sample_rate
        key = hashlib.sha256(f"{lang}\n{voice}\n{rate}\n{words}".encode()).hexdigest()
        try:
            return self._flights.run(("tts", key), lambda: self._render(key, words, voice))
        except (SpeechError, AudioError) as exc:
            raise MediaError(str(exc)) from None

    def playable(self, media: MediaFile | str) -> str:
        """What FreeSWITCH should play: the local path, or the daemon's media URL in ``http`` mode."""
        sha = media.sha256 if isinstance(media, MediaFile) else _sha_of(media)
        if sha is None:
            raise ValueError(f"{media!r} is not a media file of this library")
        if self._settings.media_mode == "local":
            return str(self._dir / f"{sha}.wav")
        return f"{self._settings.media_base_url.rstrip('/')}/media/{sha}.wav"

    def path_for_sha(self, sha256: str) -> str | None:
        """The file for ``/media/<sha256>.wav`` if it is stored here, else None."""
        if not isinstance(sha256, str) or not _SHA.fullmatch(sha256):
            return None
        path = self._dir / f"{sha256}.wav"
        return str(path) if path.is_file() else None

    def evict(self, keep: Iterable[str], *, now: float | None = None) -> int:
        """Delete least recently used files until the folder is under ``media_cache_bytes``.

        ``keep`` holds the paths (or hashes) of media that pending calls need; they, and files used in
        the last ``EVICT_GRACE_SECONDS``, stay. Returns the bytes freed.
        """
        now = time.time() if now is None else now
        pinned = {sha for sha in (_sha_of(ref) for ref in keep) if sha}
        freed = 0
        files: list[tuple[float, int, Path]] = []
        for entry in os.scandir(self._dir):
            if not entry.is_file():
                continue
            stat = entry.stat()
            if entry.name.startswith(".tmp-"):
                if now - stat.st_mtime > STALE_TEMP_SECONDS:  # left by a crash mid-write
                    freed += self._unlink(Path(entry.path), stat.st_size)
                continue
            if _sha_of(entry.name) and entry.name.endswith(".wav"):
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        cap = self._settings.media_cache_bytes
        for mtime, size, path in sorted(files):
            if total <= cap:
                break
            if _sha_of(path.name) in pinned or now - mtime < EVICT_GRACE_SECONDS:
                continue
            freed += self._unlink(path, size)
            total -= size
        # Spoken-message index entries whose audio is gone would only cause a re-render; drop them.
        for entry in os.scandir(self._tts_dir):
            if entry.is_file() and _SHA.fullmatch(entry.name):
                target = Path(entry.path).read_text(encoding="ascii", errors="replace").strip()
                if not (self._dir / f"{target}.wav").exists():
                    self._unlink(Path(entry.path), 0)
        return freed

    # Work ---------------------------------------------------------------------------------------------

    def _fetch_and_store(self, url: str, max_seconds: float) -> MediaFile:
        data = fetch(url, self._policy, resolver=self._resolver)
        rate = self._settings.sample_rate
        result = _offload(lambda: normalise(data, rate=rate, max_seconds=max_seconds))
        return self._store(result)

    def _render(self, key: str, words: str, voice: str) -> MediaFile:
        index = self._tts_dir / key
        cached = self._cached(index)
        if cached is not None:
            return cached
        wav = self._speaker.render(words, voice)
        rate, limit = self._settings.sample_rate, self._settings.media_max_play_seconds
        media = self._store(_offload(lambda: normalise(wav, rate=rate, max_seconds=limit)))
        self._write_atomically(index, media.sha256.encode("ascii"))
        return media

    def _cached(self, index: Path) -> MediaFile | None:
        try:
            sha = index.read_text(encoding="ascii").strip()
        except (OSError, UnicodeError):
            return None
        path = self._dir / f"{sha}.wav"
        if not _SHA.fullmatch(sha) or not path.is_file():
            return None
        try:
            info = sf.info(str(path))
            size = path.stat().st_size
            os.utime(path)
        except (OSError, RuntimeError):
            return None
        return MediaFile(str(path), sha, info.frames / info.samplerate, size)

    def _store(self, result: Normalised) -> MediaFile:
        sha = hashlib.sha256(result.wav).hexdigest()
        path = self._dir / f"{sha}.wav"
        try:
            os.utime(path)  # already stored: count this as a use
        except FileNotFoundError:
            self._write_atomically(path, result.wav)
        return MediaFile(str(path), sha, result.seconds, len(result.wav))

    @staticmethod
    def _write_atomically(path: Path, data: bytes) -> None:
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(temp, 0o644)  # FreeSWITCH runs as another user and must read it
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    @staticmethod
    def _unlink(path: Path, size: int) -> int:
        try:
            path.unlink()
        except FileNotFoundError:
            return 0
        return size
