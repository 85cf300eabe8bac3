"""Turning Grok's picture into TripoSR's input, offline (numpy, scipy, scikit-image, Pillow; no weights).

TripoSR wants one object, matted, centred, filling `foreground_ratio` of a square, on 0.5 gray. Grok is asked
for exactly that kind of picture: one object on a plain light background. So the background is modelled from
the picture's border (a smooth colour field, to follow gradients and vignetting), every pixel is compared
with it in CIELAB (distances there follow perceived difference), and what differs is the object — except soft
shadows, which are darker than the background with its hue and fade out gently, while an object's outline is
a sharp edge. Morphology, the main component(s) and hole filling clean the mask up.

When the border is not a plain colour (a busy scene), no matting is attempted: the whole picture is framed and
a warning is logged, so the job goes on with a worse but honest input.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import ndimage
from skimage.color import rgb2lab

from pipeline.errors import StageError

log = logging.getLogger("grok3d.imaging")

WORK_SIDE = 512  # segmentation runs at this size: fast, and shadow softness is judged at a known scale
BORDER_FRACTION = 0.03  # the strip that samples the background
PLAIN_MIN_INLIERS = 0.5  # at least this share of the border must match the background model
MIN_THRESHOLD_DE = 4.5  # smallest colour distance (ΔE76) that counts as "not background"
SHADOW_EDGE_SHARPNESS = 2.0  # ΔE per pixel at WORK_SIDE: shadows fade slower than this, objects do not
KEEP_COMPONENT_SHARE = 0.15  # components at least this share of the largest one are parts of the object
GRAY = 0.5  # TripoSR's background


@dataclass(frozen=True)
class Prepared:
    """TripoSR's input and how it was made."""

    image: Image.Image  # size × size RGB, the object composited on 0.5 gray
    mask: np.ndarray  # bool, the input picture's height × width: True on the object
    plain_background: bool  # False: no plain background was found and the whole picture was framed
    warning: str | None = None

    def png_bytes(self) -> bytes:
        return to_png_bytes(self.image)


def to_png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_for_triposr(image_bytes: bytes, size: int = 512, foreground_ratio: float = 0.85) -> Prepared:
    """Matte the object in `image_bytes` and frame it for TripoSR."""
    if not 0 < foreground_ratio <= 1:
        raise ValueError("foreground_ratio must be in (0, 1].")
    rgb, alpha_channel = _decode(image_bytes)
    warning = None
    if alpha_channel is not None:
        # The picture brings its own matte (a PNG with transparency): trust it.
        alpha = alpha_channel
        plain = True
    else:
        mask_small, plain, reason = _segment(_downscale(rgb))
        if mask_small is None:
            warning = f"No object could be separated from the background ({reason}); framing the whole picture."
            log.warning(warning)
            alpha = np.ones(rgb.shape[:2], dtype=np.float32)
        else:
            alpha = _upscale_mask(mask_small, rgb.shape[:2])
    framed = _frame(rgb, alpha, size, foreground_ratio)
    return Prepared(image=framed, mask=alpha >= 0.5, plain_background=plain, warning=warning)


class TripoSRImagePreparer:
    """Implements `pipeline.stages.ImagePreparer`; the CPU work runs in a thread, off the event loop."""

    def __init__(self, size: int = 512, foreground_ratio: float = 0.85) -> None:
        self.size = size
        self.foreground_ratio = foreground_ratio

    async def prepare_image(self, jpeg: bytes) -> bytes:
        prepared = await asyncio.to_thread(prepare_for_triposr, jpeg, self.size, self.foreground_ratio)
        return prepared.png_bytes()


# ---- decoding ------------------------------------------------------------------------------------------
def _decode(image_bytes: bytes) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB floats in [0, 1], and the alpha channel when the picture has real transparency."""
    try:
        with Image.open(io.BytesIO(image_bytes)) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise StageError(f"The generated image could not be read: {_reason(exc)}.") from None
    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        if rgba[..., 3].min() < 0.99:
            alpha = rgba[..., 3]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return rgb, alpha


def _reason(exc: Exception) -> str:
    text = str(exc)
    return "not a picture Pillow can decode" if "cannot identify" in text or not text else text.rstrip(".")


def _downscale(rgb: np.ndarray) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = WORK_SIDE / max(height, width)
    if scale >= 1:
        return rgb
    image = Image.fromarray(np.round(rgb * 255).astype(np.uint8))
    small = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _upscale_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The small mask as a soft alpha at full size (bilinear, so edges are anti-aliased)."""
    if mask.shape == shape:
        return mask.astype(np.float32)
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    resized = image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


# ---- segmentation --------------------------------------------------------------------------------------
def _segment(rgb: np.ndarray) -> tuple[np.ndarray | None, bool, str]:
    """(mask, plain background?, why there is no mask)."""
    lab = rgb2lab(ndimage.gaussian_filter(rgb, sigma=(1.0, 1.0, 0.0)))
    fit = _fit_background(lab)
    if fit is None:
        return None, False, "the border is not a plain background"
    background, noise = fit
    diff = lab - background
    distance = np.linalg.norm(diff, axis=-1)
    threshold = max(MIN_THRESHOLD_DE, 4.0 * noise)
    candidate = distance > threshold
    shadow_like = candidate & _shadow_like(diff, background[..., 0])
    mask = (candidate & ~shadow_like) | _object_parts_among_shadows(shadow_like, candidate, distance)
    mask = _refine_edges(_clean(mask), distance)
    if not mask.any():
        return None, True, "nothing differs from the plain background"
    return mask, True, ""


