"""API keys against the real `bentoml serve` in `keys` mode (GROK3D_AUTH=keys), with the test stages of
tests/stages.py: docs/API.md's Authentication section row by row, the limits, and the `grok3d keys` command."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pipeline.db import sqlite_url
from pipeline.jobs import JobStore
from pipeline.keys import KEY_RE, KeyStore
from tests.inprocess import AppServer
from tests.server import ROOT, Server, wait_job

STAGES = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key", "TEST_IMAGE_SLEEP_S": "0.4",
          "TEST_3D_SLEEP_S": "0.4", "TEST_CONVERT_SLEEP_S": "0.4"}
RATE_HEADERS = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
ASSETS = ("image", "glb", "usdz")
KEYS: list[str] = []  # every key this module made: none may reach the database in clear or the log


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {**STAGES, "GROK3D_AUTH": "keys", "GROK3D_CORS_ORIGINS": "http://allowed.example"}
    with Server(tmp_path_factory.mktemp("keys"), env) as srv:
        yield srv


def grok3d(server: Server, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("GROK3D_SERVER", "GROK3D_API_KEY")}
    return subprocess.run([sys.executable, "-m", "grok3d_cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**base, "GROK3D_DATA_DIR": str(server.data_dir), **(env or {})}, timeout=120)


def make_key(server: Server, name: str, **limits: int) -> str:
    """A key made on the server's store from this process: another writer on the store, as a replica would be."""
    store = JobStore(sqlite_url(server.data_dir / "grok3d.db"))
    try:
        _, key = KeyStore(store).create(name, **limits)
    finally:
        store.close()
    KEYS.append(key)
    return key


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def own_job(server: Server, key: str, prompt: str = "a keyed teapot") -> str:
    r = httpx.post(server.url + "/api/generate", json={"prompt": prompt}, headers=bearer(key), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["job_id"]


def assert_error(r: httpx.Response, status: int, message: str) -> None:
    assert r.status_code == status, r.text
    assert r.json() == {"error": message}


def assert_rate_headers(r: httpx.Response, limit: int) -> None:
    assert all(name in r.headers for name in RATE_HEADERS), dict(r.headers)
    assert int(r.headers["ratelimit-limit"]) == limit
    assert 0 <= int(r.headers["ratelimit-remaining"]) <= limit
    assert int(r.headers["ratelimit-reset"]) >= 1


JOB_ROUTES = [("POST", "/api/generate"), ("GET", "/api/status/deadbeef"),
              ("GET", "/api/asset/deadbeef?asset_type=glb"), ("HEAD", "/api/status/deadbeef")]


# -- the `grok3d keys` command --------------------------------------------------------------------------------

def test_keys_create_prints_the_key_alone_on_its_last_line_then_list_and_revoke(server):
    made = grok3d(server, "keys", "create", "--name", "ops-cli", "--rpm", "20", "--max-in-flight", "2",
                  "--jobs-per-day", "9")
    assert made.returncode == 0, made.stderr
    key = made.stdout.splitlines()[-1]
    KEYS.append(key)
    assert made.stdout == key + "\n" and KEY_RE.fullmatch(key)
    assert "20 requests per minute, 2 jobs in flight, 9 jobs per day" in made.stderr
    assert httpx.get(server.url + "/api/status/deadbeef", headers=bearer(key)).json() == {"error": "Job not found"}

    listed = grok3d(server, "keys", "list")
    assert listed.returncode == 0
    [row] = [line.split() for line in listed.stdout.splitlines() if line.startswith("ops-cli ")]
    assert row[1:5] == ["active", "20", "2", "9"]
    assert key not in listed.stdout

    again = grok3d(server, "keys", "create", "--name", "ops-cli")
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.strip() == "grok3d: a key named 'ops-cli' exists already (a revoked key keeps its name)"
    for bad in (["--rpm", "0"], ["--jobs-per-day", "-1"]):
        refused = grok3d(server, "keys", "create", "--name", "zero", *bad)
        assert refused.returncode == 1 and "must be at least 1" in refused.stderr and refused.stdout == ""

    revoked = grok3d(server, "keys", "revoke", "ops-cli")
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert "revoked" in [line.split() for line in grok3d(server, "keys", "list").stdout.splitlines()
                         if line.startswith("ops-cli ")][0][1]
    missing = grok3d(server, "keys", "revoke", "nobody")
    assert missing.returncode == 1 and missing.stderr.strip() == "grok3d: no key named 'nobody'"


def test_keys_work_on_the_store_that_GROK3D_DATABASE_URL_names(tmp_path):
    """With GROK3D_DATABASE_URL set (the replicas' shared store), `grok3d keys` works on that store, not on the
    data folder's SQLite file (an SQLite URL elsewhere here; PostgreSQL's is the same setting)."""
    shared = sqlite_url(tmp_path / "shared.db")
    base = {k: v for k, v in os.environ.items() if k not in ("GROK3D_SERVER", "GROK3D_API_KEY")}
    env = {**base, "GROK3D_DATA_DIR": str(tmp_path / "data"), "GROK3D_DATABASE_URL": shared}
    made = subprocess.run([sys.executable, "-m", "grok3d_cli", "keys", "create", "--name", "replica-ops"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=120)
    assert made.returncode == 0, made.stderr
    store = JobStore(shared)
    try:
        assert [k.name for k in KeyStore(store).list()] == ["replica-ops"]
    finally:
        store.close()
    assert not (tmp_path / "data" / "grok3d.db").exists()


# -- 401 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "", "Basic dXNlcjpwYXNz", "Bearer", "Bearer =abc", "Bearer a b",
                                           "Token g3d_abc", "Bearerg3d_abc", "Bearer g3d_a,b"])
