"""The job store and the orchestrator in-process, on both engines (real SQLite files, a real PostgreSQL server):
claims, fenced leases, the queue bound, migrations, retries, resumption."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import shutil
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import event, select

import pipeline.db

from pipeline import schemas
from pipeline.db import SEED_REVISION, current_revision, head_revision, db_now, jobs, sqlite_url
from pipeline.errors import StageError
from pipeline.jobs import (Job, JobStore, Lease, LeaseLost, QueueFull, Stage, Status, local_owner_prefix, pid_scope,
                           process_owner_id)
from pipeline.orchestrator import Orchestrator
from pipeline.stages import ModelState, ModelStatus, Reconstruction, Stages
from pipeline.storage import Asset, AssetStore
from tests.postgres import sent_statements
from tests.stages import BoxReconstructor, CopyPrepare, SleepyImage, ZipConverter


DATA = Path(__file__).parent / "data"


def open_store(path: Path, **kwargs) -> JobStore:
    return JobStore(sqlite_url(path), **kwargs)


def lease_of(job: Job) -> Lease:
    return Lease(job.job_id, job.owner, job.attempt)


def _claim_all(url: str, owner: str, out: multiprocessing.Queue) -> None:
    store = JobStore(url)
    got = []
    while (job := store.claim(owner)) is not None:
        got.append(job.job_id)
    out.put(got)
    store.close()


def test_two_processes_never_claim_the_same_job(store_url):
    store = JobStore(store_url)
    ids = {store.create(f"p{i}", queue_max=1000).job_id for i in range(200)}
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(store_url, f"host-x:{n}:n", out)) for n in range(2)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert sorted(claimed[0] + claimed[1]) == sorted(ids)
    assert not set(claimed[0]) & set(claimed[1])
    store.close()


def test_lease_expiry_and_dead_owner_free_a_job(store_url):
    store = JobStore(store_url, lease_s=2.0)  # long enough that a loaded machine claims twice in it
    job = store.create("x", queue_max=10)
    assert store.claim("other-host:1:n").job_id == job.job_id
    assert store.claim("me-host:2:n") is None  # leased
    time.sleep(2.1)
    assert store.claim("me-host:2:n").job_id == job.job_id  # the lease lapsed

    long_leases = JobStore(store_url, lease_s=600)
    job2 = long_leases.create("y", queue_max=10)
    dead = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    dead.start()
    dead.join()
    others = {job.job_id}
    assert long_leases.claim(f"{pid_scope()}:{dead.pid}:0a0a0a0a", exclude=others).job_id == job2.job_id
    # Its owner (a pid of this pid namespace) is gone: the job is free at once, long before the lease ends.
    taken = long_leases.claim(f"{pid_scope()}:{os.getpid()}:0b0b0b0b", exclude=others)
    assert taken.job_id == job2.job_id and taken.attempt == 2
    # Owners of other machines, or of this one in another pid namespace (a container with the same host name),
    # are judged by their leases alone, even when their pid is free here.
    for stranger in (f"elsewhere~0:{dead.pid}:0c0c0c0c", f"{socket.gethostname()}~ffffffff:{dead.pid}:0d0d0d0d"):
        theirs = long_leases.create("z", queue_max=10)
        assert long_leases.claim(stranger, exclude=others).job_id == theirs.job_id
    assert long_leases.claim(f"{pid_scope()}:{os.getpid()}:0e0e0e0e", exclude=others | {job2.job_id}) is None
    store.close()
    long_leases.close()


def test_owner_ids_are_unique_per_process_even_with_the_same_pid():
    ids = {process_owner_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith(local_owner_prefix()) and i.split(":")[1] == str(os.getpid()) for i in ids)


def test_the_queue_bound_holds_across_replicas(store_url):
    """Eight replicas (each its own engine and connections) submit at once: exactly GROK3D_QUEUE_MAX get in."""
    replicas = [JobStore(store_url) for _ in range(8)]
    accepted, refused = [], []
    start = threading.Barrier(len(replicas))

    def submit(store: JobStore) -> None:
        start.wait()
        for _ in range(4):
            try:
                accepted.append(store.create("x", queue_max=10).job_id)
            except QueueFull:
                refused.append(1)

    threads = [threading.Thread(target=submit, args=(store,)) for store in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(accepted) == 10 and len(refused) == 22
    assert replicas[0].count_active() == 10
    for store in replicas:
        store.close()


def test_replicas_starting_together_migrate_once(new_store_url):
    url = new_store_url()
    start = threading.Barrier(6)
    opened: list[JobStore] = []
    errors: list[BaseException] = []

    def open_replica() -> None:
        start.wait()
        try:
            opened.append(JobStore(url))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_replica) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(opened) == 6
    assert {current_revision(store.engine) for store in opened} == {head_revision()}
    assert opened[0].create("x", queue_max=1) and opened[5].count_active() == 1
    for store in opened:
        store.close()


def test_a_claim_is_one_statement_on_postgresql_and_leases_run_on_the_database_clock(store_url):
    store = JobStore(store_url, lease_s=30)
    store.create("x", queue_max=10)
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", record)
    job = store.claim("me:1:n")
    event.remove(store.engine, "before_cursor_execute", record)
    writes = [s for s in statements if s.lstrip().upper().startswith("UPDATE")]
    assert len(writes) == 1
    if store.postgresql:
        assert "FOR UPDATE SKIP LOCKED" in writes[0]
    with store.engine.connect() as conn:
        now = conn.execute(select(db_now())).scalar_one()
    assert 29.0 < job.lease_until - now <= 30.0
    store.close()


def test_a_postgresql_read_is_one_statement_and_a_restart_of_the_server_is_survived(postgres, monkeypatch):
    """A status read on PostgreSQL is its SELECT alone: no BEGIN and ROLLBACK (autocommit), no ping of a connection
    in use. A connection idle past PING_AFTER_IDLE_S is pinged first, so a server restart meanwhile costs no
    request: the dead connection is replaced before the read."""
    monkeypatch.setattr(pipeline.db, "PING_AFTER_IDLE_S", 0.2)
    store = JobStore(postgres.new_database())
    job = store.create("x", queue_max=10)
    with store.engine.connect() as conn:  # the pool's one connection: LIFO hands it out again
        dbapi_connection = conn.connection.dbapi_connection
    with sent_statements(dbapi_connection) as hot:
        assert store.get(job.job_id) == job
        assert store.list_jobs(None, limit=5) == [job]
    assert hot == ["SELECT", "SELECT"]
    time.sleep(0.3)
    with sent_statements(dbapi_connection) as idle:
        store.get(job.job_id)
    assert idle == [";", "SELECT"]  # the ping, an empty query

    postgres.restart()
    time.sleep(0.3)
    assert store.get(job.job_id) == job  # on a new connection
    assert store.create("y", queue_max=10).status is Status.queued
    store.close()


def test_queue_bound_and_monotonic_progress(store_url):
    store = JobStore(store_url)
    for _ in range(2):
        store.create("x", queue_max=2)
    with pytest.raises(QueueFull):
        store.create("x", queue_max=2)
    job = store.claim("h:1")
    lease = lease_of(job)
    store.advance(lease, Stage.generating_3d, 40)
    store.advance(lease, Stage.generating_3d, 10)  # a lower progress is ignored
    assert store.get(job.job_id).progress == 40
    with pytest.raises(LeaseLost):
        store.advance(Lease(job.job_id, "h:2", lease.attempt), Stage.converting_usdz, 80)  # not the owner
    with pytest.raises(ValueError, match="move back"):  # stages never move back: enforced, not just said
        store.advance(lease, Stage.generating_image, 20)
    assert store.get(job.job_id).stage is Stage.generating_3d
    store.finish(lease)
    with pytest.raises(LeaseLost):  # a finished job takes no more writes
        store.advance(lease, Stage.converting_usdz, 80)
    assert store.create("x", queue_max=2)  # a finished job frees its place


def test_a_taken_over_lease_fences_every_write_of_the_old_owner(store_url):
    store = JobStore(store_url, lease_s=0.2)
    job = store.create("x", queue_max=10)
    first = lease_of(store.claim("a:1:x"))
    time.sleep(0.3)
    second = lease_of(store.claim("b:2:y"))
    assert second.attempt == first.attempt + 1
    for write in (lambda: store.advance(first, Stage.generating_image, 10), lambda: store.finish(first),
                  lambda: store.fail(first, "late")):
        with pytest.raises(LeaseLost):
            write()
    assert not store.holds(first) and store.holds(second)
    assert store.renew_leases("a:1:x") == {}
    assert store.renew_leases("b:2:y") == {job.job_id: second.attempt}
    store.finish(second)
    assert store.get(job.job_id).status is Status.complete


def test_the_job_is_written_down_once():
    """The table is the definition: Job is its row field for field, and the status object is made of Job's
    fields (with the same names), but for `expires_at`, derived from created_at and the retention."""
    assert [f.name for f in dataclasses.fields(Job)] == list(jobs.c.keys())
    assert set(schemas.JobStatus.model_fields) - {"expires_at"} <= set(jobs.c.keys())


def test_a_data_folder_made_by_the_seed_is_migrated_in_place(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA / "seed-store", data)
    before = sqlite3.connect(data / "grok3d.db").execute(
        "SELECT job_id, prompt, status, stage, progress, created_at, error, model_version FROM jobs ORDER BY job_id"
    ).fetchall()
    assert len(before) == 4
    store = open_store(data / "grok3d.db", lease_s=5)
    assert current_revision(store.engine) is not None and current_revision(store.engine) != SEED_REVISION
    after = [(j.job_id, j.prompt, j.status.value, j.stage.value, j.progress, j.created_at, j.error, j.model_version)
             for j in (store.get(row[0]) for row in before)]
    assert after == before
    assert store.get("ba5f0513").model_version == "triposr:0123456789ab"
    # The seed's running and queued jobs resume: their old leases lapsed long ago.
    claimed = {store.claim("me:1:a").job_id for _ in range(3)}
    assert claimed == {"edabddfa", "db142e3f", "d80ec564"}
    store.close()
    reopened = open_store(data / "grok3d.db")  # a second open finds nothing to migrate
    assert reopened.get("edabddfa").attempt == 1
    reopened.close()


BROKEN = ("The 3D model could not be generated: the connection to the TripoSR service failed, please try again "
          "later.")


class Flaky:
    """Fails `failures` times with a retryable error (a broken connection to the TripoSR service), then works."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def status(self) -> ModelStatus:
        return ModelStatus(ModelState.ready, version="test:flaky")

    async def reconstruct(self, image_png: bytes, resolution: int | None = None) -> Reconstruction:
        self.calls += 1
        if self.calls <= self.failures:
            raise StageError(BROKEN, retryable=True)
        return await BoxReconstructor().reconstruct(image_png, resolution)


