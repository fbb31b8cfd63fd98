"""Engine throughput against the pipe limit and a naive click-to-call, all through one stand-in.

* pipe limit: one bare ``greenswitch.InboundESL`` client keeps ``window`` originates outstanding:
  ``bgapi originate {origination_uuid=U}sofia/gateway/carrier/<n> &park()`` and waits for U's
  CHANNEL_ANSWER, nothing else. Answered originates per second.
* naive baseline: what people commonly write: per call a new greenswitch connection, a blocking
  ``api originate`` for A, then for B, then ``api uuid_bridge A B`` (``workers`` calls at a time).
  The connection is closed without waiting on greenswitch's own 1 s event-loop timeout in ``stop()``.
* bare client's CPU per message: this process's CPU during the pipe limit run, per Event Socket message
  (each originate is three: the command, its reply, the CHANNEL_ANSWER); times the messages a complete call
  exchanges (``callbridge_esl_messages_total``), it is what the call's Event Socket traffic alone costs a
  Python client that does nothing else: the floor under the daemon's CPU per call.
* the stack's floor per call (run after the engine): a complete call's commands and events (A's
  originate, A's steps in one write once A answers, the wait's ``uuid_break``, both hangups) through the
  daemon's own Event Socket connection (``daemon.switch.esl.EslConnection``, its event filters, a greenlet
  per call) and nothing else: no store, no limits, no timeline, no metrics. This process's CPU per call
  bridged; what is left of the 2 ms target above it is all the daemon may spend on everything else, the
  store's commits included.
* the store's floor per call (after the engine): the engine run's own completed calls replayed into a
  copy of its SQLite store through ``sqlite3`` alone, each call's writes in one durable commit (the daemon
  commits about one group a call): every timeline step inserted as it was written, the call's row
  updated at each step that changed it (the step's detail holds the columns), the day's count added to
  at its claim and the look for a hangup asked for before A's originate. This process's CPU per call, the fsync's system time included; no reads (the
  dispatcher's, the claims'), no models, no writer thread.
* engine: ``n`` calls (A answers, a 1 s prompt, dialtone, B answers, bridge, B hangs up, A follows)
  written as ``queued`` rows before ``python -m daemon run`` starts with the per-second cap lifted and
  the production ``max_in_flight``; completed calls per second between 10 % and 90 % of them, counted
  from ``GET /metrics`` (``callbridge_calls_finished_total``).
"""

from __future__ import annotations

import collections
import contextlib
import json
import resource
import sqlite3
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.queue
from greenswitch import InboundESL

from bench.common import (
    DIAL,
    HOST,
    Daemon,
    Switch,
    cpu_times,
    insert_calls,
    tone_file,
    wait_until,
    workdir,
)
from bench.report import Report
from daemon.calls.records import DIAL_MARK, HANGUP_REQUESTED
from daemon.store import IN_FLIGHT_STATUSES, PENDING_STATUSES, CallStatus
from daemon.switch import commands as fs
from daemon.switch.esl import EslConnection, EslEvent
from daemon.switch.link import EVENTS, IGNORED_APPS

# The timeline steps written with a change of the call's row, and the status each leaves it in (CallRecords).
MOVES = {"claimed": "dialing_a", **{status.value: status.value for status in CallStatus
                                    if status not in (CallStatus.DIALING_A, *PENDING_STATUSES)}}

SCALE = 0.05  # plan seconds -> real: A (15550000xxx) stays up 15 s, B (15550006xxx) 0.1 s after answer


def _dial(number: str) -> str:
    return DIAL.replace("{number}", number)


def _close(esl: InboundESL) -> None:
    """Close a greenswitch connection at once (its stop() waits up to 1 s on its event loop)."""
    esl._run = False
    esl.connected = False
    with contextlib.suppress(Exception):
        esl.sock.close()
    for g in (esl._receive_events_greenlet, esl._process_events_greenlet):
        if g is not None:
            g.kill(block=False)