@pytest.mark.parametrize("method, path", JOB_ROUTES)
def test_no_key_or_a_malformed_header_is_401_api_key_required(server, authorization, method, path):
    headers = {"Authorization": authorization} if authorization is not None else {}
    r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a cat"} if method == "POST"
                      else None)
    assert r.status_code == 401
    if method != "HEAD":
        assert r.json() == {"error": "API key required"}
    assert r.headers["www-authenticate"] == 'Bearer realm="grok3d"'
    assert not any(name in r.headers for name in RATE_HEADERS)


@pytest.mark.parametrize("presented", ["g3d_" + "A" * 43, "not-a-grok3d-key", "g3d_short"])
@pytest.mark.parametrize("method, path", JOB_ROUTES)
def test_an_unknown_key_is_401_invalid_api_key(server, presented, method, path):
    r = httpx.request(method, server.url + path, headers=bearer(presented),
                      json={"prompt": "a cat"} if method == "POST" else None)
    assert r.status_code == 401
    if method != "HEAD":
        assert r.json() == {"error": "Invalid API key"}
    assert r.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_a_revoked_key_is_refused_on_its_next_request(server):
    key = make_key(server, "soon-revoked")
    job_id = own_job(server, key)
    assert httpx.get(f"{server.url}/api/status/{job_id}", headers=bearer(key)).status_code == 200
    revoked = grok3d(server, "keys", "revoke", "soon-revoked")
    assert revoked.returncode == 0, revoked.stderr
    for method, path in [("GET", f"/api/status/{job_id}"), ("GET", f"/api/asset/{job_id}?asset_type=image"),
                         ("POST", "/api/generate")]:
        r = httpx.request(method, server.url + path, headers=bearer(key),
                          json={"prompt": "x"} if method == "POST" else None)
        assert_error(r, 401, "Invalid API key")


# -- what stays public ----------------------------------------------------------------------------------------

def test_examples_and_the_page_need_no_key(server):
    examples = httpx.get(server.url + "/api/examples")
    assert examples.status_code == 200 and len(examples.json()["examples"]) >= 3
    example = examples.json()["examples"][0]["job_id"]
    assert httpx.get(f"{server.url}/api/status/{example}").json()["status"] == "complete"
    for kind in ASSETS:
        r = httpx.get(f"{server.url}/api/asset/{example}", params={"asset_type": kind})
        assert r.status_code == 200 and not any(name in r.headers for name in RATE_HEADERS)
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/static/app.js").status_code == 200
    assert httpx.get(server.url + "/livez").status_code == 200


# -- ownership ------------------------------------------------------------------------------------------------

