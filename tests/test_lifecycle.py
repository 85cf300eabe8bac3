"""The job life cycle of API.md §5-§9 against the real `bentoml serve`: list, cancel, delete, retention,
idempotent submission, Server-Sent Events and signed webhooks (issue 15). Test stages (tests/stages.py) stand in for
xAI and TripoSR; the cancel during a conversion runs the real Blender pool. The callback checks and the retention
sweep, which are the app's own, run against it in process (tests/inprocess.py)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from standardwebhooks import Webhook

from tests.inprocess import AppServer
from tests.server import Server, wait_job
from tests.webhook_receiver import SECRET, Receiver

STAGES = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key"}
CANCELLED = "Cancelled by the client"
LEASE_S = 1.5
WEBHOOKS = {"GROK3D_WEBHOOK_SECRET": SECRET, "GROK3D_WEBHOOK_ALLOW_PRIVATE": "1", "GROK3D_WEBHOOK_BACKOFF_S": "0.3"}


@pytest.fixture(scope="module")
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Short stages, a short lease (the lease loop, which also picks up cancels asked elsewhere, runs every 0.5 s),
    # a 5 s traffic timeout that a longer event stream must outlive, and a heartbeat every second.
    env = {**STAGES, **WEBHOOKS, "TEST_IMAGE_SLEEP_S": "0.4", "TEST_3D_SLEEP_S": "0.4", "TEST_CONVERT_SLEEP_S": "0.4",
           "GROK3D_LEASE_S": str(LEASE_S), "GROK3D_REQUEST_TIMEOUT_S": "5", "GROK3D_SSE_HEARTBEAT_S": "1"}
    with Server(tmp_path_factory.mktemp("lifecycle"), env) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def submit(client: httpx.Client, prompt: str = "a red teapot", **extra) -> str:
    r = client.post("/api/generate", json={"prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def assert_error(r: httpx.Response, status: int, message: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}, r.text
    if message is not None:
        assert r.json()["error"] == message


def wait_stage(client: httpx.Client, job_id: str, stage: str, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/api/status/{job_id}").json()
        if body["stage"] == stage:
            return body
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached {stage}: {body}")


def files_of(data_dir: Path, job_id: str) -> list[Path]:
    """Every path under the data folder that belongs to the job (by its id in the path)."""
    return [p for p in data_dir.rglob("*") if job_id in str(p.relative_to(data_dir))]


def rows_of(data_dir: Path, job_id: str) -> dict[str, int]:
    with sqlite3.connect(data_dir / "grok3d.db") as db:
        return {table: db.execute(f"SELECT count(*) FROM {table} WHERE job_id = ?", (job_id,)).fetchone()[0]
                for table in ("jobs", "job_events", "webhook_deliveries", "idempotency_keys")}


def read_events(response: httpx.Response, stop_after: int | None = None) -> tuple[list[dict], list[str]]:
    """Parse a text/event-stream (WHATWG: fields up to a blank line; `:` lines are comments) into events, and the
    comments seen."""
    events, comments, event = [], [], {}
    for line in response.iter_lines():
        if line.startswith(":"):
            comments.append(line)
        elif line == "":
            if event:
                events.append(event)
                event = {}
                if stop_after is not None and len(events) >= stop_after:
                    break
        else:
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")
    return events, comments


# -- list -----------------------------------------------------------------------------------------------------

def test_list_is_newest_first_with_a_cursor_that_inserts_do_not_shift(client):
    mine = [submit(client, f"listed {i}") for i in range(5)]
    first = client.get("/api/jobs", params={"limit": 2}).json()
    assert [j["job_id"] for j in first["jobs"]] == mine[::-1][:2]
    assert set(first["jobs"][0]) >= {"job_id", "status", "stage", "progress", "created_at", "prompt", "expires_at"}
    newer = [submit(client, f"inserted {i}") for i in range(3)]  # while the client pages
    seen = [j["job_id"] for j in first["jobs"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/api/jobs", params={"limit": 2, "cursor": cursor}).json()
        seen += [j["job_id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
    assert not set(newer) & set(seen)
    assert len(seen) == len(set(seen))
    assert [j for j in seen if j in mine] == mine[::-1]
    for job_id in mine + newer:
        wait_job(client, job_id)
    done = client.get("/api/jobs", params={"status": "complete", "limit": 100}).json()["jobs"]
    assert done and all(j["status"] == "complete" for j in done)


@pytest.mark.parametrize("params, message", [
    ({"limit": "0"}, "limit must be a whole number from 1 to 100"),
    ({"limit": "101"}, "limit must be a whole number from 1 to 100"),
    ({"limit": "x"}, "limit must be a whole number from 1 to 100"),
    ({"status": "cancelled"}, "status must be one of queued, processing, complete, error"),
    ({"cursor": "not-a-cursor"}, "Invalid cursor"),
])
def test_list_refuses_bad_parameters(client, params, message):
    assert_error(client.get("/api/jobs", params=params), 400, message)


# -- cancel ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, stage", [("slow-image teapot", "generating_image"),
                                           ("slow-3d teapot", "generating_3d")])
def test_cancel_stops_a_running_job_at_once_and_keeps_its_assets(client, prompt, stage):
    job_id = submit(client, prompt)
    wait_stage(client, job_id, stage)
    began = time.monotonic()
    r = client.post(f"/api/jobs/{job_id}/cancel")
    assert r.status_code == 200, r.text
    assert time.monotonic() - began < 2.0  # the stage's minute-long wait was abandoned
    body = r.json()
    assert (body["status"], body["stage"], body["progress"], body["error"]) == ("error", "error", 0, CANCELLED)
    assert client.get(f"/api/status/{job_id}").json() == body
    image = client.get(f"/api/asset/{job_id}", params={"asset_type": "image"})
    assert image.status_code == (200 if stage == "generating_3d" else 404)  # what was made stays
    assert_error(client.post(f"/api/jobs/{job_id}/cancel"), 409, "The job has already finished")


def test_a_cancel_recorded_by_another_replica_is_picked_up_by_the_owner(client, server):
    """Another replica records the cancel in the store; this one's lease loop (every lease/3) stops the job."""
    job_id = submit(client, "slow-3d teapot")
    wait_stage(client, job_id, "generating_3d")
    with sqlite3.connect(server.data_dir / "grok3d.db") as db:
        db.execute("UPDATE jobs SET cancel_requested = 1 WHERE job_id = ?", (job_id,))
    body = wait_job(client, job_id, timeout_s=LEASE_S + 3)
    assert (body["status"], body["error"]) == ("error", CANCELLED)


