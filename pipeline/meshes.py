"""The delivered mesh: a job's `face_limit` and `size_m` applied to the GLB TripoSR made, and the mesh report of
API.md §2. Runs in the API process, in a thread (trimesh, numpy and fast-simplification; no bpy, no torch).

The frame stays API.md's: Y up, metres, resting on y = 0, centred in x and z, largest side `size_m`.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import StageError

if TYPE_CHECKING:  # imported where used: trimesh brings scipy (about a second), which every process that imports
    import trimesh  # the service would pay at start-up (BentoML's arbiter and each worker), used or not

# fast-simplification keeps the mesh it works on in module-level C++ state (load, simplify, read back are separate
# calls), so two threads must never interleave them.
_SIMPLIFY = threading.Lock()
# Quadric decimation stops near its target, now and then a little above it; each retry aims lower by the miss.
_DECIMATE_TRIES = 4


def load_glb(glb: bytes) -> trimesh.Trimesh:
    """One mesh from a GLB, as trimesh loads it for a client (`trimesh.load(f, force="mesh")`): the numbers of the
    report are the ones trimesh gives a client for the same file.

    A GLB of one mesh at the identity (TripoSR's, and ours after a face limit) is that mesh as loaded: force="mesh"
    gives the same numbers through two copies of it (Scene.dump, then util.concatenate), and each copy of vertex
    colours computes face colours as well. A 327,680-face sphere with vertex colours: 0.21 CPU-s that way, 0.011
    this way (2 cores, trimesh 5.2)."""
    import trimesh

    scene = trimesh.load(io.BytesIO(glb), file_type="glb", force="scene")
    nodes = scene.graph.nodes_geometry
    if len(nodes) == 1:
        transform, name = scene.graph[nodes[0]]
        mesh = scene.geometry.get(name)
        if isinstance(mesh, trimesh.Trimesh) and np.array_equal(transform, np.eye(4)):
            return mesh
    return scene.to_mesh()


def to_glb(mesh: trimesh.Trimesh) -> bytes:
    """Binary glTF with float32 positions and COLOR_0, as runners.triposr.mesh.to_delivery_glb writes it."""
    import trimesh
    out = trimesh.Trimesh(vertices=np.asarray(mesh.vertices, dtype=np.float32), faces=np.asarray(mesh.faces),
                          vertex_colors=np.asarray(mesh.visual.vertex_colors), process=False)
    buffer = io.BytesIO()
    out.export(buffer, file_type="glb")
    return buffer.getvalue()


def decimate(mesh: trimesh.Trimesh, face_limit: int) -> trimesh.Trimesh:
    """At most `face_limit` triangles by quadric edge collapse (fast-simplification), vertex colours kept: each
    vertex left gets the mean colour of the vertices collapsed into it (the collapses replayed give that map)."""
    import fast_simplification
    import trimesh
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    colours = np.asarray(mesh.visual.vertex_colors, dtype=np.float64)
    target = face_limit
    for _ in range(_DECIMATE_TRIES):
        with _SIMPLIFY:
            _, _, collapses = fast_simplification.simplify(vertices, faces, target_count=target, return_collapses=True)
            points, triangles, mapping = fast_simplification.replay_simplification(vertices, faces, collapses)
        if len(triangles) <= face_limit:
            break
        target = max(1, int(target * face_limit / len(triangles)) - 1)
    else:
        raise StageError(f"The 3D model could not be reduced to {face_limit} faces; try a higher face limit.")
    kept = mapping >= 0  # -1: a vertex no triangle used
    sums = np.zeros((len(points), colours.shape[1]))
    np.add.at(sums, mapping[kept], colours[kept])
    counts = np.bincount(mapping[kept], minlength=len(points))[:, None]
    merged = np.round(sums / np.maximum(counts, 1)).clip(0, 255).astype(np.uint8)
    return trimesh.Trimesh(vertices=points, faces=triangles, vertex_colors=merged, process=False)


def place(mesh: trimesh.Trimesh, size_m: float) -> trimesh.Trimesh:
    """API.md's placement: resting on y = 0, centred in x and z, largest side `size_m` metres."""
    lo, hi = mesh.bounds
    origin = np.array([(lo[0] + hi[0]) / 2, lo[1], (lo[2] + hi[2]) / 2])
    scale = size_m / float((hi - lo).max())
    placed = mesh.copy()
    placed.vertices = (np.asarray(mesh.vertices) - origin) * scale
    return placed


def finish_glb(glb: bytes, *, face_limit: int | None, size_m: float | None) -> bytes:
    """The job's GLB from TripoSR's: decimated to `face_limit` faces when it has more, scaled so its largest side
    is `size_m` metres (None: as it came). Unchanged bytes when neither applies."""
    mesh = load_glb(glb)
    largest = float(mesh.extents.max())
    too_many = face_limit is not None and len(mesh.faces) > face_limit
    rescale = size_m is not None and abs(largest - size_m) > 1e-6 * size_m
    if not (too_many or rescale):
        return glb
    if too_many:
        mesh = decimate(mesh, face_limit)
    return to_glb(place(mesh, size_m if size_m is not None else largest))


def mesh_report(glb: bytes) -> dict:
    """API.md §2's `mesh`: trimesh's numbers for the delivered GLB. `size_m`: extents along x, y, z in metres;
    `volume_m3`: cubic metres, only for a watertight mesh (elsewhere a volume means nothing)."""
    mesh = load_glb(glb)
    watertight = bool(mesh.is_watertight)
    return {"faces": int(len(mesh.faces)), "vertices": int(len(mesh.vertices)), "watertight": watertight,
            "size_m": [float(x) for x in mesh.extents], "volume_m3": float(mesh.volume) if watertight else None}


# glTF's frame (Y up, front +Z) to the build plate's (Z up, front -Y): (x, y, z) -> (x, -z, y), a rotation.
Y_UP_TO_Z_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
MILLIMETRES_PER_METRE = 1000.0


def write_printable(glb_path: Path, out: Path, kind: str) -> None:
    """STL (binary) or 3MF for printing, in the build plate's frame: Z up, the model's front facing -Y, resting
    on z = 0, in millimetres. 3MF declares its unit (trimesh writes `unit="millimeter"`, the spec's default); STL
    has none, and millimetres are what every slicer assumes. Colours are not kept (STL has none; slicers read
    3MF's colour extension unevenly). Blocking: run it in a thread."""
    import trimesh
    try:
        mesh = load_glb(glb_path.read_bytes())
    except Exception as exc:  # trimesh raises many kinds for a damaged file
        raise StageError(f"The 3D model file could not be read ({type(exc).__name__}).") from None
    printable = trimesh.Trimesh(vertices=np.asarray(mesh.vertices) @ Y_UP_TO_Z_UP.T * MILLIMETRES_PER_METRE,
                                faces=np.asarray(mesh.faces), process=False)
    out.write_bytes(printable.export(file_type={"stl": "stl", "3mf": "3mf"}[kind]))
