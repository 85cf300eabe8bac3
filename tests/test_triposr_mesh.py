"""Marching cubes, both of them (ours in torch, for GPUs; scikit-image's on a CPU): the same vertices and polygons,
topology and winding; the GLB delivery frame; the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree
from skimage import measure

from runners.triposr.mesh import (case_table, marching_cubes, marching_cubes_skimage, marching_cubes_skimage_slabs,
                                  marching_cubes_torch, to_delivery_glb)

DATA = Path(__file__).parent / "data" / "triposr-tiny"
ROOT = Path(__file__).parent.parent


def fixture_field() -> np.ndarray:
    ref = np.load(DATA / "mesh32.npz")
    return np.load(DATA / "density_grid32.npy") - np.float32(ref["threshold"])


IMPLEMENTATIONS = pytest.mark.parametrize("mc", [marching_cubes_torch, marching_cubes_skimage, marching_cubes_skimage_slabs],
                                          ids=["torch", "skimage", "skimage-slabs"])


def test_same_vertices_as_skimage_lorensen() -> None:
    field = fixture_field()
    verts, faces = marching_cubes_torch(torch.from_numpy(field))
    sk_verts, sk_faces, _, _ = measure.marching_cubes(field, 0.0, method="lorensen")
    assert len(verts) == len(sk_verts) and len(faces) == len(sk_faces)
    dist, idx = cKDTree(sk_verts).query(verts.numpy())
    assert dist.max() < 1e-4 and len(set(idx.tolist())) == len(verts)


def edge_direction(verts: np.ndarray, field: np.ndarray) -> np.ndarray:
    """For each vertex (on one grid edge): the unit vector along that edge from low to high field value."""
    frac = verts - np.floor(verts)
    axis = np.argmax(frac, axis=1)  # the one non-integer coordinate (a vertex exactly on a grid point is rare)
    lo = np.floor(verts).astype(int)
    hi = lo.copy()
    hi[np.arange(len(lo)), axis] += 1
    hi = np.minimum(hi, np.array(field.shape) - 1)
    sign = np.sign(field[tuple(hi.T)] - field[tuple(lo.T)])
    out = np.zeros_like(verts)
    out[np.arange(len(lo)), axis] = sign
    return out


@IMPLEMENTATIONS
def test_winding_points_toward_lower_values(mc) -> None:
    field = fixture_field()
    verts, faces = (t.numpy() for t in mc(torch.from_numpy(field)))
    tri = verts[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    up = edge_direction(verts, field)[faces]  # [F, 3, 3]
    votes = (np.einsum("fj,fkj->fk", normal, up) < 0).sum(axis=1)
    assert (votes >= 2).all()


@IMPLEMENTATIONS
def test_surface_is_closed_away_from_the_grid_boundary(mc) -> None:
    field = fixture_field()
    verts, faces = (t.numpy() for t in mc(torch.from_numpy(field)))
    edges = Counter(tuple(sorted((int(f[k]), int(f[(k + 1) % 3])))) for f in faces for k in range(3))
    r = field.shape[0] - 1
    for (a, b), n in edges.items():
        on_border = any(np.isin(verts[[a, b], d], (0, r)).all() for d in range(3))
        assert n == 2 or on_border, (a, b, n)


@IMPLEMENTATIONS
def test_sphere_on_a_coarse_grid(mc) -> None:
    # A field with a known surface: the sphere |p| = 0.6 (field = 0.6 - |p|: positive inside).
    g = torch.linspace(-1, 1, 24, dtype=torch.float64)
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    field = 0.6 - torch.sqrt(x**2 + y**2 + z**2)
    verts, faces = mc(field)
    assert verts.dtype == field.dtype and faces.dtype == torch.int64
    pts = verts / 23 * 2 - 1
    assert torch.allclose(pts.norm(dim=1), torch.full((len(pts),), 0.6, dtype=torch.float64), atol=0.01)
    mesh = trimesh.Trimesh(pts.numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and mesh.volume > 0  # closed, wound outward
    assert abs(mesh.volume - 4 / 3 * np.pi * 0.6**3) < 0.02


def polygon_outlines(grid_vertices: np.ndarray, faces: np.ndarray) -> set[tuple]:
    """Directed triangle edges not shared inside their cell: each cell's polygon outlines, with direction."""
    cells = np.floor(grid_vertices[faces].mean(axis=1)).astype(int)
    count = Counter((tuple(c), int(f[k]), int(f[(k + 1) % 3])) for c, f in zip(cells, faces) for k in range(3))
    return {e for e in count if (e[0], e[2], e[1]) not in count}


def test_the_cpu_and_gpu_implementations_give_the_same_mesh() -> None:
    """On a noisy field (thousands of cells, ambiguous faces among them): the same vertices one to one and the same
    polygon, with the same winding, in every cell; only the triangulation of a polygon may differ."""
    gen = torch.Generator().manual_seed(3)
    field = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 44, 44, 44, generator=gen), 5, 1)[0, 0]
    vt, ft = (t.numpy() for t in marching_cubes_torch(field))
    vs, fs = (t.numpy() for t in marching_cubes_skimage(field))
    assert len(vt) > 5000 and len(vs) == len(vt) and len(fs) == len(ft)
    dist, idx = cKDTree(vt).query(vs)
    assert dist.max() < 1e-4 and len(set(idx.tolist())) == len(vs)
    assert polygon_outlines(vt, idx[fs]) == polygon_outlines(vt, ft)