async def _run_one(tmp_path: Path, url: str, reconstructor, prompt: str = "cube") -> tuple[JobStore, str]:
    store = JobStore(url)
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


async def test_a_passing_failure_is_retried_then_succeeds(tmp_path, store_url):
    flaky = Flaky(failures=2)
    store, job_id = await _run_one(tmp_path, store_url, flaky)
    assert store.get(job_id).status is Status.complete
    assert flaky.calls == 3


async def test_a_lasting_failure_becomes_a_clear_job_error(tmp_path, store_url):
    flaky = Flaky(failures=100)
    store, job_id = await _run_one(tmp_path, store_url, flaky)
    job = store.get(job_id)
    assert job.status is Status.error and job.stage is Stage.error and job.progress == 0
    assert job.error == BROKEN
    assert flaky.calls == 3  # the first try and two retries
    assert AssetStore(tmp_path / "jobs").has(job_id, Asset.image)  # the image it made is kept


async def test_a_failed_model_fails_the_job_with_its_reason(tmp_path, store_url):
    class Broken(Flaky):
        async def status(self) -> ModelStatus:
            return ModelStatus(ModelState.failed, detail="model.ckpt: corrupt")

    store, job_id = await _run_one(tmp_path, store_url, Broken(0))
    assert store.get(job_id).error == ("The 3D model could not be generated: the TripoSR model is not loaded "
                                       "(model.ckpt: corrupt).")


