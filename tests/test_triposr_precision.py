"""TRIPOSR_PRECISION (runners/triposr/precision.py): fp32 keeps the original's numbers; mixed and bf16 move the
mesh by a fraction of a grid cell.

Here bf16 runs under CPU autocast and TF32 does not exist (mixed runs its network in float32); on a GPU the model
bench measures the meshes of each mode against fp32.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from scipy.spatial import cKDTree

from pipeline.settings import Settings
from runners.triposr import TripoSR, load_model
from runners.triposr.inference import reconstruct_encoded
from runners.triposr.mesh import extract_meshes, grid_points
from runners.triposr.precision import Precision, cpu_bf16, number_format, resolve

DATA = Path(__file__).parent / "data" / "triposr-tiny"


@pytest.fixture(scope="module")
def model() -> TripoSR:
    return load_model(DATA)


def test_auto_is_fp32_on_the_cpu_and_mixed_on_a_gpu() -> None:
    assert resolve("auto", torch.device("cpu")) == resolve("fp32", torch.device("cpu")) == Precision("fp32", "fp32")
    assert resolve("auto", torch.device("cuda")) == Precision("tf32", "bf16")
    assert resolve("bf16", torch.device("cuda")) == Precision("bf16", "bf16")
    with pytest.raises(ValueError, match="fp16"):
        resolve("fp16", torch.device("cpu"))


def test_on_a_cpu_bf16_runs_only_where_the_cpu_multiplies_it(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    # With native bf16 products: bf16 as on a GPU; mixed's network in float32 (TF32 exists on GPUs only).
    assert resolve("bf16", cpu, native_bf16=True) == Precision("bf16", "bf16")
    assert resolve("mixed", cpu, native_bf16=True) == Precision("fp32", "bf16")
    # Without: fp32, said once in the log.
    with caplog.at_level("WARNING", logger="grok3d.triposr"):
        for mode in ("bf16", "mixed", "bf16"):
            assert resolve(mode, cpu, native_bf16=False) == Precision("fp32", "fp32")
    said = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert len(said) <= 2 and all("running fp32" in m for m in said)  # once per mode and process
    # Not given: detected.
    assert resolve("bf16", cpu) == resolve("bf16", cpu, native_bf16=cpu_bf16() is not None)


@pytest.mark.parametrize(("probes", "flags", "want"), [
    ((True, False), set(), "amx_bf16"),
    ((False, True), set(), "avx512_bf16"),
    ((False, False), {"avx512f", "avx512_bf16"}, "avx512_bf16"),
    ((False, False), {"avx512f", "amx_tile", "amx_bf16"}, "amx_bf16"),
    ((False, False), {"avx512f", "avx512_vnni"}, None),  # this project's CI machine: a hypervisor hides both
])
def test_bf16_support_is_detected_not_assumed(monkeypatch: pytest.MonkeyPatch, probes, flags, want) -> None:
    from runners.triposr import cpu

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: probes[0], raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probes[1], raising=False)
    monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: flags)
    cpu.bf16_support.cache_clear()
    try:
        assert cpu.bf16_support() == want
    finally:
        cpu.bf16_support.cache_clear()


def test_number_formats_set_and_put_back_the_tf32_flags() -> None:
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with number_format("tf32", torch.device("cpu")):
        assert flags() == (True, True)
    with number_format("fp32", torch.device("cpu")):
        assert flags() == (False, False)  # strict: cuDNN's default TF32 convolutions too
    assert flags() == before
    with number_format("bf16", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_tf32_flags_are_shared_by_blocks_of_one_kind_and_refused_to_another() -> None:
    import threading

    cpu = torch.device("cpu")
    before = torch.backends.cuda.matmul.allow_tf32
    inside, release = threading.Event(), threading.Event()

    def other_thread() -> None:
        with number_format("tf32", cpu):
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=other_thread)
    worker.start()
    assert inside.wait(10)
    with number_format("tf32", cpu):  # the same kind alongside: fine
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32  # still set: the other thread's block has not ended
    with pytest.raises(RuntimeError, match="process-wide"):
        with number_format("fp32", cpu):
            pass
    release.set()
    worker.join()
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_the_setting_accepts_only_known_precisions(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().triposr_precision == "auto"
    monkeypatch.setenv("TRIPOSR_PRECISION", "mixed")
    assert Settings().triposr_precision == "mixed"
    monkeypatch.setenv("TRIPOSR_PRECISION", "fp16")
    with pytest.raises(ValidationError, match="TRIPOSR_PRECISION"):
        Settings()
    monkeypatch.setenv("TRIPOSR_PRECISION", "auto")
    monkeypatch.setenv("TRIPOSR_MC_RESOLUTION", "2048")  # the fused kernel's int32 indices stop at 1024^3
    with pytest.raises(ValidationError, match="TRIPOSR_MC_RESOLUTION"):
        Settings()


def test_bf16_keeps_points_and_density_in_float32(model: TripoSR) -> None:
    codes = torch.from_numpy(np.load(DATA / "scene_codes_b1.npy"))
    points = torch.from_numpy(np.load(DATA / "points.npy"))[None]
    exact, _ = model.query(codes, points)
    with number_format("bf16", model.device):
        density, rgb = model.query(codes.bfloat16(), points)
        grid = model.density_grid(codes.bfloat16(), 16)
    assert density.dtype == rgb.dtype == grid.dtype == torch.float32
    # Sampled at float32 points, only the decoder's products are rounded: a few per cent at most.
    assert float(((density - exact).abs() / exact).max()) < 0.05
    full, _ = model.query(codes, grid_points(16, model.cfg.radius)[None])
    assert float(((grid.flatten() - full.flatten()).abs() / full.flatten()).max()) < 0.05


@pytest.mark.parametrize("mode", ["mixed", "bf16"])
def test_the_mesh_moves_by_a_fraction_of_a_cell(model: TripoSR, mode: str) -> None:
    picture = Image.open(DATA / "img_a.png").convert("RGB")
    threshold = float(np.load(DATA / "mesh32.npz")["threshold"])
    meshes = {}
    for precision in ("fp32", mode):
        plan = resolve(precision, model.device, native_bf16=True)  # bf16's numbers, on any CPU
        with number_format(plan.network, model.device):
            codes = model([picture])
        with number_format(plan.grid, model.device):
            meshes[precision] = extract_meshes(model, codes, resolution=32, threshold=threshold)[0]
    a, b = np.asarray(meshes["fp32"].vertices), np.asarray(meshes[mode].vertices)
    assert len(b) > 0.9 * len(a)
    chamfer = (cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean()) / 2
    cell = 2 * model.cfg.radius / 31
    assert 0 < chamfer < 0.1 * cell, chamfer


def service_glbs() -> dict[str, bytes]:
    from runners.triposr.loading import random_model

    model = random_model("tiny", seed=0)
    pixels = np.full((64, 64, 3), 128, np.uint8)
    pixels[12:50, 16:44] = (200, 60, 90)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    knobs = {"resolution": 24, "threshold": 0.5, "size_m": 0.5}
    glbs = {mode: reconstruct_encoded(model, [buf.getvalue()], precision=mode, **knobs)[0]
            for mode in ("auto", "fp32", "mixed", "bf16")}
    assert all(glb[:4] == b"glTF" for glb in glbs.values())
    return glbs


def test_the_service_path_runs_in_every_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    from runners.triposr import cpu

    monkeypatch.setattr(cpu, "bf16_support", lambda: "amx_bf16")  # as on a CPU with AMX (here PyTorch emulates it)
    glbs = service_glbs()
    assert glbs["auto"] == glbs["fp32"] != glbs["mixed"] != glbs["bf16"]  # auto is fp32 on a CPU


def test_without_native_bf16_every_mode_gives_the_fp32_mesh(monkeypatch: pytest.MonkeyPatch) -> None:
    from runners.triposr import cpu

    monkeypatch.setattr(cpu, "bf16_support", lambda: None)
    glbs = service_glbs()
    assert glbs["auto"] == glbs["fp32"] == glbs["mixed"] == glbs["bf16"]
