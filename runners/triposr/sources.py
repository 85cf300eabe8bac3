"""Where a TripoSR checkpoint is: an existing folder (config.yaml + model.ckpt), a BentoML model-store tag
(`name:version`), or a Hugging Face repo id (`org/name`, optionally `org/name@revision`), in this order.

Free of PyTorch on purpose: the TripoSR service asks `find` first, so a worker without a checkpoint says so
without importing torch (seconds of CPU and hundreds of MB per worker). loading.py builds the model from what this
module finds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from runners.triposr.wire import is_store_tag

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.ckpt"
DINO_VITB16 = "facebook/dino-vitb16"  # built in: ViTConfig() holds its config.json's values

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class ModelLoadError(RuntimeError):
    """A model source cannot be turned into a model; the message names the file (or source) and the problem."""


class ModelNotFound(Exception):
    """No checkpoint where TRIPOSR_MODEL points: the service runs without a model (API.md's 503)."""


def bento_model(tag: str) -> Any:
    """The BentoML store's model `tag` (`:latest` resolved); ModelLoadError when the store has none."""
    import bentoml  # lazy: importing BentoML is slow and the model itself does not need it

    try:
        return bentoml.models.get(tag)
    except Exception as e:  # bentoml.exceptions.NotFound and friends
        raise ModelLoadError(f"BentoML model {tag!r}: not in the model store ({e})") from None


def hf_snapshot(source: str, vit_folder: str | None = None) -> Path:
    """Download (or find in the cache) config.yaml and model.ckpt of a Hugging Face repo; -> the snapshot folder."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = source.partition("@")
    try:
        config = Path(hf_hub_download(repo, CONFIG_FILE, revision=revision or None))
        hf_hub_download(repo, WEIGHTS_FILE, revision=revision or None)
        if vit_folder:
            hf_hub_download(repo, f"{vit_folder}/config.json", revision=revision or None)
    except Exception as e:  # offline without cache, unknown repo, gated repo without a token
        raise ModelLoadError(f"Hugging Face repo {source!r}: cannot get {CONFIG_FILE}/{WEIGHTS_FILE} ({e})") from None
    return config.parent


def vit_folder_name(folder: Path) -> str | None:
    """The image tokenizer's folder that config.yaml names, when it is not the built-in facebook/dino-vitb16."""
    try:
        raw = yaml.safe_load((folder / CONFIG_FILE).read_text())
        name = raw["image_tokenizer"]["pretrained_model_name_or_path"]
    except Exception:
        return None  # read_config reports the problem with the file's name
    return None if name == DINO_VITB16 else str(name)


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """-> (a local folder holding config.yaml + model.ckpt, the kind of source: folder | bentoml | hf)."""
    text = str(source)
    if Path(text).is_dir():
        return Path(text), "folder"
    if is_store_tag(text):
        return Path(bento_model(text).path), "bentoml"
    if _HF_ID.match(text) and not text.startswith((".", "/")):
        folder = hf_snapshot(text)
        vit = vit_folder_name(folder)
        if vit:
            folder = hf_snapshot(text, vit)
        return folder, "hf"
    raise ModelLoadError(f"model source {text!r}: not a folder, a BentoML tag (name:version) or a Hugging Face repo id")


def find(source: str) -> None:
    """ModelNotFound when nothing is where `source` points (a store tag the store lacks, a hub id neither
    downloadable nor cached, a path that does not exist); a path that exists is for loading to judge."""
    if Path(source).exists():
        return
    try:
        resolve_source(source)
    except ModelLoadError as exc:
        raise ModelNotFound(f"{exc}. Import a checkpoint with `make import-model SRC=...`") from None
