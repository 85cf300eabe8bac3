"""TripoSR (image -> 3D mesh), our own PyTorch implementation that loads the official checkpoint strictly.

The public names load lazily, so the API service can import `runners.triposr.client` (and the service
declaration) without importing torch: only the TripoSR service's worker needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runners.triposr.loading import ModelLoadError, load_model, model_version, write_random_checkpoint
    from runners.triposr.model import TripoSR, TripoSRConfig

_WHERE = {"ModelLoadError": "loading", "load_model": "loading", "model_version": "loading",
           "write_random_checkpoint": "loading",
          "TripoSR": "model", "TripoSRConfig": "model"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"runners.triposr.{_WHERE[name]}"), name)
