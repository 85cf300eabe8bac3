"""Meshes shaped like TripoSR's output: a marching-cubes surface of a smooth field with vertex colours.

The field is a sum of Gaussian blobs placed off-centre on every axis, so that a mirrored or rotated export moves
the centroid away from where it should be and the placement checks notice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh
from skimage.measure import marching_cubes

BLOBS = np.array([[0.0, 0.0, 0.0, 0.55], [0.35, 0.25, 0.1, 0.35], [-0.2, -0.3, 0.3, 0.3]])


def _field(resolution: int) -> tuple[np.ndarray, float]:
    axis = np.linspace(-1.0, 1.0, resolution)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    field = np.zeros_like(x)
    for cx, cy, cz, r in BLOBS:
        field += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (r * r))
    return field, float(axis[1] - axis[0])


def colours_at(points: np.ndarray) -> np.ndarray:
    """A smooth RGB field (uint8) over space: what TripoSR's colour decoder looks like to the baker."""
    p = points / max(float(np.abs(points).max()), 1e-9)
    rgb = np.stack(
        [0.5 + 0.45 * np.sin(2.0 * p[:, 0] + 0.5), 0.5 + 0.45 * np.cos(1.7 * p[:, 1]), 0.5 + 0.45 * np.sin(1.3 * p[:, 2] - 0.4)],
        axis=1,
    )
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def blob_mesh(resolution: int) -> trimesh.Trimesh:
    """A vertex-coloured marching-cubes mesh in API.md's delivery frame (Y up, on y=0, centred in x,z, 0.5 m)."""
    field, step = _field(resolution)
    verts, faces, _normals, _values = marching_cubes(field, level=0.5, spacing=(step, step, step))
    verts = verts - 1.0
    mesh = trimesh.Trimesh(verts, faces, process=False)
    lo, hi = mesh.bounds
    scale = 0.5 / float((hi - lo).max())
    verts = (verts - [(lo[0] + hi[0]) / 2, lo[1], (lo[2] + hi[2]) / 2]) * scale
    rgba = np.concatenate([colours_at(verts), np.full((len(verts), 1), 255, np.uint8)], axis=1)
    return trimesh.Trimesh(verts, faces, vertex_colors=rgba, process=False)


def write_glb(mesh: trimesh.Trimesh, path: Path) -> Path:
    path.write_bytes(mesh.export(file_type="glb"))
    return path


def read_glb(path: Path) -> trimesh.Trimesh:
    """The GLB as one mesh, exactly as stored (no merging), with its vertex colours."""
    scene = trimesh.load(str(path), file_type="glb", process=False, force="scene")
    return trimesh.util.concatenate([g for g in scene.dump()])