class MarkedImage:
    """Draws a picture that says which orchestrator made it; the first call of a stalling one blocks its whole
    event loop (a stalled process: no lease renewals either) until `release` is set."""

    def __init__(self, mark: int, release: threading.Event | None = None) -> None:
        self.mark, self.release, self.calls = mark, release, 0

    async def generate_image(self, prompt: str) -> bytes:
        self.calls += 1
        if self.release is not None:
            self.release.wait(60)
        from PIL import Image
        import io
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (self.mark, 0, 0)).save(buf, "JPEG", quality=100)
        return buf.getvalue()


class CountingBox(BoxReconstructor):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def reconstruct(self, image_png: bytes, resolution: int | None = None) -> Reconstruction:
        self.calls += 1
        return await super().reconstruct(image_png, resolution)


async def test_a_stalled_owner_is_taken_over_and_its_late_writes_change_nothing(tmp_path, store_url, caplog):
    """Two orchestrators on one store. The first stalls in its image stage past the lease; the second takes the job
    over and completes it; when the first wakes, its writes are refused and it stops that job's work."""
    jobs_dir = tmp_path / "jobs"
    release = threading.Event()
    first_image, first_model = MarkedImage(10, release), CountingBox()
    second_image, second_model = MarkedImage(250), CountingBox()
    store_a, store_b = JobStore(store_url, lease_s=0.6), JobStore(store_url, lease_s=0.6)
    job = store_b.create("cube", queue_max=10)

    loop_a = asyncio.new_event_loop()
    thread_a = threading.Thread(target=loop_a.run_forever, daemon=True)
    thread_a.start()
    orch_a = Orchestrator(store_a, AssetStore(jobs_dir), Stages(first_image, CopyPrepare(), first_model,
                                                                ZipConverter()), poll_s=0.05)
    asyncio.run_coroutine_threadsafe(orch_a.start(), loop_a).result(10)
    for _ in range(200):  # the first one claims it and stalls in the image stage
        if first_image.calls:
            break
        await asyncio.sleep(0.02)
    assert store_b.get(job.job_id).attempt == 1

    orch_b = Orchestrator(store_b, AssetStore(jobs_dir), Stages(second_image, CopyPrepare(), second_model,
                                                                ZipConverter()), poll_s=0.05)
    await orch_b.start()
    try:
        for _ in range(500):
            if store_b.get(job.job_id).status is Status.complete:
                break
            await asyncio.sleep(0.02)
        done = store_b.get(job.job_id)
        assert done.status is Status.complete and done.attempt == 2
        release.set()  # the first one wakes up and tries to carry on
        for _ in range(200):
            if "lease of attempt 1 lost" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert "lease of attempt 1 lost" in caplog.text
        await asyncio.sleep(0.3)
        assert store_b.get(job.job_id) == done  # nothing the first one did changed the row
    finally:
        await orch_b.stop()
        asyncio.run_coroutine_threadsafe(orch_a.stop(), loop_a).result(10)
        loop_a.call_soon_threadsafe(loop_a.stop)
        thread_a.join(10)
    from PIL import Image
    image = Image.open(AssetStore(jobs_dir).path(job.job_id, Asset.image)).convert("RGB")
    assert image.getpixel((16, 16))[0] > 200  # the second one's picture, not the first one's
    assert first_model.calls == 0 and second_model.calls == 1  # the job completed exactly once


