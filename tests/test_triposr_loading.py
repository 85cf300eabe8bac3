"""Loading TripoSR: strictness, clear errors, the three kinds of source, versions, the official layout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runners.triposr import ModelLoadError, TripoSR, load_model, model_version, write_random_checkpoint
from runners.triposr.loading import config_for, read_config

DATA = Path(__file__).parent / "data" / "triposr-tiny"
ROOT = Path(__file__).parent.parent


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the fixture model folder that a test may damage."""
    dst = tmp_path / "tiny-model"
    dst.mkdir()
    shutil.copy(DATA / "config.yaml", dst)
    shutil.copy(DATA / "model.ckpt", dst)
    shutil.copytree(DATA / "vit", dst / "vit")
    return dst


def resave(folder: Path, edit) -> None:
    state = torch.load(folder / "model.ckpt", weights_only=True)
    edit(state)
    torch.save(state, folder / "model.ckpt")


def test_official_config_on_meta_has_the_official_layout() -> None:
    cfg = read_config_on_official()
    with torch.device("meta"):
        model = TripoSR(cfg)
    state = model.state_dict()
    assert len(state) == 549
    assert sum(t.numel() for t in state.values()) == 419_275_628
    assert {k: tuple(v.shape) for k, v in state.items()} == official_shapes()


def read_config_on_official():
    cfg = config_for("official")
    assert cfg.backbone_in_channels == 1024  # ${tokenizer.num_channels} resolved
    assert cfg.vit.hidden_size == 768 and cfg.vit.num_hidden_layers == 12 and cfg.vit.image_size == 224
    return cfg


def official_shapes() -> dict[str, tuple[int, ...]]:
    """The key names and shapes of facts §2, written out independently of the model code."""
    s: dict[str, tuple[int, ...]] = {}
    vit = "image_tokenizer.model."
    s[vit + "embeddings.cls_token"] = (1, 1, 768)
    s[vit + "embeddings.position_embeddings"] = (1, 197, 768)
    s[vit + "embeddings.patch_embeddings.projection.weight"] = (768, 3, 16, 16)
    s[vit + "embeddings.patch_embeddings.projection.bias"] = (768,)
    for i in range(12):
        p = f"{vit}encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense"):
            s[p + name + ".weight"], s[p + name + ".bias"] = (768, 768), (768,)
        s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = (3072, 768), (3072,)
        s[p + "output.dense.weight"], s[p + "output.dense.bias"] = (768, 3072), (768,)
        for ln in ("layernorm_before", "layernorm_after"):
            s[p + ln + ".weight"], s[p + ln + ".bias"] = (768,), (768,)
    s[vit + "layernorm.weight"], s[vit + "layernorm.bias"] = (768,), (768,)
    s[vit + "pooler.dense.weight"], s[vit + "pooler.dense.bias"] = (768, 768), (768,)
    s["tokenizer.embeddings"] = (3, 1024, 32, 32)
    s["backbone.norm.weight"], s["backbone.norm.bias"] = (1024,), (1024,)
    for name in ("proj_in", "proj_out"):
        s[f"backbone.{name}.weight"], s[f"backbone.{name}.bias"] = (1024, 1024), (1024,)
    for i in range(16):
        p = f"backbone.transformer_blocks.{i}."
        for n in ("norm1", "norm2", "norm3"):
            s[p + n + ".weight"], s[p + n + ".bias"] = (1024,), (1024,)
        for a, kv in (("attn1", 1024), ("attn2", 768)):
            s[p + a + ".to_q.weight"] = (1024, 1024)
            s[p + a + ".to_k.weight"], s[p + a + ".to_v.weight"] = (1024, kv), (1024, kv)
            s[p + a + ".to_out.0.weight"], s[p + a + ".to_out.0.bias"] = (1024, 1024), (1024,)
        s[p + "ff.net.0.proj.weight"], s[p + "ff.net.0.proj.bias"] = (8192, 1024), (8192,)
        s[p + "ff.net.2.weight"], s[p + "ff.net.2.bias"] = (1024, 4096), (1024,)
    s["post_processor.upsample.weight"], s["post_processor.upsample.bias"] = (1024, 40, 2, 2), (40,)
    s["decoder.layers.0.weight"], s["decoder.layers.0.bias"] = (64, 120), (64,)
    for i in range(2, 17, 2):
        s[f"decoder.layers.{i}.weight"], s[f"decoder.layers.{i}.bias"] = (64, 64), (64,)
    s["decoder.layers.18.weight"], s["decoder.layers.18.bias"] = (4, 64), (4,)
    return s


