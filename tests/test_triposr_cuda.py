"""TripoSR on a GPU against the same code on the CPU: skipped where there is no CUDA device (CI, this project's
development machines); run on a GPU machine with `python -m pytest tests/test_triposr_cuda.py`.

What only a GPU can show: marching cubes and the density grid give the CPU's mesh, the fused kernel's real bf16
tensor-core products pass their check, and the service path runs end to end in every precision.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from runners.triposr import TripoSR, load_model
from runners.triposr.inference import reconstruct_batch
from runners.triposr.loading import random_model
from runners.triposr.mesh import marching_cubes, marching_cubes_torch
from runners.triposr.precision import number_format

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DATA = Path(__file__).parent / "data" / "triposr-tiny"
GPU = torch.device("cuda")


@pytest.fixture(scope="module")
def models() -> tuple[TripoSR, TripoSR]:
    return load_model(DATA, device="cpu"), load_model(DATA, device="cuda")


def codes() -> torch.Tensor:
    return torch.from_numpy(np.load(DATA / "scene_codes_b2.npy"))


def test_marching_cubes_on_cuda_is_the_torch_mesh_on_the_cpu() -> None:
    ref = np.load(DATA / "mesh32.npz")
    field = torch.from_numpy(np.load(DATA / "density_grid32.npy") - np.float32(ref["threshold"]))
    gen = torch.Generator().manual_seed(0)
    noisy = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 100, 100, 100, generator=gen), 5, 1)[0, 0]
    for f in (field, noisy):
        v_cpu, f_cpu = marching_cubes_torch(f)  # the same algorithm; the CPU's default is scikit-image's
        v_gpu, f_gpu = marching_cubes(f.cuda())
        assert v_gpu.is_cuda and f_gpu.is_cuda
        assert torch.allclose(v_gpu.cpu(), v_cpu, atol=1e-5)
        assert torch.equal(f_gpu.cpu(), f_cpu)


def test_float32_grid_on_cuda_is_the_cpu_grid(models) -> None:
    cpu, gpu = models
    with number_format("fp32", GPU):
        grid = gpu.density_grid(codes().cuda(), 32).cpu()
    torch.testing.assert_close(grid, cpu.density_grid(codes(), 32), rtol=1e-4, atol=1e-5)


def test_the_fused_kernel_passes_its_check_and_matches_float32(models, monkeypatch) -> None:
    from runners.triposr import fused

    cpu, gpu = models
    official = random_model("official", seed=0, device="cuda")
    assert fused.usable(official.decoder, GPU), fused.state(GPU)  # its real bf16 products, compiled for this GPU
    calls = []
    kernel = fused.density
    monkeypatch.setattr(fused, "density", lambda *a: calls.append(1) or kernel(*a))
    exact = cpu.density_grid(codes(), 32)
    with number_format("bf16", GPU):
        grid = gpu.density_grid(codes().cuda(), 33).cpu()  # 33: a partial last block
    assert calls == [1], "the grid did not take the kernel"
    want = cpu.density_grid(codes(), 33)
    assert float((grid.log() - want.log()).abs().max()) < 0.02
    assert exact.shape == (2, 32, 32, 32)


@pytest.mark.parametrize("mode", ["fp32", "mixed", "bf16"])
def test_the_service_path_on_cuda_gives_the_cpu_mesh(models, mode: str) -> None:
    cpu, gpu = models
    picture = Image.open(DATA / "img_a.png").convert("RGB")
    knobs = {"resolution": 32, "threshold": float(np.load(DATA / "mesh32.npz")["threshold"]), "size_m": 0.5}

    def vertices(glb: bytes) -> np.ndarray:
        return np.asarray(trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh").vertices)

    [want] = reconstruct_batch(cpu, [picture], precision="fp32", **knobs)
    [got] = reconstruct_batch(gpu, [picture], precision=mode, **knobs)
    a, b = vertices(want), vertices(got)
    chamfer = (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()) / 2
    assert chamfer < (1e-5 if mode == "fp32" else 5e-3), chamfer  # metres, on a 0.5 m model
