"""TripoSR service throughput: 16 concurrent clients through `bentoml serve`; prints ONE JSON line.

Official config with seeded random weights (written to a temporary folder: ~1.7 GB), resolution 256, threshold the
0.999 quantile of one density grid (random weights have no density-25 surface). Each client sends its next picture
when the last mesh arrives, through bench/triposr_bench_service.py, which calls the TripoSR service exactly as the
API service's 3D stage does. Reports meshes per second sustained, p50/p99 latency and the batch sizes that ran.
Target on an H100: >= 10 meshes/s with 16 clients, p99 < 3 s.

    python bench/triposr_service_bench.py                                   # GPU machine
    python bench/triposr_service_bench.py --config tiny --resolution 32 --seconds 20 --device cpu   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runners.triposr.loading import load_folder, write_random_checkpoint  # noqa: E402
from tests.server import Server  # noqa: E402


def picture(i: int) -> bytes:
    """A shaded blob on 0.5 gray, different for each client."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:512, 0:512]
    cy, cx, r = 256 + rng.integers(-40, 40), 256 + rng.integers(-40, 40), 120 + rng.integers(0, 60)
    inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    img = np.full((512, 512, 3), 128, np.uint8)
    img[inside] = rng.integers(40, 220, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def quantile_threshold(folder: Path, resolution: int, device: str) -> float:
    model = load_folder(folder, device)
    with torch.no_grad():
        grid = model.density_grid(model([Image.open(io.BytesIO(picture(0)))]), resolution)[0].float().flatten()
    return float(torch.quantile(grid[:: 1 + grid.numel() // 2**24], 0.999))


async def client(url: str, image: str, deadline: float, latencies: list[float], errors: list[str]) -> None:
    async with httpx.AsyncClient(timeout=900) as http:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            r = await http.post(url, json={"image_b64": image})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - began)
            else:
                errors.append(f"{r.status_code} {r.text[:200]}")


async def load(url: str, clients: int, seconds: float) -> tuple[list[float], list[str], float]:
    latencies: list[float] = []
    errors: list[str] = []
    images = [base64.b64encode(picture(i)).decode() for i in range(clients)]
    began = time.perf_counter()
    await asyncio.gather(*(client(url, images[i], began + seconds, latencies, errors) for i in range(clients)))
    return latencies, errors, time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", choices=["official", "tiny"], default="official")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=20.0)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-latency-ms", type=int, default=300_000)
    p.add_argument("--threshold", type=float, default=None, help="default: the 0.999 quantile of one grid")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["auto", "fp32", "mixed", "bf16"], default="auto",
                   help="TRIPOSR_PRECISION (auto: mixed on a GPU, fp32 on a CPU)")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="g3d-sbench-"))
    folder = write_random_checkpoint(work / "model", config=args.config, seed=0)
    threshold = args.threshold if args.threshold is not None else quantile_threshold(folder, args.resolution,
                                                                                     args.device)
    env = {"TRIPOSR_MODEL": str(folder), "TRIPOSR_MC_RESOLUTION": str(args.resolution),
           "TRIPOSR_MC_THRESHOLD": repr(threshold), "TRIPOSR_DEVICE": args.device,
           "TRIPOSR_MAX_BATCH_SIZE": str(args.max_batch_size), "TRIPOSR_MAX_LATENCY_MS": str(args.max_latency_ms),
           "TRIPOSR_PRECISION": args.precision}
    with Server(work, env, service="bench.triposr_bench_service:TripoSRBench", ready="/readyz") as srv:
        url = srv.url + "/reconstruct"
        asyncio.run(load(url, args.clients, args.warmup_s))  # model warm-up and the dispatcher's first fits
        logged_before = len(re.findall(r"TripoSR batch of (\d+)", srv.log()))
        latencies, errors, elapsed = asyncio.run(load(url, args.clients, args.seconds))
        sizes = [int(n) for n in re.findall(r"TripoSR batch of (\d+)", srv.log())][logged_before:]
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    result = {
        "bench": "triposr_service", "device": args.device, "gpu": torch.cuda.get_device_name(0)
        if args.device.startswith("cuda") else None, "config": args.config, "resolution": args.resolution,
        "precision": args.precision, "threshold": round(threshold, 4), "clients": args.clients,
        "seconds": round(elapsed, 1),
        "meshes": len(latencies), "meshes_per_s": round(len(latencies) / elapsed, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "batch_sizes": dict(sorted(Counter(sizes).items())), "errors": len(errors),
        "first_error": errors[0] if errors else None, "cpu_count": os.cpu_count(),
    }
    # The targets are for the official config at resolution 256 on an H100; a smoke run meets or misses nothing.
    official = args.config == "official" and args.resolution == 256 and args.device.startswith("cuda")
    result["targets_met"] = (result["meshes_per_s"] >= 10 and result["p99_ms"] < 3000) if official else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