def test_fixture_keys_match_keys_json() -> None:
    model = load_model(DATA)
    keys = json.loads((DATA / "keys.json").read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == keys
    assert model.device == torch.device("cpu")


def test_missing_and_unexpected_keys_are_named(folder: Path) -> None:
    def edit(state: dict) -> None:
        del state["decoder.layers.2.bias"]
        state["decoder.extra.weight"] = torch.zeros(1)

    resave(folder, edit)
    with pytest.raises(ModelLoadError) as err:
        load_model(folder)
    msg = str(err.value)
    assert "model.ckpt" in msg and "decoder.layers.2.bias" in msg and "decoder.extra.weight" in msg


def test_wrong_shape_is_named(folder: Path) -> None:
    resave(folder, lambda s: s.__setitem__("tokenizer.embeddings", torch.zeros(3, 64, 5, 5)))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.embeddings \(3, 64, 5, 5\)"):
        load_model(folder)


def test_truncated_checkpoint_is_a_clear_error(folder: Path) -> None:
    data = (folder / "model.ckpt").read_bytes()
    (folder / "model.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.ckpt: cannot be read as a PyTorch checkpoint"):
        load_model(folder)


def test_garbage_checkpoint_is_a_clear_error(folder: Path) -> None:
    (folder / "model.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        load_model(folder)


def test_config_without_required_keys(folder: Path) -> None:
    text = (folder / "config.yaml").read_text().replace("  num_layers: 2\n", "")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(ModelLoadError, match=r"config\.yaml: missing required keys: backbone\.num_layers"):
        read_config(folder)


def test_config_reference_and_unknown_class(folder: Path) -> None:
    assert read_config(folder).backbone_in_channels == 64  # ${tokenizer.num_channels}
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("${tokenizer.num_channels}", "${tokenizer.nope}"))
    with pytest.raises(ModelLoadError, match=r"cannot resolve reference \$\{tokenizer\.nope\}"):
        read_config(folder)
    (folder / "config.yaml").write_text(text.replace("network_utils.NeRFMLP", "network_utils.Other"))
    with pytest.raises(ModelLoadError, match="decoder_cls"):
        read_config(folder)


def test_missing_vit_folder(folder: Path) -> None:
    shutil.rmtree(folder / "vit")
    with pytest.raises(ModelLoadError, match="'vit' is neither"):
        load_model(folder)


def test_unknown_source() -> None:
    with pytest.raises(ModelLoadError, match="not a folder, a BentoML tag"):
        load_model("./no/such/folder")


def test_folder_version(folder: Path) -> None:
    digest = hashlib.sha256((folder / "model.ckpt").read_bytes()).hexdigest()
    assert model_version(folder) == f"folder:tiny-model@{digest[:12]}"


def test_write_random_checkpoint_loads_and_is_seeded(tmp_path: Path) -> None:
    a = write_random_checkpoint(tmp_path / "a", config="tiny", seed=3)
    b = write_random_checkpoint(tmp_path / "b", config="tiny", seed=3)
    c = write_random_checkpoint(tmp_path / "c", config="tiny", seed=4)
    ma, mb, mc = (load_model(p) for p in (a, b, c))
    sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["decoder.layers.0.weight"], sc["decoder.layers.0.weight"])


def run_py(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_hugging_face_cache_offline(tmp_path: Path) -> None:
    # The hub's cache layout: models--org--name/{refs/main, snapshots/<sha>/..., blobs/<hash>}.
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-triposr"
    snap = repo / "snapshots" / sha
    for rel in ("config.yaml", "model.ckpt", "vit/config.json"):
        data = (DATA / rel).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    code = ("from runners.triposr import load_model, model_version\n"
            "m = load_model('acme/tiny-triposr')\n"
            "print(model_version('acme/tiny-triposr'), m.cfg.cond_image_size)")
    out = run_py(code, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)})
    assert out.splitlines()[-1] == f"hf:acme/tiny-triposr@{sha[:12]} 64"
    missing = run_py("from runners.triposr import load_model\ntry:\n load_model('acme/absent')\n"
                     "except Exception as e: print(type(e).__name__)",
                     {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)})
    assert missing == "ModelLoadError"


def test_bentoml_model_store(tmp_path: Path) -> None:
    code = f"""
import shutil, bentoml
from runners.triposr import load_model, model_version
with bentoml.models.create("triposr") as m:
    for name in ("config.yaml", "model.ckpt"):
        shutil.copy("{DATA}/" + name, m.path_of(name))
    shutil.copytree("{DATA}/vit", m.path_of("vit"))
tag = str(m.tag)
assert model_version("triposr:latest") == tag, (model_version("triposr:latest"), tag)
assert model_version(tag) == tag
print(tag, load_model("triposr:latest").cfg.plane_size)
"""
    out = run_py(code, {"BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"})
    tag, plane = out.splitlines()[-1].split()
    assert tag.startswith("triposr:") and plane == "4"



def _block_png() -> bytes:
    """A 64x64 PNG: a red block on grey."""
    import io

    import numpy as np
    from PIL import Image

    pixels = np.full((64, 64, 3), 128, np.uint8)
    pixels[12:50, 16:44] = (200, 60, 90)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()

def test_a_picture_that_does_not_decode_fails_alone_in_its_batch():
    """The service's batch function answers item by item: the other pictures of the batch still get their GLB."""
    from runners.triposr.inference import reconstruct_encoded
    from runners.triposr.loading import random_model
    from runners.triposr.wire import Failure

    model = random_model("tiny", seed=0)
    good = _block_png()
    knobs = {"resolution": 24, "threshold": 0.5, "size_m": 0.5}
    alone = reconstruct_encoded(model, [good], **knobs)
    mixed = reconstruct_encoded(model, [b"not a picture", good, good[:40]], **knobs)
    assert alone[0][:4] == b"glTF"
    assert mixed == [Failure.unreadable_picture, alone[0], Failure.unreadable_picture]
    assert reconstruct_encoded(model, [b"junk"], **knobs) == [Failure.unreadable_picture]


def test_pictures_of_different_resolutions_share_a_batch():
    """A batch with two marching-cubes grids: one forward pass, a density grid per resolution, and each answer is
    the one its picture gets alone at its own resolution."""
    import io

    import trimesh

    from runners.triposr.inference import reconstruct_encoded
    from runners.triposr.loading import random_model

    model = random_model("tiny", seed=0)
    good = _block_png()
    knobs = {"threshold": 0.5, "size_m": 0.5}
    coarse, fine = (reconstruct_encoded(model, [good], resolution=r, **knobs)[0] for r in (16, 32))
    assert reconstruct_encoded(model, [good, good, good], resolution=[32, 16, 32], **knobs) == [fine, coarse, fine]
    faces = [len(trimesh.load(io.BytesIO(glb), file_type="glb", force="mesh").faces) for glb in (coarse, fine)]
    assert faces[0] < faces[1]  # the finer grid gives the finer mesh
