"""GLB -> USDZ speed: a new Blender process per conversion (cold) against the warm pool, and pool throughput.

Prints ONE JSON line. Mesh: a 100k-face vertex-coloured marching-cubes surface (like TripoSR's output).
- cold_s / warm_s: median seconds per conversion, without baking (colours as displayColor) and with a
  GROK3D_BAKE_SIZE-sized bake (default 1024). Cold = `python -m converters.blender.worker --convert` in a fresh
  process (interpreter start + import bpy + conversion); warm = one request to an already started pool worker.
- throughput_per_s: baked conversions per second with 1 and with 2 workers, 8 requests in flight.
Targets: warm/cold <= 1/3 without baking, <= 0.6 with baking; 2 workers >= 1.7x the throughput of 1.
Run from the repository root: `.venv/bin/python bench/convert_bench.py` (needs .venv-blender; 2 free cores for
the throughput figure to mean anything).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from converters.blender.pool import BlenderPool, default_python  # noqa: E402
from tests.blender_helpers.meshes import blob_mesh, write_glb  # noqa: E402

REPEATS = 3
IN_FLIGHT = 8


def cold_seconds(glb: Path, out: Path, bake_size: int) -> float:
    """Median wall time of a fresh Blender process doing one conversion."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    times = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        subprocess.run([str(default_python()), "-m", "converters.blender.worker", "--convert", str(glb), str(out),
                        "--bake-size", str(bake_size)], env=env, cwd=REPO, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def warm_seconds(glb: Path, out: Path, bake_size: int) -> float:
    async with BlenderPool(workers=1, bake_size=bake_size) as pool:
        await pool.convert(glb, out)  # the first request pays one-time costs (Cycles, USD plugins)
        times = []
        for _ in range(REPEATS + 2):
            started = time.perf_counter()
            await pool.convert(glb, out)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


async def throughput(glb: Path, work: Path, workers: int, bake_size: int) -> float:
    async with BlenderPool(workers=workers, bake_size=bake_size) as pool:
        await asyncio.gather(*(pool.convert(glb, work / f"warmup-{i}.usdz") for i in range(workers)))
        started = time.perf_counter()
        await asyncio.gather(*(pool.convert(glb, work / f"t{workers}-{i}.usdz") for i in range(IN_FLIGHT)))
        return IN_FLIGHT / (time.perf_counter() - started)


async def main() -> None:
    bake_size = int(os.environ.get("GROK3D_BAKE_SIZE", "1024"))
    with tempfile.TemporaryDirectory(prefix="convert-bench-") as tmp:
        work = Path(tmp)
        mesh = blob_mesh(177)
        glb = write_glb(mesh, work / "mesh.glb")
        cold = {"no_bake": cold_seconds(glb, work / "cold.usdz", 0), "bake": cold_seconds(glb, work / "cold.usdz", bake_size)}
        warm = {"no_bake": await warm_seconds(glb, work / "warm.usdz", 0),
                "bake": await warm_seconds(glb, work / "warm.usdz", bake_size)}
        rates = {"1": await throughput(glb, work, 1, bake_size), "2": await throughput(glb, work, 2, bake_size)}
    ratio = {k: warm[k] / cold[k] for k in cold}
    speedup = rates["2"] / rates["1"]
    result = {
        "bench": "convert", "faces": len(mesh.faces), "bake_size": bake_size, "cpu_count": os.cpu_count(),
        "cold_s": {k: round(v, 3) for k, v in cold.items()}, "warm_s": {k: round(v, 3) for k, v in warm.items()},
        "warm_over_cold": {k: round(v, 3) for k, v in ratio.items()},
        "throughput_per_s": {k: round(v, 3) for k, v in rates.items()}, "speedup_2_workers": round(speedup, 2),
        "targets_met": {"warm_no_bake_le_1/3": ratio["no_bake"] <= 1 / 3, "warm_bake_le_0.6": ratio["bake"] <= 0.6,
                        "two_workers_ge_1.7x": speedup >= 1.7},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
