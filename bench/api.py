"""API: ``POST /v1/calls`` per second and latency, against the floor of the stack, in the same run.

For 10 and 50 concurrent keep-alive clients, form-encoded and JSON bodies:
* floor: ``bench.floor`` (bare Flask under gevent.pywsgi, same parsing and envelope, no database);
* scheduled: ``call_date`` tomorrow, so the request is the API and the store only;
* immediate: no ``call_date``, so the engine dials each call while the API takes more (a fresh daemon
  per run, so one run's backlog never slows the next; the stand-in hangs up what is left after it);
* and once more (10 clients, form) with the endpoint at its default limits (5 calls a second, 10 at
  once), as production endpoints are: most of the burst waits queued, read by every dispatcher tick.

The floor runs with Nagle off (``bench.nodelay``), as the daemon's own server does: gevent.pywsgi writes
headers and body in two sends, which otherwise cost every keep-alive answer a 40 ms delayed ACK.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import PY, Daemon, LoadResult, Switch, free_port, load, request_bytes, spawn, stop, workdir
from bench.report import Report

SCALE = 0.05
FLOOR_SHARE = 0.35  # issue 12: POST /v1/calls at 10 clients at least this share of the floor's rate


def _body(token: str, fmt: str, scheduled: bool) -> tuple[bytes, str]:
    fields = {"token": token, "phone_a": "15550000123", "phone_b": "15550006123"}
    if scheduled:
        tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
        fields["call_date"] = tomorrow.strftime("%Y-%m-%d 12:00")
    if fmt == "json":
        return json.dumps(fields).encode(), "application/json"
    return urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"


def _post(port: int, body: bytes, content_type: str) -> Callable[[int], bytes]:
    raw = request_bytes("POST", "/v1/calls", body=body, content_type=content_type, host=f"127.0.0.1:{port}")
    return lambda _n: raw


def _ok(status: int, body: bytes) -> bool:
    return status == 200 and b'"code": 200' in body


def run(report: Report, full: bool) -> None:
    seconds = 10.0 if full else 4.0
    with workdir("api") as folder:
        switch = Switch(SCALE, folder / "standin.log")
        floor_port, floor = _floor(folder)
        scheduled_daemon = Daemon(folder / "scheduled", switch.port)
        (folder / "scheduled").mkdir()
        token = scheduled_daemon.add_endpoint()["token"]
        scheduled_daemon.start()
        floors: dict[str, LoadResult] = {}
        try:
            for clients in (10, 50):
                for fmt in ("form", "json"):
                    size = f"{clients} clients, {fmt}, {seconds:g} s"
                    body, ctype = _body("floor-token", fmt, scheduled=False)
                    base = load(
                        floor_port,
                        _post(floor_port, body, ctype),
                        clients=clients,
                        seconds=seconds,
                        check=_ok,
                    )
                    _add(
                        report, f"floor (bare Flask+gevent) POST, {fmt}, {clients} clients", base, None, size
                    )
                    floors[f"{fmt}-{clients}"] = base

                    body, ctype = _body(token, fmt, scheduled=True)
                    port = scheduled_daemon.http_port
                    ours = load(port, _post(port, body, ctype), clients=clients, seconds=seconds, check=_ok)
                    _add(report, f"POST scheduled (API+store), {fmt}, {clients} clients", ours, base, size)

                    ours, engine = _immediate(folder / f"immediate-{clients}-{fmt}", switch, fmt, clients, seconds)
                    _add(report, f"POST immediate (API+engine), {fmt}, {clients} clients", ours, base,
                         f"{size}; {engine}")
                    switch.api("hupall NORMAL_CLEARING")
            # As production endpoints are by default: their own limits hold most of a burst back, queued.
            size = f"10 clients, form, {seconds:g} s, the endpoint at its defaults (5 calls/s, 10 at once)"
            ours, engine = _immediate(folder / "immediate-held", switch, "form", 10, seconds,
                                      max_in_flight=10, calls_per_second=5)
            _add(report, "POST immediate, a backlog held back by the endpoint's limits, form, 10 clients", ours,
                 floors["form-10"], f"{size}; {engine}", gated=False)
            switch.api("hupall NORMAL_CLEARING")
        finally:
            scheduled_daemon.stop()
            stop(floor)
        switch.stop()


def _floor(folder: Path) -> tuple[int, subprocess.Popen[bytes]]:
    # The floor gets Nagle off too, like the daemon's own server (webapi/server.py ApiServer).
    port = free_port()
    proc = spawn([PY, "-m", "bench.nodelay", "bench.floor", "--port", str(port)], stdout_pipe=True,
                 log=folder / "floor.log")
    assert proc.stdout is not None
    proc.stdout.readline()
    return port, proc


def _immediate(folder: Path, switch: Switch, fmt: str, clients: int, seconds: float,
               **endpoint_options: Any) -> tuple[LoadResult, str]:
    """The load, and how far the engine kept up with it: the API and the engine share the daemon's CPU, so
    an engine that dials more of what was created leaves the API less (and the other way round)."""
    folder.mkdir()
    daemon = Daemon(folder, switch.port)
    token = daemon.add_endpoint(**endpoint_options)["token"]
    daemon.start()
    try:
        body, ctype = _body(token, fmt, scheduled=False)
        port = daemon.http_port
        result = load(port, _post(port, body, ctype), clients=clients, seconds=seconds, check=_ok)
        metrics = daemon.metrics()
        created = metrics.get("callbridge_calls_created_total", 0)
        finished = metrics.get("callbridge_calls_finished_total", 0)
        return result, f"meanwhile the engine finished {finished:.0f} of the {created:.0f} created"
    finally:
        daemon.stop()


def _add(report: Report, name: str, result: LoadResult, floor: LoadResult | None, size: str,
         gated: bool = True) -> None:
    errors = f", {result.errors} errors ({result.first_error[:80]})" if result.errors else ""
    if floor is None:
        report.add("api", f"{name}: rate", result.rate, "req/s", size=size + errors)
        report.add("api", f"{name}: p50 / p99", result.p50, "ms", size=f"p99 {result.p99:.1f} ms")
        return
    gated = gated and result.clients == 10
    report.add(
        "api",
        f"{name}: rate",
        result.rate,
        "req/s",
        reference=floor.rate,
        reference_name="floor",
        target=f">= {FLOOR_SHARE:.2f} x floor (issue 12)" if gated else "",
        ok=(result.rate >= FLOOR_SHARE * floor.rate) if gated else None,
        size=size + errors,
    )
    report.add(
        "api",
        f"{name}: p99",
        result.p99,
        "ms",
        reference=floor.p99,
        reference_name="floor p99",
        target="<= 25 ms (issue 12)" if gated else "",
        ok=(result.p99 <= 25.0) if gated else None,
        size=f"p50 {result.p50:.1f} ms (floor {floor.p50:.1f} ms)",
    )
