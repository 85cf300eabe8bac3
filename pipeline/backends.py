"""Builds the real stage backends from the settings. A backend that cannot work in this deployment (no xAI key,
no model) is replaced by `Unavailable`, which the API turns into API.md's 503 before a job is accepted."""

from __future__ import annotations

import importlib
import logging

from pipeline.settings import Settings
from pipeline.stages import Converter, ImageGenerator, ImagePreparer, Reconstructor, Stages, Unavailable

log = logging.getLogger("grok3d.backends")


def image_generator(settings: Settings) -> ImageGenerator:
    if not settings.xai_api_key:
        log.warning("XAI_API_KEY is not set: POST /api/generate answers 503; examples still work")
        return Unavailable("Image generation is not configured: set XAI_API_KEY.")
    from pipeline.xai import XaiImageClient

    return XaiImageClient(api_key=settings.xai_api_key, base_url=settings.xai_base_url,
                          model=settings.xai_image_model, timeout_s=settings.xai_timeout_s,
                          max_retries=settings.xai_max_retries, concurrency=settings.image_concurrency,
                          prompt_template=settings.prompt_template)


def image_preparer(settings: Settings) -> ImagePreparer:
    from pipeline.imaging import TripoSRImagePreparer

    return TripoSRImagePreparer()


def converter(settings: Settings) -> Converter:
    from converters.blender.pool import BlenderPool

    # Every running job may wait for a conversion at once: the pool's queue must hold them all.
    return BlenderPool(workers=settings.blender_workers, timeout_s=settings.convert_timeout_s,
                       bake_size=settings.bake_size, python=settings.blender_python,
                       queue_max=max(settings.queue_max, 1), preview_size=JOB_PREVIEW_SIZE)


# A job's preview is a card in a list: 256 px renders in a quarter of the 512 px time (on one Cycles thread, ~13 s
# for an 80k-face mesh at 512 px), which every job pays in its USDZ stage.
JOB_PREVIEW_SIZE = 256


def default_stages(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    """The production stages, or, for tests, those built by GROK3D_STAGES ("module:function", called with the
    settings and the reconstructor, returning Stages; Settings refuses it without GROK3D_ALLOW_TEST_STAGES=1)."""
    if settings.stages_factory:
        log.warning("TEST STAGES ACTIVE: GROK3D_STAGES=%s replaces the real stages; this server makes no real "
                    "models", settings.stages_factory)
        module_name, _, attr = settings.stages_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        return factory(settings, reconstructor)
    return Stages(
        image=image_generator(settings),
        prepare=image_preparer(settings),
        reconstruct=reconstructor or Unavailable("No TripoSR service is attached."),
        convert=converter(settings),
    )
