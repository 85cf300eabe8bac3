"""Bringing a TripoSR checkpoint into the BentoML model store, as `triposr:<version>`.

The version is the first 12 hex digits of model.ckpt's SHA-256, so importing the same weights twice gives the same
tag, and the checkpoint is loaded strictly before it is saved: a broken file never becomes a version.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runners.triposr.loading import (CONFIG_FILE, WEIGHTS_FILE, ModelLoadError, file_sha256, load_folder,
                                     resolve_source)

MODEL_NAME = "triposr"


def _source_folder(src: str) -> tuple[Path, str]:
    """A folder holding config.yaml + model.ckpt for `src`: a folder, a .ckpt with config.yaml beside it, or a
    Hugging Face repo id (downloaded, or found in the hub cache)."""
    path = Path(src)
    if path.is_file():
        if path.suffix != ".ckpt":
            raise ModelLoadError(f"{path}: expected a folder, a .ckpt file or a Hugging Face repo id")
        if not (path.parent / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{path.parent / CONFIG_FILE}: file not found (a .ckpt needs its config.yaml beside it)")
        return path.parent, "file"
    folder, kind = resolve_source(src)
    return folder, kind


def import_model(src: str, *, name: str = MODEL_NAME) -> str:
    """Validate `src` by loading it, copy it into the model store and return the tag."""
    import bentoml

    folder, kind = _source_folder(src)
    weights = folder / WEIGHTS_FILE if kind != "file" else Path(src)
    if not weights.is_file():
        raise ModelLoadError(f"{weights}: file not found")
    staged = _stage(folder, weights)
    try:
        try:  # strict: a corrupt or mismatched checkpoint stops here, with its problem named
            load_folder(staged)
        except ModelLoadError as exc:
            message = str(exc).replace(str(staged / WEIGHTS_FILE), str(weights)).replace(str(staged), str(folder))
            raise ModelLoadError(message) from None
        sha = file_sha256(weights)
        tag = f"{name}:{sha[:12]}"
        try:
            return str(bentoml.models.get(tag).tag)  # same weights imported before
        except bentoml.exceptions.NotFound:
            pass
        with bentoml.models.create(tag, labels={"source_kind": kind}, metadata={"source": src, "sha256": sha}) as m:
            shutil.copytree(staged, m.path, dirs_exist_ok=True)
        return tag
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _stage(folder: Path, weights: Path) -> Path:
    """config.yaml, model.ckpt and the ViT folder the config names, in a folder of their own."""
    import tempfile

    staged = Path(tempfile.mkdtemp(prefix="triposr-import-"))
    shutil.copy2(folder / CONFIG_FILE, staged / CONFIG_FILE)
    shutil.copy2(weights, staged / WEIGHTS_FILE)
    for child in folder.iterdir():
        if child.is_dir() and (child / "config.json").is_file():  # a ViT config folder (facts: tiny configs)
            shutil.copytree(child, staged / child.name)
    return staged
