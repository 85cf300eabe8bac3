"""The job store's two hot statements on both engines, with one and two replicas (processes, each with its own
engine): claims per second (N queued jobs claimed until none is left) and status reads per second (`get` of a
random job, the poll behind GET /api/status). SQLite is the data folder's file (WAL, synchronous=FULL);
PostgreSQL is Debian's server started here on loopback with fsync on. Prints one JSON line.

    .venv/bin/python bench/store_bench.py [--jobs 1000] [--read-s 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.db import sqlite_url  # noqa: E402
from pipeline.jobs import JobStore  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402


def _claim_until_empty(url: str, owner: str, start: multiprocessing.Event, out: multiprocessing.Queue) -> None:
    store = JobStore(url, lease_s=600)
    start.wait()
    count = 0
    while store.claim(owner) is not None:
        count += 1
    out.put((count, time.perf_counter()))
    store.close()


def _read_for(url: str, ids: list[str], seconds: float, start: multiprocessing.Event,
              out: multiprocessing.Queue) -> None:
    store = JobStore(url)
    pick = random.Random(0).choice
    start.wait()
    count, ends = 0, time.perf_counter() + seconds
    while time.perf_counter() < ends:
        for _ in range(50):
            store.get(pick(ids))
        count += 50
    out.put((count, seconds))
    store.close()


def _run(target, args_for, replicas: int) -> list[tuple]:
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(n), start, out)) for n in range(replicas)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # every replica has opened its store (imports, migration check)
    began = time.perf_counter()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(60)
    return [(began, *r) for r in results]


def measure(url: str, jobs: int, read_s: float, replicas: int) -> tuple[float, float]:
    store = JobStore(url)
    ids = [store.create("bench", queue_max=jobs + 1).job_id for _ in range(jobs)]
    store.close()
    claimed = _run(_claim_until_empty, lambda n: (url, f"bench:{n}:x"), replicas)
    assert sum(count for _, count, _ in claimed) == jobs
    claims_per_s = jobs / (max(end for _, _, end in claimed) - claimed[0][0])
    read = _run(_read_for, lambda n: (url, ids, read_s), replicas)
    reads_per_s = sum(count / seconds for _, count, seconds in read)
    return round(claims_per_s), round(reads_per_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--read-s", type=float, default=3.0)
    args = parser.parse_args()
    result: dict = {"bench": "store", "jobs": args.jobs, "read_s": args.read_s, "claims_per_s": {},
                    "status_reads_per_s": {}}
    postgres = PostgresServer(durable=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for engine in ("sqlite", "postgresql"):
                for replicas in (1, 2):
                    url = (sqlite_url(Path(tmp) / f"{replicas}.db") if engine == "sqlite"
                           else postgres.new_database())
                    claims, reads = measure(url, args.jobs, args.read_s, replicas)
                    result["claims_per_s"][f"{engine}_{replicas}_replica"] = claims
                    result["status_reads_per_s"][f"{engine}_{replicas}_replica"] = reads
    finally:
        postgres.stop()
    # Other work on the machine shows in the numbers: say how busy it was.
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