def test_cancel_of_finished_unknown_and_example_jobs(client):
    done = submit(client)
    assert wait_job(client, done)["status"] == "complete"
    assert_error(client.post(f"/api/jobs/{done}/cancel"), 409, "The job has already finished")
    assert_error(client.post("/api/jobs/0badc0de/cancel"), 404, "Job not found")
    assert_error(client.post("/api/jobs/ex_mars-habitat/cancel"), 409, "The job has already finished")


# -- delete ---------------------------------------------------------------------------------------------------

def test_delete_removes_the_row_and_every_file(client, server, receiver):
    job_id = submit(client, callback_url=receiver.url("/deleted"))
    assert wait_job(client, job_id)["status"] == "complete"
    (server.data_dir / "jobs" / job_id / "preview.extra").write_bytes(b"another stage's file")  # whatever is there
    assert files_of(server.data_dir, job_id)
    r = client.delete(f"/api/jobs/{job_id}")
    assert r.status_code == 204 and r.content == b""
    assert_error(client.get(f"/api/status/{job_id}"), 404, "Job not found")
    assert_error(client.get(f"/api/asset/{job_id}", params={"asset_type": "glb"}), 404, "Job not found")
    assert files_of(server.data_dir, job_id) == []
    assert rows_of(server.data_dir, job_id) == {"jobs": 0, "job_events": 0, "webhook_deliveries": 0,
                                                "idempotency_keys": 0}
    assert_error(client.delete(f"/api/jobs/{job_id}"), 404, "Job not found")
    assert job_id not in [j["job_id"] for j in client.get("/api/jobs", params={"limit": 100}).json()["jobs"]]


