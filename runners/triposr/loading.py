"""How a TripoSR checkpoint becomes a model.

Where it is (a folder, a BentoML model-store tag, a Hugging Face repo id) is sources.py's part. Loading is strict: every
key of the checkpoint must match the network built from config.yaml, name and shape. Also here: the version string
a job records (`model_version`) and seeded random checkpoints in the official layout (`write_random_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import yaml

from runners.triposr.model import TripoSR, TripoSRConfig, ViTConfig
from runners.triposr.sources import (CONFIG_FILE, DINO_VITB16, WEIGHTS_FILE, ModelLoadError, bento_model,
                                     resolve_source, vit_folder_name)

CONFIG_DIR = Path(__file__).parent / "configs"

_REF = re.compile(r"\$\{([\w.]+)\}")

# The classes the official config.yaml names (upstream d26e331's tsr/ modules): any other class cannot be built by this implementation.
_CLASSES = {
    "image_tokenizer_cls": "tsr.models.tokenizers.image.DINOSingleImageTokenizer",
    "tokenizer_cls": "tsr.models.tokenizers.triplane.Triplane1DTokenizer",
    "backbone_cls": "tsr.models.transformer.transformer_1d.Transformer1D",
    "post_processor_cls": "tsr.models.network_utils.TriplaneUpsampleNetwork",
    "decoder_cls": "tsr.models.network_utils.NeRFMLP",
    "renderer_cls": "tsr.models.nerf_renderer.TriplaneNeRFRenderer",
}
# config.yaml key -> TripoSRConfig field; None as default means required.
_KEYS: dict[str, tuple[str, type, Any]] = {
    "cond_image_size": ("cond_image_size", int, None),
    "tokenizer.plane_size": ("plane_size", int, None),
    "tokenizer.num_channels": ("triplane_channels", int, None),
    "backbone.in_channels": ("backbone_in_channels", int, None),
    "backbone.num_attention_heads": ("num_attention_heads", int, None),
    "backbone.attention_head_dim": ("attention_head_dim", int, None),
    "backbone.num_layers": ("num_layers", int, None),
    "backbone.cross_attention_dim": ("cross_attention_dim", int, None),
    "backbone.norm_num_groups": ("norm_num_groups", int, 32),
    "post_processor.in_channels": ("post_in_channels", int, None),
    "post_processor.out_channels": ("post_out_channels", int, None),
    "decoder.in_channels": ("decoder_in_channels", int, None),
    "decoder.n_neurons": ("decoder_neurons", int, None),
    "decoder.n_hidden_layers": ("decoder_hidden_layers", int, None),
    "decoder.activation": ("decoder_activation", str, "relu"),
    "renderer.radius": ("radius", float, None),
    "renderer.density_bias": ("density_bias", float, -1.0),
    "renderer.density_activation": ("density_activation", str, "trunc_exp"),
    "renderer.feature_reduction": ("feature_reduction", str, "concat"),
}


# ---------------------------------------------------------------------------------------------------------
# config.yaml
# ---------------------------------------------------------------------------------------------------------
def _lookup(root: dict, dotted: str) -> Any:
    node: Any = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _resolve(node: Any, root: dict, depth: int = 0) -> Any:
    """Resolve OmegaConf-style `${a.b}` references (the official file uses `${tokenizer.num_channels}`)."""
    if depth > 20:
        raise ValueError("reference cycle")
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth) for v in node]
    if isinstance(node, str):
        whole = _REF.fullmatch(node)
        if whole:  # a lone reference keeps the referenced value's type
            return _resolve(_lookup(root, whole.group(1)), root, depth + 1)
        return _REF.sub(lambda m: str(_resolve(_lookup(root, m.group(1)), root, depth + 1)), node)
    return node


def read_config(folder: Path) -> TripoSRConfig:
    """config.yaml (+ the ViT config it names) of a model folder -> TripoSRConfig."""
    path = folder / CONFIG_FILE
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ModelLoadError(f"{path}: not a readable YAML file ({e})") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        raw = _resolve(raw, raw)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot resolve reference ${{{e.args[0]}}}") from None
    for key, expected in _CLASSES.items():
        if key in raw and raw[key] != expected:
            raise ModelLoadError(f"{path}: {key} {raw[key]!r} is not supported (expected {expected})")
    values: dict[str, Any] = {}
    missing = []
    for key, (name, kind, default) in _KEYS.items():
        try:
            value = _lookup(raw, key)
        except KeyError:
            if default is None:
                missing.append(key)
                continue
            value = default
        try:
            values[name] = kind(value) if not (kind is int and isinstance(value, float)) else _exact_int(value)
        except (TypeError, ValueError):
            raise ModelLoadError(f"{path}: {key} must be a {kind.__name__}, got {value!r}") from None
    try:
        vit_name = _lookup(raw, "image_tokenizer.pretrained_model_name_or_path")
    except KeyError:
        missing.append("image_tokenizer.pretrained_model_name_or_path")
    if missing:
        raise ModelLoadError(f"{path}: missing required keys: {', '.join(missing)}")
    return TripoSRConfig(vit=read_vit_config(folder, str(vit_name)), **values)


def _exact_int(value: float) -> int:
    if not float(value).is_integer():
        raise ValueError(value)
    return int(value)


def read_vit_config(folder: Path, name: str) -> ViTConfig:
    """`facebook/dino-vitb16` -> the built-in values; otherwise `<folder>/<name>/config.json`."""
    if name == DINO_VITB16:
        return ViTConfig()
    path = folder / name / "config.json"
    # Lexical check (not resolve()): in the Hugging Face cache the files are symlinks into blobs/.
    inside = not Path(name).is_absolute() and ".." not in Path(name).parts
    if not inside or not path.is_file():
        raise ModelLoadError(
            f"{folder / CONFIG_FILE}: image_tokenizer.pretrained_model_name_or_path {name!r} is neither "
            f"{DINO_VITB16!r} nor a folder inside the model folder holding config.json"
        )
    try:
        data = json.loads(path.read_text())
        wanted = {f.name: f.type for f in fields(ViTConfig)}
        cfg = ViTConfig(**{k: data[k] for k in wanted if k in data})
    except (OSError, ValueError, TypeError) as e:
        raise ModelLoadError(f"{path}: not a usable ViT config.json ({e})") from None
    if cfg.hidden_act != "gelu":
        raise ModelLoadError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported (only 'gelu')")
    return cfg


# ---------------------------------------------------------------------------------------------------------
# model.ckpt
# ---------------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state_dict saved with torch.save, read with weights_only=True (no arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign format: torch raises many kinds
        raise ModelLoadError(f"{path}: cannot be read as a PyTorch checkpoint (corrupt or truncated?): {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a flat state_dict of tensors")
    return state


def _names(keys: list[str], limit: int = 10) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def build_model(cfg: TripoSRConfig, state: dict[str, torch.Tensor], where: str) -> TripoSR:
    """Build on the meta device (no random init) and take the checkpoint's tensors, strictly."""
    with torch.device("meta"):
        model = TripoSR(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = ([f"missing keys: {_names(missing)}"] if missing else []) + (
            [f"unexpected keys: {_names(unexpected)}"] if unexpected else []
        )
        raise ModelLoadError(f"{where}: does not match config.yaml; " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise ModelLoadError(f"{where}: tensor shapes do not match config.yaml: {_names(wrong)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def load_folder(folder: str | Path, device: str | torch.device = "cpu") -> TripoSR:
    folder = Path(folder)
    cfg = read_config(folder)
    path = folder / WEIGHTS_FILE
    return build_model(cfg, read_checkpoint(path), str(path)).to(device)


def load_model(source: str | Path, device: str | torch.device = "cpu") -> TripoSR:
    folder, _ = resolve_source(source)
    return load_folder(folder, device)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_version(source: str | Path) -> str:
    """What a job records: `triposr:abc123` (BentoML, `:latest` resolved), `folder:<name>@<sha256[:12]>`,
    or `hf:<repo>@<revision or snapshot sha[:12]>`."""
    text = str(source)
    folder, kind = resolve_source(source)
    if kind == "bentoml":
        return str(bento_model(text).tag)
    if kind == "hf":
        repo, _, revision = text.partition("@")
        return f"hf:{repo}@{(revision or folder.name)[:12]}"
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: file not found")
    return f"folder:{folder.resolve().name}@{file_sha256(path)[:12]}"


# ---------------------------------------------------------------------------------------------------------
# Seeded random checkpoints in the official layout (for make dev, service tests and benchmarks)
# ---------------------------------------------------------------------------------------------------------
def config_for(name: str) -> TripoSRConfig:
    """'official' or 'tiny': the config files shipped in runners/triposr/configs/."""
    if name == "official":
        return read_config_text((CONFIG_DIR / "official.yaml").read_text(), vit=ViTConfig())
    if name == "tiny":
        vit = ViTConfig(**{k: v for k, v in json.loads((CONFIG_DIR / "tiny_vit.json").read_text()).items()
                           if k in {f.name for f in fields(ViTConfig)}})
        return read_config_text((CONFIG_DIR / "tiny.yaml").read_text(), vit=vit)
    raise ValueError(f"unknown config {name!r} (official or tiny)")


def read_config_text(text: str, vit: ViTConfig) -> TripoSRConfig:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / CONFIG_FILE).write_text(text)
        name = vit_folder_name(folder)
        if name:
            (folder / name).mkdir(parents=True)
            (folder / name / "config.json").write_text(json.dumps(vit.__dict__))
        return read_config(folder)


def random_state_dict(cfg: TripoSRConfig, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Seeded weights by the fixtures' rule: keys in sorted order, r ~ N(0, 1) from one generator; norm weights
    1 + 0.02 r, biases 0.02 r, tensors with >= 2 dims r / sqrt(fan-in), the rest 0.02 r. Model key order."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TripoSR(cfg).state_dict().items()}
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(shapes):
        shape = shapes[key]
        r = torch.randn(shape, generator=gen, device=device)
        if "norm" in key and key.endswith(".weight"):
            out[key] = 1 + 0.02 * r
        elif key.endswith(".bias"):
            out[key] = 0.02 * r
        elif len(shape) >= 2:
            out[key] = r * (1.0 / math.sqrt(math.prod(shape[1:])))
        else:
            out[key] = 0.02 * r
    return {k: out[k] for k in shapes}


def random_model(config: str = "tiny", seed: int = 0, device: str | torch.device = "cpu") -> TripoSR:
    cfg = config_for(config)
    return build_model(cfg, random_state_dict(cfg, seed, device), f"random {config} weights")


def write_random_checkpoint(directory: str | Path, config: str = "tiny", seed: int = 0) -> Path:
    """Write config.yaml (+ vit/config.json for tiny) and model.ckpt with seeded random weights; -> the folder."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config_for(config)
    (folder / CONFIG_FILE).write_text((CONFIG_DIR / f"{config}.yaml").read_text())
    if config == "tiny":
        (folder / "vit").mkdir(exist_ok=True)
        (folder / "vit" / "config.json").write_text((CONFIG_DIR / "tiny_vit.json").read_text())
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    torch.save(random_state_dict(cfg, seed), tmp)
    tmp.replace(folder / WEIGHTS_FILE)  # never leave a half-written checkpoint behind
    return folder
