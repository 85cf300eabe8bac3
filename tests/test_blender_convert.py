"""GLB -> USDZ through the real Blender pool: ARKit checks, frame, face count, baked colours, previews, bad input.

One pool (two workers, the service's default bake size) serves the whole module. USDZ files are inspected with
usd-core 26.11's UsdValidation validators plus the ARKit rules restated in tests/blender_helpers/inspect_usdz.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from converters.blender.pool import BlenderPool
from pipeline.errors import StageError
from tests.blender_helpers.checks import assert_ar_ready, colour_error, coverage, inspect_usdz
from tests.blender_helpers.meshes import blob_mesh, read_glb, write_glb

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool() -> AsyncIterator[BlenderPool]:
    async with BlenderPool(workers=2, timeout_s=120, bake_size=1024) as started:
        yield started


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blender-convert")


@pytest.fixture(scope="module")
def glb_20k(work: Path) -> Path:
    return write_glb(blob_mesh(80), work / "blob20k.glb")


async def test_20k_faces_ar_ready_with_baked_colours(pool: BlenderPool, work: Path, glb_20k: Path) -> None:
    usdz = work / "blob20k.usdz"
    result = await pool.convert_with_report(glb_20k, usdz)
    assert result.counts == {"objects": 0, "meshes": 0, "materials": 0, "images": 0}
    report, arrays = inspect_usdz(usdz, work)
    assert_ar_ready(report, glb_20k)
    mean_error, match_distance = colour_error(glb_20k, usdz, report, arrays)
    assert match_distance < 1e-6  # every USD triangle is one of the GLB's, in the same place
    assert mean_error < 3.0


async def test_300k_faces(pool: BlenderPool, work: Path) -> None:
    glb = write_glb(blob_mesh(305), work / "blob300k.glb")
    usdz = work / "blob300k.usdz"
    await pool.convert(glb, usdz)
    report, arrays = inspect_usdz(usdz, work)
    assert report["faces"] > 250_000
    assert_ar_ready(report, glb)
    mean_error, _ = colour_error(glb, usdz, report, arrays)
    assert mean_error < 3.0


async def test_preview_render_frames_the_model(pool: BlenderPool, work: Path, glb_20k: Path) -> None:
    jpeg = work / "preview.jpg"
    result = await pool.render_preview_with_report(glb_20k, jpeg)
    assert jpeg.read_bytes()[:3] == b"\xff\xd8\xff"
    from PIL import Image

    assert Image.open(jpeg).size == (512, 512)
    assert 0.10 < coverage(jpeg) < 0.90
    assert result.counts == {"objects": 0, "meshes": 0, "materials": 0, "images": 0}


async def test_the_same_model_gives_the_same_bytes(pool: BlenderPool, work: Path, glb_20k: Path) -> None:
    """No time of day in the files: the USDZ's zip entry times are fixed, the preview has no Blender comments."""
    files = []
    for n in range(2):
        if n:
            await asyncio.sleep(2.1)  # zip times count in 2-second steps
        folder = work / f"same-{n}"  # the USDZ names its inner file after itself: same names, other folders
        folder.mkdir()
        usdz, jpeg = folder / "model.usdz", folder / "preview.jpg"
        await pool.convert(glb_20k, usdz)
        await pool.render_preview(glb_20k, jpeg)
        files.append((usdz.read_bytes(), jpeg.read_bytes()))
    assert files[0] == files[1]
    usdz_bytes, jpeg_bytes = files[0]
    assert b"Blender:" not in jpeg_bytes and jpeg_bytes[:3] == b"\xff\xd8\xff"
    from PIL import Image

    assert "comment" not in Image.open(io.BytesIO(jpeg_bytes)).info  # no COM segment at all
    with zipfile.ZipFile(io.BytesIO(usdz_bytes)) as archive:
        assert archive.testzip() is None
        for info in archive.infolist():
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            # USDZ: each file's data still starts on a 64-byte boundary after the patch
            names, extras = struct.unpack_from("<HH", usdz_bytes, info.header_offset + 26)
            assert (info.header_offset + 30 + names + extras) % 64 == 0


def _glb(document: dict, binary: bytes = b"") -> bytes:
    """A GLB container around `document` (padded JSON chunk, optional BIN chunk)."""
    text = json.dumps(document).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<II", len(text), 0x4E4F534A) + text
    if binary:
        binary += b"\0" * (-len(binary) % 4)
        chunks += struct.pack("<II", len(binary), 0x004E4942) + binary
    return b"glTF" + struct.pack("<II", 2, 12 + len(chunks)) + chunks


