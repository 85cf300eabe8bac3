"""The whole pipeline as `make dev` runs it: the fake xAI server, the real image stage (xAI client, matting),
a tiny TripoSR with seeded random weights behind the real TripoSR service, and the real Blender pool."""

from __future__ import annotations

import io
import re
import zipfile

import httpx
from PIL import Image

from tests.server import Server, free_port, wait_job

ORDER = ["initializing", "generating_image", "generating_3d", "converting_usdz", "complete"]


def test_make_dev_runs_a_job_through_every_stage(tmp_path):
    xai_port = free_port()
    srv = Server(tmp_path, {"DEV_XAI_PORT": str(xai_port), "TRIPOSR_MC_RESOLUTION": "64",
                            "GROK3D_BLENDER_WORKERS": "1", "GROK3D_BAKE_SIZE": "256"},
                 ready="/readyz", log_name="make-dev.log")
    srv.command = ["make", "--no-print-directory", "dev", f"PORT={srv.port}"]
    with srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        prompt = "a small {curly} teapot"
        job_id = c.post("/api/generate", json={"prompt": prompt}).json()["job_id"]
        seen: list[str] = []
        body = wait_job(c, job_id, timeout_s=240, interval_s=0.2, stages=seen)
        assert body["status"] == "complete", (body, srv.log()[-3000:])
        ranks = [ORDER.index(s) for s in seen]
        assert ranks == sorted(ranks)
        assert body["prompt"] == prompt  # the user's words, not the wrapped prompt sent to xAI
        assert re.fullmatch(r"folder:dev-tiny@[0-9a-f]{12}", body["model_version"])

        sent = httpx.get(f"http://127.0.0.1:{xai_port}/_fake/requests").json()["requests"]
        [call] = [r for r in sent if r["path"] == "/v1/images/generations"]
        assert prompt in call["body"]["prompt"] and call["body"]["prompt"] != prompt

        image = c.get(f"/api/asset/{job_id}", params={"asset_type": "image"}).content
        assert Image.open(io.BytesIO(image)).format == "JPEG"
        matted = Image.open(tmp_path / "jobs" / job_id / "input.png")
        assert matted.size == (512, 512) and matted.getpixel((2, 2)) == (128, 128, 128)  # framed on 0.5 gray
        glb = c.get(f"/api/asset/{job_id}", params={"asset_type": "glb"}).content
        assert glb[:4] == b"glTF"
        usdz = c.get(f"/api/asset/{job_id}", params={"asset_type": "usdz"}).content
        names = zipfile.ZipFile(io.BytesIO(usdz)).namelist()
        assert names[0].endswith(".usdc") and any(n.endswith(".png") for n in names)  # the baked texture
