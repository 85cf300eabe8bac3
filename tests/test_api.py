"""API.md, row by row, against the app with test stages (tests/stages.py) behind it, served in process
(tests/inprocess.py): the contract gains nothing from `bentoml serve`. What needs BentoML itself (its health
routes, metrics, batching, kill -9) is tested against the real server elsewhere."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.inprocess import AppServer
from tests.server import ROOT, wait_job

STAGES = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key"}
CREATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")
JOB_ID = re.compile(r"[0-9a-f]{8}")
ORDER = ["initializing", "generating_image", "generating_3d", "converting_usdz", "complete"]
PROGRESS = {("queued", "initializing"): {0}, ("processing", "initializing"): {5},
            ("processing", "generating_image"): set(range(10, 31)), ("processing", "generating_3d"): set(range(40, 71)),
            ("processing", "converting_usdz"): set(range(80, 96)), ("complete", "complete"): {100},
            ("error", "error"): {0}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("api")
    env = {**STAGES, "TEST_IMAGE_SLEEP_S": "0.6", "TEST_3D_SLEEP_S": "0.6", "TEST_CONVERT_SLEEP_S": "0.6",
           "GROK3D_CORS_ORIGINS": "http://allowed.example,http://also.example"}
    with AppServer(data, env) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


class RawResponse:
    """Enough of httpx.Response for assert_error, from a request whose path is sent byte for byte."""

    def __init__(self, status_code: int, text: str) -> None:
        self.status_code, self.text = status_code, text

    def json(self) -> dict:
        return json.loads(self.text)


def raw_get(server, path: str) -> RawResponse:
    """GET without the client normalising `..` segments away, as an attacker's client would send it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return RawResponse(r.status, r.read().decode())
    finally:
        conn.close()


