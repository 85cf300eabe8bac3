"""TripoSR model speed: seconds per mesh by phase, per batch size and precision; prints ONE JSON line.

Official config with seeded random weights built in memory (nothing written, nothing downloaded). Threshold = the
0.999 quantile of each batch's density grid, since random weights have no density-25 surface. Phases: forward,
density grid (all scenes at once: on a GPU in bf16 the fused Triton kernel of fused.py, on a CPU cpu.py's chunks),
marching cubes (ours on a GPU, scikit-image's on a CPU), colours (queried at vertices), GLB export. Each figure is the
median of --repeats timed runs after one warm-up. Then the same for each of --precisions (TRIPOSR_PRECISION modes,
runners/triposr/precision.py) at the fp32 run's iso-levels, with the Chamfer distance of their meshes to the fp32
meshes (model units; the issues accept <= 1e-3).

On a CPU also: the peak resident memory of each run (the weights included), the machine's load average before and
after (the timings mean little on a busy machine), and `vs_original`: each phase, the total and the peak memory of
the batch-1 rows divided by the original TripoSR's on this kind of machine (the midpoints of issue 13's ranges:
2-core Xeon with AVX-512, resolution 256, fp32). A CPU without amx_bf16/avx512_bf16 runs bf16 as fp32 (precision.py);
--emulate-bf16 times PyTorch's emulated bf16 there anyway, for its Chamfer distance (its timings mean nothing).

    python bench/triposr_model_bench.py --device cuda                                  # targets: H100
    python bench/triposr_model_bench.py --device cpu                                   # issue 13's figures
    python bench/triposr_model_bench.py --device cpu --batch-sizes 8 --repeats 1 --precisions ''   # batch 8's cost
    python bench/triposr_model_bench.py --device cpu --config tiny --batch-sizes 1,2 --resolution 32   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runners.triposr import fused  # noqa: E402
from runners.triposr.loading import random_model  # noqa: E402
from runners.triposr.mesh import grid_to_model, marching_cubes, mesh_from_arrays, to_delivery_glb  # noqa: E402
from runners.triposr.precision import Precision, cpu_bf16, number_format, resolve  # noqa: E402

GIB = 2**30
# The original TripoSR code (d26e331) on a 2-core Xeon (AVX-512, AVX512-BF16, AMX-BF16), resolution 256, batch 1,
# fp32, the same seeded random weights and picture: issue 13's table, midpoints of its ranges (seconds; GiB).
ORIGINAL_CPU = {"forward": (17.7 + 19.4) / 2, "density_grid": (20.9 + 22.4) / 2, "marching_cubes": (0.34 + 0.53) / 2,
                "total": (42.1 + 42.5) / 2, "peak_gib": 3.06}
# Issue 13's targets on that machine, resolution 256, batch 1.
CPU_TARGETS = {"fp32": {"total_s": 30.0, "density_grid_s": 12.0, "peak_gib": 3.0},
               "bf16": {"total_s": 14.0, "chamfer": 1e-3}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(n)]


# -- peak memory -----------------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set (VmHWM) to its current size
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_gib(device: torch.device) -> float:
    """Since the last reset_peak: GPU memory allocated, or the process's peak resident memory (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    try:
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024 / GIB
    except (OSError, StopIteration):  # not Linux: the lifetime peak, in KiB on Linux and bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / GIB if sys.platform == "darwin" else peak * 1024 / GIB


