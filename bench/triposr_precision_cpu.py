"""How far each TRIPOSR_PRECISION mode moves the mesh, estimated on a CPU; prints ONE JSON line.

Official config, seeded random weights, one picture, resolution 256, iso-level the 0.999 quantile of the fp32 grid
(as bench/triposr_model_bench.py). Chamfer distance (model units) of each mode's mesh to the fp32 mesh; the issue
accepts 1e-3. bf16 runs under CPU autocast. TF32 does not exist on a CPU, so it is emulated: a TorchFunctionMode
rounds both inputs of every matrix product and convolution to TF32's 10-bit mantissa and lets float32 accumulate,
as tensor cores do (the rounding of attention's inner softmax product is not emulated). On a GPU the model bench
measures the real thing. The CPU's own bf16 (whose backbone keeps its residual stream in float32) is measured by
bench/triposr_model_bench.py --device cpu; here that is turned off, to compute as a GPU does. About 4 minutes on
2 cores.

    python bench/triposr_precision_cpu.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.triposr_model_bench import images  # noqa: E402
from runners.triposr import model as network  # noqa: E402
from runners.triposr.loading import random_model  # noqa: E402
from runners.triposr.mesh import grid_to_model, marching_cubes  # noqa: E402
from runners.triposr.precision import number_format  # noqa: E402

PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm,
            F.conv2d, F.conv_transpose2d, F.scaled_dot_product_attention}


def to_tf32(t: object) -> object:
    """float32 -> the nearest float32 with a 10-bit mantissa (TF32's), ties away from zero."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        return t
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


class EmulatedTF32(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in PRODUCTS:
            args = tuple(to_tf32(a) for a in args)
            kwargs = {k: to_tf32(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def main() -> None:
    network.CPU_FLOAT32_RESIDUAL = False  # bf16 as a GPU runs it: the residual stream rounded to bf16 too
    torch.manual_seed(0)
    cpu, resolution = torch.device("cpu"), 256
    model = random_model("official", seed=0)
    pictures = images(1)
    codes = {"fp32": model(pictures)}
    with EmulatedTF32():
        codes["tf32"] = model(pictures)
    with number_format("bf16", cpu):
        codes["bf16"] = model(pictures).float()
    exact = model.density_grid(codes["fp32"], resolution)[0]
    flat = exact.flatten()
    level = float(torch.quantile(flat[:: 1 + flat.numel() // 2**24], 0.999))

    def vertices(grid: torch.Tensor):
        v, _ = marching_cubes(grid - level)
        return grid_to_model(v, resolution, model.cfg.radius).numpy()

    reference = vertices(exact)

    def chamfer(network: str, grid_format: str) -> float:
        with number_format(grid_format, cpu):
            mesh = vertices(model.density_grid(codes[network], resolution)[0])
        return float((cKDTree(mesh).query(reference)[0].mean() + cKDTree(reference).query(mesh)[0].mean()) / 2)

    scale = float(codes["fp32"].abs().max())
    print(json.dumps({
        "bench": "triposr_precision_cpu", "config": "official", "resolution": resolution, "level": round(level, 4),
        "faces_fp32": int(marching_cubes(exact - level)[1].shape[0]),
        "scene_code_error": {k: float((codes[k] - codes["fp32"]).abs().max()) / scale for k in ("tf32", "bf16")},
        "chamfer_to_fp32": {
            "tf32 network, fp32 grid (emulated)": chamfer("tf32", "fp32"),
            "mixed: tf32 network (emulated), bf16 grid": chamfer("tf32", "bf16"),
            "fp32 network, bf16 grid": chamfer("fp32", "bf16"),
            "bf16 network, fp32 grid": chamfer("bf16", "fp32"),
            "bf16": chamfer("bf16", "bf16"),
        },
    }))


if __name__ == "__main__":
    main()
