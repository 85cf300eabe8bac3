"""TripoSR, the network, top to bottom: our own PyTorch code that computes what the original computes.

Upstream: github.com/VAST-AI-Research/TripoSR at commit d26e33181947bbbc4c6fc0f5734e1ec6c080956e (2024-05-14,
MIT licence), with the checkpoint's config.yaml of huggingface.co/stabilityai/TripoSR and the ViT that
transformers 4.35's `ViTModel` builds from facebook/dino-vitb16's config.json. Nothing is copied from those files;
the upstream file each part follows is named where the part begins:

image (PIL) -> preprocess (resize to cond_image_size; tsr/utils.py) -> DINO ViT image tokens
(tsr/models/tokenizers/image.py) -> learned triplane tokens (tsr/models/tokenizers/triplane.py) -> Transformer1D
backbone with cross-attention to the image tokens (tsr/models/transformer/) -> upsampler (ConvTranspose2d;
tsr/models/network_utils.py) -> scene codes [B, 3, C, 2P, 2P]
points -> triplane sampling (tsr/models/nerf_renderer.py) -> NeRF MLP decoder -> density, colour

Parameter names follow the official checkpoint (transformers-4 ViT naming, diffusers-style backbone), so
`model.ckpt` loads strictly. This module imports nothing of loading.py (config.yaml, model.ckpt) or mesh.py (marching
cubes, colours, GLB export): they build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# On a CPU the forward pass keeps every temporary below this: glibc's malloc maps a block of 32 MiB or more afresh from
# the kernel at each allocation and unmaps it when freed (the 100 MiB GEGLU projection, the 50 MiB ViT attention
# scores: about 1.2 million page faults per pass), smaller ones it reuses from its heap (cpu.keep_freed_memory).
# 24 MiB: GEGLU's blocks of 768 rows, which MKL multiplies bit for bit like the whole matrix at 1 and 2 threads.
CPU_BLOCK_BYTES = 24 * 2**20
# Under bf16 autocast on a CPU the backbone's residual stream stays float32 (Transformer1D.forward): rounded to bf16
# after each of its 48 sublayers it moved the mesh by 9.6e-4 (Chamfer distance, resolution 256, seeded official
# weights, float32 grid), kept float32 by 6.9e-4, for float32 adds between the bf16 products. A GPU rounds it (its
# code is left as it was); bench/triposr_precision_cpu.py turns this off to estimate the GPU's modes.
CPU_FLOAT32_RESIDUAL = True


# ---------------------------------------------------------------------------------------------------------
# Configuration: stabilityai/TripoSR's config.yaml and the class defaults it leaves out. Defaults are the
# official values; loading.py fills these from config.yaml.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ViTConfig:
    """The Hugging Face ViTConfig fields the image tokenizer uses (defaults: facebook/dino-vitb16's config.json)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True


@dataclass(frozen=True)
class TripoSRConfig:
    cond_image_size: int = 512
    vit: ViTConfig = field(default_factory=ViTConfig)
    plane_size: int = 32  # tokenizer.plane_size
    triplane_channels: int = 1024  # tokenizer.num_channels
    backbone_in_channels: int = 1024  # ${tokenizer.num_channels}
    num_attention_heads: int = 16
    attention_head_dim: int = 64
    num_layers: int = 16
    cross_attention_dim: int = 768
    norm_num_groups: int = 32  # class default, not in config.yaml
    post_in_channels: int = 1024
    post_out_channels: int = 40
    decoder_in_channels: int = 120
    decoder_neurons: int = 64
    decoder_hidden_layers: int = 9
    decoder_activation: str = "silu"
    radius: float = 0.87
    density_bias: float = -1.0
    density_activation: str = "exp"
    feature_reduction: str = "concat"


# ---------------------------------------------------------------------------------------------------------
# Image tokenizer: DINO ViT-B/16 (upstream tsr/models/tokenizers/image.py; transformers 4.x ViTModel layout)
# ---------------------------------------------------------------------------------------------------------
class ViTPatchEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(pixels).flatten(2).transpose(1, 2)  # [B, h*w, D], patches row by row


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(cfg)

    def interpolated_position_embeddings(self, height: int, width: int) -> torch.Tensor:
        """[1, 1 + h*w, D]: the learned grid resized to the input's patch grid.

        As in transformers 4.35 (the version the original pins): bicubic, align_corners=False, and a *scale
        factor* of (n + 0.1) / grid rather than an explicit size, so source coordinates are (i + 0.5) / s - 0.5.
        """
        pos = self.position_embeddings
        n_pos = pos.shape[1] - 1
        h, w = height // self.cfg.patch_size, width // self.cfg.patch_size
        if h * w == n_pos and height == width:
            return pos
        grid = int(math.sqrt(n_pos))
        dim = pos.shape[-1]
        patch = pos[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(
            patch, scale_factor=((h + 0.1) / grid, (w + 0.1) / grid), mode="bicubic", align_corners=False
        )
        patch = patch.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([pos[:, :1], patch], dim=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, height, width = pixels.shape
        x = self.patch_embeddings(pixels)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        return x + self.interpolated_position_embeddings(height, width)


class ViTSelfAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.value = nn.Linear(d, d, bias=cfg.qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if x.device.type != "cpu":
            return self.attend(q, k, v).transpose(1, 2).reshape(b, n, d)
        # On a CPU a few heads at a time, so the [heads, n, n] scores stay below CPU_BLOCK_BYTES (the same numbers:
        # each head's products are its own).
        q, k, v = (t.reshape(b * self.heads, n, -1) for t in (q, k, v))
        step = max(1, CPU_BLOCK_BYTES // (n * n * x.element_size()))
        parts = [self.attend(q[i : i + step], k[i : i + step], v[i : i + step]) for i in range(0, len(q), step)]
        out = torch.cat(parts)
        return out.view(b, self.heads, n, -1).transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[..., n, dh] each -> [..., n, dh]. As transformers 4.35's ViT: explicit matmul and softmax, not fused."""
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return torch.matmul(scores.softmax(dim=-1), v)


class ViTSelfOutput(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class ViTAttention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTSelfAttention(cfg)
        self.output = ViTSelfOutput(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class ViTDense(nn.Module):
    """Holds one `dense` Linear, as the checkpoint's `intermediate.dense` / `output.dense` names need."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class ViTLayer(nn.Module):
    """Pre-LN block: x += Attn(LN(x)); x += MLP(LN(x)), MLP with exact (erf) GELU."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.attention = ViTAttention(cfg)
        self.intermediate = ViTDense(cfg.hidden_size, cfg.intermediate_size)
        self.output = ViTDense(cfg.intermediate_size, cfg.hidden_size)
        self.layernorm_before = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_hidden_layers))


class ViTPooler(nn.Module):
    """Unused at inference, but its weights are in the checkpoint, so it must exist for strict loading."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class ViTModel(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.embeddings = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.pooler = ViTPooler(cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> last_hidden_state [B, 1 + h*w, D] (CLS first, after final LN)."""
        x = self.embeddings(pixels)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x)


class DINOSingleImageTokenizer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.model = ViTModel(cfg)

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """rgb [B, H, W, 3] in [0, 1] -> image tokens [B, 1 + h*w, D]."""
        # Mean/std are plain constants (the original's buffers are non-persistent: not in the checkpoint).
        mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
        return self.model((rgb.permute(0, 3, 1, 2) - mean) / std)


# ---------------------------------------------------------------------------------------------------------
# Triplane tokens and the backbone (upstream tsr/models/tokenizers/triplane.py, tsr/models/transformer/)
# ---------------------------------------------------------------------------------------------------------
class Triplane1DTokenizer(nn.Module):
    def __init__(self, plane_size: int, num_channels: int) -> None:
        super().__init__()
        self.plane_size = plane_size
        self.embeddings = nn.Parameter(torch.zeros(3, num_channels, plane_size, plane_size))

    def forward(self, batch_size: int) -> torch.Tensor:
        """-> [B, C, 3*P*P]: channels first, tokens plane-major, then row, then column."""
        c = self.embeddings.shape[1]
        return self.embeddings.permute(1, 0, 2, 3).reshape(1, c, -1).expand(batch_size, -1, -1)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, C, 3*P*P] -> [B, 3, C, P, P]."""
        b, c, _ = tokens.shape
        p = self.plane_size
        return tokens.reshape(b, c, 3, p, p).permute(0, 2, 1, 3, 4)


class Attention(nn.Module):
    """Multi-head attention without q/k/v bias (diffusers naming: to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int | None = None) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        split = lambda t: t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        # Softmax scale 1/sqrt(head_dim) (1/8 officially), no mask; the original uses this fused kernel too.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # first half = value, second = gate
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return self.net[2](self.net[0](x))
        # On a CPU in blocks of rows, so GEGLU's [rows, 8 dim] projection stays below CPU_BLOCK_BYTES (each row's
        # numbers are its own: only the blocking of the products changes).
        flat = x.reshape(-1, x.shape[-1])
        rows = max(1, CPU_BLOCK_BYTES // (self.net[0].proj.out_features * x.element_size()))
        out = torch.cat([self.net[2](self.net[0](flat[i : i + rows])) for i in range(0, len(flat), rows)])
        return out.view(*x.shape[:-1], -1)


class BasicTransformerBlock(nn.Module):
    """x += SelfAttn(LN1 x); x += CrossAttn(LN2 x, image tokens); x += FF(LN3 x)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer1D(nn.Module):
    def __init__(self, cfg: TripoSRConfig) -> None:
        super().__init__()
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        self.norm = nn.GroupNorm(cfg.norm_num_groups, cfg.backbone_in_channels, eps=1e-6)
        self.proj_in = nn.Linear(cfg.backbone_in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, cfg.num_attention_heads, cfg.attention_head_dim, cfg.cross_attention_dim)
            for _ in range(cfg.num_layers)
        )
        self.proj_out = nn.Linear(inner, cfg.backbone_in_channels)

    def forward(self, tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """tokens [B, C, N] (channels first), context [B, T, D] -> [B, C, N]."""
        x = self.norm(tokens).transpose(1, 2)  # GroupNorm over channels, then [B, N, C]
        x = self.proj_in(x)
        if x.device.type == "cpu" and CPU_FLOAT32_RESIDUAL:
            x = x.float()  # a no-op in float32
        for block in self.transformer_blocks:
            x = block(x, context)
        return self.proj_out(x).transpose(1, 2) + tokens


class TriplaneUpsampleNetwork(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        """[B, 3, Ci, P, P] -> scene codes [B, 3, Co, 2P, 2P], each plane on its own."""
        b = planes.shape[0]
        out = self.upsample(planes.flatten(0, 1))
        return out.view(b, 3, *out.shape[1:])


# ---------------------------------------------------------------------------------------------------------
# Decoder (upstream tsr/models/network_utils.py NeRFMLP; sampling as tsr/models/nerf_renderer.py)
# ---------------------------------------------------------------------------------------------------------
class NeRFMLP(nn.Module):
    """Linear in->n, SiLU, (hidden-1) x (Linear n->n, SiLU), Linear n->4. Odd indices are activations."""

    def __init__(self, in_channels: int, n_neurons: int, n_hidden_layers: int, activation: str) -> None:
        super().__init__()
        if activation != "silu":
            raise ValueError(f"decoder.activation {activation!r} is not supported (only 'silu')")
        mods: list[nn.Module] = [nn.Linear(in_channels, n_neurons), nn.SiLU()]
        for _ in range(n_hidden_layers - 1):
            mods += [nn.Linear(n_neurons, n_neurons), nn.SiLU()]
        mods.append(nn.Linear(n_neurons, 4))
        self.layers = nn.Sequential(*mods)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


def sample_triplanes(scene_codes: torch.Tensor, points: torch.Tensor, radius: float) -> torch.Tensor:
    """Triplane features at points: codes [B, 3, C, H, W], points [B, N, 3] (model units) -> [B, N, 3C].

    Points are scaled from [-radius, radius] to [-1, 1]; plane 0 is sampled at (x, y), plane 1 at (x, z),
    plane 2 at (y, z), the first coordinate along the plane's width (grid_sample convention). Bilinear,
    align_corners=False, zeros outside; the three samples are concatenated plane-major.
    """
    b, _, c, h, w = scene_codes.shape
    n = points.shape[1]
    # The original maps the range with (p - lo) / (hi - lo) * 2 - 1; kept for bit-level closeness.
    p = (points + radius) / (2 * radius) * 2 - 1
    uv = torch.stack([p[..., [0, 1]], p[..., [0, 2]], p[..., [1, 2]]], dim=1)  # [B, 3, N, 2]
    feats = F.grid_sample(
        scene_codes.reshape(b * 3, c, h, w), uv.reshape(b * 3, 1, n, 2), mode="bilinear", align_corners=False
    )  # [B*3, C, 1, N]
    return feats.view(b, 3, c, n).permute(0, 3, 1, 2).reshape(b, n, 3 * c)


# ---------------------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------------------
class TripoSR(nn.Module):
    def __init__(self, cfg: TripoSRConfig) -> None:
        super().__init__()
        if cfg.feature_reduction != "concat" or cfg.density_activation != "exp":
            raise ValueError("only renderer.feature_reduction 'concat' and density_activation 'exp' are supported")
        self.cfg = cfg
        # Creation order as in upstream tsr/system.py: image_tokenizer, tokenizer, backbone, post_processor, decoder.
        self.image_tokenizer = DINOSingleImageTokenizer(cfg.vit)
        self.tokenizer = Triplane1DTokenizer(cfg.plane_size, cfg.triplane_channels)
        self.backbone = Transformer1D(cfg)
        self.post_processor = TriplaneUpsampleNetwork(cfg.post_in_channels, cfg.post_out_channels)
        self.decoder = NeRFMLP(
            cfg.decoder_in_channels, cfg.decoder_neurons, cfg.decoder_hidden_layers, cfg.decoder_activation
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- image -> scene codes -----------------------------------------------------------------------------
    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images (any size) -> rgb_cond [B, S, S, 3] in [0, 1] (upstream tsr/utils.py: bilinear, antialias)."""
        size = self.cfg.cond_image_size
        out = []
        for image in images:
            arr = np.asarray(image.convert("RGB"), dtype=np.uint8).astype(np.float32) / 255.0
            t = torch.from_numpy(arr).to(self.device).permute(2, 0, 1)[None]
            t = F.interpolate(t, (size, size), mode="bilinear", align_corners=False, antialias=True)
            out.append(t[0].permute(1, 2, 0))
        return torch.stack(out)

    def encode(self, rgb_cond: torch.Tensor) -> dict[str, torch.Tensor]:
        """rgb_cond [B, S, S, 3] -> every stage of the encoder, for debugging against the fixtures' intermediates."""
        image_tokens = self.image_tokenizer(rgb_cond)
        tokens = self.tokenizer(rgb_cond.shape[0])
        backbone_out = self.backbone(tokens, image_tokens)
        triplanes = self.tokenizer.detokenize(backbone_out)
        scene_codes = self.post_processor(triplanes)
        return {
            "image_tokens": image_tokens,
            "backbone_out": backbone_out,
            "triplanes": triplanes,
            "scene_codes": scene_codes,
        }

    @torch.no_grad()
    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        """RGB images (object on 0.5 gray) -> scene codes [B, 3, C, 2P, 2P] (official: [B, 3, 40, 64, 64])."""
        if self.device.type != "cpu":
            return self.encode(self.preprocess(images))["scene_codes"]
        from runners.triposr import cpu

        cpu.keep_freed_memory()
        # On a CPU one picture at a time: its products (3072 rows in the backbone) already keep a few cores busy, so a
        # batch would gain little there, and the pass's memory stays that of one picture, whatever the batch.
        return torch.cat([self.encode(self.preprocess([image]))["scene_codes"] for image in images])

    # -- scene codes -> density, colour ---------------------------------------------------------------------
    @torch.no_grad()
    def query(
        self, scene_codes: torch.Tensor, points: torch.Tensor, chunk_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points [B, N, 3] (model units, within +-radius) -> density [B, N], rgb [B, N, 3].

        chunk_size bounds the points decoded at once over the whole batch (so memory stays bounded); 0 means
        everything at once; None the device's own: 2^21 on a GPU; 2^16 on a CPU, so that a chunk's temporaries stay
        below 32 MiB (the [points, 120] features), the size from which glibc's malloc maps every block afresh from
        the kernel (with 2^21 points each layer's output was 512 MiB of fresh pages).
        """
        b, n, _ = points.shape
        if chunk_size is None:
            chunk_size = 2**16 if scene_codes.device.type == "cpu" else 2**21
        step = n if chunk_size <= 0 else max(1, chunk_size // b)
        # Under bf16 autocast the decoder answers in bf16; exp and sigmoid run in float32 all the same, since the
        # iso-level test and the vertex interpolation read the density to more than bf16's 3 digits.
        out_dtype = torch.promote_types(scene_codes.dtype, torch.float32)
        density = torch.empty(b, n, dtype=out_dtype, device=scene_codes.device)
        rgb = torch.empty(b, n, 3, dtype=out_dtype, device=scene_codes.device)
        for start in range(0, n, step):
            # Points and sampling stay in float32 even when the codes come from a bf16 pass: a bf16 coordinate
            # would be off by up to 1/256 of its value, a shift of a whole grid cell near the box's edge.
            pts = points[:, start : start + step].to(scene_codes.device, out_dtype)
            feats = sample_triplanes(scene_codes.to(out_dtype), pts, self.cfg.radius)
            raw = self.decoder(feats).to(out_dtype)
            density[:, start : start + step] = torch.exp(raw[..., 0] + self.cfg.density_bias)
            rgb[:, start : start + step] = torch.sigmoid(raw[..., 1:4])
        return density, rgb

    @torch.no_grad()
    def density_grid(self, scene_codes: torch.Tensor, resolution: int, chunk_size: int | None = None) -> torch.Tensor:
        """Density on the mesh-extraction grid (mesh.grid_points) for all scenes at once: [B, R, R, R], [ix, iy, iz].

        What query() computes at those R^3 points, factorised: on the grid, each plane is sampled at only R x R
        places and the decoder's first layer is linear in the three planes' features, so that layer is applied to
        the sampled planes once and its three parts are summed per point. That skips sampling 3C features at
        R^3 points and the first layer's per-point products (a fifth of the official decoder's); the numbers differ
        from query()'s by float rounding only. The remaining layers run, by device: on a CPU in cache-sized chunks
        through two reused buffers (cpu.py); in bf16 on a GPU as one kernel (fused.py); else in chunks of 2^21
        points. chunk_size: points decoded at once; None for the device's own (cpu.CHUNK_POINTS on a CPU).
        """
        b, _, c, h, w = scene_codes.shape
        r, dev = resolution, scene_codes.device
        dtype = torch.promote_types(scene_codes.dtype, torch.float32)
        first, rest = self.decoder.layers[0], self.decoder.layers[1:]
        # The same coordinates, scaled as grid_points and sample_triplanes scale them.
        g = torch.linspace(0, 1, r, device=dev) * (2 * self.cfg.radius) - self.cfg.radius
        p = (g + self.cfg.radius) / (2 * self.cfg.radius) * 2 - 1
        uv = torch.stack(torch.meshgrid(p, p, indexing="ij"), dim=-1)  # [R, R, 2]: (first, second) coordinate
        with torch.autocast(dev.type, enabled=False):  # the planes' projections are small: keep them float32
            planes = F.grid_sample(scene_codes.to(dtype).reshape(b * 3, c, h, w), uv.expand(b * 3, r, r, 2),
                                   mode="bilinear", align_corners=False).view(b, 3, c, r, r)
            weight = first.weight.to(dtype).view(-1, 3, c)  # [n, plane, C]: the features are concatenated plane-major
            xy, xz, yz = (torch.einsum("bcij,nc->bijn", planes[:, k], weight[:, k]) for k in range(3))
            xy = xy + first.bias.to(dtype)
        compute = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else dtype
        from runners.triposr import fused  # here, not at the top: it imports Triton, which a CPU never needs

        if compute == torch.bfloat16 and fused.usable(self.decoder, dev):
            return fused.density(xy, xz, yz, self.decoder, self.cfg.density_bias)  # the same MLP in one kernel
        if dev.type == "cpu" and dtype == torch.float32:
            from runners.triposr import cpu

            return cpu.density(xy, xz, yz, rest, self.cfg.density_bias, compute, chunk_size or cpu.CHUNK_POINTS)
        density = torch.empty(b, r, r, r, dtype=dtype, device=dev)
        step = max(1, (chunk_size or 2**21) // (b * r * r))  # x-slices per chunk
        for i in range(0, r, step):
            pre = xy[:, i : i + step, :, None] + xz[:, i : i + step, None] + yz[:, None]  # [B, s, R, R, n]
            raw = rest(pre.to(compute))[..., 0].to(dtype)
            density[:, i : i + step] = torch.exp(raw + self.cfg.density_bias)
        return density
