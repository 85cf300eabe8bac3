"""Image to 3D and the options per job (API.md §1), against the real `bentoml serve`: no xAI key, the real image
preparer (matting and framing on grey) behind the upload, quick stand-ins after it (tests/stages.py:real_prepare)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from pipeline import schemas
from pipeline.uploads import MAX_UPLOAD_BYTES
from tests.server import Server, wait_job
from tests.test_api import assert_error

TOO_MANY_PIXELS = "Image has too many pixels (max 40 megapixels)"
UNSUPPORTED = "Unsupported image format: send a JPEG, PNG or WebP picture"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("upload")
    env = {"GROK3D_STAGES": "tests.stages:real_prepare", "XAI_API_KEY": "", "TEST_CALL_LOG": str(data / "calls.log"),
           "TEST_RESOLUTION_LOG": str(data / "resolutions.log")}
    with Server(data, env) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def object_on(background: tuple[int, ...], mode: str = "RGB", size: int = 200) -> Image.Image:
    """An orange disc on a plain background."""
    image = Image.new(mode, (size, size), background)
    pixels = np.array(image)
    y, x = np.mgrid[:size, :size]
    pixels[(x - size / 2) ** 2 + (y - size / 2) ** 2 < (size / 3) ** 2] = (240, 140, 20, 255)[:len(background)]
    return Image.fromarray(pixels, mode)


def upload(client: httpx.Client, picture: bytes, *, as_json: bool = False, **fields: object) -> httpx.Response:
    if as_json:
        return client.post("/api/generate", json={"image": base64.b64encode(picture).decode(), **fields})
    return client.post("/api/generate", files={"image": ("picture", picture)},
                       data={k: str(v) for k, v in fields.items()})


def job_file(server: Server, job_id: str, name: str) -> Image.Image:
    return Image.open(server.data_dir / "jobs" / job_id / name).convert("RGB")


def png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR for a huge canvas, with almost no pixel data: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# -- a job from a picture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_an_upload_job_completes_without_xai(client, server, as_json):
    assert_error(client.post("/api/generate", json={"prompt": "a cat"}), 503,
                 "Image generation is not configured: set XAI_API_KEY")  # no key: prompts are refused
    picture = encoded(object_on((255, 255, 255)), "PNG")
    r = upload(client, picture, as_json=as_json)
    assert r.status_code == 200, r.text
    body = wait_job(client, r.json()["job_id"])
    assert body["status"] == "complete", body
    assert body["source"] == "upload" and body["prompt"] is None
    job_id = body["job_id"]
    image = client.get(f"/api/asset/{job_id}", params={"asset_type": "image"})
    assert image.headers["content-type"] == "image/jpeg" and image.content[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(image.content)).size == (200, 200)
    assert (server.data_dir / "jobs" / job_id / "upload").read_bytes() == picture  # kept as sent
    calls = (server.data_dir / "calls.log").read_text().split()
    assert "image" not in calls and "3d" in calls  # xAI's stage was never called


def test_a_caption_is_the_prompt_of_an_upload_job(client):
    r = upload(client, encoded(object_on((255, 255, 255)), "JPEG"), prompt="  my orange disc  ")
    body = wait_job(client, r.json()["job_id"])
    assert body["prompt"] == "my orange disc" and body["source"] == "upload"
    assert_error(upload(client, encoded(object_on((255, 255, 255)), "JPEG"), prompt="x" * 1025), 400,
                 "Prompt too long (max 1024 characters)")


def test_transparency_is_the_cut_out_and_the_model_sees_grey_not_black(client, server):
    """A PNG whose transparent pixels are black: flattening it without its alpha would give TripoSR a black
    background; its alpha is the matte instead, and the object lands on TripoSR's 0.5 grey."""
    picture = encoded(object_on((0, 0, 0, 0), "RGBA"), "PNG")
    body = wait_job(client, upload(client, picture).json()["job_id"])
    assert body["status"] == "complete"
    seen = np.asarray(job_file(server, body["job_id"], "input.png"), dtype=int)  # what the 3D stage got
    for corner in (seen[2, 2], seen[2, -3], seen[-3, 2], seen[-3, -3]):
        assert np.abs(corner - 128).max() <= 1, corner
    assert np.abs(seen[256, 256] - (240, 140, 20)).max() <= 3  # the object, centred
    shown = np.asarray(job_file(server, body["job_id"], "image.jpg"), dtype=int)
    assert shown[2, 2].min() > 245  # the JPEG shows the transparency as white


def test_exif_orientation_is_honoured(client, server):
    """Stored landscape, red left and blue right, with EXIF orientation 6 (turn 90° clockwise to view): upright
    it is portrait, red on top."""
    stored = Image.new("RGB", (240, 120), (220, 20, 20))
    stored.paste((20, 20, 220), (120, 0, 240, 120))
    exif = Image.Exif()
    exif[0x0112] = 6
    body = wait_job(client, upload(client, encoded(stored, "JPEG", exif=exif, quality=95)).json()["job_id"])
    assert body["status"] == "complete"
    shown = job_file(server, body["job_id"], "image.jpg")
    assert shown.size == (120, 240)
    assert shown.getpixel((60, 20))[0] > 200 and shown.getpixel((60, 220))[2] > 200
    seen = job_file(server, body["job_id"], "input.png")  # the whole upright picture framed on grey
    assert seen.getpixel((256, 120))[0] > 200 and seen.getpixel((256, 400))[2] > 200


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_jpeg_png_and_webp_are_taken(client, fmt):
    r = upload(client, encoded(object_on((255, 255, 255)), fmt))
    assert r.status_code == 200, r.text


# -- what is refused, and how -------------------------------------------------------------------------------

