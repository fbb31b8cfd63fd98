"""Scale: 2,000 calls bridged at once in one daemon process.

The calls (A and B both 15550000xxx: answer at once, stay up 300 plan seconds) are written as
``scheduled`` rows due from a few seconds after the daemon starts, ``RAMP_PER_SECOND`` a second (a
rate the engine sustains; all in the same second, most fail with EslTimeout, see the scheduler
section), so its idle RSS is read first. Then:
* RSS with N bridged (VmRSS) and the peak (VmHWM) of the daemon process, RSS per call in flight =
  (RSS with N in flight - RSS idle) / N;
* event reaction: from CHANNEL_ANSWER for A handed to the daemon's socket until the kernel received
  the daemon's first ``sendmsg`` for A (``bench.switch`` tap: the daemon alone, the target's figure); and
  for information through the stand-in's own loop, from ``Channel.answered_at`` (before CHANNEL_ANSWER is
  queued) until the stand-in read that ``sendmsg``. Figures for probe calls placed through the API (10 a
  second) while the N calls are bridged, the same again while 10 keep-alive clients create scheduled
  calls back to back, and, for information, over the ramp in which the N calls were set up.

With ``--full`` the same again on a PostgreSQL started for the run (the store several daemons share).
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.parse

import gevent

from bench.api import _body, _ok
from bench.common import (
    Daemon,
    Switch,
    cpu_seconds,
    http_json,
    insert_calls,
    load,
    percentile,
    postgres,
    request_bytes,
    rss_kib,
    wait_until,
    workdir,
)
from bench.report import Report

SCALE = 0.6  # 300 plan seconds up = 180 s real: time to set 2,000 calls up and probe twice while they stay up
RAMP_PER_SECOND = 30.0


def run(report: Report, full: bool) -> None:
    _run(report, "scale", database_url="")
    if full:
        with postgres() as url:
            _run(report, "scale (PostgreSQL)", database_url=url)


def _run(report: Report, section: str, *, database_url: str) -> None:
    """The section on the daemon's own SQLite, or on the PostgreSQL at ``database_url``."""
    n = 2000
    probes = 300  # a p99 of 300 is the 297th: of 100 (nearest rank) it would be the largest, one outlier
    with workdir("scale") as folder:
        switch = Switch(SCALE, folder / "standin.log")
        store = {"database_url": database_url} if database_url else {}
        daemon = Daemon(folder, switch.port, max_in_flight=n + 2 * probes + 100, **store)
        try:
            endpoint = daemon.add_endpoint()
            due = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=8)
            insert_calls(
                database_url or daemon.database,
                endpoint["id"],
                [
                    {
                        "phone_a": f"15550000{i % 1000:03d}",
                        "phone_b": f"15550000{(i + 500) % 1000:03d}",
                        "status": "scheduled",
                        "scheduled": True,
                        "due_at": due + dt.timedelta(seconds=i / RAMP_PER_SECOND),
                    }
                    for i in range(n)
                ],
            )
            daemon.start()
            token = urllib.parse.quote(endpoint["token"])
            for _ in range(20):  # warm the API and the store a little, as a serving daemon is
                http_json(daemon.http_port, "GET", f"/v1/calls?token={token}&limit=5")
            gevent.sleep(1.0)
            idle_rss, _ = rss_kib(daemon.pid)

            ramp_started = time.monotonic()
            cpu_started = cpu_seconds(daemon.pid)
            bridged = [0.0]

            def all_bridged() -> bool:
                bridged[0] = daemon.metrics().get('callbridge_calls_in_flight{phase="bridged"}', 0.0)
                return bridged[0] >= n

            ramp_due = 8 + n / RAMP_PER_SECOND
            wait_until(all_bridged, timeout=min(300 * SCALE * 0.7, ramp_due + 20), interval=0.5)
            ramp_seconds = time.monotonic() - ramp_started
            ramp_cpu = cpu_seconds(daemon.pid) - cpu_started
            held = int(bridged[0])
            metrics = daemon.metrics()
            in_flight = int(metrics.get("callbridge_calls_in_flight", 0.0))
            failed = int(metrics.get('callbridge_calls_finished_total{cause="",status="failed"}', 0.0))
            rss, _ = rss_kib(daemon.pid)
            ramp_tap = switch.tap()["a"]

            def place_probes(numbers: range, start: float) -> None:
                """One call through the API every 0.1 s, A and B answering at once."""
                for k, i in enumerate(numbers):
                    body = urllib.parse.urlencode(
                        {
                            "token": endpoint["token"],
                            "phone_a": f"15550000{i % 1000:03d}",
                            "phone_b": f"15550000{999 - i % 1000:03d}",
                        }
                    ).encode()
                    http_json(
                        daemon.http_port,
                        "POST",
                        "/v1/calls",
                        body=body,
                        content_type="application/x-www-form-urlencoded",
                    )
                    gevent.sleep(max(0.0, start + (k + 1) * 0.1 - time.monotonic()))

            probe_start = time.monotonic()
            place_probes(range(probes), probe_start)
            wait_until(
                lambda: (
                    daemon.metrics().get('callbridge_calls_in_flight{phase="bridged"}', 0.0) >= held + probes
                ),
                timeout=20,
                interval=0.5,
            )
            rss_after, hwm = rss_kib(daemon.pid)
            tap = switch.tap()["a"]

            # The same probes again while 10 keep-alive clients create (scheduled) calls back to back.
            body, content_type = _body(endpoint["token"], "form", scheduled=True)
            raw = request_bytes("POST", "/v1/calls", body=body, content_type=content_type,
                                host=f"127.0.0.1:{daemon.http_port}")
            creating = gevent.spawn(load, daemon.http_port, lambda _n: raw, clients=10, seconds=probes * 0.1 + 1.0,
                                    warmup=0.5, check=_ok)
            gevent.sleep(0.5)
            busy_start = time.monotonic()
            place_probes(range(probes, 2 * probes), busy_start)
            created = creating.get()
            wait_until(
                lambda: (
                    daemon.metrics().get('callbridge_calls_in_flight{phase="bridged"}', 0.0) >= held + 2 * probes
                ),
                timeout=20,
                interval=0.5,
            )
            busy_tap = switch.tap()["a"]
        finally:
            daemon.stop()
            switch.stop()

    size = (
        f"{held} bridged, {in_flight} in flight of {n}, {failed} failed; due {RAMP_PER_SECOND:g}/s, "
        f"set up in {ramp_seconds:.0f} s, daemon CPU {100 * ramp_cpu / ramp_seconds:.0f}% of a core"
    )
    report.add(section, "calls bridged at once", held, "calls", target=f">= {n}", ok=held >= n, size=size)
    report.add(section, "daemon RSS idle", idle_rss / 1024, "MiB")
    report.add(
        section,
        f"daemon RSS with {in_flight} in flight",
        rss / 1024,
        "MiB",
        size=f"peak (VmHWM) {hwm / 1024:.1f} MiB after {probes} more; VmRSS then {rss_after / 1024:.1f} MiB",
    )
    per_call = (rss - idle_rss) / max(1, in_flight)
    report.add(
        section,
        "RSS per call in flight",
        per_call,
        "KiB",
        target="<= 50 KiB",
        ok=per_call <= 50,
        size=f"({rss / 1024:.1f} - {idle_rss / 1024:.1f} MiB) / {in_flight}",
    )

    def reactions(legs: dict[str, dict[str, float | None]], since: float | None, *,
                  start: str = "answered", end: str = "first_sendmsg") -> list[float]:
        """Milliseconds from ``start`` to ``end`` of the A legs answered at ``since`` or later."""
        out = []
        for leg in legs.values():
            answered, first, last = leg.get("answered"), leg.get(start), leg.get(end)
            if answered is None or first is None or last is None:
                continue
            if since is not None and answered < since:
                continue
            out.append((last - first) * 1000)
        return out

    def daemon_alone(legs: dict[str, dict[str, float | None]], since: float | None) -> list[float]:
        return reactions(legs, since, start="answer_sent", end="sendmsg_received")

    for label, legs, since, busy in (
        (f"probes while {held} bridged", tap, probe_start, False),
        (f"probes while {held} bridged and 10 clients create calls", busy_tap, busy_start, True),
    ):
        alone, through = daemon_alone(legs, since), reactions(legs, since)
        meanwhile = (f"; creates meanwhile {created.rate:.0f}/s, p99 {created.p99:.1f} ms, {created.errors} errors"
                     if busy else "")
        report.add(
            section,
            f"event reaction p99, {label}",
            percentile(alone, 99),
            "ms",
            target=f"<= 5 ms with {n:,} bridged (issue 12)",
            ok=percentile(alone, 99) <= 5.0 and held >= n,
            size=f"p50 {percentile(alone, 50):.2f} ms, max {max(alone, default=float('nan')):.1f} ms, "
            f"{len(alone)} probes at 10/s{meanwhile}",
        )
        report.add(
            section,
            f"  the same through the stand-in's loop, p99, {label}",
            percentile(through, 99),
            "ms",
            size=f"p50 {percentile(through, 50):.2f} ms, max {max(through, default=float('nan')):.1f} ms",
        )
    ramp = reactions(ramp_tap, None)
    ramp_alone = daemon_alone(ramp_tap, None)
    report.add(
        section,
        f"event reaction p50 / p99 over the ramp ({RAMP_PER_SECOND:g} new calls/s)",
        percentile(ramp_alone, 50),
        "ms",
        size=f"p99 {percentile(ramp_alone, 99):.1f} ms over {len(ramp_alone)} calls; through the stand-in's loop "
        f"{percentile(ramp, 50):.1f} / {percentile(ramp, 99):.1f} ms",
    )
