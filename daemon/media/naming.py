"""Names of stored media that nobody can compute: an HMAC-SHA256 of the content under a secret key.

Files used to be named by the SHA-256 of their content, and eSpeak's output for a text is predictable,
so anyone could compute the name of a spoken "Your code is 4 2 7 1" and ask the media route for it.
Now the name is ``HMAC-SHA256(key, content)``: the same content still gets the same name (one file
however many calls use it), but only this installation can compute it.

The key is 32 random bytes made once and kept in ``state_dir/media.key`` (mode 0600); losing it only
means new names for new files. When the key is first made, files already in the media folder are
renamed to their new names (``migrate_legacy``) and each rename is recorded in
``media/.legacy-names`` before it happens, so the references that pending calls hold to the old names
still lead to the file (``LegacyNames.current``) after an upgrade, even one interrupted by a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path

NAME = re.compile(r"[0-9a-f]{64}")
KEY_FILE = "media.key"
LEGACY_FILE = ".legacy-names"
MIGRATED_MARK = ".named-by-key"


def media_name(key: bytes, content: bytes) -> str:
    """The stored name (without ``.wav``) of ``content``."""
    return hmac.new(key, content, hashlib.sha256).hexdigest()


def load_or_create_key(state_dir: Path) -> tuple[bytes, bool]:
    """The installation's media key, and whether it was made just now."""
    path = state_dir / KEY_FILE
    try:
        return bytes.fromhex(path.read_text(encoding="ascii").strip()), False
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".tmp-key-", dir=state_dir)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(temp, path)  # fails if another process made the key meanwhile: use theirs
            made = True
        except FileExistsError:
            made = False
    finally:
        os.unlink(temp)
    return bytes.fromhex(path.read_text(encoding="ascii").strip()), made


class LegacyNames:
    """Old content-hash names and the names their files have now."""

    def __init__(self, media_dir: Path) -> None:
        self._path = media_dir / LEGACY_FILE
        self._map: dict[str, str] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self._path.read_text(encoding="ascii", errors="replace").splitlines():
                old, _, new = line.partition(" ")
                if NAME.fullmatch(old) and NAME.fullmatch(new):
                    self._map[old] = new

    def current(self, name: str) -> str:
        """The name a file stored as ``name`` has now (``name`` itself unless it was renamed)."""
        return self._map.get(name, name)

    def record(self, old: str, new: str) -> None:
        with open(self._path, "a", encoding="ascii") as fh:
            fh.write(f"{old} {new}\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._map[old] = new


def migrate_legacy(media_dir: Path, key: bytes, legacy: LegacyNames) -> int:
    """Rename files named by their SHA-256 to their keyed names; how many were renamed.

    Runs until ``media/.named-by-key`` exists, so a migration cut short by a crash is finished at the
    next start. Cached speech index entries point at old names; they are dropped (a cache miss renders
    the message again).
    """
    mark = media_dir / MIGRATED_MARK
    if mark.exists():
        return 0
    renamed = 0
    for entry in os.scandir(media_dir):
        stem = entry.name[:-4] if entry.name.endswith(".wav") else ""
        if not entry.is_file() or not NAME.fullmatch(stem):
            continue
        content = Path(entry.path).read_bytes()
        if hashlib.sha256(content).hexdigest() != stem:
            continue  # already a keyed name
        new = media_name(key, content)
        legacy.record(stem, new)
        os.replace(entry.path, media_dir / f"{new}.wav")
        renamed += 1
    tts = media_dir / "tts"
    if tts.is_dir():
        for entry in os.scandir(tts):
            if entry.is_file() and NAME.fullmatch(entry.name):
                os.unlink(entry.path)
    mark.touch()
    return renamed