def test_a_keys_job_is_invisible_to_another_key(server):
    alice, bob = make_key(server, "alice"), make_key(server, "bob")
    job_id = own_job(server, alice)
    assert wait_job(httpx.Client(base_url=server.url, headers=bearer(alice)), job_id)["status"] == "complete"
    unknown = httpx.get(f"{server.url}/api/status/ffffffff", headers=bearer(bob))
    theirs = httpx.get(f"{server.url}/api/status/{job_id}", headers=bearer(bob))
    assert_error(theirs, 404, "Job not found")
    assert (theirs.status_code, theirs.content) == (unknown.status_code, unknown.content)
    for kind in ASSETS:
        unknown = httpx.get(f"{server.url}/api/asset/ffffffff", params={"asset_type": kind}, headers=bearer(bob))
        theirs = httpx.get(f"{server.url}/api/asset/{job_id}", params={"asset_type": kind}, headers=bearer(bob))
        assert_error(theirs, 404, "Job not found")
        assert (theirs.status_code, theirs.content) == (unknown.status_code, unknown.content)
        mine = httpx.get(f"{server.url}/api/asset/{job_id}", params={"asset_type": kind},
                         headers={"Authorization": f"bearer {alice}"})  # the scheme is case-insensitive
        assert mine.status_code == 200 and len(mine.content) > 0
        assert_rate_headers(mine, 600)


def test_every_keyed_answer_carries_the_ratelimit_fields(server):
    key = make_key(server, "headers", rpm=50)
    job_id = own_job(server, key)
    answers = [
        httpx.post(server.url + "/api/generate", json={"prompt": ""}, headers=bearer(key)),  # 400
        httpx.get(f"{server.url}/api/status/{job_id}", headers=bearer(key)),  # 200
        httpx.head(f"{server.url}/api/status/{job_id}", headers=bearer(key)),
        httpx.get(f"{server.url}/api/status/ffffffff", headers=bearer(key)),  # 404
        httpx.get(f"{server.url}/api/asset/{job_id}?asset_type=nope", headers=bearer(key)),  # 400
        httpx.get(f"{server.url}/api/asset/{job_id}?asset_type=usdz", headers=bearer(key)),  # 404 or 200
    ]
    assert [r.status_code for r in answers][:5] == [400, 200, 200, 404, 400]
    for r in answers:
        assert_rate_headers(r, 50)
    remaining = [int(r.headers["ratelimit-remaining"]) for r in answers]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] == 50 - 1 - len(answers)


# -- limits ---------------------------------------------------------------------------------------------------

def test_a_burst_over_the_requests_per_minute_gets_429s(server):
    key = make_key(server, "rpm-ten", rpm=10)
    store = JobStore(sqlite_url(server.data_dir / "grok3d.db"))
    try:  # a job of that key, made without a request, so that the burst is all there is
        [row] = [k for k in KeyStore(store).list() if k.name == "rpm-ten"]
        job_id = store.create("a job to poll", queue_max=1000, api_key_id=row.id).job_id
    finally:
        store.close()

    def poll(_: int) -> httpx.Response:
        return httpx.get(f"{server.url}/api/status/{job_id}", headers=bearer(key), timeout=30)

    with ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(poll, range(30)))
    passed = [r for r in answers if r.status_code == 200]
    refused = [r for r in answers if r.status_code == 429]
    assert (len(passed), len(refused)) == (10, 20), [r.status_code for r in answers]
    assert sorted(int(r.headers["ratelimit-remaining"]) for r in passed) == list(range(10))
    for r in refused:
        assert set(r.json()) == {"error"}
        assert re.fullmatch(r"This key's rate limit is reached \(10 requests per minute\); it resets in \d+ s",
                            r.json()["error"]), r.json()
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert_rate_headers(r, 10)
        assert r.headers["ratelimit-remaining"] == "0"
        assert r.headers["ratelimit-reset"] == r.headers["retry-after"]


def test_max_in_flight_refuses_until_a_job_finishes(server):
    key = make_key(server, "two-at-once", max_in_flight=2)
    client = httpx.Client(base_url=server.url, headers=bearer(key), timeout=30)
    first, second = own_job(server, key), own_job(server, key)
    third = client.post("/api/generate", json={"prompt": "one too many"})
    assert third.status_code == 429
    assert third.json()["error"] == ("This key's limit of jobs in flight is reached (2 queued or processing); it "
                                     "frees up as soon as one of them finishes")
    assert int(third.headers["retry-after"]) >= 1
    assert (third.headers["ratelimit-limit"], third.headers["ratelimit-remaining"]) == ("2", "0")
    wait_job(client, first)
    wait_job(client, second)
    assert client.post("/api/generate", json={"prompt": "room again"}).status_code == 200


