"""The API service against a TripoSR stand-in behind real BentoML batching (tests/standin_triposr.py): the model
version a job records, backpressure under a burst, and control calls while a long batch runs."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.server import Server, wait_job

STANDIN = "tests.standin_triposr:Grok3DStandIn"
TEST_STAGES = {"GROK3D_STAGES": "tests.stages:real_model", "XAI_API_KEY": "test-key", "GROK3D_QUEUE_MAX": "200"}


def _submit(c: httpx.Client, prompt: str) -> str:
    r = c.post("/api/generate", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def test_a_job_records_the_version_of_the_model_that_answered_its_batch(tmp_path):
    """The stand-in's status names one version and its answers another (a restart or a rollout in between):
    the job records the answer's."""
    env = {**TEST_STAGES, "TEST_STATUS_VERSION": "triposr:0000status000", "TEST_BATCH_VERSION": "triposr:111batch1111"}
    with Server(tmp_path, env, service=STANDIN, ready="/readyz") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        body = wait_job(c, _submit(c, "a cube"), timeout_s=60)
    assert body["status"] == "complete", body
    assert body["model_version"] == "triposr:111batch1111"


def test_a_burst_waits_for_capacity_and_no_job_is_shed(tmp_path):
    """100 jobs at once against batches of 0.2 s + 0.03 s a picture and a latency budget of 1.5 s: without
    backpressure the batcher sheds requests ("process is overloaded"); with it every job completes and none is."""
    batches = tmp_path / "batches.log"
    env = {**TEST_STAGES, "TEST_BATCH_S": "0.2", "TEST_ITEM_S": "0.03", "TEST_BATCH_LOG": str(batches),
           "TRIPOSR_MAX_BATCH_SIZE": "8", "TRIPOSR_MAX_LATENCY_MS": "1500"}
    with Server(tmp_path, env, service=STANDIN, ready="/readyz") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        ids = [_submit(c, f"burst {i}") for i in range(100)]
        finals = [wait_job(c, job_id, timeout_s=180) for job_id in ids]
        log = srv.log()
    assert [f["status"] for f in finals] == ["complete"] * 100, [f["error"] for f in finals if f["error"]]
    assert "overloaded" not in log
    sizes = [int(n) for n in batches.read_text().split()]
    assert sum(sizes) == 100 and max(sizes) > 1  # batches still formed


def test_submissions_and_readiness_answer_at_once_while_a_batch_runs(tmp_path):
    """A batch of 20 s is running: 50 submissions and 20 /readyz calls answer at once, because neither waits on a
    round trip to the model (its state is known already) and the stand-in's own status is async.

    "At once" as issue 12 put it, 200 ms, holds for the typical call; every call must answer within 2 s, a tenth of
    the batch, which no call that waited for it can. The worst call of 50 is the scheduler's: `make test` runs three
    modules on two cores, and a durable submission's fsync queues behind the other modules' writes (0.49 s seen in
    CI while Blender, chromium and a TripoSR service ran beside it)."""
    batches = tmp_path / "batches.log"
    env = {**TEST_STAGES, "TEST_BATCH_S": "20", "TEST_BATCH_LOG": str(batches),
           "TRIPOSR_MAX_LATENCY_MS": "120000"}
    with Server(tmp_path, env, service=STANDIN, ready="/readyz") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        first = _submit(c, "starts the long batch")
        deadline = time.monotonic() + 30
        while c.get(f"/api/status/{first}").json()["stage"] != "generating_3d":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.0)  # the batch is under way

        def timed(call) -> float:
            began = time.monotonic()
            r = call()
            assert r.status_code == 200, r.text
            return time.monotonic() - began

        with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=srv.url, timeout=30) as c2:
            submits = list(pool.map(lambda i: timed(lambda: c2.post("/api/generate", json={"prompt": f"p{i}"})),
                                    range(50)))
            readies = list(pool.map(lambda _: timed(lambda: c2.get("/readyz")), range(20)))
        assert not batches.exists()  # all of it happened during the first batch
        for took in (submits, readies):
            assert statistics.median(took) < 0.2 and max(took) < 2.0, sorted(took)[-5:]
