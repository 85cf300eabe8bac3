"""The pool's mechanics with real Blender workers: reset between requests, memory, queue limit, timeout, crash,
start failures and clean shutdown. One single-worker pool with a tiny bake serves most of the module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import trimesh

from converters.blender.pool import BlenderPool, default_python
from pipeline.errors import StageError, StageUnavailable
from tests.blender_helpers.meshes import blob_mesh, write_glb

pytestmark = pytest.mark.asyncio(loop_scope="module")

EMPTY = {"objects": 0, "meshes": 0, "materials": 0, "images": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[BlenderPool]:
    async with BlenderPool(workers=1, timeout_s=2.5, bake_size=64, queue_max=1, max_faces=150_000) as started:
        yield started


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blender-pool")


@pytest.fixture(scope="module")
def small_glb(work: Path) -> Path:
    return write_glb(blob_mesh(24), work / "small.glb")


@pytest.fixture(scope="module")
def glb_100k(work: Path) -> Path:
    return write_glb(blob_mesh(177), work / "blob100k.glb")


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie waiting for whoever adopted it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


async def test_blender_is_reset_and_memory_stays_flat_over_100_conversions(pool: BlenderPool, work: Path,
                                                                            small_glb: Path) -> None:
    first = await pool.convert_with_report(small_glb, work / "warmup.usdz")
    assert first.counts == EMPTY
    reports = []
    for i in range(100):
        reports.append(await pool.convert_with_report(small_glb, work / f"small-{i % 2}.usdz"))
    assert all(r.counts == EMPTY for r in reports)  # objects, meshes, materials, images back to zero each time
    assert {r.pid for r in reports} == {first.pid}  # one warm process did them all
    growth = reports[-1].rss_mb - first.rss_mb
    assert growth < 50.0, f"RSS grew {growth:.1f} MB over 100 conversions"


async def test_full_queue_is_a_clear_retryable_error(pool: BlenderPool, work: Path, small_glb: Path) -> None:
    attempts = [pool.convert(small_glb, work / f"queued-{i}.usdz") for i in range(3)]
    outcomes = await asyncio.gather(*attempts, return_exceptions=True)
    busy = [o for o in outcomes if isinstance(o, StageError)]
    assert busy and all("busy" in e.message and e.retryable for e in busy)
    assert any(o is None for o in outcomes)  # what fitted in the queue was converted


async def test_timeout_kills_and_replaces_the_worker(pool: BlenderPool, work: Path, glb_100k: Path) -> None:
    [before] = pool.worker_pids()
    with pytest.raises(StageError, match="longer than 2.5 seconds"):
        # A 4096 x 4096 bake of 100k faces takes ~7 s on this machine, far past the pool's 2.5 s timeout.
        await pool.convert_with_report(glb_100k, work / "slow.usdz", bake_size=4096)
    assert _gone(before)
    [after] = pool.worker_pids()
    assert after != before
    assert (await pool.ping()).pid == after


async def test_a_caller_that_gives_up_frees_its_worker_at_once(pool: BlenderPool, work: Path, glb_100k: Path,
                                                               small_glb: Path) -> None:
    """A cancelled job's conversion: the worker is killed before the caller's cancellation goes on (nothing it
    writes lands afterwards), and a fresh worker serves the next request."""
    [before] = pool.worker_pids()
    running = asyncio.create_task(pool.convert_with_report(glb_100k, work / "abandoned.usdz", bake_size=4096))
    await asyncio.sleep(0.5)  # into the bake, which would take ~7 s
    began = time.monotonic()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert time.monotonic() - began < 2.0
    assert _gone(before)
    assert not (work / "abandoned.usdz").exists()
    report = await pool.convert_with_report(small_glb, work / "after-abandon.usdz")
    assert report.pid != before and report.counts == EMPTY


async def test_crashed_worker_fails_its_request_and_is_replaced(pool: BlenderPool, work: Path, glb_100k: Path,
                                                               small_glb: Path) -> None:
    [before] = pool.worker_pids()
    running = asyncio.create_task(pool.convert(glb_100k, work / "crash.usdz"))
    await asyncio.sleep(0.3)
    os.kill(before, signal.SIGKILL)
    with pytest.raises(StageError, match="crashed"):
        await running
    report = await pool.convert_with_report(small_glb, work / "after-crash.usdz")
    assert report.pid != before and report.counts == EMPTY


async def test_too_many_faces_is_refused(pool: BlenderPool, work: Path) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=7, radius=0.25)  # 327,680 faces > the pool's 150,000
    sphere.visual.vertex_colors = np.tile([200, 80, 40, 255], (len(sphere.vertices), 1)).astype(np.uint8)
    glb = write_glb(sphere, work / "many-faces.glb")
    with pytest.raises(StageError, match=r"too many faces \(327680, at most 150000\); ask for a face_limit of at "
                                         r"most 150000, or a lower resolution\."):
        await pool.convert(glb, work / "many-faces.usdz")
    assert (await pool.ping()).counts == EMPTY


async def test_close_leaves_no_processes_or_files(small_glb: Path, work: Path) -> None:
    pool = BlenderPool(workers=2, timeout_s=60, bake_size=64)
    await pool.start()
    pids = pool.worker_pids()
    assert len(pids) == 2
    tmp_root = pool._tmp_root
    assert tmp_root is not None and tmp_root.is_dir()
    await pool.convert(small_glb, work / "before-close.usdz")
    await pool.close()
    assert all(_gone(pid) for pid in pids)
    assert not tmp_root.exists()
    with pytest.raises(StageUnavailable):
        await pool.convert(small_glb, work / "after-close.usdz")


async def test_workers_exit_when_the_service_process_is_killed(tmp_path: Path) -> None:
    """No orphans even without a clean close: a worker exits when its channel to the (dead) pool closes."""
    script = ("import asyncio, sys\n"
              "from converters.blender.pool import BlenderPool\n"
              "async def main():\n"
              "    pool = BlenderPool(workers=2, bake_size=64)\n"
              "    await pool.start()\n"
              "    print(*pool.worker_pids(), flush=True)\n"
              "    await asyncio.sleep(60)\n"
              "asyncio.run(main())\n")
    root = Path(__file__).resolve().parents[1]
    service = await asyncio.create_subprocess_exec(sys.executable, "-c", script, cwd=root,
                                                   stdout=asyncio.subprocess.PIPE)
    assert service.stdout is not None
    line = await asyncio.wait_for(service.stdout.readline(), 60)
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2 and not any(_gone(p) for p in pids)
    service.kill()
    await service.wait()
    for _ in range(100):
        if all(_gone(p) for p in pids):
            break
        await asyncio.sleep(0.1)
    assert all(_gone(p) for p in pids)


async def test_a_busy_worker_dies_with_the_service_process(tmp_path: Path, glb_100k: Path) -> None:
    """A worker in the middle of a conversion does not read its channel, so only the parent-death signal
    (pipeline/lifeline.py) ends it when the service process is killed: at once, not when its bake is done."""
    script = ("import asyncio, sys\n"
              "from pathlib import Path\n"
              "from converters.blender.pool import BlenderPool\n"
              "async def main():\n"
              "    pool = BlenderPool(workers=1, bake_size=64)\n"
              "    await pool.start()\n"
              "    print(*pool.worker_pids(), flush=True)\n"
              "    await pool.convert_with_report(Path(sys.argv[1]), Path(sys.argv[2]), bake_size=4096)\n"
              "asyncio.run(main())\n")
    root = Path(__file__).resolve().parents[1]
    service = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(glb_100k),
                                                   str(tmp_path / "slow.usdz"), cwd=root,
                                                   stdout=asyncio.subprocess.PIPE)
    assert service.stdout is not None
    [pid] = [int(p) for p in (await asyncio.wait_for(service.stdout.readline(), 60)).split()]
    await asyncio.sleep(1.0)  # into the bake: ~7 s for a 4096 x 4096 bake of 100k faces on this machine
    service.kill()
    await service.wait()
    for _ in range(20):
        if _gone(pid):
            break
        await asyncio.sleep(0.1)
    survived = not _gone(pid)
    if survived:
        os.kill(pid, signal.SIGKILL)
    assert not survived, "the worker outlived the service process"
    assert not (tmp_path / "slow.usdz").exists()  # it was cut off, not finished


async def test_start_fails_clearly_without_a_blender_interpreter(tmp_path: Path) -> None:
    with pytest.raises(StageUnavailable, match="not installed"):
        await BlenderPool(workers=1, python=tmp_path / "no-python").start()
    # A real interpreter without bpy: the worker dies while importing Blender, start() says so.
    broken = BlenderPool(workers=1, python=sys.executable)
    with pytest.raises(StageUnavailable, match="could not start"):
        await broken.start()
    await broken.close()


async def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The service builds its pool from pipeline.settings, the one place the environment is read."""
    from pipeline.backends import converter
    from pipeline.settings import Settings

    monkeypatch.setenv("GROK3D_BLENDER_WORKERS", "3")
    monkeypatch.setenv("GROK3D_CONVERT_TIMEOUT_S", "42")
    monkeypatch.setenv("GROK3D_BAKE_SIZE", "0")
    monkeypatch.setenv("GROK3D_BLENDER_PYTHON", str(tmp_path / "py"))
    pool = converter(Settings())
    assert (pool.workers, pool.timeout_s, pool.bake_size, pool.python) == (3, 42.0, 0, tmp_path / "py")
    monkeypatch.delenv("GROK3D_BLENDER_PYTHON")
    assert converter(Settings()).python == Path(__file__).resolve().parents[1] / ".venv-blender" / "bin" / "python"
    assert default_python() == Path(__file__).resolve().parents[1] / ".venv-blender" / "bin" / "python"