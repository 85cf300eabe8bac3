"""A job, its state machine, and the store that keeps it (the `jobs` table of `pipeline.db`).

The store is the one source of truth shared by every process: a job is inserted (durably) before the client hears
its id, claimed by one compare-and-set that sets an owner, a lease and the next attempt number, and moved forward
stage by stage. A lease that runs out (its owner died or stalled) makes the job claimable again, so it resumes
elsewhere or after a restart. Every write of a running job is fenced by owner and attempt: once a job has been
taken over, its former owner's writes change nothing and raise `LeaseLost`.

Every method is blocking (a short indexed statement or two): async callers run them in a thread.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from enum import Enum

from sqlalchemy import Connection, and_, bindparam, case, exc, func, insert, select, update

from pipeline.db import Prepared, create_store_engine, db_now, jobs, migrate, relax_durability
from pipeline.storage import new_job_id


class Status(str, Enum):
    queued = "queued"
    processing = "processing"
    complete = "complete"
    error = "error"


class Stage(str, Enum):
    """A job's stages in the order it passes them (`error` ends a job at any point)."""

    initializing = "initializing"
    generating_image = "generating_image"
    generating_3d = "generating_3d"
    converting_usdz = "converting_usdz"
    complete = "complete"
    error = "error"


ACTIVE = (Status.queued.value, Status.processing.value)
_FORWARD = list(Stage)[:-1]  # the running order; `error` is reached only through fail()


def stages_up_to(stage: Stage) -> list[str]:
    """The stages a running job may be in for `stage` to be a step forward (or the same stage)."""
    return [s.value for s in _FORWARD[: _FORWARD.index(stage) + 1]]


class QueueFull(Exception):
    """GROK3D_QUEUE_MAX jobs are queued or running."""


class LeaseLost(Exception):
    """The job was taken over by another owner (this one's lease lapsed), or it ended: this owner must stop."""


@dataclass(frozen=True)
class Job:
    """One row of the `jobs` table, field for field (a test holds the two together)."""

    job_id: str
    prompt: str
    status: Status
    stage: Stage
    progress: int
    created_at: str
    updated_at: str
    error: str | None
    model_version: str | None
    owner: str | None
    lease_until: float | None
    attempt: int
    api_key_id: int | None

    @classmethod
    def from_row(cls, row) -> Job:
        values = row._mapping
        return cls(**{**values, "status": Status(values["status"]), "stage": Stage(values["stage"])})

    @classmethod
    def from_values(cls, values) -> Job:
        """A row as the driver returns it: the values of `select(jobs)`, in the table's (and so Job's) order."""
        values = list(values)
        values[_STATUS], values[_STAGE] = Status(values[_STATUS]), Stage(values[_STAGE])
        return cls(*values)


@dataclass(frozen=True)
class Lease:
    """The right to write one running job: its id, the owner that claimed it, and that claim's number."""

    job_id: str
    owner: str
    attempt: int


JOB_COLUMNS = [f.name for f in fields(Job)]
_STATUS, _STAGE = JOB_COLUMNS.index("status"), JOB_COLUMNS.index("stage")


