"""Several switches: complete calls per second with one daemon and one switch, one daemon and two switches,
and two daemons sharing one PostgreSQL and both switches.

Each switch is a stand-in process (``bench.switch``); each daemon is ``python -m daemon run`` with
``CALLBRIDGE_SWITCHES`` naming every switch. Once the daemons are ready, ``n`` calls (A answers, a 1 s
prompt, dialtone, B answers, bridge, B hangs up, A follows) are written as ``scheduled`` rows due two
seconds later (written before a start, a second daemon would adopt the first one's calls in flight:
ownership is the leases work), with no operator's cap and ``max_in_flight`` 200 per daemon. Completed calls
per second between 10 % and 90 % of those completed, from the daemons' ``GET /metrics`` summed.

Two sizes of switch, since what a second switch buys depends on what held the first one back:

* FreeSWITCH's default limits (30 sessions a second, 1000 at once): the switch is the ceiling (13 new
  calls a second each, the other half of its budget kept for the B legs), so a second one should
  nearly double it;
* a big switch (limits far above what a daemon sends): the daemon is the ceiling. On a 2-core machine
  the stand-ins (one Python process each) share the cores with the daemons, so these figures say what
  the box can do, not what more hardware would; no target.

The share of calls each switch took is read from the calls' ``switch`` column.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections import Counter
from pathlib import Path

from bench.common import Daemon, Switch, cpu_seconds, insert_calls, postgres, tone_file, wait_until, workdir
from bench.engine import _rate_between
from bench.report import Report

SCALE = 0.05  # plan seconds -> real: A (15550000xxx) stays up 15 s, B (15550006xxx) 0.1 s after answer
DEFAULT_SPS, DEFAULT_MAX_SESSIONS = 30, 1000  # FreeSWITCH's switch.conf.xml defaults
MAX_IN_FLIGHT = 200  # per daemon, as the engine section
COMPLETED = 'callbridge_calls_finished_total{cause="NORMAL_CLEARING",status="completed"}'
LEAD = 2.0  # seconds between writing the calls and their due time


def write_calls(url: str, endpoint_id: int, prompt: str, dialtone: str, n: int) -> None:
    due = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(seconds=LEAD)
    insert_calls(url, endpoint_id, [{"phone_a": f"15550000{i % 1000:03d}", "phone_b": f"15550006{i % 1000:03d}",
                                     "play_file": prompt, "dialtone_file": dialtone, "status": "scheduled",
                                     "scheduled": True, "due_at": due} for i in range(n)])


def outcome(url: str) -> tuple[Counter[str], int]:
    """(calls per switch, calls completed)."""
    from daemon.store import Call, close_database, open_database

    db = open_database(url)
    try:
        spread = Counter(str(call.switch) for call in Call.select(Call.switch))
        return spread, Call.select().where(Call.status == "completed").count()
    finally:
        close_database(db)


def throughput(folder: Path, switches: list[Switch], n: int, daemons: int, url: str) -> dict[str, object]:
    names = ",".join(f"127.0.0.1:{sw.port}:ClueCon" for sw in switches)
    for i in range(daemons):
        (folder / f"d{i}").mkdir()
    # One state folder for every daemon (one host): the prompts the calls name are in its media cache.
    state = folder / "d0" / "state"
    started = [Daemon(folder / f"d{i}", switches[0].port, max_in_flight=MAX_IN_FLIGHT, switches=names,
                      database_url=url or f"sqlite:///{state / 'callbridge.db'}", state_dir=state)
               for i in range(daemons)]
    url = started[0].env["CALLBRIDGE_DATABASE_URL"]
    endpoint = started[0].add_endpoint()
    media = state / "media"
    prompt = tone_file(media, 1.0, 523.0)
    dialtone = tone_file(media, 1.5, 700.0)
    marks: list[tuple[float, float]] = []
    refused = [0.0]
    try:
        for daemon in started:
            daemon.start()
        write_calls(url, endpoint["id"], prompt, dialtone, n)
        cpu0, wall0 = sum(cpu_seconds(d.pid) for d in started), time.perf_counter()

        def finished() -> bool:
            figures = [d.metrics() for d in started]
            marks.append((time.perf_counter(), sum(f.get(COMPLETED, 0.0) for f in figures)))
            refused[0] = sum(f.get("callbridge_switch_throttled_total", 0.0) for f in figures)
            return sum(f.get("callbridge_calls_finished_total", 0.0) for f in figures) >= n

        wait_until(finished, timeout=max(120.0, n / 3), interval=0.1)
        cpu = (sum(cpu_seconds(d.pid) for d in started) - cpu0) / (time.perf_counter() - wall0)
    finally:
        for daemon in started:
            daemon.stop()
    spread, completed = outcome(url)
    return {"rate": _rate_between(marks, 0.1 * completed, 0.9 * completed), "cpu": cpu, "completed": completed,
            "spread": ", ".join(str(count) for _, count in sorted(spread.items())), "refused": int(refused[0])}


def run(report: Report, full: bool) -> None:
    sizes: list[tuple[str, dict[str, int], int]] = [
        ("FreeSWITCH's default limits", {"sps": DEFAULT_SPS, "max_sessions": DEFAULT_MAX_SESSIONS},
         800 if full else 400),
        ("a big switch", {}, 3000 if full else 1500),
    ]
    setups = [(1, 1, "SQLite"), (1, 2, "SQLite"), (2, 2, "PostgreSQL")]
    for label, limits, n in sizes:
        one: float | None = None
        for daemons, count, store in setups:
            with workdir(f"switches{daemons}{count}") as folder, \
                    (postgres() if store == "PostgreSQL" else contextlib.nullcontext("")) as url:
                switches = [Switch(SCALE, folder / f"standin{i}.log", **limits) for i in range(count)]
                try:
                    got = throughput(folder, switches, n, daemons, url)
                finally:
                    for sw in switches:
                        sw.stop()
            rate = float(got["rate"])  # type: ignore[arg-type]
            name = f"{label}: {daemons} daemon{'s' * (daemons > 1)} + {count} switch{'es' * (count > 1)} ({store})"
            size = (f"{n} calls, {got['completed']} completed, max_in_flight {MAX_IN_FLIGHT} per daemon, calls per "
                    f"switch {got['spread']}, legs refused by a switch {got['refused']}, daemons' CPU {100 * float(got['cpu']):.0f}% of a core")  # type: ignore[arg-type]
            if one is None:
                one = rate
                report.add("switches", name, rate, "calls/s", size=size)
            elif limits:
                # The switch is the ceiling: a second one should nearly double it.
                report.add("switches", name, rate, "calls/s", reference=one, reference_name="1 + 1",
                           target=">= 1.6 x 1 + 1", ok=bool(rate >= 1.6 * one > 0), size=size)
            else:
                report.add("switches", name, rate, "calls/s", reference=one, reference_name="1 + 1", size=size,
                           note="the stand-ins share the machine's cores with the daemons")
