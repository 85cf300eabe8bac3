"""Inspect a USDZ in the Blender venv (usd-core 26.11): validation results, ARKit rules, mesh and texture data.

Usage: <.venv-blender python> inspect_usdz.py FILE.usdz OUT.npz  -> prints one JSON object; OUT.npz holds the
triangle centres (world frame) and the UV coordinates of those centres, for colour checks in the main venv.

Validation is usd-core 26.11's UsdValidation: every registered validator (core, geom, shade, usdz package, ...).
usd-core 26 no longer ships the Python ARKit ComplianceChecker, so its ARKit-only rules are checked here from the
stage as written in that checker's documentation: allowed prim types, allowed shader ids, textures only PNG/JPEG,
everything inside the package, a .usdc root layer first in the archive, Y up, material bindings with the API.
"""

from __future__ import annotations

import json
import sys
import zipfile

import numpy as np
from pxr import Gf, Sdf, Usd, UsdGeom, UsdShade, UsdUtils, UsdValidation

ARKIT_PRIM_TYPES = {"", "Scope", "Xform", "Camera", "Shader", "Material", "Mesh", "Sphere", "Cube", "Cylinder", "Cone",
                    "Capsule", "GeomSubset", "Points", "SkelRoot", "Skeleton", "SkelAnimation", "BlendShape",
                    "SpatialAudio"}
ARKIT_SHADER_IDS = {"UsdPreviewSurface", "UsdUVTexture", "UsdTransform2d", "UsdPrimvarReader_float",
                    "UsdPrimvarReader_float2", "UsdPrimvarReader_float3", "UsdPrimvarReader_float4",
                    "UsdPrimvarReader_int", "UsdPrimvarReader_string", "UsdPrimvarReader_normal",
                    "UsdPrimvarReader_point", "UsdPrimvarReader_vector", "UsdPrimvarReader_matrix"}
ARKIT_FILE_TYPES = {"usdc", "usda", "usd", "png", "jpg", "jpeg"}


def run_validators(stage: Usd.Stage) -> list[str]:
    registry = UsdValidation.ValidationRegistry()
    validators = registry.GetOrLoadAllValidators()
    context = UsdValidation.ValidationContext(validators)
    errors = context.Validate(stage)
    return [f"{e.GetName()}: {e.GetMessage()}" for e in errors if not e.HasNoError()]


def arkit_failures(path: str, stage: Usd.Stage) -> list[str]:
    failures = []
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        infos = archive.infolist()
    if not names or not names[0].endswith(".usdc"):
        failures.append("root layer is not a .usdc first in the package")
    for name in names:
        if name.rsplit(".", 1)[-1].lower() not in ARKIT_FILE_TYPES:
            failures.append(f"file type not allowed in ARKit: {name}")
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            failures.append(f"compressed entry {info.filename}")
    if UsdGeom.GetStageUpAxis(stage) != UsdGeom.Tokens.y:
        failures.append("upAxis should be Y")
    if not stage.GetDefaultPrim():
        failures.append("no default prim")
    for prim in stage.Traverse():
        if prim.GetTypeName() not in ARKIT_PRIM_TYPES:
            failures.append(f"prim type not allowed: {prim.GetPath()} {prim.GetTypeName()}")
        if prim.IsA(UsdShade.Shader):
            shader_id = UsdShade.Shader(prim).GetShaderId()
            if shader_id not in ARKIT_SHADER_IDS:
                failures.append(f"shader id not allowed: {prim.GetPath()} {shader_id}")
        if prim.GetRelationship("material:binding") and not prim.HasAPI(UsdShade.MaterialBindingAPI):
            failures.append(f"material binding without MaterialBindingAPI: {prim.GetPath()}")
    layer = stage.GetRootLayer()
    _layers, assets, unresolved = UsdUtils.ComputeAllDependencies(Sdf.AssetPath(path))
    if unresolved:
        failures.append(f"unresolved paths: {unresolved}")
    for asset in assets:
        if not asset.startswith(path + "[") and asset != path:
            failures.append(f"dependency outside the package: {asset}")
    del layer
    return failures


def mesh_data(stage: Usd.Stage) -> tuple[dict, np.ndarray, np.ndarray, list[str]]:
    meshes = [UsdGeom.Mesh(p) for p in stage.Traverse() if p.IsA(UsdGeom.Mesh)]
    centres, uvs, textures, faces, display_colour = [], [], [], 0, False
    cache = UsdGeom.XformCache()
    for mesh in meshes:
        counts = np.asarray(mesh.GetFaceVertexCountsAttr().Get())
        indices = np.asarray(mesh.GetFaceVertexIndicesAttr().Get())
        if not np.all(counts == 3):
            raise SystemExit("expected a triangle mesh")
        faces += len(counts)
        world = np.asarray(cache.GetLocalToWorldTransform(mesh.GetPrim()))  # row-vector convention
        points = np.asarray(mesh.GetPointsAttr().Get(), dtype=np.float64)
        points = np.c_[points, np.ones(len(points))] @ world
        tris = points[indices.reshape(-1, 3), :3]
        centres.append(tris.mean(axis=1))
        primvars = UsdGeom.PrimvarsAPI(mesh)
        display_colour = display_colour or primvars.HasPrimvar("displayColor")
        if not primvars.HasPrimvar("st"):  # not baked: no texture coordinates
            uvs.append(np.full((len(counts), 2), np.nan))
            continue
        st = primvars.GetPrimvar("st")
        values = np.asarray(st.ComputeFlattened(), dtype=np.float64)
        if st.GetInterpolation() == UsdGeom.Tokens.faceVarying:
            corner_uv = values.reshape(-1, 3, 2)
        else:
            corner_uv = values[indices].reshape(-1, 3, 2)
        uvs.append(corner_uv.mean(axis=1))
        material, _rel = UsdShade.MaterialBindingAPI(mesh).ComputeBoundMaterial()
        for prim in Usd.PrimRange(material.GetPrim()):
            if prim.IsA(UsdShade.Shader) and UsdShade.Shader(prim).GetShaderId() == "UsdUVTexture":
                textures.append(UsdShade.Shader(prim).GetInput("file").Get().path)
    all_centres = np.concatenate(centres)
    info = {"meshes": len(meshes), "faces": faces, "bbox_min": all_centres.min(0).tolist(),
            "bbox_max": all_centres.max(0).tolist(), "centroid": all_centres.mean(0).tolist(),
            "display_color": display_colour}
    return info, all_centres, np.concatenate(uvs), textures


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    stage = Usd.Stage.Open(path)
    info, centres, uvs, textures = mesh_data(stage)
    np.savez(out, centres=centres, uvs=uvs)
    report = {"validation_errors": run_validators(stage), "arkit_failures": arkit_failures(path, stage),
              "up_axis": UsdGeom.GetStageUpAxis(stage), "meters_per_unit": UsdGeom.GetStageMetersPerUnit(stage),
              "textures": textures, **info}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
