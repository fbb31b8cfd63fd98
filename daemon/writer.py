"""The store's writes: on SQLite one writer thread that commits them in groups, so that nothing on the
event loop waits for the disk; on PostgreSQL (and in processes that run no calls) at once, in the caller.

Every write of the daemon goes through :func:`current` (its ``submit``): a function that makes the write
with the models, and how it must be committed:

* ``durable``: the commit waits for the disk (``synchronous=FULL``): an accepted request, a cancel, a
  claim, the mark before A's originate. Otherwise relaxed (``synchronous=NORMAL``): the timeline and
  status steps of calls in progress, the webhook outbox.
* ``fail_fast``: one attempt, its error to the caller at once (a request answers 503). Otherwise a
  locked or full store is waited out: a write somebody waits for for ``retry_for`` seconds, then its
  error; a write nobody waits for (a call's step) until it is written.
* ``wait``: the calling greenlet waits (cooperatively) for the commit and gets the function's result or
  its error; otherwise it goes on at once.
* ``committed``: runs on the loop once the write is committed, with the function's result (status
  listeners, metrics), in the order the writes were submitted.
* ``failed``: for a write nobody waits for, runs with the error that undid it for good (its own error, or
  the writer stopped with it unwritten) instead of the error being only logged; never with ``committed``.
* ``bulk``: the write may take long (many rows): the thread runs it, never the loop.
* ``independent``: the write touches no row a write submitted before it may touch (a new call): it need
  not land after them (on PostgreSQL it then does not wait for the queued ones; see GroupWriter).

:class:`ThreadWriter` (SQLite, the daemon): the writes queue on the loop; all that queued meanwhile make
one group, one transaction (``BEGIN IMMEDIATE``) on the connection of one real OS thread (a
``gevent.threadpool.ThreadPool`` of one: see ``daemon.store.ThreadConnections``), committed there with one
fsync when any write in it is durable. The loop begins the group and runs its first writes itself, for
up to ``LOOP_SHARE`` (a short write takes SQLite microseconds; in the thread each of its statements
waited for the interpreter while the loop ran Python); the thread runs the rest and the commit. A
``bulk`` write (many rows: lease renewals, pruning) and those after it go to the thread. The loop never
waits for a lock: it begins with ``busy_timeout`` 0, and a store another process holds, or a write that
fails on the loop (rolled back there), sends the whole group to the thread, which waits, retries and
isolates as below. Between its begin and the hand-over nothing on the loop yields, so no other greenlet
ever sees the writer's connection; the greenlet that feeds the thread waits for it cooperatively (the
pool hands the result back through the hub's thread-safe wake-up); ESL reading, routing and call
sequences only queue. Nothing of gevent is touched by a write. Writes keep their order (one queue, one
connection), so a call's steps land in the order they happened and a conditional update (a claim
racing a cancel) sees every write queued before it.
A write's own error (an idempotency key taken by a concurrent request) undoes that write alone (the
group runs again with a savepoint per write, a cost only such a group pays); a store-level error
(locked, full, I/O) undoes the group: its fail-fast writes fail, the others go again, first in the
queue, after a pause that doubles up to half a second (cut short when a write somebody waits for
arrives, so that a request is answered at once). A group nobody waits for (steps of calls in
progress) stays open for up to ``LINGER`` so that more join it; one with a durable write (a claim, whose
call is launched once it is committed) does not.

What a crash costs: nothing acknowledged. An API create answers only after its group's commit with
``synchronous=FULL``; a claim and the mark before an originate are committed durably before anything
is sent. Steps queued but not yet committed (the group being written and the next) are lost with the
process, as relaxed commits may lose their last steps at a power cut: the next start adopts the calls
in flight and reconciles each with FreeSWITCH, which writes what became of them.

Reads stay on the loop's own connection (WAL lets them run beside the writer) and see what is
committed. A reader that must see a write waits for it (``wait=True`` or :meth:`flush`).

:class:`GroupWriter` (PostgreSQL, the daemon), whose waits for the server already yield to other
greenlets: the writes that need not be durable and are not ``bulk`` (the timeline and status steps of
calls in progress, the webhook outbox) queue as above and one greenlet commits them in groups, one
relaxed transaction (``synchronous_commit`` off) each. On its own such a step was three round trips to
the server, its sequence waiting for them (``BEGIN`` with the setting, the insert, ``COMMIT``); in a
group it is one, and the sequence waits only when it asked to (a status change on a shared store is also the
check that this daemon still owns the call: its caller must hear the answer). The other writes (durable,
fail-fast, bulk, or inside the caller's transaction) run at once in the caller as below, once the
writes queued before them are committed (unless ``independent``): a write lands after those that came
before it, whichever path each took. A fail-fast write gets one attempt at those too (the store's
refusal of them is its own).

:class:`DirectWriter` (the CLI, the API's tests) runs each write at once in the calling greenlet, in a
transaction of its own or inside the caller's (a PostgreSQL claim round, whose ``committed`` callbacks
run after the round commits).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import gevent
import gevent.event
import gevent.threadpool
from peewee import Database, InterfaceError, OperationalError

from daemon.ops.logs import log_event
from daemon.store import SQLITE_PRAGMAS, database, relaxed_durability

log = logging.getLogger("callbridge.store")

T = TypeVar("T")
Work = Callable[[], Any]
Committed = Callable[[Any], None]
Failed = Callable[[BaseException], None]

RETRY_FIRST = 0.05  # seconds before the first retry of a store-level failure
RETRY_MAX = 0.5  # the writer's pause between retries doubles up to this
MAX_GROUP = 1000  # writes in one transaction at most
# Seconds a group nobody waits for stays open for more writes. Each commit rewrites the WAL pages its
# rows touch (the calls table and its indexes are in most) and hands a group across threads: 0.05 s cut
# the daemon's CPU per complete call by about a tenth against 0.01 s (engine run, 3,000 calls, A/B), and
# more bought nothing. A status change is readable (GET, webhooks) that much later at most.
LINGER = 0.05

# Seconds of a group's writes the loop runs itself before it hands the rest, and the commit, to the thread.
# Run in the thread, each statement waits for the interpreter while the loop runs Python: a create's
# writes took 0.6 ms there against 0.07 ms on the loop (SQLite scheduled creates, 10 clients); the loop's
# own share is bounded so that a large group (a burst's claims, retention) never holds call control long.
LOOP_SHARE = 0.001

# SQLite's primary result codes that say "the store, not this write": wait it out.
# BUSY, LOCKED, NOMEM, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL.
TRANSIENT_SQLITE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})


def is_transient(exc: BaseException) -> bool:
    """A store-level failure that waiting may cure (locked, full, I/O), as opposed to one write's own error."""
    if not isinstance(exc, OperationalError):
        return False
    code = getattr(getattr(exc, "orig", None), "sqlite_errorcode", None)
    return code is None or (code & 0xFF) in TRANSIENT_SQLITE_CODES


