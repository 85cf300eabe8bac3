"""The job store's database: its tables (SQLAlchemy Core), the engine, the database's clock, and migrations.

The tables below are the one definition of what the store keeps; `pipeline.jobs` reads and writes them, and the
Alembic revisions in `pipeline/migrations/versions/` bring an existing database up to them. The SQL stays
portable across the two engines, SQLite (the embedded default) and PostgreSQL (several replicas): what differs
lives here, behind the dialect's name (`db_now`, `transaction_lock`, the connection set-up), and in the claim of
`pipeline.jobs`.
"""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (JSON, Column, Connection, Engine, Float, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, text)
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
    # The life cycle (pipeline/lifecycle.py): where the job's webhook goes and how its delivery stands (null, or
    # pending, retrying, delivered, failed: pipeline/webhooks.py); a client's cancel request, which fences every
    # later stage write; a deletion under way (the row is hidden until its files are gone); and the number of
    # state changes so far, the id of the last one in `job_events`.
    Column("callback_url", Text),
    Column("webhook_status", String(16)),
    Column("cancel_requested", Integer, nullable=False, server_default=text("0")),
    Column("deleting", Integer, nullable=False, server_default=text("0")),
    Column("events", Integer, nullable=False, server_default=text("0")),
    # Queued and running jobs, oldest first: what the dispatcher scans and the queue bound counts.
    Index("jobs_active", "created_at", sqlite_where=text("status IN ('queued', 'processing')"),
          postgresql_where=text("status IN ('queued', 'processing')")),
    # The list route's order (newest first, ties by id) and the sweeper's age scan.
    Index("jobs_by_created", "created_at", "job_id"),
)

# One row per state change of a job, in order (`seq` is 1, 2, ...): the Server-Sent Events of
# /api/status/{id}/events, which a client resumes from any of them with Last-Event-ID. `data` is the status object
# (JSON) as it stood after the change. Written in the transaction that changes the job, so none is ever missed.
job_events = Table(
    "job_events",
    metadata,
    Column("job_id", String(8), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", Text, nullable=False),
)

# The outbox of webhooks (pipeline/webhooks.py): written in the transaction that ends the job, so a delivery is
# never lost; sent, and retried until `give_up_at`, by whichever process claims it (a claim pushes
# `next_attempt_at` past the send's timeout, so a sender that dies mid-send leaves it to another). The `payload`
# is the exact body that is signed and sent, the same on every attempt, and so is `webhook_id`.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("webhook_id", String(40), primary_key=True),
    Column("job_id", String(8), nullable=False, index=True),
    Column("url", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending, retrying, delivered, failed
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("created_at", Float, nullable=False),  # the database's clock, seconds since the epoch
    Column("give_up_at", Float, nullable=False),
    Column("next_attempt_at", Float, nullable=False),
    Column("last_error", Text),
    Index("webhook_deliveries_due", "state", "next_attempt_at"),
)

# Idempotent submission (Idempotency-Key): one row per (caller's scope, key) for 24 hours, with a hash of the
# request it answered and the job it made. The primary key makes two concurrent submissions of one key make one
# job: the second insert fails and its caller reads the first one's row.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("scope", String(255), primary_key=True),  # "" in open mode
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("job_id", String(8), nullable=False),
    Column("created_at", Float, nullable=False),  # the database's clock
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
    # clock_timestamp(), not now(): now() is the start of the transaction, and a claim compares leases with the
    # moment it runs. extract() gives numeric; leases are double precision.
    return "extract(epoch from clock_timestamp())::double precision"


def is_postgresql(bind: Engine | Connection) -> bool:
    return bind.dialect.name == "postgresql"


def transaction_lock(connection: Connection, name: str) -> None:
    """Serialize the transactions that take the lock `name` until they end: a count and the insert it permits
    (the queue bound) then hold across every replica.

    On PostgreSQL a transaction-level advisory lock (`pg_advisory_xact_lock`, released at commit or rollback;
    PostgreSQL docs §9.27.10 "Advisory Lock Functions" and §13.3.5 "Advisory Locks"); the key is the name's CRC-32,
    so every replica computes the same one. On SQLite nothing is needed: a write transaction begins with BEGIN IMMEDIATE, which
    already holds the database's one write lock."""
    if is_postgresql(connection):
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(name.encode())})


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


def create_store_engine(url: str) -> Engine:
    """An engine for the job store. On SQLite: WAL, synchronous=FULL (an accepted job is on disk before the client
    hears of it), a 30 s busy timeout, and transactions whose BEGIN we emit ourselves (see `_sqlite_begin`). On
    PostgreSQL: connections are checked before use (the server restarts, or a proxy drops idle connections, while a
    replica runs), and its default isolation, READ COMMITTED, which the claim's SKIP LOCKED is made for."""
    postgresql = url.startswith("postgresql")
    engine = create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=postgresql)
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
            transaction_lock(connection, "grok3d.migrate")
        current = MigrationContext.configure(connection).get_current_revision()
        config = _alembic_config(connection)
        if current is None and inspect(connection).has_table("jobs"):
            log.info("job store predates migrations: stamping it as revision %s", SEED_REVISION)
            command.stamp(config, SEED_REVISION)
        command.upgrade(config, "head")


def head_revision() -> str:
    """The newest revision of pipeline/migrations: what `migrate` brings a database to."""
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
