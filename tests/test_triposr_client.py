"""runners.triposr.client.TripoSRStage in process: its own time limit on status calls, the watch that answers
status() without a round trip, and the window's arithmetic. A real TripoSR service that accepts a call and then
never answers cannot be had on demand, so a stand-in proxy that never answers plays it here; the window against
real BentoML batching is tested in tests/test_triposr_service.py."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from pipeline.stages import ModelState
from runners.triposr import client


class NeverAnswers:
    async def status(self) -> dict:
        await asyncio.sleep(3600)
        return {}


async def test_a_status_call_that_hangs_reads_as_loading_and_status_never_waits(monkeypatch):
    monkeypatch.setattr(client, "STATUS_TIMEOUT_S", 0.2)
    stage = client.TripoSRStage(SimpleNamespace(to_async=NeverAnswers()), max_batch_size=4, max_latency_s=10)
    began = time.monotonic()
    await stage.start()
    assert time.monotonic() - began < 2
    try:
        began = time.monotonic()
        status = await stage.status()
        assert time.monotonic() - began < 0.05  # answered from the watch, no round trip
        assert status.state is ModelState.loading and "not answering" in status.detail
        assert status.unreachable is None  # on one machine: the TripoSR worker is busy starting
    finally:
        await stage.aclose()


class Refuses:
    """A TripoSR service that is down: its status call is a real HTTP connection to a port nobody listens on (the
    aiohttp error BentoML's HTTP client raises then)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def status(self) -> dict:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.post(f"{self.url}/status") as answer:
            return await answer.json()


async def test_a_triposr_service_elsewhere_that_cannot_be_reached_says_so():
    """GROK3D_TRIPOSR_URL naming a service that is down (killed, or a wrong URL) reads as unreachable, with the URL;
    on one machine (no URL) the same refusal is the TripoSR worker still starting, and reads as loading."""
    from tests.server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    remote = client.TripoSRStage(SimpleNamespace(to_async=Refuses(url)), max_batch_size=4, max_latency_s=10, url=url)
    local = client.TripoSRStage(SimpleNamespace(to_async=Refuses(url)), max_batch_size=4, max_latency_s=10)
    await remote.start()
    await local.start()
    try:
        status = await remote.status()
        assert status.state is ModelState.loading and status.unreachable == url, status
        assert "Connect" in status.detail  # aiohttp's ClientConnectorError, for the log
        status = await local.status()
        assert status.state is ModelState.loading and status.unreachable is None and "not answering" in status.detail
    finally:
        await remote.aclose()
        await local.aclose()


async def test_the_window_grows_by_one_on_quick_answers_and_halves_on_slow_ones():
    window = client.Window(most=8)
    assert window.size == 1
    for expected in (2, 3, 4):
        await window.acquire()
        await window.release(fast=True)
        assert window.size == expected
    await window.acquire()
    await window.release(fast=False)
    assert window.size == 2
    for _ in range(20):
        await window.acquire()
        await window.release(fast=True)
    assert window.size == 8  # never past two full batches

    narrow = client.Window(most=8)  # one place: a second picture waits for the first answer
    await narrow.acquire()
    waiting = asyncio.create_task(narrow.acquire())
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await narrow.release(fast=True)
    await asyncio.wait_for(waiting, 1)
    assert narrow.in_flight == 1


def test_the_api_service_does_not_load_torch():
    """service.py declares both services; only the TripoSR worker should pay for torch (memory, start-up)."""
    import subprocess
    import sys

    from tests.server import ROOT

    check = "import sys, service; print('torch' in sys.modules, 'runners.triposr.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_importing_the_service_module_builds_no_api_until_it_is_used():
    """BentoML's arbiter and the TripoSR worker import service.py and never serve the API: they load none of its
    stack (the pipeline's app, SQLAlchemy, aiohttp). What `bentoml build` writes, in its order (the OpenAPI spec,
    then the service's schema: bentoml/_internal/bento/bento.py:383-385), still has the app's routes."""
    import json
    import subprocess
    import sys

    from tests.server import ROOT

    check = """if True:
        import json, sys
        import service
        stack = ("pipeline.api", "sqlalchemy", "aiohttp", "runners.triposr.client", "fastapi")
        before = [m for m in stack if m in sys.modules]
        openapi = sorted(service.Grok3D.openapi_spec.paths)
        mounted = [p for p, meta in service.Grok3D.schema().get("paths", {}).items() if meta.get("mounted")]
        print(json.dumps({"before": before, "openapi": openapi, "mounted": mounted}))
    """
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.splitlines()[-1])
    assert found["before"] == [], out.stderr
    assert {"/api/generate", "/api/jobs", "/api/examples"} <= set(found["openapi"]), found["openapi"]
    assert {"/api/generate", "/api/jobs", "/api/examples", "/"} <= set(found["mounted"]), found["mounted"]


async def test_the_jobs_resolution_travels_with_its_picture():
    """The client sends the job's marching-cubes grid in the picture's item, in and out of JSON (how BentoML's HTTP
    transport carries it); the service's bounds hold on the wire."""
    import pytest
    from pydantic import ValidationError

    from runners.triposr.wire import Picture, ReconstructAnswer

    sent: list[Picture] = []

    class Service:
        async def reconstruct(self, pictures: list[Picture]) -> list[ReconstructAnswer]:
            sent.extend(pictures)
            return [ReconstructAnswer(glb=b"glTF", model_version="test:1")]

    stage = client.TripoSRStage(SimpleNamespace(to_async=Service()), max_batch_size=4, max_latency_s=10)
    await stage.reconstruct(b"png", resolution=96)
    await stage.reconstruct(b"png")
    assert [p.resolution for p in sent] == [96, None]
    assert Picture.model_validate_json(sent[0].model_dump_json()) == sent[0]
    for wrong in (4, 2048):
        with pytest.raises(ValidationError):
            Picture(data=b"png", resolution=wrong)
