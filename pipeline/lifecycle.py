"""The job life cycle behind the routes of API.md §5-§8: the caller's scope, cancel, delete, retention.

- Cancel: the store records the request (a queued job ends at once; a running one is flagged, which fences its
  owner's stage writes), then the owning orchestrator stops the job's task: at once when it runs in this process,
  else within a third of the lease from that owner's lease loop.
- Delete and retention remove a job in three steps, each of which a crash may interrupt without leaving anything
  behind: the row is marked (and so hidden from clients at once), the job's folder is removed whatever is in it,
  then the rows (the job, its events, webhook deliveries and idempotency keys) go. A sweep finds the marked rows
  whose folder or rows are left and finishes them, and removes job folders that have no row at all: the sweep is
  resumable, and no file outlives its row.
- The sweeper runs at start-up and every GROK3D_SWEEP_INTERVAL_S in every process (its steps are idempotent, so
  replicas may overlap): it marks finished jobs older than GROK3D_RETENTION_DAYS, once their webhook has settled,
  finishes every marked job, removes orphan folders, drops idempotency keys past their 24 hours, and removes the
  local scratch copies that processes which have ended left behind (object storage: pipeline/objectstore.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from fastapi import Request

from pipeline.auth import CALLER_SCOPE

from pipeline.jobs import CancelOutcome, JobStore, Status
from pipeline.orchestrator import Orchestrator
from pipeline.storage import AssetStore, is_job_id

log = logging.getLogger("grok3d.lifecycle")

# How long a cancel or delete answer waits for the job's task in this process to stop (it stops at the next await;
# a file being written is finished first).
STOP_WAIT_S = 30.0


def caller_scope(request: Request) -> str | None:
    """The jobs the caller may see and act on: None (open mode) means every job; in keys mode, the caller's key
    (as pipeline.auth.Gate.enter, which every route calls first, left it in the request)."""
    return request.scope.get(CALLER_SCOPE)


def scope_key(scope: str | None) -> str:
    """The scope as the idempotency table keeps it ("" for open mode: a unique key treats NULLs as distinct)."""
    return scope or ""


@dataclass(frozen=True)
class SweepReport:
    expired: int
    purged: int
    orphans: int
    keys: int
    scratch: int = 0  # scratch folders of ended processes (or staged files of a crash) removed


class Lifecycle:
    def __init__(self, store: JobStore, assets: AssetStore, orchestrator: Orchestrator, *,
                 sweep_interval_s: float = 600.0) -> None:
        self.store = store
        self.assets = assets
        self.orchestrator = orchestrator
        self.sweep_interval_s = sweep_interval_s
        self._sweeper: asyncio.Task[None] | None = None
        self._purges: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="grok3d-sweeper")

    async def stop(self) -> None:
        tasks = [t for t in (self._sweeper, *self._purges) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- cancel and delete ----------------------------------------------------------------------------------

    async def cancel(self, job_id: str, scope: str | None) -> CancelOutcome | None:
        """Record the cancel and stop the job here if it runs here; the job as it stands afterwards."""
        outcome = await asyncio.to_thread(self.store.request_cancel, job_id, scope)
        if outcome is None or not outcome.accepted or outcome.job.status is not Status.processing:
            return outcome
        if await self._stop_here(job_id):
            job = await asyncio.to_thread(self.store.get, job_id)
            if job is not None:
                return CancelOutcome(job, accepted=True)
        return outcome

    async def delete(self, job_id: str, scope: str | None) -> bool:
        """Cancel the job if it runs, hide it, and remove its files and rows (False: no such job). A job that runs
        in another process is removed by the sweep once its owner has stopped it."""
        if await asyncio.to_thread(self.store.request_cancel, job_id, scope) is None:
            return False
        if await asyncio.to_thread(self.store.mark_deleting, job_id, scope) is None:
            return False  # deleted by a concurrent request meanwhile
        await self._stop_here(job_id)
        await self.purge(job_id)
        return True

    async def _stop_here(self, job_id: str) -> bool:
        task = self.orchestrator.cancel(job_id)
        if task is None:
            return False
        await asyncio.wait({task}, timeout=STOP_WAIT_S)
        return True

    def job_ended(self, job_id: str) -> None:
        """The orchestrator's word that a job ended here: a job being deleted can go now."""
        task = asyncio.get_running_loop().create_task(self.purge(job_id))
        self._purges.add(task)
        task.add_done_callback(self._purges.discard)

    async def purge(self, job_id: str) -> bool:
        """Remove a marked job nobody runs: its folder, then its rows."""
        if not await asyncio.to_thread(self.store.purgeable, 1, job_id):
            return False
        return await asyncio.to_thread(self._purge, job_id)

    def _purge(self, job_id: str) -> bool:
        try:
            self.assets.delete_job(job_id)
        except OSError as exc:  # its row stays marked: the next sweep tries again
            log.error("job %s: its files could not be removed (%s); the next sweep tries again", job_id, exc)
            return False
        dropped = self.store.drop(job_id)
        if dropped:
            log.info("job %s deleted with its files", job_id)
        return dropped

    # -- the sweep ------------------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        while True:
            try:
                report = await asyncio.to_thread(self.sweep)
                if report.expired or report.purged or report.orphans or report.scratch:
                    log.info("sweep: %d jobs expired, %d removed with their files, %d orphan folders removed, "
                             "%d leftovers of ended processes removed",
                             report.expired, report.purged, report.orphans, report.scratch)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("sweep failed; the next one goes on")
            await asyncio.sleep(self.sweep_interval_s)

    def sweep(self) -> SweepReport:
        """One resumable pass (blocking: call it in a thread)."""
        expired = 0
        while (marked := self.store.mark_expired()) > 0:
            expired += marked
        purged = 0
        while batch := self.store.purgeable():
            done = sum(1 for job_id in batch if self._purge(job_id))
            purged += done
            if done == 0:
                break  # only folders that cannot be removed are left: logged, and tried again next time
        return SweepReport(expired, purged, self._remove_orphans(), self.store.drop_expired_keys(),
                           self._remove_stale_temporaries())

    def _remove_stale_temporaries(self) -> int:
        try:
            return self.assets.remove_stale_temporaries()
        except OSError as exc:  # local leftovers: never a reason to stop the sweep
            log.error("sweep: scratch leftovers could not be removed (%s); the next sweep tries again", exc)
            return 0

    def _remove_orphans(self) -> int:
        """Job folders without a row: left by a crash between a row's removal and its folder's (not possible in
        the order above, but a deleted job's file write in flight, or an older version's crash, could), or by a
        hand. A folder of a job being created cannot be here: the row is written before any file."""
        names = self.assets.job_ids()
        known = self.store.existing(names)
        removed = 0
        for name in names:
            if name not in known:
                try:
                    self.assets.delete_job(name)
                except OSError as exc:
                    log.error("sweep: the files of job %s, which has no row, could not be removed (%s)", name, exc)
                    continue
                removed += 1
                log.warning("sweep: removed the folder of job %s, which has no row", name)
        return removed

