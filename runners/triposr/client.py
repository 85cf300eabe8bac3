"""The orchestrator's side of the TripoSR service: `pipeline.stages.Reconstructor` over a BentoML dependency.

- The model's state is watched in the background (`start`), so neither a submission nor `/readyz` waits on a round
  trip to the service: `status()` answers from what the watch last saw. A service of its own (GROK3D_TRIPOSR_URL)
  that refuses the connection or does not answer in time reads as `unreachable` (its URL), not as a model still
  loading: on one machine the TripoSR worker is only starting then, elsewhere it may be down or the URL wrong.
- Backpressure: BentoML's batcher sheds a request ("process is overloaded") once its predicted latency passes the
  batching budget (`bentoml/_internal/marshal/dispatcher.py`, `CorkDispatcher.controller`: the oldest request is
  cancelled when `w0 + a*n + b >= max_latency`). So this client sends no more pictures at once than the service
  answers well within the budget: a window that starts at one, grows by one with each answer that came back in
  under half the budget, and halves on a slow or overloaded answer (additive increase, multiplicative decrease).
  An overloaded answer is never a failed job: the picture waits for the window and goes again.
- No 500 ever reaches a client from here: every failure is a StageError with a sentence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
from bentoml.exceptions import BentoMLException, ServiceUnavailable

from pipeline.errors import StageError
from pipeline.stages import ModelState, ModelStatus, Reconstruction
from runners.triposr.wire import Failure, Picture, ReconstructAnswer

log = logging.getLogger("grok3d.triposr.client")
# A status answer is immediate (the service answers it on its event loop); a service that takes longer is busy
# starting. Without this bound a call would wait for BentoML's client timeout, the TripoSR service's traffic
# timeout (_bentoml_impl/client/proxy2.py:683-685).
STATUS_TIMEOUT_S = 10.0
WATCH_LOADING_S = 1.0  # how often the model's state is asked while it is not ready
WATCH_READY_S = 10.0  # and once it is (a restarted service may load another version)
OVERLOAD_PAUSE_S = 0.5

FAILURES = {
    Failure.unreadable_picture: "The 3D model could not be generated: the TripoSR service could not read the "
                                "prepared picture.",
    Failure.no_surface: "The 3D model could not be generated: TripoSR found no surface in this picture; try a "
                        "prompt for a single solid object.",
}


class Window:
    """How many pictures may be at the TripoSR service at once: 1 ≤ size ≤ `most`, see the module's docstring."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.size = 1
        self.in_flight = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.size)
            self.in_flight += 1

    async def release(self, *, fast: bool) -> None:
        async with self._changed:
            self.in_flight -= 1
            self.size = min(self.most, self.size + 1) if fast else max(1, self.size // 2)
            self._changed.notify_all()


class TripoSRStage:
    def __init__(self, service: Any, *, max_batch_size: int, max_latency_s: float, url: str | None = None) -> None:
        self._service = service  # the bentoml.depends proxy of runners.triposr.service.TripoSRService
        self._url = url  # GROK3D_TRIPOSR_URL: the service runs elsewhere (None: beside this one, same `bentoml serve`)
        self._budget_s = max_latency_s
        # Two full batches: the one running and the one forming, which is what the batcher can hold in budget.
        self._window = Window(2 * max_batch_size)
        self._status = ModelStatus(ModelState.loading, detail="the TripoSR service has not answered yet")
        self._watch: asyncio.Task[None] | None = None
        self._first_answer = asyncio.Event()

    # -- the model's state ----------------------------------------------------------------------------------

    async def start(self) -> None:
        self._watch = asyncio.create_task(self._watch_status(), name="triposr-status-watch")
        # Give the service a moment to answer, so that a submission right after start-up sees its real state.
        try:
            await asyncio.wait_for(self._first_answer.wait(), 2.0)
        except TimeoutError:
            pass

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def status(self) -> ModelStatus:
        """The model's state as last seen by the watch (no round trip)."""
        return self._status

    async def _watch_status(self) -> None:
        while True:
            status = await self._ask_status()
            if status.unreachable and not self._status.unreachable:
                log.warning("The TripoSR service cannot be reached (%s): %s", status.unreachable, status.detail)
            elif self._status.unreachable and not status.unreachable:
                log.info("The TripoSR service at %s answers again (model %s)", self._status.unreachable,
                         status.state.value)
            self._status = status
            self._first_answer.set()
            await asyncio.sleep(WATCH_READY_S if self._status.state is ModelState.ready else WATCH_LOADING_S)

    async def _ask_status(self) -> ModelStatus:
        try:
            answer = await asyncio.wait_for(self._service.to_async.status(), STATUS_TIMEOUT_S)
        except (aiohttp.ClientConnectionError, OSError, TimeoutError) as exc:
            if self._url is not None:  # refused, reset, no route, or no answer within STATUS_TIMEOUT_S
                reason = f"no answer within {STATUS_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else repr(exc)
                return ModelStatus(ModelState.loading, detail=reason, unreachable=self._url)
            return ModelStatus(ModelState.loading, detail=f"the TripoSR service is not answering yet ({exc!r})")
        except (BentoMLException, aiohttp.ClientError, RuntimeError) as exc:
            return ModelStatus(ModelState.loading, detail=f"the TripoSR service is not answering yet ({exc!r})")
        return ModelStatus(ModelState(answer["state"]), answer.get("version"), answer.get("detail"))

    # -- reconstruction -------------------------------------------------------------------------------------

    async def reconstruct(self, image_png: bytes, resolution: int | None = None) -> Reconstruction:
        while True:
            answer = await self._send(Picture(data=image_png, resolution=resolution))
            if answer is not None:
                break
            if self._status.state in (ModelState.missing, ModelState.failed):  # not overloaded: gone
                raise StageError(f"The 3D model could not be generated: the TripoSR model is not loaded "
                                 f"({self._status.detail or self._status.state.value}).")
            await asyncio.sleep(OVERLOAD_PAUSE_S)  # overloaded: the window has shrunk, wait for a place again
        if answer.failure is not None:
            raise StageError(FAILURES[answer.failure])
        return Reconstruction(glb=answer.glb, model_version=answer.model_version)

    async def _send(self, picture: Picture) -> ReconstructAnswer | None:
        """One picture through the window; None when the service answered that it is overloaded."""
        await self._window.acquire()
        began = time.monotonic()
        fast = False
        try:
            [answer] = await self._service.to_async.reconstruct([picture])
            fast = time.monotonic() - began < self._budget_s / 2
            # In process BentoML hands back the model; over HTTP (JSON) a dict.
            return answer if isinstance(answer, ReconstructAnswer) else ReconstructAnswer.model_validate(answer)
        except ServiceUnavailable as exc:  # shed by the batcher (see above), answered as 503 by app.py:121-122
            log.warning("TripoSR service overloaded (%s): window now %d, the picture waits and goes again",
                        exc, max(1, self._window.size // 2))
            return None
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
        finally:
            await self._window.release(fast=fast)
