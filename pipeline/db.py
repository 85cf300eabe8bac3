"""The job store's database: its tables (SQLAlchemy Core), the engine, the database's clock, and migrations.

The tables below are the one definition of what the store keeps; `pipeline.jobs` reads and writes them, and the
Alembic revisions in `pipeline/migrations/versions/` bring an existing database up to them. The SQL stays
portable across the two engines, SQLite (the embedded default) and PostgreSQL (several replicas): what differs
lives here, behind the dialect's name (`db_now`, `transaction_lock`, the connection set-up, `upsert`,
`relax_durability`, `Prepared`), and in the claim of `pipeline.jobs`.
"""

from __future__ import annotations

import logging
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (JSON, Column, Connection, Engine, Float, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, text)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InvalidatePoolError
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
    # The API key that submitted the job (api_keys.id); null for jobs submitted in open mode. No foreign key:
    # a key is revoked, never deleted, and SQLite would not enforce one anyway.
    Column("api_key_id", Integer),
    # Queued and running jobs, oldest first: what the dispatcher scans and the queue bound counts.
    Index("jobs_active", "created_at", sqlite_where=text("status IN ('queued', 'processing')"),
          postgresql_where=text("status IN ('queued', 'processing')")),
    # The list route's order (newest first, ties by id) and the sweeper's age scan.
    Index("jobs_by_created", "created_at", "job_id"),
    # A key's jobs in flight and jobs today (pipeline/quotas.py), and every job of today (the service's ceiling).
    Index("jobs_by_key", "api_key_id", "created_at"),
    Index("jobs_created", "created_at"),
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

# API keys (pipeline/keys.py). A key is stored only as its SHA-256 (`key_hash`, hex); its limits are fixed when it
# is created; revocation sets `revoked_at` and keeps the row, so the key's jobs keep their owner and its name
# stays taken.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("rpm", Integer, nullable=False),  # requests per minute
    Column("max_in_flight", Integer, nullable=False),  # jobs queued or processing at once
    Column("jobs_per_day", Integer, nullable=False),  # jobs created per UTC day
    Column("created_at", String(26), nullable=False),  # as jobs.created_at
    Column("revoked_at", String(26)),
)

# Fixed-window counters of the `limits` package (pipeline/ratelimit.py's storage): one row per limit and key, the
# hits of its current window and when that window ends (seconds since the epoch on the database's clock).
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("hits", Integer, nullable=False),
    Column("expires_at", Float, nullable=False),
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


def upsert(engine: Engine, table: Table):
    """INSERT ... ON CONFLICT for `table` in the engine's dialect: SQLite and PostgreSQL spell it alike, and
    SQLAlchemy builds it only through their dialects' own `insert` (which add `on_conflict_do_update`)."""
    dialects = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
    if engine.dialect.name not in dialects:
        raise NotImplementedError(f"no UPSERT for the {engine.dialect.name} dialect")
    return dialects[engine.dialect.name](table)


class Prepared:
    """A Core statement compiled once for an engine's dialect and run straight on the driver's cursor (PEP 249).

    For the statements of the hot path (a status poll's job lookup, a keyed request's count): SQLAlchemy's
    execution machinery (events, parameter and result processing, result objects) costs several times what SQLite
    takes to run them. The SQL is still SQLAlchemy's, for whichever dialect the engine speaks; only statements whose
    parameters and results need no type processing (numbers, strings) may be run so."""

    def __init__(self, engine: Engine, statement) -> None:
        compiled = statement.compile(dialect=engine.dialect)
        self.sql = str(compiled)
        self._names = list(compiled.positiontup) if compiled.positional else None
        self._fixed = dict(compiled.params)  # the statement's own values (`deleting == 0`, ...); callers add theirs

    def rows(self, connection: Connection, params: dict, *, commit: bool = False) -> list[tuple]:
        """Run on `connection` (in its open transaction, if it has one); every row of the result. `commit`: the
        statement is a write of its own, committed on the driver once its rows are read (on SQLite, where the
        driver runs a statement outside BEGIN in a transaction of its own, that has happened already)."""
        params = {**self._fixed, **params}
        args = [params[name] for name in self._names] if self._names is not None else params
        dbapi_connection = connection.connection.dbapi_connection
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self.sql, args)
            rows = cursor.fetchall()
        finally:
            cursor.close()
        if commit:
            dbapi_connection.commit()
        return rows


def relax_durability(connection: Connection) -> None:
    """Let the statements that `connection` runs outside a transaction (Prepared.rows with commit) commit by
    themselves, without waiting for the disk where the engine allows: counters worth less than an fsync, of which a
    power cut loses at most the last moments.
    On SQLite, synchronous=NORMAL: in WAL mode that skips the fsync of each commit (4 ms here; a counter bumped by
    every API request cannot wait for it) and stays safe from corruption; the next durable commit's fsync of the
    log covers it. The level belongs to the connection, which goes back to FULL before its next transaction
    (`_sqlite_begin`). On PostgreSQL, autocommit (see `autocommit`): the statement is its own transaction, one
    round trip where psycopg would send BEGIN, the statement and COMMIT; its commit waits for the WAL's flush as
    any other (`SET LOCAL synchronous_commit` would cost a round trip of its own)."""
    if connection.dialect.name == "sqlite":
        _sqlite_synchronous(connection, "NORMAL")
    else:
        autocommit(connection)


