"""Test stages for the orchestrator, plugged into the real service with GROK3D_STAGES=tests.stages:<factory>.

They stand in for xAI, TripoSR and Blender where a test is about the job machinery itself (durability, ordering,
concurrency), not about those backends, which have their own tests. Behaviour is steered by environment
variables so a `bentoml serve` subprocess can be configured from the test.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from pipeline.errors import StageError
from pipeline.settings import Settings
from pipeline.stages import ModelState, ModelStatus, Reconstruction, Reconstructor, Stages, Unavailable

# trimesh (and with it scipy: about a second of CPU) is imported where a mesh is made: `bentoml serve` imports this
# module in its arbiter and in each worker, and only an API worker that runs a job makes one.
if TYPE_CHECKING:
    import trimesh


def _seconds(name: str) -> float:
    return float(os.environ.get(name, "0"))


def _record(stage: str) -> None:
    """Append the stage's name to TEST_CALL_LOG, so a test can count how often each stage ran."""
    if path := os.environ.get("TEST_CALL_LOG"):
        with open(path, "a") as f:
            f.write(stage + "\n")


def _jpeg(prompt: str) -> bytes:
    shade = sum(prompt.encode()) % 200
    img = Image.new("RGB", (64, 64), (230, 230, 230))
    img.paste((shade, 80, 160), (16, 16, 48, 48))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


# Words of a prompt that the picture carries on to the later stages, as bytes after the image.
MARKERS = (b"fail-3d", b"slow-3d", b"big-mesh")
SLOW_S = 60.0  # a 'slow-image' or 'slow-3d' stage: long enough to be cancelled in


class SleepyImage:
    """Sleeps TEST_IMAGE_SLEEP_S, then draws a square; a prompt containing 'fail-image' fails the stage,
    'slow-image' makes it last a minute."""

    async def generate_image(self, prompt: str) -> bytes:
        _record("image")
        await asyncio.sleep(SLOW_S if "slow-image" in prompt else _seconds("TEST_IMAGE_SLEEP_S"))
        if "fail-image" in prompt:
            raise StageError("xAI rejected the prompt: test refusal.")
        if "crash-image" in prompt:
            raise RuntimeError("a bug in the image stage")
        return _jpeg(prompt) + b"".join(marker for marker in MARKERS if marker.decode() in prompt)


class CopyPrepare:
    async def prepare_image(self, jpeg: bytes) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(jpeg)).convert("RGB").save(buf, "PNG")
        return buf.getvalue() + b"".join(marker for marker in MARKERS if marker in jpeg[-32:])


class BoxReconstructor:
    """A coloured box as GLB after TEST_3D_SLEEP_S (a minute for 'slow-3d'; a 100k-face blob for 'big-mesh', slow
    to bake). TEST_MODEL_LOAD_S: reports `loading` for that long after start; TEST_MODEL=explode: status() raises
    (an unexpected error in the API)."""

    def __init__(self) -> None:
        self._ready_at = time.monotonic() + _seconds("TEST_MODEL_LOAD_S")

    async def status(self) -> ModelStatus:
        if os.environ.get("TEST_MODEL") == "explode":
            raise RuntimeError("status exploded")
        if time.monotonic() < self._ready_at:
            return ModelStatus(ModelState.loading)
        return ModelStatus(ModelState.ready, version=self.version)

    async def reconstruct(self, image_png: bytes, resolution: int | None = None) -> Reconstruction:
        _record("3d")
        if path := os.environ.get("TEST_RESOLUTION_LOG"):
            with open(path, "a") as f:
                f.write(f"{resolution}\n")
        await asyncio.sleep(SLOW_S if b"slow-3d" in image_png[-32:] else _seconds("TEST_3D_SLEEP_S"))
        if b"fail-3d" in image_png:
            raise StageError("The 3D model could not be generated: test failure.")
        if b"big-mesh" in image_png[-32:]:
            from tests.blender_helpers.meshes import blob_mesh

            mesh = blob_mesh(177)  # ~100k faces
            return Reconstruction(glb=mesh.export(file_type="glb"), model_version="test:blob")
        return Reconstruction(glb=self.mesh().export(file_type="glb"), model_version=self.version)

    version = "test:box"

    def mesh(self) -> trimesh.Trimesh:
        import numpy as np
        import trimesh

        mesh = trimesh.creation.box((0.5, 0.3, 0.4))
        mesh.visual.vertex_colors = np.tile([200, 30, 30, 255], (len(mesh.vertices), 1))
        return mesh


