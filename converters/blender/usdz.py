"""The conversion itself, run inside a Blender worker (imports bpy): GLB -> AR-ready USDZ, and preview renders.

Every public function starts from an empty scene and leaves one behind (`reset_scene`), so a long-lived worker
does not accumulate data between requests. Problems with the input raise `ConversionError` with one sentence the
user can read; anything else is a bug in this module.
"""

from __future__ import annotations

import io
import math
import struct
import tempfile
import zipfile
from pathlib import Path

import bpy
import numpy as np
from mathutils import Matrix, Vector
from PIL import Image

from converters.blender import texbake
from converters.blender.glbcheck import NO_GEOMETRY, too_many_faces

PREVIEW_SAMPLES = 16
PREVIEW_JPEG_QUALITY = 90
PREVIEW_BACKGROUND = (0.8, 0.8, 0.82)  # linear; with the Standard view transform this is sRGB (231, 231, 232)


class ConversionError(Exception):
    """The input cannot be converted; the message is shown to the user as is."""


def reset_scene() -> None:
    """Back to an empty Blender: no objects, meshes, materials or images left from the previous request."""
    bpy.ops.wm.read_factory_settings(use_empty=True)
    for image in list(bpy.data.images):
        bpy.data.images.remove(image)
    bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)


def scene_counts() -> dict[str, int]:
    """How many data blocks are alive: the worker reports these after each reset to prove nothing leaks."""
    return {
        "objects": len(bpy.data.objects),
        "meshes": len(bpy.data.meshes),
        "materials": len(bpy.data.materials),
        "images": len(bpy.data.images),
    }


def _use_cycles_on_one_thread(samples: int) -> bpy.types.Scene:
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = samples
    scene.cycles.use_denoising = False
    # One worker per core: Cycles must not spread over the cores the other workers use.
    scene.render.threads_mode = "FIXED"
    scene.render.threads = 1
    return scene


def import_glb(glb_path: Path, max_faces: int) -> bpy.types.Object:
    """Import the GLB as one smooth-shaded mesh object whose data is in world coordinates (Blender's Z up)."""
    if not glb_path.is_file() or glb_path.stat().st_size == 0:
        raise ConversionError("The 3D model file is empty.")
    try:
        bpy.ops.import_scene.gltf(filepath=str(glb_path), merge_vertices=False)
    except RuntimeError as exc:  # the importer reports unreadable files this way
        lines = str(exc).strip().splitlines() or ["unknown format"]
        first = lines[-1].removeprefix("Error: ")[:200]
        raise ConversionError(f"The 3D model file could not be read as GLB ({first}).") from None
    meshes = [o for o in bpy.data.objects if o.type == "MESH" and len(o.data.polygons) > 0]
    if not meshes:
        raise ConversionError(NO_GEOMETRY)
    faces = sum(len(o.data.polygons) for o in meshes)
    if faces > max_faces:
        raise ConversionError(too_many_faces(faces, max_faces))
    obj = _join(meshes)
    obj.data.shade_smooth()  # TripoSR's GLB has no normals: without this the import is faceted
    return obj


def _join(meshes: list[bpy.types.Object]) -> bpy.types.Object:
    """One object with identity transform: the exporter then writes the placement straight into the points."""
    for obj in meshes:
        obj.data.transform(obj.matrix_world)
        obj.parent = None
        obj.matrix_world = Matrix.Identity(4)
    target = meshes[0]
    if len(meshes) > 1:
        with bpy.context.temp_override(active_object=target, selected_editable_objects=meshes, selected_objects=meshes):
            bpy.ops.object.join()
    for other in [o for o in bpy.data.objects if o != target]:
        bpy.data.objects.remove(other)
    bpy.context.view_layer.objects.active = target
    target.select_set(True)
    return target


def _colour_attribute(obj: bpy.types.Object) -> str | None:
    attrs = obj.data.color_attributes
    if len(attrs) == 0:
        return None
    return (attrs.active_color or attrs[0]).name


def _unwrap(obj: bpy.types.Object) -> None:
    """A fresh UV map from smart projection: islands of neighbouring faces keep colours continuous in the texture."""
    mesh = obj.data
    while len(mesh.uv_layers) > 0:
        mesh.uv_layers.remove(mesh.uv_layers[0])
    mesh.uv_layers.new(name="UVMap")
    bpy.ops.object.mode_set(mode="EDIT")
    bpy.ops.mesh.select_all(action="SELECT")
    bpy.ops.uv.smart_project(angle_limit=math.radians(66.0), island_margin=0.002)
    bpy.ops.object.mode_set(mode="OBJECT")


def _single_material(obj: bpy.types.Object, name: str) -> bpy.types.Material:
    material = bpy.data.materials.new(name)
    material.use_nodes = True
    material.node_tree.nodes.clear()
    obj.data.materials.clear()
    obj.data.materials.append(material)
    return material