class HeldImage(SleepyImage):
    """An image stage that waits, without blocking its event loop, until the test lets it go on."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.go = asyncio.Event(), asyncio.Event()

    async def generate_image(self, prompt: str) -> bytes:
        self.started.set()
        await self.go.wait()
        return await super().generate_image(prompt)


async def test_leases_are_renewed_while_the_shared_thread_pool_is_busy(tmp_path, store_url):
    """A busy replica (the store calls of many jobs and of every route queued in asyncio's shared thread pool)
    keeps the leases it holds: the lease loop's calls have a thread of their own."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    # Renewed every lease_s/3: a 1.2 s lease leaves 0.8 s for one renewal's write to stall on a loaded machine
    # (a fsync behind the other tests' writes), where 0.6 s once lapsed in a full run.
    store, rival = JobStore(store_url, lease_s=1.2), JobStore(store_url, lease_s=1.2)
    image = HeldImage()
    orch = Orchestrator(store, AssetStore(tmp_path / "jobs"), Stages(image, CopyPrepare(), BoxReconstructor(),
                                                                      ZipConverter()), poll_s=0.05)
    job = store.create("cube", queue_max=10)
    await orch.start()
    try:
        await asyncio.wait_for(image.started.wait(), 10)
        busy = loop.run_in_executor(None, time.sleep, 3.6)  # the shared pool's one thread, for three leases' time
        await asyncio.sleep(3.4)
        assert rival.claim("rival:1:x") is None  # the lease was renewed meanwhile: nothing to take over
        await busy
        image.go.set()
        for _ in range(500):
            if store.get(job.job_id).status is Status.complete:
                break
            await asyncio.sleep(0.02)
    finally:
        await orch.stop()
    assert store.get(job.job_id).status is Status.complete and store.get(job.job_id).attempt == 1


def test_a_cancelled_queued_job_never_starts_and_a_sweep_resumes_after_a_crash(tmp_path, store_url):
    from pipeline.jobs import CANCELLED
    from pipeline.lifecycle import Lifecycle

    store = JobStore(store_url, retention_s=3600)
    assets = AssetStore(tmp_path / "jobs")
    job = store.create("x", queue_max=10)
    outcome = store.request_cancel(job.job_id)
    assert outcome.accepted and (outcome.job.status, outcome.job.error) == (Status.error, CANCELLED)
    assert store.claim("h:1:a") is None  # it never starts
    assert not store.request_cancel(job.job_id).accepted  # finished now

    # A delete that crashed after hiding the job, with its files still there: the next sweep finishes it.
    assets.write(job.job_id, Asset.image, b"jpeg")
    assert store.mark_deleting(job.job_id) is not None
    assert store.get(job.job_id) is None and store.list_jobs(None, limit=10) == []
    # A folder whose row is gone (a crash of an older version, a hand): the sweep removes it too.
    (tmp_path / "jobs" / "0ddba11a").mkdir()
    report = Lifecycle(store, assets, orchestrator=None).sweep()  # type: ignore[arg-type]
    assert (report.purged, report.orphans) == (1, 1)
    assert list((tmp_path / "jobs").iterdir()) == [] and store.existing([job.job_id]) == set()
    assert Lifecycle(store, assets, orchestrator=None).sweep() == report.__class__(0, 0, 0, 0)  # type: ignore[arg-type]