MESSAGES_PER_ORIGINATE = 3  # the pipe limit's client: bgapi sent, its reply and CHANNEL_ANSWER received


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pipe_limit(port: int, n: int, window: int) -> tuple[float, int, float]:
    """Answered ``bgapi originate`` per second with ``window`` outstanding; (rate, answered, this process's
    CPU seconds meanwhile)."""
    esl = InboundESL(HOST, port, "ClueCon")
    esl.connect()
    waiting: dict[str, gevent.event.Event] = {}

    def on_answer(event: Any) -> None:
        done = waiting.pop(event.headers.get("Unique-ID", ""), None)
        if done is not None:
            done.set()

    esl.register_handle("CHANNEL_ANSWER", on_answer)
    reply = esl.send("event plain CHANNEL_ANSWER")
    if not str(reply.headers.get("Reply-Text", "")).startswith("+OK"):
        raise RuntimeError(f"event subscription refused: {reply.headers}")
    issued = [0]
    answered = [0]

    def worker() -> None:
        while issued[0] < n:
            i = issued[0]
            issued[0] += 1
            leg = str(uuidlib.uuid4())
            done = waiting[leg] = gevent.event.Event()
            reply = esl.send(
                f"bgapi originate {{origination_uuid={leg}}}{_dial(f'15550006{i % 1000:03d}')} &park()"
            )
            if not str(reply.data).startswith("+OK"):
                waiting.pop(leg, None)
                continue
            if done.wait(timeout=30):
                answered[0] += 1

    started, cpu = time.perf_counter(), _own_cpu()
    gevent.joinall([gevent.spawn(worker) for _ in range(window)], raise_error=True)
    elapsed, cpu = time.perf_counter() - started, _own_cpu() - cpu
    _close(esl)
    return answered[0] / elapsed, answered[0], cpu


def stack_floor(port: int, n: int, window: int, prompt: str, dialtone: str) -> tuple[int, float]:
    """``n`` calls as the daemon places them, through its Event Socket connection alone; (calls bridged,
    this process's CPU seconds meanwhile)."""
    routes: dict[str, gevent.queue.Queue[EslEvent]] = {}

    def on_event(event: EslEvent) -> None:
        key = event.get("Job-UUID") if event.name == "BACKGROUND_JOB" else event.uuid
        inbox = routes.get(key or "")
        if inbox is not None:
            inbox.put(event)

    esl = EslConnection(HOST, port, "ClueCon", connect_timeout=10, command_timeout=30, on_event=on_event)
    esl.connect()
    for line in fs.event_filters(EVENTS, ignored_apps=IGNORED_APPS):
        esl.command(line)
    esl.command(fs.event_subscription(EVENTS))
    bridged = [0]
    room = gevent.lock.BoundedSemaphore(window)

    def leg_variables(leg: str, callid: str) -> dict[str, str | int | bool]:
        return fs.leg_variables(leg_uuid=leg, callid=callid, caller_id_number="15551230000", caller_id_name="",
                                originate_timeout=60)

    def one(i: int) -> None:
        a, b, job, wait, wait_again = (str(uuidlib.uuid4()) for _ in range(5))
        inbox: gevent.queue.Queue[EslEvent] = gevent.queue.Queue()
        routes.update({a: inbox, b: inbox, job: inbox})
        try:
            callid = uuidlib.uuid4().hex[:28]
            variables = leg_variables(a, callid)
            variables.update({"hangup_after_bridge": True, "continue_on_fail": True, "instant_ringback": True})
            esl.bgapi(fs.originate_a(template=DIAL, phone=f"15550000{i % 1000:03d}", variables=variables), job)
            gone: set[str] = set()
            broken = False
            while len(gone) < 2:
                event = inbox.get(timeout=60)
                if event.name == "BACKGROUND_JOB" and event.body.startswith("-ERR"):
                    return
                if event.name == "CHANNEL_ANSWER" and event.uuid == a:
                    bridge = fs.bridge_target(template=DIAL, phone=f"15550006{i % 1000:03d}",
                                              variables=leg_variables(b, callid))
                    steps = [("multiset", fs.multiset_arg({"ringback": dialtone}), None, None),
                             ("sched_hangup", "+3600 ALLOTTED_TIMEOUT", None, None),
                             ("playback", prompt, None, None), ("playback", dialtone, wait, -1),
                             ("bridge", bridge, None, None), ("playback", dialtone, wait_again, -1)]
                    esl.send_messages([fs.sendmsg_execute(a, app, arg, event_uuid=uuid or str(uuidlib.uuid4()),
                                                          loops=loops) for app, arg, uuid, loops in steps])
                elif event.name == "CHANNEL_EXECUTE" and not broken and event.get("Application-UUID") == wait:
                    broken = True
                    esl.api(fs.uuid_break(a))
                elif event.name == "CHANNEL_BRIDGE":
                    bridged[0] += 1
                elif event.name == "CHANNEL_HANGUP_COMPLETE":
                    gone.add(event.uuid or "")
        finally:
            for key in (a, b, job):
                routes.pop(key, None)
            room.release()

    cpu = _own_cpu()
    calls = []
    for i in range(n):
        room.acquire()
        calls.append(gevent.spawn(one, i))
    gevent.joinall(calls, raise_error=True)
    cpu = _own_cpu() - cpu
    esl.close()
    return bridged[0], cpu


