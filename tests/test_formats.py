"""The formats of API.md §3 made on first request, the mesh report, face_limit and the path form of asset URLs,
against the app with the real Blender pool (tests/stages.py:real_formats: quick stages before it, a coloured egg of
20,480 faces as the mesh). Served in process (tests/inprocess.py): the formats, the pool and the routes are the
app's own, whatever serves it; tests/test_lifecycle.py and test_no_orphans.py run the pool under `bentoml serve`."""

from __future__ import annotations

import io
import json
import re
import subprocess
import zipfile
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import trimesh
from PIL import Image

from converters.blender.pool import default_python
from tests.blender_helpers.checks import HELPERS, srgb_encode
from tests.inprocess import AppServer
from tests.server import wait_job
from tests.test_api import assert_error

EGG_EXTENTS = [0.5, 0.3, 0.46]  # x, y (up), z (front), metres
RED, GREEN = np.array([200, 20, 20]), np.array([20, 180, 20])  # the egg's vertex colours, COLOR_0 (linear)
# A texture is sRGB-encoded: the baked texel of a linear colour c is its encoding (converters/blender/texbake.py).
RED_TEXEL, GREEN_TEXEL = (srgb_encode(c / 255) * 255 for c in (RED, GREEN))
TOP_Y, FRONT_Z = 0.26, 0.21  # faces well inside the egg's red top and green front


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"GROK3D_STAGES": "tests.stages:real_formats", "XAI_API_KEY": "test-key", "GROK3D_BAKE_SIZE": "128",
           "GROK3D_BLENDER_WORKERS": "2"}
    with AppServer(tmp_path_factory.mktemp("formats"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def job(client) -> dict:
    body = wait_job(client, client.post("/api/generate", json={"prompt": "an egg"}).json()["job_id"], timeout_s=120)
    assert body["status"] == "complete", body
    return body


def get(client: httpx.Client, job_id: str, asset_type: str) -> httpx.Response:
    r = client.get(f"/api/asset/{job_id}", params={"asset_type": asset_type})
    assert r.status_code == 200, (asset_type, r.text)
    return r


def sample(texture: Image.Image, uv: np.ndarray) -> np.ndarray:
    """The texel under each UV (glTF/OBJ: origin bottom-left), as 0..255 RGB."""
    pixels = np.asarray(texture.convert("RGB"), dtype=float)
    height, width = pixels.shape[:2]
    x = np.clip((uv[:, 0] * width).astype(int), 0, width - 1)
    y = np.clip(((1 - uv[:, 1]) * height).astype(int), 0, height - 1)
    return pixels[y, x]


def assert_baked(mesh: trimesh.Trimesh) -> None:
    """The faces on the egg's top read red from the texture, those in front green: the baked texture, in the
    frame of the GLB (Y up, front +Z)."""
    texture = mesh.visual.material.baseColorTexture if hasattr(mesh.visual.material, "baseColorTexture") \
        else mesh.visual.material.image
    assert texture is not None
    centres = mesh.triangles_center
    face_uv = mesh.visual.uv[mesh.faces].mean(axis=1)
    top = centres[:, 1] > TOP_Y
    front = (centres[:, 2] > FRONT_Z) & (centres[:, 1] < 0.2)
    assert top.sum() > 50 and front.sum() > 50
    assert np.abs(np.median(sample(texture, face_uv[top]), axis=0) - RED_TEXEL).max() < 10
    assert np.abs(np.median(sample(texture, face_uv[front]), axis=0) - GREEN_TEXEL).max() < 10


def test_the_mesh_report_is_trimeshs_own_numbers_for_the_delivered_glb(client, job):
    mesh = trimesh.load(io.BytesIO(get(client, job["job_id"], "glb").content), file_type="glb", force="mesh")
    report = job["mesh"]
    assert report["faces"] == len(mesh.faces) == 20480
    assert report["vertices"] == len(mesh.vertices)
    assert report["watertight"] is mesh.is_watertight is True
    assert report["size_m"] == pytest.approx(list(mesh.extents), abs=1e-9)
    assert report["size_m"] == pytest.approx(EGG_EXTENTS, abs=1e-6)
    assert report["volume_m3"] == pytest.approx(mesh.volume, rel=1e-9)


def test_face_limit_decimates_and_keeps_colours(client):
    body = wait_job(client, client.post("/api/generate", json={"prompt": "a small egg", "face_limit": 2000,
                                                               "size_m": 0.25}).json()["job_id"], timeout_s=120)
    assert body["status"] == "complete", body
    mesh = trimesh.load(io.BytesIO(get(client, body["job_id"], "glb").content), file_type="glb", force="mesh")
    assert len(mesh.faces) <= 2000 and len(mesh.faces) > 1500
    assert body["mesh"]["faces"] == len(mesh.faces) and body["mesh"]["watertight"] is True
    assert max(mesh.extents) == pytest.approx(0.25, abs=1e-6)
    assert mesh.bounds[0][1] == pytest.approx(0, abs=1e-7)  # still resting on y = 0
    colours = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(int)
    top = mesh.vertices[:, 1] > TOP_Y / 2  # the egg at half size
    assert np.abs(np.median(colours[top], axis=0) - RED).max() < 10
    assert len(np.unique(colours, axis=0)) >= 3


def test_the_preview_is_made_with_the_usdz(client, server, job):
    assert (server.data_dir / "jobs" / job["job_id"] / "preview.jpg").is_file()  # before anyone asked for it
    r = get(client, job["job_id"], "preview")
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["content-disposition"] == f'inline; filename="{job["job_id"]}.preview.jpg"'
    picture = Image.open(io.BytesIO(r.content)).convert("RGB")
    assert picture.size == (256, 256)
    assert np.asarray(picture).std() > 10  # a model on a background, not a blank frame


@pytest.mark.parametrize("asset_type, media_type, name", [
    ("glb_textured", "model/gltf-binary", "{}.textured.glb"),
    ("obj", "application/zip", "{}.obj.zip"),
    ("stl", "model/stl", "{}.stl"),
    ("3mf", "model/3mf", "{}.3mf"),
    ("fbx", "application/octet-stream", "{}.fbx"),
])
def test_each_format_has_its_media_type_and_file_name(client, job, asset_type, media_type, name):
    r = get(client, job["job_id"], asset_type)
    assert r.headers["content-type"] == media_type
    assert r.headers["content-disposition"] == f'attachment; filename="{name.format(job["job_id"])}"'
    assert "etag" in r.headers
    again = get(client, job["job_id"], asset_type)
    assert again.content == r.content and again.headers["etag"] == r.headers["etag"]  # cached, not made again


def test_glb_textured_carries_the_baked_texture(client, job):
    data = get(client, job["job_id"], "glb_textured").content
    mesh = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh")
    assert len(mesh.faces) == job["mesh"]["faces"]
    assert mesh.extents == pytest.approx(job["mesh"]["size_m"], abs=1e-5)
    assert_baked(mesh)
    document = json.loads(data[20:20 + int.from_bytes(data[12:16], "little")])
    attributes = document["meshes"][0]["primitives"][0]["attributes"]
    assert "TEXCOORD_0" in attributes and "COLOR_0" not in attributes


def test_obj_zip_is_obj_mtl_and_the_texture(client, job, tmp_path):
    with zipfile.ZipFile(io.BytesIO(get(client, job["job_id"], "obj").content)) as archive:
        assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "model.png"]
        archive.extractall(tmp_path)
    assert "map_Kd model.png" in (tmp_path / "model.mtl").read_text()
    mesh = trimesh.load(tmp_path / "model.obj", force="mesh")
    assert len(mesh.faces) == job["mesh"]["faces"]
    assert mesh.extents == pytest.approx(job["mesh"]["size_m"], abs=1e-5)  # Y up, metres
    assert_baked(mesh)


@pytest.mark.parametrize("asset_type", ["stl", "3mf"])
def test_stl_and_3mf_stand_on_the_build_plate_in_millimetres(client, job, asset_type):
    mesh = trimesh.load(io.BytesIO(get(client, job["job_id"], asset_type).content), file_type=asset_type,
                        force="mesh")
    assert len(mesh.faces) == job["mesh"]["faces"]
    x, y, z = job["mesh"]["size_m"]
    assert mesh.extents == pytest.approx([x * 1000, z * 1000, y * 1000], abs=1e-2)  # Z up, millimetres
    assert mesh.bounds[0][2] == pytest.approx(0, abs=1e-3)
    assert mesh.bounds[0][1] == pytest.approx(-260, abs=0.1)  # the egg's fuller front faces -Y
    if asset_type == "3mf":
        assert mesh.units == "millimeter"


def test_fbx_loads_in_blender_with_the_texture_embedded(client, job, tmp_path):
    fbx = tmp_path / "model.fbx"
    fbx.write_bytes(get(client, job["job_id"], "fbx").content)
    done = subprocess.run([str(default_python()), str(HELPERS / "inspect_fbx.py"), str(fbx)], capture_output=True,
                          text=True, timeout=120, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["faces"] == job["mesh"]["faces"]
    assert report["extents"] == pytest.approx(job["mesh"]["size_m"], abs=1e-5)  # metres, Y up, front +Z
    assert report["packed"] == [True]  # the texture travels inside the file
    assert np.abs(np.array(report["top"]) - RED_TEXEL).max() < 10
    assert np.abs(np.array(report["front"]) - GREEN_TEXEL).max() < 10


def test_two_concurrent_first_requests_convert_once(client, server):
    body = wait_job(client, client.post("/api/generate", json={"prompt": "another egg"}).json()["job_id"],
                    timeout_s=120)
    job_id = body["job_id"]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: httpx.get(f"{server.url}/api/asset/{job_id}?asset_type=fbx", timeout=120),
                                range(2)))
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].content == answers[1].content
    assert len(re.findall(rf"{job_id} fbx made in", server.log())) == 1


