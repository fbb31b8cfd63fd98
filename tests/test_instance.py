"""One daemon per SQLite store and one live daemon per instance_id on a shared PostgreSQL
(daemon/ops/instance.py): services started in this process, and the instance rows' rules against a real
PostgreSQL. The daemon processes themselves: tests/integration/test_daemon_restart.py (SQLite) and
tests/robustness/test_two_daemons.py (PostgreSQL)."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest
from peewee import Database

from daemon.calls.leases import Leases
from daemon.calls.records import CallRecords
from daemon.config import Settings, load_settings
from daemon.ops.instance import AlreadyRunning, Instance, read_boot_id
from daemon.ops.metrics import Metrics
from daemon.service import ListenError, Service
from daemon.store import database, database_file, utcnow
from tests.test_cli import _closed_port
from tests.test_leases import AdoptingEngine

LEASE = 3.0  # seconds


def service_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """A daemon's settings on this test's SQLite store; no switch listens at its ESL port."""
    values: dict[str, Any] = {"state_dir": str(tmp_path / "state"), "http_port": 0, "esl_port": _closed_port(),
                              "database_url": f"sqlite:///{tmp_path / 'state' / 'callbridge.db'}"}
    return load_settings(environ={}, **{**values, **overrides})


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Services this test made; each stopped at its end (stop() after a refused start must be harmless)."""
    made: list[Service] = []
    yield made
    for service in made:
        service.stop()


def test_a_second_daemon_on_one_sqlite_store_is_refused_and_a_stopped_one_lets_go(
        tmp_path: Path, services: list[Service]) -> None:
    """In one process (the tests start services one after another): the lock ends with stop(), not with the
    process. (A second daemon's own start, refused with nothing touched: test_daemon_restart.py.)"""
    settings = service_settings(tmp_path)
    first = Service(settings)
    services.append(first)
    first.start()
    store = database_file(settings.database_url)
    message = (rf"^another daemon \(pid {os.getpid()}, instance {re.escape(first.instance_id)}, since "
               rf"\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ\) runs on this store \({re.escape(str(store))}\): stop it "
               r"first, or give this one its own state_dir$")
    with pytest.raises(AlreadyRunning, match=message):
        Instance(settings, "another").acquire()
    first.stop()
    services.remove(first)
    again = Service(settings)
    services.append(again)
    again.start()
    with pytest.raises(AlreadyRunning, match=re.escape(f"instance {again.instance_id}, since ")):
        Instance(settings, "another").acquire()