class Writer(Protocol):
    def submit(self, work: Work, *, durable: bool, fail_fast: bool = False, wait: bool = False,
               committed: Committed | None = None, failed: Failed | None = None, bulk: bool = False,
               independent: bool = False) -> Any: ...

    def flush(self) -> None: ...

    def probe(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...


class DirectWriter:
    """Each write at once, in the calling greenlet (see the module's docstring)."""

    def __init__(self, retry_for: float = 60.0) -> None:
        self.retry_for = retry_for

    def submit(self, work: Work, *, durable: bool, fail_fast: bool = False, wait: bool = False,
               committed: Committed | None = None, failed: Failed | None = None, bulk: bool = False,
               independent: bool = False) -> Any:
        try:
            return self._submit(work, durable=durable, fail_fast=fail_fast, committed=committed)
        except Exception as exc:
            if wait or failed is None:
                raise
            log_event(log, "store.write_dropped", logging.ERROR, error=f"{type(exc).__name__}: {exc}")
            failed(exc)
            return None

    def _submit(self, work: Work, *, durable: bool, fail_fast: bool, committed: Committed | None) -> Any:
        if database.in_transaction():  # the caller's transaction (a claim round) commits it, or not
            result = work()
            if committed is not None:
                database.after_commit(lambda: committed(result))
            return result
        delay = RETRY_FIRST
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                if durable:
                    with database.atomic():
                        result = work()
                else:
                    with relaxed_durability():
                        result = work()
                break
            except OperationalError as exc:
                if fail_fast or not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                log_event(log, "store.retry", logging.WARNING, error=str(exc), retry_in=delay)
                gevent.sleep(delay)
                delay = min(delay * 2, 2.0)
        if committed is not None:
            committed(result)
        return result

    def flush(self) -> None:
        pass

    def probe(self) -> None:
        """Raise unless the store takes a write now."""
        db = database.obj
        if db.in_transaction():
            return  # a transaction of this process holds it: the store is clearly working
        db.execute_sql("BEGIN IMMEDIATE")
        db.execute_sql("ROLLBACK")

    def stop(self, timeout: float = 10.0) -> None:
        pass


class _Write:
    __slots__ = ("bulk", "committed", "deadline", "durable", "error", "fail_fast", "failed", "result", "value",
                 "work")

    def __init__(self, work: Work, durable: bool, fail_fast: bool, deadline: float | None,
                 result: gevent.event.AsyncResult | None, committed: Committed | None,
                 failed: Failed | None = None, bulk: bool = False) -> None:
        self.work = work
        self.bulk = bulk
        self.durable = durable
        self.fail_fast = fail_fast
        self.deadline = deadline
        self.result = result
        self.committed = committed
        self.failed = failed
        self.value: Any = None
        self.error: BaseException | None = None


class _OwnError(Exception):
    """A write of the group failed by itself (not the store): the group is run again with savepoints."""


class _GroupCommitter:
    """A queue of writes that one greenlet commits in groups, in the order submitted (see the module's
    docstring); how a group is written and committed is the subclass's :meth:`_write_and_commit`."""

    def __init__(self, *, retry_for: float, max_group: int) -> None:
        self.retry_for = retry_for
        self.max_group = max_group
        self.groups = 0  # committed so far (tests, logs)
        self.retries = 0  # groups undone by the store and tried again
        self._queue: collections.deque[_Write] = collections.deque()
        self._ready = gevent.event.Event()  # something queued
        self._urgent = gevent.event.Event()  # a write somebody waits for queued: commit (or retry) now
        self._writing: list[_Write] | None = None  # the group being written now
        self._stopping = False
        self._pump = gevent.spawn(self._run)
        self._pump.name = "store writer"

    def submit(self, work: Work, *, durable: bool, fail_fast: bool = False, wait: bool = False,
               committed: Committed | None = None, failed: Failed | None = None, bulk: bool = False,
               independent: bool = False) -> Any:
        if self._pump.dead:
            raise OperationalError("database: the store's writer is stopped")
        result = gevent.event.AsyncResult() if wait else None
        deadline = time.monotonic() + self.retry_for if wait and not fail_fast else None
        self._queue.append(_Write(work, durable, fail_fast, deadline, result, committed, failed, bulk))
        self._ready.set()
        if wait or fail_fast or durable:  # (a durable write holds something back until it is on disk: a claim)
            self._urgent.set()
        return result.get() if result is not None else None

    def flush(self) -> None:
        """Wait until every write submitted so far is committed (or has failed)."""
        self.submit(lambda: None, durable=False, wait=True)

    def probe(self) -> None:
        """Raise unless the store takes a write now (one attempt: the readiness check)."""
        self.submit(lambda: None, durable=False, fail_fast=True, wait=True)

    def _run(self) -> None:
        delay = RETRY_FIRST
        give_up_at: float | None = None
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._ready.clear()
                self._ready.wait()
                continue
            if not self._urgent.is_set() and not self._stopping and len(self._queue) < self.max_group:
                # Nobody waits for these (steps of calls in progress): let more join this group, unless a
                # write somebody waits for arrives meanwhile. Fewer, larger groups: less CPU per write.
                self._urgent.wait(timeout=LINGER)
            group = [self._queue.popleft() for _ in range(min(self.max_group, len(self._queue)))]
            self._urgent.clear()
            self._writing = group
            failure = self._write_and_commit(group)
            self._writing = None
            if failure is None:
                self.groups += 1
                delay = RETRY_FIRST
                self._finish(group)
                continue
            # Undone whole: the fail-fast writes fail now (503); the others go again, first, after a pause.
            now = time.monotonic()
            again = []
            for write in group:
                if write.fail_fast or (write.deadline is not None and now >= write.deadline):
                    self._fail(write, failure)
                else:
                    again.append(write)
            self._queue.extendleft(reversed(again))
            if not again:
                continue
            self.retries += 1
            if self._stopping:  # stop() bounds this with its own timeout
                give_up_at = give_up_at or now + self.retry_for
                if now >= give_up_at:
                    return
            log_event(log, "store.retry", logging.WARNING, error=str(failure), retry_in=delay,
                      waiting=len(self._queue))
            self._urgent.wait(timeout=delay)
            delay = min(delay * 2, RETRY_MAX)

    def _stop_pump(self, timeout: float) -> None:
        """Let the pump commit what is queued for up to ``timeout`` seconds, then stop it."""
        self._stopping = True
        self._ready.set()
        self._urgent.set()
        self._pump.join(timeout)
        if not self._pump.dead:
            self._pump.kill(block=True, timeout=timeout)

    def _lose(self, writes: list[_Write]) -> None:
        """Writes left unwritten at stop: logged, and those somebody waits for or hears of fail."""
        if not writes:
            return
        log_event(log, "store.writes_lost", logging.ERROR, count=len(writes),
                  note="the store stayed unwritable; the next start reconciles the calls in flight")
        for write in writes:
            if write.result is not None or write.failed is not None:
                self._fail(write, OperationalError("database: the store's writer stopped"))

    def _write_and_commit(self, group: list[_Write]) -> BaseException | None:
        """The group in one transaction: None once committed, else the store's error that undid it whole
        (a write's own error is kept on that write, the others committed)."""
        raise NotImplementedError

    def _finish(self, group: list[_Write]) -> None:
        for write in group:
            if write.error is not None:
                self._fail(write, write.error)
                continue
            if write.result is not None:
                write.result.set(write.value)
            if write.committed is not None:
                try:
                    write.committed(write.value)
                except Exception:
                    log.exception("after-commit action failed")

    @staticmethod
    def _fail(write: _Write, error: BaseException) -> None:
        if write.result is not None:
            write.result.set_exception(error)
            return
        log_event(log, "store.write_dropped", logging.ERROR, error=f"{type(error).__name__}: {error}")
        if write.failed is not None:
            try:
                write.failed(error)
            except Exception:
                log.exception("a failed write's action failed")


class ThreadWriter(_GroupCommitter):
    """SQLite's writes in one real thread, committed in groups (see the module's docstring)."""

    def __init__(self, db: Database, *, retry_for: float = 60.0, max_group: int = MAX_GROUP) -> None:
        self.db = db
        self._pool = gevent.threadpool.ThreadPool(1)
        self._full: bool | None = None  # the thread connection's synchronous setting (None: unknown)
        self._refusal: BaseException | None = None  # the store's error that undid the group being written
        self._outcome: tuple[list[_Write], BaseException | None] | None = None  # the thread's last group, how it ended
        self._connection: Any = None  # the thread's sqlite3 connection, which the loop begins groups on
        # peewee logs each statement at DEBUG: its level, looked up here, is cached, so that the thread
        # does not take the logging module's lock (a gevent lock in a patched process) to find it.
        logging.getLogger("peewee").isEnabledFor(logging.DEBUG)
        super().__init__(retry_for=retry_for, max_group=max_group)

    # -- the loop's side ---------------------------------------------------------------------------
    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued (trying for up to ``timeout`` seconds), then close the thread's connection."""
        self._stop_pump(timeout)
        # A group the thread was still writing when the pump was stopped: its callers hear how it ended
        # once the thread is done with it (the close below runs after it).
        stranded, self._writing = self._writing, None
        self._lose([*self._queue])
        self._queue.clear()
        try:
            self._pool.apply(self._close)
        finally:
            self._pool.kill()
            if stranded is not None:
                self._settle(stranded)

    def _settle(self, group: list[_Write]) -> None:
        """Tell the callers of a group left with the thread at stop() how it ended: committed, or lost."""
        outcome = self._outcome
        if outcome is not None and outcome[0] is group and outcome[1] is None:
            self._finish(group)
            return
        failure = outcome[1] if outcome is not None and outcome[0] is group else None
        log_event(log, "store.writes_lost", logging.ERROR, count=len(group),
                  note="the store refused them as the writer stopped; the next start reconciles the calls in flight")
        for write in group:
            self._fail(write, failure or OperationalError("database: the store's writer stopped"))

    def _write_and_commit(self, group: list[_Write]) -> BaseException | None:
        """The group in one transaction on the writer's connection: its first writes on the loop (up to
        ``LOOP_SHARE``), the rest and the commit in the thread; all of it in the thread when the loop cannot
        take the store's lock at once or a write fails there (the thread's path then decides, as before)."""
        if self._connection is None:
            with contextlib.suppress(Exception):  # (then the thread's path meets the error, and reports it)
                self._connection = self._pool.apply(self.db.connection)
        begun = self._begin_on_loop(group) if self._connection is not None else None
        if begun is None:
            return self._pool.apply(self._commit, (group,))  # type: ignore[no-any-return]
        return self._pool.apply(self._finish_in_thread, (group, begun))  # type: ignore[no-any-return]

    def _begin_on_loop(self, group: list[_Write]) -> int | None:
        """Begin the group's transaction on the writer's connection and run its first writes here; how many
        ran, the transaction left open for the thread; None when nothing is begun (locked by another
        process, or a write failed: rolled back). Nothing here yields: no other greenlet runs while the
        loop's peewee state points at the writer's connection."""
        conn = self._connection
        state = self.db._state  # type: ignore[attr-defined]  # the loop thread's (daemon.store.ThreadConnections)
        saved = (state.conn, state.closed, state.ctx, state.transactions, state.commit_callbacks)
        state.set_connection(conn)
        try:
            self._set_synchronous(any(write.durable for write in group))
            conn.execute("PRAGMA busy_timeout=0")  # the loop never waits for another process's lock
            try:
                self.db.transaction("IMMEDIATE").__enter__()
            finally:
                conn.execute(f"PRAGMA busy_timeout={SQLITE_PRAGMAS['busy_timeout']}")  # the thread's wait
            deadline = time.perf_counter() + LOOP_SHARE
            ran = 0
            for write in group:
                if write.bulk or time.perf_counter() >= deadline:
                    break
                write.value, write.error = None, None
                write.value = write.work()
                ran += 1
            return ran
        except Exception:
            with contextlib.suppress(Exception):  # (none open if the begin failed: nothing to undo)
                conn.execute("ROLLBACK")
            return None
        finally:
            state.conn, state.closed, state.ctx, state.transactions, state.commit_callbacks = saved

    def _set_synchronous(self, durable: bool) -> None:
        """The writer's connection commits with ``synchronous=FULL`` for a durable group, else NORMAL."""
        if durable is not self._full:
            self._full = None
            self.db.execute_sql("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            self._full = durable

    # -- the writer thread's side (no gevent, no logging) ------------------------------------------
    def _finish_in_thread(self, group: list[_Write], begun: int) -> BaseException | None:
        """The rest of a group the loop began (its transaction open on this thread's connection) and the
        commit; on any error the whole group again, from the start, by :meth:`_commit`."""
        self.db.push_transaction(_Begun())  # so that a write's nested atomic() is a savepoint
        try:
            for write in group[begun:]:
                write.value, write.error = None, None
                write.value = write.work()
            self.db.execute_sql("COMMIT")
            failed = False
        except Exception:
            failed = True
            with contextlib.suppress(Exception):
                self.db.execute_sql("ROLLBACK")
        finally:
            self.db.pop_transaction()
        if failed:
            return self._commit(group)
        self._outcome = (group, None)
        return None

    def _commit(self, group: list[_Write]) -> BaseException | None:
        """Run the group's writes in order in one transaction; None once committed, else the error that undid
        the whole group (each write's own error is kept on the write)."""
        self._refusal = None
        try:
            self._set_synchronous(any(write.durable for write in group))
            try:
                self._write_group(group, isolated=False)
            except _OwnError:  # rare (a key taken by a concurrent request): again, each write on its own
                self._write_group(group, isolated=True)
        except Exception as exc:
            # the store's own error, should the rollback after it raise another
            self._outcome = (group, self._refusal or exc)
            return self._outcome[1]
        self._outcome = (group, None)
        return None

    def _write_group(self, group: list[_Write], *, isolated: bool) -> None:
        """The group in one transaction. Not ``isolated``: a write's own error undoes the group (_OwnError);
        ``isolated``: each write in a savepoint, so that its error undoes it alone. Two statements per
        write fewer for every group without such an error (the writes run again are written to allow it,
        as for a group the store refused)."""
        with self.db.transaction("IMMEDIATE"):
            conn = self.db.connection()  # the savepoints straight on sqlite3: nothing to build
            for write in group:
                write.value, write.error = None, None
                if isolated:
                    conn.execute("SAVEPOINT w")
                try:
                    write.value = write.work()
                except Exception as exc:
                    if is_transient(exc):
                        self._refusal = exc
                        raise
                    if not isolated:
                        raise _OwnError from exc
                    conn.execute("ROLLBACK TO w")
                    write.error = exc
                if isolated:
                    conn.execute("RELEASE w")

    def _close(self) -> None:
        self._connection = None
        if not self.db.is_closed():
            self.db.close()


class GroupWriter(_GroupCommitter):
    """PostgreSQL's writes in a daemon: those nobody needs on disk at once queue and commit in groups from
    one greenlet, the others run at once in the caller, after what queued before them (see the module's
    docstring)."""

    def __init__(self, *, retry_for: float = 60.0, max_group: int = MAX_GROUP) -> None:
        self._direct = DirectWriter(retry_for)
        super().__init__(retry_for=retry_for, max_group=max_group)

    def submit(self, work: Work, *, durable: bool, fail_fast: bool = False, wait: bool = False,
               committed: Committed | None = None, failed: Failed | None = None, bulk: bool = False,
               independent: bool = False) -> Any:
        in_transaction = database.in_transaction()
        if not (durable or fail_fast or bulk or in_transaction):
            return super().submit(work, durable=False, wait=wait, committed=committed, failed=failed)
        if self._pump.dead:
            raise OperationalError("database: the store's writer is stopped")
        if not (independent or in_transaction) and gevent.getcurrent() is not self._pump:
            self._after_queued(fail_fast)
        return self._direct.submit(work, durable=durable, fail_fast=fail_fast, wait=wait, committed=committed,
                                   failed=failed)

    def _after_queued(self, fail_fast: bool) -> None:
        """Wait for the writes queued so far: a write made at once lands after them, as it came after them
        (a call's refusal by the switch before its next originate's mark: ``unsent_because`` reads that
        order). ``fail_fast``: one attempt at them, whose refusal is this write's."""
        if self._queue or self._writing is not None:
            super().submit(lambda: None, durable=False, fail_fast=fail_fast, wait=True)

    def flush(self) -> None:
        self._after_queued(fail_fast=False)

    def stop(self, timeout: float = 10.0) -> None:
        """Commit what is queued (trying for up to ``timeout`` seconds)."""
        self._stop_pump(timeout)
        lost = [*(self._writing or ()), *self._queue]  # (a group being written when stopped is rolled back)
        self._writing = None
        self._queue.clear()
        self._lose(lost)

    def _write_and_commit(self, group: list[_Write]) -> BaseException | None:
        try:
            try:
                self._write_group(group, isolated=False)
            except _OwnError:  # rare (a row changed by another daemon meanwhile): again, each write on its own
                self._write_group(group, isolated=True)
        except Exception as exc:
            return exc
        return None

    @staticmethod
    def _write_group(group: list[_Write], *, isolated: bool) -> None:
        """The group in one relaxed transaction (``synchronous_commit`` off: nothing in it is durable).
        Not ``isolated``: a write's own error undoes the group (_OwnError); ``isolated``: each write in a
        savepoint, so that its error undoes it alone."""
        with relaxed_durability():
            for write in group:
                write.value, write.error = None, None
                try:
                    if isolated:
                        with database.atomic():
                            write.value = write.work()
                    else:
                        write.value = write.work()
                except Exception as exc:
                    if is_transient(exc) or isinstance(exc, InterfaceError):  # the store's, not this write's
                        raise
                    if not isolated:
                        raise _OwnError from exc
                    write.error = exc


class _Begun:
    """Marks a transaction the loop began, on the writer thread's peewee transaction stack."""


_current: Writer = DirectWriter()


def current() -> Writer:
    """The process's writer: a ThreadWriter while a daemon runs on SQLite, a GroupWriter on PostgreSQL,
    else (the CLI, the API's own tests) a DirectWriter."""
    return _current


def install(writer: Writer) -> Writer:
    """Make ``writer`` the process's writer; returns the one it replaces."""
    global _current
    previous, _current = _current, writer
    return previous


def write(work: Callable[[], T], *, durable: bool = True) -> T:
    """A request's write (the web pages, accounts and endpoints): committed before this returns, one
    attempt (a locked or full store raises OperationalError: the page answers 503)."""
    result: T = _current.submit(work, durable=durable, fail_fast=True, wait=True)
    return result
