"""Recording retention: delete recordings older than ``recordings_retention_days``, hourly.

Two passes, both bounded and both safe to repeat:

1. Calls whose recording is older than the cutoff (by the call's end, else its start or request):
   the file is deleted and the call's ``recording_path`` is cleared (its length and size stay, and a
   ``recording_expired`` step goes on the timeline), so ``GET /v1/calls/<callid>/recording`` answers
   404 from then on.
2. Files under ``recordings_dir`` last written before the cutoff that no kept call points at (left by
   a crash, or by a call row deleted by hand) are deleted too.

Several daemons sharing one PostgreSQL may sweep at once: a call's reference is cleared (and its
timeline step written) by one conditional UPDATE, so by one of them; deleting a file already gone is no
error. Each daemon's second pass covers its own ``recordings_dir`` (where its FreeSWITCH records).

Only files inside ``recordings_dir`` are ever deleted, whatever a row says. ``recordings_retention_days
= 0`` keeps recordings forever. The sweep takes ``now`` as a parameter, so tests drive it without a clock.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import gevent

from daemon.calls.records import CallRecords
from daemon.config import Settings
from daemon.loop import Loop
from daemon.ops.logs import log_event
from daemon.store import utcnow

log = logging.getLogger("callbridge.retention")

INTERVAL = 3600.0  # seconds between sweeps
BATCH = 500
YIELD_EVERY = 100  # files looked at between turns given back to the event loop


class Retention:
    """Deletes expired recordings; ``start()`` runs :meth:`sweep` now and then every ``interval`` seconds."""

    def __init__(self, settings: Settings, clock: Callable[[], dt.datetime] = utcnow,
                 interval: float = INTERVAL, records: CallRecords | None = None) -> None:
        self.settings = settings
        self.records = records or CallRecords(clock=clock)
        self.clock = clock
        self.interval = interval
        self.loop = Loop("recording retention sweep", self._tick, clock, log=log, error_delay=interval)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def _tick(self, now: dt.datetime) -> float:
        self.sweep(now)
        return self.interval

    def _inside(self, path: str) -> Path | None:
        """``path`` resolved, when it lies inside recordings_dir; None otherwise."""
        root = self.settings.recordings_dir.resolve()
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        return resolved if resolved.is_relative_to(root) and resolved != root else None

    def sweep(self, now: dt.datetime) -> int:
        """Delete what expired at ``now``; returns how many recordings (files or call references) went."""
        days = self.settings.recordings_retention_days
        if days <= 0:
            return 0
        cutoff = now - dt.timedelta(days=days)
        removed = self._expire_calls(cutoff, now)
        removed += self._remove_orphans(cutoff)
        if removed:
            log_event(log, "recordings.expired", count=removed, older_than_days=days)
        return removed

    def _expire_calls(self, cutoff: dt.datetime, now: dt.datetime) -> int:
        removed = 0

        def count() -> None:
            nonlocal removed
            removed += 1

        while True:
            batch = self.records.recordings_older_than(cutoff, BATCH)
            for call in batch:
                inside = self._inside(call.recording_path)
                if inside is not None:
                    try:
                        inside.unlink(missing_ok=True)
                    except OSError as exc:
                        log_event(log, "recording.delete_failed", logging.WARNING, callid=call.callid,
                                  error=str(exc))
                # Counted once committed, and only if this sweep cleared it (not another daemon's first).
                self.records.recording_expired(call, at=now, retention_days=self.settings.recordings_retention_days,
                                               cleared=count)
            self.records.flush()  # the next batch is read from what is committed (and counted)
            if len(batch) < BATCH:
                return removed

    def _remove_orphans(self, cutoff: dt.datetime) -> int:
        root = self.settings.recordings_dir
        if not root.is_dir():
            return 0
        limit = cutoff.replace(tzinfo=dt.UTC).timestamp()
        removed = 0
        old: list[Path] = []
        for seen, path in enumerate(_files(root), start=1):
            if seen % YIELD_EVERY == 0:
                gevent.sleep(0)  # a stat per file, on the event loop the calls in progress run on
            if _written_before(path, limit):
                old.append(path)
            if len(old) == BATCH:
                removed += self._remove_unused(old)
                old = []
        return removed + self._remove_unused(old)

    def _remove_unused(self, paths: list[Path]) -> int:
        """Delete those of ``paths`` (files written before the cutoff) no kept call points at. With several
        daemons, one's sweep clears the references to every expired recording, and each other's finds its
        own files orphaned: asked of the store in one read per batch, not one read of every call per file."""
        if not paths:
            return 0
        kept = self.records.recordings_in_use([str(path) for path in paths])
        removed = 0
        for path in paths:
            if str(path) in kept:
                continue  # a kept call still points at it (its row is newer than the file)
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log_event(log, "recording.delete_failed", logging.WARNING, path=str(path), error=str(exc))
                continue
            removed += 1
        return removed


def _written_before(path: Path, limit: float) -> bool:
    """A file (not a link) last written before ``limit`` (a timestamp)."""
    try:
        return not path.is_symlink() and path.stat().st_mtime < limit
    except OSError:
        return False


def _files(root: Path) -> Iterator[Path]:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            yield Path(dirpath) / name
