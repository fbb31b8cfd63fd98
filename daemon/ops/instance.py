"""This process's hold on its store and on its ``instance_id``: a second daemon on them refuses to start.

Two daemons following the same calls would both act on them (both bridge B, both hang up), so:

* **SQLite: one daemon per database file.** An exclusive ``flock`` on ``<database file>-daemon.lock``,
  held for the process's life. The kernel drops it when the process ends, SIGKILL included, so a restart
  is never held up. The file says who holds it (pid, instance id, since when), for the refusal.
* **Shared PostgreSQL: one live daemon per instance_id.** A row of ``instances`` names this run (a
  random ``run_id``), its host, boot and pid, and is renewed (``seen_at``) with the call leases, every
  third of ``lease_seconds`` (daemon/calls/leases.py). At start, another run's row is taken over at once
  when that run died on this very machine (same boot, its pid gone), or once it was not renewed for
  ``lease_seconds``; a row renewed while this one waits belongs to a live daemon: the start is refused.
  Each take-over is one conditional UPDATE on the row as read, so of two daemons starting together under
  one id, one wins. Times are the database server's (``now()``), never the hosts'. A renewal that finds
  the row taken over means this daemon stalled past ``lease_seconds`` and another runs under its id now.
  Each renewal (and the start) also reads the server's clock against this host's (``clock_offset``): the
  call leases are kept in the server's time (daemon/calls/leases.py).

The operator commands (``endpoint``, ``user``, ``calls``) take neither: they run beside the daemon.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gevent
from peewee import DatabaseError

from daemon.config import ConfigError, Settings
from daemon.ops.logs import log_event
from daemon.store import EPOCH, database, database_file, is_shared, utcnow

log = logging.getLogger("callbridge.instance")

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
WAIT_STEP = 0.5  # seconds between looks at a row that may belong to a live daemon
SERVER_NOW = "(now() AT TIME ZONE 'UTC')"  # the store keeps naive UTC


class AlreadyRunning(Exception):
    """Another daemon runs on this store (SQLite) or under this instance_id (shared PostgreSQL); the
    message says which and what to do."""


@dataclass(frozen=True)
class Row:
    """Another run's ``instances`` row as read, with its age by the server's clock."""

    run_id: str
    host: str
    boot_id: str
    pid: int
    seen_at: dt.datetime
    age: float  # seconds since seen_at

    def renewed_since(self, before: Row) -> bool:
        return (self.run_id, self.seen_at) != (before.run_id, before.seen_at)


def lock_file(database_url: str) -> Path | None:
    """The SQLite store's daemon lock file; None for PostgreSQL and ``:memory:``."""
    path = database_file(database_url)
    if path is None or database_url.endswith(":memory:"):
        return None
    return Path(f"{path}-daemon.lock")


