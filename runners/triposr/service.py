"""The TripoSR service: images in, typed answers out (a GLB or a failure, and the model version that made it),
with BentoML's adaptive batching.

A batch runs as one forward pass and one batched density grid, in BentoML's thread pool (a sync API). The model
loads once per worker, in a background thread started with the worker. `status` is async: it runs on the worker's
event loop, which neither the load nor a batch holds, so it answers at once while either runs.
"""

from __future__ import annotations

import logging
import threading
import time

import bentoml

from pipeline import lifeline
from pipeline.logs import setup_logging
from pipeline.settings import get_settings
from runners.triposr import sources
from runners.triposr.wire import Picture, ReconstructAnswer, is_store_tag

log = logging.getLogger("grok3d.triposr")
lifeline.hold()  # dies with `bentoml serve` (BentoML issue #4193), its model and GPU memory with it: see service.py
setup_logging()
settings = get_settings()

# A folder or a Hugging Face id is loaded as is; anything else names a model in the BentoML store, which
# `bentoml build` then packs into the Bento (a rollout is a new Bento tag).
_SOURCE = settings.triposr_model


def _packed_model() -> bentoml.models.BentoModel | None:
    if not is_store_tag(_SOURCE):
        return None
    try:
        bentoml.models.get(_SOURCE)
    except bentoml.exceptions.NotFound:
        return None  # serving without a model: the API answers 503 and says how to import one
    return bentoml.models.BentoModel(_SOURCE)


# Callers' connection to this service. BentoML 1.4.40 replaces it every 100 requests (its default) by closing
# the old session under the requests still in flight, which then fail with "Server disconnected": over a unix
# socket there is nothing to gain from replacing it, so it lives for a day. (SessionManager.get_session,
# _bentoml_impl/client/proxy2.py:120-128, closes it at :122-123; defaults at :689-690; the setting came with
# BentoML PR #5522.)
RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 86400.0}


@bentoml.service(
    name="triposr",
    resources={"gpu": 1},
    workers=1,
    # A request waits for its batch's forward pass: never time out before the batching latency budget. This one
    # number is both this service's TimeoutMiddleware (bentoml/_internal/server/base_app.py:151-152) and its
    # callers' client timeout, plus 1% (_bentoml_impl/client/proxy2.py:683-685).
    traffic={"timeout": max(600, settings.triposr_max_latency_ms / 1000 * 2)},
    runner_connection=RUNNER_CONNECTION,
)
class TripoSRService:
    checkpoint = _packed_model()

    def __init__(self) -> None:
        self.model = None
        self.state = "loading"
        self.version: str | None = None
        self.detail: str | None = None
        self._loaded = threading.Event()
        threading.Thread(target=self._load, name="triposr-load", daemon=True).start()

    def _load(self) -> None:
        began = time.monotonic()
        try:
            # Where the checkpoint is, first: without one, the worker says so without importing torch.
            sources.find(_SOURCE)
            from runners.triposr.inference import load_model

            from runners.triposr import fused
            from runners.triposr.precision import resolve

            self.model, self.version = load_model(_SOURCE, device=settings.triposr_device)
            if resolve(settings.triposr_precision, self.model.device).grid == "bf16":
                fused.usable(self.model.decoder, self.model.device)  # its check and compilation, before requests
            self.state = "ready"
            log.info("TripoSR %s loaded from %s on %s in %.1f s (precision %s, fused density grid %s)",
                     self.version, _SOURCE, self.model.device, time.monotonic() - began,
                     settings.triposr_precision, fused.state(self.model.device))
        except sources.ModelNotFound as exc:
            self.state, self.detail = "missing", str(exc)
            log.warning("No TripoSR model: %s", exc)
        except Exception as exc:  # a corrupt or wrong checkpoint: the service stays up and says why
            self.state, self.detail = "failed", f"{type(exc).__name__}: {exc}"
            log.exception("TripoSR model %s could not be loaded", _SOURCE)
        finally:
            self._loaded.set()

    def __is_ready__(self) -> bool:
        return self._loaded.is_set()

    @bentoml.api
    async def status(self) -> dict:
        """{"state": loading|ready|missing|failed, "version": tag or null, "detail": why not ready}. Async on
        purpose: a sync API would queue in the same thread pool as a running batch and answer only after it."""
        return {"state": self.state, "version": self.version, "detail": self.detail}

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.triposr_max_batch_size,
        max_latency_ms=settings.triposr_max_latency_ms,
    )
    def reconstruct(self, images: list[Picture]) -> list[ReconstructAnswer]:
        """PNG/JPEG bytes of framed pictures, each with its marching-cubes grid -> one answer per picture: its GLB
        in API.md's delivery frame, or why there is none; each names the model version that ran this batch."""
        if self.state != "ready":
            raise bentoml.exceptions.ServiceUnavailable(f"TripoSR model is {self.state}: {self.detail}")
        from runners.triposr.inference import reconstruct_encoded

        began = time.monotonic()
        model, version = self.model, self.version  # one batch, one model: read both once
        # One forward pass for the batch; pictures of different resolutions get a density grid per resolution.
        resolutions = [p.resolution or settings.triposr_mc_resolution for p in images]
        results = reconstruct_encoded(model, [p.data for p in images], resolution=resolutions,
                                      threshold=settings.triposr_mc_threshold, size_m=settings.model_size_m,
                                      precision=settings.triposr_precision)
        log.info("TripoSR batch of %d (resolutions %s) in %.2f s", len(images), sorted(set(resolutions)),
                 time.monotonic() - began)
        return [ReconstructAnswer(glb=r, model_version=version) if isinstance(r, bytes)
                else ReconstructAnswer(failure=r, model_version=version) for r in results]
