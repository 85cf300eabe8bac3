"""The shipped examples: three hand-built sample models, modelled from trimesh primitives with vertex colours.

`python -m converters.blender.examples build [--out examples]` writes, for each example, `<slug>/model.glb`
(API.md's delivery frame: Y up, metres, resting on y = 0, centred in x and z, largest side 0.5 m, front +Z),
`<slug>/model.usdz` and `<slug>/image.jpg` (both made by the Blender pool, like a real job), and `catalog.json`.
The models are deterministic, so a rebuild changes the files only when this module or the converter changes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from converters.blender.pool import BlenderPool

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
MODEL_SIZE_M = 0.5
EXAMPLE_BAKE_SIZE = 512  # keeps every shipped file well under 3 MB
CREATED_AT = "2026-11-25T12:00:00.000000"  # fixed: the catalog does not change on a rebuild

Colour = tuple[int, int, int]


def _part(mesh: trimesh.Trimesh, colour: Colour | Callable[[np.ndarray], np.ndarray], crease_deg: float = 35.0,
          max_edge: float | None = None) -> trimesh.Trimesh:
    """A coloured piece; vertices are split along edges sharper than `crease_deg` so Blender's smooth shading
    keeps boxes and cylinder rims crisp."""
    if max_edge is not None:  # a colour pattern needs vertices to live on: split long edges (cone sides) first
        vertices, faces = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=max_edge)
        mesh = trimesh.Trimesh(vertices, faces)
    mesh = trimesh.graph.smooth_shade(mesh, angle=math.radians(crease_deg))
    rgb = colour(mesh.vertices) if callable(colour) else np.tile(colour, (len(mesh.vertices), 1))
    rgba = np.concatenate([np.asarray(rgb, np.uint8), np.full((len(mesh.vertices), 1), 255, np.uint8)], axis=1)
    return trimesh.Trimesh(mesh.vertices, mesh.faces, vertex_colors=rgba, process=False)


def _moved(mesh: trimesh.Trimesh, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.apply_translation([x, y, z])
    return mesh


def _turned(mesh: trimesh.Trimesh, axis: tuple[float, float, float], degrees: float) -> trimesh.Trimesh:
    mesh = mesh.copy()
    mesh.apply_transform(trimesh.transformations.rotation_matrix(math.radians(degrees), axis))
    return mesh


def _cylinder(radius: float, height: float, sections: int = 48) -> trimesh.Trimesh:
    """A cylinder standing on y = 0 (trimesh makes them along z, centred)."""
    return _moved(_turned(trimesh.creation.cylinder(radius, height, sections=sections), (1, 0, 0), -90), y=height / 2)


def _dome(radius: float, subdivisions: int = 4) -> trimesh.Trimesh:
    """The upper half of an icosphere, resting on y = 0."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    keep = sphere.triangles_center[:, 1] > -1e-9
    return trimesh.Trimesh(sphere.vertices, sphere.faces[keep], process=True)


def _ball(radius: float, subdivisions: int = 3) -> trimesh.Trimesh:
    return trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)


def _to_delivery_frame(parts: list[trimesh.Trimesh]) -> trimesh.Trimesh:
    """API.md's frame: on y = 0, centred in x and z, largest side MODEL_SIZE_M."""
    mesh = trimesh.util.concatenate(parts)
    lo, hi = mesh.bounds
    mesh.apply_translation([-(lo[0] + hi[0]) / 2, -lo[1], -(lo[2] + hi[2]) / 2])
    mesh.apply_scale(MODEL_SIZE_M / float((hi - lo).max()))
    return mesh