def _corner_arrays(mesh: bpy.types.Mesh, attribute: str) -> tuple[np.ndarray, np.ndarray]:
    """Per triangle corner: UV (T, 3, 2) and linear RGB colour (T, 3, 3), read in bulk with foreach_get."""
    mesh.calc_loop_triangles()
    triangles = len(mesh.loop_triangles)
    loops = np.empty(triangles * 3, dtype=np.int32)
    mesh.loop_triangles.foreach_get("loops", loops)
    uv = np.empty(len(mesh.loops) * 2, dtype=np.float32)
    mesh.uv_layers.active.data.foreach_get("uv", uv)
    colour_attribute = mesh.color_attributes[attribute]
    rgba = np.empty(len(colour_attribute.data) * 4, dtype=np.float32)
    colour_attribute.data.foreach_get("color", rgba)  # linear values, whatever the storage
    rgba = rgba.reshape(-1, 4)
    if colour_attribute.domain == "POINT":
        vertex_of_loop = np.empty(len(mesh.loops), dtype=np.int32)
        mesh.loops.foreach_get("vertex_index", vertex_of_loop)
        rgba = rgba[vertex_of_loop]
    return uv.reshape(-1, 2)[loops].reshape(-1, 3, 2), rgba[loops, :3].reshape(-1, 3, 3)


def bake_vertex_colours(obj: bpy.types.Object, attribute: str, size: int) -> bpy.types.Image:
    """Render the colour attribute into a size x size texture on a new UV map (AR Quick Look ignores vertex colours)."""
    _unwrap(obj)
    corner_uv, corner_colour = _corner_arrays(obj.data, attribute)
    texels = texbake.srgb_encode(texbake.bake(corner_uv, corner_colour, size))
    image = bpy.data.images.new("baked_colour", width=size, height=size, alpha=False)
    rgba = np.concatenate([texels, np.ones((size, size, 1))], axis=2).astype(np.float32)
    image.pixels.foreach_set(rgba.ravel())  # byte sRGB image: pixels take the encoded values, row 0 at the bottom
    # Not packed or saved: the USDZ exporter encodes generated images into the package itself.
    return image


def _textured_material(obj: bpy.types.Object, image: bpy.types.Image) -> None:
    """Principled BSDF fed by the baked texture: the exporter turns it into UsdPreviewSurface + UsdUVTexture."""
    material = _single_material(obj, "surface")
    nodes, links = material.node_tree.nodes, material.node_tree.links
    texture = nodes.new("ShaderNodeTexImage")
    texture.image = image
    shader = nodes.new("ShaderNodeBsdfPrincipled")
    shader.inputs["Roughness"].default_value = 0.8
    shader.inputs["Metallic"].default_value = 0.0
    output = nodes.new("ShaderNodeOutputMaterial")
    links.new(texture.outputs["Color"], shader.inputs["Base Color"])
    links.new(shader.outputs["BSDF"], output.inputs["Surface"])


def _export_usdz(usdz_path: Path, mesh_colours: bool) -> None:
    """USDZ in API.md's frame: Y up, metres, front +Z (the inverse of the glTF importer's axis change)."""
    bpy.ops.wm.usd_export(
        filepath=str(usdz_path),
        selected_objects_only=False,
        export_animation=False,
        export_materials=True,
        generate_preview_surface=True,
        export_uvmaps=True,
        export_normals=True,
        # With a baked texture the colours live there; faceVarying colours would only add size.
        export_mesh_colors=mesh_colours,
        export_lights=False,
        export_cameras=False,
        convert_orientation=True,
        export_global_forward_selection="NEGATIVE_Z",
        export_global_up_selection="Y",
        meters_per_unit=1.0,
        root_prim_path="/root",
    )


_DOS_DATE_1980_01_01 = (1 << 5) | 1


