"""The service under other configurations: no xAI key, no model, a model still loading, a full queue, and a
kill -9 in the middle of a stage. Each starts its own `bentoml serve`, but the full queue: an API answer, served in
process (tests/inprocess.py)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.inprocess import AppServer
from tests.server import Server, wait_job
from tests.test_api import STAGES, assert_error


def test_without_xai_key_generate_is_503_and_examples_work(tmp_path):
    """Also the consent's other half (the test below): with GROK3D_ALLOW_TEST_STAGES=1, which tests.server.Server
    sets, test stages start, the log warns, and /readyz's body says so. One server for both: a start saved."""
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": ""}
    with Server(tmp_path, env, ) as srv, httpx.Client(base_url=srv.url) as c:
        assert srv.env["GROK3D_ALLOW_TEST_STAGES"] == "1"
        assert_error(c.post("/api/generate", json={"prompt": "cat"}), 503,
                     "Image generation is not configured: set XAI_API_KEY")
        # Bad input is still reported as such first.
        assert_error(c.post("/api/generate", json={}), 400, "No prompt provided")
        assert c.get("/api/examples").status_code == 200
        srv.wait_for("/readyz", timeout_s=60)  # 200 once the TripoSR service has looked for its model
        ready = c.get("/readyz")
        assert "GROK3D_STAGES=tests.stages:sleepy" in ready.text
        assert "[WARNING] [grok3d.backends] TEST STAGES ACTIVE" in srv.log()


def test_without_model_generate_is_503_and_service_is_ready(tmp_path):
    with Server(tmp_path, {**STAGES, "TEST_MODEL": "missing"}) as srv, httpx.Client(base_url=srv.url) as c:
        assert_error(c.post("/api/generate", json={"prompt": "cat"}), 503,
                     "The 3D model is not loaded: import a TripoSR checkpoint (make import-model)")
        srv.wait_for("/readyz", timeout_s=60)  # 200 once the TripoSR service has looked for its model
        assert c.get("/api/examples").status_code == 200


def test_jobs_wait_for_a_loading_model(tmp_path):
    env = {**STAGES, "TEST_MODEL_LOAD_S": "12"}
    with Server(tmp_path, env) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and "loading" in r.text
        job_id = c.post("/api/generate", json={"prompt": "cat"}).json()["job_id"]
        time.sleep(2)
        body = c.get(f"/api/status/{job_id}").json()
        assert body["status"] == "processing" and body["stage"] == "generating_3d"
        srv.wait_for("/readyz", timeout_s=30)
        assert wait_job(c, job_id)["status"] == "complete"


def test_full_queue_is_429_with_retry_after(tmp_path):
    env = {**STAGES, "GROK3D_QUEUE_MAX": "3", "GROK3D_RETRY_AFTER_S": "7", "TEST_IMAGE_SLEEP_S": "30"}
    with AppServer(tmp_path, env) as srv, httpx.Client(base_url=srv.url) as c:  # an API answer: in process
        for _ in range(3):
            assert c.post("/api/generate", json={"prompt": "cat"}).status_code == 200
        r = c.post("/api/generate", json={"prompt": "cat"})
        assert_error(r, 429, "Too many jobs queued, retry later")
        assert r.headers["retry-after"] == "7"


def test_a_job_survives_kill_9_mid_stage_and_resumes_from_its_last_finished_stage(tmp_path):
    calls = tmp_path / "calls.log"
    slow = {**STAGES, "TEST_3D_SLEEP_S": "60", "TEST_CALL_LOG": str(calls)}
    srv = Server(tmp_path, slow).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            job_id = c.post("/api/generate", json={"prompt": "survivor"}).json()["job_id"]
            queued_id = None
            deadline = time.monotonic() + 30
            while c.get(f"/api/status/{job_id}").json()["stage"] != "generating_3d":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(0.5)  # inside the sleeping 3D stage
            before = c.get(f"/api/status/{job_id}").json()
        srv.kill9()
    finally:
        srv.stop()
    assert calls.read_text().split() == ["image", "3d"]

    srv = Server(tmp_path, {**STAGES, "TEST_CALL_LOG": str(calls)}, log_name="server2.log").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            body = wait_job(c, job_id, timeout_s=60)
            assert body["status"] == "complete", body
            assert body["created_at"] == before["created_at"] and body["prompt"] == "survivor"
            for asset_type in ("image", "glb", "usdz"):
                assert c.get(f"/api/asset/{job_id}", params={"asset_type": asset_type}).status_code == 200
    finally:
        srv.stop()
    # The image stage had finished before the kill: only the interrupted 3D stage ran again.
    assert calls.read_text().split() == ["image", "3d", "3d"]
    assert not list((tmp_path / "jobs" / job_id).glob(".*.tmp*"))


def test_test_stages_are_refused_without_consent(tmp_path):
    """GROK3D_STAGES replaces every real stage: an inherited variable alone must not start a server that serves
    stand-ins. (With GROK3D_ALLOW_TEST_STAGES=1 they start and are announced: the first test of this module.)"""
    refused = Server(tmp_path, {**STAGES, "GROK3D_ALLOW_TEST_STAGES": "0"})
    with pytest.raises(RuntimeError, match="server exited"):
        refused.start(timeout_s=60)
    assert "GROK3D_STAGES=tests.stages:sleepy replaces every real stage" in refused.log()
    refused.stop()
