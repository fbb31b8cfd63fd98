"""A throwaway PostgreSQL server for the tests: Debian's ``postgresql`` binaries, ``initdb`` in a temporary
directory, ``pg_ctl start`` on a free loopback port, a migrated template database that each test copies
(``CREATE DATABASE ... TEMPLATE``), and ``pg_ctl stop`` at the end.

PostgreSQL refuses to run as root; as root (CI) the server runs as ``nobody`` through ``runuser``, owning
only its temporary directory. The superuser's password holds characters a URL must percent-encode, so
every test also checks that the store decodes them.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

USER = "callbridge"
TEMPLATE = "callbridge_template"
INSTALL_HINT = "PostgreSQL is not installed (apt-get install --no-install-recommends postgresql)"


class PostgresMissing(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl (or initdb on PATH)."""
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


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    password: str = field(default_factory=lambda: secrets.token_hex(8) + "@/:%")
    port: int = 0
    run_as: str | None = None  # the unprivileged user when we are root
    durable: bool = False  # tests: fsync off (faster, nothing to keep); the bench: as production runs
    _counter: int = 0

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, name: str) -> str:
        return f"postgresql://{USER}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{name}"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        return subprocess.run(command, cwd=self.root, capture_output=True, text=True, timeout=timeout, check=False)

    def init(self) -> None:
        if os.geteuid() == 0:
            self.run_as = "nobody"
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(password_file, entry.pw_uid, entry.pw_gid)
        result = self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
                           "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C",
                           "--no-sync")
        password_file.unlink()
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{result.stdout}\n{result.stderr}")

    def start(self) -> None:
        """Start on a free port (another process may take the port between the look-up and the start:
        then try another)."""
        log = self.root / "server.log"
        last = ""
        for _ in range(5):
            self.port = free_port()
            options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                       "-c max_connections=300")
            if not self.durable:
                options += " -c fsync=off -c full_page_writes=off"
            result = self._run("pg_ctl", "-D", str(self.data), "-l", str(log), "-w", "-t", "120", "-o", options,
                               "start")
            if result.returncode == 0:
                return
            last = result.stdout + result.stderr + (log.read_text() if log.exists() else "")
        raise RuntimeError(f"pg_ctl start failed:\n{last}")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop", timeout=60)

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