def fix_zip_times(path: Path) -> None:
    """Set every entry's time in a USDZ to 1980-01-01 00:00, so the same model makes the same bytes (the packager
    stamps the current time). Patched in place: a USDZ's file data sits on 64-byte boundaries that rewriting the
    archive with zipfile would not keep."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        entries, directory = archive.infolist(), archive.start_dir
    for info in entries:  # local file headers: signature, version, flags, method, then time and date
        struct.pack_into("<HH", data, info.header_offset + 10, 0, _DOS_DATE_1980_01_01)
    at = directory
    for _ in entries:  # central directory headers: the same two fields at 12, then three variable lengths
        if data[at : at + 4] != b"PK\x01\x02":
            raise RuntimeError(f"{path}: unexpected zip layout")
        struct.pack_into("<HH", data, at + 12, 0, _DOS_DATE_1980_01_01)
        names, extras, comments = struct.unpack_from("<HHH", data, at + 28)
        at += 46 + names + extras + comments
    path.write_bytes(data)


def _ensure_empty() -> None:
    """Each request ends with a reset; reset again only if something (a crash in a hook) left data behind."""
    if any(scene_counts().values()):
        reset_scene()


def convert(glb_path: Path, usdz_path: Path, bake_size: int, max_faces: int) -> dict[str, int]:
    """GLB -> USDZ with the vertex colours baked into a texture (bake_size 0: kept as displayColor instead).
    Returns the face count written."""
    _ensure_empty()
    try:
        obj = import_glb(glb_path, max_faces)
        faces = len(obj.data.polygons)
        attribute = _colour_attribute(obj)
        if attribute is not None and bake_size > 0:
            _textured_material(obj, bake_vertex_colours(obj, attribute, bake_size))
        elif attribute is not None:  # no baking: USD viewers show displayColor, AR Quick Look does not
            obj.data.color_attributes[attribute].name = "displayColor"
        _export_usdz(usdz_path, mesh_colours=attribute is not None and bake_size <= 0)
        if not usdz_path.is_file():
            raise RuntimeError("the USD exporter wrote no file")
        fix_zip_times(usdz_path)
        return {"faces": faces}
    finally:
        reset_scene()


def _preview_material(obj: bpy.types.Object, attribute: str | None) -> None:
    material = _single_material(obj, "preview")
    nodes, links = material.node_tree.nodes, material.node_tree.links
    shader = nodes.new("ShaderNodeBsdfPrincipled")
    shader.inputs["Roughness"].default_value = 0.7
    output = nodes.new("ShaderNodeOutputMaterial")
    links.new(shader.outputs["BSDF"], output.inputs["Surface"])
    if attribute is not None:
        colour = nodes.new("ShaderNodeVertexColor")
        colour.layer_name = attribute
        links.new(colour.outputs["Color"], shader.inputs["Base Color"])


def _frame_camera(obj: bpy.types.Object, field_of_view: float) -> None:
    """A three-quarter view from front-right and above (glTF +Z is Blender -Y) that fits the bounding sphere."""
    corners = [Vector(c) for c in obj.bound_box]
    centre = sum(corners, Vector()) / 8.0
    radius = max((c - centre).length for c in corners)
    direction = Vector((0.9, -1.3, 0.75)).normalized()
    distance = radius / math.sin(field_of_view / 2.0) * 0.9
    camera_data = bpy.data.cameras.new("preview")
    camera_data.angle = field_of_view
    camera = bpy.data.objects.new("preview", camera_data)
    bpy.context.scene.collection.objects.link(camera)
    camera.location = centre + direction * distance
    camera.rotation_euler = (-direction).to_track_quat("-Z", "Y").to_euler()
    bpy.context.scene.camera = camera


def _light_scene() -> None:
    sun_data = bpy.data.lights.new("key", type="SUN")
    sun_data.energy = 2.5
    sun_data.angle = math.radians(10.0)
    sun = bpy.data.objects.new("key", sun_data)
    sun.rotation_euler = (math.radians(50.0), 0.0, math.radians(30.0))
    bpy.context.scene.collection.objects.link(sun)
    # The camera sees the background colour; the model is lit by a dimmer ambient so that the sun shapes it.
    world = bpy.data.worlds.new("background")
    world.use_nodes = True
    nodes, links = world.node_tree.nodes, world.node_tree.links
    seen = nodes["Background"]
    seen.inputs["Color"].default_value = (*PREVIEW_BACKGROUND, 1.0)
    ambient = nodes.new("ShaderNodeBackground")
    ambient.inputs["Color"].default_value = (*PREVIEW_BACKGROUND, 1.0)
    ambient.inputs["Strength"].default_value = 0.35
    is_camera = nodes.new("ShaderNodeLightPath")
    mix = nodes.new("ShaderNodeMixShader")
    links.new(is_camera.outputs["Is Camera Ray"], mix.inputs["Fac"])
    links.new(ambient.outputs["Background"], mix.inputs[1])
    links.new(seen.outputs["Background"], mix.inputs[2])
    links.new(mix.outputs["Shader"], nodes["World Output"].inputs["Surface"])
    bpy.context.scene.world = world


def render_preview(glb_path: Path, jpeg_path: Path, size: int, max_faces: int) -> dict[str, int]:
    """A size x size JPEG of the model: Cycles on one CPU thread, few samples, camera and key light as above.

    Blender renders a PNG and Pillow encodes the JPEG from its pixels alone: Blender's own JPEG carries comments
    with the date and the render time, and Pillow writes none, so the same model gives the same bytes."""
    _ensure_empty()
    try:
        obj = import_glb(glb_path, max_faces)
        _preview_material(obj, _colour_attribute(obj))
        _frame_camera(obj, field_of_view=math.radians(35.0))
        _light_scene()
        scene = _use_cycles_on_one_thread(samples=PREVIEW_SAMPLES)
        scene.view_settings.view_transform = "Standard"  # the background colour stays the colour we set
        scene.render.resolution_x = size
        scene.render.resolution_y = size
        scene.render.resolution_percentage = 100
        scene.render.use_file_extension = False
        settings = scene.render.image_settings
        settings.file_format, settings.color_mode, settings.color_depth, settings.compression = "PNG", "RGB", "8", 0
        with tempfile.TemporaryDirectory(prefix="grok3d-preview-") as scratch:
            png = Path(scratch) / "render.png"
            scene.render.filepath = str(png)
            bpy.ops.render.render(write_still=True)
            with Image.open(png) as rendered:
                rendered.convert("RGB").save(jpeg_path, format="JPEG", quality=PREVIEW_JPEG_QUALITY)
        return {"faces": len(obj.data.polygons)}
    finally:
        reset_scene()
