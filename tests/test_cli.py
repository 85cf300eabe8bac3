"""The `grok3d` command, run as a subprocess (`python -m grok3d_cli`, what the console script calls) against the
real `bentoml serve` with the test stages of tests/stages.py behind it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trimesh

from tests.inprocess import AppServer
from tests.server import ROOT, Server, free_port, wait_job

PROGRESS_LINE = re.compile(r"\[[#-]+\]\s+(\d+)%\s+(\S+?):?(\s|$)")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[AppServer]:
    # Each stage lasts over twice the command's poll interval (0.5 s), so its progress bar must show every stage.
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key", "TEST_IMAGE_SLEEP_S": "1.1",
           "TEST_3D_SLEEP_S": "1.1", "TEST_CONVERT_SLEEP_S": "1.1"}
    with AppServer(tmp_path_factory.mktemp("cli"), env) as srv:  # the app in process: the CLI sees the same HTTP
        yield srv


def grok3d(*args: str, server: str | None = None, env: dict[str, str] | None = None,
           timeout_s: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "GROK3D_SERVER"}
    argv = [sys.executable, "-m", "grok3d_cli", *args, *(["--server", server] if server else [])]
    return subprocess.run(argv, cwd=ROOT, env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout_s)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, message: str) -> None:
    """A refusal is a single `grok3d: ...` line on stderr (after any progress lines), never a traceback."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last == f"grok3d: {message}", result.stderr
    assert result.stdout == ""


def test_generate_downloads_image_glb_and_usdz_and_prints_their_paths(server, tmp_path):
    out = tmp_path / "models"
    result = grok3d("generate", "a red teapot", "-o", str(out), server=server.url)
    assert result.returncode == 0, result.stderr

    paths = [Path(line) for line in result.stdout.splitlines()]
    job_id = paths[0].stem
    assert paths == [out / f"{job_id}.jpg", out / f"{job_id}.glb", out / f"{job_id}.usdz"]
    # Each file is the asset the API serves, byte for byte.
    with httpx.Client(base_url=server.url) as client:
        for path, kind in zip(paths, ("image", "glb", "usdz")):
            assert path.read_bytes() == client.get(f"/api/asset/{job_id}", params={"asset_type": kind}).content
    assert trimesh.load(paths[1]).extents == pytest.approx([0.5, 0.3, 0.4])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)  # no temporary files left

    # The bar names the stages, in order, and never goes back.
    steps = [(int(m[1]), m[2]) for m in map(PROGRESS_LINE.search, result.stderr.splitlines()) if m]
    stages = list(dict.fromkeys(stage for _, stage in steps))
    assert stages[-4:] == ["generating_image", "generating_3d", "converting_usdz", "complete"], result.stderr
    values = [v for v, _ in steps]
    assert values == sorted(values) and values[-1] == 100, result.stderr


def test_generate_from_a_picture_with_options_and_formats(server, tmp_path):
    import io

    from PIL import Image

    picture = tmp_path / "teapot.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(picture, "PNG")
    out = tmp_path / "models"
    result = grok3d("generate", "--image", str(picture), "--resolution", "64", "--face-limit", "500",
                    "--size-m", "1.5", "--format", "stl,preview", "--format", "glb", "-o", str(out), server=server.url)
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    job_id = paths[0].name.split(".")[0]
    assert paths == [out / f"{job_id}.stl", out / f"{job_id}.preview.jpg", out / f"{job_id}.glb"]
    assert trimesh.load(paths[2]).extents == pytest.approx([1.5, 0.9, 1.2])
    assert Image.open(io.BytesIO(paths[1].read_bytes())).format == "JPEG"
    status = grok3d("status", job_id, server=server.url).stdout
    for line in ("source:        upload", "resolution:    64", "face_limit:    500", "size_m:        1.5",
                 "mesh:          12 faces, 8 vertices, 1.500 x 0.900 x 1.200 m, watertight"):
        assert line in status, status
    assert "prompt:" not in status  # an upload without a caption

    assert_one_line_error(grok3d("generate", "-o", str(tmp_path), server=server.url), 2,
                          "give a prompt, or a picture with --image FILE")
    assert_one_line_error(grok3d("generate", "x", "--resolution", "5", server=server.url), 1,
                          "resolution must be a whole number from 32 to 512")
    bad = grok3d("generate", "x", "--format", "ply", server=server.url)
    assert bad.returncode == 2 and "unknown format ply" in bad.stderr