def _bad_inputs(work: Path, glb_20k: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase the error must contain)."""
    files: dict[str, tuple[bytes, str]] = {
        "empty": (b"", "empty"),
        "not a glb": (b"PK\x03\x04 this is a zip, not a model" * 8, "not a GLB"),
        "corrupt json": (b"glTF" + struct.pack("<IIII", 2, 64, 40, 0x4E4F534A) + b"{\"asset\": {\"vers\x00\xff" * 3, "corrupt"),
        "no geometry": (_glb({"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}],
                              "nodes": [{"name": "nothing"}]}), "no geometry"),
        # JSON intact, buffer cut short: only Blender's importer can tell.
        "truncated": (glb_20k.read_bytes()[: glb_20k.stat().st_size // 2], "could not be read"),
    }
    written = {}
    for name, (data, phrase) in files.items():
        path = work / f"bad-{name.replace(' ', '-')}.glb"
        path.write_bytes(data)
        written[name] = (path, phrase)
    huge = work / "bad-huge.glb"
    with huge.open("wb") as sparse:  # a sparse file: over the size limit without using the disk
        sparse.write(b"glTF")
        sparse.truncate(256 * 2**20 + 1)
    written["huge file"] = (huge, "too large")
    return written


async def test_bad_inputs_fail_clearly_and_pool_keeps_serving(pool: BlenderPool, work: Path, glb_20k: Path) -> None:
    for name, (path, phrase) in _bad_inputs(work, glb_20k).items():
        with pytest.raises(StageError) as failure:
            await pool.convert(path, work / "bad.usdz")
        assert phrase in failure.value.message, (name, failure.value.message)
        assert "Traceback" not in failure.value.message
        with pytest.raises(StageError):
            await pool.render_preview(path, work / "bad.jpg")
    result = await pool.convert_with_report(glb_20k, work / "after-bad.usdz")
    assert result.result["faces"] == len(read_glb(glb_20k).faces)
    assert result.counts == {"objects": 0, "meshes": 0, "materials": 0, "images": 0}


async def test_the_checks_do_fail_on_a_non_arkit_usdz(work: Path) -> None:
    """The inspector is not a rubber stamp: a Z-up package with foreign prims and shaders is reported."""
    import subprocess

    from converters.blender.pool import default_python
    from tests.blender_helpers.checks import HELPERS

    bad = work / "non-arkit"
    bad.mkdir()
    subprocess.run([str(default_python()), str(HELPERS / "make_bad_usdz.py"), str(bad)], check=True, timeout=60)
    # The package's Mesh has no points, so call the two rule sets directly rather than the whole inspector.
    rules = subprocess.run(
        [str(default_python()), "-c",
         "import json, sys; sys.path.insert(0, sys.argv[1]); import inspect_usdz as i; from pxr import Usd; "
         "s = Usd.Stage.Open(sys.argv[2]); print(json.dumps([i.run_validators(s), i.arkit_failures(sys.argv[2], s)]))",
         str(HELPERS), str(bad / "bad.usdz")],
        capture_output=True, text=True, timeout=60, check=True)
    validation, arkit = json.loads(rules.stdout.strip().splitlines()[-1])
    assert any("MissingMetersPerUnit" in e for e in validation)
    assert any("MissingMaterialBindingAPI" in e for e in validation)
    assert "upAxis should be Y" in arkit
    assert any("BasisCurves" in f for f in arkit)
    assert any("shader id not allowed" in f for f in arkit)


async def test_without_baking_colours_stay_as_display_color(pool: BlenderPool, work: Path, glb_20k: Path) -> None:
    """bake_size 0 (GROK3D_BAKE_SIZE=0): no texture, vertex colours exported as displayColor; still ARKit-clean."""
    usdz = work / "unbaked.usdz"
    await pool.convert_with_report(glb_20k, usdz, bake_size=0)
    report, _ = inspect_usdz(usdz, work)
    assert report["validation_errors"] == [] and report["arkit_failures"] == []
    assert report["display_color"] is True and report["textures"] == []
    assert report["faces"] == len(read_glb(glb_20k).faces)


async def test_several_meshes_with_transforms_become_one_mesh_in_place(pool: BlenderPool, work: Path) -> None:
    """A GLB of two transformed nodes: joined into one mesh, every triangle where the GLB's scene puts it."""
    import trimesh

    scene = trimesh.Scene()
    scene.add_geometry(blob_mesh(40), node_name="left", transform=trimesh.transformations.translation_matrix([-0.3, 0, 0]))
    turned = trimesh.transformations.rotation_matrix(np.pi / 2, [0, 1, 0])
    turned[:3, 3] = [0.3, 0.05, 0.1]
    scene.add_geometry(blob_mesh(40), node_name="right", transform=turned)
    glb = work / "two-nodes.glb"
    glb.write_bytes(scene.export(file_type="glb"))
    usdz = work / "two-nodes.usdz"
    await pool.convert(glb, usdz)
    report, arrays = inspect_usdz(usdz, work)
    assert_ar_ready(report, glb)
    mean_error, match_distance = colour_error(glb, usdz, report, arrays)
    assert match_distance < 1e-6 and mean_error < 3.0
