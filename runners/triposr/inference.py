"""What the TripoSR service runs: load the model TRIPOSR_MODEL names, and turn a batch of pictures into GLBs.

Kept apart from service.py so that it runs (and is tested) without BentoML serving.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from PIL import Image as PILImage

from runners.triposr.loading import load_model as load_source, model_version
from runners.triposr.mesh import extract_meshes, to_delivery_glb
from runners.triposr.precision import number_format, resolve as resolve_precision
from runners.triposr.wire import Failure

if TYPE_CHECKING:
    from PIL import Image

    from runners.triposr.model import TripoSR


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(source: str, device: str | None = None) -> tuple[TripoSR, str]:
    """(model, version) from a source that is there (the service asks sources.find first, before it imports
    torch); ModelLoadError when what is there is broken."""
    model = load_source(source, device=device or default_device())
    return model, model_version(source)


@torch.no_grad()
def reconstruct_batch(model: TripoSR, pictures: list[Image.Image], *, resolution: int | Sequence[int],
                      threshold: float, size_m: float, precision: str = "fp32") -> list[bytes | Failure]:
    """One forward pass for the whole batch and one batched density grid per resolution in it: a GLB per
    picture, or Failure.no_surface where none was found.

    resolution: the marching-cubes grid, one for all or one per picture. precision: TRIPOSR_PRECISION
    (runners/triposr/precision.py)."""
    resolutions = [resolution] * len(pictures) if isinstance(resolution, int) else list(resolution)
    plan = resolve_precision(precision, model.device)
    with number_format(plan.network, model.device):
        codes = model(pictures)
    meshes: list = [None] * len(pictures)
    with number_format(plan.grid, model.device):
        for grid in sorted(set(resolutions)):
            group = [i for i, r in enumerate(resolutions) if r == grid]
            for i, mesh in zip(group, extract_meshes(model, codes[group], resolution=grid, threshold=threshold)):
                meshes[i] = mesh
    return [to_delivery_glb(mesh, size_m) if len(mesh.faces) else Failure.no_surface for mesh in meshes]


def reconstruct_encoded(model: TripoSR, images: list[bytes], *, resolution: int | Sequence[int], threshold: float,
                        size_m: float, precision: str = "fp32") -> list[bytes | Failure]:
    """Encoded pictures (PNG, JPEG) -> GLBs, like reconstruct_batch; Failure.unreadable_picture where a picture
    does not decode."""
    resolutions = [resolution] * len(images) if isinstance(resolution, int) else list(resolution)
    pictures: list[Image.Image | None] = []
    for data in images:
        try:
            pictures.append(PILImage.open(io.BytesIO(data)).convert("RGB"))
        except (OSError, ValueError, PILImage.DecompressionBombError):
            pictures.append(None)
    readable = [p for p in pictures if p is not None]
    grids = [r for p, r in zip(pictures, resolutions) if p is not None]
    glbs = iter(reconstruct_batch(model, readable, resolution=grids, threshold=threshold, size_m=size_m,
                                  precision=precision) if readable else [])
    return [next(glbs) if p is not None else Failure.unreadable_picture for p in pictures]
