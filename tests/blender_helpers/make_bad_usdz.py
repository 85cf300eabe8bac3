"""Write a USDZ that breaks ARKit rules on purpose (Z up, no metersPerUnit, a non-ARKit prim and shader, a
a material binding without its API, and a .usda root layer), so the tests can show the inspector does report failures.

Usage: <.venv-blender python> make_bad_usdz.py WORKDIR  -> writes WORKDIR/bad.usdz
"""

from __future__ import annotations

import sys
from pathlib import Path

from pxr import Sdf, Usd, UsdGeom, UsdShade, UsdUtils


def main() -> None:
    work = Path(sys.argv[1])
    layer_path = work / "bad.usda"
    stage = Usd.Stage.CreateNew(str(layer_path))
    UsdGeom.SetStageUpAxis(stage, UsdGeom.Tokens.z)
    root = UsdGeom.Xform.Define(stage, "/root")
    stage.SetDefaultPrim(root.GetPrim())
    UsdGeom.BasisCurves.Define(stage, "/root/curves")
    material = UsdShade.Material.Define(stage, "/root/material")
    shader = UsdShade.Shader.Define(stage, "/root/material/shader")
    shader.CreateIdAttr("ND_standard_surface_surfaceshader")
    mesh = UsdGeom.Mesh.Define(stage, "/root/mesh")
    mesh.GetPrim().CreateRelationship("material:binding").SetTargets([material.GetPath()])
    stage.GetRootLayer().Save()
    UsdUtils.CreateNewUsdzPackage(Sdf.AssetPath(str(layer_path)), str(work / "bad.usdz"))


if __name__ == "__main__":
    main()