def test_generate_exits_1_with_the_jobs_error(server, tmp_path):
    result = grok3d("generate", "fail-image: a teapot", "-o", str(tmp_path), server=server.url)
    job_id = re.search(r"job ([0-9a-f]{8}) queued", result.stderr)[1]
    assert_one_line_error(result, 1, f"job {job_id} failed: xAI rejected the prompt: test refusal.")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("prompt, message", [
    ("", "No prompt provided"),
    ("   ", "No prompt provided"),
    ("x" * 1025, "Prompt too long (max 1024 characters)"),
])
def test_a_refused_prompt_shows_the_servers_words(server, tmp_path, prompt, message):
    assert_one_line_error(grok3d("generate", prompt, "-o", str(tmp_path), server=server.url), 1, message)


def test_status_of_a_job_exits_0_and_prints_it(server):
    with httpx.Client(base_url=server.url) as client:
        job_id = client.post("/api/generate", json={"prompt": "a blue chair"}).json()["job_id"]
        expected = wait_job(client, job_id)
    result = grok3d("status", job_id, server=server.url)
    assert result.returncode == 0, result.stderr
    lines = dict(re.split(r":\s+", line, maxsplit=1) for line in result.stdout.splitlines())
    assert lines["job_id"] == job_id and lines["status"] == expected["status"] == "complete"
    assert lines["progress"] == "100%" and lines["prompt"] == "a blue chair"

    as_json = grok3d("status", job_id, "--json", server=server.url)
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == expected


@pytest.mark.parametrize("job_id", ["0badc0de", "ex_no-such-example", "../examples", "..", "a/b"])
def test_status_of_an_unknown_job_exits_1_with_job_not_found(server, job_id):
    assert_one_line_error(grok3d("status", job_id, server=server.url), 1, "Job not found")


def test_examples_lists_every_example_and_reads_the_server_from_the_environment(server):
    expected = httpx.get(server.url + "/api/examples").json()["examples"]
    result = grok3d("examples", env={"GROK3D_SERVER": server.url})
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert [row.split()[0] for row in rows] == [e["job_id"] for e in expected]
    assert all(e["name"] in row for e, row in zip(expected, rows))
    as_json = grok3d("examples", "--json", server=server.url)
    assert json.loads(as_json.stdout) == {"examples": expected}


@pytest.mark.parametrize("args", [["generate", "a teapot"], ["status", "0badc0de"], ["examples"]])
def test_a_server_that_is_down_gives_one_line_and_exit_3(args, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = grok3d(*args, "-o", str(tmp_path), server=url) if args[0] == "generate" else grok3d(*args, server=url)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"grok3d: cannot reach the grok3d server at {url}")


def test_common_options_go_before_the_sub_command_too(server, tmp_path):
    """Issue 12: `grok3d --server URL generate ...` was refused ("invalid choice")."""
    out = tmp_path / "models"
    result = grok3d("--server", server.url, "generate", "a green teapot", "-o", str(out))
    assert result.returncode == 0, result.stderr
    paths = [Path(line) for line in result.stdout.splitlines()]
    assert [p.suffix for p in paths] == [".jpg", ".glb", ".usdz"] and all(p.is_file() for p in paths)
    job_id = paths[0].stem
    status = grok3d(f"--server={server.url}", "status", job_id)
    assert status.returncode == 0 and f"job_id:        {job_id}" in status.stdout, status.stderr
    examples = grok3d("--server", server.url, "examples", "--json")
    assert examples.returncode == 0 and json.loads(examples.stdout)["examples"], examples.stderr


def test_the_option_after_the_sub_command_wins(server):
    dead = f"http://127.0.0.1:{free_port()}"
    assert grok3d("--server", dead, "examples", "--server", server.url).returncode == 0
    result = grok3d("--server", server.url, "examples", "--server", dead)
    assert result.returncode == 3 and dead in result.stderr


