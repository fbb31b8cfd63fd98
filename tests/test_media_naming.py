"""Media names keyed by the installation's secret, and the upgrade from names anyone could compute."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.media.library import MediaLibrary
from daemon.media.naming import LEGACY_FILE, MIGRATED_MARK, LegacyNames, load_or_create_key, migrate_legacy
from tests.test_media import POOL, tone_file


def library(state: Path, **overrides: Any) -> MediaLibrary:
    return MediaLibrary(Settings(state_dir=str(state), **overrides), pool=POOL)


def old_style(media: Path, content: bytes) -> Path:
    """A file as the previous version stored it: named by the SHA-256 of its content."""
    media.mkdir(parents=True, exist_ok=True)
    path = media / f"{hashlib.sha256(content).hexdigest()}.wav"
    path.write_bytes(content)
    return path


def test_the_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    key, made = load_or_create_key(tmp_path)
    assert made and len(key) == 32
    assert oct(os.stat(tmp_path / "media.key").st_mode & 0o777) == "0o600"
    assert load_or_create_key(tmp_path) == (key, False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_two_installations_name_the_same_content_differently(tmp_path: Path) -> None:
    one, two = library(tmp_path / "one"), library(tmp_path / "two")
    assert one.speak("Your code is 4 2 7 1", "en-GB").name != two.speak("Your code is 4 2 7 1", "en-GB").name


def test_files_from_before_the_key_are_renamed_and_old_references_still_lead_to_them(tmp_path: Path) -> None:
    state = tmp_path / "state"
    prompt, tone = tone_file(440), tone_file(660)
    old_prompt, old_tone = old_style(state / "media", prompt), old_style(state / "media", tone)
    (state / "media" / "tts").mkdir()
    (state / "media" / "tts" / ("a" * 64)).write_text(old_prompt.stem)  # a cached render, by old name
    lib = library(state)
    key = bytes.fromhex((state / "media.key").read_text())
    new_prompt = state / "media" / f"{hmac.new(key, prompt, hashlib.sha256).hexdigest()}.wav"
    assert not old_prompt.exists() and not old_tone.exists()
    assert new_prompt.read_bytes() == prompt
    # A pending call holds the old path (or name): it plays the renamed file.
    assert lib.playable(str(old_prompt)) == str(new_prompt) == lib.playable(old_prompt.stem)
    remote = library(state, media_mode="http", media_base_url="http://10.0.0.5:8080")
    assert remote.playable(str(old_prompt)) == f"http://10.0.0.5:8080/media/{new_prompt.name}"
    assert lib.path_for_name(old_prompt.stem) is None  # the old, computable name is served no more
    assert not (state / "media" / "tts" / ("a" * 64)).exists()  # the cache entry went with the old name
    # Eviction keeps what a pending call needs, even when the call names it the old way.
    now = time.time()
    for path in (state / "media").glob("*.wav"):
        os.utime(path, (now - 7200, now - 7200))
    library(state, media_cache_bytes=0).evict(lambda: [str(old_prompt)], now=now)
    assert new_prompt.exists() and len(list((state / "media").glob("*.wav"))) == 1
    # Later starts leave files alone (the tests and tools may put files there by content hash).
    later = old_style(state / "media", tone_file(880))
    library(state)
    assert later.exists()


def test_a_migration_cut_short_is_finished_at_the_next_start(tmp_path: Path) -> None:
    media = tmp_path / "media"
    first, second = old_style(media, tone_file(440)), old_style(media, tone_file(550))
    key, _ = load_or_create_key(tmp_path)
    legacy = LegacyNames(media)
    # As if the process died after renaming the first file: its rename is recorded, the mark is missing.
    done = hmac.new(key, first.read_bytes(), hashlib.sha256).hexdigest()
    legacy.record(first.stem, done)
    os.replace(first, media / f"{done}.wav")
    assert not (media / MIGRATED_MARK).exists()
    assert migrate_legacy(media, key, LegacyNames(media)) == 1  # only the second one was left
    assert (media / MIGRATED_MARK).exists()
    names = LegacyNames(media)
    assert names.current(first.stem) == done
    assert (media / f"{names.current(second.stem)}.wav").exists()
    assert len((media / LEGACY_FILE).read_text().splitlines()) == 2


def test_playable_looks_on_disk_only_for_a_name_that_was_renamed(tmp_path: Path, monkeypatch: Any) -> None:
    state = tmp_path / "state"
    prompt = tone_file(440)
    old_prompt = old_style(state / "media", prompt)
    lib = library(state)
    media = state / "media"
    new_name = LegacyNames(media).current(old_prompt.stem)
    looked: list[str] = []
    real_exists = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda path: looked.append(str(path)) or real_exists(path))
    # A current name (every call's prompts): its path, whether or not its file is there, without a stat.
    assert lib.playable(f"{new_name}.wav") == str(media / f"{new_name}.wav")
    assert lib.playable("b" * 64) == str(media / f"{'b' * 64}.wav")
    assert looked == []
    # An old name leads to the renamed file, unless a file under the old name is there (as before).
    assert lib.playable(str(old_prompt)) == str(media / f"{new_name}.wav")
    assert looked == [str(old_prompt)]
    old_prompt.write_bytes(prompt)
    assert lib.playable(str(old_prompt)) == str(old_prompt)