def naive_baseline(port: int, n: int, workers: int) -> tuple[float, int]:
    """Calls per second done the common way; (rate, bridged)."""
    issued = [0]
    bridged = [0]

    def one(i: int) -> bool:
        esl = InboundESL(HOST, port, "ClueCon")
        esl.connect()
        try:
            a, b = str(uuidlib.uuid4()), str(uuidlib.uuid4())
            number = f"{i % 1000:03d}"
            r = esl.send(f"api originate {{origination_uuid={a}}}{_dial('15550006' + number)} &park()")
            if not str(r.data).startswith("+OK"):
                return False
            r = esl.send(f"api originate {{origination_uuid={b}}}{_dial('15550006' + number)} &park()")
            if not str(r.data).startswith("+OK"):
                return False
            r = esl.send(f"api uuid_bridge {a} {b}")
            return str(r.data).startswith("+OK")
        finally:
            with contextlib.suppress(Exception):
                esl.sock.sendall(b"exit\n\n")
            _close(esl)

    def worker() -> None:
        while issued[0] < n:
            i = issued[0]
            issued[0] += 1
            if one(i):
                bridged[0] += 1

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(worker) for _ in range(workers)], raise_error=True)
    elapsed = time.perf_counter() - started
    return bridged[0] / elapsed, bridged[0]


