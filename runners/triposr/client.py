"""The orchestrator's side of the TripoSR service: `pipeline.stages.Reconstructor` over a BentoML dependency.

Overload (BentoML's "process is overloaded", or a model still loading) is a retryable StageError: the
orchestrator retries, then fails the job with that sentence. No 500 ever reaches a client from here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from pipeline.errors import StageError
from pipeline.stages import ModelState, ModelStatus, Reconstruction
from runners.triposr.wire import UNREADABLE

log = logging.getLogger("grok3d.triposr.client")
# A status answer is immediate; a service that takes longer is busy starting. Without this bound a call would wait
# for BentoML's client timeout, the TripoSR service's traffic timeout (_bentoml_impl/client/proxy2.py:683-685).
STATUS_TIMEOUT_S = 10.0


class TripoSRStage:
    def __init__(self, service: Any) -> None:
        self._service = service  # the bentoml.depends proxy of runners.triposr.service.TripoSRService
        self._version: str | None = None

    async def status(self) -> ModelStatus:
        try:
            answer = await asyncio.wait_for(self._service.to_async.status(), STATUS_TIMEOUT_S)
        except (BentoMLException, aiohttp.ClientError, TimeoutError) as exc:
            return ModelStatus(ModelState.loading, detail=f"the TripoSR service is not answering yet ({exc!r})")
        self._version = answer.get("version")
        return ModelStatus(ModelState(answer["state"]), answer.get("version"), answer.get("detail"))

    async def reconstruct(self, image_png: bytes) -> Reconstruction:
        try:
            [glb] = await self._service.to_async.reconstruct([image_png])
        except ServiceUnavailable as exc:  # a full batch queue: _bentoml_impl/server/app.py:121-122
            raise StageError("The 3D model could not be generated: the TripoSR service is overloaded, "
                             "please try again later.", retryable=True) from exc
        except (aiohttp.ClientError, RuntimeError) as exc:
            # The connection to the service broke: worth another try. aiohttp reports a session closed under a
            # response being read as a bare RuntimeError("Connection closed.") (aiohttp 3.14.5, streams.py:350);
            # BentoML closes sessions under requests in flight when it renews them (_bentoml_impl/client/
            # proxy2.py:122-123, see runner_connection in runners/triposr/service.py). Any other RuntimeError is a
            # bug.
            if isinstance(exc, RuntimeError) and "Connection closed" not in str(exc):
                raise
            log.warning("TripoSR service connection failed: %r", exc)
            raise StageError("The 3D model could not be generated: the connection to the TripoSR service "
                             "failed, please try again later.", retryable=True) from exc
        except BentoMLException as exc:
            log.error("TripoSR service error: %s", exc)
            raise StageError(f"The 3D model could not be generated: the TripoSR service failed ({exc}).") from exc
        if glb == UNREADABLE:
            raise StageError("The 3D model could not be generated: the TripoSR service could not read the "
                             "prepared picture.")
        if not glb:
            raise StageError("The 3D model could not be generated: TripoSR found no surface in this picture; "
                             "try a prompt for a single solid object.")
        if self._version is None:
            await self.status()
        return Reconstruction(glb=glb, model_version=self._version or "unknown")