class SphereReconstructor(BoxReconstructor):
    """An egg of 20,480 faces in API.md's frame: 0.5 x 0.3 x 0.46 m, resting on y = 0, its front (+z) bulging
    more than its back; red on top (y > 0.22 m), green in front (z > 0.16 m), blue elsewhere. Enough faces to
    decimate, extents that tell the axes apart, and colours whose place a test knows."""

    version = "test:egg"

    def mesh(self) -> trimesh.Trimesh:
        import numpy as np
        import trimesh

        mesh = trimesh.creation.icosphere(subdivisions=5, radius=1.0)
        v = mesh.vertices
        mesh.vertices = np.stack([v[:, 0] * 0.25, v[:, 1] * 0.15 + 0.15, v[:, 2] * np.where(v[:, 2] > 0, 0.26, 0.2)],
                                 axis=1)
        colours = np.tile([20, 20, 200, 255], (len(v), 1))
        colours[mesh.vertices[:, 2] > EGG_FRONT_Z_M] = [20, 180, 20, 255]
        colours[mesh.vertices[:, 1] > EGG_TOP_Y_M] = [200, 20, 20, 255]
        mesh.visual.vertex_colors = colours.astype(np.uint8)
        return mesh


EGG_TOP_Y_M, EGG_FRONT_Z_M = 0.22, 0.16


class ZipConverter:
    """Writes a zip holding the GLB (a stand-in USDZ: USDZ is a zip) after TEST_CONVERT_SLEEP_S, and a grey
    square as the preview. It has no `export`: the Blender formats answer that no converter runs."""

    async def convert(self, glb_path: Path, usdz_path: Path) -> None:
        await asyncio.sleep(_seconds("TEST_CONVERT_SLEEP_S"))
        with zipfile.ZipFile(usdz_path, "w", zipfile.ZIP_STORED) as z:
            z.write(glb_path, "model.glb")

    async def render_preview(self, glb_path: Path, jpeg_path: Path) -> None:
        Image.new("RGB", (64, 64), (150, 150, 160)).save(jpeg_path, "JPEG")


def sleepy(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    image = SleepyImage() if settings.xai_api_key else Unavailable("Image generation is not configured.")
    model = Unavailable("no TripoSR checkpoint") if os.environ.get("TEST_MODEL") == "missing" else BoxReconstructor()
    return Stages(image=image, prepare=CopyPrepare(), reconstruct=model, convert=ZipConverter())


def real_image(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    """The real xAI client (XAI_BASE_URL points at the fake xAI server) in the image stage; quick stages after it."""
    from pipeline.backends import image_generator

    return Stages(image=image_generator(settings), prepare=CopyPrepare(), reconstruct=BoxReconstructor(),
                  convert=ZipConverter())


def real_model(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    """The real TripoSR service behind the 3D stage; quick test stages around it."""
    assert reconstructor is not None, "real_model needs the TripoSR service (service.py passes it)"
    return Stages(image=SleepyImage(), prepare=CopyPrepare(), reconstruct=reconstructor, convert=ZipConverter())


class BigMeshesBakeBig:
    """The real Blender pool, where a 'big-mesh' job's mesh (BoxReconstructor's 100k-face blob: the only GLB over
    1 MB here) bakes at TEST_BIG_MESH_BAKE_SIZE and every other at GROK3D_BAKE_SIZE: one conversion long enough to be
    cancelled in (a 4096-pixel bake: seconds), and quick ones beside it. The rest is the pool's own."""

    BIG_GLB_BYTES = 1_000_000

    def __init__(self, pool: Any, bake_size: int) -> None:
        self.pool = pool
        self.bake_size = bake_size

    async def convert(self, glb_path: Path, usdz_path: Path) -> None:
        big = glb_path.stat().st_size > self.BIG_GLB_BYTES
        await self.pool.convert_with_report(glb_path, usdz_path, bake_size=self.bake_size if big else None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


def real_convert(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    """The real Blender pool (GROK3D_BLENDER_WORKERS warm workers, started with the API worker) behind the USDZ
    stage; quick test stages before it. TEST_BIG_MESH_BAKE_SIZE: see BigMeshesBakeBig."""
    from pipeline.backends import converter

    pool = converter(settings)
    if big := os.environ.get("TEST_BIG_MESH_BAKE_SIZE"):
        pool = BigMeshesBakeBig(pool, int(big))
    return Stages(image=SleepyImage(), prepare=CopyPrepare(), reconstruct=BoxReconstructor(), convert=pool)


def real_prepare(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    """The real image preparer (matting, framing on grey: what an uploaded picture goes through), quick stages
    around it; without XAI_API_KEY the image stage is unavailable, as in production."""
    from pipeline.imaging import TripoSRImagePreparer

    image = SleepyImage() if settings.xai_api_key else Unavailable("Image generation is not configured.")
    return Stages(image=image, prepare=TripoSRImagePreparer(), reconstruct=BoxReconstructor(), convert=ZipConverter())


def real_formats(settings: Settings, reconstructor: Reconstructor | None = None) -> Stages:
    """The real Blender pool behind the USDZ stage and the formats made on demand, for a coloured sphere."""
    from pipeline.backends import converter

    return Stages(image=SleepyImage(), prepare=CopyPrepare(), reconstruct=SphereReconstructor(),
                  convert=converter(settings))
