"""Our TripoSR against what the original code computed on the tiny fixture model (tests/data/triposr-tiny)."""

from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from runners.triposr import TripoSR, load_model
from runners.triposr.loading import config_for, random_state_dict, read_checkpoint
from runners.triposr.mesh import extract_meshes, grid_points

DATA = Path(__file__).parent / "data" / "triposr-tiny"


@pytest.fixture(scope="module")
def model() -> TripoSR:
    torch.set_num_threads(1)
    return load_model(DATA)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.open(DATA / "img_a.png").convert("RGB"), Image.open(DATA / "img_b.png").convert("RGB")]


def expected(name: str) -> np.ndarray:
    return np.load(DATA / name)


def max_abs(a: torch.Tensor | np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - b).max())


def test_scene_codes_batch_1_and_2(model: TripoSR, images: list[Image.Image]) -> None:
    b1, b2 = model(images[:1]), model(images)
    assert b1.shape == (1, 3, 8, 8, 8) and b2.shape == (2, 3, 8, 8, 8)
    assert not b1.requires_grad
    assert max_abs(b1, expected("scene_codes_b1.npy")) < 1e-4
    assert max_abs(b2, expected("scene_codes_b2.npy")) < 1e-4


def test_intermediates(model: TripoSR, images: list[Image.Image]) -> None:
    ref = np.load(DATA / "intermediates_b2.npz")
    rgb = model.preprocess(images)
    assert max_abs(rgb, ref["rgb_cond"]) < 1e-6
    pos = model.image_tokenizer.model.embeddings.interpolated_position_embeddings(64, 64)
    assert max_abs(pos.detach(), ref["pos_embed"]) < 1e-6
    with torch.no_grad():
        stages = model.encode(rgb)
    for name in ("image_tokens", "backbone_out", "triplanes"):
        assert max_abs(stages[name], ref[name]) < 5e-5, name


