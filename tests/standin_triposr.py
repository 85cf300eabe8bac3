"""A stand-in for the TripoSR service behind real BentoML batching: `bentoml serve
tests.standin_triposr:Grok3DStandIn` serves the real API service (service.py's `api_service`) depending on it.

It speaks the TripoSR service's API (async `status`, batchable `reconstruct` answering `ReconstructAnswer`s) and
is steered by environment variables, so tests can give it slow batches, a short latency budget, or a model
version that differs between its status and its answers. The real service is tested in test_triposr_service.py.
"""

from __future__ import annotations

import os
import time

import bentoml

from pipeline.settings import get_settings
from runners.triposr.service import RUNNER_CONNECTION
from runners.triposr.wire import Picture, ReconstructAnswer
from service import api_service

settings = get_settings()


def _box_glb() -> bytes:
    # Imported here: `bentoml serve` imports this module in every process, and only the stand-in's worker makes
    # a mesh (trimesh brings scipy, about a second of CPU).
    import numpy as np
    import trimesh

    mesh = trimesh.creation.box((0.5, 0.3, 0.4))
    mesh.visual.vertex_colors = np.tile([40, 160, 90, 255], (len(mesh.vertices), 1))
    return mesh.export(file_type="glb")


@bentoml.service(name="triposr", workers=1, traffic={"timeout": 600}, runner_connection=RUNNER_CONNECTION)
class StandInTripoSR:
    """TEST_BATCH_S + TEST_ITEM_S per picture: one batch's duration. TEST_STATUS_VERSION / TEST_BATCH_VERSION: the
    version `status` reports and the one the answers carry. TEST_BATCH_LOG: a file that gets each batch's size."""

    def __init__(self) -> None:
        self.glb = _box_glb()

    @bentoml.api
    async def status(self) -> dict:
        return {"state": "ready", "version": os.environ.get("TEST_STATUS_VERSION", "standin:1"), "detail": None}

    @bentoml.api(batchable=True, max_batch_size=settings.triposr_max_batch_size,
                 max_latency_ms=settings.triposr_max_latency_ms)
    def reconstruct(self, images: list[Picture]) -> list[ReconstructAnswer]:
        time.sleep(float(os.environ.get("TEST_BATCH_S", "0")) + float(os.environ.get("TEST_ITEM_S", "0")) * len(images))
        if path := os.environ.get("TEST_BATCH_LOG"):
            with open(path, "a") as f:
                f.write(f"{len(images)}\n")
        version = os.environ.get("TEST_BATCH_VERSION", "standin:1")
        return [ReconstructAnswer(glb=self.glb, model_version=version) for _ in images]


Grok3DStandIn = api_service(StandInTripoSR)
