"""GET /api/status throughput: grok3d (the real `bentoml serve`) against a bare FastAPI app answering the same JSON.

50 closed-loop clients (each sends its next request when the last answer arrives) poll a stored job for 20 s on
loopback, against each of three servers running side by side: grok3d in open mode (one job), grok3d in keys mode
(GROK3D_AUTH=keys: each client with a key of its own, polling a job of that key, so every poll is a key check and
a count in the store) and the bare app. The 20 s are taken in rounds (4 s on each server in turn, 5 times), so a
machine whose load drifts (other work on a shared box) weighs on all three alike. Prints one JSON line:
{"grok3d": {"rps", "p50_ms", "p99_ms"}, "keys": {...}, "bare": {...}, ...}, each over all of its rounds.
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
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
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


@dataclass
class Tally:
    """What one server's clients saw, over every round."""

    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0
    errors: int = 0

    def summary(self) -> dict:
        ms = np.array(self.latencies) * 1000
        return {"rps": round(len(ms) / self.elapsed, 1), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests": len(ms), "errors": self.errors}


async def closed_loop(targets: list[Target], seconds: float, tally: Tally) -> None:
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
        tally.elapsed += time.perf_counter() - began
    tally.latencies += latencies
    tally.errors += errors


def measure(runs: dict[str, list[Target]], seconds: float, rounds: int) -> dict[str, dict]:
    """`seconds` of closed-loop polling of each run, in `rounds` turns that go round the runs."""
    for targets in runs.values():
        asyncio.run(closed_loop(targets, 2, Tally()))  # warm-up
    tallies = {name: Tally() for name in runs}
    for _ in range(rounds):
        for name, targets in runs.items():
            asyncio.run(closed_loop(targets, seconds / rounds, tallies[name]))
    return {name: tally.summary() for name, tally in tallies.items()}


def wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


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


def start_bare(body: dict, port: int) -> subprocess.Popen:
    serve = f"\nimport uvicorn\nuvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning')"
    return subprocess.Popen([sys.executable, "-c", BARE_APP + serve, json.dumps(body)], cwd=ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="per server, over all rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    open_data, keys_data = (Path(tempfile.mkdtemp(prefix=f"g3d-bench-{mode}-")) for mode in ("open", "keys"))
    store = JobStore(sqlite_url(open_data / "grok3d.db"))
    job = store.create("A futuristic robot cat with glowing blue eyes", queue_max=10)
    store.close()
    keyed = keyed_jobs(keys_data, args.clients)
    # No xAI key and no model: the jobs stay queued (nothing can run them), which is all a status poll needs.
    env = {"XAI_API_KEY": "", "GROK3D_BLENDER_WORKERS": "1"}
    open_env = {**env, "TRIPOSR_MODEL": str(open_data / "no-model")}
    keys_env = {**env, "TRIPOSR_MODEL": str(keys_data / "no-model"), "GROK3D_AUTH": "keys"}
    with Server(open_data, open_env) as open_srv, Server(keys_data, keys_env) as keys_srv:
        url = f"{open_srv.url}/api/status/{job.job_id}"
        port = free_port()
        bare = start_bare(httpx.get(url).json(), port)
        try:
            bare_url = f"http://127.0.0.1:{port}/api/status/{job.job_id}"
            wait_ready(bare_url)
            results: dict = measure({
                "grok3d": [(url, {})] * args.clients,
                "keys": [(f"{keys_srv.url}/api/status/{job_id}", {"Authorization": f"Bearer {key}"})
                         for key, job_id in keyed],
                "bare": [(bare_url, {})] * args.clients,
            }, args.seconds, args.rounds)
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
    results["machine"] = (f"{os.cpu_count()} cores, loopback, {args.clients} clients x {args.seconds:.0f} s per "
                          f"server in {args.rounds} rounds")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
