"""Checks on converter output, run from the main venv: USDZ inspection (through the Blender venv) and colours."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree

from converters.blender.pool import default_python
from tests.blender_helpers.meshes import read_glb

HELPERS = Path(__file__).resolve().parent


def inspect_usdz(usdz: Path, work: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Run inspect_usdz.py in the Blender venv (usd-core lives there); return its report and arrays."""
    npz = work / (usdz.stem + "-inspect.npz")
    done = subprocess.run([str(default_python()), str(HELPERS / "inspect_usdz.py"), str(usdz), str(npz)],
                          capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(npz) as arrays:
        return report, {k: arrays[k] for k in arrays.files}


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1 / 2.4) - 0.055)


def texture_from_usdz(usdz: Path, name: str) -> np.ndarray:
    with zipfile.ZipFile(usdz) as archive:
        data = archive.read(name.removeprefix("./"))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def sample_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Texture lookup as a renderer does it: UV origin bottom-left, texel centres at half-integers."""
    height, width = texture.shape[:2]
    x = np.clip(uv[:, 0] * width - 0.5, 0, width - 1)
    y = np.clip((1.0 - uv[:, 1]) * height - 0.5, 0, height - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = texture[y0, x0] * (1 - fx) + texture[y0, x1] * fx
    bottom = texture[y1, x0] * (1 - fx) + texture[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def colour_error(glb: Path, usdz: Path, report: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[float, float]:
    """Mean |texel - vertex colour| at triangle centres in 0..255 sRGB, and the worst centre match distance.

    The GLB's COLOR_0 is linear (glTF); the PNG is sRGB-encoded, so the expected texel is the sRGB encoding of the
    linear average of the three corner colours.
    """
    mesh = read_glb(glb)
    corners = mesh.visual.vertex_colors[:, :3].astype(np.float64)[mesh.faces] / 255.0
    expected = srgb_encode(corners.mean(axis=1)) * 255.0
    distance, match = cKDTree(mesh.triangles_center).query(arrays["centres"])
    texels = sample_bilinear(texture_from_usdz(usdz, report["textures"][0]), arrays["uvs"])
    return float(np.abs(texels - expected[match]).mean()), float(distance.max())


def coverage(jpeg: Path) -> float:
    """Share of the frame that is not background (the corner pixel's colour, allowing for JPEG noise)."""
    pixels = np.asarray(Image.open(jpeg).convert("RGB"), dtype=np.int32)
    background = pixels[:8, :8].reshape(-1, 3).mean(axis=0)
    return float((np.abs(pixels - background).sum(axis=2) > 24).mean())


def assert_ar_ready(report: dict, glb: Path) -> None:
    """Zero validation errors, zero failed ARKit rules, Y up in metres, same faces and placement as the GLB."""
    assert report["validation_errors"] == []
    assert report["arkit_failures"] == []
    assert report["up_axis"] == "Y" and report["meters_per_unit"] == 1.0
    source = read_glb(glb)
    assert report["meshes"] == 1 and report["faces"] == len(source.faces)
    centres = source.triangles_center
    np.testing.assert_allclose(report["bbox_min"], centres.min(axis=0), atol=1e-5)
    np.testing.assert_allclose(report["bbox_max"], centres.max(axis=0), atol=1e-5)
    # The test meshes are off-centre on every axis: a mirrored or turned export would move this.
    np.testing.assert_allclose(report["centroid"], centres.mean(axis=0), atol=1e-5)
    assert len(report["textures"]) == 1 and report["textures"][0].endswith(".png")
