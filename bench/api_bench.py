"""GET /api/status throughput: grok3d (the real `bentoml serve`) against a bare FastAPI app answering the same JSON.

50 closed-loop clients (each sends its next request when the last answer arrives) poll a stored job for 20 s on
loopback: grok3d in open mode (one job), grok3d in keys mode (GROK3D_AUTH=keys: each client with a key of its
own, polling a job of that key, so every poll is a key check and a count in the store), then the bare app, in the
same run. Prints one JSON line: {"grok3d": {"rps", "p50_ms", "p99_ms"}, "keys": {...}, "bare": {...}, ...}.
Target, for both grok3d runs: rps >= 0.5 x bare, p99 <= 3 x bare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.db import sqlite_url  # noqa: E402
from pipeline.jobs import JobStore  # noqa: E402
from pipeline.keys import KeyStore  # noqa: E402
from tests.server import Server, free_port  # noqa: E402

BARE_APP = """
import json, sys
from fastapi import FastAPI
from fastapi.responses import JSONResponse
body = json.loads(sys.argv[1])
app = FastAPI()
@app.get("/api/status/{job_id}")
async def status(job_id: str):
    return JSONResponse(body)
"""


Target = tuple[str, dict[str, str]]  # one client's URL and headers


async def closed_loop(targets: list[Target], seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=len(targets))
    async with aiohttp.ClientSession(connector=connector) as session:
        async def client(url: str, headers: dict[str, str]) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                async with session.get(url, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(client(url, headers) for url, headers in targets))
        elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    return {"rps": round(len(latencies) / elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": len(latencies), "errors": errors}


def wait_ready(url: str, timeout_s: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


def measure(targets: list[Target], seconds: float) -> dict:
    asyncio.run(closed_loop(targets, 2))  # warm-up
    return asyncio.run(closed_loop(targets, seconds))


def keyed_jobs(data: Path, clients: int) -> list[tuple[str, str]]:
    """One key per client, each with a job of its own: (key, job id). Their rates are far above what a client can
    send, so that every poll is counted and none refused."""
    store = JobStore(sqlite_url(data / "grok3d.db"))
    try:
        keys = KeyStore(store)
        made = []
        for i in range(clients):
            row, key = keys.create(f"bench-{i}", rpm=10_000_000)
            made.append((key, store.create(f"bench job {i}", queue_max=10 * clients, api_key_id=row.id).job_id))
        return made
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="g3d-bench-"))
    store = JobStore(sqlite_url(data / "grok3d.db"))
    job = store.create("A futuristic robot cat with glowing blue eyes", queue_max=10)
    store.close()
    # No xAI key and no model: the job stays queued (nothing can run it), which is all a status poll needs.
    env = {"XAI_API_KEY": "", "TRIPOSR_MODEL": str(data / "no-model"), "GROK3D_BLENDER_WORKERS": "1"}
    results: dict = {}
    with Server(data, env) as srv:
        url = f"{srv.url}/api/status/{job.job_id}"
        body = __import__("httpx").get(url).json()
        results["grok3d"] = measure([(url, {})] * args.clients, args.seconds)

    keyed = keyed_jobs(data, args.clients)
    with Server(data, {**env, "GROK3D_AUTH": "keys"}, log_name="server-keys.log") as srv:
        results["keys"] = measure([(f"{srv.url}/api/status/{job_id}", {"Authorization": f"Bearer {key}"})
                                   for key, job_id in keyed], args.seconds)

    port = free_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE_APP + "\nimport uvicorn\nuvicorn.run(app, host='127.0.0.1', "
                             f"port={port}, log_level='warning')", json.dumps(body)], cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/api/status/{job.job_id}"
        wait_ready(url)
        results["bare"] = measure([(url, {})] * args.clients, args.seconds)
    finally:
        bare.terminate()
        bare.wait(10)
    g, k, b = results["grok3d"], results["keys"], results["bare"]
    results["rps_ratio"] = round(g["rps"] / b["rps"], 3)
    results["p99_ratio"] = round(g["p99_ms"] / b["p99_ms"], 3)
    results["keys_rps_ratio"] = round(k["rps"] / b["rps"], 3)
    results["keys_p99_ratio"] = round(k["p99_ms"] / b["p99_ms"], 3)
    results["targets_met"] = (results["rps_ratio"] >= 0.5 and results["p99_ratio"] <= 3.0
                              and results["keys_rps_ratio"] >= 0.5 and results["keys_p99_ratio"] <= 3.0
                              and g["errors"] == k["errors"] == 0)
    results["machine"] = f"{os.cpu_count()} cores, loopback, {args.clients} clients x {args.seconds:.0f} s"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
