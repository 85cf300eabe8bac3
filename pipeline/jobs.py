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
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from enum import Enum
from functools import lru_cache

from sqlalchemy import (Connection, and_, bindparam, case, delete, exc, false, func, insert, literal, or_, select,
                        true, update)

from pipeline.db import (Prepared, autocommit, create_store_engine, db_now, idempotency_keys, is_postgresql,
                         job_events, jobs, migrate, relax_durability, transaction_lock, webhook_deliveries)
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


class Source(str, Enum):
    """Where a job's picture comes from."""

    prompt = "prompt"  # made by xAI from the prompt
    upload = "upload"  # sent by the client: the xAI call is skipped


@dataclass(frozen=True)
class JobOptions:
    """What a client may choose per job (API.md §1). None: the service's default."""

    resolution: int | None = None  # marching-cubes grid, cells per side
    face_limit: int | None = None  # at most this many triangles
    size_m: float | None = None  # largest side of the delivered model, metres


ACTIVE = (Status.queued.value, Status.processing.value)
_FORWARD = list(Stage)[:-1]  # the running order; `error` is reached only through fail()


def stages_up_to(stage: Stage) -> list[str]:
    """The stages a running job may be in for `stage` to be a step forward (or the same stage)."""
    return [s.value for s in _FORWARD[: _FORWARD.index(stage) + 1]]


class QueueFull(Exception):
    """GROK3D_QUEUE_MAX jobs are queued or running."""


class LeaseLost(Exception):
    """The job was taken over by another owner (this one's lease lapsed), it ended, or a client asked to cancel it:
    this owner must stop (and, for a cancel, fail the job)."""


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used, within its 24 hours, with another request body."""


CANCELLED = "Cancelled by the client"
# Stripe keeps an idempotency key for 24 hours; so do we (the key's row is swept after that).
IDEMPOTENCY_TTL_S = 24 * 3600
# A delivery is retried for 24 hours after the job ended (issue 15), then given up.
WEBHOOK_WINDOW_S = 24 * 3600


@dataclass(frozen=True)
class IdempotencyKey:
    """An Idempotency-Key as the store keeps it: the caller's scope ("" in open mode), the key, and a hash of the
    request it came with."""

    scope: str
    key: str
    request_hash: str


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    accepted: bool  # false: the job had finished already


@dataclass(frozen=True)
class Submission:
    job: Job
    replayed: bool  # the Idempotency-Key was seen before: this is the job it made then, and nothing new started


@dataclass(frozen=True)
class Job:
    """One row of the `jobs` table, field for field (a test holds the two together)."""

    job_id: str
    prompt: str | None
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
    source: Source
    resolution: int | None
    face_limit: int | None
    size_m: float | None
    mesh: dict | None
    callback_url: str | None
    webhook_status: str | None
    cancel_requested: int
    deleting: int
    events: int
    api_key_id: int | None

    @classmethod
    def from_row(cls, row) -> Job:
        values = row._mapping
        return cls(**{**values, "status": Status(values["status"]), "stage": Stage(values["stage"]),
                      "source": Source(values["source"])})

    @property
    def options(self) -> JobOptions:
        return JobOptions(self.resolution, self.face_limit, self.size_m)

    @classmethod
    def from_values(cls, values) -> Job:
        """A row as the driver returns it: the values of `select(jobs)`, in the table's (and so Job's) order."""
        values = list(values)
        values[_STATUS], values[_STAGE] = Status(values[_STATUS]), Stage(values[_STAGE])
        values[_SOURCE] = Source(values[_SOURCE])
        if isinstance(values[_MESH], str):  # the driver's own value: SQLite keeps JSON as text
            values[_MESH] = json.loads(values[_MESH])
        return cls(*values)


@dataclass(frozen=True)
class Lease:
    """The right to write one running job: its id, the owner that claimed it, and that claim's number."""

    job_id: str
    owner: str
    attempt: int