def store_floor(database: Path, scratch: Path) -> tuple[float, int, float]:
    """CPU ms per call of the completed calls' writes replayed into a copy of ``database`` (see the module's
    docstring), the calls replayed, and the statements per call."""
    with contextlib.closing(sqlite3.connect(database)) as source, contextlib.closing(sqlite3.connect(scratch)) as db:
        source.backup(db)
    steps: dict[int, list[tuple[str, str, str]]] = collections.defaultdict(list)
    with contextlib.closing(sqlite3.connect(scratch)) as db:
        columns = {row[1] for row in db.execute('PRAGMA table_info("call")')}
        done = [row[0] for row in db.execute("SELECT id FROM call WHERE status = 'completed' ORDER BY id")]
        for call_id, kind, at, detail in db.execute(
                "SELECT call_id, kind, at, detail FROM callevent ORDER BY id"):
            steps[call_id].append((kind, at, detail))
        endpoint = {row[0]: row[1] for row in db.execute("SELECT id, endpoint_id FROM call")}
    statuses = [status.value for status in (*PENDING_STATUSES, *IN_FLIGHT_STATUSES)]
    condition = f' AND "status" IN ({", ".join("?" * len(statuses))})'
    insert = 'INSERT INTO "callevent" ("call_id", "at", "kind", "detail") VALUES (?, ?, ?, ?)'
    asked = 'SELECT "detail" FROM "callevent" WHERE "call_id" = ? AND "kind" = ? LIMIT 1'
    count = ('INSERT INTO "endpointday" ("endpoint_id", "day", "started") VALUES (?, ?, 1) ON CONFLICT '
             '("endpoint_id", "day") DO UPDATE SET "started" = "endpointday"."started" + 1')
    writes: list[list[tuple[str, tuple[Any, ...]]]] = []
    for call_id in done:
        call: list[tuple[str, tuple[Any, ...]]] = []
        for kind, at, detail in steps[call_id]:
            if kind in MOVES:
                row = {name: value for name, value in (json.loads(detail) if detail else {}).items() if name in columns}
                row["status"] = MOVES[kind]
                sets = ", ".join(f'"{name}" = ?' for name in row)
                call.append((f'UPDATE "call" SET {sets} WHERE "id" = ?{condition}', (*row.values(), call_id, *statuses)))
            elif kind == DIAL_MARK:  # first, whether a hangup was asked for (CallRecords.mark_dialing_a)
                call.append((asked, (call_id, HANGUP_REQUESTED)))
            call.append((insert, (call_id, at, kind, detail)))
            if kind == "claimed":
                call.append((count, (endpoint[call_id], at[:10] + " 00:00:00")))
        writes.append(call)
    db = sqlite3.connect(scratch, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("UPDATE call SET status = 'queued' WHERE status = 'completed'")
        started = resource.getrusage(resource.RUSAGE_SELF)
        for call in writes:
            db.execute("BEGIN IMMEDIATE")
            for sql, params in call:
                db.execute(sql, params).fetchall()
            db.execute("COMMIT")
        ended = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        db.close()
    cpu = (ended.ru_utime - started.ru_utime) + (ended.ru_stime - started.ru_stime)
    calls = max(1, len(writes))
    return 1000 * cpu / calls, len(writes), sum(map(len, writes)) / calls


def engine_throughput(
    folder: Path, switch: Switch, n: int, max_in_flight: int
) -> tuple[float, dict[str, float], Path]:
    """Completed call sequences per second (10 %..90 % of ``n``), the final metrics and the daemon's store."""
    daemon = Daemon(folder, switch.port, max_in_flight=max_in_flight)
    endpoint = daemon.add_endpoint()
    media = folder / "state" / "media"
    prompt = tone_file(media, 1.0, 523.0)
    dialtone = tone_file(media, 1.5, 700.0)
    insert_calls(
        daemon.database,
        endpoint["id"],
        [
            {
                "phone_a": f"15550000{i % 1000:03d}",
                "phone_b": f"15550006{i % 1000:03d}",
                "play_file": prompt,
                "dialtone_file": dialtone,
            }
            for i in range(n)
        ],
    )
    marks: list[tuple[float, float]] = []
    daemon.start()
    (user0, system0), wall0 = cpu_times(daemon.pid), time.perf_counter()
    loop0 = sum(cpu_times(daemon.pid, thread=daemon.pid))
    try:

        def finished() -> bool:
            value = daemon.metrics().get("callbridge_calls_finished_total", 0.0)
            marks.append((time.perf_counter(), value))
            return value >= n

        # Scraped twice a second: often enough for the 10 %..90 % crossing times (interpolated), rarely
        # enough that rendering /metrics (~1 ms) is not a share of the CPU per call measured here.
        wait_until(finished, timeout=max(120.0, n / 5), interval=0.5)
        final = daemon.metrics()
        user, system = cpu_times(daemon.pid)
        loop = sum(cpu_times(daemon.pid, thread=daemon.pid)) - loop0
        user, system = user - user0, system - system0
        # Per complete call, as the row says: a failed call (no B, no bridge) costs less and must not
        # thin the figure out; the finished count is in the row's size column.
        completed = sum(v for k, v in final.items()
                        if k.startswith("callbridge_calls_finished_total{") and 'status="completed"' in k)
        final["bench_completed"] = completed
        calls = max(1.0, completed)
        final["bench_cpu_share"] = (user + system) / (time.perf_counter() - wall0)
        final["bench_cpu_per_call_ms"] = 1000 * (user + system) / calls
        final["bench_system_cpu_per_call_ms"] = 1000 * system / calls
        final["bench_loop_cpu_per_call_ms"] = 1000 * loop / calls
        for direction in ("received", "sent"):
            prefix = f'callbridge_esl_messages_total{{direction="{direction}"'
            final[f"bench_esl_{direction}_per_call"] = sum(v for k, v in final.items() if k.startswith(prefix)) / calls
        final["bench_esl_writes_per_call"] = sum(
            v for k, v in final.items() if k.startswith("callbridge_esl_writes_total{")) / calls
    finally:
        daemon.stop()
    return _rate_between(marks, 0.1 * n, 0.9 * n), final, daemon.database


def _rate_between(marks: list[tuple[float, float]], low: float, high: float) -> float:
    """Completions per second between the moments the count crossed ``low`` and ``high`` (interpolated)."""

    def crossing(level: float) -> float | None:
        for (t0, v0), (t1, v1) in zip(marks, marks[1:], strict=False):
            if v0 < level <= v1:
                return t0 + (t1 - t0) * (level - v0) / (v1 - v0)
        return None

    t_low, t_high = crossing(low), crossing(high)
    if t_low is None or t_high is None or t_high <= t_low:
        return float("nan")
    return (high - low) / (t_high - t_low)


def run(report: Report, full: bool) -> None:
    n_engine = 3000 if full else 1500
    n_pipe = 6000 if full else 3000
    n_naive = 1000 if full else 500
    max_in_flight = 200
    with workdir("engine") as folder:
        switch = Switch(SCALE, folder / "standin.log")
        try:
            limit, answered, client_cpu = pipe_limit(switch.port, n_pipe, window=200)
            report.add(
                "engine",
                "pipe limit: bgapi originate + CHANNEL_ANSWER",
                limit,
                "calls/s",
                size=f"{answered} originates, 200 outstanding, 1 greenswitch connection",
            )
            naive, bridged = naive_baseline(switch.port, n_naive, workers=10)
            report.add(
                "engine",
                "naive baseline: new conn + api originate A, B + uuid_bridge",
                naive,
                "calls/s",
                size=f"{bridged} calls, 10 at a time",
            )
            gevent.sleep(20 * SCALE * 2)  # let the baseline's legs hang up before the engine runs
            rate, final, database = engine_throughput(folder, switch, n_engine, max_in_flight)
            # After the engine: the stand-in it measures against is then as fresh as it ever was.
            media = folder / "floor"
            media.mkdir()
            floor_bridged, floor_cpu = stack_floor(switch.port, n_engine, max_in_flight,
                                                   tone_file(media, 1.0, 523.0), tone_file(media, 1.5, 700.0))
            floor_ms = 1000 * floor_cpu / max(1, floor_bridged)
            report.add(
                "engine",
                "stack floor per call: its commands and events through the daemon's Event Socket connection alone",
                floor_ms,
                "ms",
                size=f"{floor_bridged} of {n_engine} bridged, {max_in_flight} at a time: this process's CPU; "
                "no store, limits, timeline or metrics",
            )
            store_ms, replayed, statements = store_floor(database, folder / "store-floor.db")
            report.add(
                "engine",
                "store floor per call: its writes through sqlite3 alone",
                store_ms,
                "ms",
                size=f"the engine's {replayed} completed calls replayed, {statements:.0f} statements a call in one "
                "durable commit; this process's CPU; no reads, models or writer thread",
            )
            completed = final["bench_completed"]
            size = (
                f"{n_engine} calls, max_in_flight {max_in_flight}, cps cap lifted, "
                f"{completed:.0f} completed / "
                f"{final.get('callbridge_calls_finished_total', 0):.0f} finished, "
                f"daemon CPU {100 * final['bench_cpu_share']:.0f}% of a core"
            )
            report.add(
                "engine",
                "engine: complete call sequences vs pipe limit",
                rate,
                "calls/s",
                reference=limit,
                reference_name="pipe limit",
                target=">= 0.70 x pipe limit",
                ok=bool(rate >= 0.7 * limit > 0),
                size=size,
            )
            report.add(
                "engine",
                "daemon CPU per complete call",
                final["bench_cpu_per_call_ms"],
                "ms",
                reference=floor_ms,
                reference_name="stack floor",
                target="<= 2 ms (issue 12)",
                ok=bool(final["bench_cpu_per_call_ms"] <= 2.0),
                size=f"{completed:.0f} completed of {n_engine}: the daemon's user + system CPU from ready to the "
                f"last one's end; the floors together {floor_ms + store_ms:.2f} ms; "
                f"system {final['bench_system_cpu_per_call_ms']:.2f} ms, "
                f"event loop thread {final['bench_loop_cpu_per_call_ms']:.2f} ms (the rest: other threads, the store's writer)",
            )
            received, sent = final["bench_esl_received_per_call"], final["bench_esl_sent_per_call"]
            per_message_ms = 1000 * client_cpu / max(1, MESSAGES_PER_ORIGINATE * answered)
            report.add(
                "engine",
                "Event Socket messages per complete call",
                received + sent,
                "messages",
                size=f"{received:.1f} received (events, replies), {sent:.1f} sent (commands) in "
                f"{final['bench_esl_writes_per_call']:.1f} writes",
            )
            report.add(
                "engine",
                "bare greenswitch client: CPU per Event Socket message",
                1000 * per_message_ms,
                "us",
                size=f"the pipe limit run: {answered} x {MESSAGES_PER_ORIGINATE} messages, "
                f"{client_cpu:.2f} s CPU",
            )
            report.add(
                "engine",
                "Event Socket floor per call: its messages at the bare client's CPU each",
                (received + sent) * per_message_ms,
                "ms",
                size="what a call's messages alone cost a client that does nothing else (no state, no store); "
                "compare the daemon's CPU per call",
            )
            report.add(
                "engine",
                "engine vs naive baseline",
                rate,
                "calls/s",
                reference=naive,
                reference_name="naive",
                target=">= 10 x naive",
                ok=bool(rate >= 10 * naive > 0),
            )
        finally:
            switch.stop()
