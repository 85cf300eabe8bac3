"""Further formats of a job's model, run inside a Blender worker (imports bpy): the GLB with the USDZ's baked texture
(`glb_textured`), FBX with that texture embedded, and OBJ + MTL + the texture PNG in a zip.

Each starts like the USDZ conversion (usdz.py): the GLB imported as one smooth-shaded mesh, a smart-projection UV
map, the vertex colours baked by texbake.py at the same size. Both steps are deterministic, so every format gets
the USDZ's UVs and texels. The frames (API.md §3):
- glb_textured: glTF's own, as the GLB: Y up, metres, front +Z.
- FBX: Y up, front +Z, metres (Blender writes the scene's metre as its unit; the importers of Blender, Unity and
  Unreal read it back at the same size).
- OBJ: Y up, front +Z, coordinates in metres (OBJ has no unit field).
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import bpy

from converters.blender import usdz

FORMATS = ("glb_textured", "fbx", "obj")
TEXTURE_NAME = "model.png"  # the baked texture's file name inside the OBJ zip (and the FBX's embedded file)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same model makes the same zip


def _textured(glb_path: Path, bake_size: int, max_faces: int, scratch: Path) -> bpy.types.Object:
    """The model as the USDZ conversion sees it, with its colours baked into a texture saved as a PNG in
    `scratch` (the exporters copy or embed image files). bake_size 0 or a model without colours: no texture."""
    obj = usdz.import_glb(glb_path, max_faces)
    attribute = usdz._colour_attribute(obj)
    if attribute is not None and bake_size > 0:
        image = usdz.bake_vertex_colours(obj, attribute, bake_size)
        image.filepath_raw = str(scratch / TEXTURE_NAME)
        image.file_format = "PNG"
        image.save()
        usdz._textured_material(obj, image)
    return obj


def _export_glb(out: Path) -> None:
    bpy.ops.export_scene.gltf(filepath=str(out), export_format="GLB", export_yup=True, export_texcoords=True,
                              export_normals=True, export_materials="EXPORT", export_image_format="AUTO",
                              export_vertex_color="NONE", export_animations=False, export_cameras=False,
                              export_lights=False)


def _export_fbx(out: Path) -> None:
    bpy.ops.export_scene.fbx(filepath=str(out), use_selection=False, object_types={"MESH"}, axis_forward="-Z",
                             axis_up="Y", global_scale=1.0, apply_unit_scale=True, apply_scale_options="FBX_SCALE_NONE",
                             path_mode="COPY", embed_textures=True, mesh_smooth_type="FACE", colors_type="NONE",
                             bake_anim=False)


def _export_obj_zip(out: Path, scratch: Path) -> None:
    obj_path = scratch / "model.obj"
    bpy.ops.wm.obj_export(filepath=str(obj_path), export_selected_objects=False, forward_axis="NEGATIVE_Z",
                          up_axis="Y", global_scale=1.0, export_uv=True, export_normals=True, export_colors=False,
                          export_materials=True, path_mode="STRIP")
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("model.obj", "model.mtl", TEXTURE_NAME):
            if (scratch / name).is_file():
                entry = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                entry.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(entry, (scratch / name).read_bytes())


def export(glb_path: Path, out_path: Path, fmt: str, bake_size: int, max_faces: int) -> dict[str, int]:
    """Write `out_path` in format `fmt` (one of FORMATS) from the job's GLB; returns the face count written."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    usdz._ensure_empty()
    try:
        with tempfile.TemporaryDirectory(prefix="grok3d-format-") as folder:
            scratch = Path(folder)
            obj = _textured(glb_path, bake_size, max_faces, scratch)
            faces = len(obj.data.polygons)
            if fmt == "glb_textured":
                _export_glb(out_path)
            elif fmt == "fbx":
                _export_fbx(out_path)
            else:
                _export_obj_zip(out_path, scratch)
        if not out_path.is_file():
            raise RuntimeError(f"the {fmt} exporter wrote no file")
        return {"faces": faces}
    finally:
        usdz.reset_scene()