def test_the_path_form_ends_in_the_files_extension(client, job):
    job_id = job["job_id"]
    for name, asset_type in (("model.usdz", "usdz"), ("model.glb", "glb"), ("image.jpg", "image"),
                             ("preview.jpg", "preview"), ("model_textured.glb", "glb_textured"),
                             ("model.obj.zip", "obj"), ("model.stl", "stl"), ("model.3mf", "3mf"),
                             ("model.fbx", "fbx")):
        by_path = client.get(f"/api/jobs/{job_id}/{name}")
        by_query = get(client, job_id, asset_type)
        assert by_path.status_code == 200, name
        assert by_path.content == by_query.content
        assert by_path.headers["content-type"] == by_query.headers["content-type"]
        assert by_path.headers["content-disposition"] == by_query.headers["content-disposition"]
    assert_error(client.get(f"/api/jobs/{job_id}/model.ply"), 404, "Not found")
    assert_error(client.get("/api/jobs/ffffffff/model.usdz"), 404, "Job not found")
    assert client.head(f"/api/jobs/{job_id}/model.usdz").headers["content-type"] == "model/vnd.usdz+zip"
    example = client.get("/api/jobs/ex_robot-mascot/model.usdz")
    assert example.status_code == 200 and example.content[:2] == b"PK"


