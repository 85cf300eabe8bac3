"""Runs jobs through their stages.

One dispatcher per process claims jobs from the store (atomically, with a lease) and runs each in its own task.
Stage concurrency is bounded per stage. Each stage reads the previous stage's file and writes its own atomically
before the job's row moves forward, so after a crash a job resumes at the first stage whose file is missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TypeVar

from pipeline.errors import StageError
from pipeline.jobs import Job, JobStore, Stage, process_owner_id
from pipeline.stages import ModelState, Stages
from pipeline.storage import Asset, AssetStore, publish, temp_path_for

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
    ) -> None:
        self.store = store
        self.assets = assets
        self.stages = stages
        self.owner = process_owner_id()
        self._image_slots = asyncio.Semaphore(image_concurrency)
        self._reconstruct_slots = asyncio.Semaphore(reconstruct_concurrency)
        self._max_running = max_running
        self._poll_s = poll_s
        self._retries = retries
        self._retry_backoff_s = retry_backoff_s
        self._model_wait_s = model_wait_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []

    # -- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="grok3d-dispatch"),
            asyncio.create_task(self._lease_loop(), name="grok3d-leases"),
        ]

    async def stop(self) -> None:
        """Stop taking jobs and cancel the running ones; their leases lapse and they resume after a restart."""
        tasks = [*self._loops, *self._running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loops.clear()

    def wake(self) -> None:
        """A job was submitted: claim it now rather than at the next poll."""
        self._wake.set()

    # -- dispatch -------------------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            while len(self._running) < self._max_running:
                job = await asyncio.to_thread(self.store.claim, self.owner, exclude=set(self._running))
                if job is None:
                    break
                task = asyncio.create_task(self._run(job), name=f"job-{job.job_id}")
                self._running[job.job_id] = task
                task.add_done_callback(lambda _t, jid=job.job_id: self._running.pop(jid, None))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            except TimeoutError:
                pass

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(self.store.lease_s / 3)
            if self._running:
                await asyncio.to_thread(self.store.renew_leases, self.owner)

    # -- one job --------------------------------------------------------------------------------------------

    async def _run(self, job: Job) -> None:
        jid = job.job_id
        log.info("job %s claimed (status=%s stage=%s)", jid, job.status.value, job.stage.value)
        self.assets.remove_temporaries(jid)
        stage = Stage.initializing
        try:
            stage = Stage.generating_image
            if not (self.assets.has(jid, Asset.image) and self.assets.has(jid, Asset.input)):
                await self._timed(job, stage, 10, 30, lambda: self._image_stage(job), self._image_slots)
            stage = Stage.generating_3d
            if not self.assets.has(jid, Asset.glb):
                await self._timed(job, stage, 40, 70, lambda: self._reconstruct_stage(job), self._reconstruct_slots)
            stage = Stage.converting_usdz
            if not self.assets.has(jid, Asset.usdz):
                await self._timed(job, stage, 80, 95, lambda: self._convert_stage(job))
            self.store.finish(jid, self.owner)
            log.info("job %s complete", jid)
        except asyncio.CancelledError:
            log.info("job %s interrupted in %s; it resumes after a restart", jid, stage.value)
            raise
        except StageError as exc:
            self.store.fail(jid, self.owner, exc.message)
            log.warning("job %s failed in %s: %s", jid, stage.value, exc.message)
        except Exception:
            log.exception("job %s failed in %s with an unexpected error", jid, stage.value)
            self.store.fail(jid, self.owner, UNEXPECTED.get(stage, "The job failed: an internal error occurred."))

    async def _timed(
        self,
        job: Job,
        stage: Stage,
        start_progress: int,
        end_progress: int,
        work: Callable[[], Awaitable[None]],
        slots: AbstractAsyncContextManager | None = None,
    ) -> None:
        async with slots or nullcontext():
            self.store.advance(job.job_id, self.owner, stage, start_progress)
            log.info("job %s stage %s started", job.job_id, stage.value)
            began = time.monotonic()
            await self._with_retries(work, job, stage)
            self.store.advance(job.job_id, self.owner, stage, end_progress)
            log.info("job %s stage %s done in %.2f s", job.job_id, stage.value, time.monotonic() - began)

    async def _with_retries(self, work: Callable[[], Awaitable[T]], job: Job, stage: Stage) -> T:
        """Retry a stage that failed for a passing reason (overload, rate limit), then give up with its sentence."""
        for attempt in range(self._retries + 1):
            try:
                return await work()
            except StageError as exc:
                if not exc.retryable or attempt == self._retries:
                    raise
                delay = self._retry_backoff_s * 2**attempt
                log.warning("job %s stage %s: %s (retry %d in %.1f s)", job.job_id, stage.value, exc.message,
                            attempt + 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _image_stage(self, job: Job) -> None:
        jid = job.job_id
        if self.assets.has(jid, Asset.image):  # made before a restart
            jpeg = await asyncio.to_thread(self.assets.read, jid, Asset.image)
        else:
            jpeg = await self.stages.image.generate_image(job.prompt)
            await asyncio.to_thread(self.assets.write, jid, Asset.image, jpeg)
            self.store.advance(jid, self.owner, Stage.generating_image, 20)
        png = await self.stages.prepare.prepare_image(jpeg)
        await asyncio.to_thread(self.assets.write, jid, Asset.input, png)

    async def _reconstruct_stage(self, job: Job) -> None:
        await self._wait_for_model()
        png = await asyncio.to_thread(self.assets.read, job.job_id, Asset.input)
        result = await self.stages.reconstruct.reconstruct(png)
        await asyncio.to_thread(self.assets.write, job.job_id, Asset.glb, result.glb)
        self.store.advance(job.job_id, self.owner, Stage.generating_3d, 70, model_version=result.model_version)

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

    async def _convert_stage(self, job: Job) -> None:
        target = self.assets.path(job.job_id, Asset.usdz)
        tmp = temp_path_for(target)
        try:
            await self.stages.convert.convert(self.assets.path(job.job_id, Asset.glb), tmp)
            await asyncio.to_thread(publish, tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
