"""The narrow interfaces between the orchestrator and the three stages of a job.

Each stage is a small async interface so that the real backends (xAI, the TripoSR service, the Blender pool)
and test doubles plug in the same way. A stage raises `pipeline.errors.StageError` with a sentence for the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from pipeline.errors import StageUnavailable


class ImageGenerator(Protocol):
    """Prompt -> picture (the `generating_image` stage, first half)."""

    async def generate_image(self, prompt: str) -> bytes:
        """Return the generated picture as JPEG bytes. `prompt` is the user's words, unwrapped."""
        ...


class ImagePreparer(Protocol):
    """Picture -> TripoSR input (the `generating_image` stage, second half): matted, framed, 0.5 gray."""

    async def prepare_image(self, jpeg: bytes) -> bytes:
        """Return the reconstruction input as PNG bytes."""
        ...


class ModelState(str, Enum):
    missing = "missing"  # no checkpoint configured or found: generation answers 503
    loading = "loading"  # configured and loading: jobs are accepted and wait
    ready = "ready"
    failed = "failed"  # configured but unusable (corrupt, wrong layout): generation answers 503


@dataclass(frozen=True)
class ModelStatus:
    state: ModelState
    version: str | None = None  # e.g. "triposr:abc123" or "folder:name@0123456789ab"
    detail: str | None = None  # why it is missing or failed, for /readyz and the log
    # The TripoSR service's URL while it cannot be reached (GROK3D_TRIPOSR_URL; state `loading`: jobs wait for it).
    unreachable: str | None = None


@dataclass(frozen=True)
class Reconstruction:
    glb: bytes  # binary glTF in API.md's delivery frame
    model_version: str


class Reconstructor(Protocol):
    """TripoSR input -> GLB (the `generating_3d` stage)."""

    async def status(self) -> ModelStatus: ...

    async def reconstruct(self, image_png: bytes, resolution: int | None = None) -> Reconstruction:
        """`resolution`: the marching-cubes grid, cells per side (None: the model service's default)."""
        ...


class Converter(Protocol):
    """GLB -> USDZ (the `converting_usdz` stage)."""

    async def convert(self, glb_path: Path, usdz_path: Path) -> None:
        """Write `usdz_path` from `glb_path`. The caller renames the result into place."""
        ...


@dataclass
class Stages:
    image: ImageGenerator
    prepare: ImagePreparer
    reconstruct: Reconstructor
    convert: Converter


class Unavailable:
    """Stands in for a stage that has no backend in this deployment: every call fails with `reason`.

    The API checks `unavailable` to answer 503 before accepting a job it could not finish.
    """

    unavailable = True

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _fail(self) -> StageUnavailable:
        return StageUnavailable(self.reason)

    async def generate_image(self, prompt: str) -> bytes:
        raise self._fail()

    async def prepare_image(self, jpeg: bytes) -> bytes:
        raise self._fail()

    async def status(self) -> ModelStatus:
        return ModelStatus(ModelState.missing, detail=self.reason)

    async def reconstruct(self, image_png: bytes, resolution: int | None = None) -> Reconstruction:
        raise self._fail()

    async def convert(self, glb_path: Path, usdz_path: Path) -> None:
        raise self._fail()
