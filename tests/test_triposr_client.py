"""runners.triposr.client.TripoSRStage's own time limit on status calls. A real TripoSR service that accepts the
call and then never answers cannot be had on demand, so a stand-in proxy that never answers plays it here."""

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


async def test_a_status_call_that_hangs_reads_as_loading(monkeypatch):
    monkeypatch.setattr(client, "STATUS_TIMEOUT_S", 0.2)
    stage = client.TripoSRStage(SimpleNamespace(to_async=NeverAnswers()))
    began = time.monotonic()
    status = await stage.status()
    assert status.state is ModelState.loading and "not answering" in status.detail
    assert time.monotonic() - began < 2


def test_the_api_service_does_not_load_torch():
    """service.py declares both services; only the TripoSR worker should pay for torch (memory, start-up)."""
    import subprocess
    import sys

    from tests.server import ROOT

    check = "import sys, service; print('torch' in sys.modules, 'runners.triposr.model' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stderr
