"""The job store and the orchestrator in-process, on real SQLite files: claims, leases, retries, resumption."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from pipeline.errors import StageError
from pipeline.jobs import JobStore, QueueFull, Stage, Status
from pipeline.orchestrator import Orchestrator
from pipeline.stages import ModelState, ModelStatus, Reconstruction, Stages
from pipeline.storage import Asset, AssetStore
from tests.stages import BoxReconstructor, CopyPrepare, SleepyImage, ZipConverter


def _claim_all(db: str, owner: str, out: multiprocessing.Queue) -> None:
    store = JobStore(Path(db))
    got = []
    while (job := store.claim(owner)) is not None:
        got.append(job.job_id)
    out.put(got)


def test_two_processes_never_claim_the_same_job(tmp_path):
    store = JobStore(tmp_path / "grok3d.db")
    ids = {store.create(f"p{i}", queue_max=1000).job_id for i in range(200)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path / "grok3d.db"), f"host-x:{n}", out)) for n in range(2)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)
    assert not set(claimed[0]) & set(claimed[1])


def test_lease_expiry_and_dead_owner_free_a_job(tmp_path):
    store = JobStore(tmp_path / "grok3d.db", lease_s=0.3)
    job = store.create("x", queue_max=10)
    assert store.claim("other-host:1").job_id == job.job_id
    assert store.claim("me-host:2") is None  # leased
    time.sleep(0.4)
    assert store.claim("me-host:2").job_id == job.job_id  # the lease lapsed

    store2 = JobStore(tmp_path / "b.db", lease_s=600)
    job2 = store2.create("y", queue_max=10)
    import socket
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    assert store2.claim(f"{socket.gethostname()}:{dead.pid}").job_id == job2.job_id
    # Its owner (a pid on this host) is gone: the job is free at once, long before the lease ends.
    assert store2.claim(f"{socket.gethostname()}:{os.getpid()}").job_id == job2.job_id


def test_queue_bound_and_monotonic_progress(tmp_path):
    store = JobStore(tmp_path / "grok3d.db")
    for _ in range(2):
        store.create("x", queue_max=2)
    with pytest.raises(QueueFull):
        store.create("x", queue_max=2)
    job = store.claim("h:1")
    assert store.advance(job.job_id, "h:1", Stage.generating_3d, 40)
    assert store.advance(job.job_id, "h:1", Stage.generating_3d, 10)  # a lower progress is ignored
    assert store.get(job.job_id).progress == 40
    assert not store.advance(job.job_id, "h:2", Stage.converting_usdz, 80)  # not the owner
    assert store.finish(job.job_id, "h:1")
    assert store.create("x", queue_max=2)  # a finished job frees its place


class Flaky:
    """Fails `failures` times with a retryable error (like an overloaded TripoSR service), then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def status(self) -> ModelStatus:
        return ModelStatus(ModelState.ready, version="test:flaky")

    async def reconstruct(self, image_png: bytes) -> Reconstruction:
        self.calls += 1
        if self.calls <= self.failures:
            raise StageError("The 3D model could not be generated: the TripoSR service is overloaded, please try "
                             "again later.", retryable=True)
        return await BoxReconstructor().reconstruct(image_png)


async def _run_one(tmp_path: Path, reconstructor, prompt: str = "cube") -> tuple[JobStore, str]:
    store = JobStore(tmp_path / "grok3d.db")
    assets = AssetStore(tmp_path / "jobs")
    orch = Orchestrator(store, assets, Stages(SleepyImage(), CopyPrepare(), reconstructor, ZipConverter()),
                        retries=2, retry_backoff_s=0.01, poll_s=0.05)
    job = store.create(prompt, queue_max=10)
    await orch.start()
    try:
        for _ in range(400):
            if store.get(job.job_id).status in (Status.complete, Status.error):
                break
            await asyncio.sleep(0.02)
    finally:
        await orch.stop()
    return store, job.job_id


async def test_overload_is_retried_then_succeeds(tmp_path):
    flaky = Flaky(failures=2)
    store, job_id = await _run_one(tmp_path, flaky)
    assert store.get(job_id).status is Status.complete
    assert flaky.calls == 3


async def test_persistent_overload_becomes_a_clear_job_error(tmp_path):
    flaky = Flaky(failures=100)
    store, job_id = await _run_one(tmp_path, flaky)
    job = store.get(job_id)
    assert job.status is Status.error and job.stage is Stage.error and job.progress == 0
    assert job.error == ("The 3D model could not be generated: the TripoSR service is overloaded, please try again "
                         "later.")
    assert flaky.calls == 3  # the first try and two retries
    assert AssetStore(tmp_path / "jobs").has(job_id, Asset.image)  # the image it made is kept


async def test_a_failed_model_fails_the_job_with_its_reason(tmp_path):
    class Broken(Flaky):
        async def status(self) -> ModelStatus:
            return ModelStatus(ModelState.failed, detail="model.ckpt: corrupt")

    store, job_id = await _run_one(tmp_path, Broken(0))
    assert store.get(job_id).error == ("The 3D model could not be generated: the TripoSR model is not loaded "
                                       "(model.ckpt: corrupt).")
