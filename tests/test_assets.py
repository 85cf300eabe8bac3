"""The asset stores' one interface on both backends (a folder; S3 on a real S3 server on loopback, moto), and
API.md's download rules served from object storage: streamed through, or redirected to a presigned URL, the formats
made on request included (the real Blender pool for OBJ and the preview)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import trimesh

from grok3d_cli.client import Api
from pipeline.objectstore import S3AssetStore
from pipeline.storage import Asset, AssetStore
from tests.inprocess import AppServer
from tests.s3 import S3Server
from tests.server import ROOT, wait_job

JOB = "0123abcd"


@pytest.fixture(params=["folder", "s3"])
def assets(request, tmp_path, monkeypatch):
    if request.param == "folder":
        return AssetStore(tmp_path / "jobs")
    s3: S3Server = request.getfixturevalue("s3")
    env = s3.env(s3.new_bucket())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return S3AssetStore.from_url(env["GROK3D_ASSETS_URL"], endpoint=s3.endpoint, scratch=tmp_path / "scratch")


def test_write_read_stat_and_ranges(assets):
    assert not assets.has(JOB, Asset.glb) and assets.stat(JOB, Asset.glb) is None
    assets.write(JOB, Asset.glb, b"glTF and more bytes")
    assert assets.has(JOB, Asset.glb) and assets.read(JOB, Asset.glb) == b"glTF and more bytes"
    info = assets.stat(JOB, Asset.glb)
    assert info.size == 19 and info.etag.startswith('"') and info.modified > 0
    assert assets.read_range(JOB, Asset.glb, 0, 3) == b"glTF"
    assert assets.read_range(JOB, Asset.glb, 14, 18) == b"bytes"
    assets.write(JOB, Asset.glb, b"replaced")
    assert assets.stat(JOB, Asset.glb).etag != info.etag  # a new object, a new tag
    with pytest.raises(ValueError):
        assets.has("../etc", Asset.glb)


def test_producers_work_on_local_files_that_are_published_whole(assets):
    assets.write(JOB, Asset.glb, b"the mesh")
    with assets.local_copy(JOB, Asset.glb) as glb:
        assert glb.read_bytes() == b"the mesh"
    tmp = assets.scratch_path(JOB, Asset.usdz)
    assert tmp.suffix == ".usdz"  # Blender picks the format by the extension
    tmp.write_bytes(b"a usdz")
    assert not assets.has(JOB, Asset.usdz)  # nothing is visible before it is published
    assets.publish_file(JOB, Asset.usdz, tmp)
    assert assets.read(JOB, Asset.usdz) == b"a usdz" and not tmp.exists()
    leftover = assets.scratch_path(JOB, Asset.usdz)
    leftover.write_bytes(b"half")
    assets.remove_temporaries(JOB)
    assert not leftover.exists() and assets.has(JOB, Asset.usdz)
    assets.delete_job(JOB)
    assert not assets.has(JOB, Asset.usdz) and not assets.has(JOB, Asset.glb)


def test_a_presigned_url_serves_the_object_with_its_headers(assets):
    assets.write(JOB, Asset.usdz, b"PK usdz bytes")
    url = assets.presign(JOB, Asset.usdz, 60)
    if isinstance(assets, AssetStore):
        assert url is None  # a folder has nothing to sign
        return
    whole = httpx.get(url)
    assert whole.status_code == 200 and whole.content == b"PK usdz bytes"
    assert whole.headers["content-type"] == "model/vnd.usdz+zip"
    assert whole.headers["content-disposition"] == f'inline; filename="{JOB}.usdz"'
    part = httpx.get(url, headers={"Range": "bytes=0-1"})
    assert part.status_code == 206 and part.content == b"PK"
    assert httpx.get(url, headers={"If-None-Match": whole.headers["etag"]}).status_code == 304


@pytest.fixture(scope="module")
def served(s3, tmp_path_factory):
    """The app with its assets in S3 (streamed through), and one finished job."""
    bucket = s3.new_bucket()
    env = {**s3.env(bucket), "GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key"}
    with AppServer(tmp_path_factory.mktemp("served"), env) as app, httpx.Client(base_url=app.url) as client:
        job_id = client.post("/api/generate", json={"prompt": "a cube"}).json()["job_id"]
        assert wait_job(client, job_id)["status"] == "complete"
        store = S3AssetStore.from_url(env["GROK3D_ASSETS_URL"], endpoint=s3.endpoint,
                                      scratch=tmp_path_factory.mktemp("scratch"))
        yield client, job_id, store
    assert not list((app.data_dir / "jobs").glob("*/*")) if (app.data_dir / "jobs").exists() else True


def test_assets_stream_through_from_object_storage(served):
    client, job_id, store = served
    types = {"image": "image/jpeg", "glb": "model/gltf-binary", "usdz": "model/vnd.usdz+zip"}
    for kind, media_type in types.items():
        r = client.get(f"/api/asset/{job_id}", params={"asset_type": kind})
        assert r.status_code == 200 and r.headers["content-type"] == media_type
        assert r.content == store.read(job_id, Asset(kind))
        assert r.headers["etag"] and r.headers["accept-ranges"] == "bytes" and r.headers["cache-control"] == "no-cache"
        assert r.headers["last-modified"] and r.headers["content-length"] == str(len(r.content))
    r = client.get(f"/api/asset/{job_id}", params={"asset_type": "glb"})
    assert r.headers["content-disposition"] == f'attachment; filename="{job_id}.glb"'


def test_range_etag_and_head_on_object_storage(served):
    client, job_id, store = served
    url = f"/api/asset/{job_id}?asset_type=glb"
    whole = client.get(url)
    data, size, etag = whole.content, len(whole.content), whole.headers["etag"]
    one = client.get(url, headers={"Range": "bytes=4-11"})
    assert one.status_code == 206 and one.content == data[4:12]
    assert one.headers["content-range"] == f"bytes 4-11/{size}"
    tail = client.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == data[-5:]
    several = client.get(url, headers={"Range": "bytes=0-1, 10-12, 11-14"})
    assert several.status_code == 206
    assert several.headers["content-type"].startswith("multipart/byteranges; boundary=")
    assert int(several.headers["content-length"]) == len(several.content)
    boundary = several.headers["content-type"].split("boundary=")[1]
    parts = [p for p in several.content.split(f"--{boundary}".encode()) if p.strip(b"\r\n-")]
    assert [p.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n") for p in parts] == [data[0:2], data[10:15]]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"Range": "bytes=0-1", "If-Range": '"other"'}).status_code == 200
    bad = client.get(url, headers={"Range": f"bytes={size}-"})
    assert bad.status_code == 416 and bad.json() == {"error": "Range not satisfiable"}
    assert bad.headers["content-range"] == f"bytes */{size}"
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(size)
    assert head.headers["etag"] == etag
    store.delete_job(job_id)
    gone = client.get(url)
    assert gone.status_code == 404 and gone.json() == {"error": "Asset not found"}


def test_downloads_redirect_to_presigned_urls_when_configured(s3, tmp_path):
    env = {**s3.env(s3.new_bucket()), "GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key",
           "GROK3D_ASSETS_REDIRECT_S": "120"}
    with AppServer(tmp_path, env) as app, httpx.Client(base_url=app.url) as client:
        job_id = client.post("/api/generate", json={"prompt": "a cube"}).json()["job_id"]
        assert wait_job(client, job_id)["status"] == "complete"
        url = f"/api/asset/{job_id}?asset_type=usdz"
        redirect = client.get(url)
        assert redirect.status_code == 307 and "X-Amz-Signature=" in redirect.headers["location"]
        assert redirect.headers["location"].startswith(s3.endpoint)
        direct = httpx.get(redirect.headers["location"], headers={"Range": "bytes=0-1"})
        assert direct.status_code == 206 and direct.content == b"PK"  # a zip
        assert direct.headers["content-type"] == "model/vnd.usdz+zip"
        head = client.head(url)  # answered by the API: a URL signed for GET does not answer HEAD
        assert head.status_code == 200 and head.headers["content-type"] == "model/vnd.usdz+zip"
        stl = client.get(f"/api/asset/{job_id}?asset_type=stl")  # made on request, then redirected to as well
        assert stl.status_code == 307
        assert httpx.get(stl.headers["location"]).headers["content-type"] == "model/stl"
        assert client.get(f"/api/asset/{job_id}?asset_type=nope").status_code == 400
        # The grok3d command follows the redirect (its key stays behind: httpx drops it off the server's origin).
        with Api(app.url, api_key="a-key") as cli:
            cli.download(job_id, "usdz", tmp_path / "out" / "model.usdz")
            cli.download(job_id, "stl", tmp_path / "out" / "model.stl")
        assert (tmp_path / "out" / "model.usdz").read_bytes() == httpx.get(redirect.headers["location"]).content
        assert (tmp_path / "out" / "model.stl").read_bytes() == httpx.get(stl.headers["location"]).content


def test_formats_made_on_request_are_made_once_into_object_storage(s3, tmp_path):
    """With assets in S3, the formats made on request (STL with trimesh, OBJ and the preview on the real Blender
    pool) are made from a scratch copy of the GLB, uploaded whole, then served with API.md's rules; a second
    request, or two at once, make nothing again."""
    bucket = s3.new_bucket()
    env = {**s3.env(bucket), "GROK3D_STAGES": "tests.stages:real_formats", "XAI_API_KEY": "test-key",
           "GROK3D_BAKE_SIZE": "64", "GROK3D_BLENDER_WORKERS": "1"}
    with AppServer(tmp_path, env) as app, httpx.Client(base_url=app.url, timeout=120) as client:
        job = wait_job(client, client.post("/api/generate", json={"prompt": "an egg"}).json()["job_id"],
                       timeout_s=120)
        assert job["status"] == "complete", job
        job_id = job["job_id"]
        store = S3AssetStore.from_url(env["GROK3D_ASSETS_URL"], endpoint=s3.endpoint, scratch=tmp_path / "mine")
        assert store.has(job_id, Asset.preview)  # made with the USDZ, as with a folder
        for asset_type, media_type, name in (("stl", "model/stl", f"{job_id}.stl"),
                                             ("obj", "application/zip", f"{job_id}.obj.zip")):
            url = f"/api/asset/{job_id}?asset_type={asset_type}"
            first = client.get(url)
            assert first.status_code == 200, first.text
            assert first.headers["content-type"] == media_type
            assert first.headers["content-disposition"] == f'attachment; filename="{name}"'
            assert first.content == store.read(job_id, Asset(asset_type)) and first.headers["etag"]
            part = client.get(url, headers={"Range": "bytes=0-3"})
            assert part.status_code == 206 and part.content == first.content[:4]
            assert part.headers["content-range"] == f"bytes 0-3/{len(first.content)}"
            head = client.head(url)
            assert head.status_code == 200 and head.content == b""
            assert head.headers["etag"] == first.headers["etag"]
            assert head.headers["content-length"] == str(len(first.content))
            assert client.get(url, headers={"If-None-Match": first.headers["etag"]}).status_code == 304
            again = client.get(url)
            assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
        stl = trimesh.load(io.BytesIO(store.read(job_id, Asset.stl)), file_type="stl", force="mesh")
        assert len(stl.faces) == job["mesh"]["faces"]
        with zipfile.ZipFile(io.BytesIO(store.read(job_id, Asset.obj))) as archive:
            assert sorted(archive.namelist()) == ["model.mtl", "model.obj", "model.png"]
        with ThreadPoolExecutor(2) as pool:  # two first requests at once
            answers = list(pool.map(lambda _: client.get(f"/api/jobs/{job_id}/model.3mf"), range(2)))
        assert [a.status_code for a in answers] == [200, 200] and answers[0].content == answers[1].content
        log = app.log()
        for kind in ("stl", "obj", "3mf", "preview"):
            assert len(re.findall(rf"{job_id} {kind} made in", log)) == 1, kind
    assert scratch_leftovers(tmp_path / "scratch") == []  # no scratch copy outlives its use


def scratch_leftovers(scratch: Path) -> list[str]:
    """What is in a scratch folder besides the process folders and their lock files (pipeline/objectstore.py)."""
    return sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*")
                  if not (p.is_dir() and p.name.startswith("proc-")) and p.name != ".lock")


# A process that makes a scratch copy and waits to be killed (the conversion of a replica that is killed).
HOLDER = """
import sys, time
from pathlib import Path
from pipeline.objectstore import S3AssetStore
from pipeline.storage import Asset
store = S3AssetStore.from_url(sys.argv[1], endpoint=sys.argv[2], scratch=Path(sys.argv[3]))
copy = store.scratch_path("0123abcd", Asset.glb)
copy.write_bytes(b"half a mesh")
print(copy, flush=True)
time.sleep(120)
"""


def test_scratch_copies_go_with_their_use_and_a_killed_process_s_with_the_sweep(s3, tmp_path, monkeypatch):
    """S3 mode: a job leaves nothing in scratch once a copy's use ends, and a copy whose process was killed goes
    with the next sweep, never one of a process that is alive, even one that shares the folder."""
    env = s3.env(s3.new_bucket())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    scratch = tmp_path / "scratch"
    store = S3AssetStore.from_url(env["GROK3D_ASSETS_URL"], endpoint=s3.endpoint, scratch=scratch)
    store.write(JOB, Asset.glb, b"the mesh")
    with store.local_copy(JOB, Asset.glb) as glb:
        assert glb.read_bytes() == b"the mesh" and glb.is_relative_to(scratch)
    tmp = store.scratch_path(JOB, Asset.usdz)
    tmp.write_bytes(b"a usdz")
    store.publish_file(JOB, Asset.usdz, tmp)
    assert scratch_leftovers(scratch) == []  # no folder per job, no file

    # Another process on the same scratch folder, killed in the middle of its conversion.
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, env["GROK3D_ASSETS_URL"], s3.endpoint, str(scratch)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **env}, cwd=ROOT)
    try:
        held = Path(holder.stdout.readline().strip())
        assert held.read_bytes() == b"half a mesh"
        assert store.remove_stale_temporaries() == 0 and held.exists()  # alive: its copy is in use
        os.kill(holder.pid, signal.SIGKILL)
    finally:
        holder.kill()
        holder.wait(10)
    # What earlier versions left: a folder per job, empty or with a copy of a killed conversion.
    (scratch / "89abcdef").mkdir()
    stale = scratch / "fedcba98" / ".model.1234abcd.tmp.glb"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    mine = store.scratch_path(JOB, Asset.stl)
    mine.write_bytes(b"in use")
    assert store.remove_stale_temporaries() == 3
    assert not held.parent.exists() and not stale.parent.exists() and not (scratch / "89abcdef").exists()
    assert mine.read_bytes() == b"in use"  # this process's own copy stays while in use
    store.remove_temporaries(JOB)
    assert not mine.exists() and scratch_leftovers(scratch) == []


def test_a_replica_on_object_storage_leaves_no_scratch_behind(s3, tmp_path):
    """A whole job and its deletion leave nothing in the replica's scratch folder, and what a killed replica left
    there goes at start-up."""
    env = {**s3.env(s3.new_bucket()), "GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key"}
    scratch = tmp_path / "scratch"
    dead = scratch / "proc-0123456789ab"  # the folder of a replica killed mid-conversion: its lock is free
    dead.mkdir(parents=True)
    (dead / ".lock").touch()
    (dead / "0123abcd.model.1234abcd.tmp.glb").write_bytes(b"half")
    with AppServer(tmp_path, env) as app, httpx.Client(base_url=app.url) as client:
        deadline = time.monotonic() + 10
        while dead.exists() and time.monotonic() < deadline:  # the sweep at start-up, in the background
            time.sleep(0.05)
        assert not dead.exists()
        job_id = client.post("/api/generate", json={"prompt": "a cube"}).json()["job_id"]
        assert wait_job(client, job_id)["status"] == "complete"
        assert client.get(f"/api/asset/{job_id}", params={"asset_type": "stl"}).status_code == 200
        assert scratch_leftovers(scratch) == []
        assert client.delete(f"/api/jobs/{job_id}").status_code == 204
        assert scratch_leftovers(scratch) == []
