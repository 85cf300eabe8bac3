"""TripoSR model speed: seconds per mesh by phase, per batch size; prints ONE JSON line.

Official config with seeded random weights built in memory (nothing written, nothing downloaded). Threshold = the
0.999 quantile of each batch's density grid, since random weights have no density-25 surface. Phases: forward,
density grid (one batched query), marching cubes (torch, on the device), colours (queried at vertices), GLB export.
Optional --bf16: the same under bf16 autocast, with the Chamfer distance of its mesh to the fp32 mesh.

    python bench/triposr_model_bench.py --device cuda                                  # targets: H100
    python bench/triposr_model_bench.py --device cpu --config tiny --batch-sizes 1,2 --resolution 32   # smoke
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from scipy.spatial import cKDTree

from runners.triposr.loading import random_model
from runners.triposr.mesh import grid_to_model, marching_cubes, mesh_from_arrays, to_delivery_glb


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]


def run_batch(model, imgs, resolution: int, device: torch.device, bf16: bool) -> tuple[dict, list]:
    """-> (seconds per phase for the whole batch, the meshes' vertex arrays)."""
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    t: dict[str, float] = {}

    def tick(name: str, start: float) -> float:
        sync(device)
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - start
        return now

    start = time.perf_counter()
    with torch.no_grad(), ctx:
        codes = model(imgs)
        start = tick("forward", start)
        grids = model.density_grid(codes, resolution).float()
        start = tick("density_grid", start)
    verts_out = []
    for b in range(len(imgs)):
        start = time.perf_counter()
        flat = grids[b].flatten()
        threshold = float(torch.quantile(flat[:: 1 + flat.numel() // 2**24], 0.999))  # quantile caps its input
        v, f = marching_cubes(grids[b] - threshold)
        v = grid_to_model(v, resolution, model.cfg.radius)
        start = tick("marching_cubes", start)
        with torch.no_grad(), ctx:
            _, rgb = model.query(codes[b : b + 1], v[None].to(codes.dtype))
        start = tick("colours", start)
        glb = to_delivery_glb(mesh_from_arrays(v, f, rgb[0].float()))
        tick("glb_export", start)
        verts_out.append(v.float().cpu().numpy())
        assert len(glb) > 0
    return t, verts_out


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return float((cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()) / 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["official", "tiny"], default="official")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per batch size (after one warm-up)")
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast and compare meshes")
    args = p.parse_args()
    device = torch.device(args.device)
    model = random_model(args.config, seed=0, device=device).to(device)
    result: dict = {"bench": "triposr_model", "device": str(device), "config": args.config,
                    "resolution": args.resolution, "torch": torch.__version__, "batches": []}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        imgs = images(bs)
        run_batch(model, imgs, args.resolution, device, False)  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        totals: dict[str, float] = {}
        for _ in range(args.repeats):
            t, verts = run_batch(model, imgs, args.resolution, device, False)
            for k, v in t.items():
                totals[k] = totals.get(k, 0.0) + v
        per_mesh = {k: round(v / args.repeats / bs, 4) for k, v in totals.items()}
        row = {"batch_size": bs, "s_per_mesh": per_mesh, "total_s_per_mesh": round(sum(per_mesh.values()), 4),
               "vertices": int(np.mean([len(v) for v in verts]))}
        if device.type == "cuda":
            row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if args.bf16:
            run_batch(model, imgs, args.resolution, device, True)
            tb, vb = run_batch(model, imgs, args.resolution, device, True)
            row["bf16_total_s_per_mesh"] = round(sum(tb.values()) / bs, 4)
            row["bf16_chamfer_to_fp32"] = float(np.mean([chamfer(a, b) for a, b in zip(verts, vb) if len(a) and len(b)]))
        result["batches"].append(row)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
