"""TripoSR (image -> 3D mesh), our own PyTorch implementation that loads the official checkpoint strictly."""

from runners.triposr.loading import ModelLoadError, model_version, write_random_checkpoint
from runners.triposr.model import TripoSR, TripoSRConfig

__all__ = ["ModelLoadError", "TripoSR", "TripoSRConfig", "model_version", "write_random_checkpoint"]
