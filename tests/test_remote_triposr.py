"""GROK3D_TRIPOSR_URL: the API service and the TripoSR service as two deployments, each its own `bentoml serve`.

The API replica calls the TripoSR service over HTTP (JSON, the picture's bytes as base64) and starts neither a
TripoSR worker nor torch; batching, the typed answers and the model version work as they do on one machine.
"""

from __future__ import annotations

import time

import httpx
import pytest

from runners.triposr.loading import write_random_checkpoint
from tests.server import Server, free_port, wait_job

REMOTE_VERSION = "standin:remote-7"


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """The stand-in TripoSR service (real BentoML batching, quick boxes) served alone."""
    data = tmp_path_factory.mktemp("triposr")
    env = {"TEST_STATUS_VERSION": REMOTE_VERSION, "TEST_BATCH_VERSION": REMOTE_VERSION, "TEST_BATCH_S": "0.3",
           "TEST_BATCH_LOG": str(data / "batches.txt")}
    with Server(data, env, service="tests.standin_triposr:StandInTripoSR", log_name="triposr.log",
                ready="/readyz") as srv:
        yield srv


def api_env(triposr: Server) -> dict[str, str]:
    return api_env_for(triposr.url)


def api_env_for(url: str) -> dict[str, str]:
    return {"GROK3D_TRIPOSR_URL": url, "GROK3D_STAGES": "tests.stages:real_model", "XAI_API_KEY": "test-key"}


def test_an_api_replica_uses_a_triposr_service_elsewhere(standin, tmp_path):
    with Server(tmp_path, api_env(standin), ready="/readyz") as api:
        # Only the API service's worker runs here, and it never loaded torch.
        workers = [p for p in api.processes() if "--service-name" in p.cmdline()]
        assert [w.cmdline()[w.cmdline().index("--service-name") + 1] for w in workers] == ["grok3d"]
        assert not [m.path for m in workers[0].memory_maps() if "torch" in m.path]
        with httpx.Client(base_url=api.url, timeout=30) as client:
            ids = [client.post("/api/generate", json={"prompt": f"box {i}"}).json()["job_id"] for i in range(6)]
            done = [wait_job(client, job_id, timeout_s=60) for job_id in ids]
            glb = client.get(f"/api/asset/{ids[0]}", params={"asset_type": "glb"})
    assert [j["status"] for j in done] == ["complete"] * 6, done
    assert {j["model_version"] for j in done} == {REMOTE_VERSION}  # the version came back over the network
    assert glb.status_code == 200 and glb.content[:4] == b"glTF"
    sizes = [int(n) for n in (standin.data_dir / "batches.txt").read_text().split()]
    assert sum(sizes) == 6 and max(sizes) > 1, sizes  # BentoML's batching on the TripoSR side, over HTTP


def test_the_real_triposr_service_over_the_network(tmp_path):
    """The real TripoSR service (a tiny model with random weights) in its own `bentoml serve`, the API elsewhere."""
    tiny = write_random_checkpoint(tmp_path / "tiny", config="tiny", seed=0)
    model_env = {"TRIPOSR_MODEL": str(tiny), "TRIPOSR_DEVICE": "cpu", "TRIPOSR_MC_RESOLUTION": "32",
                 "TRIPOSR_MC_THRESHOLD": "0.5"}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "api").mkdir()
    with Server(tmp_path / "gpu", model_env, service="runners.triposr.service:TripoSRService",
                log_name="triposr.log", ready="/readyz") as triposr, \
            Server(tmp_path / "api", api_env(triposr), ready="/readyz") as api, \
            httpx.Client(base_url=api.url, timeout=30) as client:
        job_id = client.post("/api/generate", json={"prompt": "a block"}).json()["job_id"]
        done = wait_job(client, job_id, timeout_s=180)
        glb = client.get(f"/api/asset/{job_id}", params={"asset_type": "glb"})
    assert done["status"] == "complete", done
    assert done["model_version"].startswith("folder:tiny@")
    assert glb.content[:4] == b"glTF"


def test_an_api_replica_says_when_its_triposr_service_cannot_be_reached(tmp_path):
    """A TripoSR service that is down (killed, or the wrong URL): the API replica's /readyz names it, rather than
    calling the model still loading, and jobs are still accepted (they wait for the service)."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    with Server(tmp_path, api_env_for(url)) as api, httpx.Client(base_url=api.url, timeout=30) as client:
        deadline = time.monotonic() + 30
        while "cannot be reached" not in (ready := client.get("/readyz")).text and time.monotonic() < deadline:
            time.sleep(0.25)
        assert ready.status_code == 503 and f"The TripoSR service cannot be reached ({url})" in ready.text, ready.text
        assert client.post("/api/generate", json={"prompt": "a box"}).status_code == 200
