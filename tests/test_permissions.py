"""Files grok3d writes get the permissions the umask gives (0644 under 022), not a temporary file's private 0600
(issue 12): job files of the real `bentoml serve`, promoted examples, and the `grok3d` command's downloads."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from pipeline.storage import current_umask, publish, temp_path_for, write_atomic
from tests.server import ROOT, Server, wait_job

SERVER_UMASK = 0o027  # not the usual 022, so the test tells "the umask's mode" from a fixed 0644


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def with_umask(mask: int) -> dict:
    """subprocess options that start the child with `mask` as its umask."""
    return {"preexec_fn": lambda: os.umask(mask)}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key"}
    srv = Server(tmp_path_factory.mktemp("modes"), env)
    srv.command = ["sh", "-c", f'umask {SERVER_UMASK:03o} && exec "$@"', "sh", *srv.command]
    with srv:
        yield srv


@pytest.fixture(scope="module")
def job_id(server: Server) -> str:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        job = client.post("/api/generate", json={"prompt": "a red teapot"}).json()["job_id"]
        assert wait_job(client, job)["status"] == "complete"
    return job


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """Set this process's umask for one test; put back after it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def test_job_files_get_the_servers_umask(server: Server, job_id: str) -> None:
    folder = server.data_dir / "jobs" / job_id
    # A format made on request is published like the stages' files.
    assert httpx.get(f"{server.url}/api/jobs/{job_id}/model.stl", timeout=30).status_code == 200
    files = sorted(p.name for p in folder.iterdir())
    # No temporary file left either.
    assert files == ["image.jpg", "input.png", "model.glb", "model.stl", "model.usdz", "preview.jpg"]
    for name in files:
        assert mode(folder / name) == 0o666 & ~SERVER_UMASK == 0o640, name


def test_promoted_examples_get_the_umask(server: Server, job_id: str) -> None:
    env = {**os.environ, "GROK3D_DATA_DIR": str(server.data_dir)}
    done = subprocess.run([sys.executable, "-m", "pipeline.examples", "promote", job_id, "--name", "Teapot",
                           "--description", "A teapot"], cwd=ROOT, env=env, capture_output=True, text=True,
                          **with_umask(0o022))
    assert done.returncode == 0, done.stderr
    examples = server.data_dir / "examples"
    for path in [examples / "catalog.json", *(examples / "teapot").iterdir()]:
        assert mode(path) == 0o644, path


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)],
                         ids=["umask-022", "umask-027", "umask-077"])
def test_cli_downloads_get_the_users_umask(server: Server, job_id: str, tmp_path: Path, mask: int,
                                           expected: int) -> None:
    out = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if k != "GROK3D_SERVER"}
    done = subprocess.run([sys.executable, "-m", "grok3d_cli", "generate", "a blue chair", "-o", str(out),
                           "--server", server.url], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          **with_umask(mask))
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no .part file left
    assert [mode(p) for p in paths] == [expected] * 3


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=["umask-022", "umask-027", "umask-002"])
def test_write_atomic_and_publish_follow_the_umask(umask: Callable[[int], int], tmp_path: Path, mask: int) -> None:
    umask(mask)
    assert current_umask() == mask
    write_atomic(tmp_path / "a.bin", b"data")
    assert mode(tmp_path / "a.bin") == 0o666 & ~mask
    # A producer that made its file private (tempfile.mkstemp does): publishing gives it the umask's mode.
    target = tmp_path / "model.usdz"
    tmp = temp_path_for(target)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    publish(tmp, target)
    assert mode(target) == 0o666 & ~mask and not tmp.exists()
