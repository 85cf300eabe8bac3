"""TripoSR model speed: seconds per mesh by phase, per batch size; prints ONE JSON line.

Official config with seeded random weights built in memory (nothing written, nothing downloaded). Threshold = the
0.999 quantile of each batch's density grid, since random weights have no density-25 surface. Phases: forward,
density grid (all scenes at once; in bf16 on a GPU, the fused Triton kernel of fused.py), marching cubes (torch, on the device), colours (queried at vertices), GLB export.
Then the same for each of --precisions (TRIPOSR_PRECISION modes, runners/triposr/precision.py; `mixed` is the
service's default on a GPU) at the fp32 run's iso-levels, with the Chamfer distance of their meshes to the fp32
meshes (model units; the issue accepts <= 1e-3).

    python bench/triposr_model_bench.py --device cuda                                  # targets: H100
    python bench/triposr_model_bench.py --device cpu --config tiny --batch-sizes 1,2 --resolution 32   # smoke
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from scipy.spatial import cKDTree

from runners.triposr import fused
from runners.triposr.loading import random_model
from runners.triposr.mesh import grid_to_model, marching_cubes, mesh_from_arrays, to_delivery_glb
from runners.triposr.precision import number_format, resolve


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]


def run_batch(model, imgs, resolution: int, device: torch.device, precision: str,
              thresholds: list[float] | None = None) -> tuple[dict, list, list[float]]:
    """-> (seconds per phase for the whole batch, the meshes' vertex arrays, the thresholds used)."""
    t: dict[str, float] = {}

    def tick(name: str, start: float) -> float:
        sync(device)
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - start
        return now

    used, verts_out = [], []
    plan = resolve(precision, device)
    with torch.no_grad(), number_format(plan.network, device):
        start = time.perf_counter()
        codes = model(imgs)
        start = tick("forward", start)
    with torch.no_grad(), number_format(plan.grid, device):
        grids = model.density_grid(codes, resolution)
        start = tick("density_grid", start)
        for b in range(len(imgs)):
            start = time.perf_counter()
            if thresholds is None:
                flat = grids[b].flatten()
                # torch.quantile takes at most 2^24 values: a strided sample of the grid
                used.append(float(torch.quantile(flat[:: 1 + flat.numel() // 2**24], 0.999)))
            else:
                used.append(thresholds[b])
            v, f = marching_cubes(grids[b] - used[b])
            v = grid_to_model(v, resolution, model.cfg.radius)
            start = tick("marching_cubes", start)
            _, rgb = model.query(codes[b : b + 1], v[None])
            start = tick("colours", start)
            glb = to_delivery_glb(mesh_from_arrays(v, f, rgb[0]))
            tick("glb_export", start)
            verts_out.append(v.float().cpu().numpy())
            assert len(glb) > 0
    return t, verts_out, used


def timed(model, imgs, args, device: torch.device, precision: str,
          thresholds: list[float] | None) -> tuple[dict, list, list[float]]:
    """One warm-up, then args.repeats timed runs: -> (row of seconds per mesh, vertex arrays, thresholds)."""
    run_batch(model, imgs, args.resolution, device, precision, thresholds)  # kernels, allocator, autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    totals: dict[str, float] = {}
    for _ in range(args.repeats):
        t, verts, used = run_batch(model, imgs, args.resolution, device, precision, thresholds)
        for k, v in t.items():
            totals[k] = totals.get(k, 0.0) + v
    per_mesh = {k: round(v / args.repeats / len(imgs), 4) for k, v in totals.items()}
    row = {"s_per_mesh": per_mesh, "total_s_per_mesh": round(sum(per_mesh.values()), 4),
           "vertices": int(np.mean([len(v) for v in verts]))}
    if device.type == "cuda":
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return row, verts, used


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return float((cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()) / 2)


def targets(batches: list[dict]) -> dict[str, bool | None]:
    """The issue's H100 targets, each met by fp32 or by a precision whose mesh is within 1e-3 of fp32's."""
    def best(bs: int) -> dict | None:
        row = next((r for r in batches if r["batch_size"] == bs), None)
        if row is None:
            return None
        ok = [row] + [v for v in row.values() if isinstance(v, dict) and v.get("chamfer_to_fp32", 1) <= 1e-3]
        return min(ok, key=lambda r: r["total_s_per_mesh"])
    one, eight = best(1), best(8)
    peaks = [r.get("peak_gpu_gb", 0) for b in batches for r in [b, *(v for v in b.values() if isinstance(v, dict))]]
    return {"batch_1_le_0.25_s": one["total_s_per_mesh"] <= 0.25 if one else None,
            "batch_8_le_0.08_s_per_mesh": eight["total_s_per_mesh"] <= 0.08 if eight else None,
            "peak_le_20_gb": max(peaks) <= 20 if peaks else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["official", "tiny"], default="official")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (after one warm-up)")
    p.add_argument("--precisions", default="mixed,bf16",
                   help="TRIPOSR_PRECISION modes timed after fp32 and compared with its meshes ('' for none)")
    args = p.parse_args()
    others = [m for m in args.precisions.split(",") if m and m != "fp32"]
    device = torch.device(args.device)
    model = random_model(args.config, seed=0, device=device).to(device)
    result: dict = {"bench": "triposr_model", "device": str(device), "config": args.config,
                    "resolution": args.resolution, "torch": torch.__version__, "batches": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        imgs = images(bs)
        row, verts, thresholds = timed(model, imgs, args, device, "fp32", None)
        row = {"batch_size": bs, **row}
        for precision in others:  # same pictures, same iso-levels: only the precision differs
            fast, fast_verts, _ = timed(model, imgs, args, device, precision, thresholds)
            pairs = [(a, b) for a, b in zip(verts, fast_verts) if len(a) and len(b)]
            fast["chamfer_to_fp32"] = float(np.mean([chamfer(a, b) for a, b in pairs]))
            row[precision] = fast
        result["batches"].append(row)
    result["fused_grid"] = fused.state(device)  # after the runs: the kernel checks itself on first use
    if device.type == "cuda" and args.config == "official" and args.resolution == 256:
        result["targets_met"] = targets(result["batches"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
