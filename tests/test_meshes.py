"""pipeline/meshes.py's loading: the numbers trimesh gives a client (`trimesh.load(f, force="mesh")`), without
its copies for a GLB of one mesh."""

from __future__ import annotations

import io

import numpy as np
import pytest
import trimesh

from pipeline.meshes import load_glb, mesh_report


def coloured_sphere() -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.visual.vertex_colors = np.random.default_rng(0).integers(0, 255, (len(mesh.vertices), 4), dtype=np.uint8)
    return mesh


def as_client_loads_it(glb: bytes) -> trimesh.Trimesh:
    return trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh")


def same(a: trimesh.Trimesh, b: trimesh.Trimesh) -> None:
    assert np.array_equal(a.vertices, b.vertices) and np.array_equal(a.faces, b.faces)
    assert np.array_equal(a.visual.vertex_colors, b.visual.vertex_colors)


def test_one_mesh_is_the_mesh_as_loaded_without_a_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    glb = coloured_sphere().export(file_type="glb")
    want = as_client_loads_it(glb)
    copies = []
    real_copy = trimesh.Trimesh.copy
    monkeypatch.setattr(trimesh.Trimesh, "copy", lambda self, *a, **k: copies.append(1) or real_copy(self, *a, **k))
    got = load_glb(glb)
    assert copies == []  # each copy of vertex colours computes face colours: the time this saves
    same(got, want)
    report = mesh_report(glb)
    assert (report["faces"], report["vertices"], report["watertight"]) == (len(want.faces), len(want.vertices), True)
    assert report["volume_m3"] == pytest.approx(want.volume)


def test_several_meshes_or_a_transform_are_baked_into_one_as_trimesh_does() -> None:
    scene = trimesh.Scene()
    scene.add_geometry(coloured_sphere(), node_name="a")
    scene.add_geometry(trimesh.creation.box((0.5, 0.5, 0.5)), node_name="b",
                       transform=trimesh.transformations.translation_matrix([2.0, 0, 0]))
    glb = scene.export(file_type="glb")
    got, want = load_glb(glb), as_client_loads_it(glb)
    assert np.array_equal(got.vertices, want.vertices) and np.array_equal(got.faces, want.faces)
    assert got.extents[0] > 2.5  # the box moved: the transform was applied

    moved = trimesh.Scene()
    moved.add_geometry(coloured_sphere(), transform=trimesh.transformations.translation_matrix([0, 1.0, 0]))
    glb = moved.export(file_type="glb")
    same(load_glb(glb), as_client_loads_it(glb))
    assert load_glb(glb).bounds[0][1] == pytest.approx(0.0, abs=1e-6)  # the sphere of radius 1, lifted by 1