def test_the_default_server_is_localhost_8000():
    result = grok3d("examples")
    # Whether or not something listens there, the command must have tried localhost:8000.
    assert "Traceback" not in result.stderr
    if result.returncode != 0:
        assert "http://localhost:8000" in result.stderr


def test_giving_up_waiting_leaves_the_job_running_and_says_how_to_follow_it(server, tmp_path):
    result = grok3d("generate", "a slow teapot", "-o", str(tmp_path), "--timeout", "0", server=server.url)
    job_id = re.search(r"job ([0-9a-f]{8}) queued", result.stderr)[1]
    assert result.returncode == 1
    assert f"it goes on in the server: grok3d status {job_id}" in result.stderr.splitlines()[-1]
    with httpx.Client(base_url=server.url) as client:
        assert wait_job(client, job_id)["status"] == "complete"


def test_an_output_folder_that_cannot_be_made_is_one_line(server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = grok3d("generate", "a teapot", "-o", str(blocker / "models"), server=server.url)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("grok3d: ") and str(blocker) in result.stderr


def test_jobs_cancel_and_delete(server, tmp_path):
    with httpx.Client(base_url=server.url) as client:
        done = client.post("/api/generate", json={"prompt": "a listed chair"}).json()["job_id"]
        wait_job(client, done)
        running = client.post("/api/generate", json={"prompt": "slow-3d chair"}).json()["job_id"]
    listed = grok3d("jobs", "--limit", "100", server=server.url)
    assert listed.returncode == 0, listed.stderr
    rows = listed.stdout.splitlines()
    assert rows[0].split()[0] == running and any(r.startswith(done) and "a listed chair" in r for r in rows)
    as_json = json.loads(grok3d("jobs", "--json", "--limit", "1", server=server.url).stdout)
    assert len(as_json["jobs"]) == 1 and as_json["next_cursor"]
    nxt = grok3d("jobs", "--limit", "1", "--cursor", as_json["next_cursor"], server=server.url)
    assert nxt.returncode == 0 and nxt.stdout.split()[0] != running

    cancelled = grok3d("cancel", running, server=server.url)
    assert cancelled.returncode == 0 and cancelled.stdout.strip() == f"job {running} cancelled", cancelled.stderr
    assert_one_line_error(grok3d("cancel", done, server=server.url), 1, "The job has already finished")
    deleted = grok3d("delete", done, server=server.url)
    assert deleted.returncode == 0 and deleted.stdout.strip() == f"job {done} deleted"
    assert_one_line_error(grok3d("status", done, server=server.url), 1, "Job not found")
    assert_one_line_error(grok3d("delete", "ex_mars-habitat", server=server.url), 1, "Examples cannot be deleted")


def test_generate_follows_server_sent_events_and_polls_when_they_break():
    """follow_job on a stand-in for the API: the stream carries the job to its end with no poll; a stream that
    breaks is resumed from its last id, and after STREAM_RETRIES breaks the job is polled."""
    from grok3d_cli import main
    from grok3d_cli.client import Event, StreamBroken
    from grok3d_cli.progress import ProgressBar

    def state(stage, progress, status="processing"):
        return {"job_id": "0badc0de", "status": status, "stage": stage, "progress": progress}

    class Streaming:
        def __init__(self, breaks: int) -> None:
            self.breaks, self.resumed_from, self.polls = breaks, [], 0

        def events(self, job_id, last_event_id=None):
            self.resumed_from.append(last_event_id)
            yield Event("status", "1", state("generating_image", 10))
            if self.breaks:
                self.breaks -= 1
                raise StreamBroken("connection reset")
            yield Event("status", "2", state("complete", 100, "complete"))
            yield Event("end", "2", state("complete", 100, "complete"))

        def status(self, job_id):
            self.polls += 1
            return state("complete", 100, "complete")

    import io
    quiet = ProgressBar(io.StringIO())
    api = Streaming(breaks=1)
    assert main.follow_job(api, "0badc0de", 60, quiet)["status"] == "complete"
    assert api.resumed_from == [None, "1"] and api.polls == 0
    api = Streaming(breaks=99)
    assert main.follow_job(api, "0badc0de", 60, quiet)["status"] == "complete"
    assert len(api.resumed_from) == 1 + main.STREAM_RETRIES and api.polls == 1
