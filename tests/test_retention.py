"""Recording retention: old recordings go (file and reference), recent ones and outside files stay."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import secrets
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest
from peewee import Database

from daemon.config import Settings
from daemon.ops.retention import Retention
from daemon.store import Call, CallEvent, CallStatus, Endpoint, utcnow
from tests.conftest import insert_rows, sqlite_work

pytestmark = pytest.mark.stores("sqlite", "postgresql")

NOW = dt.datetime(2026, 6, 15, 12, 0, 0)


def recorded_call(endpoint: Endpoint, settings: Settings, ended: dt.datetime, path: Path | None = None) -> Call:
    callid = secrets.token_hex(14)
    path = path or settings.recordings_dir / f"{callid}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF....WAVE")
    stamp = ended.replace(tzinfo=dt.UTC).timestamp()
    os.utime(path, (stamp, stamp))
    return Call.create(callid=callid, endpoint=endpoint, phone_a="15550001001", phone_b="15550002002",
                       requested_at=ended - dt.timedelta(minutes=1), due_at=ended, started_at=ended,
                       ended_at=ended, status=CallStatus.COMPLETED.value,
                       recording_path=str(path), recording_seconds=1.5, recording_bytes=12)


def test_sweep_deletes_expired_recordings_and_clears_their_calls(db: Database, settings: Settings,
                                                                make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    old = recorded_call(endpoint, settings, NOW - dt.timedelta(days=91))
    recent = recorded_call(endpoint, settings, NOW - dt.timedelta(days=89))
    assert Retention(settings).sweep(NOW) == 1
    old, recent = Call.get_by_id(old.id), Call.get_by_id(recent.id)
    assert old.recording_path == "" and old.recording_bytes == 12  # length and size stay on the call
    assert not (settings.recordings_dir / f"{old.callid}.wav").exists()
    assert recent.recording_path and Path(recent.recording_path).exists()
    kinds = [e.kind for e in CallEvent.select().where(CallEvent.call == old.id)]
    assert kinds == ["recording_expired"]
    assert Retention(settings).sweep(NOW) == 0  # repeating it changes nothing


def test_two_daemons_sweeping_at_once_expire_each_recording_once(db: Database, settings: Settings,
                                                                 make_endpoint: Any) -> None:
    """Both daemons read the same expired calls; each call's reference is cleared, and noted on its
    timeline, by one of them."""
    endpoint, _ = make_endpoint()
    calls = [recorded_call(endpoint, settings, NOW - dt.timedelta(days=100)) for _ in range(20)]
    first, second = Retention(settings), Retention(settings)
    both_read = gevent.event.Event()
    seen = []

    def read_then_wait(retention: Retention) -> None:
        original = retention.records.recordings_older_than

        def older_than(cutoff: dt.datetime, limit: int) -> list[Call]:
            batch = original(cutoff, limit)
            seen.append(len(batch))
            if len(seen) == 2:
                both_read.set()
            both_read.wait(10)  # neither clears anything before both have read the batch
            return batch

        retention.records.recordings_older_than = older_than  # type: ignore[method-assign]

    read_then_wait(first)
    read_then_wait(second)
    sweeps = [gevent.spawn(first.sweep, NOW), gevent.spawn(second.sweep, NOW)]
    gevent.joinall(sweeps, timeout=30, raise_error=True)
    assert seen[:2] == [20, 20]
    assert sweeps[0].value + sweeps[1].value == 20
    for call in calls:
        assert Call.get_by_id(call.id).recording_path == ""
        assert [e.kind for e in CallEvent.select().where(CallEvent.call == call.id)] == ["recording_expired"]
        assert not Path(call.recording_path).exists()


def test_orphan_files_go_but_files_outside_the_folder_never(db: Database, settings: Settings, tmp_path: Path,
                                                           make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    settings.recordings_dir.mkdir(parents=True, exist_ok=True)
    orphan = settings.recordings_dir / "left-by-a-crash.wav"
    orphan.write_bytes(b"x")
    fresh_orphan = settings.recordings_dir / "being-written.wav"
    fresh_orphan.write_bytes(b"x")
    long_ago = (NOW - dt.timedelta(days=200)).replace(tzinfo=dt.UTC).timestamp()
    os.utime(orphan, (long_ago, long_ago))
    outside = tmp_path / "elsewhere" / "keep.wav"
    call = recorded_call(endpoint, settings, NOW - dt.timedelta(days=200), path=outside)
    assert Retention(settings).sweep(NOW) == 2  # the orphan, and the outside call's reference
    assert not orphan.exists() and fresh_orphan.exists()
    assert outside.exists(), "a path outside recordings_dir is never deleted"
    assert Call.get_by_id(call.id).recording_path == ""


def test_a_daemon_removes_its_files_another_daemons_sweep_expired_and_keeps_those_still_used(
        db: Database, settings: Settings, tmp_path: Path, make_endpoint: Any) -> None:
    """Several daemons on one store, each recording into its own folder: the first sweep clears the
    references to every expired recording but deletes only its own files; each other daemon's sweep then
    finds its files orphaned and deletes them. A file a kept call points at stays, however old."""
    endpoint, _ = make_endpoint()
    other = dataclasses.replace(settings, state_dir=str(tmp_path / "other-daemon"))
    theirs = [recorded_call(endpoint, other, NOW - dt.timedelta(days=200)) for _ in range(3)]
    still_used = recorded_call(endpoint, other, NOW - dt.timedelta(days=1))
    long_ago = (NOW - dt.timedelta(days=200)).replace(tzinfo=dt.UTC).timestamp()
    os.utime(still_used.recording_path, (long_ago, long_ago))  # (a file older than its call's row)
    assert Retention(settings).sweep(NOW) == 3  # their references
    assert all(Path(call.recording_path).exists() for call in theirs)
    assert Retention(other).sweep(NOW) == 3  # their files
    assert not any(Path(call.recording_path).exists() for call in theirs)
    assert Path(still_used.recording_path).exists()


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_orphaned_files_cost_one_read_of_the_store_per_batch_not_per_file(
        db: Database, settings: Settings, make_endpoint: Any) -> None:
    """No index has the recordings' paths: a read per file walked every call, hundreds of times an hour
    on a daemon whose files another daemon's sweep had expired."""
    endpoint, _ = make_endpoint()
    insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550001001",
                        "phone_b": "15550002002", "due_at": NOW, "status": "completed"} for _ in range(3000)))
    settings.recordings_dir.mkdir(parents=True, exist_ok=True)
    long_ago = (NOW - dt.timedelta(days=200)).replace(tzinfo=dt.UTC).timestamp()

    def work_of_a_sweep(orphans: int) -> int:
        for n in range(orphans):
            path = settings.recordings_dir / f"orphan-{n}.wav"
            path.write_bytes(b"x")
            os.utime(path, (long_ago, long_ago))
        swept: list[int] = []
        work = sqlite_work(lambda: swept.append(Retention(settings).sweep(NOW)))
        assert swept == [orphans]
        return work

    one, many = work_of_a_sweep(1), work_of_a_sweep(200)
    assert many <= 2 * one + 10, (one, many)


