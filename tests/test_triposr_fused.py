"""The fused density-grid kernel (runners/triposr/fused.py), run on the CPU by Triton's interpreter.

The interpreter checks the kernel's indexing, layer order and masking. It cannot multiply bf16 (the kernel then
rounds to bf16 and multiplies in float32, the same products), so the real bf16 tensor-core path is checked on a GPU:
by tests/test_triposr_cuda.py, and by the kernel's own check when a model first builds a grid there.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from runners.triposr import TripoSR, load_model
from runners.triposr.mesh import marching_cubes
from runners.triposr.precision import number_format

pytest.importorskip("triton")
DATA = Path(__file__).parent / "data" / "triposr-tiny"
CPU = torch.device("cpu")


@pytest.fixture
def fused(monkeypatch: pytest.MonkeyPatch):
    """runners.triposr.fused re-imported under TRITON_INTERPRET=1 (the decorator reads it), then restored."""
    from runners.triposr import fused as module

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield importlib.reload(module)
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(module)


@pytest.fixture(scope="module")
def model() -> TripoSR:
    return load_model(DATA)


def codes() -> torch.Tensor:
    return torch.from_numpy(np.load(DATA / "scene_codes_b2.npy"))


def log_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.log() - b.log()).abs().max())


def test_the_kernel_computes_the_grid_of_the_fixture(fused, model: TripoSR, monkeypatch) -> None:
    exact = model.density_grid(codes(), 16)  # float32 PyTorch: within 1e-5 of the original (test_triposr_fidelity)
    calls = []
    kernel = fused.density
    monkeypatch.setattr(fused, "density", lambda *a: calls.append(1) or kernel(*a))
    with number_format("bf16", CPU):
        grid = model.density_grid(codes(), 16)
    assert len(calls) == 2 and fused.state(CPU) == "on"  # its check on first use, then this grid
    assert grid.shape == (2, 16, 16, 16) and grid.dtype == torch.float32
    assert log_error(grid, exact) < 0.02  # bf16 products with float32 sums
    # And its mesh is the float32 mesh to a small fraction of a cell.
    level = float(exact.flatten().quantile(0.9))
    for b in range(2):
        va, _ = marching_cubes(exact[b] - level)
        vb, _ = marching_cubes(grid[b] - level)
        assert abs(len(va) - len(vb)) <= 0.02 * len(va)
        assert cKDTree(vb.numpy()).query(va.numpy())[0].mean() < 0.02  # grid-index units


def test_the_kernel_is_closer_to_float32_than_pytorch_bf16(fused, model: TripoSR, monkeypatch) -> None:
    exact = model.density_grid(codes(), 12)
    with number_format("bf16", CPU):
        kernel = model.density_grid(codes(), 12)
        monkeypatch.setattr(fused, "_disabled", "off for this comparison")
        autocast = model.density_grid(codes(), 12)
    assert log_error(kernel, exact) < log_error(autocast, exact)


def test_float32_never_uses_the_kernel(fused, model: TripoSR, monkeypatch) -> None:
    monkeypatch.setattr(fused, "density", lambda *a: pytest.fail("the fp32 grid must stay on PyTorch"))
    for kind in ("fp32", "tf32"):
        with number_format(kind, CPU):
            model.density_grid(codes(), 8)


def test_a_kernel_that_fails_to_compile_turns_itself_off(fused, model: TripoSR, monkeypatch, caplog) -> None:
    class Broken:
        def __getitem__(self, grid):
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(fused, "_density_kernel", Broken())
    with caplog.at_level(logging.WARNING, logger="grok3d.triposr"), number_format("bf16", CPU):
        grid = model.density_grid(codes(), 12)
    assert "PassManager::run failed" in fused.state(CPU) and "PyTorch path instead" in caplog.text
    with number_format("bf16", CPU):
        model_grid_on_pytorch = model.density_grid(codes(), 12)
    assert torch.equal(grid, model_grid_on_pytorch)


def test_a_kernel_with_wrong_numbers_turns_itself_off(fused, model: TripoSR, monkeypatch) -> None:
    kernel = fused.density
    monkeypatch.setattr(fused, "density", lambda *a: kernel(*a) * 1.5)
    with number_format("bf16", CPU):
        model.density_grid(codes(), 8)
    assert fused.state(CPU).startswith("off: its densities differ from PyTorch's")


def test_a_wider_deeper_decoder_on_an_odd_grid_of_three_scenes(fused) -> None:
    """Layer offsets and order (three hidden layers, width 32), per-scene offsets and a last, partial block."""
    from runners.triposr.model import NeRFMLP

    torch.manual_seed(0)
    decoder = NeRFMLP(24, 32, 4, "silu")
    xy, xz, yz = (torch.randn(3, 9, 9, 32) for _ in range(3))
    with torch.no_grad():
        got = fused.density(xy, xz, yz, decoder, 0.5)
        want = torch.exp(decoder.layers[1:](xy[:, :, :, None] + xz[:, :, None] + yz[:, None])[..., 0] + 0.5)
        shuffled = fused.density(xy, xz, yz.transpose(1, 2).contiguous(), decoder, 0.5)  # y, z swapped in a plane
    error = float((got.log() - want.log()).abs().max())
    assert got.shape == (3, 9, 9, 9) and error < 0.02 * max(1.0, float(want.log().abs().max()))
    assert float((shuffled.log() - want.log()).abs().max()) > 10 * error  # the bound above tells them apart


def test_a_decoder_too_narrow_for_the_kernel_is_not_offered_it(fused) -> None:
    narrow = torch.nn.Module()
    narrow.layers = torch.nn.Sequential(torch.nn.Linear(24, 12))
    assert not fused.usable(narrow, CPU)
    assert fused.state(CPU) == "on"  # not broken: just not for this model
