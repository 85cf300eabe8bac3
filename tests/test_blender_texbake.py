"""The UV-space colour baker (pure numpy): exact barycentric interpolation inside triangles, no empty texels."""

from __future__ import annotations

import numpy as np

from converters.blender import texbake


def test_texels_inside_a_triangle_interpolate_its_corner_colours() -> None:
    size = 64
    uv = np.array([[[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]]])
    colour = np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    image = texbake.bake(uv, colour, size)
    for x, y in [(10, 10), (30, 12), (12, 40), (20, 20)]:
        u, v = (x + 0.5) / size, (y + 0.5) / size  # texel centre; row y is at v = (y + 0.5) / size
        w1, w2 = (u - 0.1) / 0.8, (v - 0.1) / 0.8
        expected = (1 - w1 - w2) * colour[0, 0] + w1 * colour[0, 1] + w2 * colour[0, 2]
        np.testing.assert_allclose(image[y, x], expected, atol=1e-5)


def test_texels_outside_the_islands_take_nearby_island_colours() -> None:
    size = 32
    red = np.array([[[0.05, 0.05], [0.3, 0.05], [0.05, 0.3]]])
    green = np.array([[[0.95, 0.95], [0.7, 0.95], [0.95, 0.7]]])
    uv = np.concatenate([red, green])
    colour = np.array([[[1.0, 0, 0]] * 3, [[0, 1.0, 0]] * 3])
    image = texbake.bake(uv, colour, size)
    assert np.all(image.sum(axis=2) > 0.99)  # nothing left black
    assert image[0, 0, 0] > 0.9 and image[31, 31, 1] > 0.9  # the corner next to each island keeps its colour


def test_large_and_tiny_triangles_together() -> None:
    """Bucketing by size: a triangle over the whole texture and thousands of sub-texel ones are all rasterised."""
    rng = np.random.default_rng(0)
    size = 128
    small = rng.uniform(0.55, 0.95, (5000, 1, 2)) + rng.uniform(-0.004, 0.004, (5000, 3, 2))
    large = np.array([[[0.0, 0.0], [0.5, 0.0], [0.0, 1.0]]])
    uv = np.concatenate([large, small])
    colour = np.concatenate([np.full((1, 3, 3), 0.25), np.full((5000, 3, 3), 0.75)])
    image = texbake.bake(uv, colour, size)
    assert np.allclose(image[64, 5], 0.25) and np.allclose(image[5, 30], 0.25)
    assert abs(image[size // 2 :, size // 2 + 20 :].mean() - 0.75) < 0.05


def test_srgb_encoding_matches_the_standard_curve() -> None:
    np.testing.assert_allclose(texbake.srgb_encode(np.array([0.0, 0.0031308, 0.18, 1.0])),
                               [0.0, 0.04045, 0.4613561, 1.0], atol=1e-5)
