"""Media the stand-in pretends to play or record: file lengths, tone lengths, WAV writing."""

from __future__ import annotations

import contextlib
import os
import re
from functools import lru_cache

import numpy as np
import soundfile as sf

INFINITE = float("inf")


@lru_cache(maxsize=512)
def _file_seconds(path: str, mtime: float) -> float | None:
    try:
        info = sf.info(path)
    except (RuntimeError, OSError, sf.LibsndfileError):
        return None
    return float(info.frames) / float(info.samplerate) if info.samplerate else None


def file_seconds(path: str) -> float | None:
    """Length of a local audio file in seconds, or None if it is missing or unreadable."""
    try:
        mtime = os.path.getmtime(path)
    except OSError:
        return None
    return _file_seconds(path, mtime)


def tone_seconds(spec: str) -> float:
    """Length of a tone_stream:// spec: one pass of its tones (the sum of their on and off times), repeated
    as ``;loops=N`` says (-1: until broken).

    mod_tone_stream renders the script once into a buffer whose loops count is 0 unless ``;loops=`` sets
    it, and switch_buffer_read_loop ends the stream when the buffer runs out with loops 0 (a positive
    count is spent first, a negative one never is). A spec whose length cannot be read plays until broken.
    """
    body = spec.split("://", 1)[1] if "://" in spec else spec
    loops_m = re.search(r";loops=(-?\d+)", body)
    loops = int(loops_m.group(1)) if loops_m else 0
    if loops < 0:
        return INFINITE
    total_ms = 0.0
    groups = re.findall(r"%\(([^)]*)\)", body)
    for group in groups:
        parts = group.split(",")
        for p in parts[:2]:
            with contextlib.suppress(ValueError):
                total_ms += float(p)
    if not groups or total_ms <= 0:
        return INFINITE
    return total_ms / 1000.0 * max(1, loops)


def media_seconds(target: str) -> float | None:
    """How long playing target lasts (plan seconds): None = not found, inf = until broken."""
    if target.startswith("tone_stream://"):
        return tone_seconds(target)
    if target.startswith("silence_stream://"):
        arg = target.split("://", 1)[1].split(",")[0]
        try:
            ms = int(arg)
        except ValueError:
            return INFINITE
        return INFINITE if ms <= 0 else ms / 1000.0
    if target.startswith("local_stream://"):
        return INFINITE
    if target.startswith("file_string://"):
        total = 0.0
        for part in target.split("://", 1)[1].split("!"):
            secs = media_seconds(part)
            if secs is None:
                return None
            total += secs
        return total
    if target.startswith(("http://", "https://", "http_cache://")):
        local = fetch(target.removeprefix("http_cache://"))
        return file_seconds(local) if local else None
    return file_seconds(target)


_fetched: dict[str, str | None] = {}


def fetch(url: str) -> str | None:
    """Download url once (in a worker thread, so the hub keeps running); the local path or None."""
    if url in _fetched:
        return _fetched[url]
    import gevent

    path = gevent.get_hub().threadpool.apply(_download, (url,))
    _fetched[url] = path
    return path


def _download(url: str) -> str | None:
    import tempfile
    import urllib.error
    import urllib.request

    suffix = os.path.splitext(url.split("?", 1)[0])[1] or ".wav"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - the test media server
            data = resp.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None
    fd, path = tempfile.mkstemp(prefix="standin-http-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def media_kind(target: str) -> str:
    """Heard-timeline kind for a playback target."""
    if target.startswith("tone_stream://"):
        return "tone"
    if target.startswith("silence_stream://"):
        return "silence"
    return "file"


def write_recording(path: str, data: np.ndarray, rate: int = 8000) -> None:
    """Write int16 samples (frames or frames x 2) as a 16-bit PCM WAV, creating the folder."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    sf.write(path, data, rate, subtype="PCM_16", format="WAV")