def mars_habitat() -> trimesh.Trimesh:
    """A main dome with panel rings, a smaller lab dome joined by a tunnel, a door facing +Z, solar panels, mast."""
    def panels(v: np.ndarray) -> np.ndarray:
        ring = (np.floor(np.arcsin(np.clip(v[:, 1] / 1.0, 0, 1)) / math.radians(12)) % 2)[:, None]
        return np.where(ring > 0, [236, 238, 242], [196, 206, 220])

    def regolith(v: np.ndarray) -> np.ndarray:
        shade = 0.85 + 0.15 * np.sin(9 * v[:, 0]) * np.cos(7 * v[:, 2])
        return (np.array([176, 92, 58]) * shade[:, None]).clip(0, 255)

    parts = [
        _part(_cylinder(1.55, 0.08, 64), regolith),
        _part(_moved(_dome(1.0), y=0.08), panels),
        _part(_cylinder(1.02, 0.12, 64), (150, 150, 158)),
        _part(_moved(_dome(0.55), x=-1.05, z=-0.55, y=0.08), panels),
        _part(_moved(_turned(_cylinder(0.16, 0.7, 32), (0, 0, 1), 90), x=-0.25, y=0.1, z=-0.3), (170, 170, 176)),
        _part(_moved(trimesh.creation.box([0.36, 0.42, 0.3]), y=0.29, z=0.98), (120, 124, 132)),  # airlock
        _part(_moved(trimesh.creation.box([0.22, 0.32, 0.04]), y=0.26, z=1.14), (255, 170, 40)),  # door, +Z
        _part(_moved(_cylinder(0.02, 1.4, 16), x=0.75, z=-0.6), (90, 90, 96)),
        _part(_moved(_ball(0.06), x=0.75, y=1.45, z=-0.6), (255, 60, 50)),
    ]
    for x in (0.95, 1.3):
        panel = _turned(trimesh.creation.box([0.3, 0.02, 0.5]), (1, 0, 0), 25)
        parts.append(_part(_moved(panel, x=x, y=0.35, z=0.25), (40, 60, 140)))
        parts.append(_part(_moved(_cylinder(0.02, 0.3, 12), x=x, z=0.25), (90, 90, 96)))
    return _to_delivery_frame(parts)


def robot_mascot() -> trimesh.Trimesh:
    """A round-headed robot with glowing blue eyes and a smile on the +Z side, antenna, arms and boots."""
    def body(v: np.ndarray) -> np.ndarray:
        chest = (np.abs(v[:, 0]) < 0.18) & (np.abs(v[:, 1] - 0.95) < 0.12) & (v[:, 2] > 0.2)
        return np.where(chest[:, None], [255, 200, 60], [245, 245, 250])

    parts = [
        _part(_moved(trimesh.creation.capsule(height=0.45, radius=0.33, count=[48, 48]), y=0.95), body),
        _part(_moved(_ball(0.42, 4), y=1.72), (90, 160, 235)),
        _part(_moved(trimesh.creation.box([0.5, 0.24, 0.12]), y=1.74, z=0.33), (30, 34, 48)),  # visor, +Z
        _part(_moved(_ball(0.075), x=-0.14, y=1.76, z=0.41), (90, 230, 255)),
        _part(_moved(_ball(0.075), x=0.14, y=1.76, z=0.41), (90, 230, 255)),
        _part(_moved(_cylinder(0.02, 0.3, 16), y=2.08), (120, 120, 130)),
        _part(_moved(_ball(0.07), y=2.42), (255, 80, 90)),
    ]
    for side in (-1, 1):
        arm = _turned(trimesh.creation.capsule(height=0.4, radius=0.09, count=[24, 24]), (0, 0, 1), side * 25.0)
        parts.append(_part(_moved(_turned(arm, (1, 0, 0), 90), x=side * 0.45, y=0.98), (90, 160, 235)))
        parts.append(_part(_moved(_ball(0.12), x=side * 0.55, y=0.7), (245, 245, 250)))
        parts.append(_part(_moved(_cylinder(0.1, 0.45, 32), x=side * 0.17, y=0.12), (140, 145, 160)))
        parts.append(_part(_moved(trimesh.creation.box([0.24, 0.14, 0.34]), x=side * 0.17, y=0.07, z=0.05),
                           (60, 64, 80)))
    return _to_delivery_frame(parts)