def read_boot_id(path: Path = BOOT_ID) -> str:
    """This machine's boot id ("" when unreadable: then a dead run here is not told from a live one elsewhere)."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0) and kill(-1) would ask about process groups: unknown counts as alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_store(path: Path, instance_id: str) -> int:
    """Take the store's daemon lock; returns the open file holding it. AlreadyRunning naming the holder
    when another process has it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"state_dir: cannot open {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        store = path.with_name(path.name.removesuffix("-daemon.lock"))
        raise AlreadyRunning(f"another daemon ({holder}) runs on this store ({store}): stop it first, or give "
                             "this one its own state_dir") from None
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"state_dir: cannot lock {path}: {exc.strerror or exc}") from None
    since = utcnow().isoformat(timespec="seconds") + "Z"
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "instance": instance_id, "since": since}).encode() + b"\n", 0)
    return fd


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (it writes the file just after taking the lock)."""
    try:
        written = json.loads(os.pread(fd, 4096, 0))
        return f"pid {written['pid']}, instance {written['instance']}, since {written['since']}"
    except (OSError, ValueError, TypeError, KeyError):
        return "pid unknown"


class Instance:
    """This daemon's hold on its store (SQLite) or its instance_id (shared PostgreSQL), from
    :meth:`acquire` to :meth:`release`."""

    def __init__(self, settings: Settings, instance_id: str, *, wall: Callable[[], float] = time.time) -> None:
        self.instance_id = instance_id
        self.wall = wall  # this host's clock, seconds since the epoch (the tests set it apart from the server's)
        # The database server's clock minus this host's, seconds, as measured by the last renewal (shared
        # store); None before the first one.
        self.clock_offset: float | None = None
        self.lease_seconds = settings.lease_seconds
        self.lock_file = lock_file(settings.database_url)
        self.run_id = secrets.token_hex(16)
        self.host = socket.gethostname()[:255]
        self.boot_id = read_boot_id()
        self.lost = False  # another daemon took this instance_id over while this one ran
        self._fd: int | None = None
        self._registered = False

    def acquire(self) -> None:
        """Take the store or the instance_id, waiting up to ``lease_seconds`` for a row whose run may be
        dead; AlreadyRunning when another daemon holds it."""
        if is_shared():
            self._register()
            self._registered = True
            # This host's clock against the server's, before the calls left in flight are judged (a store that
            # fails just now leaves it to the first renewal: the leases go by this host's clock until then).
            with contextlib.suppress(DatabaseError):
                self.renew()
        elif self.lock_file is not None and self._fd is None:
            self._fd = lock_store(self.lock_file, self.instance_id)

    def renew(self) -> bool:
        """This daemon still runs (shared store: ``seen_at`` renewed); False once another daemon took its
        instance_id over. A store error is raised: not knowing is no take-over."""
        if self.lost:
            return False
        if not self._registered:
            return True
        before = self.wall()
        cursor = database.execute_sql(f"UPDATE instances SET seen_at = {SERVER_NOW} "
                                      "WHERE instance_id = %s AND run_id = %s RETURNING seen_at",
                                      (self.instance_id, self.run_id))
        after = self.wall()
        renewed = cursor.fetchone()
        if renewed is None:
            self.lost = True
            return False
        # The server's now() was read between before and after: against their middle, off by half the
        # round trip at most.
        self.clock_offset = (renewed[0] - EPOCH).total_seconds() - (before + after) / 2
        return True

    def release(self) -> None:
        """Let go, at stop or after a failed start: this run's row deleted (a restart anywhere starts at once),
        the lock file closed (the lock goes with it)."""
        if self._registered and not self.lost:
            self._registered = False
            try:
                database.execute_sql("DELETE FROM instances WHERE instance_id = %s AND run_id = %s",
                                     (self.instance_id, self.run_id))
            except DatabaseError as exc:
                log_event(log, "instance.not_released", logging.WARNING, instance=self.instance_id, error=str(exc),
                          note=f"a next start under this instance_id waits up to {self.lease_seconds:g} s")
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- shared PostgreSQL --------------------------------------------------------------------------
    def _register(self) -> None:
        watched: Row | None = None  # a row that may be a live daemon's, as first seen
        while True:
            row = self._read()
            if row is None:
                if self._insert():
                    return
                continue  # another daemon inserted it first: look at its row
            if watched is not None and row.renewed_since(watched):
                raise AlreadyRunning(f"instance_id {self.instance_id!r} is in use by a running daemon (host "
                                     f"{row.host}, pid {row.pid}, seen {row.age:.0f} s ago): give each daemon "
                                     "its own instance_id")
            reason = self._gone(row)
            if reason:
                if self._take(row, reason):
                    return
                watched = None  # another daemon took it first: its row is live
                continue
            if watched is None:
                watched = row
                log_event(log, "instance.waiting", logging.WARNING, instance=self.instance_id, host=row.host,
                          pid=row.pid, seen_ago=round(row.age, 1),
                          note=f"another run holds this instance_id: waiting up to {self.lease_seconds:g} s; "
                               "renewed meanwhile, it is a live daemon and this start is refused")
            gevent.sleep(WAIT_STEP)

    def _gone(self, row: Row) -> str:
        """Why ``row``'s run surely no longer runs ("" when it may)."""
        if row.boot_id and row.boot_id == self.boot_id and row.host == self.host and not pid_alive(row.pid):
            return "its process is gone (this machine, same boot)"
        if row.age > self.lease_seconds:
            return f"not renewed for {row.age:.0f} s"
        return ""

    def _read(self) -> Row | None:
        cursor = database.execute_sql(f"SELECT run_id, host, boot_id, pid, seen_at, "
                                      f"EXTRACT(EPOCH FROM {SERVER_NOW} - seen_at) "
                                      "FROM instances WHERE instance_id = %s", (self.instance_id,))
        found = cursor.fetchone()
        if found is None:
            return None
        run_id, host, boot_id, pid, seen_at, age = found
        return Row(run_id, host, boot_id, int(pid), seen_at, float(age))

    def _insert(self) -> bool:
        cursor = database.execute_sql(
            "INSERT INTO instances (instance_id, run_id, host, boot_id, pid, started_at, seen_at) "
            f"VALUES (%s, %s, %s, %s, %s, {SERVER_NOW}, {SERVER_NOW}) ON CONFLICT (instance_id) DO NOTHING",
            (self.instance_id, self.run_id, self.host, self.boot_id, os.getpid()))
        return bool(cursor.rowcount == 1)

    def _take(self, row: Row, reason: str) -> bool:
        """One conditional UPDATE on the row as read: of several daemons taking it at once, one wins."""
        cursor = database.execute_sql(
            f"UPDATE instances SET run_id = %s, host = %s, boot_id = %s, pid = %s, started_at = {SERVER_NOW}, "
            f"seen_at = {SERVER_NOW} WHERE instance_id = %s AND run_id = %s AND seen_at = %s",
            (self.run_id, self.host, self.boot_id, os.getpid(), self.instance_id, row.run_id, row.seen_at))
        if cursor.rowcount != 1:
            return False
        log_event(log, "instance.taken_over", instance=self.instance_id, previous_host=row.host,
                  previous_pid=row.pid, reason=reason)
        return True
