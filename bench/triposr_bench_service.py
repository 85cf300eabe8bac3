"""A thin BentoML front for bench/triposr_service_bench.py: JSON in over TCP, then the production path into the
TripoSR service (a bentoml.depends proxy, adaptive batching), as the API service's 3D stage calls it."""

from __future__ import annotations

import base64

import bentoml

from runners.triposr.service import TripoSRService


@bentoml.service(name="triposr_bench", workers=1, traffic={"timeout": 900})
class TripoSRBench:
    triposr = bentoml.depends(TripoSRService)

    @bentoml.api
    async def reconstruct(self, image_b64: str) -> dict:
        [glb] = await self.triposr.to_async.reconstruct([base64.b64decode(image_b64)])
        return {"glb_bytes": len(glb)}
