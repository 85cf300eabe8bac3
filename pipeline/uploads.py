"""Pictures a client sends instead of a prompt (API.md §1): checked before anything is decoded, then made into the
job's `image` asset.

- At most MAX_UPLOAD_BYTES as sent (413), JPEG, PNG or WebP by their content, not their name (400).
- At most MAX_UPLOAD_PIXELS, read from the header before any pixel is decoded (400): a small file can declare a
  huge canvas (a decompression bomb), which would take gigabytes to decode.
- EXIF orientation is applied, so the picture is used upright; the JPEG shown as the job's `image` has its
  transparency flattened onto white, while the upload itself is kept as sent, so that the image stage uses its
  transparency as the cut-out (pipeline/imaging.py trusts an alpha channel when there is one).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_UPLOAD_BYTES = 10 * 2**20  # 10 MiB: a phone's photo, with room to spare
MAX_UPLOAD_MEGAPIXELS = 40  # 40 million pixels: 7300 x 5470, more than any phone camera
MAX_UPLOAD_PIXELS = MAX_UPLOAD_MEGAPIXELS * 1_000_000
FORMATS = ("JPEG", "PNG", "WEBP")  # Pillow's names for the formats we take
IMAGE_JPEG_QUALITY = 95

IMAGE_TOO_LARGE = f"Image too large (max {MAX_UPLOAD_BYTES // 2**20} MiB)"
TOO_MANY_PIXELS = f"Image has too many pixels (max {MAX_UPLOAD_MEGAPIXELS} megapixels)"
UNSUPPORTED = "Unsupported image format: send a JPEG, PNG or WebP picture"
EMPTY = "The image is empty"
NOT_BASE64 = "Invalid image: send the picture's bytes as a base64 string"

_DATA_URI = re.compile(r"data:[\w.+/-]*(;[\w=.-]+)*;base64,", re.ASCII)


class UploadError(Exception):
    """A picture we do not take: the HTTP status (400 or 413) and the sentence for the client."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


@dataclass(frozen=True)
class Upload:
    """An accepted picture: the bytes as sent, and the job's `image` (JPEG, upright, transparency on white)."""

    data: bytes
    jpeg: bytes
    width: int  # upright, pixels
    height: int


def decode_base64(text: str) -> bytes:
    """The picture of a JSON body: base64 (RFC 4648 §4), optionally as a data URI (`data:image/png;base64,...`),
    which is what a browser's FileReader gives. Its size is checked before it is decoded."""
    text = _DATA_URI.sub("", text.strip(), count=1)
    if len(text) // 4 * 3 > MAX_UPLOAD_BYTES + 3:
        raise UploadError(413, IMAGE_TOO_LARGE)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError(400, NOT_BASE64) from None


def read_upload(data: bytes) -> Upload:
    """Check and decode a picture (blocking: run it in a thread); UploadError says why it is refused."""
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(413, IMAGE_TOO_LARGE)
    if not data:
        raise UploadError(400, EMPTY)
    try:
        # Reads the header only. Pillow refuses a canvas past twice its own limit here already (~179 MP).
        opened = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        raise UploadError(400, UNSUPPORTED) from None
    except Image.DecompressionBombError:
        raise UploadError(400, TOO_MANY_PIXELS) from None
    with opened:
        width, height = opened.size
        if width * height > MAX_UPLOAD_PIXELS:
            raise UploadError(400, TOO_MANY_PIXELS)
        try:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data after a valid header
            raise UploadError(400, f"The image could not be read ({_reason(exc)})") from None
        return Upload(data=data, jpeg=_flat_jpeg(upright), width=upright.width, height=upright.height)


def _flat_jpeg(image: Image.Image) -> bytes:
    """JPEG of the picture with any transparency composited onto white (JPEG has no alpha)."""
    rgba = image.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    buffer = io.BytesIO()
    flat.convert("RGB").save(buffer, format="JPEG", quality=IMAGE_JPEG_QUALITY)
    return buffer.getvalue()


def _reason(exc: Exception) -> str:
    text = str(exc).strip().rstrip(".")
    return text or type(exc).__name__