def submit(client: httpx.Client, prompt: str = "A futuristic robot cat with glowing blue eyes") -> str:
    r = client.post("/api/generate", json={"prompt": prompt})
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def assert_error(r: httpx.Response, status: int, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    if message is not None:
        assert body["error"] == message
    assert "Traceback" not in r.text


# -- POST /api/generate -------------------------------------------------------------------------------------

def test_generate_accepts_and_stores_durably(client, server):
    r = client.post("/api/generate", json={"prompt": "  A futuristic robot cat  "})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "queued" and JOB_ID.fullmatch(body["job_id"])
    # On disk before the 200: another reader of the SQLite file sees it at once.
    with sqlite3.connect(server.data_dir / "grok3d.db") as db:
        row = db.execute("SELECT prompt FROM jobs WHERE job_id = ?", (body["job_id"],)).fetchone()
    assert row == ("A futuristic robot cat",)
    assert client.get(f"/api/status/{body['job_id']}").json()["prompt"] == "A futuristic robot cat"


@pytest.mark.parametrize("content, headers", [
    (b"{not json", {"content-type": "application/json"}),
    (b'["a", "list"]', {"content-type": "application/json"}),
    (b'"a string"', {"content-type": "application/json"}),
    (b"prompt=cat", {"content-type": "application/x-www-form-urlencoded"}),
    (b"\xff\xfe\x00", {"content-type": "application/json"}),
    (b"", {"content-type": "application/json"}),
])
def test_generate_rejects_a_body_that_is_not_a_json_object(client, content, headers):
    assert_error(client.post("/api/generate", content=content, headers=headers), 400, "Invalid request body")


@pytest.mark.parametrize("payload", [{}, {"prompt": None}, {"prompt": 42}, {"prompt": ["cat"]}, {"prompt": "   \n\t"},
                                     {"text": "cat"}])
def test_generate_needs_a_prompt(client, payload):
    assert_error(client.post("/api/generate", json=payload), 400, "No prompt provided")


def test_generate_limits_prompt_length(client):
    assert_error(client.post("/api/generate", json={"prompt": "x" * 1025}), 400,
                 "Prompt too long (max 1024 characters)")
    assert client.post("/api/generate", json={"prompt": "x" * 1024}).status_code == 200
    # Measured after stripping, as stored.
    assert client.post("/api/generate", json={"prompt": " " * 10 + "x" * 1024 + " "}).status_code == 200


def test_generate_limits_body_size(client):
    big = b'{"prompt": "' + b"x" * (64 * 1024) + b'"}'
    assert_error(client.post("/api/generate", content=big, headers={"content-type": "application/json"}), 413,
                 "Request body too large")

    def chunks():  # no Content-Length: the limit holds while streaming
        yield b'{"prompt": "'
        for _ in range(80):
            yield b"y" * 1024
        yield b'"}'

    assert_error(client.post("/api/generate", content=chunks(), headers={"content-type": "application/json"}), 413,
                 "Request body too large")


# -- GET /api/status ------------------------------------------------------------------------------------------

def test_status_walks_the_stages_forward(client):
    job_id = submit(client)
    seen: list[tuple[str, str, int]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = client.get(f"/api/status/{job_id}").json()
        assert set(body) >= {"job_id", "status", "stage", "progress", "created_at", "prompt", "error"}
        assert CREATED_AT.fullmatch(body["created_at"]), body["created_at"]
        seen.append((body["status"], body["stage"], body["progress"]))
        if body["status"] == "complete":
            break
        time.sleep(0.05)
    for status, stage, progress in seen:
        assert progress in PROGRESS[(status, stage)], (status, stage, progress)
    ranks = [ORDER.index(stage) for _, stage, _ in seen]
    assert ranks == sorted(ranks), seen
    progresses = [p for _, _, p in seen if p]
    assert progresses == sorted(progresses), seen
    assert {"generating_image", "generating_3d", "converting_usdz", "complete"} <= {s for _, s, _ in seen}
    assert body["error"] is None and body["model_version"] == "test:box"


def test_a_failed_stage_is_one_sentence_and_keeps_earlier_assets(client):
    job_id = submit(client, "a cube fail-3d")
    body = wait_job(client, job_id)
    assert (body["status"], body["stage"], body["progress"]) == ("error", "error", 0)
    assert body["error"] == "The 3D model could not be generated: test failure."
    image = client.get(f"/api/asset/{job_id}", params={"asset_type": "image"})
    assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
    assert_error(client.get(f"/api/asset/{job_id}", params={"asset_type": "glb"}), 404, "Asset not found")


def test_an_unexpected_stage_error_hides_the_traceback(client, server):
    job_id = submit(client, "crash-image please")
    body = wait_job(client, job_id)
    assert body["status"] == "error"
    assert body["error"].startswith("The image could not be generated")
    assert "Traceback" not in body["error"] and "RuntimeError" not in body["error"]
    assert "a bug in the image stage" in server.log()  # the traceback went to the log


def test_refused_prompt_error_names_the_cause(client):
    body = wait_job(client, submit(client, "fail-image"))
    assert body["error"] == "xAI rejected the prompt: test refusal."


@pytest.mark.parametrize("job_id", ["deadbeef", "DEADBEEF", "abc", "../x", "%2e%2e", "..%2F..%2Fgrok3d.db",
                                    "/etc/passwd", "a" * 300, "ex_nope", "ex_../../x"])
def test_status_of_unknown_or_malformed_ids(server, job_id):
    assert_error(raw_get(server, f"/api/status/{job_id}"), 404, "Job not found")


def test_job_log_has_one_line_per_state_change(client, server):
    job_id = submit(client)
    wait_job(client, job_id)
    lines = [line for line in server.log().splitlines() if job_id in line]
    assert any(re.search(rf"job {job_id} stage generating_3d done in \d+\.\d+ s", line) for line in lines), lines
    assert any(f"job {job_id} complete" in line for line in lines)


# -- GET /api/asset -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_job(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        job_id = submit(c)
        assert wait_job(c, job_id)["status"] == "complete"
    return job_id


@pytest.mark.parametrize("asset_type, media_type, disposition, magic", [
    ("image", "image/jpeg", 'inline; filename="{}.jpg"', b"\xff\xd8"),
    ("glb", "model/gltf-binary", 'attachment; filename="{}.glb"', b"glTF"),
    ("usdz", "model/vnd.usdz+zip", 'inline; filename="{}.usdz"', b"PK"),
])
def test_asset_downloads(client, finished_job, asset_type, media_type, disposition, magic):
    r = client.get(f"/api/asset/{finished_job}", params={"asset_type": asset_type})
    assert r.status_code == 200
    assert r.headers["content-type"] == media_type
    assert r.headers["content-disposition"] == disposition.format(finished_job)
    assert r.content.startswith(magic)


def test_formats_without_a_blender_converter_say_so_and_stl_needs_none(client, finished_job):
    """The test stages have no Blender pool: the Blender formats answer 503 with a sentence (never a 500); STL and
    3MF are trimesh's and still work."""
    r = client.get(f"/api/asset/{finished_job}", params={"asset_type": "fbx"})
    assert_error(r, 503, "The FBX could not be made: this server has no Blender converter running.")
    assert r.headers["retry-after"] == "5"
    stl = client.get(f"/api/jobs/{finished_job}/model.stl")
    assert stl.status_code == 200 and stl.headers["content-type"] == "model/stl"


def test_asset_etag_and_range(client, finished_job):
    url = f"/api/asset/{finished_job}?asset_type=glb"
    full = client.get(url)
    etag = full.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    part = client.get(url, headers={"Range": "bytes=4-11"})
    assert part.status_code == 206
    assert part.content == full.content[4:12]
    assert part.headers["content-range"] == f"bytes 4-11/{len(full.content)}"
    assert client.get(url, headers={"Range": "bytes=0-3", "If-Range": '"stale"'}).status_code == 200


@pytest.mark.parametrize("query", ["", "?asset_type=", "?asset_type=ply", "?asset_type=GLB", "?asset_type=input",
                                   "?asset_type=upload"])
def test_asset_type_is_checked_first(client, server, query):
    assert_error(client.get(f"/api/asset/ffffffff{query}"), 400, "Invalid asset type")
    assert_error(raw_get(server, f"/api/asset/../etc{query}"), 400, "Invalid asset type")


@pytest.mark.parametrize("job_id", ["ffffffff", "../x", "%2e%2e", "..%2F..%2Fgrok3d.db", "/etc/passwd", "a" * 300,
                                    "..%2F..%2Fsecret.txt", "ex_missing"])
def test_asset_of_unknown_or_malformed_ids(server, job_id):
    (server.data_dir.parent / "secret.txt").write_text("outside the data folder")
    r = raw_get(server, f"/api/asset/{job_id}?asset_type=image")
    assert_error(r, 404, "Job not found")


def test_asset_not_produced_yet(client):
    job_id = submit(client)
    assert_error(client.get(f"/api/asset/{job_id}", params={"asset_type": "usdz"}), 404, "Asset not found")
    wait_job(client, job_id)


# -- GET /api/examples ----------------------------------------------------------------------------------------

def test_examples_are_complete_and_downloadable(client):
    examples = client.get("/api/examples").json()["examples"]
    assert len(examples) >= 3
    for ex in examples:
        assert ex["job_id"].startswith("ex_") and ex["name"] and ex["description"]
        assert ex["image_url"] == f"/api/asset/{ex['job_id']}?asset_type=image"
        status = client.get(f"/api/status/{ex['job_id']}").json()
        assert (status["status"], status["stage"], status["progress"]) == ("complete", "complete", 100)
        assert CREATED_AT.fullmatch(status["created_at"]) and status["prompt"]
        assert status["model_version"] is None
        for asset_type, magic in (("image", b"\xff\xd8"), ("glb", b"glTF"), ("usdz", b"PK")):
            r = client.get(f"/api/asset/{ex['job_id']}", params={"asset_type": asset_type})
            assert r.status_code == 200 and r.content.startswith(magic), (ex["job_id"], asset_type)


# -- errors everywhere under /api, CORS, health ---------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/api/nope"), ("GET", "/api"), ("POST", "/api/status/deadbeef"), ("GET", "/api/generate"),
    ("DELETE", "/api/asset/deadbeef"), ("PUT", "/api/examples"), ("GET", "/api/status"), ("POST", "/api/x/y/z"),
])
def test_every_error_under_api_has_the_error_shape(client, method, path):
    r = client.request(method, path)
    assert r.status_code in (404, 405)
    assert set(r.json()) == {"error"}
    assert "detail" not in r.text


