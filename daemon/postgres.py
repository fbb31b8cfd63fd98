"""PostgreSQL under gevent: a small pool whose connections are lent to one greenlet for one statement or
one transaction, then given back.

The driver is psycopg 3. Its connections here (:class:`GreenConnection`) wait for their socket through one
gevent watcher per wait, so a query waiting on the server lets every other greenlet run. (psycopg's own
wait, once gevent has patched ``select`` before psycopg is imported, goes through the patched
``select.poll``: a poll object, its watchers and a timeout built at every wait, about a tenth of a
daemon's CPU on PostgreSQL; it still serves the connection's first handshake.) :func:`check_green`
refuses to start a patched process whose psycopg would block instead.

Why lend per statement: two greenlets must never interleave the statements of two transactions on one
connection (the second would run inside the first's transaction), and a connection per greenlet would
pin one connection to every call in progress for the whole call and leak the connections of greenlets
that die. So a greenlet holds a connection only while it needs one: from ``BEGIN`` to ``COMMIT`` or
``ROLLBACK`` of ``atomic()``, or for one statement outside a transaction, whose rows are read into memory
before the connection goes back (:class:`ReadRows`). ``connect()`` (and ``connection_context()``) still
hold a connection until ``close()``, for work that needs one session (the migrations' advisory lock).
peewee's connection state is greenlet-local here (``gevent.local``), whatever the import order.

At most ``max_connections`` (default 10) per process; a greenlet that finds them all busy waits up to
``timeout`` seconds (default 10) and then gets ``OperationalError`` (the API answers 503, the daemon's
writes retry). Both limits, and any libpq parameter (``sslmode``, ``connect_timeout``,
``application_name``), come from the URL's query string:
``postgresql://callbridge:secret@db:5432/callbridge?max_connections=20``.

The server ends a session left idle inside a transaction for ``idle_in_transaction_timeout`` seconds
(default 10; 0: never). A daemon whose host vanished (power, network) mid-transaction leaves its session
open on the server until TCP gives up, hours later, and with it the locks of its claim round: the
endpoint's row, which every other daemon's round for that endpoint waits on, and the due calls, which
they skip. A daemon's own transactions never idle that long unless its event loop stalled, and one
ended that way rolls back whole (a claim round's calls are launched only after its commit).

A connection the server ended
while it sat in the pool is not lent again (:meth:`GreenPostgresqlDatabase._is_closed`); a read-only
server (a standby, a failover under way) is ``OperationalError`` too.
"""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import gevent
import gevent.local
import psycopg
from gevent.hub import Waiter
from peewee import InternalError, OperationalError, Psycopg3Adapter, _ConnectionState
from peewee import __exception_wrapper__ as driver_errors  # type: ignore[attr-defined]  # peewee's own mapping
from playhouse.db_url import parse
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase
from psycopg.errors import ReadOnlySqlTransaction

SCHEMES = ("postgresql", "postgres")
PING_AFTER_IDLE = 60.0  # seconds
READ_WRITE = 3  # libev's READ | WRITE: the bits of a watcher's events psycopg is told
DEFAULTS: dict[str, Any] = {"max_connections": 10, "timeout": 10, "stale_timeout": 600, "connect_timeout": 10,
                            "application_name": "callbridge", "idle_in_transaction_timeout": 10,
                            # A database host gone silent (power, a failover's old primary) is noticed in
                            # about a minute, not after the kernel's two hours: until then a query waits on it
                            # and with it the dispatcher and the lease renewals.
                            "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
                            "tcp_user_timeout": 60_000}


def is_postgres_url(url: str) -> bool:
    return urlparse(url).scheme in SCHEMES


class _GreenletState(_ConnectionState, gevent.local.local):  # type: ignore[misc]
    """peewee's connection state, one per greenlet; ``lent``: the connection goes back after this use."""

    lent: bool

    def reset(self) -> None:
        super().reset()
        self.lent = False


class ReadRows:
    """A statement's whole result, read before its connection went back to the pool (a DB-API cursor's
    reading half: what peewee uses)."""

    lastrowid = None

    def __init__(self, cursor: Any) -> None:
        self.description = cursor.description
        self.rowcount = cursor.rowcount
        self._rows: Iterator[Any] = iter(cursor.fetchall() if cursor.description is not None else ())
        cursor.close()

    def fetchone(self) -> Any:
        return next(self._rows, None)

    def fetchmany(self, size: int = 1) -> list[Any]:
        return [row for _, row in zip(range(size), self._rows, strict=False)]

    def fetchall(self) -> list[Any]:
        return list(self._rows)

    def __iter__(self) -> Iterator[Any]:
        return self._rows

    def close(self) -> None:
        pass


def _with_idle_timeout(options: str, seconds: float) -> str:
    """libpq's ``options`` (the session's settings) with the server's idle-in-transaction limit added."""
    setting = f"-c idle_in_transaction_session_timeout={int(float(seconds) * 1000)}"
    return f"{options} {setting}".strip()


class GreenConnection(psycopg.Connection):  # type: ignore[type-arg]  # rows as peewee reads them: tuples
    """A psycopg connection whose statements wait for the server through the gevent hub (see above)."""

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is not None:  # only LISTEN's notifies and a cancel after Ctrl-C wait with one: never here
            return super().wait(gen, interval=interval, timeout=timeout)
        return wait_green(gen, self.pgconn.socket)


