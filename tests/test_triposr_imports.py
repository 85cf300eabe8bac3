"""The model package's imports run one way: the network (model.py) depends on nothing of loading or meshing; they
depend on it. Checked twice: statically over every import in the package (function-level ones included, typing-only
ones excluded), and by running the network in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "runners" / "triposr"
NAME = "runners.triposr"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, at any depth: `if TYPE_CHECKING:` blocks are skipped."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _package_modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _lazy_names() -> dict[str, str]:
    """The package's lazily exported names -> the module they come from (runners/triposr/__init__.py's _WHERE)."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_WHERE" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("runners/triposr/__init__.py has no _WHERE table")


def dependencies(module: str) -> set[str]:
    """The sibling modules `module` imports at run time (module names without the package prefix)."""
    modules, lazy = _package_modules(), _lazy_names()
    out: set[str] = set()
    for node in _runtime_imports(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif node.level:  # a relative import: from . import x / from .x import y
            base = node.module or ""
            names = [f"{NAME}.{base}" if base else f"{NAME}.{a.name}" for a in node.names]
        elif node.module == NAME:
            names = [f"{NAME}.{a.name if a.name in modules else lazy.get(a.name, '__init__')}" for a in node.names]
        else:
            names = [node.module or ""]
        for name in names:
            if name.startswith(f"{NAME}."):
                out.add(name.split(".")[2])
    out.discard(module)
    return out & modules


def test_the_network_imports_nothing_of_loading_or_meshing() -> None:
    deps = dependencies("model")
    assert not deps & {"loading", "mesh", "inference", "store", "service", "client", "__main__"}, deps


def test_the_package_has_no_import_cycle() -> None:
    graph = {m: dependencies(m) for m in _package_modules()}
    done: set[str] = set()

    def walk(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dep in sorted(graph[module]):
            walk(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        walk(module, [])


def test_running_the_network_loads_neither_loading_nor_meshing() -> None:
    code = """
import sys
import numpy as np
import torch
from PIL import Image
from runners.triposr.model import TripoSR, TripoSRConfig, ViTConfig
vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32,
                patch_size=8)
cfg = TripoSRConfig(cond_image_size=32, vit=vit, plane_size=4, triplane_channels=16, backbone_in_channels=16,
                    num_attention_heads=2, attention_head_dim=8, num_layers=1, cross_attention_dim=32,
                    norm_num_groups=4, post_in_channels=16, post_out_channels=4, decoder_in_channels=12,
                    decoder_neurons=16, decoder_hidden_layers=2)
model = TripoSR(cfg).eval()
codes = model([Image.fromarray(np.full((40, 40, 3), 128, np.uint8))])
density, rgb = model.query(codes, torch.zeros(1, 5, 3))
grid = model.density_grid(codes, 8)
assert grid.shape == (1, 8, 8, 8), grid.shape
print(sorted(m for m in sys.modules if m.startswith("runners.triposr.")))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = out.stdout.strip().splitlines()[-1]
    assert "runners.triposr.loading" not in loaded and "runners.triposr.mesh" not in loaded, loaded