def _fit_background(lab: np.ndarray) -> tuple[np.ndarray, float] | None:
    """A smooth (quadratic) colour field fitted to the border, robust to an object touching the border.

    Returns the field over the whole picture and the border's noise level (ΔE), or None when the border
    is not plain (less than PLAIN_MIN_INLIERS of it fits any smooth field)."""
    height, width = lab.shape[:2]
    strip = max(3, round(BORDER_FRACTION * min(height, width)))
    border = np.zeros((height, width), dtype=bool)
    border[:strip], border[-strip:], border[:, :strip], border[:, -strip:] = True, True, True, True
    ys, xs = np.nonzero(border)
    design = _quadratic_design(ys, xs, height, width)
    samples = lab[ys, xs]
    # Start from the median colour, then refit on the pixels that agree with the current model.
    residual = np.linalg.norm(samples - np.median(samples, axis=0), axis=-1)
    inliers = residual < 10.0
    for _ in range(3):
        if inliers.mean() < PLAIN_MIN_INLIERS:
            return None
        coef, *_ = np.linalg.lstsq(design[inliers], samples[inliers], rcond=None)
        residual = np.linalg.norm(samples - design @ coef, axis=-1)
        inliers = residual < 6.0
    if inliers.mean() < PLAIN_MIN_INLIERS:
        return None
    noise = float(np.median(residual[inliers]) * 1.4826)
    grid_y, grid_x = np.mgrid[0:height, 0:width]
    field = _quadratic_design(grid_y.ravel(), grid_x.ravel(), height, width) @ coef
    return field.reshape(height, width, 3), noise


def _quadratic_design(ys: np.ndarray, xs: np.ndarray, height: int, width: int) -> np.ndarray:
    y = ys / max(height - 1, 1) * 2 - 1
    x = xs / max(width - 1, 1) * 2 - 1
    return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)


def _shadow_like(diff: np.ndarray, background_l: np.ndarray) -> np.ndarray:
    """Darker than the background with about its hue, and not near black: what a shadow can look like."""
    d_l = diff[..., 0]
    d_ab = np.linalg.norm(diff[..., 1:], axis=-1)
    return (d_l < 0) & (d_ab < 6.0 + 0.2 * np.abs(d_l)) & (background_l + d_l > 0.3 * background_l)


def _object_parts_among_shadows(shadow_like: np.ndarray, candidate: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """The shadow-like pixels that are really the object (its gray parts).

    A soft shadow fades into the background over many pixels; an object's outline is a step. So the
    shadow-like pixels are cut along sharp edges into regions, and a region is shadow only where it meets the
    background softly. Regions that never meet the background (walled off by sharp edges, or enclosed by the
    object) are object, and so are the edge pixels beside them."""
    gy, gx = np.gradient(distance)
    sharp = np.hypot(gy, gx) > SHADOW_EDGE_SHARPNESS
    edges = shadow_like & ndimage.binary_dilation(sharp)
    labels, count = ndimage.label(shadow_like & ~edges)
    if count == 0:  # nothing but sharp edges: no soft shadow here
        return edges
    meets_background = ndimage.binary_dilation(~candidate)
    soft_contact = ndimage.sum_labels(meets_background, labels, index=np.arange(1, count + 1)) > 0
    objects = np.concatenate([[False], ~soft_contact])[labels]
    return objects | (edges & ndimage.binary_dilation(objects, iterations=3))


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drop specks, keep the main component(s), close small gaps, fill holes."""
    mask = ndimage.binary_opening(mask, structure=_disk(1))
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    keep = np.concatenate([[False], areas >= KEEP_COMPONENT_SHARE * areas.max()])
    mask = keep[labels]
    # Pad before closing so an object touching the border is not eaten away there.
    padded = np.pad(mask, 3, mode="edge")
    mask = ndimage.binary_closing(padded, structure=_disk(2))[3:-3, 3:-3]
    return ndimage.binary_fill_holes(mask)


def _refine_edges(mask: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Move the outline to where the edge is half-way between background and object.

    The picture was smoothed before thresholding, which spreads a strong edge over a couple of pixels, so the
    raw mask carries a thin halo of background. In the outline band, a pixel stays only if it differs from
    the background by at least half as much as the object just inside it does."""
    inner = ndimage.binary_erosion(mask, structure=_disk(3))
    if not inner.any():
        return mask
    band = mask & ~inner
    contrast = ndimage.maximum_filter(np.where(inner, distance, 0.0), size=9)
    keep = ~band | (distance >= 0.5 * contrast)
    return ndimage.binary_fill_holes(mask & keep)


def _disk(radius: int) -> np.ndarray:
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return x * x + y * y <= radius * radius


# ---- framing -------------------------------------------------------------------------------------------
def _frame(rgb: np.ndarray, alpha: np.ndarray, size: int, foreground_ratio: float) -> Image.Image:
    """TripoSR's framing: object bbox padded to a square, then to side / ratio, centred, on 0.5 gray."""
    composite = rgb * alpha[..., None] + GRAY * (1.0 - alpha[..., None])
    picture = Image.fromarray(np.round(composite * 255).astype(np.uint8))
    ys, xs = np.nonzero(alpha >= 0.5)
    if ys.size == 0:  # nothing opaque (a fully transparent picture): frame all of it
        ys, xs = np.nonzero(np.ones_like(alpha, dtype=bool))
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(bottom - top, right - left) / foreground_ratio
    canvas_side = max(1, round(side))
    centre_y, centre_x = (top + bottom) / 2, (left + right) / 2
    offset = (round(canvas_side / 2 - centre_x), round(canvas_side / 2 - centre_y))
    gray = round(GRAY * 255)
    canvas = Image.new("RGB", (canvas_side, canvas_side), (gray, gray, gray))
    canvas.paste(picture, offset)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)
