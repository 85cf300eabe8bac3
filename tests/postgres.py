"""A real PostgreSQL server for the tests: Debian's binaries (`make test` installs the `postgresql` package when they
are missing), a fresh cluster in a temporary folder, listening on a free loopback port, stopped at the end.

`initdb` refuses to run as root, so as root the cluster belongs to the `postgres` user (`runuser`), as the
package's own tooling does it; as anyone else, to that user. Each test gets a database of its own (`new_database`),
so one server serves the whole session.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import pq

from tests.server import free_port


def bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server's binaries (/usr/lib/postgresql/<major>/bin), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """`durable=False` (the tests) turns off fsync: a test cluster need not survive a power cut, and each commit's
    flush would dominate. Benchmarks keep it on, as a deployment does."""

    def __init__(self, *, durable: bool = False) -> None:
        self.durable = durable
        binaries = bin_dir()
        if binaries is None:
            raise RuntimeError("PostgreSQL's server is not installed: `make test` installs Debian's postgresql "
                               "package (or: sudo apt-get install postgresql)")
        self.bin = binaries
        self.port = free_port()
        # Under /tmp, not the test's tmp_path: the postgres user must be able to reach it, and the unix socket's
        # path must stay short.
        self.dir = Path(tempfile.mkdtemp(prefix="g3d-pg-"))
        self.data = self.dir / "data"
        self.as_root = os.geteuid() == 0
        self.user = "postgres" if self.as_root else None
        self.role = "postgres" if self.as_root else os.environ.get("USER", "postgres")

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> PostgresServer:
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "--auth=trust", "--username", self.role, "-E", "UTF8",
                  *([] if self.durable else ["--no-sync"]))
        self._launch()
        return self

    def _launch(self) -> None:
        fast = "" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 {fast}-c max_connections=300",
                  "start")

    def restart(self) -> None:
        """Stop the server (fast: it closes every client's connection) and start it again on the same data and
        port, as a restart or a failover looks to a client."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        self._launch()

    def stop(self) -> None:
        if self.data.exists():
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
            except subprocess.CalledProcessError:
                pass  # not running
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """An SQLAlchemy URL (psycopg 3) over TCP on loopback, as a replica on another machine would connect."""
        return f"postgresql+psycopg://{self.role}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.role, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def sent_statements(dbapi_connection: psycopg.Connection) -> Iterator[list[str]]:
    """What a psycopg connection sends to the server meanwhile, as libpq's own protocol trace records it (PQtrace):
    the first word of each statement, a simple Query ("BEGIN", "COMMIT") or an extended-protocol Parse ("INSERT").
    The list is filled when the block ends."""
    sent: list[str] = []
    with tempfile.TemporaryFile("w+") as trace:
        pgconn = dbapi_connection.pgconn
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield sent
        finally:
            pgconn.untrace()
            trace.seek(0)
            for line in trace:
                # "F <length> Query \"BEGIN\"" or "F <length> Parse \"\" \"INSERT ...": F is the client's side.
                fields = line.rstrip("\n").split("\t")
                if len(fields) >= 4 and fields[0] == "F" and fields[2] in ("Query", "Parse"):
                    sql = fields[3].split('"')[1 if fields[2] == "Query" else 3]
                    sent.append(sql.split()[0].upper() if sql.split() else sql)