def test_delete_of_a_running_job_cancels_it_first(client, server):
    job_id = submit(client, "slow-3d teapot")
    wait_stage(client, job_id, "generating_3d")
    assert client.delete(f"/api/jobs/{job_id}").status_code == 204
    assert_error(client.get(f"/api/status/{job_id}"), 404, "Job not found")
    assert files_of(server.data_dir, job_id) == []
    assert rows_of(server.data_dir, job_id)["jobs"] == 0


def test_examples_cannot_be_deleted(client):
    assert_error(client.delete("/api/jobs/ex_mars-habitat"), 403, "Examples cannot be deleted")
    assert client.get("/api/status/ex_mars-habitat").status_code == 200
    assert_error(client.delete("/api/jobs/0badc0de"), 404, "Job not found")


# -- idempotent submit ----------------------------------------------------------------------------------------

def test_the_same_idempotency_key_sent_concurrently_makes_one_job(client, server):
    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            return c.post("/api/generate", json={"prompt": "an idempotent teapot"},
                          headers={"Idempotency-Key": "order-7f3a"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert len({r.json()["job_id"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 7
    listed = [j for j in client.get("/api/jobs", params={"limit": 100}).json()["jobs"]
              if j["prompt"] == "an idempotent teapot"]
    assert len(listed) == 1
    job_id = answers[0].json()["job_id"]
    # The same body, differently spelled, is the same request; another body is refused.
    again = client.post("/api/generate", content=b'{ "prompt" : "  an idempotent teapot "}',
                        headers={"Idempotency-Key": "order-7f3a", "content-type": "application/json"})
    assert again.json()["job_id"] == job_id
    other = client.post("/api/generate", json={"prompt": "a different teapot"},
                        headers={"Idempotency-Key": "order-7f3a"})
    assert_error(other, 422)
    assert "already used with another request body" in other.json()["error"]
    assert client.post("/api/generate", json={"prompt": "an idempotent teapot"}).json()["job_id"] != job_id


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"])
def test_a_malformed_idempotency_key_is_refused(client, key):
    r = client.post("/api/generate", json={"prompt": "a teapot"}, headers={"Idempotency-Key": key.encode()})
    assert_error(r, 400, "Idempotency-Key must be 1 to 255 printable ASCII characters")


# -- live progress --------------------------------------------------------------------------------------------

ORDER = ["initializing", "generating_image", "generating_3d", "converting_usdz", "complete"]


def test_events_deliver_every_state_change_in_order_then_end(client):
    job_id = submit(client)
    with client.stream("GET", f"/api/status/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, _ = read_events(r)
    ids = [int(e["id"]) for e in events]
    assert ids[:-1] == list(range(1, len(ids)))  # every change, none skipped, in order
    assert [e["event"] for e in events] == ["status"] * (len(events) - 1) + ["end"]
    states = [json.loads(e["data"]) for e in events]
    stages = list(dict.fromkeys(s["stage"] for s in states))
    assert stages == ORDER
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress)
    assert states[-1] == states[-2] == client.get(f"/api/status/{job_id}").json()


def test_events_resume_after_last_event_id(client):
    job_id = submit(client)
    with client.stream("GET", f"/api/status/{job_id}/events") as r:
        first, _ = read_events(r, stop_after=3)
    last = first[-1]["id"]
    with client.stream("GET", f"/api/status/{job_id}/events", headers={"Last-Event-ID": last}) as r:
        rest, _ = read_events(r)
    assert int(rest[0]["id"]) == int(last) + 1
    assert json.loads(rest[-1]["data"])["status"] == "complete"
    with client.stream("GET", f"/api/status/{job_id}/events", headers={"Last-Event-ID": rest[-1]["id"]}) as r:
        after_end, _ = read_events(r)
    assert [e["event"] for e in after_end] == ["end"]


def test_an_event_stream_outlives_the_traffic_timeout_with_heartbeats(client):
    """GROK3D_REQUEST_TIMEOUT_S is 5 s here: BentoML's timeout (bentoml_fixes.FirstByteTimeout) stops at the
    first byte, and no middleware buffers the stream: events arrive as they happen, heartbeats in between."""
    job_id = submit(client, "slow-3d teapot")
    began = time.monotonic()
    arrivals = []
    with client.stream("GET", f"/api/status/{job_id}/events") as r:
        comments = 0
        for line in r.iter_lines():
            comments += line.startswith(": heartbeat")
            if line.startswith("data:"):
                arrivals.append((time.monotonic() - began, json.loads(line[5:])["stage"]))
            if arrivals and arrivals[-1][1] == "generating_3d" and time.monotonic() - began > 6.5:
                client.post(f"/api/jobs/{job_id}/cancel")
            if line.startswith("event: end"):
                break
    assert time.monotonic() - began > 6.5
    assert comments >= 4
    assert arrivals[0][0] < 1.0  # the first event came at once, not when the stream ended
    assert arrivals[-1][1] == "error"


def test_events_of_examples_unknown_jobs_and_head(client):
    with client.stream("GET", "/api/status/ex_mars-habitat/events") as r:
        events, _ = read_events(r)
    assert [e["event"] for e in events] == ["status", "end"]
    assert json.loads(events[0]["data"])["status"] == "complete"
    assert_error(client.get("/api/status/0badc0de/events"), 404, "Job not found")
    head = client.head(f"/api/status/{submit(client)}/events", timeout=5)
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")


# -- webhooks -------------------------------------------------------------------------------------------------

def test_a_webhook_is_retried_until_delivered_and_its_signature_verifies(client, receiver):
    receiver.answers["/flaky"] = [500, 500]
    job_id = submit(client, callback_url=receiver.url("/flaky"))
    assert client.get(f"/api/status/{job_id}").json()["callback_url"] == receiver.url("/flaky")
    deliveries = receiver.wait_for("/flaky", 3)
    assert [d.answered for d in deliveries] == [500, 500, 200]
    assert len({d.headers["webhook-id"] for d in deliveries}) == 1  # one delivery, retried
    payload = Webhook(SECRET).verify(deliveries[-1].body, deliveries[-1].headers)
    assert payload["job_id"] == job_id and payload["status"] == "complete"
    assert deliveries[-1].headers["webhook-signature"].startswith("v1,")
    deadline = time.monotonic() + 10
    while client.get(f"/api/status/{job_id}").json()["webhook_status"] != "delivered":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    with pytest.raises(Exception):  # signed with another secret: refused
        Webhook("whsec_" + "A" * 32).verify(deliveries[-1].body, deliveries[-1].headers)


def test_failed_and_cancelled_jobs_send_their_webhook_too(client, receiver):
    failed = submit(client, "fail-image teapot", callback_url=receiver.url("/failed"))
    cancelled = submit(client, "slow-image teapot", callback_url=receiver.url("/cancelled"))
    wait_stage(client, cancelled, "generating_image")
    client.post(f"/api/jobs/{cancelled}/cancel")
    [one] = receiver.wait_for("/failed", 1)
    [two] = receiver.wait_for("/cancelled", 1)
    assert Webhook(SECRET).verify(one.body, one.headers)["error"] == "xAI rejected the prompt: test refusal."
    assert Webhook(SECRET).verify(two.body, two.headers)["error"] == CANCELLED
    assert wait_job(client, failed)["status"] == "error"


# -- a server without GROK3D_WEBHOOK_ALLOW_PRIVATE, with a short retention ---------------------------------------

RETENTION_S = 4.0


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    env = {**STAGES, "GROK3D_WEBHOOK_SECRET": SECRET, "GROK3D_RETENTION_DAYS": str(RETENTION_S / 86400),
           "GROK3D_SWEEP_INTERVAL_S": "0.5", "TEST_IMAGE_SLEEP_S": "0.2", "TEST_3D_SLEEP_S": "0.2",
           "TEST_CONVERT_SLEEP_S": "0.2"}
    # Callback checks and the retention sweep are the app's own: served in process (tests/inprocess.py).
    with AppServer(tmp_path_factory.mktemp("strict"), env) as srv:
        yield srv


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:9/hook", "callback_url must be an https URL"),
    ("ftp://example.com/hook", "callback_url must be an https URL"),
    ("hook", "callback_url must be an https URL"),
    ("https://127.0.0.1/hook", "callback_url must not point to a private, loopback, link-local or reserved address"),
    ("https://localhost/hook", "callback_url must not point to a private, loopback, link-local or reserved address"),
    ("https://10.1.2.3/hook", "callback_url must not point to a private, loopback, link-local or reserved address"),
    ("https://169.254.169.254/latest", "callback_url must not point to a private, loopback, link-local or reserved "
                                       "address"),
    ("https://[::1]/hook", "callback_url must not point to a private, loopback, link-local or reserved address"),
    ("https://[::ffff:127.0.0.1]/hook", "callback_url must not point to a private, loopback, link-local or "
                                        "reserved address"),
    ("https://user:pw@example.com/hook", "callback_url must not contain a user name or password"),
    ("https://no-such-host.invalid/hook", "callback_url's host could not be resolved"),
])
def test_callback_urls_are_checked_against_request_forgery(strict, url, message):
    r = httpx.post(strict.url + "/api/generate", json={"prompt": "a teapot", "callback_url": url})
    assert_error(r, 400, message)


def test_a_public_https_callback_is_accepted(strict):
    # A job that outlives the module (its image stage takes a minute; the server stops first and leaves it to be
    # resumed): it never ends, so nothing is ever sent to that outside address. Tests reach nothing off this machine.
    r = httpx.post(strict.url + "/api/generate",
                   json={"prompt": "a slow-image teapot", "callback_url": "https://192.0.43.10/x"})
    assert r.status_code == 200, r.text


def test_a_server_started_meanwhile_does_not_inherit_the_in_process_servers_settings(strict, tmp_path):
    """The in-process server's settings are in os.environ while it runs; a `bentoml serve` started then has its own
    (it once inherited a 4 s retention, and a sweep removed its job under a polling test)."""
    assert os.environ["GROK3D_RETENTION_DAYS"] == str(RETENTION_S / 86400)
    env = Server(tmp_path).env
    assert "GROK3D_RETENTION_DAYS" not in env and "GROK3D_SWEEP_INTERVAL_S" not in env
    assert env["GROK3D_DATA_DIR"] == str(tmp_path) and env["PATH"] == os.environ["PATH"]


def test_retention_removes_an_old_job_and_keeps_a_young_one(strict):
    with httpx.Client(base_url=strict.url, timeout=30) as c:
        old = submit(c, "an old teapot")
        status = wait_job(c, old)
        created = time.mktime(time.strptime(status["created_at"][:19], "%Y-%m-%dT%H:%M:%S"))
        expires = time.mktime(time.strptime(status["expires_at"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert expires - created == pytest.approx(RETENTION_S, abs=1)
        time.sleep(RETENTION_S - 1.5)
        young = submit(c, "a young teapot")
        assert wait_job(c, young)["status"] == "complete"
        # A sweep marks the expired job (its status is 404 from then on), then removes its files, then its rows.
        deadline = time.monotonic() + 5
        while c.get(f"/api/status/{old}").status_code != 404 or files_of(strict.data_dir, old) \
                or any(rows_of(strict.data_dir, old).values()):
            assert time.monotonic() < deadline, "the old job outlived its retention"
            time.sleep(0.1)
        assert c.get(f"/api/status/{young}").status_code == 200
        assert files_of(strict.data_dir, young) and rows_of(strict.data_dir, young)["job_events"] > 0


def test_the_sweep_removes_folders_that_have_no_row(strict):
    orphan = strict.data_dir / "jobs" / "0ddba11a"
    orphan.mkdir(parents=True)
    (orphan / "model.glb").write_bytes(b"left by a crash")
    deadline = time.monotonic() + 5
    while orphan.exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)


# -- kill -9 between a failed delivery and its retry --------------------------------------------------------------

def test_a_delivery_survives_kill_9_and_so_does_an_idempotency_key(tmp_path):
    env = {**STAGES, **WEBHOOKS, "GROK3D_WEBHOOK_BACKOFF_S": "4", "GROK3D_LEASE_S": "2"}
    with Receiver() as receiver:
        receiver.answers["/after-crash"] = [503]
        srv = Server(tmp_path, env).start()
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                r = c.post("/api/generate", json={"prompt": "a teapot", "callback_url": receiver.url("/after-crash")},
                           headers={"Idempotency-Key": "crash-1"})
                job_id = r.json()["job_id"]
                [failed] = receiver.wait_for("/after-crash", 1)
                deadline = time.monotonic() + 10
                while c.get(f"/api/status/{job_id}").json()["webhook_status"] != "retrying":
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            srv.kill9()  # the retry was due seconds later
            srv.start()
            [_, delivered] = receiver.wait_for("/after-crash", 2, timeout_s=60)
            assert delivered.headers["webhook-id"] == failed.headers["webhook-id"]
            assert Webhook(SECRET).verify(delivered.body, delivered.headers)["job_id"] == job_id
            again = httpx.post(srv.url + "/api/generate", json={"prompt": "a teapot",
                                                                 "callback_url": receiver.url("/after-crash")},
                               headers={"Idempotency-Key": "crash-1"})
            assert again.json()["job_id"] == job_id and again.headers["idempotent-replayed"] == "true"
        finally:
            srv.stop()


# -- cancel during the Blender conversion ---------------------------------------------------------------------------

def blender_workers(server: Server) -> set[int]:
    found = set()
    for p in server.processes():
        try:
            if "converters.blender.worker" in p.cmdline():
                found.add(p.pid)
        except psutil.NoSuchProcess:
            pass
    return found


def test_cancel_during_conversion_kills_the_blender_worker_and_the_next_job_gets_one(tmp_path):
    """One warm Blender worker and a 4096-pixel bake of a 100k-face mesh (~12 s on 2 cores): the cancel answers at
    once, the worker is replaced, and the next job (a box, baked at 256 pixels) converts without waiting for the
    abandoned bake."""
    env = {**STAGES, "GROK3D_STAGES": "tests.stages:real_convert", "GROK3D_BLENDER_WORKERS": "1",
           "GROK3D_BAKE_SIZE": "256", "TEST_BIG_MESH_BAKE_SIZE": "4096"}
    with Server(tmp_path, env) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        [worker] = blender_workers(srv)
        slow = submit(c, "big-mesh teapot")
        wait_stage(c, slow, "converting_usdz")
        time.sleep(1.0)  # into the bake
        began = time.monotonic()
        body = c.post(f"/api/jobs/{slow}/cancel").json()
        assert time.monotonic() - began < 3.0
        assert (body["status"], body["error"]) == ("error", CANCELLED)
        assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == psutil.STATUS_ZOMBIE
        assert c.get(f"/api/asset/{slow}", params={"asset_type": "glb"}).status_code == 200  # made before: kept
        assert [p.name for p in (tmp_path / "jobs" / slow).iterdir() if p.name.startswith(".")] == []
        nxt = submit(c, "a small teapot")
        began = time.monotonic()
        assert wait_job(c, nxt, timeout_s=60)["status"] == "complete"
        assert blender_workers(srv) - {worker}
        assert "abandoned by its caller" in srv.log()


def test_a_stream_closes_when_its_job_is_deleted(client):
    job_id = submit(client, "slow-3d teapot")
    wait_stage(client, job_id, "generating_3d")
    with client.stream("GET", f"/api/status/{job_id}/events") as r:
        lines = r.iter_lines()
        while next(lines) != "":  # the first event
            pass
        began = time.monotonic()
        assert client.delete(f"/api/jobs/{job_id}").status_code == 204
        for _ in lines:  # until the server closes the stream
            pass
    assert time.monotonic() - began < 8
    assert_error(client.get(f"/api/status/{job_id}/events"), 404, "Job not found")