def autocommit(connection: Connection) -> None:
    """On PostgreSQL, run each statement of this checkout as its own transaction: psycopg then sends no BEGIN before
    the first statement, and the pool's reset when the connection goes back costs no ROLLBACK (a read alone needs
    no transaction: one statement sees one snapshot). A setting of the driver's connection, no round trip; SQLAlchemy
    puts the default isolation back when the connection returns to the pool. SQLite's reads begin their own
    (deferred) transaction in `_sqlite_begin`, which costs no round trip: nothing to do there."""
    if connection.dialect.name == "postgresql":
        connection.execution_options(isolation_level="AUTOCOMMIT")


def _sqlite_synchronous(connection: Connection, level: str) -> None:
    """Set the connection's synchronous level, when it is another one (outside a transaction only)."""
    if connection.info.get("synchronous") != level:
        connection.connection.driver_connection.execute(f"PRAGMA synchronous={level}")
        connection.info["synchronous"] = level


def sqlite_url(path: Path) -> str:
    return f"sqlite+pysqlite:///{path}"


def create_store_engine(url: str) -> Engine:
    """An engine for the job store. On SQLite: WAL, synchronous=FULL (an accepted job is on disk before the client
    hears of it), a 30 s busy timeout, and transactions whose BEGIN we emit ourselves (see `_sqlite_begin`). On
    PostgreSQL: its default isolation, READ COMMITTED, which the claim's SKIP LOCKED is made for; reads in
    autocommit (`autocommit`); and a connection that sat idle is checked before use (`_ping_when_idle`), one in use
    is not. The pool hands out the connection returned last (LIFO), so under load one connection stays busy and
    is never pinged, and the others age until they are checked or the server closes them."""
    postgresql = url.startswith("postgresql")
    engine = create_engine(url, pool_size=8, max_overflow=8, pool_use_lifo=postgresql)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    else:
        _ping_when_idle(engine)
    return engine


# A pooled connection idle this long is pinged before it is handed out. Every checkout's ping (SQLAlchemy's
# pool_pre_ping) cost a round trip per status read, a third of the read's time. Connections die when the server
# restarts or fails over (seconds, during which every statement fails, pinged or not) or when a proxy or firewall
# drops idle ones (minutes): a connection used within the last second has seen neither.
PING_AFTER_IDLE_S = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Check a connection that has been idle in the pool before it is used; a dead one invalidates every connection
    pooled before it, and the pool connects anew (SQLAlchemy's PoolEvents.checkout: a DisconnectionError raised
    there retries the checkout with a fresh connection). `info` is the driver connection's own: a new connection
    starts without a time, and is not pinged."""

    def returned(dbapi_connection, record) -> None:
        record.info["idle_since"] = time.monotonic()

    def check(dbapi_connection, record, proxy) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise InvalidatePoolError(f"a pooled connection is dead ({exc})") from exc

    event.listen(engine, "checkin", returned)
    event.listen(engine, "checkout", check)


def _sqlite_connect(dbapi_connection, record) -> None:
    # The sqlite3 module's own transaction handling would open transactions lazily and in its own way; with
    # isolation_level None it leaves them to us (SQLAlchemy's documented recipe for pysqlite).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
    record.info["synchronous"] = "FULL"


def _sqlite_begin(connection) -> None:
    # Writes take the write lock when they begin (BEGIN IMMEDIATE), so a read-then-write transaction (the queue
    # bound, a claim) cannot be overtaken between its read and its write; plain reads begin deferred and never
    # wait for a writer in WAL mode.
    #
    # A write is durable (synchronous=FULL), whatever counters the connection committed before (relax_durability).
    # BEGIN goes straight to the driver: SQLAlchemy's statement machinery costs more than the statement.
    immediate = connection.get_execution_options().get("sqlite_immediate", False)
    if immediate:
        _sqlite_synchronous(connection, "FULL")
    connection.connection.driver_connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")


# Alembic is imported where it is used: every process that imports this module (BentoML's arbiter, the TripoSR
# worker, the command line) would otherwise pay a fifth of a CPU-second for it, and only the store's opener migrates.
if TYPE_CHECKING:
    from alembic.config import Config


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def migrate(engine: Engine) -> None:
    """Bring the database to the newest revision, in one transaction (SQLite and PostgreSQL both have
    transactional DDL). A database made by the seed's code, before migrations, is stamped first."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

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
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
