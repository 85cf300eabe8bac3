"""A job, its state machine, and the store that keeps it (the `jobs` table of `pipeline.db`).

The store is the one source of truth shared by every process and replica: a job is inserted (durably) before the
client hears its id, claimed by one statement that sets an owner, a lease and the next attempt number, and moved
forward stage by stage. A lease that runs out (its owner died or stalled) makes the job claimable again, so it resumes
elsewhere or after a restart. Every write of a running job is fenced by owner and attempt: once a job has been
taken over, its former owner's writes change nothing and raise `LeaseLost`.

Every method is blocking (a short indexed statement or two): async callers run them in a thread.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from enum import Enum

from sqlalchemy import (Connection, and_, bindparam, case, exc, false, func, insert, or_, select, true,
                        update)

from pipeline.db import create_store_engine, db_now, is_postgresql, jobs, migrate, transaction_lock
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

    @classmethod
    def from_row(cls, row) -> Job:
        values = row._mapping
        return cls(**{**values, "status": Status(values["status"]), "stage": Stage(values["stage"])})


@dataclass(frozen=True)
class Lease:
    """The right to write one running job: its id, the owner that claimed it, and that claim's number."""

    job_id: str
    owner: str
    attempt: int


JOB_COLUMNS = [f.name for f in fields(Job)]


def utc_now_iso() -> str:
    """API.md's timestamp form: UTC, microseconds, no zone suffix."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


@functools.cache
def pid_scope() -> str:
    """Where this process's pid means something: the host name, plus (on Linux) the kernel's boot and the pid
    namespace, so that two containers that share a host name (`network_mode: host`, a copied image's fixed name)
    but not their pids never judge each other's owners by a pid that is not theirs."""
    parts = []
    for path, read in (("/proc/sys/kernel/random/boot_id", lambda p: open(p).read().strip()),
                       ("/proc/self/ns/pid", os.readlink)):
        try:
            parts.append(read(path))
        except OSError:
            pass
    digest = hashlib.blake2b("|".join(parts).encode(), digest_size=4).hexdigest() if parts else "0"
    return f"{socket.gethostname()}~{digest}"


def process_owner_id() -> str:
    """scope:pid:nonce. The scope and pid tell, in this pid namespace, whether an owner is still alive; the nonce
    keeps two owners apart where pids repeat (every container's first process is pid 1, also after a restart of
    the container) or one process runs two."""
    return f"{pid_scope()}:{os.getpid()}:{secrets.token_hex(4)}"


def local_owner_prefix() -> str:
    """What every owner id of this pid namespace starts with."""
    return pid_scope() + ":"


def _owner_is_dead(owner: str) -> bool:
    scope, pid = (owner.split(":") + ["", ""])[:2]
    if scope != pid_scope() or not pid.isdigit():
        return False  # another machine's (or container's) job: only its lease can tell
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
    """The job store on SQLAlchemy Core: `url` is an SQLAlchemy database URL, the SQLite file
    `sqlite+pysqlite:////path/grok3d.db` (one machine) or a PostgreSQL database
    `postgresql+psycopg://user:pw@host:5432/grok3d` (shared by replicas). The schema is migrated to the newest
    revision on open; replicas that open it together migrate it once."""

    def __init__(self, url: str, *, lease_s: float = 60.0) -> None:
        self.lease_s = lease_s
        self.engine = create_store_engine(url)
        self.postgresql = is_postgresql(self.engine)
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in SQLite's busy handler
        # (1, 2, 5, ... 100 ms steps) rather than waking when it frees: writers of this process queue on a lock of
        # ours instead, and only other processes meet the busy handler.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        migrate(self.engine)
        self._get = select(jobs).where(jobs.c.job_id == bindparam("job_id"))  # the status poll: one key lookup

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

    # -- writes ---------------------------------------------------------------------------------------------

    def create(self, prompt: str, *, queue_max: int) -> Job:
        """Insert a queued job, unless `queue_max` jobs are already queued or running (QueueFull)."""
        now = utc_now_iso()
        for _ in range(20):  # 8 hex digits: a collision is rare, and simply retried
            values = dict(job_id=new_job_id(), prompt=prompt, status=Status.queued.value,
                          stage=Stage.initializing.value, progress=0, created_at=now, updated_at=now)
            try:
                with self._write() as conn:
                    transaction_lock(conn, "grok3d.queue")  # the count and the insert, one at a time everywhere
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
        host. Two claimers never both win."""
        return self._claim_skip_locked(owner, exclude) if self.postgresql else self._claim_cas(owner, exclude)

    def _claim_skip_locked(self, owner: str, exclude: set[str]) -> Job | None:
        """PostgreSQL: one statement picks the oldest runnable job and takes it. `FOR UPDATE SKIP LOCKED` in the
        sub-select locks the row it picks and passes over rows another claimer has locked, so concurrent claimers
        each get another job without waiting for one another (PostgreSQL docs, SELECT, "The Locking Clause"; in READ
        COMMITTED a locked row's conditions are checked again on its newest version, §13.2.1). The lease runs on the
        database's clock."""
        dead = self._dead_local_owners()
        runnable = or_(jobs.c.owner.is_(None), jobs.c.lease_until < db_now(),
                       jobs.c.owner.in_(dead) if dead else false())
        pick = (select(jobs.c.job_id)
                .where(jobs.c.status.in_(ACTIVE), runnable, jobs.c.job_id.not_in(list(exclude)) if exclude else true())
                .order_by(jobs.c.created_at).limit(1).with_for_update(skip_locked=True).scalar_subquery())
        with self._write() as conn:
            row = conn.execute(
                update(jobs).where(jobs.c.job_id == pick)
                .values(owner=owner, lease_until=db_now() + self.lease_s, attempt=jobs.c.attempt + 1,
                        status=Status.processing.value, progress=_at_least(jobs.c.progress, 5),
                        updated_at=utc_now_iso())
                .returning(*jobs.c)
            ).one_or_none()
        return Job.from_row(row) if row is not None else None

    def _dead_local_owners(self) -> list[str]:
        """Owners of running jobs that were processes of this pid namespace and have died: their jobs are free
        at once, long before their leases end (a restart on the same machine resumes its jobs without waiting)."""
        with self._read() as conn:
            owners = conn.execute(
                select(jobs.c.owner).distinct().where(jobs.c.status == Status.processing.value,
                                                     jobs.c.owner.startswith(local_owner_prefix(), autoescape=True))
            ).scalars().all()
        return [o for o in owners if _owner_is_dead(o)]

    def _claim_cas(self, owner: str, exclude: set[str]) -> Job | None:
        """SQLite: the candidates are read without the write lock (an idle poll never takes it), then one is
        taken by a compare-and-set on (owner, attempt)."""
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

    def get(self, job_id: str) -> Job | None:
        with self._read() as conn:
            row = conn.execute(self._get, {"job_id": job_id}).one_or_none()
        return Job.from_row(row) if row is not None else None

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` still holds: checked before a stage publishes a file."""
        with self._read() as conn:
            return conn.execute(select(jobs.c.job_id).where(_fenced(lease))).first() is not None

    def count_active(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status.in_(ACTIVE))).scalar_one()