def test_zero_days_keeps_everything(db: Database, settings: Settings, make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    call = recorded_call(endpoint, settings, NOW - dt.timedelta(days=3650))
    assert Retention(dataclasses.replace(settings, recordings_retention_days=0)).sweep(NOW) == 0
    assert Path(Call.get_by_id(call.id).recording_path).exists()


def test_the_greenlet_sweeps_at_start_and_stops_promptly(db: Database, settings: Settings,
                                                         make_endpoint: Any) -> None:
    endpoint, _ = make_endpoint()
    call = recorded_call(endpoint, settings, utcnow() - dt.timedelta(days=100))
    retention = Retention(settings, interval=3600)
    retention.start()
    retention.stop()  # the first sweep runs at start; stop interrupts the hourly wait at once
    assert Call.get_by_id(call.id).recording_path == ""


# SQLite only: a PostgreSQL driver's queries hand the loop back anyway (in the first pass), which would hide
# a walk that does not.
@pytest.mark.stores("sqlite")
def test_a_sweep_over_many_files_lets_the_event_loop_run(db: Database, settings: Settings) -> None:
    """The sweep runs in the daemon's one event loop, beside the calls in progress: walking a folder of a
    season's recordings (a stat per file) must hand the loop back now and then, not hold it for the walk."""
    settings.recordings_dir.mkdir(parents=True, exist_ok=True)
    for n in range(3000):  # recent recordings: only looked at
        (settings.recordings_dir / f"kept-{n}.wav").write_bytes(b"x")
    turns = 0
    sweeping = True

    def other_greenlet() -> None:
        nonlocal turns
        while sweeping:
            turns += 1
            gevent.sleep(0)

    other = gevent.spawn(other_greenlet)
    gevent.sleep(0)  # it runs once, then waits for its next turn
    before = turns
    Retention(settings).sweep(NOW)
    during = turns - before
    sweeping = False
    other.join(timeout=10)
    assert during >= 20, f"the loop ran other greenlets {during} times during the walk of 3000 files"


@pytest.mark.stores("sqlite")  # SQLite counts the work of a statement (its progress handler)
def test_the_hourly_read_of_expired_recordings_does_not_walk_the_calls_without_one(
        db: Database, settings: Settings, make_endpoint: Any) -> None:
    """The read runs on the event loop that runs the calls: a store of a million calls, most never
    recorded or their recording already expired, must not be walked every hour to find the few that are
    due (300,000 took 0.24 s, with every call in progress waiting)."""
    endpoint, _ = make_endpoint()
    long_ago = NOW - dt.timedelta(days=400)

    def work_of_a_sweep(unrecorded: int) -> int:
        insert_rows(Call, ({"callid": secrets.token_hex(14), "endpoint": endpoint.id, "phone_a": "15550001001",
                            "phone_b": "15550002002", "requested_at": long_ago, "due_at": long_ago,
                            "ended_at": long_ago, "status": "completed"} for _ in range(unrecorded)))
        expired = recorded_call(endpoint, settings, NOW - dt.timedelta(days=200))
        swept: list[int] = []
        work = sqlite_work(lambda: swept.append(Retention(settings).sweep(NOW)))
        assert swept == [1] and Call.get_by_id(expired.id).recording_path == ""
        return work

    small = work_of_a_sweep(1000)
    large = work_of_a_sweep(10_000)
    assert large <= 2 * small + 10, (small, large)