def test_the_cpu_forward_in_blocks_is_the_same(model: TripoSR, images: list[Image.Image],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU the forward pass runs GEGLU in blocks of rows, the ViT's attention a few heads at a time and the
    pictures one by one, to keep its temporaries small: tiny blocks (one head, 4 rows) give the same codes."""
    from runners.triposr import cpu
    from runners.triposr import model as network

    whole = model(images)
    monkeypatch.setattr(network, "CPU_BLOCK_BYTES", 4096)
    blocked = model(images)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-5)  # rows of 4 take other BLAS kernels: rounding
    assert max_abs(blocked, expected("scene_codes_b2.npy")) < 1e-4
    assert cpu.keep_freed_memory() == (platform.libc_ver()[0] == "glibc")


def expected_codes() -> torch.Tensor:
    """Row 0 from scene_codes_b1[0] (img_a), row 1 from scene_codes_b2[1] (img_b), as the query fixtures."""
    return torch.stack([torch.from_numpy(expected("scene_codes_b1.npy"))[0],
                        torch.from_numpy(expected("scene_codes_b2.npy"))[1]])


@pytest.mark.parametrize("chunk_size", [0, 100])
def test_query_from_expected_codes(model: TripoSR, chunk_size: int) -> None:
    points = torch.from_numpy(expected("points.npy"))
    density, rgb = model.query(expected_codes(), points[None].expand(2, -1, -1), chunk_size=chunk_size)
    assert density.shape == (2, 512) and rgb.shape == (2, 512, 3)
    assert max_abs(density, expected("query_density.npy")) < 1e-5
    assert max_abs(rgb, expected("query_rgb.npy")) < 1e-5


def test_density_grid_matches_the_original_and_query(model: TripoSR) -> None:
    codes = expected_codes()
    grid = model.density_grid(codes, 32)
    assert grid.shape == (2, 32, 32, 32)
    assert max_abs(grid[0], expected("density_grid32.npy")) < 1e-5
    # The factorised grid is query() at the grid points, for every scene of the batch, in any chunking.
    density, _ = model.query(codes, grid_points(32, model.cfg.radius)[None].expand(2, -1, -1))
    torch.testing.assert_close(grid, density.view(2, 32, 32, 32), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.density_grid(codes, 32, chunk_size=1), grid, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(model.density_grid(codes[1:], 32), grid[1:], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 100, 32 * 32 * 3, 2**21])
def test_the_cpu_grid_is_the_same_in_any_chunking(model: TripoSR, chunk_size: int, threads: int) -> None:
    """cpu.density walks the grid in chunks of whole rows (part of an x-slice) or of whole x-slices; 100 points
    leave a partial last chunk in every slice, 3 slices a partial last block of slices. With several threads each
    takes every T-th chunk; the thread setting is put back afterwards."""
    codes = expected_codes()
    want = model.density_grid(codes, 32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = model.density_grid(codes, 32, chunk_size=chunk_size)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def canon(faces: np.ndarray) -> set[tuple[int, ...]]:
    """Faces up to rotation of their vertex order (the winding is kept)."""
    return {tuple(np.roll(f, -int(np.argmin(f)))) for f in faces}


def polygon_edges(grid_vertices: np.ndarray, faces: np.ndarray) -> set[tuple]:
    """Directed triangle edges that are not shared inside their cell: the cells' polygon outlines."""
    cells = np.floor(grid_vertices[faces].mean(axis=1)).astype(int)
    count = Counter((tuple(c), int(f[k]), int(f[(k + 1) % 3])) for c, f in zip(cells, faces) for k in range(3))
    return {e for e in count if (e[0], e[2], e[1]) not in count}


def test_mesh_matches_original(model: TripoSR) -> None:
    ref = np.load(DATA / "mesh32.npz")
    codes = torch.from_numpy(expected("scene_codes_b1.npy"))
    mesh = extract_meshes(model, codes, resolution=32, threshold=float(ref["threshold"]))[0]
    verts, faces = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    dist, idx = cKDTree(ref["vertices"]).query(verts)
    assert len(verts) == len(ref["vertices"]) and dist.max() < 1e-4
    assert len(set(idx.tolist())) == len(verts)  # a one-to-one vertex match
    assert len(faces) == len(ref["faces"])
    # Same winding everywhere: no face of ours appears reversed in the reference.
    mine = idx[faces]
    assert not canon(mine[:, ::-1]) & canon(ref["faces"])
    # Our case table is generated, not copied: the polygon inside each cell (its outline, with direction) is the
    # same as the original's; only the diagonals that split a polygon into triangles may differ.
    grid = (ref["vertices"].astype(np.float64) + 0.87) / 1.74 * 31
    assert polygon_edges(grid, mine) == polygon_edges(grid, ref["faces"])
    assert len(canon(mine) & canon(ref["faces"])) > 0.5 * len(faces)
    # Colours: the float colour at our vertices, and what trimesh stores.
    _, rgb = model.query(codes, torch.from_numpy(verts).float()[None])
    assert max_abs(rgb[0], ref["colors"][idx]) < 1e-4
    assert np.abs(mesh.visual.vertex_colors.astype(int) - ref["colors_u8"][idx].astype(int)).max() <= 1


def test_one_changed_weight_is_caught(images: list[Image.Image]) -> None:
    model = load_model(DATA)
    with torch.no_grad():
        model.backbone.proj_out.weight.view(-1)[0] += 0.001  # the smallest change in the fixture's sensitivity table
    assert max_abs(model(images[:1]), expected("scene_codes_b1.npy")) > 1e-4


def test_random_weight_rule_reproduces_the_fixture_checkpoint() -> None:
    # The fixture's model.ckpt was made with seed 7 by the same rule our init-random uses.
    ours = random_state_dict(config_for("tiny"), seed=7)
    theirs = read_checkpoint(DATA / "model.ckpt")
    assert list(ours) == sorted(theirs, key=list(ours).index) and set(ours) == set(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key