def wait_green(gen: Any, fileno: int) -> Any:
    """Drive one of psycopg's generators to its end: each step names what it waits for on the socket
    (read, write, or either: selectors' bits, as libev's), and is told what became ready."""
    hub = gevent.get_hub()
    try:
        wanted = next(gen)
        while True:
            watcher = hub.loop.io(fileno, int(wanted))
            waiter = Waiter(hub)
            watcher.start(waiter.switch, pass_events=True)
            try:
                ready = waiter.get() & READ_WRITE
            finally:
                watcher.close()
            if not ready:  # libev's error event: the socket went bad under the watcher
                raise psycopg.OperationalError("the connection's socket closed")
            wanted = gen.send(ready)
    except StopIteration as done:
        return done.value


class _GreenAdapter(Psycopg3Adapter):
    """peewee's psycopg 3 adapter, making :class:`GreenConnection` connections."""

    def connect(self, db: Any, **params: Any) -> GreenConnection:
        if db._encoding:
            params.setdefault("client_encoding", db._encoding)
        params.setdefault("dbname", db.database)
        return GreenConnection.connect(**params)


class GreenPostgresqlDatabase(PooledPostgresqlDatabase):
    """peewee's pooled PostgreSQL database, lending connections per statement or transaction (see above)."""

    psycopg3_adapter = _GreenAdapter

    def __init__(self, database: str, **kwargs: Any) -> None:
        for name, value in DEFAULTS.items():
            kwargs.setdefault(name, value)
        kwargs["options"] = _with_idle_timeout(kwargs.get("options", ""), kwargs.pop("idle_in_transaction_timeout"))
        self._idle_since: dict[int, float] = {}
        super().__init__(database, thread_safe=True, **kwargs)
        self._state = _GreenletState()

    # -- lending --------------------------------------------------------------------------------
    def connect(self, reuse_if_open: bool = False) -> bool:
        try:
            opened: bool = super().connect(reuse_if_open)
        except MaxConnectionsExceeded:
            raise OperationalError(f"database: all {self._max_connections} connections stayed busy for "
                                   f"{self._wait_timeout} s") from None
        return opened

    def cursor(self, named_cursor: Any = None) -> Any:
        if self.is_closed():
            self.connect()
            self._state.lent = True
        return self._state.conn.cursor()

    def _give_back(self) -> None:
        if self._state.lent and not self.in_transaction():
            self.close()

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        try:
            if (not self.is_closed() and not self._state.lent) or self.in_transaction():
                return super().execute_sql(sql, params)  # a connection held on purpose, or a transaction's
            try:
                return ReadRows(super().execute_sql(sql, params))
            finally:
                self._give_back()
        except InternalError as exc:
            if isinstance(getattr(exc, "orig", None), ReadOnlySqlTransaction):  # a standby, or a failover
                raise OperationalError(f"database: read-only: {exc}") from exc  # the API answers 503
            raise

    def begin(self, isolation_level: Any = None, relaxed: bool = False) -> None:
        """``atomic(relaxed=True)``: a transaction whose commit does not wait for the WAL to reach the disk
        (``SET LOCAL synchronous_commit``, sent with the BEGIN: one round trip)."""
        try:
            if relaxed:
                with driver_errors:
                    self.cursor().execute("BEGIN; SET LOCAL synchronous_commit TO off")
            else:
                super().begin(isolation_level)
        except BaseException:
            self._give_back()
            raise

    def commit(self) -> None:
        super().commit()  # on failure the transaction rolls back, which gives the connection back
        waiting = list(self._state.commit_callbacks)  # peewee runs them next; giving back resets the state
        self._give_back()
        self._state.commit_callbacks.extend(waiting)

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._give_back()

    # -- the pool ---------------------------------------------------------------------------------
    def _close(self, conn: Any, close_conn: bool = False) -> None:
        self._idle_since[id(conn)] = time.monotonic()
        super()._close(conn, close_conn)

    def _close_raw(self, conn: Any) -> None:
        self._idle_since.pop(id(conn), None)
        super()._close_raw(conn)

    def _is_closed(self, conn: Any) -> bool:
        """Whether an idle connection is no longer worth lending. We never LISTEN, so an idle session has
        nothing to read unless the server said goodbye (a restart, pg_terminate_backend): a look at the
        socket, no round trip. One idle for long is pinged as well (peewee's own check)."""
        idle_since = self._idle_since.pop(id(conn), None)
        if conn.closed or conn.broken:
            return True
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        if readable:
            return True
        if idle_since is None or time.monotonic() - idle_since > PING_AFTER_IDLE:
            return bool(self._adapter.is_connection_closed(conn))
        return False


def check_green() -> None:
    """In a process gevent has patched, psycopg must wait through gevent (imported after the patching)."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("select"):
        return
    import psycopg.waiting

    if psycopg.waiting.wait is getattr(psycopg.waiting, "wait_c", None):
        raise RuntimeError("psycopg was imported before gevent's monkey-patching: its queries would block "
                           "every greenlet (patch first, as `python -m daemon` does)")


def connect_postgres(url: str) -> GreenPostgresqlDatabase:
    """A database for a ``postgresql://user:password@host:port/name?options`` URL (user and password
    percent-encoded)."""
    check_green()
    params = parse(url, unquote_password=True, unquote_user=True)
    name = params.pop("database")
    if not name:
        raise ValueError("database_url: no database name (postgresql://user:password@host:port/name)")
    return GreenPostgresqlDatabase(name, **params)
