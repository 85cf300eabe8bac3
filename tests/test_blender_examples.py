"""The shipped examples: catalog layout, API.md's delivery frame, file sizes, AR-ready USDZ, previews, and that the
committed models are exactly what `python -m converters.blender.examples build` makes."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converters.blender.examples import EXAMPLES, EXAMPLES_DIR
from tests.blender_helpers.checks import assert_ar_ready, colour_error, coverage, inspect_usdz
from tests.blender_helpers.meshes import read_glb

SLUGS = [spec.slug for spec in EXAMPLES]
# A colour only the front feature of each model has (door, eyes, eyes): it must sit on the +Z side.
FRONT_FEATURE = {"mars-habitat": (255, 170, 40), "robot-mascot": (90, 230, 255), "figurine": (30, 30, 40)}


def test_catalog_lists_the_three_examples() -> None:
    catalog = json.loads((EXAMPLES_DIR / "catalog.json").read_text())
    assert [entry["slug"] for entry in catalog] == ["mars-habitat", "robot-mascot", "figurine"]
    for entry in catalog:
        assert set(entry) == {"slug", "name", "description", "prompt", "created_at"}
        assert "hand-built sample model" in entry["description"]
        assert datetime.strptime(entry["created_at"], "%Y-%m-%dT%H:%M:%S.%f").year >= 2026
        for name in ("image.jpg", "model.glb", "model.usdz"):
            path = EXAMPLES_DIR / entry["slug"] / name
            assert path.is_file() and 0 < path.stat().st_size < 3 * 2**20, path


@pytest.mark.parametrize("slug", SLUGS)
def test_glb_is_in_the_delivery_frame(slug: str) -> None:
    mesh = read_glb(EXAMPLES_DIR / slug / "model.glb")
    assert 5_000 <= len(mesh.faces) <= 100_000
    lo, hi = mesh.bounds
    assert abs(lo[1]) < 1e-6  # resting on y = 0
    assert abs(lo[0] + hi[0]) < 1e-6 and abs(lo[2] + hi[2]) < 1e-6  # centred in x and z
    assert abs((hi - lo).max() - 0.5) < 1e-6  # largest side 0.5 m
    colours = mesh.visual.vertex_colors[:, :3]
    assert len(np.unique(colours, axis=0)) >= 5  # vertex coloured, not one flat colour
    front = np.all(colours == FRONT_FEATURE[slug], axis=1)
    assert front.any() and mesh.vertices[front, 2].mean() > 0.02  # the front faces +Z


@pytest.mark.parametrize("slug", SLUGS)
def test_committed_glb_is_what_the_builder_makes(slug: str) -> None:
    [spec] = [s for s in EXAMPLES if s.slug == slug]
    built, committed = spec.build(), read_glb(EXAMPLES_DIR / slug / "model.glb")
    assert len(built.faces) == len(committed.faces)
    np.testing.assert_allclose(np.sort(built.vertices, axis=0), np.sort(committed.vertices, axis=0), atol=1e-6)


@pytest.mark.parametrize("slug", SLUGS)
def test_usdz_is_ar_ready_and_matches_the_glb(slug: str, tmp_path: Path) -> None:
    glb, usdz = EXAMPLES_DIR / slug / "model.glb", EXAMPLES_DIR / slug / "model.usdz"
    report, arrays = inspect_usdz(usdz, tmp_path)
    assert_ar_ready(report, glb)
    mean_error, _ = colour_error(glb, usdz, report, arrays)
    assert mean_error < 3.0


@pytest.mark.parametrize("slug", SLUGS)
def test_preview_image(slug: str) -> None:
    jpeg = EXAMPLES_DIR / slug / "image.jpg"
    assert Image.open(jpeg).format == "JPEG" and Image.open(jpeg).size == (512, 512)
    assert 0.10 < coverage(jpeg) < 0.90
