"""The TripoSR service through the real `bentoml serve`: adaptive batching, model versions from the store, a broken
or missing checkpoint, overload. A tiny TripoSR with seeded random weights stands in for the official one."""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import time
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from runners.triposr.loading import write_random_checkpoint
from tests.server import ROOT, Server, wait_job
from tests.test_api import assert_error

FAST = {"TRIPOSR_MC_RESOLUTION": "32", "TRIPOSR_MC_THRESHOLD": "0.5", "TRIPOSR_DEVICE": "cpu"}
REAL_MODEL = {"GROK3D_STAGES": "tests.stages:real_model", "XAI_API_KEY": "test-key"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("model") / "tiny", config="tiny", seed=0)


def import_model(src: Path, home: Path) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([sys.executable, "-m", "runners.triposr", "import-model", str(src)], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _jobs(srv: Server, prompts: list[str], concurrent: bool) -> list[dict]:
    """Submit jobs (all at once, or each after the last finished) and return their final statuses."""
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        if concurrent:
            ids = [c.post("/api/generate", json={"prompt": p}).json()["job_id"] for p in prompts]
            return [wait_job(c, i, timeout_s=300) for i in ids]
        return [wait_job(c, c.post("/api/generate", json={"prompt": p}).json()["job_id"], timeout_s=300)
                for p in prompts]


def maps_torch(srv: Server) -> bool:
    """Whether the TripoSR worker has PyTorch's library mapped: imported torch, that is."""
    return "libtorch" in Path(f"/proc/{srv.worker('triposr').pid}/maps").read_text()


def _glb(srv: Server, job_id: str) -> bytes:
    r = httpx.get(f"{srv.url}/api/asset/{job_id}", params={"asset_type": "glb"})
    assert r.status_code == 200
    return r.content


@pytest.fixture(scope="module")
def batching(tiny, tmp_path_factory) -> Iterator[tuple[Server, str]]:
    """One server for the batching tests: the API service, whose 3D stage calls the TripoSR service like production
    does, with the model imported into the BentoML store (TRIPOSR_MODEL: triposr:latest); and the model's tag."""
    data = tmp_path_factory.mktemp("batching")
    tag = import_model(tiny, data / "bentoml")
    env = {**FAST, **REAL_MODEL, "TRIPOSR_MAX_BATCH_SIZE": "4", "TRIPOSR_MAX_LATENCY_MS": "120000",
           "GROK3D_QUEUE_MAX": "300", "GROK3D_RECONSTRUCT_CONCURRENCY": "16"}
    with Server(data, env, ready="/readyz") as srv:
        yield srv, tag


def test_batches_form_and_every_answer_equals_the_one_at_a_time_answer(batching):
    srv, tag = batching
    assert re.fullmatch(r"triposr:[0-9a-f]{12}", tag)
    prompts = [f"block {i}" for i in range(4)]
    start = len(srv.log())
    alone = _jobs(srv, prompts, concurrent=False)
    together = _jobs(srv, prompts * 2, concurrent=True)
    assert all(j["status"] == "complete" and j["model_version"] == tag for j in alone + together)
    alone_glbs = [_glb(srv, j["job_id"]) for j in alone]
    together_glbs = [_glb(srv, j["job_id"]) for j in together]
    log = srv.log()[start:]
    metrics = httpx.get(srv.url + "/metrics").text
    assert maps_torch(srv)  # what the worker without a checkpoint is spared (test below)
    assert all(glb[:4] == b"glTF" for glb in alone_glbs)
    assert together_glbs == alone_glbs * 2  # byte for byte: batching changes nothing in the result
    sizes = [int(n) for n in re.findall(r"TripoSR batch of (\d+)", log)]
    assert max(sizes) > 1, sizes
    assert sum(sizes) == 12
    assert "bentoml_service_adaptive_batch_size" in metrics


def test_more_than_a_hundred_calls_through_the_dependency_all_succeed(batching):
    """BentoML replaces a dependency's connection every 100 requests by default, closing it under the requests in
    flight ("Server disconnected"); the TripoSR service's runner_connection setting keeps it. 110 jobs: 110 calls
    of the API service to the TripoSR service on this test's account alone, 16 at a time."""
    srv, _ = batching
    jobs = _jobs(srv, [f"block {i % 8}" for i in range(110)], concurrent=True)
    log = srv.log()
    assert [j["status"] for j in jobs] == ["complete"] * 110, [j.get("error") for j in jobs if j.get("error")][:3]
    assert "Server disconnected" not in log and "closing transport" not in log


def test_a_budget_far_below_one_batch_still_completes_every_job(tiny, tmp_path):
    """BentoML's real "process is overloaded" (a latency budget far below one batch's duration): the client's
    window shrinks to what the service can answer, the shed pictures go again, and no job fails for it."""
    env = {**FAST, **REAL_MODEL, "TRIPOSR_MODEL": str(tiny), "TRIPOSR_MAX_LATENCY_MS": "5",
           "TRIPOSR_MC_RESOLUTION": "48"}
    with Server(tmp_path, env, ready="/readyz") as srv:
        jobs = _jobs(srv, [f"block {i}" for i in range(12)], concurrent=True)
    assert [j["status"] for j in jobs] == ["complete"] * 12, [j["error"] for j in jobs]


def test_status_answers_at_once_while_a_batch_runs(tiny, tmp_path):
    """The real TripoSR service, served alone: its status is answered on the event loop while a batch holds the
    thread that sync APIs share (BentoML's `threads`, 1 by default: _bentoml_impl/server/app.py)."""
    import base64
    import threading

    from PIL import Image

    env = {**FAST, "TRIPOSR_MODEL": str(tiny), "TRIPOSR_MC_RESOLUTION": "224"}
    server = Server(tmp_path, env, service="runners.triposr.service:TripoSRService", ready="/readyz")
    server.command = [sys.executable, "-m", "bentoml", "serve", "runners.triposr.service:TripoSRService",
                      "--port", str(server.port), "--host", "127.0.0.1"]
    png = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(png, "PNG")
    picture = {"data": base64.b64encode(png.getvalue()).decode()}  # JSON carries the bytes as base64 (wire.py)
    with server as srv, httpx.Client(base_url=srv.url, timeout=300) as client:
        def status() -> dict:
            return client.post("/status", json={}).json()

        deadline = time.monotonic() + 60
        while status()["state"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        answers: list = []
        batch = threading.Thread(target=lambda: answers.append(
            client.post("/reconstruct", json={"images": [picture, picture]}).json()))
        began = time.monotonic()
        batch.start()
        time.sleep(0.5)
        waits = []
        while batch.is_alive() and len(waits) < 20:
            t = time.monotonic()
            assert status()["state"] == "ready"
            waits.append(time.monotonic() - t)
            time.sleep(0.1)
        batch.join()
        took = time.monotonic() - began
    assert answers[0][0]["model_version"].startswith("folder:") and base64.b64decode(answers[0][0]["glb"])[:4] == b"glTF"
    assert took > 2 and len(waits) >= 5, (took, waits)  # the batch was long enough to ask during it
    assert max(waits) < 0.2, waits


def _grok3d_env(model: str) -> dict[str, str]:
    # A key that nothing will use: the model check is what these tests are about.
    return {**FAST, "TRIPOSR_MODEL": model, "XAI_API_KEY": "unused", "XAI_BASE_URL": "http://127.0.0.1:9/v1",
            "GROK3D_BLENDER_WORKERS": "1"}


def test_a_corrupt_checkpoint_starts_and_says_why(tiny, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_bytes((tiny / "config.yaml").read_bytes())
    (broken / "vit").mkdir()
    (broken / "vit" / "config.json").write_bytes((tiny / "vit" / "config.json").read_bytes())
    (broken / "model.ckpt").write_bytes((tiny / "model.ckpt").read_bytes()[:5000])  # truncated
    with Server(tmp_path, _grok3d_env(str(broken))) as srv, httpx.Client(base_url=srv.url) as c:
        deadline = time.monotonic() + 60
        while "still loading" in (ready := c.get("/readyz")).text and time.monotonic() < deadline:
            time.sleep(0.25)  # 503 "still loading" first, then 503 with the reason
        assert ready.status_code == 503
        assert "could not be loaded" in ready.text and str(broken / "model.ckpt") in ready.text
        assert_error(c.post("/api/generate", json={"prompt": "cat"}), 503,
                     "The 3D model is not loaded: import a TripoSR checkpoint (make import-model)")
        assert c.get("/api/examples").status_code == 200
        assert "corrupt or truncated" in srv.log() and str(broken / "model.ckpt") in srv.log()


def test_without_any_checkpoint_the_service_is_ready_and_generate_is_503(tmp_path):
    with Server(tmp_path, _grok3d_env("triposr:latest")) as srv, httpx.Client(base_url=srv.url) as c:
        srv.wait_for("/readyz")
        assert_error(c.post("/api/generate", json={"prompt": "cat"}), 503,
                     "The 3D model is not loaded: import a TripoSR checkpoint (make import-model)")
        assert c.get("/api/asset/ex_robot-mascot", params={"asset_type": "glb"}).status_code == 200
        # Nothing to load, so nothing of PyTorch: it said "missing" without importing torch.
        assert not maps_torch(srv)


def test_bentoml_build_packs_the_model_the_service_names(tiny, tmp_path):
    home = tmp_path / "bentoml"
    tag = import_model(tiny, home)
    env = {**os.environ, "BENTOML_HOME": str(home), "GROK3D_DATA_DIR": str(tmp_path), "TRIPOSR_MODEL": tag}
    subprocess.run(["make", "build"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    [bento_yaml] = (home / "bentos" / "grok3d").glob("*/bento.yaml")
    manifest = yaml.safe_load(bento_yaml.read_text())
    [triposr] = [s for s in manifest["services"] if s["name"] == "triposr"]
    assert [m["tag"] for m in triposr["models"]] == [tag]
    # The exported Bento (what containerize and push ship) carries the checkpoint itself.
    out = tmp_path / "grok3d.bento"
    subprocess.run([str(ROOT / ".venv/bin/bentoml"), "export", "grok3d:latest", str(out)], env=env, check=True,
                   capture_output=True, timeout=300)
    version = tag.split(":")[1]
    with tarfile.open(out) as bento:
        names = bento.getnames()
    assert f"./models/triposr/{version}/model.ckpt" in names and "./src/service.py" in names