JOB_COLUMNS = [f.name for f in fields(Job)]
_STATUS, _STAGE = JOB_COLUMNS.index("status"), JOB_COLUMNS.index("stage")
_SOURCE, _MESH = JOB_COLUMNS.index("source"), JOB_COLUMNS.index("mesh")


def utc_now_iso() -> str:
    """API.md's timestamp form: UTC, microseconds, no zone suffix."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


def iso_of(epoch_s: float) -> str:
    """Seconds since the epoch in API.md's timestamp form."""
    return datetime.fromtimestamp(epoch_s, timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


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


def _fenced(lease: Lease, *, cancellable: bool = True):
    """The row `lease` may write. Once a client asked to cancel the job, no stage write goes through
    (`cancellable`), only the owner's fail(): a cancel wins over a stage that finished at the same moment."""
    held = and_(jobs.c.job_id == lease.job_id, jobs.c.owner == lease.owner, jobs.c.attempt == lease.attempt,
                jobs.c.status == Status.processing.value)
    return and_(held, jobs.c.cancel_requested == 0) if cancellable else held


@lru_cache(maxsize=1)
def _row_status_fields() -> tuple[str, ...]:
    """The status object's fields that are the job's own columns (all but `expires_at`)."""
    from pipeline.schemas import JobStatus  # schemas imports this module's enums

    return tuple(name for name in JobStatus.model_fields if name != "expires_at")


def _visible():
    """Rows a client may see: a job being deleted is gone for clients at once."""
    return jobs.c.deleting == 0


def _in_scope(scope: str | None):
    """The caller's jobs: None (open mode) is every job; a key's scope (its id) is the jobs that key submitted."""
    if scope is None:
        return true()
    return jobs.c.api_key_id == int(scope)


class JobStore:
    """The job store on SQLAlchemy Core: `url` is an SQLAlchemy database URL, the SQLite file
    `sqlite+pysqlite:////path/grok3d.db` (one machine) or a PostgreSQL database
    `postgresql+psycopg://user:pw@host:5432/grok3d` (shared by replicas). The schema is migrated to the newest
    revision on open; replicas that open it together migrate it once."""

    def __init__(self, url: str, *, lease_s: float = 60.0, retention_s: float | None = None) -> None:
        self.lease_s = lease_s
        self.retention_s = retention_s  # GROK3D_RETENTION_DAYS in seconds; None keeps jobs forever
        self.engine = create_store_engine(url)
        self.postgresql = is_postgresql(self.engine)
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in SQLite's busy handler
        # (1, 2, 5, ... 100 ms steps) rather than waking when it frees: writers of this process queue on a lock of
        # ours instead, and only other processes meet the busy handler.
        self._write_lock = threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext()
        migrate(self.engine)
        # The status poll: one key lookup, compiled once and run on the driver (pipeline.db.Prepared): SQLAlchemy's
        # execution machinery cost five times the lookup itself.
        self._get = Prepared(self.engine, select(jobs).where(jobs.c.job_id == bindparam("job_id"), _visible()))

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._write_lock, self.engine.connect().execution_options(sqlite_immediate=True) as conn, \
                conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for reads, each statement its own snapshot (pipeline.db.autocommit: on PostgreSQL no BEGIN
        and ROLLBACK round trips around a status poll's one SELECT)."""
        with self.engine.connect() as conn:
            autocommit(conn)
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
        (pipeline.db.relax_durability). A counter bumped by every request costs no BEGIN or COMMIT on either engine,
        and no fsync on SQLite; its writes still queue on the job store's write lock."""
        with self._write_lock, self.engine.connect() as conn:
            relax_durability(conn)
            yield conn

    # -- writes ---------------------------------------------------------------------------------------------

    def create(self, prompt: str | None, *, queue_max: int, callback_url: str | None = None,
               source: Source = Source.prompt, options: JobOptions = JobOptions(),
               on_insert: Callable[[str], None] | None = None, api_key_id: int | None = None,
               admit: Callable[[Connection], None] | None = None) -> Job:
        """Insert a queued job, unless `queue_max` jobs are already queued or running (QueueFull); see `submit`."""
        return self.submit(prompt, queue_max=queue_max, callback_url=callback_url, source=source, options=options,
                           on_insert=on_insert, api_key_id=api_key_id, admit=admit).job

    def submit(self, prompt: str | None, *, queue_max: int, callback_url: str | None = None,
               idempotency: IdempotencyKey | None = None, source: Source = Source.prompt,
               options: JobOptions = JobOptions(), on_insert: Callable[[str], None] | None = None,
               api_key_id: int | None = None, admit: Callable[[Connection], None] | None = None) -> Submission:
        """Insert a queued job, unless `queue_max` jobs are already queued or running (QueueFull).

        With an idempotency key seen in the last 24 hours, the job it made then instead, and nothing new
        (IdempotencyMismatch when it came with another request). Two concurrent submissions of one key make one
        job: the key's row is written in the job's transaction under a primary key, so the later one fails, goes
        round again and finds the earlier one's job.

        `on_insert(job_id)` runs inside the inserting transaction, once the id is known to be free and before any
        other process can see the job: a job that needs a file from its client (an upload) is never claimed
        without it. If it raises, the job is not created.

        `api_key_id`: the key that owns the job. `admit(conn)` runs in the insert's transaction first and raises to
        refuse the job (the quotas of pipeline/quotas.py: what it counts cannot change before the insert)."""
        now = utc_now_iso()
        for _ in range(20):  # 8 hex digits: a collision is rare, and simply retried
            values = dict(job_id=new_job_id(), prompt=prompt, status=Status.queued.value,
                          stage=Stage.initializing.value, progress=0, created_at=now, updated_at=now,
                          callback_url=callback_url, events=1, source=source.value,
                          resolution=options.resolution, face_limit=options.face_limit, size_m=options.size_m,
                          api_key_id=api_key_id)
            try:
                with self._write() as conn:
                    transaction_lock(conn, "grok3d.queue")  # the count and the insert, one at a time everywhere
                    if idempotency is not None and (earlier := self._replay(conn, idempotency)) is not None:
                        return Submission(earlier, replayed=True)  # a replay starts nothing, so counts nothing
                    if admit is not None:
                        admit(conn)
                    active = conn.execute(select(func.count()).select_from(jobs)
                                          .where(jobs.c.status.in_(ACTIVE))).scalar_one()
                    if active >= queue_max:
                        raise QueueFull()
                    job = self._logged(conn, conn.execute(insert(jobs).values(**values).returning(*jobs.c)).one())
                    if idempotency is not None:
                        conn.execute(insert(idempotency_keys).values(
                            scope=idempotency.scope, key=idempotency.key, request_hash=idempotency.request_hash,
                            job_id=job.job_id, created_at=db_now()))
                    if on_insert is not None:
                        on_insert(job.job_id)
                return Submission(job, replayed=False)
            except exc.IntegrityError:
                continue
        raise RuntimeError("could not allocate a unique job id")

    def _replay(self, conn: Connection, key: IdempotencyKey) -> Job | None:
        """The job an idempotency key made within its 24 hours, if any; an older row of the key is dropped."""
        same_key = and_(idempotency_keys.c.scope == key.scope, idempotency_keys.c.key == key.key)
        conn.execute(delete(idempotency_keys).where(same_key,
                                                    idempotency_keys.c.created_at <= db_now() - IDEMPOTENCY_TTL_S))
        row = conn.execute(select(idempotency_keys.c.request_hash, idempotency_keys.c.job_id)
                           .where(same_key)).one_or_none()
        if row is None:
            return None
        if row.request_hash != key.request_hash:
            raise IdempotencyMismatch(key.key)
        job = conn.execute(select(jobs).where(jobs.c.job_id == row.job_id)).one_or_none()
        return Job.from_row(job) if job is not None else None

    def _logged(self, conn: Connection, row) -> Job:
        """Record the state change that produced `row` (its `events` number is the change's id) in job_events."""
        job = Job.from_row(row)
        conn.execute(insert(job_events).values(job_id=job.job_id, seq=job.events,
                                               data=json.dumps(self.status_of(job))))
        return job

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
                        updated_at=utc_now_iso(), events=jobs.c.events + 1)
                .returning(*jobs.c)
            ).one_or_none()
            return self._logged(conn, row) if row is not None else None

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
                            status=Status.processing.value, progress=_at_least(jobs.c.progress, 5), updated_at=utc_now_iso(),
                            events=jobs.c.events + 1)
                    .returning(*jobs.c)
                ).one_or_none()
                if row is not None:
                    return self._logged(conn, row)
        return None

    def renew_leases(self, owner: str) -> dict[str, int]:
        """Extend every lease `owner` holds; returns {job_id: attempt} of the jobs it still holds."""
        with self._write() as conn:
            rows = conn.execute(
                update(jobs).where(jobs.c.owner == owner, jobs.c.status == Status.processing.value)
                .values(lease_until=db_now() + self.lease_s).returning(jobs.c.job_id, jobs.c.attempt)
            ).all()
        return {job_id: attempt for job_id, attempt in rows}

    def advance(self, lease: Lease, stage: Stage, progress: int, **fields: object) -> None:
        """Move a running job forward: `stage` is the stored one or a later one, and progress never decreases (a
        lower value keeps the stored one). Raises LeaseLost when `lease` no longer holds (or a cancel was asked),
        ValueError when `stage` lies behind the stored stage. A write that changes nothing is no state change."""
        with self._write() as conn:
            current = conn.execute(select(jobs.c.stage, jobs.c.progress).where(_fenced(lease))).one_or_none()
            if current is None:
                raise LeaseLost(lease.job_id)
            if current.stage not in stages_up_to(stage):
                raise ValueError(f"job {lease.job_id} would move back from {current.stage} to {stage.value}")
            if current.stage == stage.value and current.progress >= progress and not fields:
                return
            row = conn.execute(
                update(jobs).where(_fenced(lease))
                .values(stage=stage.value, progress=_at_least(jobs.c.progress, progress), updated_at=utc_now_iso(),
                        events=jobs.c.events + 1, **fields)
                .returning(*jobs.c)
            ).one()
            self._logged(conn, row)

    def finish(self, lease: Lease, *, mesh: dict | None = None) -> None:
        """Complete the job; `mesh`: the report of its delivered GLB (API.md §2)."""
        self._end(_fenced(lease), Status.complete, Stage.complete, 100, None, lease.job_id, mesh=mesh)

    def fail(self, lease: Lease, error: str) -> None:
        """Fenced by the lease, and allowed after a cancel request: how a cancelled job ends."""
        self._end(_fenced(lease, cancellable=False), Status.error, Stage.error, 0, error, lease.job_id)

    def _end(self, where, status: Status, stage: Stage, progress: int, error: str | None, job_id: str,
             **fields: object) -> None:
        with self._write() as conn:
            if self._end_in(conn, where, status, stage, progress, error, **fields) is None:
                raise LeaseLost(job_id)

    def _end_in(self, conn: Connection, where, status: Status, stage: Stage, progress: int,
                error: str | None, **fields: object) -> Job | None:
        """End the job `where` selects, in `conn`'s transaction; with a callback_url, its webhook goes into the
        outbox in the same transaction, so the delivery exists exactly when the end does."""
        row = conn.execute(
            update(jobs).where(where)
            .values(status=status.value, stage=stage.value, progress=progress, error=error, owner=None,
                    lease_until=None, updated_at=utc_now_iso(), events=jobs.c.events + 1,
                    webhook_status=case((jobs.c.callback_url.is_not(None), literal("pending")), else_=None),
                    **fields)
            .returning(*jobs.c)
        ).one_or_none()
        if row is None:
            return None
        job = self._logged(conn, row)
        if job.callback_url is not None:
            now = db_now()
            conn.execute(insert(webhook_deliveries).values(
                webhook_id="msg_" + secrets.token_hex(12), job_id=job.job_id, url=job.callback_url,
                payload=json.dumps(self.status_of(job)), state="pending", attempts=0, created_at=now,
                give_up_at=now + WEBHOOK_WINDOW_S, next_attempt_at=now))
        return job

    # -- the life cycle: cancel, delete ---------------------------------------------------------------------

    def request_cancel(self, job_id: str, scope: str | None = None) -> CancelOutcome | None:
        """A client's cancel: a queued job ends at once (error, CANCELLED) and never starts; a running one is
        flagged, which fences its owner's stage writes, and its owner fails it when it notices (at once when the
        owner is this process, else within its lease loop's period). None when there is no such job; a finished
        job is left as it is (`accepted` false). `scope`: the caller's (pipeline.lifecycle.caller_scope)."""
        mine = and_(jobs.c.job_id == job_id, _visible(), _in_scope(scope))
        with self._write() as conn:
            job = self._end_in(conn, and_(mine, jobs.c.status == Status.queued.value), Status.error, Stage.error, 0,
                               CANCELLED)
            if job is not None:
                return CancelOutcome(job, accepted=True)
            row = conn.execute(update(jobs).where(mine, jobs.c.status == Status.processing.value)
                               .values(cancel_requested=1).returning(*jobs.c)).one_or_none()
            if row is not None:
                return CancelOutcome(Job.from_row(row), accepted=True)
            row = conn.execute(select(jobs).where(mine)).one_or_none()
        return CancelOutcome(Job.from_row(row), accepted=False) if row is not None else None

    def mark_deleting(self, job_id: str, scope: str | None = None) -> Job | None:
        """Hide the job from clients for good, before its files go (see `purge`); None when there is none."""
        with self._write() as conn:
            row = conn.execute(update(jobs).where(jobs.c.job_id == job_id, _visible(), _in_scope(scope))
                               .values(deleting=1, cancel_requested=1).returning(*jobs.c)).one_or_none()
        return Job.from_row(row) if row is not None else None

    def mark_expired(self, limit: int = 500) -> int:
        """Mark up to `limit` finished jobs older than the retention for deletion (their webhooks settled first);
        returns how many. Marking first, then removing files, then rows, leaves nothing behind after a crash."""
        if self.retention_s is None:
            return 0
        with self._read() as conn:
            now_s = conn.execute(select(db_now())).scalar_one()
        cutoff = iso_of(now_s - self.retention_s)
        expired = (select(jobs.c.job_id)
                   .where(jobs.c.created_at < cutoff, jobs.c.status.not_in(ACTIVE), _visible(),
                          or_(jobs.c.webhook_status.is_(None), jobs.c.webhook_status.in_(("delivered", "failed"))))
                   .limit(limit).scalar_subquery())
        with self._write() as conn:
            return conn.execute(update(jobs).where(jobs.c.job_id.in_(expired)).values(deleting=1)).rowcount

    def purgeable(self, limit: int = 500, job_id: str | None = None) -> list[str]:
        """Jobs marked for deletion that nobody runs any more (of `job_id` alone, if given): their files, then
        their rows, may go."""
        query = select(jobs.c.job_id).where(jobs.c.deleting == 1, jobs.c.status.not_in(ACTIVE))
        if job_id is not None:
            query = query.where(jobs.c.job_id == job_id)
        with self._read() as conn:
            return list(conn.execute(query.order_by(jobs.c.job_id).limit(limit)).scalars())

    def drop(self, job_id: str) -> bool:
        """Delete a purgeable job's rows (call after its files are gone): the job, its events, its webhook
        deliveries and its idempotency keys."""
        with self._write() as conn:
            done = conn.execute(delete(jobs).where(jobs.c.job_id == job_id, jobs.c.deleting == 1,
                                                   jobs.c.status.not_in(ACTIVE))).rowcount
            if done:
                for table in (job_events, webhook_deliveries, idempotency_keys):
                    conn.execute(delete(table).where(table.c.job_id == job_id))
        return bool(done)

    def drop_expired_keys(self) -> int:
        with self._write() as conn:
            return conn.execute(delete(idempotency_keys)
                                .where(idempotency_keys.c.created_at <= db_now() - IDEMPOTENCY_TTL_S)).rowcount

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

    def status_of(self, job: Job) -> dict:
        """The status object of API.md §2: the job's fields by name, and when the job expires."""
        body = {name: getattr(job, name) for name in _row_status_fields()}
        body["expires_at"] = self.expires_at(job.created_at)
        return body

    def expires_at(self, created_at: str) -> str | None:
        """When the sweeper may remove a job made at `created_at` (API.md's form), or None: kept forever. Derived,
        not stored, so a new GROK3D_RETENTION_DAYS applies to every job at once."""
        if self.retention_s is None:
            return None
        return (datetime.fromisoformat(created_at) + timedelta(seconds=self.retention_s)).isoformat(
            timespec="microseconds")

    def list_jobs(self, scope: str | None, *, limit: int, before: tuple[str, str] | None = None,
             status: Status | None = None) -> list[Job]:
        """The caller's jobs, newest first (ties by id), after the cursor `before` (created_at, job_id) of the
        previous page: a keyset, so jobs inserted meanwhile (newer) never shift a later page."""
        query = select(jobs).where(_visible(), _in_scope(scope))
        if status is not None:
            query = query.where(jobs.c.status == status.value)
        if before is not None:
            created_at, job_id = before
            query = query.where(or_(jobs.c.created_at < created_at,
                                    and_(jobs.c.created_at == created_at, jobs.c.job_id < job_id)))
        with self._read() as conn:
            rows = conn.execute(query.order_by(jobs.c.created_at.desc(), jobs.c.job_id.desc()).limit(limit)).all()
        return [Job.from_row(row) for row in rows]

    def events_after(self, job_id: str, seq: int) -> list[tuple[int, str]]:
        """The job's state changes after `seq`, in order: (id, status object as JSON)."""
        with self._read() as conn:
            return [tuple(row) for row in conn.execute(
                select(job_events.c.seq, job_events.c.data)
                .where(job_events.c.job_id == job_id, job_events.c.seq > seq).order_by(job_events.c.seq))]

    def cancel_requests(self, owner: str) -> set[str]:
        """The jobs `owner` runs that a client asked to cancel (the lease loop's check, for cancels that arrive
        at another process)."""
        with self._read() as conn:
            return set(conn.execute(select(jobs.c.job_id).where(
                jobs.c.owner == owner, jobs.c.status == Status.processing.value, jobs.c.cancel_requested == 1)
            ).scalars())

    def existing(self, job_ids: list[str]) -> set[str]:
        """Which of `job_ids` have a row (hidden ones too): the orphan scan's question."""
        found: set[str] = set()
        with self._read() as conn:
            for start in range(0, len(job_ids), 500):
                found.update(conn.execute(select(jobs.c.job_id).where(
                    jobs.c.job_id.in_(job_ids[start:start + 500]))).scalars())
        return found

    def cancel_asked(self, lease: Lease) -> bool:
        """Whether `lease` still holds its job and a client asked to cancel it."""
        with self._read() as conn:
            return conn.execute(select(jobs.c.job_id).where(_fenced(lease, cancellable=False),
                                                            jobs.c.cancel_requested == 1)).first() is not None

    def holds(self, lease: Lease) -> bool:
        """Whether `lease` still holds: checked before a stage publishes a file."""
        with self._read() as conn:
            return conn.execute(select(jobs.c.job_id).where(_fenced(lease))).first() is not None

    def count_active(self) -> int:
        with self._read() as conn:
            return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status.in_(ACTIVE))).scalar_one()
