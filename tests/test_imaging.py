"""Matting and framing for TripoSR, on synthetic pictures whose true object mask is known."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import StageError
from pipeline.imaging import Prepared, TripoSRImagePreparer, prepare_for_triposr, to_png_bytes
from tests.fakes.xai import draw_object

SIZE = 512


def _canvas(top: tuple[int, int, int], bottom: tuple[int, int, int], size: int = SIZE) -> np.ndarray:
    """A light background with a vertical gradient, as studio backdrops have."""
    t = np.linspace(0, 1, size)[:, None, None]
    column = (1 - t) * np.array(top, dtype=float) + t * np.array(bottom, dtype=float)
    return np.broadcast_to(column, (size, size, 3)).copy()


def _shape_mask(draw_shape, size: int = SIZE) -> np.ndarray:
    layer = Image.new("L", (size, size), 0)
    draw_shape(ImageDraw.Draw(layer))
    return np.asarray(layer) > 127


def _soft_shadow(box: list[int], blur: float, size: int = SIZE) -> np.ndarray:
    layer = Image.new("L", (size, size), 0)
    ImageDraw.Draw(layer).ellipse(box, fill=255)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(blur)), dtype=float) / 255.0


def _paint(picture: np.ndarray, mask: np.ndarray, colour: np.ndarray | tuple[int, int, int]) -> None:
    picture[mask] = np.broadcast_to(np.asarray(colour, dtype=float), picture.shape)[mask]


def _shaded(colour: tuple[int, int, int], light: float, dark: float, size: int = SIZE) -> np.ndarray:
    """The object's colour, lit from the top left: brighter there, darker bottom right."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    factor = light + (dark - light) * (xx + yy) / 2
    return np.clip(np.asarray(colour, dtype=float) * factor[..., None], 0, 255)