# -- one batch ------------------------------------------------------------------------------------------------
def run_batch(model, imgs, resolution: int, device: torch.device, plan: Precision,
              thresholds: list[float] | None = None) -> tuple[dict, list, list[float]]:
    """-> (seconds per phase for the whole batch, the meshes' vertex arrays, the thresholds used)."""
    t: dict[str, float] = {}

    def tick(name: str, start: float) -> float:
        sync(device)
        now = time.perf_counter()
        t[name] = t.get(name, 0.0) + now - start
        return now

    used, verts_out = [], []
    with torch.no_grad(), number_format(plan.network, device):
        start = time.perf_counter()
        codes = model(imgs)
        start = tick("forward", start)
    with torch.no_grad(), number_format(plan.grid, device):
        # As mesh.extract_meshes: one grid for all scenes on a GPU, scene by scene on a CPU
        grids = None if device.type == "cpu" else model.density_grid(codes, resolution)
        start = tick("density_grid", start)
        for b in range(len(imgs)):
            if grids is None:
                start = time.perf_counter()
                grid = model.density_grid(codes[b : b + 1], resolution)[0]
                tick("density_grid", start)
            else:
                grid = grids[b]
            start = time.perf_counter()
            if thresholds is None:
                flat = grid.flatten()
                # torch.quantile takes at most 2^24 values: a strided sample of the grid
                used.append(float(torch.quantile(flat[:: 1 + flat.numel() // 2**24], 0.999)))
            else:
                used.append(thresholds[b])
            v, f = marching_cubes(grid, used[b])
            v = grid_to_model(v, resolution, model.cfg.radius)
            start = tick("marching_cubes", start)
            _, rgb = model.query(codes[b : b + 1], v[None])
            start = tick("colours", start)
            glb = to_delivery_glb(mesh_from_arrays(v, f, rgb[0]))
            tick("glb_export", start)
            verts_out.append(v.float().cpu().numpy())
            assert len(glb) > 0
    return t, verts_out, used


def timed(model, imgs, args, device: torch.device, plan: Precision,
          thresholds: list[float] | None) -> tuple[dict, list, list[float]]:
    """One warm-up (which picks the iso-levels when none are given: the quantile is not timed), then args.repeats
    timed runs: -> (row of median seconds per mesh, vertex arrays, thresholds)."""
    _, _, thresholds = run_batch(model, imgs, args.resolution, device, plan, thresholds)  # kernels, allocator...
    runs, peaks, cpu_s = [], [], []
    for _ in range(args.repeats):
        reset_peak(device)
        began = time.process_time()
        t, verts, used = run_batch(model, imgs, args.resolution, device, plan, thresholds)
        cpu_s.append((time.process_time() - began) / len(imgs))
        peaks.append(peak_gib(device))
        runs.append({k: v / len(imgs) for k, v in t.items()})
    per_mesh = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    totals = [sum(r.values()) for r in runs]
    row = {"s_per_mesh": per_mesh, "total_s_per_mesh": round(statistics.median(totals), 4),
           "vertices": int(np.mean([len(v) for v in verts]))}
    if len(runs) > 1:
        row["total_s_per_mesh_runs"] = [round(x, 3) for x in totals]
    if device.type == "cpu":  # the process's CPU seconds (user + system, all threads): less sensitive to load
        row["cpu_s_per_mesh"] = round(statistics.median(cpu_s), 2)
    row["peak_gpu_gb" if device.type == "cuda" else "peak_rss_gib"] = round(
        max(peaks) * (GIB / 1e9 if device.type == "cuda" else 1), 3)
    return row, verts, used


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    return float((cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()) / 2)


# -- summaries ------------------------------------------------------------------------------------------------
def rows_of(batch: dict) -> dict[str, dict]:
    """precision -> its row: 'fp32' is the batch row itself, the others are nested under their names."""
    out = {"fp32": batch}
    out.update({k: v for k, v in batch.items() if isinstance(v, dict) and "s_per_mesh" in v})
    return out


def targets(batches: list[dict]) -> dict[str, bool | None]:
    """The H100 targets, each met by fp32 or by a precision whose mesh is within 1e-3 of fp32's."""
    def best(bs: int) -> dict | None:
        row = next((r for r in batches if r["batch_size"] == bs), None)
        if row is None:
            return None
        ok = [r for name, r in rows_of(row).items() if name == "fp32" or r.get("chamfer_to_fp32", 1) <= 1e-3]
        return min(ok, key=lambda r: r["total_s_per_mesh"])
    one, eight = best(1), best(8)
    peaks = [r.get("peak_gpu_gb", 0) for b in batches for r in rows_of(b).values()]
    return {"batch_1_le_0.25_s": one["total_s_per_mesh"] <= 0.25 if one else None,
            "batch_8_le_0.08_s_per_mesh": eight["total_s_per_mesh"] <= 0.08 if eight else None,
            "peak_le_20_gb": max(peaks) <= 20 if peaks else None}


def vs_original(batches: list[dict]) -> dict:
    """Batch 1, per precision: each phase, the total and the peak memory divided by the original's (< 1: better)."""
    row = next((r for r in batches if r["batch_size"] == 1), None)
    if row is None:
        return {}
    out: dict = {"original": ORIGINAL_CPU}
    for name, r in rows_of(row).items():
        phases = {k: round(r["s_per_mesh"][k] / ORIGINAL_CPU[k], 3) for k in ("forward", "density_grid",
                                                                                "marching_cubes")}
        out[name] = {**phases, "total": round(r["total_s_per_mesh"] / ORIGINAL_CPU["total"], 3),
                     "peak_memory": round(r["peak_rss_gib"] / ORIGINAL_CPU["peak_gib"], 3)}
    return out


def cpu_targets(batches: list[dict], native_bf16: bool) -> dict[str, bool | None]:
    row = next((r for r in batches if r["batch_size"] == 1), None)
    if row is None:
        return {}
    fp32, want = row, CPU_TARGETS["fp32"]
    met: dict[str, bool | None] = {
        "fp32_total_le_30_s": fp32["total_s_per_mesh"] <= want["total_s"],
        "fp32_density_grid_le_12_s": fp32["s_per_mesh"]["density_grid"] <= want["density_grid_s"],
        "fp32_peak_le_3.0_gib": fp32["peak_rss_gib"] <= want["peak_gib"]}
    bf16 = row.get("bf16")
    timed_bf16 = isinstance(bf16, dict) and "s_per_mesh" in bf16
    met["bf16_total_le_14_s"] = bf16["total_s_per_mesh"] <= CPU_TARGETS["bf16"]["total_s"] \
        if timed_bf16 and native_bf16 else None  # None: not measured on a CPU that multiplies bf16
    met["bf16_chamfer_le_1e-3"] = bf16["chamfer_to_fp32"] <= CPU_TARGETS["bf16"]["chamfer"] if timed_bf16 else None
    return met


def cpu_name() -> str:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name"))
        return line.partition(":")[2].strip()
    except (OSError, StopIteration):
        return platform.processor()


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", choices=["official", "tiny"], default="official")
    p.add_argument("--batch-sizes", default=None, help="default: 1,4,8,16 on a GPU, 1 on a CPU")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per batch size after one warm-up, their median reported (default: 2 on a GPU, "
                        "3 on a CPU)")
    p.add_argument("--precisions", default=None,
                   help="TRIPOSR_PRECISION modes timed after fp32 and compared with its meshes ('' for none; "
                        "default: mixed,bf16 on a GPU, bf16 on a CPU)")
    p.add_argument("--emulate-bf16", action="store_true",
                   help="on a CPU without bf16 products, run bf16 anyway (PyTorch emulates it, slowly)")
    args = p.parse_args()
    device = torch.device(args.device)
    on_cpu = device.type == "cpu"
    args.repeats = args.repeats or (3 if on_cpu else 2)
    batch_sizes = args.batch_sizes or ("1" if on_cpu else "1,4,8,16")
    precisions = args.precisions if args.precisions is not None else ("bf16" if on_cpu else "mixed,bf16")
    others = [m for m in precisions.split(",") if m and m != "fp32"]
    result: dict = {"bench": "triposr_model", "device": str(device), "config": args.config,
                    "resolution": args.resolution, "torch": torch.__version__, "repeats": args.repeats,
                    "batches": []}
    if on_cpu:
        result.update(cpu=cpu_name(), threads=torch.get_num_threads(), bf16_products=cpu_bf16() or "none",
                      load_avg_start=load_avg())
    else:
        result["gpu"] = torch.cuda.get_device_name(device)
    model = random_model(args.config, seed=0, device=device).to(device)
    for bs in [int(x) for x in batch_sizes.split(",")]:
        imgs = images(bs)
        row, verts, thresholds = timed(model, imgs, args, device, resolve("fp32", device), None)
        row = {"batch_size": bs, **row}
        for precision in others:  # same pictures, same iso-levels: only the precision differs
            # --emulate-bf16: as if the CPU multiplied bf16 (PyTorch emulates it): for the numbers, not the time
            plan = resolve(precision, device, native_bf16=True if args.emulate_bf16 else None)
            if on_cpu and plan == resolve("fp32", device):
                row[precision] = {"skipped": f"{precision} runs as fp32 on this CPU (no amx_bf16/avx512_bf16)"}
                continue
            fast, fast_verts, _ = timed(model, imgs, args, device, plan, thresholds)
            pairs = [(a, b) for a, b in zip(verts, fast_verts) if len(a) and len(b)]
            fast["chamfer_to_fp32"] = float(np.mean([chamfer(a, b) for a, b in pairs]))
            if on_cpu and not cpu_bf16() and "bf16" in (plan.network, plan.grid):
                fast["emulated"] = True
            row[precision] = fast
        result["batches"].append(row)
    result["fused_grid"] = fused.state(device)  # after the runs: the kernel checks itself on first use
    if device.type == "cuda" and args.config == "official" and args.resolution == 256:
        result["targets_met"] = targets(result["batches"])
    if on_cpu:
        result["load_avg_end"] = load_avg()
        result["peak_rss_process_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)
        if args.config == "official" and args.resolution == 256:
            result["vs_original"] = vs_original(result["batches"])
            result["targets_met"] = cpu_targets(result["batches"], native_bf16=cpu_bf16() is not None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