@pytest.mark.parametrize("as_json", [False, True], ids=["form", "json"])
def test_a_decompression_bomb_is_refused_before_decoding(client, as_json):
    assert_error(upload(client, png_header(30000, 30000), as_json=as_json), 400, TOO_MANY_PIXELS)
    assert_error(upload(client, png_header(7000, 6000), as_json=as_json), 400, TOO_MANY_PIXELS)  # 42 MP


@pytest.mark.parametrize("picture, message", [
    (b"GIF89a" + b"\0" * 64, UNSUPPORTED),
    (encoded(Image.new("RGB", (8, 8)), "BMP"), UNSUPPORTED),
    (b"not a picture at all", UNSUPPORTED),
    (b"", "The image is empty"),
    (encoded(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")[:60], "The image could not be read (image file is "
                                                                  "truncated)"),
])
def test_other_formats_and_broken_pictures_are_400(client, picture, message):
    r = upload(client, picture, as_json=True)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(message.split(" (")[0]), r.json()


def test_the_size_limit_is_413_in_json_and_in_a_form(client):
    big = b"\xff\xd8" + b"\0" * MAX_UPLOAD_BYTES
    assert_error(upload(client, big), 413, "Image too large (max 10 MiB)")
    assert_error(upload(client, big, as_json=True), 413, "Image too large (max 10 MiB)")
    way_too_big = "A" * (20 * 2**20)
    assert_error(client.post("/api/generate", json={"image": way_too_big}), 413, "Request body too large")


def test_an_image_that_is_not_base64_or_not_a_string(client):
    for value in ("%%% not base64 %%%", 42, ["a"]):
        assert_error(client.post("/api/generate", json={"image": value}), 400,
                     "Invalid image: send the picture's bytes as a base64 string")
    data_uri = "data:image/png;base64," + base64.b64encode(encoded(object_on((255, 255, 255)), "PNG")).decode()
    assert client.post("/api/generate", json={"image": data_uri}).status_code == 200  # as a browser reads a file


def test_a_prompt_body_keeps_its_64_kib_limit(client):
    body = b'{"prompt": "' + b"x" * (64 * 1024) + b'", "resolution": 64}'
    assert_error(client.post("/api/generate", content=body, headers={"content-type": "application/json"}), 413,
                 "Request body too large")
    garbage = b"{" + b"x" * (64 * 1024)  # not JSON at all, and too large: refused for its size, as before
    assert_error(client.post("/api/generate", content=garbage), 413, "Request body too large")


def test_a_form_without_a_picture_is_a_prompt_request(client):
    assert_error(client.post("/api/generate", files={"prompt": (None, "a cat")}), 503,
                 "Image generation is not configured: set XAI_API_KEY")
    assert_error(client.post("/api/generate", files={"resolution": (None, "64")}), 400, "No prompt provided")
    assert_error(client.post("/api/generate", content=b"--x\r\nbroken", headers={
        "content-type": "multipart/form-data"}), 400, "Invalid request body")  # no boundary


# -- options ------------------------------------------------------------------------------------------------

BOUNDS = [
    ("resolution", schemas.RESOLUTION_RANGE, schemas.BAD_RESOLUTION, [31, 513, "many", 64.5, True, -1]),
    ("face_limit", schemas.FACE_LIMIT_RANGE, schemas.BAD_FACE_LIMIT, [99, 1_000_001, "ten", 2000.5, False]),
    ("size_m", schemas.SIZE_M_RANGE, schemas.BAD_SIZE_M, [0.0099, 100.01, 0, -1, "big", True, "nan", "inf"]),
]


@pytest.mark.parametrize("name, bounds, message, wrong", BOUNDS, ids=[b[0] for b in BOUNDS])
def test_each_options_bounds(client, name, bounds, message, wrong):
    picture = encoded(object_on((255, 255, 255)), "PNG")
    for value in wrong:  # JSON values of every kind; a form's fields are text, so only the texts go there too
        for json_body in ([True] if not isinstance(value, str) else [True, False]):
            assert_error(upload(client, picture, as_json=json_body, **{name: value}), 400, message)
    if name == "size_m":  # JSON's non-standard NaN and Infinity, which Python's json module writes
        for literal in (b"NaN", b"Infinity"):
            raw = b'{"image": "' + base64.b64encode(picture) + b'", "size_m": ' + literal + b"}"
            assert_error(client.post("/api/generate", content=raw), 400, message)
    for value in bounds:  # both ends are allowed, from JSON and from a form, and shown in the status
        for json_body in (True, False):
            r = upload(client, picture, as_json=json_body, **{name: value})
            assert r.status_code == 200, r.text
            assert client.get(f"/api/status/{r.json()['job_id']}").json()[name] == value


def test_options_are_stored_shown_and_the_resolution_reaches_the_3d_stage(client, server):
    r = upload(client, encoded(object_on((255, 255, 255)), "PNG"), resolution=96, face_limit=5000, size_m=1.5)
    body = wait_job(client, r.json()["job_id"])
    assert (body["resolution"], body["face_limit"], body["size_m"]) == (96, 5000, 1.5)
    assert "96" in (server.data_dir / "resolutions.log").read_text().split()
    # Defaults are filled in: TRIPOSR_MC_RESOLUTION, GROK3D_MODEL_SIZE_M, no face limit.
    plain = wait_job(client, upload(client, encoded(object_on((255, 255, 255)), "PNG")).json()["job_id"])
    assert (plain["resolution"], plain["face_limit"], plain["size_m"]) == (256, None, 0.5)
    # The box of tests/stages.py is 0.5 m across: delivered at the job's size.
    assert body["mesh"]["size_m"] == pytest.approx([1.5, 0.9, 1.2], abs=1e-5)
    assert plain["mesh"]["size_m"] == pytest.approx([0.5, 0.3, 0.4], abs=1e-6)
