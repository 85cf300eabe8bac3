"""What a new job may cost: the service's daily ceiling (GROK3D_DAILY_JOB_LIMIT, in both modes) and, for a key, its
jobs in flight and its jobs per day.

Each limit is counted in the jobs table itself, inside the transaction that inserts the job (JobStore.create's
`admit`), so what is counted cannot change before the insert and every replica sharing the store counts the same
jobs. One job is one paid image, so "jobs per day" is the cost limit. Days are UTC days, from 00:00 UTC, on the
clock that stamps `created_at`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import Connection, func, select

from pipeline.db import jobs
from pipeline.jobs import ACTIVE
from pipeline.keys import ApiKey
from pipeline.ratelimit import RateStatus


class LimitExceeded(Exception):
    """A limit refuses the request: `message` names it and when it resets; `rate` is that limit for the
    RateLimit fields, and its reset is the Retry-After."""

    def __init__(self, message: str, rate: RateStatus) -> None:
        super().__init__(message)
        self.message = message
        self.rate = rate


def _day_start() -> tuple[str, int]:
    """Today's 00:00 UTC in `created_at`'s form, and the whole seconds until the next one."""
    now = datetime.now(timezone.utc)
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    left = (start + timedelta(days=1) - now).total_seconds()
    return start.replace(tzinfo=None).isoformat(timespec="microseconds"), max(1, int(left) + 1)


def _in_words(seconds: int) -> str:
    hours, minutes = divmod(max(1, seconds // 60), 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _count(conn: Connection, *where) -> int:
    return conn.execute(select(func.count()).select_from(jobs).where(*where)).scalar_one()


@dataclass(frozen=True)
class Quotas:
    """`daily_job_limit`: the service's jobs per UTC day, whoever submits them (0: no ceiling)."""

    daily_job_limit: int
    retry_after_s: int  # when a key's jobs in flight are full: nothing says when one ends, so a fixed pause

    def admission(self, key: ApiKey | None) -> Callable[[Connection], None] | None:
        """The check a new job of `key` (None: open mode) must pass, for JobStore.create."""
        if key is None and not self.daily_job_limit:
            return None
        return lambda conn: self._admit(conn, key)

    def _admit(self, conn: Connection, key: ApiKey | None) -> None:
        day, resets_in = _day_start()
        if self.daily_job_limit and _count(conn, jobs.c.created_at >= day) >= self.daily_job_limit:
            raise LimitExceeded(
                f"The service's daily job limit is reached ({self.daily_job_limit} jobs per day); it resets at "
                f"00:00 UTC, in {_in_words(resets_in)}", RateStatus(self.daily_job_limit, 0, resets_in, False))
        if key is None:
            return
        today = _count(conn, jobs.c.api_key_id == key.id, jobs.c.created_at >= day)
        if today >= key.jobs_per_day:
            raise LimitExceeded(
                f"This key's daily job limit is reached ({key.jobs_per_day} jobs per day); it resets at 00:00 UTC, "
                f"in {_in_words(resets_in)}", RateStatus(key.jobs_per_day, 0, resets_in, False))
        in_flight = _count(conn, jobs.c.api_key_id == key.id, jobs.c.status.in_(ACTIVE))
        if in_flight >= key.max_in_flight:
            raise LimitExceeded(
                f"This key's limit of jobs in flight is reached ({key.max_in_flight} queued or processing); it "
                "frees up as soon as one of them finishes",
                RateStatus(key.max_in_flight, 0, max(1, self.retry_after_s), False))