def _jpeg(picture: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.round(picture), 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# ---- the pictures ---------------------------------------------------------------------------------------
def object_with_soft_shadow() -> tuple[bytes, np.ndarray]:
    picture = _canvas((242, 240, 236), (226, 224, 220))
    shadow = _soft_shadow([150, 380, 420, 450], blur=14)
    picture *= 1 - 0.45 * shadow[..., None]
    mask = _shape_mask(lambda d: d.ellipse([170, 120, 370, 420], fill=255))
    _paint(picture, mask, _shaded((200, 60, 40), 1.1, 0.7))
    return _jpeg(picture), mask


def white_object_on_light_background() -> tuple[bytes, np.ndarray]:
    picture = _canvas((226, 226, 229), (218, 218, 221))
    shadow = _soft_shadow([140, 400, 400, 460], blur=12)
    picture *= 1 - 0.25 * shadow[..., None]
    mask = _shape_mask(lambda d: d.rounded_rectangle([150, 110, 380, 430], radius=40, fill=255))
    _paint(picture, mask, _shaded((255, 255, 255), 1.0, 0.97))
    return _jpeg(picture, quality=92), mask


def object_touching_the_border() -> tuple[bytes, np.ndarray]:
    picture = _canvas((235, 236, 240), (235, 236, 240))
    mask = _shape_mask(lambda d: d.polygon([(200, 180), (520, 150), (520, 520), (120, 520)], fill=255))
    _paint(picture, mask, _shaded((40, 80, 190), 1.2, 0.8))
    return _jpeg(picture), mask


def object_with_noise_and_jpeg_artefacts() -> tuple[bytes, np.ndarray]:
    rng = np.random.default_rng(7)
    picture = _canvas((238, 238, 234), (230, 230, 226))
    star = [
        (256 + r * np.cos(a), 260 + r * np.sin(a))
        for a, r in zip(np.linspace(0, 2 * np.pi, 10, endpoint=False), [180, 80] * 5)
    ]
    mask = _shape_mask(lambda d: d.polygon(star, fill=255))
    _paint(picture, mask, _shaded((60, 150, 70), 1.1, 0.8))
    picture += rng.normal(0, 8, picture.shape)
    return _jpeg(picture, quality=40), mask


def gray_object_with_soft_shadow() -> tuple[bytes, np.ndarray]:
    # The object looks like a shadow (darker than the background, neutral): only its sharp outline tells it apart.
    picture = _canvas((236, 236, 236), (228, 228, 228))
    shadow = _soft_shadow([130, 400, 400, 470], blur=16)
    picture *= 1 - 0.35 * shadow[..., None]
    mask = _shape_mask(lambda d: d.polygon([(256, 100), (380, 430), (132, 430)], fill=255))
    _paint(picture, mask, _shaded((110, 110, 110), 1.05, 0.9))
    return _jpeg(picture), mask


def busy_scene() -> bytes:
    rng = np.random.default_rng(3)
    layer = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(layer)
    for _ in range(300):
        x, y = rng.integers(-40, SIZE, 2)
        w, h = rng.integers(20, 120, 2)
        draw.rectangle([int(x), int(y), int(x + w), int(y + h)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    buffer = io.BytesIO()
    layer.resize((SIZE, SIZE // 2)).save(buffer, "JPEG", quality=90)  # landscape, to see the square framing
    return buffer.getvalue()


# ---- matting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        object_with_soft_shadow,
        white_object_on_light_background,
        object_touching_the_border,
        object_with_noise_and_jpeg_artefacts,
        gray_object_with_soft_shadow,
    ],
)
def test_mask_matches_the_object(make, caplog: pytest.LogCaptureFixture) -> None:
    picture, truth = make()
    with caplog.at_level(logging.WARNING, logger="grok3d.imaging"):
        prepared = prepare_for_triposr(picture)
    assert prepared.plain_background and prepared.warning is None and not caplog.records
    assert prepared.mask.shape == truth.shape
    assert _iou(prepared.mask, truth) >= 0.9, _iou(prepared.mask, truth)


def test_the_shadow_is_left_out() -> None:
    picture, truth = object_with_soft_shadow()
    mask = prepare_for_triposr(picture).mask
    below_the_object = np.zeros_like(truth)
    below_the_object[425:445, 160:410] = True  # the darkest band of the shadow, outside the object
    assert mask[below_the_object].mean() < 0.05


def test_the_fake_xai_picture_is_matted() -> None:
    buffer = io.BytesIO()
    draw_object("a robot cat", 1024).save(buffer, "JPEG", quality=90)
    prepared = prepare_for_triposr(buffer.getvalue())
    assert prepared.plain_background
    ys, xs = np.nonzero(prepared.mask)
    # The fake draws its object inside x 264..760, y 250..790, with a shadow reaching y 840 below.
    assert 250 <= xs.min() and xs.max() <= 770 and 240 <= ys.min() and ys.max() <= 800
    assert prepared.mask.mean() > 0.12


def test_large_picture_is_matted_at_its_own_size() -> None:
    picture, truth = object_with_soft_shadow()
    big = Image.open(io.BytesIO(picture)).resize((1024, 1024), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=90)
    prepared = prepare_for_triposr(buffer.getvalue())
    big_truth = np.asarray(Image.fromarray(truth).resize((1024, 1024), Image.Resampling.NEAREST))
    assert prepared.mask.shape == (1024, 1024)
    assert _iou(prepared.mask, big_truth) >= 0.9


def test_busy_background_frames_the_whole_picture(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="grok3d.imaging"):
        prepared = prepare_for_triposr(busy_scene())
    assert not prepared.plain_background
    assert prepared.warning and "whole picture" in prepared.warning
    assert any("whole picture" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert prepared.mask.all()
    out = np.asarray(prepared.image, dtype=int)
    # 512 wide, 256 high, framed: square of side 512/0.85 -> the picture spans 0.85 of the width, centred.
    assert np.all(np.abs(out[:20] - 128) <= 1) and np.all(np.abs(out[-20:] - 128) <= 1)
    assert np.all(np.abs(out[:, :20] - 128) <= 1) and np.all(np.abs(out[:, -20:] - 128) <= 1)
    assert np.abs(out[200:312, 60:452] - 128).mean() > 20


# ---- framing --------------------------------------------------------------------------------------------
def _content_box(image: Image.Image) -> tuple[int, int, int, int]:
    out = np.asarray(image, dtype=int)
    ys, xs = np.nonzero(np.abs(out - 128).max(axis=-1) > 12)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


@pytest.mark.parametrize("ratio", [0.85, 0.6])
def test_framing_centres_and_scales_the_object(ratio: float) -> None:
    picture = _canvas((236, 236, 236), (236, 236, 236))
    mask = _shape_mask(lambda d: d.rectangle([60, 300, 259, 399], fill=255))  # 200 wide, 100 high, off centre
    _paint(picture, mask, (30, 30, 160))
    prepared = prepare_for_triposr(_jpeg(picture, 95), size=512, foreground_ratio=ratio)
    assert prepared.image.size == (512, 512) and prepared.image.mode == "RGB"
    top, bottom, left, right = _content_box(prepared.image)
    assert abs((right - left) - 512 * ratio) <= 4
    assert abs((bottom - top) - 512 * ratio / 2) <= 4
    assert abs((left + right) / 2 - 256) <= 2 and abs((top + bottom) / 2 - 256) <= 2
    out = np.asarray(prepared.image, dtype=int)
    assert np.all(np.abs(out[:10] - 128) <= 1)  # the background became 0.5 gray
    assert np.abs(out[256, 256] - np.array([30, 30, 160])).max() <= 12  # the object kept its colour


def test_transparent_png_uses_its_own_alpha() -> None:
    rgba = np.zeros((300, 200, 4), dtype=np.uint8)
    rgba[..., :3] = 250  # a white fringe nobody could separate by colour
    rgba[50:250, 50:150] = (250, 250, 250, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    prepared = prepare_for_triposr(buffer.getvalue())
    truth = rgba[..., 3] > 0
    assert _iou(prepared.mask, truth) > 0.99
    top, bottom, left, right = _content_box(prepared.image)
    assert abs((bottom - top) - 435) <= 4 and abs((right - left) - 218) <= 4


@pytest.mark.parametrize("data", [b"", b"not a picture at all", _jpeg(np.full((64, 64, 3), 200.0))[:300]])
def test_unreadable_picture(data: bytes) -> None:
    with pytest.raises(StageError, match="^The generated image could not be read: "):
        prepare_for_triposr(data)


def test_png_helpers_round_trip() -> None:
    picture, _ = object_touching_the_border()
    prepared: Prepared = prepare_for_triposr(picture)
    png = prepared.png_bytes()
    assert png == to_png_bytes(prepared.image)
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (512, 512)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(prepared.image))


async def test_async_preparer_returns_png() -> None:
    picture, _ = object_with_soft_shadow()
    png = await TripoSRImagePreparer(size=256).prepare_image(picture)
    decoded = Image.open(io.BytesIO(png))
    assert decoded.format == "PNG" and decoded.size == (256, 256) and decoded.mode == "RGB"
    with pytest.raises(StageError, match="could not be read"):
        await TripoSRImagePreparer().prepare_image(b"garbage")
