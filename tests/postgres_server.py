"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, ``initdb`` in a temporary
directory, ``postgres`` on a free loopback port as a child of the test process (it stops when the tests
end, and dies with them if they are killed), a migrated template database that each test copies
(``CREATE DATABASE ... TEMPLATE``).

PostgreSQL refuses to run as root; as root (CI) initdb and the server run as ``nobody``, owning only
their temporary directory. The superuser's password holds characters a URL must percent-encode, so
every test also checks that the store decodes them.
"""

from __future__ import annotations

import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

USER = "callbridge"
TEMPLATE = "callbridge_template"
INSTALL_HINT = "PostgreSQL is not installed (apt-get install --no-install-recommends postgresql)"


class PostgresMissing(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` (initdb, postgres), or the folder of initdb on PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgresMissing(INSTALL_HINT)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_user(uid: int | None, gid: int | None) -> Callable[[], None]:
    """In the child before exec: become the unprivileged user (when we are root), then ask for SIGINT (the
    server's fast shutdown) when the test process dies, even by SIGKILL: no server outlives its tests."""

    def prepare() -> None:
        if gid is not None and uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # After the user change, which would clear it. PR_SET_PDEATHSIG = 1.
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGINT)

    return prepare


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    password: str = field(default_factory=lambda: secrets.token_hex(8) + "@/:%")
    port: int = 0
    durable: bool = False  # tests: fsync off (faster, nothing to keep); the bench: as production runs
    process: subprocess.Popen[bytes] | None = None
    _counter: int = 0
    _uid: int | None = None  # the unprivileged user's, when we are root
    _gid: int | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, name: str) -> str:
        return f"postgresql://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{name}"

    def init(self) -> None:
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            entry = pwd.getpwnam("nobody")
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self._uid is not None:
            os.chown(password_file, self._uid, self._gid or 0)
        result = subprocess.run(
            [str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
            cwd=self.root, capture_output=True, text=True, timeout=120, check=False,
            preexec_fn=_as_user(self._uid, self._gid))
        password_file.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        """``postgres`` in the foreground, a child of this process, on a free port (another process may take
        the port between the look-up and the start: then try another); returns once it accepts logins."""
        import psycopg

        log_path = self.root / "server.log"
        for _ in range(5):
            self.port = free_port()
            options = ["-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                       "-c", f"unix_socket_directories={self.root}", "-c", "max_connections=300"]
            if not self.durable:
                options += ["-c", "fsync=off", "-c", "full_page_writes=off"]
            with open(log_path, "ab") as log:
                self.process = subprocess.Popen([str(self.bindir / "postgres"), "-D", str(self.data), *options],
                                                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                preexec_fn=_as_user(self._uid, self._gid))
            deadline = time.monotonic() + 120
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    psycopg.connect(self.url("postgres"), connect_timeout=5).close()
                    return
                except psycopg.OperationalError:
                    time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"postgres did not start:\n{log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # fast shutdown: sessions are ended
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def admin(self, *statements: str) -> None:
        """Run statements as the superuser in the ``postgres`` database (autocommit: CREATE DATABASE)."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def new_database(self) -> str:
        """A fresh database copied from the migrated template; returns its name."""
        self._counter += 1
        name = f"test_{os.getpid()}_{self._counter}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_server(*, durable: bool = False) -> PostgresServer:
    """initdb + start + a migrated template, or PostgresMissing when the binaries are not installed."""
    bindir = find_bindir()
    root = Path(tempfile.mkdtemp(prefix="callbridge-pg-"))
    server = PostgresServer(bindir, root, durable=durable)
    try:
        server.init()
        server.start()
        from daemon.store import close_database, open_database

        server.admin(f'CREATE DATABASE "{TEMPLATE}"')
        close_database(open_database(server.url(TEMPLATE)))
    except BaseException:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server


def stop_server(server: PostgresServer) -> None:
    server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