def test_jobs_per_day_refuses_the_fourth_naming_the_daily_limit(server):
    key = make_key(server, "three-a-day", jobs_per_day=3, max_in_flight=10)
    for i in range(3):
        own_job(server, key, f"job {i}")
    fourth = httpx.post(server.url + "/api/generate", json={"prompt": "job 3"}, headers=bearer(key))
    assert fourth.status_code == 429
    assert re.fullmatch(r"This key's daily job limit is reached \(3 jobs per day\); it resets at 00:00 UTC, in "
                        r"(\d+ h )?\d+ min", fourth.json()["error"]), fourth.json()
    assert 1 <= int(fourth.headers["retry-after"]) <= 86_400
    assert (fourth.headers["ratelimit-limit"], fourth.headers["ratelimit-remaining"]) == ("3", "0")
    assert fourth.headers["ratelimit-reset"] == fourth.headers["retry-after"]


# -- CORS and the command line as a client ----------------------------------------------------------------------

def test_cors_preflight_allows_the_authorization_header(server):
    r = httpx.options(server.url + "/api/generate", headers={
        "Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    key = make_key(server, "browser")
    r = httpx.get(server.url + "/api/status/ffffffff", headers={**bearer(key), "Origin": "http://allowed.example"})
    exposed = r.headers["access-control-expose-headers"].lower()
    assert all(name in exposed for name in (*RATE_HEADERS, "retry-after", "www-authenticate"))
    r = httpx.get(server.url + "/api/status/ffffffff", headers={"Origin": "http://allowed.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://allowed.example"


def test_the_cli_client_sends_its_key(server, tmp_path):
    key = make_key(server, "cli-client")
    done = grok3d(server, "generate", "a cli teapot", "-o", str(tmp_path), "--server", server.url,
                  env={"GROK3D_API_KEY": key})
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    assert [p.suffix for p in paths] == [".jpg", ".glb", ".usdz"] and all(p.stat().st_size for p in paths)
    job_id = paths[0].stem
    shown = grok3d(server, "--api-key", key, "status", job_id, "--server", server.url)
    assert shown.returncode == 0 and "complete" in shown.stdout
    refused = grok3d(server, "status", job_id, "--server", server.url)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.strip() == ("grok3d: API key required (the server needs an API key: set --api-key or "
                                      "GROK3D_API_KEY)")


# -- what is written down ---------------------------------------------------------------------------------------

def test_no_key_is_in_the_database_or_the_log(server):
    """Last in this module: every key it made, searched for in the database's files (WAL included) and the log."""
    assert len(KEYS) >= 5
    stored = b"".join(p.read_bytes() for p in server.data_dir.glob("grok3d.db*"))
    log = server.log()
    assert "GROK3D_AUTH=keys" in log
    for key in KEYS:
        secret = key.removeprefix("g3d_")
        assert key.encode() not in stored and secret.encode() not in stored
        assert secret not in log


def test_open_mode_warns_and_the_daily_ceiling_holds(tmp_path):
    """The default mode: the seed's routes as they were (a key, if sent, is ignored), a warning at start-up, and
    the service's daily ceiling on jobs. API answers and a start-up line: served in process (tests/inprocess.py)."""
    with AppServer(tmp_path, {**STAGES, "GROK3D_DAILY_JOB_LIMIT": "2"}) as srv:
        assert "GROK3D_AUTH=open: anyone who can reach port" in srv.log()
        ids = [httpx.post(srv.url + "/api/generate", json={"prompt": f"p{i}"}).json()["job_id"] for i in range(2)]
        third = httpx.post(srv.url + "/api/generate", json={"prompt": "p2"}, headers=bearer("g3d_" + "x" * 43))
        assert third.status_code == 429
        assert third.json()["error"].startswith("The service's daily job limit is reached (2 jobs per day); it "
                                                "resets at 00:00 UTC, in ")
        assert int(third.headers["retry-after"]) >= 1
        assert not any(name in third.headers for name in RATE_HEADERS)
        r = httpx.get(f"{srv.url}/api/status/{ids[0]}", headers={"Authorization": "Bearer whatever"})
        assert r.status_code == 200 and not any(name in r.headers for name in RATE_HEADERS)