def figurine() -> trimesh.Trimesh:
    """A collectible wizard on a round plinth: robe, face turned to +Z, pointed hat with a star, a staff."""
    def robe(v: np.ndarray) -> np.ndarray:
        hem = v[:, 1] < 0.32
        return np.where(hem[:, None], [240, 200, 70], [70, 50, 150])

    robe_mesh = _moved(_turned(trimesh.creation.cone(0.42, 1.2, sections=64), (1, 0, 0), -90), y=0.2)
    hat = _moved(_turned(trimesh.creation.cone(0.3, 0.65, sections=64), (1, 0, 0), -90), y=1.45)
    parts = [
        _part(_cylinder(0.55, 0.2, 64), (60, 62, 70)),
        _part(_moved(_cylinder(0.5, 0.03, 64), y=0.2), (200, 170, 90)),
        _part(robe_mesh, robe, max_edge=0.1),
        _part(_moved(_ball(0.2, 4), y=1.3), (240, 196, 160)),
        _part(_moved(_ball(0.14), y=1.12, z=0.1), (235, 235, 240)),  # beard
        _part(_moved(_ball(0.025, 2), x=-0.07, y=1.35, z=0.18), (30, 30, 40)),  # eyes, +Z
        _part(_moved(_ball(0.025, 2), x=0.07, y=1.35, z=0.18), (30, 30, 40)),
        _part(_moved(trimesh.creation.annulus(0.24, 0.36, 0.05, sections=64), y=1.45).apply_transform(
            trimesh.transformations.rotation_matrix(math.radians(-90), (1, 0, 0), (0, 1.45, 0))), (70, 50, 150)),
        _part(hat, (70, 50, 150)),
        _part(_moved(_ball(0.05, 2), y=1.78, z=0.12), (255, 220, 60)),
        _part(_moved(_cylinder(0.025, 1.5, 16), x=0.45, y=0.2), (120, 80, 40)),
        _part(_moved(_ball(0.07), x=0.45, y=1.72), (120, 230, 255)),
    ]
    return _to_delivery_frame(parts)


@dataclass(frozen=True)
class ExampleSpec:
    slug: str
    name: str
    description: str
    prompt: str
    build: Callable[[], trimesh.Trimesh]


EXAMPLES = [
    ExampleSpec("mars-habitat", "Mars Habitat",
                "Futuristic Mars habitat dome with an airlock and solar panels. A hand-built sample model "
                "(modelled from primitives, not generated by the pipeline).",
                "A futuristic Mars habitat dome with sci-fi architecture", mars_habitat),
    ExampleSpec("robot-mascot", "Robot Mascot",
                "Friendly robot mascot with glowing blue eyes. A hand-built sample model (modelled from "
                "primitives, not generated by the pipeline).",
                "A friendly robot mascot with glowing blue eyes", robot_mascot),
    ExampleSpec("figurine", "Wizard Figurine",
                "Collectible wizard figurine on a round plinth. A hand-built sample model (modelled from "
                "primitives, not generated by the pipeline).",
                "A collectible wizard figurine with a pointed hat on a round plinth", figurine),
]


async def build(out: Path, bake_size: int = EXAMPLE_BAKE_SIZE) -> None:
    """Write every example's model.glb, model.usdz, image.jpg and the catalog under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    async with BlenderPool(workers=2, bake_size=bake_size) as pool:
        async def one(spec: ExampleSpec) -> None:
            folder = out / spec.slug
            folder.mkdir(exist_ok=True)
            glb = folder / "model.glb"
            glb.write_bytes(spec.build().export(file_type="glb"))
            await asyncio.gather(pool.convert(glb, folder / "model.usdz"), pool.render_preview(glb, folder / "image.jpg"))
            print(f"{spec.slug}: " + ", ".join(f"{p.name} {p.stat().st_size // 1024} KiB" for p in sorted(folder.iterdir())))

        for spec in EXAMPLES:
            await one(spec)
    catalog = [{"slug": s.slug, "name": s.name, "description": s.description, "prompt": s.prompt,
                "created_at": CREATED_AT} for s in EXAMPLES]
    (out / "catalog.json").write_text(json.dumps(catalog, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m converters.blender.examples", description=__doc__)
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--out", type=Path, default=EXAMPLES_DIR)
    parser.add_argument("--bake-size", type=int, default=EXAMPLE_BAKE_SIZE)
    args = parser.parse_args(argv)
    asyncio.run(build(args.out, args.bake_size))


if __name__ == "__main__":
    main(sys.argv[1:])