def test_a_start_that_fails_lets_go_of_the_store(tmp_path: Path, services: list[Service]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        failing = Service(service_settings(tmp_path, http_port=taken.getsockname()[1]))
        services.append(failing)
        with pytest.raises(ListenError):
            failing.start()
    next_one = Service(service_settings(tmp_path))
    services.append(next_one)
    next_one.start()


# -- the instance rows (a shared PostgreSQL) ---------------------------------------------------------------

def in_step_settings(database_url: str, lease_seconds: float = LEASE) -> Settings:
    """Settings of a daemon on the shared store (whose host clock the tests may set apart: Instance's wall)."""
    return load_settings(environ={}, database_url=database_url, lease_seconds=lease_seconds)


def instance_x(database_url: str, lease_seconds: float = LEASE) -> Instance:
    """This daemon's hold on instance_id 'node-x' of the shared store."""
    return Instance(in_step_settings(database_url, lease_seconds), "node-x")


def leave_row(*, boot_id: str = "a-boot-of-another-machine", host: str = "elsewhere", pid: int = 4242,
              seen_ago: float = 0.0, run_id: str = "their-run") -> None:
    """A row as another run of instance_id 'node-x' leaves it, seen ``seen_ago`` seconds ago (server clock)."""
    database.execute_sql(
        "INSERT INTO instances (instance_id, run_id, host, boot_id, pid, started_at, seen_at) VALUES "
        "('node-x', %s, %s, %s, %s, now() AT TIME ZONE 'UTC', now() AT TIME ZONE 'UTC' - make_interval(secs => %s))",
        (run_id, host, boot_id, pid, seen_ago))


def row() -> tuple[Any, ...] | None:
    found: tuple[Any, ...] | None = database.execute_sql(
        "SELECT run_id, host, pid, seen_at, now() AT TIME ZONE 'UTC' FROM instances "
        "WHERE instance_id = 'node-x'").fetchone()
    return found


def keep_renewing() -> gevent.Greenlet:
    """The row's run is alive: it renews the row every fifth of a second."""
    def renew() -> None:
        while True:
            database.execute_sql("UPDATE instances SET seen_at = now() AT TIME ZONE 'UTC' WHERE instance_id = 'node-x'")
            gevent.sleep(0.2)

    return gevent.spawn(renew)


@pytest.mark.stores("postgresql")
def test_a_row_another_machine_renewed_lately_is_waited_for_then_taken_over_once_stale(
        db: Database, database_url: str) -> None:
    leave_row()
    before = row()
    assert before is not None
    instance = instance_x(database_url)
    instance.acquire()
    after = row()
    assert after is not None and after[0] == instance.run_id and after[2] == os.getpid()
    # Taken once it was older than the lease by the server's clock, not before.
    assert (after[3] - before[3]).total_seconds() >= LEASE
    instance.release()
    assert row() is None


@pytest.mark.stores("postgresql")
def test_a_row_something_keeps_renewing_refuses_the_start(db: Database, database_url: str) -> None:
    leave_row()
    renewer = keep_renewing()
    try:
        instance = instance_x(database_url)
        started = time.monotonic()
        with pytest.raises(AlreadyRunning, match=r"^instance_id 'node-x' is in use by a running daemon \(host "
                                                 r"elsewhere, pid 4242, seen \d+ s ago\): give each daemon its own "
                                                 r"instance_id$"):
            instance.acquire()
        assert time.monotonic() - started < LEASE  # refused as soon as the row was renewed
    finally:
        renewer.kill()
    current = row()
    assert current is not None and current[0] == "their-run"  # left as it was


@pytest.mark.stores("postgresql")
def test_a_row_of_a_run_that_died_on_this_machine_is_taken_over_at_once(db: Database, database_url: str) -> None:
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    leave_row(boot_id=read_boot_id(), host=socket.gethostname(), pid=gone.pid)
    instance = instance_x(database_url, lease_seconds=300.0)
    instance.acquire()  # at once: a wait would last the lease, 300 s (past the test's timeout)
    current = row()
    assert current is not None and current[0] == instance.run_id


@pytest.mark.stores("postgresql")
def test_of_two_starting_together_on_a_stale_row_one_wins_and_the_other_refuses(
        db: Database, database_url: str) -> None:
    leave_row(seen_ago=2 * LEASE)
    instances = [instance_x(database_url) for _ in range(2)]
    renewing: list[gevent.Greenlet] = []

    def renew(instance: Instance) -> None:
        while instance.renew():
            gevent.sleep(0.2)

    def start(instance: Instance) -> None:
        instance.acquire()
        renewing.append(gevent.spawn(renew, instance))  # the winner runs on: it renews its row

    starts = [gevent.spawn(start, instance) for instance in instances]
    gevent.joinall(starts, timeout=30)
    try:
        assert all(g.dead for g in starts)
        refused = [g for g in starts if isinstance(g.exception, AlreadyRunning)]
        assert len(refused) == 1 and len([g for g in starts if g.successful()]) == 1, [g.exception for g in starts]
        winner = instances[starts.index(next(g for g in starts if g.successful()))]
        current = row()
        assert current is not None and current[0] == winner.run_id
    finally:
        gevent.killall(renewing)


@pytest.mark.stores("postgresql")
def test_a_renewal_tells_a_run_whose_row_was_taken_over_and_its_release_leaves_the_row(
        db: Database, database_url: str) -> None:
    instance = instance_x(database_url)
    instance.acquire()
    assert instance.renew()
    database.execute_sql("UPDATE instances SET run_id = 'another-run' WHERE instance_id = 'node-x'")
    assert not instance.renew() and instance.lost
    instance.release()
    current = row()
    assert current is not None and current[0] == "another-run"


@pytest.mark.stores("postgresql")
def test_a_renewal_measures_this_hosts_clock_against_the_database_servers(db: Database, database_url: str) -> None:
    in_step = instance_x(database_url)
    assert in_step.clock_offset is None
    in_step.acquire()  # known from the start, before the calls left in flight are judged
    assert in_step.clock_offset is not None and abs(in_step.clock_offset) < 1.0  # the server runs on this host
    in_step.release()
    host_behind = [42.0]
    behind = Instance(in_step_settings(database_url), "node-x", wall=lambda: time.time() - host_behind[0])
    behind.acquire()
    assert behind.clock_offset is not None and 41.0 < behind.clock_offset < 43.0
    host_behind[0] = -7.0  # the host's clock stepped (NTP): the next renewal knows
    assert behind.renew()
    assert -8.0 < behind.clock_offset < -6.0
    behind.release()


@pytest.mark.stores("postgresql")
def test_the_lease_keeper_follows_the_servers_clock_and_says_once_when_the_host_is_off_and_once_back(
        db: Database, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """The leases follow the server's clock whatever the host's (test_leases.py), but the rest of the daemon
    runs by the host's: scheduled calls start by it, timelines are stamped with it."""
    host_behind = [6.0]
    settings = in_step_settings(database_url, lease_seconds=30.0)
    instance = Instance(settings, "node-x", wall=lambda: time.time() - host_behind[0])
    instance.acquire()
    records = CallRecords(Metrics(), owner="node-x", lease_seconds=30.0)
    keeper = Leases(settings, AdoptingEngine(), records, instance=instance)  # type: ignore[arg-type]

    def offset() -> float:
        return float(records.metrics.registry.get_sample_value("callbridge_clock_offset_seconds") or 0.0)

    def logged(event: str) -> list[logging.LogRecord]:
        return [record for record in caplog.records if record.getMessage() == event]

    try:
        with caplog.at_level(logging.INFO, logger="callbridge.leases"):
            keeper.tick(utcnow())
            keeper.tick(utcnow())
            assert 5.0 < offset() < 7.0
            assert 5.0 < records.clock_offset.total_seconds() < 7.0  # the leases' time from now on
            [skew] = logged("clock.skew")  # once while it lasts, not at every renewal
            assert skew.levelno == logging.WARNING and skew.tolerance_seconds == 2.0  # type: ignore[attr-defined]
            host_behind[0] = 1.0
            keeper.tick(utcnow())
            keeper.tick(utcnow())
            assert 0.0 < offset() < 2.0
            assert len(logged("clock.in_step")) == 1 and len(logged("clock.skew")) == 1
    finally:
        instance.release()