@pytest.mark.parametrize("device, expected", [("cpu", "skimage-slabs"), ("meta", "torch")])
def test_marching_cubes_dispatches_by_device(device: str, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from runners.triposr import mesh

    calls = []
    monkeypatch.setattr(mesh, "marching_cubes_skimage_slabs", lambda f, level: calls.append("skimage-slabs"))
    monkeypatch.setattr(mesh, "marching_cubes_torch", lambda f, level: calls.append("torch"))
    mesh.marching_cubes(torch.zeros(4, 4, 4, device=device), 0.5)
    assert calls == [expected]


@pytest.mark.parametrize("slices", [1, 2, 5])
def test_slabs_weld_into_the_whole_field_mesh(slices: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A noisy field in slabs of a few slices: the whole-field call's vertices one to one (the later slabs' differ
    in the last bits: local coordinates plus an offset), its triangles, no vertex twice; and no scikit-image call
    sees more than a slab (+ the shared slice), so none holds the GIL for longer than a slab takes."""
    from runners.triposr import mesh

    gen = torch.Generator().manual_seed(3)
    field = torch.nn.functional.avg_pool3d(torch.randn(1, 1, 44, 36, 40, generator=gen), 5, 1)[0, 0]
    seen: list[tuple[int, ...]] = []
    calls = mesh._skimage_arrays
    monkeypatch.setattr(mesh, "_skimage_arrays", lambda values, level: seen.append(values.shape) or calls(values, level))
    vs, fs = (t.numpy() for t in marching_cubes_skimage_slabs(field, 0.0, slab_voxels=slices * 32 * 36))
    assert len(seen) == -(-39 // slices) and all(shape[0] <= slices + 1 for shape in seen)
    vw, fw = (t.numpy() for t in marching_cubes_skimage(field))
    assert len(vs) == len(vw) > 3000 and len(fs) == len(fw)
    dist, idx = cKDTree(vw).query(vs)
    assert dist.max() < 1e-4 and len(set(idx.tolist())) == len(vs)
    triangles = lambda faces: {tuple(np.roll(t, -int(np.argmin(t)))) for t in faces.tolist()}  # noqa: E731
    assert triangles(idx[fs]) == triangles(fw)


@IMPLEMENTATIONS
@pytest.mark.parametrize("value", [-1.0, 1.0])
def test_a_field_that_does_not_cross_the_level_has_no_surface(mc, value: float) -> None:
    verts, faces = mc(torch.full((5, 5, 5), value))
    assert verts.shape == (0, 3) and faces.shape == (0, 3)


def test_case_table_is_complete() -> None:
    table, counts = case_table()
    assert counts[0] == counts[255] == 0 and (counts[1:255] > 0).all()
    assert counts[1] == 1 and counts[0b00001111] == 2  # one corner: a triangle; a face's 4 corners: a quad


def asymmetric_mesh() -> trimesh.Trimesh:
    """A box twice as tall along model +z as wide, with a bump on model +x; red on the bump."""
    body = trimesh.creation.box(extents=(0.2, 0.2, 0.4))
    bump = trimesh.creation.box(extents=(0.1, 0.05, 0.05))
    bump.apply_translation((0.15, 0.0, 0.05))
    mesh = trimesh.util.concatenate([body, bump])
    colors = np.tile([0.5, 0.5, 0.5], (len(mesh.vertices), 1))
    colors[len(body.vertices):] = [1.0, 0.0, 0.0]
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=colors)
    return mesh


def test_glb_delivery_frame() -> None:
    glb = to_delivery_glb(asymmetric_mesh(), size_m=0.5)
    assert glb[:4] == b"glTF"
    scene = trimesh.load(trimesh.util.wrap_as_stream(glb), file_type="glb")
    mesh = scene.to_geometry() if hasattr(scene, "to_geometry") else scene.dump(concatenate=True)
    v = np.asarray(mesh.vertices)
    ext = v.max(axis=0) - v.min(axis=0)
    assert np.isclose(ext.max(), 0.5) and np.isclose(ext[1], 0.5)  # the height (model z) is along +Y
    assert np.isclose(v[:, 1].min(), 0.0)  # resting on y = 0
    assert np.isclose(v[:, 0].min(), -v[:, 0].max()) and np.isclose(v[:, 2].min(), -v[:, 2].max())
    red = np.asarray(mesh.visual.vertex_colors)[:, :3].astype(int)
    bump = v[(red[:, 0] == 255) & (red[:, 1] == 0)]
    # The bump (model +x, the side the camera sees) sticks out toward +Z: its far face is the mesh's +Z end.
    assert len(bump) and bump[:, 2].mean() > 0 and np.isclose(bump[:, 2].max(), v[:, 2].max())
    assert mesh.volume > 0  # a rotation, no mirror: still wound outward
    assert b"COLOR_0" in glb


def test_glb_refuses_an_empty_mesh() -> None:
    with pytest.raises(ValueError, match="empty"):
        to_delivery_glb(trimesh.Trimesh())


def test_cli_init_random_then_reconstruct(tmp_path: Path) -> None:
    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "runners.triposr", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    cli("init-random", str(tmp_path / "model"), "--config", "tiny", "--seed", "1")
    assert (tmp_path / "model" / "vit" / "config.json").is_file()
    image = tmp_path / "in.png"
    Image.open(DATA / "img_b.png").save(image)
    # Random weights: density is small everywhere, so a low threshold gives a surface.
    cli("reconstruct", str(image), "-o", str(tmp_path / "out.glb"), "--model", str(tmp_path / "model"),
        "--resolution", "24", "--threshold", "0.5", "--device", "cpu")
    mesh = trimesh.load(tmp_path / "out.glb", force="mesh")
    assert len(mesh.faces) > 0 and np.isclose(mesh.bounds[0][1], 0.0)


def test_cli_reports_a_bad_model_folder(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "runners.triposr", "reconstruct", str(DATA / "img_a.png"), "-o",
                          str(tmp_path / "x.glb"), "--model", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "config.yaml: file not found" in out.stderr
