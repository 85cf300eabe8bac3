"""Load an FBX with Blender's own importer (in the Blender venv) and say what came back.

Usage: <.venv-blender python> inspect_fbx.py FILE.fbx -> one JSON object: the face count, the world-space
extents in metres along glTF's axes (x, y up, z front; Blender's Z is glTF's Y and Blender's -Y glTF's Z), the
embedded images, and the texture's colour (0..255 sRGB, sampled at each face's UV centre) averaged over the faces
on top (y > TOP_Y) and in front (z > FRONT_Z) of the egg of tests/stages.py.
"""

from __future__ import annotations

import json
import sys

import bpy
import numpy as np

TOP_Y, FRONT_Z = 0.26, 0.21


def main(path: str) -> None:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    bpy.ops.import_scene.fbx(filepath=path)
    [obj] = [o for o in bpy.data.objects if o.type == "MESH"]
    mesh = obj.data
    mesh.transform(obj.matrix_world)
    points = np.array([v.co[:] for v in mesh.vertices])
    gltf = np.stack([points[:, 0], points[:, 2], -points[:, 1]], axis=1)  # Blender Z up -> glTF Y up
    images = [i for i in bpy.data.images if i.size[0] > 0]
    report = {"faces": len(mesh.polygons), "extents": (gltf.max(axis=0) - gltf.min(axis=0)).tolist(),
              "images": [i.name for i in images], "packed": [bool(i.packed_file) for i in images]}
    if images and mesh.uv_layers.active is not None:
        image = images[0]
        width, height = image.size
        pixels = np.array(image.pixels[:]).reshape(height, width, -1)[..., :3]  # row 0 at the bottom
        uv = mesh.uv_layers.active.data
        for name, select in (("top", lambda c: c[1] > TOP_Y), ("front", lambda c: c[2] > FRONT_Z and c[1] < 0.2)):
            colours = []
            for polygon in mesh.polygons:
                centre = gltf[list(polygon.vertices)].mean(axis=0)
                if select(centre):
                    u, v = np.mean([uv[i].uv[:] for i in polygon.loop_indices], axis=0)
                    x, y = min(int(u * width), width - 1), min(int(v * height), height - 1)
                    colours.append(pixels[y, x])
            report[name] = (np.mean(colours, axis=0) * 255).round().tolist() if colours else None
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