def utc_now_iso() -> str:
    """API.md's timestamp form: UTC, microseconds, no zone suffix."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


def process_owner_id() -> str:
    """host:pid:nonce. The host and pid tell, on this host, whether an owner is still alive; the nonce keeps two
    owners apart where pids repeat (every container's first process is pid 1) or one process runs two."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _owner_is_dead(owner: str) -> bool:
    host, pid = (owner.split(":") + ["", ""])[:2]
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's job: only its lease can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _at_least(column, value: int):
    """The larger of a column and a number, in portable SQL (SQLite's max(a, b) is PostgreSQL's greatest)."""
    return case((column < value, value), else_=column)


def _fenced(lease: Lease):
    return and_(jobs.c.job_id == lease.job_id, jobs.c.owner == lease.owner, jobs.c.attempt == lease.attempt,
                jobs.c.status == Status.processing.value)


class JobStore:
    """The job store on SQLAlchemy Core: `url` is an SQLAlchemy database URL (today the SQLite file
    `sqlite+pysqlite:////path/grok3d.db`). The schema is migrated to the newest revision on open."""

    def __init__(self, url: str, *, lease_s: float = 60.0) -> None:
        self.lease_s = lease_s
        self.engine = create_store_engine(url)
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in SQLite's busy handler
        # (1, 2, 5, ... 100 ms steps) rather than waking when it frees: writers of this process queue on a lock of
        # ours instead, and only other processes meet the busy handler.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        migrate(self.engine)
        # The status poll: one key lookup, compiled once and run on the driver (pipeline.db.Prepared): SQLAlchemy's
        # execution machinery cost five times the lookup itself.
        self._get = Prepared(self.engine, select(jobs).where(jobs.c.job_id == bindparam("job_id")))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.connect().execution_options(sqlite_immediate=True) as conn, \
                conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn:
            yield conn

    def write(self) -> AbstractContextManager[Connection]:
        """A write transaction on this store's database, for the stores that share it (pipeline/keys.py): their
        writes queue on the same lock as the job store's own."""
        return self._write()

    def read(self) -> AbstractContextManager[Connection]:
        return self._read()

    @contextmanager
    def counting(self) -> Iterator[Connection]:
        """A connection for counters (pipeline/ratelimit.py), outside any transaction: each statement it runs is
        one atomic write that commits by itself (pipeline.db.Prepared with commit), without waiting for the disk
        (pipeline.db.relax_durability). A counter bumped by every request costs no BEGIN, COMMIT or fsync; its
        writes still queue on the job store's write lock."""
        with self._write_lock, self.engine.connect() as conn:
            relax_durability(conn)
            yield conn

    # -- writes ---------------------------------------------------------------------------------------------

    def create(self, prompt: str, *, queue_max: int, api_key_id: int | None = None,
               admit: Callable[[Connection], None] | None = None) -> Job:
        """Insert a queued job, unless `queue_max` jobs are already queued or running (QueueFull). `api_key_id`: the
        key that owns it. `admit(conn)` runs in the insert's transaction first and raises to refuse the job (the
        quotas of pipeline/quotas.py: what it counts cannot change before the insert)."""
        now = utc_now_iso()
        for _ in range(20):  # 8 hex digits: a collision is rare, and simply retried
            values = dict(job_id=new_job_id(), prompt=prompt, status=Status.queued.value,
                          stage=Stage.initializing.value, progress=0, created_at=now, updated_at=now,
                          api_key_id=api_key_id)
            try:
                with self._write() as conn:
                    if admit is not None:
                        admit(conn)
                    active = conn.execute(select(func.count()).select_from(jobs)
                                          .where(jobs.c.status.in_(ACTIVE))).scalar_one()
                    if active >= queue_max:
                        raise QueueFull()
                    row = conn.execute(insert(jobs).values(**values).returning(*jobs.c)).one()
                return Job.from_row(row)
            except exc.IntegrityError:
                continue
        raise RuntimeError("could not allocate a unique job id")

    def claim(self, owner: str, *, exclude: set[str] = frozenset()) -> Job | None:
        """Take the oldest runnable job: queued, or processing with a lapsed lease or an owner that died on this
        host. The take is a compare-and-set on (owner, attempt), so two claimers never both win."""
        with self._read() as conn:
            candidates = conn.execute(
                select(jobs.c.job_id, jobs.c.owner, jobs.c.attempt, (jobs.c.lease_until < db_now()).label("lapsed"))
                .where(jobs.c.status.in_(ACTIVE)).order_by(jobs.c.created_at)
            ).all()
        for job_id, old_owner, attempt, lapsed in candidates:
            if job_id in exclude:
                continue
            if not (old_owner is None or lapsed or (old_owner != owner and _owner_is_dead(old_owner))):
                continue
            same_holder = jobs.c.owner.is_(None) if old_owner is None else jobs.c.owner == old_owner
            with self._write() as conn:
                row = conn.execute(
                    update(jobs)
                    .where(jobs.c.job_id == job_id, jobs.c.attempt == attempt, same_holder,
                           jobs.c.status.in_(ACTIVE))
                    .values(owner=owner, lease_until=db_now() + self.lease_s, attempt=attempt + 1,
                            status=Status.processing.value, progress=_at_least(jobs.c.progress, 5), updated_at=utc_now_iso())
                    .returning(*jobs.c)
                ).one_or_none()
            if row is not None:
                return Job.from_row(row)
        return None

    def renew_leases(self, owner: str) -> dict[str, int]:
        """Extend every lease `owner` holds; returns {job_id: attempt} of the jobs it still holds."""
        with self._write() as conn:
            rows = conn.execute(
                update(jobs).where(jobs.c.owner == owner, jobs.c.status == Status.processing.value)
                .values(lease_until=db_now() + self.lease_s).returning(jobs.c.job_id, jobs.c.attempt)
            ).all()
        return {job_id: attempt for job_id, attempt in rows}

    def advance(self, lease: Lease, stage: Stage, progress: int, **fields: str | None) -> None:
        """Move a running job forward: `stage` is the stored one or a later one, and progress never decreases (a
        lower value keeps the stored one). Raises LeaseLost when `lease` no longer holds, ValueError when `stage`
        lies behind the stored stage."""
        with self._write() as conn:
            done = conn.execute(
                update(jobs).where(_fenced(lease), jobs.c.stage.in_(stages_up_to(stage)))
                .values(stage=stage.value, progress=_at_least(jobs.c.progress, progress), updated_at=utc_now_iso(),
                        **fields)
            ).rowcount
            if done == 1:
                return
            current = conn.execute(select(jobs.c.stage).where(_fenced(lease))).scalar_one_or_none()
        if current is None:
            raise LeaseLost(lease.job_id)
        raise ValueError(f"job {lease.job_id} would move back from {current} to {stage.value}")

    def finish(self, lease: Lease) -> None:
        self._end(lease, Status.complete, Stage.complete, 100, None)

    def fail(self, lease: Lease, error: str) -> None:
        self._end(lease, Status.error, Stage.error, 0, error)

    def _end(self, lease: Lease, status: Status, stage: Stage, progress: int, error: str | None) -> None:
        with self._write() as conn:
            done = conn.execute(
                update(jobs).where(_fenced(lease))
                .values(status=status.value, stage=stage.value, progress=progress, error=error, owner=None,
                        lease_until=None, updated_at=utc_now_iso())
            ).rowcount
        if done != 1:
            raise LeaseLost(lease.job_id)

    # -- reads ----------------------------------------------------------------------------------------------

    def get(self, job_id: str, *, conn: Connection | None = None) -> Job | None:
        """The job, or None. `conn`: read it on that connection (a keyed status poll reads its job on the connection
        that counted its request: one round of the pool instead of two)."""
        if conn is not None:
            rows = self._get.rows(conn, {"job_id": job_id})
        else:
            with self._read() as conn:
                rows = self._get.rows(conn, {"job_id": job_id})
        return Job.from_values(rows[0]) if rows else None

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` still holds: checked before a stage publishes a file."""
        with self._read() as conn:
            return conn.execute(select(jobs.c.job_id).where(_fenced(lease))).first() is not None

    def count_active(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status.in_(ACTIVE))).scalar_one()
