"""Bake per-corner colours into a texture by rasterising triangles in UV space (numpy only, no Blender).

Cycles can bake an emission shader too, but on one thread it spends ~0.75 s on a 100k-face mesh at 1024 px,
most of a warm conversion. Vertex colours are interpolated linearly across a triangle, which is exactly what a
barycentric rasteriser computes, so this gives the same texels several times faster. Texels outside the islands
are filled from the islands around them, so bilinear lookups at island borders stay in colour.
"""

from __future__ import annotations

import numpy as np


def srgb_encode(linear: np.ndarray) -> np.ndarray:
    """Linear 0..1 -> sRGB-encoded 0..1: the PNG is an sRGB texture, as USD and AR Quick Look expect."""
    linear = np.clip(linear, 0.0, 1.0)
    return np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * np.power(linear, 1.0 / 2.4) - 0.055)


def _rasterise_class(uv_px: np.ndarray, colours: np.ndarray, side: int, size: int, image: np.ndarray,
                     filled: np.ndarray) -> None:
    """Triangles whose pixel bounding box fits in side x side: test all those pixel centres at once."""
    x0 = np.floor(uv_px[:, :, 0].min(axis=1)).astype(np.int64)
    y0 = np.floor(uv_px[:, :, 1].min(axis=1)).astype(np.int64)
    offsets = np.arange(side)
    px = x0[:, None, None] + offsets[None, None, :]  # (T, side, side): x varies along the last axis
    py = y0[:, None, None] + offsets[None, :, None]
    cx, cy = px + 0.5, py + 0.5  # pixel centres
    a, b, c = uv_px[:, 0], uv_px[:, 1], uv_px[:, 2]
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
    det = np.where(np.abs(det) < 1e-9, 1e-9, det)[:, None, None]
    dx, dy = cx - c[:, 0, None, None], cy - c[:, 1, None, None]
    w0 = ((b[:, 1] - c[:, 1])[:, None, None] * dx + (c[:, 0] - b[:, 0])[:, None, None] * dy) / det
    w1 = ((c[:, 1] - a[:, 1])[:, None, None] * dx + (a[:, 0] - c[:, 0])[:, None, None] * dy) / det
    w2 = 1.0 - w0 - w1
    eps = -1e-6
    inside = (w0 >= eps) & (w1 >= eps) & (w2 >= eps) & (px >= 0) & (px < size) & (py >= 0) & (py < size)
    tri, row, col = np.nonzero(inside)
    weights = np.stack([w0[tri, row, col], w1[tri, row, col], w2[tri, row, col]], axis=1)
    value = np.einsum("nk,nkc->nc", weights, colours[tri])
    ys, xs = y0[tri] + row, x0[tri] + col
    image[ys, xs] = value
    filled[ys, xs] = True


def _fill_empty(image: np.ndarray, filled: np.ndarray) -> None:
    """Give every empty texel the average colour of the islands around it (push-pull over an image pyramid).

    This is a bake margin of unlimited width in a few passes over the image: bilinear lookups and the smaller
    mipmap levels a viewer uses at a distance never blend in an unbaked (black) texel.
    """
    size = image.shape[0]
    side = 1 << (size - 1).bit_length()  # the pyramid halves down to 1 pixel: pad to a power of two
    weight = np.zeros((side, side), dtype=np.float32)
    weight[:size, :size] = filled
    total = np.zeros((side, side, image.shape[2]), dtype=np.float32)
    total[:size, :size] = image * filled[..., None]
    levels = []
    while total.shape[0] > 1:
        levels.append((total, weight))
        half = total.shape[0] // 2
        total = total.reshape(half, 2, half, 2, -1).sum(axis=(1, 3))
        weight = weight.reshape(half, 2, half, 2).sum(axis=(1, 3))
    colour = total / np.maximum(weight, 1e-9)[..., None]
    for total, weight in reversed(levels):
        coarse = np.repeat(np.repeat(colour, 2, axis=0), 2, axis=1)
        colour = np.where(weight[..., None] > 0, total / np.maximum(weight, 1e-9)[..., None], coarse)
    empty = ~filled
    image[empty] = colour[:size, :size][empty]


def bake(corner_uv: np.ndarray, corner_colour: np.ndarray, size: int) -> np.ndarray:
    """corner_uv (T, 3, 2) in 0..1, corner_colour (T, 3, C) linear -> (size, size, C) image, row 0 at v = 0."""
    uv_px = corner_uv.astype(np.float32) * np.float32(size)  # float32: exact enough for 8-bit texels, faster
    colours = corner_colour.astype(np.float32)
    image = np.zeros((size, size, colours.shape[2]), dtype=np.float32)
    filled = np.zeros((size, size), dtype=bool)
    extent = np.ceil(uv_px.max(axis=1) - np.floor(uv_px.min(axis=1))).max(axis=1).astype(np.int64) + 1
    side = 2
    while side // 2 < extent.max(initial=0):
        # Bucket triangles by their bounding-box size so small triangles do not pay for large ones.
        chosen = np.nonzero((extent <= side) & (extent > side // 2) if side > 2 else extent <= side)[0]
        chunk = max(1, 2_000_000 // (side * side))  # bounds the temporary arrays to ~2M candidate pixels
        for start in range(0, len(chosen), chunk):
            index = chosen[start : start + chunk]
            _rasterise_class(uv_px[index], colours[index], side, size, image, filled)
        side *= 2
    _fill_empty(image, filled)
    return image
