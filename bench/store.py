"""Store: ``GET /v1/calls`` (first page, a deep page) and ``POST /v1/calls`` with a million calls stored.

The rows (one endpoint, finished calls of the last months: completed, failed, canceled) are generated
straight into the daemon's SQLite file before it starts: the schema is the daemon's own (made by
``endpoint add``), the call table's indexes are dropped, rows go in with ``executemany`` in big
transactions, and the indexes are made again from their own SQL. Timeline rows are not generated
(the list and create paths do not read them).

Each request is sequential on a new connection (the daemon's own cost; a keep-alive client adds
gevent.pywsgi's 40 ms Nagle stall, see the api section). The deep page starts half-way down the list.
"""

from __future__ import annotations

import datetime as dt
import random
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import Daemon, HttpConn, percentile, request_bytes, workdir
from bench.report import Report
from webapi.validation import encode_id_cursor

STATUSES = ("completed",) * 16 + ("failed",) * 3 + ("canceled",)


def build(database: Path, endpoint_id: int, n: int) -> float:
    """Write ``n`` finished calls; returns the seconds it took."""
    started = time.monotonic()
    con = sqlite3.connect(database, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=OFF")  # the daemon puts WAL back when it opens the file
        con.execute("PRAGMA synchronous=OFF")
        con.execute("PRAGMA cache_size=-262144")
        columns = [row[1] for row in con.execute("PRAGMA table_info(call)") if row[1] != "id"]
        indexes = [
            (name, sql)
            for name, sql in con.execute(
                "SELECT name, sql FROM sqlite_master "
                "WHERE type='index' AND tbl_name='call' AND sql IS NOT NULL"
            )
        ]
        for name, _ in indexes:
            con.execute(f'DROP INDEX "{name}"')
        sql = f"INSERT INTO call ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        con.execute("BEGIN")
        batch: list[tuple[Any, ...]] = []
        for row in _rows(columns, endpoint_id, n):
            batch.append(row)
            if len(batch) >= 50_000:
                con.executemany(sql, batch)
                batch.clear()
        if batch:
            con.executemany(sql, batch)
        con.execute("COMMIT")
        for _, index_sql in indexes:
            con.execute(index_sql)
    finally:
        con.close()
    return time.monotonic() - started


def _rows(columns: list[str], endpoint_id: int, n: int) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(8)
    begin = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=90)
    step = dt.timedelta(days=90) / max(1, n)
    defaults: dict[str, Any] = {name: "" for name in columns}
    defaults.update(
        {
            "endpoint_id": endpoint_id,
            "idempotency_key": None,
            "scheduled": 0,
            "lateness_ms": 3,
            "ring_seconds": None,
            "talk_seconds": None,
            "recording_seconds": None,
            "recording_bytes": None,
            "canceled_at": None,
            "a_uuid": None,
            "b_uuid": None,
        }
    )
    order = list(columns)
    for i in range(n):
        at = begin + step * i
        status = STATUSES[rng.randrange(len(STATUSES))]
        row = dict(defaults)
        row["callid"] = secrets.token_hex(14)
        row["phone_a"] = f"1555000{rng.randrange(10)}{rng.randrange(1000):03d}"
        row["phone_b"] = f"1555000{rng.randrange(10)}{rng.randrange(1000):03d}"
        row["requested_at"] = row["due_at"] = at
        row["status"] = status
        if status == "canceled":
            row["scheduled"] = 1
            row["canceled_at"] = at
            row["canceled_by"] = "bench"
            row["reason"] = "canceled through the API"
            row["started_at"] = row["a_answered_at"] = row["b_dialed_at"] = row["bridged_at"] = None
            row["ended_at"] = None
        else:
            row["a_uuid"], row["b_uuid"] = str(secrets.token_hex(16)), str(secrets.token_hex(16))
            row["started_at"] = at
            row["a_answered_at"] = at + dt.timedelta(seconds=2)
            row["b_dialed_at"] = at + dt.timedelta(seconds=5)
            row["ended_at"] = at + dt.timedelta(seconds=65)
            if status == "completed":
                row["bridged_at"] = at + dt.timedelta(seconds=8)
                row["ring_seconds"], row["talk_seconds"] = 3.0, 57.0
            else:
                row["bridged_at"] = None
                row["failed_leg"], row["b_cause"], row["reason"] = "b", "USER_BUSY", "B was not reached"
        yield tuple(row[c] for c in order)


def _timed(port: int, raw: bytes, count: int) -> tuple[list[float], int]:
    latencies: list[float] = []
    errors = 0
    for _ in range(count):
        t0 = time.perf_counter()
        conn = HttpConn(port)
        try:
            status, body = conn.roundtrip(raw)
        finally:
            conn.close()
        if status == 200 and b'"code": 200' in body:
            latencies.append((time.perf_counter() - t0) * 1000)
        else:
            errors += 1
    return latencies, errors


def run(report: Report, full: bool) -> None:
    n = 1_000_000
    count = 1000 if full else 300
    with workdir("store") as folder:
        daemon = Daemon(folder, 1)  # no FreeSWITCH: the API works without it (readyz says so)
        endpoint = daemon.add_endpoint()
        built = build(daemon.database, endpoint["id"], n)
        size_mib = daemon.database.stat().st_size / 2**20
        daemon.start_unready()
        try:
            token = urllib.parse.quote(endpoint["token"])
            host = f"127.0.0.1:{daemon.http_port}"
            first = request_bytes("GET", f"/v1/calls?token={token}", host=host)
            deep = request_bytes(
                "GET", f"/v1/calls?token={token}&cursor={encode_id_cursor(n // 2)}", host=host
            )
            filtered = request_bytes(
                "GET", f"/v1/calls?token={token}&status=canceled&cursor={encode_id_cursor(n // 2)}", host=host
            )
            tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d 12:00")
            body = urllib.parse.urlencode(
                {
                    "token": endpoint["token"],
                    "phone_a": "15550000123",
                    "phone_b": "15550006123",
                    "call_date": tomorrow,
                }
            ).encode()
            post = request_bytes(
                "POST", "/v1/calls", body=body, content_type="application/x-www-form-urlencoded", host=host
            )
            _timed(daemon.http_port, first, 20)  # warm the page cache as a serving daemon's would be
            size = f"{n:,} calls, {size_mib:.0f} MiB file built in {built:.0f} s; {count} sequential requests"
            for name, raw, target in (
                ("GET /v1/calls first page (50)", first, True),
                ("GET /v1/calls deep page (cursor at the middle)", deep, True),
                ("GET /v1/calls?status=canceled deep page", filtered, False),
                ("POST /v1/calls (scheduled) with the rows present", post, False),
            ):
                latencies, errors = _timed(daemon.http_port, raw, count)
                extra = f", {errors} errors" if errors else ""
                report.add("store", f"{name}: p50", percentile(latencies, 50), "ms", size=size + extra)
                p99 = percentile(latencies, 99)
                report.add(
                    "store",
                    f"{name}: p99",
                    p99,
                    "ms",
                    target="<= 20 ms" if target else "",
                    ok=(p99 <= 20.0) if target else None,
                )
        finally:
            daemon.stop()
