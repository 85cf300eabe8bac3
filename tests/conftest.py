"""The `slow` marker: `make test-fast` (pytest -m "not slow") runs the rest in under two minutes for the edit-test
loop; `make test` runs everything.

Slow is what starts a real `bentoml serve`, Blender, a browser or an official-size model: whole modules, listed
here (one place, so a new module of that kind is marked by adding its name).
"""

from __future__ import annotations

import pytest

SLOW_MODULES = {
    # a real `bentoml serve` (seconds to start, two worker processes)
    "test_bentoml_fixes", "test_http", "test_no_orphans", "test_permissions", "test_service_config",
    "test_triposr_service", "test_triposr_standin", "test_xai_served", "test_full_pipeline", "test_lifecycle",
    # a real browser
    "test_page",
    # real Blender
    "test_blender_convert", "test_blender_examples", "test_blender_pool", "test_blender_texbake",
    # the official-size model (419 M parameters), or Triton's interpreter
    "test_triposr_official", "test_triposr_fused", "test_triposr_precision",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
