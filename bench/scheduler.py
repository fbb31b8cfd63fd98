"""Scheduler lateness (issue 6): calls due in the same second, and calls spread over a minute.

The rows are written as ``scheduled`` before ``python -m daemon run`` starts (a fresh daemon and
stand-in per case), due a few seconds after it is ready. The per-second cap is lifted; the other limits
are the production defaults (``max_in_flight`` 200). Calls: A 15550000xxx, B 15550006xxx (B hangs up
0.1 s after answering at this time scale, so slots free quickly).

Two figures per case:
* ``lateness_ms`` as the daemon records it on each call (claim time minus due time);
* dial lateness: when the call's ``bgapi originate`` reached the switch (``bench.switch`` tap, wall
  clock) minus its due time: what the person waiting for the call sees.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from bench.common import Daemon, Switch, insert_calls, percentile, read_calls, wait_until, workdir
from bench.report import Report

SCALE = 0.05
LEAD = 6.0  # seconds between writing the rows and the first due time (daemon start fits in it)
EPOCH = dt.datetime(1970, 1, 1)


def _case(report: Report, folder: Path, name: str, n: int, spread: float) -> None:
    switch = Switch(SCALE, folder / "standin.log")
    daemon = Daemon(folder, switch.port, max_in_flight=200)
    try:
        endpoint = daemon.add_endpoint()
        first_due = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=LEAD)
        insert_calls(
            daemon.database,
            endpoint["id"],
            [
                {
                    "phone_a": f"15550000{i % 1000:03d}",
                    "phone_b": f"15550006{i % 1000:03d}",
                    "status": "scheduled",
                    "scheduled": True,
                    "due_at": first_due + dt.timedelta(seconds=spread * i / n),
                }
                for i in range(n)
            ],
        )
        daemon.start()
        started = time.monotonic()

        def all_started() -> bool:
            rows = read_calls(daemon.database, "count(*)", "status IN ('scheduled', 'queued')")
            return int(rows[0][0]) == 0

        done = wait_until(all_started, timeout=LEAD + spread + 240, interval=0.5)
        waited = time.monotonic() - started
        # A claimed call's originate may still wait for its turn on the Event Socket.
        wait_until(lambda: len(switch.tap()["a"]) >= n, timeout=30, interval=1.0)
        rows = read_calls(daemon.database, "a_uuid, due_at, lateness_ms, status, reason")
        tap = switch.tap()["a"]
    finally:
        daemon.stop()
        switch.stop()

    recorded = [float(r[2]) for r in rows if r[2] is not None]
    dialed = []
    for a_uuid, due_at, _lateness, _status, _reason in rows:
        leg = tap.get(a_uuid or "")
        if leg and leg.get("originate_wall"):
            due = (dt.datetime.fromisoformat(due_at) - EPOCH).total_seconds()
            dialed.append(max(0.0, (leg["originate_wall"] - due) * 1000))
    failed = [r for r in rows if r[3] == "failed"]
    reasons = sorted({str(r[4])[:60] for r in failed})
    size = (
        f"{len(recorded)}/{n} started{'' if done else ' (gave up waiting)'} in {waited:.0f} s; "
        f"{len(failed)} failed{': ' + '; '.join(reasons) if reasons else ''}"
    )
    report.add(
        "scheduler", f"{name}: lateness_ms median (recorded)", percentile(recorded, 50), "ms", size=size
    )
    p99 = percentile(recorded, 99)
    report.add(
        "scheduler",
        f"{name}: lateness_ms p99 (recorded)",
        p99,
        "ms",
        target="<= 1000 ms (issue 6)",
        ok=p99 <= 1000,
    )
    report.add("scheduler", f"{name}: lateness_ms max (recorded)", max(recorded, default=float("nan")), "ms")
    report.add(
        "scheduler",
        f"{name}: dial lateness median / p99 / max (at the switch)",
        percentile(dialed, 50),
        "ms",
        size=f"p99 {percentile(dialed, 99):.0f} ms, max "
        f"{max(dialed, default=float('nan')):.0f} ms over {len(dialed)} originates",
    )


def run(report: Report, full: bool) -> None:
    spread_n = 10_000 if full else 2_500
    with workdir("scheduler-burst") as folder:
        _case(report, folder, "1,000 due in the same second", 1000, 0.0)
    with workdir("scheduler-spread") as folder:
        _case(report, folder, f"{spread_n:,} spread over a minute", spread_n, 60.0)