def test_unexpected_errors_are_500_with_error_body(tmp_path):
    with AppServer(tmp_path, {**STAGES, "TEST_MODEL": "explode"}) as srv:
        r = httpx.post(srv.url + "/api/generate", json={"prompt": "cat"})
        assert_error(r, 500)
        assert "status exploded" not in r.text


@pytest.mark.parametrize("path, method", [("/api/generate", "POST"), ("/api/status/deadbeef", "GET"),
                                          ("/api/asset/deadbeef", "GET"), ("/api/examples", "GET")])
def test_cors_preflight(client, path, method):
    r = client.options(path, headers={"Origin": "http://allowed.example", "Access-Control-Request-Method": method,
                                      "Access-Control-Request-Headers": "content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://allowed.example"
    r = client.options(path, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": method})
    assert r.headers.get("access-control-allow-origin") != "http://evil.example"
    r = client.get("/api/examples", headers={"Origin": "http://also.example"})
    assert r.headers["access-control-allow-origin"] == "http://also.example"


def test_fifty_concurrent_submissions(client, server):
    def one(i: int) -> str:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return submit(c, f"object number {i}")

    with ThreadPoolExecutor(50) as pool:
        ids = list(pool.map(one, range(50)))
    assert len(set(ids)) == 50
    for job_id in ids:
        assert wait_job(client, job_id, timeout_s=120)["status"] == "complete"


def test_promote_a_finished_job_to_an_example(client, server, finished_job):
    env = {**os.environ, "GROK3D_DATA_DIR": str(server.data_dir)}
    done = subprocess.run(["make", "--no-print-directory", "promote", f"JOB={finished_job}", "NAME=Red Box",
                           "DESCRIPTION=A box that a test made"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ex_red-box" in done.stdout
    listed = {ex["job_id"]: ex for ex in client.get("/api/examples").json()["examples"]}
    assert listed["ex_red-box"]["name"] == "Red Box" and len(listed) >= 4  # merged with the shipped ones
    status = client.get("/api/status/ex_red-box").json()
    assert status["status"] == "complete" and status["prompt"] == "A futuristic robot cat with glowing blue eyes"
    for asset_type in ("image", "glb", "usdz"):
        promoted = client.get("/api/asset/ex_red-box", params={"asset_type": asset_type}).content
        assert promoted == client.get(f"/api/asset/{finished_job}", params={"asset_type": asset_type}).content
    failed = submit(client, "fail-image")
    wait_job(client, failed)
    for job_id, why in (("ffffffff", "Job not found"), (failed, "is error, not complete")):
        bad = subprocess.run([sys.executable, "-m", "pipeline.examples", "promote", job_id, "--name", "X",
                              "--description", "Y"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert bad.returncode == 1 and why in bad.stderr and "Traceback" not in bad.stderr


def test_openapi_documents_the_contract_not_fastapis_defaults(client):
    spec = client.get("/api/openapi.json").json()
    assert "HTTPValidationError" not in str(spec)
    generate = spec["paths"]["/api/generate"]["post"]
    body = generate["requestBody"]["content"]
    assert body["application/json"]["schema"]["anyOf"] == [{"required": ["prompt"]}, {"required": ["image"]}]
    assert body["multipart/form-data"]["schema"]["required"] == ["image"]
    assert "callback_url" in body["application/json"]["schema"]["properties"]
    assert set(generate["responses"]) == {"200", "400", "401", "413", "422", "429", "503"}  # 422: Idempotency-Key reused
    assert [p["name"] for p in generate["parameters"]] == ["Idempotency-Key"]
    assert set(spec["paths"]["/api/asset/{job_id}"]["get"]["responses"]) == {"200", "400", "401", "404", "429", "503"}
    assert set(spec["paths"]["/api/jobs/{job_id}/{name}"]["get"]["responses"]) == {"200", "401", "404", "429", "503"}
    # The life cycle's routes (API.md §5-§8), with their errors and no 422.
    assert set(spec["paths"]["/api/jobs"]["get"]["responses"]) == {"200", "400", "401", "429"}
    assert {p["name"] for p in spec["paths"]["/api/jobs"]["get"]["parameters"]} == {"limit", "cursor", "status"}
    assert set(spec["paths"]["/api/jobs/{job_id}/cancel"]["post"]["responses"]) == {"200", "401", "404", "409", "429"}
    assert set(spec["paths"]["/api/jobs/{job_id}"]["delete"]["responses"]) == {"204", "401", "403", "404", "429"}
    events = spec["paths"]["/api/status/{job_id}/events"]["get"]["responses"]
    assert set(events) == {"200", "401", "404", "429"} and "text/event-stream" in events["200"]["content"]
    assert "expires_at" in spec["components"]["schemas"]["JobStatus"]["properties"]


def test_a_callback_url_without_a_webhook_secret_is_503(client):
    r = client.post("/api/generate", json={"prompt": "a teapot", "callback_url": "https://192.0.43.10/x"})
    assert_error(r, 503, "Webhooks are not configured: set GROK3D_WEBHOOK_SECRET")
    assert_error(client.post("/api/generate", json={"prompt": "a teapot", "callback_url": 7}), 400,
                 "callback_url must be an https URL")
