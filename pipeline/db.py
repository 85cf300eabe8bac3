"""The job store's database: its tables (SQLAlchemy Core), the engine, the database's clock, and migrations.

The tables below are the one definition of what the store keeps; `pipeline.jobs` reads and writes them, and the
Alembic revisions in `pipeline/migrations/versions/` bring an existing database up to them. The SQL stays
portable (SQLite today, PostgreSQL next): no dialect-specific statement outside `db_now` and the SQLite
connection set-up.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (JSON, Column, Engine, Float, Index, Integer, MetaData, String, Table, Text, create_engine,
                        event, inspect, text)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import Float as FloatType

log = logging.getLogger("grok3d.db")

metadata = MetaData()

jobs = Table(
    "jobs",
    metadata,
    Column("job_id", String(8), primary_key=True),
    Column("prompt", Text),  # the user's words; for a job made from an uploaded picture, its caption or NULL
    Column("status", String(16), nullable=False),  # pipeline.jobs.Status
    Column("stage", String(32), nullable=False),  # pipeline.jobs.Stage
    Column("progress", Integer, nullable=False),
    Column("created_at", String(26), nullable=False),  # API.md's form: UTC ISO 8601, microseconds, no zone
    Column("updated_at", String(26), nullable=False),
    Column("error", Text),
    Column("model_version", Text),
    # The lease: who runs the job, until when (seconds since the epoch on the database's clock), and the claim's
    # number. Every write of a running job is fenced by owner and attempt, so a stale owner changes nothing.
    Column("owner", Text),
    Column("lease_until", Float),
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    # Where the picture comes from (pipeline.jobs.Source): xAI from the prompt, or the client's upload.
    Column("source", String(16), nullable=False, server_default=text("'prompt'")),
    # The job's options (API.md §1); NULL in jobs made before options existed, which get the service's defaults.
    Column("resolution", Integer),  # marching-cubes grid, cells per side
    Column("face_limit", Integer),  # at most this many triangles; NULL: as TripoSR made it
    Column("size_m", Float),  # largest side of the delivered model, metres
    # The mesh report of API.md §2 ({"faces", "vertices", "watertight", "size_m", "volume_m3"}), written with
    # the GLB, so the status route copies it without reading the mesh.
    Column("mesh", JSON),
    # Queued and running jobs, oldest first: what the dispatcher scans and the queue bound counts.
    Index("jobs_active", "created_at", sqlite_where=text("status IN ('queued', 'processing')"),
          postgresql_where=text("status IN ('queued', 'processing')")),
)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The revision that matches the schema the seed created without Alembic (grok3d.db of data folders made before
# migrations existed): such a database is stamped with it, then upgraded.
SEED_REVISION = "0001"


class db_now(FunctionElement):
    """The database's clock in seconds since the epoch, as a float: leases never depend on a replica's clock."""

    type = FloatType()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _db_now_sqlite(element: db_now, compiler, **kw) -> str:
    # julianday('now') has millisecond resolution; 2440587.5 is the Julian day of 1970-01-01T00:00Z.
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _db_now_postgresql(element: db_now, compiler, **kw) -> str:
    return "extract(epoch from clock_timestamp())"


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


def create_store_engine(url: str) -> Engine:
    """An engine for the job store. On SQLite: WAL, synchronous=FULL (an accepted job is on disk before the client
    hears of it), a 30 s busy timeout, and transactions whose BEGIN we emit ourselves (see `_sqlite_begin`)."""
    engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=False)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_connection, _record) -> None:
    # The sqlite3 module's own transaction handling would open transactions lazily and in its own way; with
    # isolation_level None it leaves them to us (SQLAlchemy's documented recipe for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_begin(connection) -> None:
    # Writes take the write lock when they begin (BEGIN IMMEDIATE), so a read-then-write transaction (the queue
    # bound, a claim) cannot be overtaken between its read and its write; plain reads begin deferred and never
    # wait for a writer in WAL mode.
    immediate = connection.get_execution_options().get("sqlite_immediate", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _alembic_config(connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Bring the database to the newest revision, in one transaction (SQLite and PostgreSQL both have
    transactional DDL). A database made by the seed's code, before migrations, is stamped first."""
    with engine.connect().execution_options(sqlite_immediate=True) as connection, connection.begin():
        if engine.dialect.name == "postgresql":
            # Replicas starting together: one migrates, the others wait here and then find nothing to do.
            connection.execute(text("SELECT pg_advisory_xact_lock(3003)"))
        current = MigrationContext.configure(connection).get_current_revision()
        config = _alembic_config(connection)
        if current is None and inspect(connection).has_table("jobs"):
            log.info("job store predates migrations: stamping it as revision %s", SEED_REVISION)
            command.stamp(config, SEED_REVISION)
        command.upgrade(config, "head")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