def test_an_examples_formats_are_made_too(client, server):
    mesh = trimesh.load(io.BytesIO(get(client, "ex_mars-habitat", "stl").content), file_type="stl", force="mesh")
    glb = trimesh.load(io.BytesIO(get(client, "ex_mars-habitat", "glb").content), file_type="glb", force="mesh")
    assert len(mesh.faces) == len(glb.faces)
    report = client.get("/api/status/ex_mars-habitat").json()["mesh"]
    assert report["faces"] == len(glb.faces) and report["size_m"] == pytest.approx(list(glb.extents), abs=1e-9)
    assert get(client, "ex_mars-habitat", "preview").content == get(client, "ex_mars-habitat", "image").content
    assert (server.data_dir / "example-formats" / "ex_mars-habitat" / "model.stl").is_file()


def test_a_failed_conversion_is_a_sentence_never_a_500(client, server):
    body = wait_job(client, client.post("/api/generate", json={"prompt": "a broken egg"}).json()["job_id"],
                    timeout_s=120)
    (server.data_dir / "jobs" / body["job_id"] / "model.glb").write_bytes(b"not a GLB at all")
    for asset_type, sentence in (
            ("fbx", "The FBX could not be made: the 3D model file is not a GLB (binary glTF) file."),
            ("stl", "The STL could not be made: the 3D model file could not be read (")):
        for _ in range(2):  # remembered: the second answer is the same
            r = client.get(f"/api/asset/{body['job_id']}", params={"asset_type": asset_type})
            assert r.status_code == 404, r.text
            assert r.json()["error"].startswith(sentence), r.json()
