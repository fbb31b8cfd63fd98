"""The media library: everything a caller hears, validated when the request arrives and kept by content.

``MediaLibrary.from_url(url, kind="play" | "dialtone")`` downloads a URL (daemon.media.fetch: public
addresses only, bounded in time, size and redirects) into a temporary file under the media folder, has
a worker process decode and normalise it (daemon.media.audio: mono 16-bit PCM WAV at ``sample_rate``,
refused from its header when it would cost too much) and stores the result as ``<media_dir>/<name>.wav``.
``speak(text, lang)`` has a worker render a message offline (daemon.media.tts) into the same format,
cached by (engine, language, voice, rate, text). Both return a ``MediaFile``; both raise ``MediaError``
whose text completes a sentence about the field ("play_url " + "is not audio (could not decode it)"), so
the API can answer 400 with it, or ``MediaBusy`` when every worker stayed busy (the API answers 503).

Names are an HMAC of the content under this installation's key (daemon.media.naming): the same content
is stored once, and nobody outside can compute a name. A call keeps the path of what was validated, so a
scheduled call plays exactly that even if the URL changes or dies. ``playable`` turns it into what
FreeSWITCH should open: the local path, or the daemon's own ``/media/<name>.wav`` URL when FreeSWITCH runs
on another host (``media_mode``). ``evict`` keeps the folder under ``media_cache_bytes``, least recently
used first, never touching the files of pending calls. Use counts as a touch of the file's mtime, so the
order survives restarts.

Concurrent requests for one URL (or one message) do the work once; the others wait for its result.
Decoding, resampling and speech run in a bounded pool of worker processes (daemon.media.pool), waited
on cooperatively, so the event loop (and the Event Socket connection) stays responsive and no library
lock is ever shared between gevent and real threads.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import gevent

from daemon.config import DEFAULT_VOICES, LANGUAGES, ConfigError, Settings
from daemon.media.audio import SLACK_SECONDS, Limits
from daemon.media.fetch import FetchError, FetchPolicy, Resolver, fetch
from daemon.media.naming import NAME, LegacyNames, load_or_create_key, migrate_legacy
from daemon.media.pool import MediaBusy, WorkerFailed, WorkerPool
from daemon.media.tts import clean_text
from daemon.ops.logs import log_event

__all__ = ["MediaBusy", "MediaError", "MediaFile", "MediaLibrary", "SingleFlight", "route_allows"]

log = logging.getLogger("callbridge.media")
T = TypeVar("T")
# A file used this recently may belong to a call that is being created right now and is not yet
# among the pending calls the daemon passes to evict().
EVICT_GRACE_SECONDS = 600.0
STALE_TEMP_SECONDS = 3600.0


class MediaError(ValueError):
    """Media that cannot be used; ``str()`` is the reason, for the user (it follows the field name)."""


class SpeechUnavailable(Exception):
    """The server's speech engine or a configured voice failed (not the message): the request may not be
    to blame, so it is answered 503; ``str()`` is the reason."""


class _TooLong(MediaError):
    """Longer than the limit the worker decoded under; each caller words it with its own limit."""


@dataclass(frozen=True)
class MediaFile:
    """A normalised file in the media folder, named by the keyed hash of its content."""

    path: str
    name: str
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


def _name_of(ref: str) -> str | None:
    """The name in a MediaFile reference: the name itself or a path ending in ``<name>.wav``."""
    base = os.path.basename(ref)
    base = base[:-4] if base.endswith(".wav") else base
    return base if NAME.fullmatch(base) else None


def route_allows(allow: Iterable[str], address: str | None) -> bool:
    """Whether ``address`` is in one of the ``allow`` addresses or ranges (``media_route_allow``)."""
    try:
        addr = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for entry in allow:
        with contextlib.suppress(ValueError):
            if addr in ipaddress.ip_network(entry, strict=False):
                return True
    return False


class MediaLibrary:
    """Fetches, renders, stores and finds the daemon's media; see the module docstring."""

    def __init__(self, settings: Settings, *, resolver: Resolver | None = None,
                 pool: WorkerPool | None = None) -> None:
        self._settings = settings
        self._dir = Path(settings.media_dir).absolute()  # the workers get absolute paths
        self._dir_text = str(self._dir)
        self._tts_dir = self._dir / "tts"
        self._tts_dir.mkdir(parents=True, exist_ok=True)
        self._key, made = load_or_create_key(settings.state_path)
        self._legacy = LegacyNames(self._dir)
        renamed = migrate_legacy(self._dir, self._key, self._legacy)
        if made or renamed:
            log_event(log, "media.key_created" if made else "media.migrated", renamed=renamed)
        self._policy = FetchPolicy.from_settings(settings)
        self._limits = Limits(max_channels=settings.media_max_channels,
                              max_sample_rate=settings.media_max_sample_rate,
                              max_samples=settings.media_max_decoded_samples)
        self._resolver = resolver
        self._owns_pool = pool is None
        self.pool = pool or WorkerPool(settings.media_workers, queue_timeout=settings.media_queue_timeout,
                                       cpu_seconds=settings.media_cpu_seconds,
                                       memory_mb=settings.media_memory_mb)
        self._flights: SingleFlight[MediaFile] = SingleFlight()

    def warm_up(self) -> None:
        """Start a worker now rather than at the first request (a failure is logged; requests retry)."""
        try:
            self.pool.warm_up()
        except Exception as exc:
            log_event(log, "media.warm_up_failed", logging.WARNING, error=str(exc))

    def close(self) -> None:
        """Stop the worker processes this library started."""
        if self._owns_pool:
            self.pool.close()

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
        except _TooLong:
            raise MediaError(f"is longer than {limit:g} seconds") from None
        except FetchError as exc:
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
        engine, rate = self._settings.tts_engine, self._settings.sample_rate
        key = hashlib.sha256(f"{engine}\n{lang}\n{voice}\n{rate}\n{words}".encode()).hexdigest()
        return self._flights.run(("tts", key), lambda: self._render(key, words, voice))

    def check_voices(self) -> None:
        """Speak a word with each voice the operator set (tts_voices that differ from the defaults), as a
        request would: one the engine lacks stops the start (ConfigError naming it) rather than failing
        clients' messages later. The defaults are known to the bundled engine; none is spoken then."""
        for lang, voice in sorted(self._settings.tts_voices.items()):
            if voice == DEFAULT_VOICES.get(lang):
                continue
            try:
                answer = self._spoken("test", voice)
            except (MediaError, MediaBusy) as exc:
                raise ConfigError(f"tts_voices: {lang} = {voice!r}: {exc}") from None
            if not answer["ok"]:
                raise ConfigError(f"tts_voices: {lang} = {voice!r}: {answer['message']}")
            with contextlib.suppress(OSError):
                os.unlink(answer["temp"])

    def playable(self, media: MediaFile | str) -> str:
        """What FreeSWITCH should play: the local path, or the daemon's media URL in ``http`` mode."""
        name = media.name if isinstance(media, MediaFile) else _name_of(media)
        if name is None:
            raise ValueError(f"{media!r} is not a media file of this library")
        name = self._current(name)
        if self._settings.media_mode == "local":
            return os.path.join(self._dir_text, f"{name}.wav")
        return f"{self._settings.media_base_url.rstrip('/')}/media/{name}.wav"

    def path_for_name(self, name: str) -> str | None:
        """The file for ``/media/<name>.wav`` if it is stored here, else None."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            return None
        path = self._dir / f"{name}.wav"
        return str(path) if path.is_file() else None

    def evict(self, in_use: Callable[[], Iterable[str]], *, now: float | None = None) -> int:
        """Delete least recently used files until the folder is under ``media_cache_bytes``.

        ``in_use()`` gives the paths (or names) of media that calls not yet ended will play, asked only when
        the folder is over its bound; they, and files used in the last ``EVICT_GRACE_SECONDS``, stay.
        Returns the bytes freed. The folder is read in a thread of the hub's pool (every file's ``stat``;
        the spoken messages' entries only after a file went): the event loop that moves calls goes on
        meanwhile (20,000 cached messages held it 1.3-5.4 s, this VM). Only the deletions run on the loop,
        each after a last look at the file's time (a file used meanwhile stays), yielding after each (20,000
        deletions took 5.4 s here)."""
        now = time.time() if now is None else now
        threads = gevent.get_hub().threadpool
        files, freed = threads.apply(self._listing, (now,))
        total = sum(size for _, size, _ in files)
        cap = self._settings.media_cache_bytes
        if total <= cap:
            return freed
        pinned = {self._current(name) for name in (_name_of(ref) for ref in in_use()) if name}
        deleted = 0
        for _, size, path in sorted(files, key=lambda file: file[0]):  # oldest use first
            if total <= cap:
                break
            if _name_of(path.name) in pinned or now - _mtime(path) < EVICT_GRACE_SECONDS:
                continue
            deleted += self._unlink(path, size)
            total -= size
            gevent.sleep(0)
        if deleted:
            threads.apply(self._forget_spoken_without_audio)
        return freed + deleted

    def _listing(self, now: float) -> tuple[list[tuple[float, int, Path]], int]:
        """(In a thread.) The media files as (mtime, size, path), and the bytes of the temporary files a
        crash left mid-write, deleted here."""
        freed = 0
        files: list[tuple[float, int, Path]] = []
        for entry in os.scandir(self._dir):
            if not entry.is_file():
                continue
            stat = entry.stat()
            if entry.name.startswith(".tmp-"):
                if now - stat.st_mtime > STALE_TEMP_SECONDS:
                    freed += self._unlink(Path(entry.path), stat.st_size)
                continue
            if _name_of(entry.name) and entry.name.endswith(".wav"):
                files.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return files, freed

    def _forget_spoken_without_audio(self) -> None:
        """(In a thread.) Drop the spoken messages' entries whose audio is gone: they would only cause a
        render again (one racing a render of its message at worst costs another render)."""
        for entry in os.scandir(self._tts_dir):
            if entry.is_file() and NAME.fullmatch(entry.name):
                target = Path(entry.path).read_text(encoding="ascii", errors="replace").strip()
                if not (self._dir / f"{target}.wav").exists():
                    self._unlink(Path(entry.path), 0)

    # Work ---------------------------------------------------------------------------------------------

    def _current(self, name: str) -> str:
        """``name``, or the name its file got when the media key was introduced. Only a name that was renamed
        is looked for on disk (every call's prompts pass here: no stat for the others, which are theirs)."""
        renamed = self._legacy.current(name)
        if renamed == name:
            return name
        return name if os.path.exists(os.path.join(self._dir_text, f"{name}.wav")) else renamed

    def _job(self, op: str, max_seconds: float, **fields: Any) -> dict[str, Any]:
        return {"op": op, "rate": self._settings.sample_rate, "max_seconds": max_seconds,
                "limits": {"max_channels": self._limits.max_channels,
                           "max_sample_rate": self._limits.max_sample_rate,
                           "max_samples": self._limits.max_samples},
                "folder": str(self._dir), "key": self._key.hex(), **fields}

    def _fetch_and_store(self, url: str, max_seconds: float) -> MediaFile:
        # The body goes to a file, not memory: twenty 50 MB downloads at once cost disk, not RSS.
        fd, download = tempfile.mkstemp(prefix=".tmp-download-", dir=self._dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fetch(url, self._policy, fh, resolver=self._resolver)
            answer = self._run(self._job("normalise", max_seconds, source=download),
                               self._settings.media_decode_timeout, "decoded")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(download)
        return self._adopt(answer)

    def _render(self, key: str, words: str, voice: str) -> MediaFile:
        index = self._tts_dir / key
        cached = self._cached(index)
        if cached is not None:
            return cached
        media = self._adopt(self._spoken(words, voice))
        self._write_index(index, media.name)
        return media

    def _spoken(self, words: str, voice: str) -> dict[str, Any]:
        """A worker's answer to speaking ``words`` with ``voice``: the one job a request and check_voices run."""
        job = self._job("speak", self._settings.media_max_play_seconds, text=words, voice=voice,
                        engine=self._settings.tts_engine, timeout=self._settings.tts_timeout)
        return self._run(job, self._settings.tts_timeout, "spoken")

    def _run(self, job: dict[str, Any], timeout: float, done: str) -> dict[str, Any]:
        """The pool's answer to ``job``; a worker killed, dead or out of memory is the request's MediaError."""
        try:
            answer = self.pool.run(job, timeout=timeout)
        except WorkerFailed as exc:
            log_event(log, "media.worker_failed", logging.WARNING, op=job["op"], reason=str(exc))
            raise MediaError(f"could not be {done}: {exc}") from None
        except MediaBusy:
            log_event(log, "media.busy", logging.WARNING, op=job["op"], workers=self.pool.size)
            raise
        if not answer["ok"] and answer["kind"] == "memory":  # like the CPU limit: "could not be decoded: ..."
            log_event(log, "media.worker_failed", logging.WARNING, op=job["op"], reason=answer["message"])
            raise MediaError(f"could not be {done}: {answer['message']}")
        return answer

    def _adopt(self, answer: dict[str, Any]) -> MediaFile:
        """The stored file for a worker's answer (its temporary file renamed, or dropped as a duplicate)."""
        if not answer["ok"]:
            if answer["kind"] == "too_long":
                raise _TooLong(answer["message"])
            if answer["kind"] == "speech_setup":
                log_event(log, "media.speech_unavailable", logging.ERROR, error=answer["message"],
                          note="check tts_engine and tts_voices")
                raise SpeechUnavailable(answer["message"])
            if answer["kind"] == "internal":
                log_event(log, "media.worker_error", logging.ERROR, error=answer["message"])
                raise OSError(answer["message"])
            raise MediaError(answer["message"])
        temp, name = answer["temp"], answer["name"]
        if not NAME.fullmatch(name) or os.path.dirname(temp) != str(self._dir):
            raise OSError(f"media worker answered an unexpected file {temp!r} / {name!r}")
        path = self._dir / f"{name}.wav"
        try:
            os.utime(path)  # already stored: count this as a use
            os.unlink(temp)
        except FileNotFoundError:
            os.replace(temp, path)
        return MediaFile(str(path), name, float(answer["seconds"]), int(answer["bytes"]))

    def _cached(self, index: Path) -> MediaFile | None:
        try:
            name = index.read_text(encoding="ascii").strip()
        except (OSError, UnicodeError):
            return None
        path = self._dir / f"{name}.wav"
        if not NAME.fullmatch(name) or not path.is_file():
            return None
        try:
            seconds = _wav_seconds(path)
            size = path.stat().st_size
            os.utime(path)
        except (OSError, EOFError, wave.Error, ZeroDivisionError):
            return None
        return MediaFile(str(path), name, seconds, size)

    @staticmethod
    def _write_index(path: Path, name: str) -> None:
        """Record which file a message rendered to. A cache entry: not fsynced (that would stall the event
        loop), since an entry lost or torn by a power cut only means the message is rendered again."""
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(name)
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


def _mtime(path: Path) -> float:
    """When the file was last used (its mtime), or now's worth of grace when it is gone already."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _wav_seconds(path: Path) -> float:
    """How long one of our WAVs plays, from its header (``wave``: no C library in the event loop)."""
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()
