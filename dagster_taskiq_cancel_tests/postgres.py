"""A private PostgreSQL cluster for the tests: Debian's server binaries, 127.0.0.1, a free port.

The docs recommend Postgres for fleets, so the cancel, soak and bulk tests run on it too.
The cluster lives in a temporary directory, listens on 127.0.0.1 and its own socket directory
only, and is stopped by its postmaster's pid. initdb and postgres refuse to run as root, so as
root (CI) the server runs as the ``postgres`` user that Debian's package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg2

from dagster_taskiq_cancel_tests.stack import stop_process, wait_for

BIN_GLOB = "/usr/lib/postgresql/*/bin/initdb"
SERVER_USER = "postgres"
PASSWORD = "dagster"
SCHEME = "postgresql+psycopg2"


def storage_config(postgres_db: Mapping[str, Any]) -> dict[str, Any]:
    """dagster.yaml's ``storage`` key for one database.

    The scheme must name psycopg2: SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3,
    which dagster-postgres does not install (see docs/production.md, "Run storage: Postgres").
    """
    return {"storage": {"postgres": {"postgres_db": {**postgres_db, "scheme": SCHEME}}}}


def server_bin() -> Path:
    """The newest installed PostgreSQL server's bin directory (`make test` installs one)."""
    found = sorted(Path("/").glob(BIN_GLOB.lstrip("/")), key=lambda p: int(p.parts[-3]))
    if not found:
        raise RuntimeError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin): run `make test`, "
            "or `apt-get install postgresql`"
        )
    return found[-1].parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One initdb'd data directory and its postmaster; ``database()`` makes one per test."""

    def __init__(self, durable: bool = False, settings: Mapping[str, str] | None = None) -> None:
        """``durable`` keeps Postgres's commit-to-disk defaults (benchmarks); tests skip them.
        ``settings`` are more server settings (``log_connections``: ``connections_opened``; the
        fleet benchmark's ``max_connections``)."""
        self.durable = durable
        self.settings = dict(settings or {})
        self.root = Path(tempfile.gettempdir())  # set by start()
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}  # as root: the unprivileged user initdb and postgres need

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    def start(self) -> PostgresCluster:
        bin_dir = server_bin()
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(
                    f"initdb refuses root and there is no {SERVER_USER!r} user to run it as: "
                    "install Debian's postgresql package (`make postgres`), which creates it"
                ) from None
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.root = Path(tempfile.mkdtemp(prefix="dagster-taskiq-pg-"))
        try:
            self._start(bin_dir)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, bin_dir: Path) -> None:
        data, sockets, pwfile = self.root / "data", self.root / "sockets", self.root / "pwfile"
        sockets.mkdir()
        pwfile.write_text(PASSWORD)
        for path in (self.root, sockets, pwfile) if self._as else ():
            os.chown(path, self._as["user"], self._as["group"])
        self.port = free_port()
        initdb = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                SERVER_USER,
                "--pwfile",
                str(pwfile),
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            **self._as,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        self._serve(bin_dir)

    def _serve(self, bin_dir: Path) -> None:
        """The postmaster on the data directory and port: at start, and again at a restart."""
        data, sockets = self.root / "data", self.root / "sockets"
        self.process = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(sockets),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
                # Throwaway test data: no need to wait for the disk on every commit.
                *([] if self.durable else ["-c", "fsync=off", "-c", "synchronous_commit=off"]),
                *[
                    arg
                    for name, value in self.settings.items()
                    for arg in ("-c", f"{name}={value}")
                ],
            ],
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **self._as,
        )
        wait_for(self._accepting, 60, f"postgres on 127.0.0.1:{self.port} ({self.log})", 0.1)

    def _accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"postgres exited at start:\n{self.log.read_text()}")
        try:
            self._connect("postgres").close()
        except psycopg2.OperationalError:
            return False
        return True

    def _connect(self, db_name: str) -> Any:
        return psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=SERVER_USER,
            password=PASSWORD,
            dbname=db_name,
            connect_timeout=5,
        )

    def database(self) -> Mapping[str, Any]:
        """A new, empty database; the ``postgres_db`` block of Dagster's storage config."""
        name = f"t{uuid.uuid4().hex[:16]}"
        connection = self._connect("postgres")
        try:
            connection.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return {
            "username": SERVER_USER,
            "password": PASSWORD,
            "hostname": "127.0.0.1",
            "port": self.port,
            "db_name": name,
        }

    def connections_opened(self, db_name: str) -> int:
        """Connections the server has accepted to ``db_name`` so far: its log's lines, written by
        each backend as it starts (needs ``log_connections``)."""
        line = rf"connection authorized: user={SERVER_USER} database={db_name}\b"
        return len(re.findall(line, self.log.read_text(errors="replace")))

    def backends(self, db_name: str) -> set[int]:
        """The pids of the client backends connected to ``db_name`` now."""
        query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        return {int(row[0]) for row in self.execute(query, (db_name,))}

    def execute(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement as the superuser, outside a transaction; its rows."""
        connection = self._connect("postgres")
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(statement, params)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            connection.close()

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The server shut down (fast: every backend ends) for the block; then up again on the
        same data and port, as after a restart."""
        assert self.process is not None
        stop_process(self.process, signal.SIGINT, timeout=30)
        try:
            yield
        finally:
            self._serve(server_bin())

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by the postmaster's pid; SIGKILL if it does not go."""
        if self.process is not None:
            stop_process(self.process, signal.SIGINT, timeout=30)
        if self.root.name.startswith("dagster-taskiq-pg-"):
            shutil.rmtree(self.root, ignore_errors=True)
