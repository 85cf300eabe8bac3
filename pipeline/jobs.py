"""A job, its state machine, and the SQLite store that keeps it.

The store is the one source of truth shared by every process: a job is inserted (durably) before the client
hears its id, claimed with one atomic UPDATE that sets an owner and a lease, and moved forward stage by stage.
A lease that runs out (its owner died) makes the job claimable again, so it resumes elsewhere or after a restart.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from pipeline.storage import new_job_id


class Status(str, Enum):
    queued = "queued"
    processing = "processing"
    complete = "complete"
    error = "error"


class Stage(str, Enum):
    initializing = "initializing"
    generating_image = "generating_image"
    generating_3d = "generating_3d"
    converting_usdz = "converting_usdz"
    complete = "complete"
    error = "error"


# Stages only move forward: a stage's rank is its position in a job's life.
STAGE_ORDER = [Stage.initializing, Stage.generating_image, Stage.generating_3d, Stage.converting_usdz, Stage.complete]
ACTIVE = (Status.queued.value, Status.processing.value)


class QueueFull(Exception):
    """GROK3D_QUEUE_MAX jobs are queued or running."""


@dataclass(frozen=True)
class Job:
    job_id: str
    prompt: str
    status: Status
    stage: Stage
    progress: int
    created_at: str
    error: str | None = None
    model_version: str | None = None
    owner: str | None = None


def utc_now_iso() -> str:
    """API.md's timestamp form: UTC, microseconds, no zone suffix."""
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds")


def process_owner_id() -> str:
    """host:pid — enough to tell, on this host, whether the owner of a lease is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's job: only its lease can tell
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id        TEXT PRIMARY KEY,
    prompt        TEXT NOT NULL,
    status        TEXT NOT NULL,
    stage         TEXT NOT NULL,
    progress      INTEGER NOT NULL,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    error         TEXT,
    model_version TEXT,
    owner         TEXT,
    lease_until   REAL
);
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (created_at) WHERE status IN ('queued', 'processing');
"""

_COLUMNS = "job_id, prompt, status, stage, progress, created_at, error, model_version, owner"
_GET = f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?"  # the status poll: one primary-key lookup


def _row_to_job(row: tuple) -> Job:
    job_id, prompt, status, stage, progress, created_at, error, model_version, owner = row
    return Job(job_id, prompt, Status(status), Stage(stage), progress, created_at, error, model_version, owner)


class JobStore:
    """SQLite in WAL mode. One connection per store, guarded by a lock: every statement is a short indexed one."""

    def __init__(self, path: Path, *, lease_s: float = 60.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.lease_s = lease_s
        self._lock = threading.Lock()
        # isolation_level=None: we issue BEGIN ourselves, so each write is exactly one transaction.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job is on disk before the client hears of it
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writes ---------------------------------------------------------------------------------------------

    def create(self, prompt: str, *, queue_max: int) -> Job:
        """Insert a queued job, unless `queue_max` jobs are already queued or running (QueueFull)."""
        now = utc_now_iso()
        with self._lock:
            for _ in range(20):  # 8 hex digits: a collision is rare, and simply retried
                job_id = new_job_id()
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    active = self._db.execute(
                        "SELECT count(*) FROM jobs WHERE status IN (?, ?)", ACTIVE
                    ).fetchone()[0]
                    if active >= queue_max:
                        self._db.execute("ROLLBACK")
                        raise QueueFull()
                    self._db.execute(
                        "INSERT INTO jobs (job_id, prompt, status, stage, progress, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, 0, ?, ?)",
                        (job_id, prompt, Status.queued.value, Stage.initializing.value, now, now),
                    )
                    self._db.execute("COMMIT")
                    return Job(job_id, prompt, Status.queued, Stage.initializing, 0, now)
                except sqlite3.IntegrityError:
                    self._db.execute("ROLLBACK")
        raise RuntimeError("could not allocate a unique job id")

    def claim(self, owner: str, *, exclude: set[str] = frozenset()) -> Job | None:
        """Atomically take the oldest runnable job: queued, or processing with a lapsed lease or a dead owner."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT job_id, owner, lease_until FROM jobs WHERE status IN (?, ?) ORDER BY created_at",
                    ACTIVE,
                ).fetchall()
                for job_id, old_owner, lease_until in rows:
                    if job_id in exclude:
                        continue
                    free = old_owner is None or (lease_until or 0) < now or (
                        old_owner != owner and _owner_is_dead(old_owner)
                    )
                    if not free:
                        continue
                    row = self._db.execute(
                        f"UPDATE jobs SET owner = ?, lease_until = ?, status = ?,"
                        f" progress = max(progress, 5), updated_at = ? WHERE job_id = ? RETURNING {_COLUMNS}",
                        (owner, now + self.lease_s, Status.processing.value, utc_now_iso(), job_id),
                    ).fetchone()
                    self._db.execute("COMMIT")
                    return _row_to_job(row)
                self._db.execute("COMMIT")
                return None
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def renew_leases(self, owner: str) -> int:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET lease_until = ? WHERE owner = ? AND status = ?",
                (time.time() + self.lease_s, owner, Status.processing.value),
            )
            return cur.rowcount

    def advance(self, job_id: str, owner: str, stage: Stage, progress: int, **fields: str | None) -> bool:
        """Move a running job forward. Never backwards: a stage or progress below the stored one is ignored."""
        assignments = "".join(f", {name} = ?" for name in fields)
        with self._lock:
            cur = self._db.execute(
                f"UPDATE jobs SET stage = ?, progress = max(progress, ?), updated_at = ?{assignments}"
                " WHERE job_id = ? AND owner = ? AND status = ?",
                (stage.value, progress, utc_now_iso(), *fields.values(), job_id, owner, Status.processing.value),
            )
            return cur.rowcount == 1

    def finish(self, job_id: str, owner: str) -> bool:
        return self._end(job_id, owner, Status.complete, Stage.complete, 100, None)

    def fail(self, job_id: str, owner: str, error: str) -> bool:
        return self._end(job_id, owner, Status.error, Stage.error, 0, error)

    def _end(self, job_id: str, owner: str, status: Status, stage: Stage, progress: int, error: str | None) -> bool:
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, stage = ?, progress = ?, error = ?, owner = NULL, lease_until = NULL,"
                " updated_at = ? WHERE job_id = ? AND owner = ? AND status = ?",
                (status.value, stage.value, progress, error, utc_now_iso(), job_id, owner, Status.processing.value),
            )
            return cur.rowcount == 1

    # -- reads ----------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(_GET, (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def count_active(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM jobs WHERE status IN (?, ?)", ACTIVE).fetchone()[0]
