"""Runs jobs through their stages.

One dispatcher per process claims jobs from the store (a compare-and-set with a lease and an attempt number) and
runs each in its own task. Stage concurrency is bounded per stage. Each stage reads the previous stage's file and
writes its own atomically before the job's row moves forward, so after a crash a job resumes at the first stage
whose file is missing.

Leases hold: every store write names the job's lease (owner and attempt), and a write under a lease that was
taken over changes nothing and raises `LeaseLost`. The lease loop notices a lost lease too (its renewal no longer
returns the job) and cancels that job's task, so a process that stalled past its lease stops working on the job
instead of racing the new owner; a stage also checks the lease right before it publishes a file.

A client's cancel (pipeline/lifecycle.py) reaches the job's task the same way: at once when it arrives at this
process (`cancel`), else through the lease loop, which also asks the store for cancel requests of the jobs it runs.
The task is cancelled wherever it waits (the xAI call, the TripoSR batch, the Blender conversion, whose worker the
pool kills and replaces), and the job ends as `error` with "Cancelled by the client" through the fenced `fail`, the
one write the store still takes from its owner once a cancel is asked. Files being written when the cancel comes
are finished first, so nothing of the job is written after it ended.

Store calls are blocking, so they run in a thread: the event loop serves requests meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import partial
from typing import TypeVar

from pipeline.errors import StageError
from pipeline.formats import AssetTarget, FormatError, FormatMaker
from pipeline.jobs import CANCELLED, Job, JobStore, Lease, LeaseLost, Source, Stage, process_owner_id
from pipeline.meshes import finish_glb, mesh_report
from pipeline.retry import RetryPolicy
from pipeline.stages import ModelState, Stages
from pipeline.storage import Asset, AssetStore

log = logging.getLogger("grok3d.jobs")
T = TypeVar("T")

# What the user reads when a stage fails for a reason we did not foresee (the traceback goes to the log).
UNEXPECTED = {
    Stage.generating_image: "The image could not be generated: an internal error occurred, please try again.",
    Stage.generating_3d: "The 3D model could not be generated: an internal error occurred, please try again.",
    Stage.converting_usdz: "The USDZ file could not be made: an internal error occurred, please try again.",
}


class Orchestrator:
    def __init__(
        self,
        store: JobStore,
        assets: AssetStore,
        stages: Stages,
        *,
        image_concurrency: int = 4,
        reconstruct_concurrency: int = 16,
        max_running: int = 100,
        poll_s: float = 1.0,
        retries: int = 3,
        retry_backoff_s: float = 2.0,
        model_wait_s: float = 1.0,
        on_end: Callable[[str], None] | None = None,
        formats: FormatMaker | None = None,
    ) -> None:
        self.store = store
        # The preview is made with the USDZ, through the maker the asset route uses: never twice at once.
        self._formats = formats or FormatMaker(stages.convert)
        self.assets = assets
        self.stages = stages
        self.owner = process_owner_id()
        self._image_slots = asyncio.Semaphore(image_concurrency)
        self._reconstruct_slots = asyncio.Semaphore(reconstruct_concurrency)
        self._max_running = max_running
        self._poll_s = poll_s
        # A stage that failed for a passing reason (a broken connection) goes again, on the one retry policy.
        self._retry = RetryPolicy(max_retries=retries, backoff_base_s=retry_backoff_s)
        self._model_wait_s = model_wait_s
        self._running: dict[str, tuple[Lease, asyncio.Task[None]]] = {}
        self._lost: set[str] = set()  # jobs cancelled here because another owner took them over
        self._cancelled: set[str] = set()  # jobs cancelled here because a client asked
        self._on_end = on_end  # told the id of each job that ended here (its webhook is due)
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        # The lease loop's store calls get a thread of their own: in the shared pool (asyncio.to_thread) a renewal
        # would queue behind the store calls of up to max_running jobs and of every route, and a busy replica could
        # lose leases it holds.
        self._lease_thread: ThreadPoolExecutor | None = None

    # -- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._lease_thread = ThreadPoolExecutor(1, thread_name_prefix="grok3d-leases")
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="grok3d-dispatch"),
            asyncio.create_task(self._lease_loop(), name="grok3d-leases"),
        ]

    async def stop(self) -> None:
        """Stop taking jobs and cancel the running ones; their leases lapse and they resume after a restart."""
        tasks = [*self._loops, *(task for _, task in self._running.values())]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()
        if self._lease_thread is not None:
            self._lease_thread.shutdown(wait=False)

    def wake(self) -> None:
        """A job was submitted: claim it now rather than at the next poll."""
        self._wake.set()

    async def _db(self, method: Callable[..., T], *args, **kwargs) -> T:
        return await asyncio.to_thread(partial(method, *args, **kwargs))

    async def _has(self, job_id: str, asset: Asset) -> bool:
        """A stat of a file, or a HEAD request to object storage: off the event loop either way."""
        return await asyncio.to_thread(self.assets.has, job_id, asset)

    # -- dispatch -------------------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            while len(self._running) < self._max_running:
                job = await self._db(self.store.claim, self.owner, exclude=set(self._running))
                if job is None:
                    break
                lease = Lease(job.job_id, self.owner, job.attempt)
                task = asyncio.create_task(self._run(job, lease), name=f"job-{job.job_id}")
                self._running[job.job_id] = (lease, task)
                task.add_done_callback(lambda _t, jid=job.job_id: self._forget(jid))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            except TimeoutError:
                pass

    def _forget(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._lost.discard(job_id)
        self._cancelled.discard(job_id)

    def cancel(self, job_id: str) -> asyncio.Task[None] | None:
        """Stop a job this process runs, for a client's cancel (already recorded in the store); its task, to await
        the end, or None when the job does not run here."""
        entry = self._running.get(job_id)
        if entry is None:
            return None
        _, task = entry
        if not task.done() and job_id not in self._cancelled:
            log.info("job %s: cancelled by the client", job_id)
            self._cancelled.add(job_id)
            task.cancel(msg="cancelled by the client")
        return task

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_s / 3)
            if self._running:
                held = await self._lease_call(self.store.renew_leases, self.owner)
                self._stop_lost(held)
                for job_id in await self._lease_call(self.store.cancel_requests, self.owner):
                    self.cancel(job_id)

    async def _lease_call(self, method: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._lease_thread, partial(method, *args))

    def _stop_lost(self, held: dict[str, int]) -> None:
        """Cancel the jobs whose lease this owner no longer holds (taken over while this process stalled)."""
        for job_id, (lease, task) in list(self._running.items()):
            if held.get(job_id) != lease.attempt and not task.done():
                log.warning("job %s: lease of attempt %d lost to another owner; its work here stops", job_id,
                            lease.attempt)
                self._lost.add(job_id)
                task.cancel(msg="lease lost")

    # -- one job --------------------------------------------------------------------------------------------

    async def _run(self, job: Job, lease: Lease) -> None:
        jid = job.job_id
        log.info("job %s claimed, attempt %d (status=%s stage=%s)", jid, lease.attempt, job.status.value,
                 job.stage.value)
        stage = Stage.initializing
        if job.cancel_requested:  # asked before this claim (its former owner died, or it was being deleted)
            await self._fail(lease, CANCELLED)
            return
        try:
            await asyncio.to_thread(self.assets.remove_temporaries, jid)
            stage = Stage.generating_image
            if not (await self._has(jid, Asset.image) and await self._has(jid, Asset.input)):
                await self._timed(job, lease, stage, 10, 30, lambda: self._image_stage(job, lease),
                                  self._image_slots)
            stage = Stage.generating_3d
            if not await self._has(jid, Asset.glb):
                await self._timed(job, lease, stage, 40, 70, lambda: self._reconstruct_stage(job, lease),
                                  self._reconstruct_slots)
            stage = Stage.converting_usdz
            if not await self._has(jid, Asset.usdz):
                await self._timed(job, lease, stage, 80, 95, lambda: self._convert_stage(job, lease))
            elif not await self._has(jid, Asset.preview):  # interrupted between the USDZ and its preview
                await self._preview(job)
            glb = await asyncio.to_thread(self.assets.read, jid, Asset.glb)
            await self._db(self.store.finish, lease, mesh=await asyncio.to_thread(mesh_report, glb))
            self._ended(jid)
            log.info("job %s complete", jid)
        except asyncio.CancelledError:
            if jid in self._cancelled:
                await self._fail(lease, CANCELLED)
                log.info("job %s cancelled by the client in %s", jid, stage.value)
                return
            if jid not in self._lost:  # a lost lease was logged where it was found
                log.info("job %s interrupted in %s; it resumes after a restart", jid, stage.value)
            raise
        except LeaseLost:
            if await self._db(self.store.cancel_asked, lease):  # the cancel fenced a stage write
                await self._fail(lease, CANCELLED)
                log.info("job %s cancelled by the client in %s", jid, stage.value)
                return
            log.warning("job %s: lease of attempt %d lost to another owner in %s; its work here stops", jid,
                        lease.attempt, stage.value)
        except StageError as exc:
            await self._fail(lease, exc.message)
            log.warning("job %s failed in %s: %s", jid, stage.value, exc.message)
        except Exception:
            log.exception("job %s failed in %s with an unexpected error", jid, stage.value)
            await self._fail(lease, UNEXPECTED.get(stage, "The job failed: an internal error occurred."))

    async def _fail(self, lease: Lease, message: str) -> None:
        try:
            await self._db(self.store.fail, lease, message)
        except LeaseLost:
            log.warning("job %s: lease lost before its failure could be recorded; the new owner decides",
                        lease.job_id)
            return
        self._ended(lease.job_id)

    def _ended(self, job_id: str) -> None:
        if self._on_end is not None:
            self._on_end(job_id)

    async def _timed(
        self,
        job: Job,
        lease: Lease,
        stage: Stage,
        start_progress: int,
        end_progress: int,
        work: Callable[[], Awaitable[None]],
        slots: AbstractAsyncContextManager | None = None,
    ) -> None:
        async with slots or nullcontext():
            await self._db(self.store.advance, lease, stage, start_progress)
            log.info("job %s stage %s started", job.job_id, stage.value)
            began = time.monotonic()
            await self._retry.run(work, retry_on=_passing, on_retry=partial(_log_retry, job, stage))
            await self._db(self.store.advance, lease, stage, end_progress)
            log.info("job %s stage %s done in %.2f s", job.job_id, stage.value, time.monotonic() - began)

    async def _publish(self, lease: Lease, asset: Asset, data: bytes) -> None:
        """Write a job's file, if this owner still holds the job: a stale owner never overwrites the new one's."""
        if not await self._db(self.store.holds, lease):
            raise LeaseLost(lease.job_id)
        await _uninterrupted(asyncio.to_thread(self.assets.write, lease.job_id, asset, data))

    async def _image_stage(self, job: Job, lease: Lease) -> None:
        jid = job.job_id
        if job.source is Source.upload:
            # No xAI call: the client's picture (its JPEG is the job's image already) is framed as it was sent,
            # so that its transparency is the cut-out.
            picture = await asyncio.to_thread(self.assets.read, jid, Asset.upload)
        elif await self._has(jid, Asset.image):  # made before a restart
            picture = await asyncio.to_thread(self.assets.read, jid, Asset.image)
        else:
            picture = await self.stages.image.generate_image(job.prompt)
            await self._publish(lease, Asset.image, picture)
            await self._db(self.store.advance, lease, Stage.generating_image, 20)
        png = await self.stages.prepare.prepare_image(picture)
        await self._publish(lease, Asset.input, png)

    async def _reconstruct_stage(self, job: Job, lease: Lease) -> None:
        await self._wait_for_model()
        png = await asyncio.to_thread(self.assets.read, job.job_id, Asset.input)
        result = await self.stages.reconstruct.reconstruct(png, job.resolution)
        # The job's face limit and size (pipeline/meshes.py), before anything is made from the GLB.
        glb = await asyncio.to_thread(finish_glb, result.glb, face_limit=job.face_limit, size_m=job.size_m)
        await self._publish(lease, Asset.glb, glb)
        # The version comes with the mesh, from the batch that made it.
        await self._db(self.store.advance, lease, Stage.generating_3d, 70, model_version=result.model_version)

    async def _wait_for_model(self) -> None:
        """Jobs accepted while the model loads wait for it here."""
        while True:
            status = await self.stages.reconstruct.status()
            if status.state is ModelState.ready:
                return
            if status.state is not ModelState.loading:
                raise StageError(f"The 3D model could not be generated: the TripoSR model is not loaded "
                                 f"({status.detail or status.state.value}).")
            await asyncio.sleep(self._model_wait_s)

    async def _convert_stage(self, job: Job, lease: Lease) -> None:
        """Blender works on local files: the GLB (itself in a folder store, a scratch copy of the object otherwise)
        in, a scratch file out, which is then published whole."""
        jid = job.job_id
        tmp = self.assets.scratch_path(jid, Asset.usdz)
        copy = self.assets.local_copy(jid, Asset.glb)
        try:
            glb = await asyncio.to_thread(copy.__enter__)
            try:
                await self.stages.convert.convert(glb, tmp)
            finally:
                await asyncio.to_thread(copy.__exit__, None, None, None)
            if not await self._db(self.store.holds, lease):
                raise LeaseLost(jid)
            await _uninterrupted(asyncio.to_thread(self.assets.publish_file, jid, Asset.usdz, tmp))
        finally:
            tmp.unlink(missing_ok=True)
        await self._db(self.store.advance, lease, Stage.converting_usdz, 90)
        await self._preview(job)

    async def _preview(self, job: Job) -> None:
        """The render shown in job lists: a job without one is still complete (the page shows its image)."""
        try:
            await self._formats.ensure(AssetTarget(self.assets, job.job_id, Asset.preview), Asset.preview)
        except FormatError as exc:
            log.warning("job %s: no preview (%s)", job.job_id, exc.message)


async def _uninterrupted(work: Awaitable[T]) -> T:
    """`await work`, which a cancel does not cut short: a file write in a thread goes on after its awaiter is
    cancelled, so the task waits for it before it ends (then the cancel goes on). Nothing is written after the job
    ended, and a delete that follows the cancel finds every file."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


def _passing(exc: BaseException) -> bool:
    return isinstance(exc, StageError) and exc.retryable


def _log_retry(job: Job, stage: Stage, exc: BaseException, number: int, wait_s: float) -> None:
    log.warning("job %s stage %s: %s (retry %d in %.1f s)", job.job_id, stage.value, exc, number, wait_s)
