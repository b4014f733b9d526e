"""Turning what people upload into an upright RGB array, safely; and encoding images back out.

Every failure is an InvalidInput / LimitExceeded with a sentence a person can act on. Pixel data is
never decoded before the size has been checked (a few-KB PNG can claim 30000×30000 pixels).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from errors import InvalidInput, LimitExceeded

MIN_SIDE = 8
READABLE = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# Our guard is MAX_IMAGE_PIXELS, checked on the header's size before any pixel is decoded. PIL's own guard
# stays on (this module changes no process-wide setting): its warning above Image.MAX_IMAGE_PIXELS (89 MP)
# is silenced where we open images, and its refusal above twice that is translated into our message.
_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


def _too_large(pixels: str, max_pixels: int) -> LimitExceeded:
    """The one refusal of an image over the pixel limit; `pixels` is "W×H = N.N" or "N.N" megapixels."""
    return LimitExceeded(
        f"The image is {pixels} megapixels; the limit is {max_pixels / 1e6:.1f} megapixels "
        "(MAX_IMAGE_PIXELS). Downscale it and try again."
    )


def _bomb(exc: Image.DecompressionBombError, max_pixels: int) -> LimitExceeded:
    """PIL refused the header's size (over twice Image.MAX_IMAGE_PIXELS): our message, with the size PIL gives."""
    found = _PIL_PIXELS.search(str(exc))
    limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
    if found is None:
        return _too_large(f"more than {limit / 1e6:.1f}", limit)
    return _too_large(f"{int(found.group(1)) / 1e6:.1f}", limit)


def _mb(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB"


def decode_base64(text: str, field: str = "original_image_b64") -> bytes:
    """Base64 or a `data:image/...;base64,` URL → bytes; messages name the request's `field`."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"{field} is empty: send the image as base64 or a data: URL.")
    text = text.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidInput(f"{field} is a data: URL without base64 data.")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64.") from None


def load_image(data: bytes, *, max_pixels: int, max_bytes: int) -> np.ndarray:
    """Image file bytes → upright RGB uint8 HxWx3 array (EXIF rotation applied, alpha over white)."""
    if len(data) == 0:
        raise InvalidInput("The uploaded file is empty.")
    if len(data) > max_bytes:
        raise LimitExceeded(f"The upload is {_mb(len(data))}; the limit is {_mb(max_bytes)} (MAX_UPLOAD_MB).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise _bomb(exc, max_pixels) from exc
    except UnidentifiedImageError:
        raise InvalidInput(f"This file is not an image Mask Studio can read ({READABLE}).") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"This image could not be read ({exc}).") from exc
    w, h = im.size
    if w * h > max_pixels:
        raise _too_large(f"{w}×{h} = {w * h / 1e6:.1f}", max_pixels)
    if min(w, h) < MIN_SIDE:
        raise InvalidInput(f"The image is {w}×{h} pixels; Mask Studio needs at least {MIN_SIDE}×{MIN_SIDE}.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated GIF/WebP/APNG: the first frame
            im.load()
            return to_rgb(ImageOps.exif_transpose(im) or im)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidInput(f"The image file is damaged or incomplete ({exc}).") from exc


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode → RGB uint8: 16/32-bit scaled down (not clipped), transparency composited over white."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif arr.size and arr.max() > 255:
            arr = arr * (255.0 / arr.max())
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        out = (rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return out.astype(np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def encode_png(arr: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Lossless PNG (RGB or RGBA by the array's channels); level 1 is ~2x faster than PIL's default."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(arr: np.ndarray, *, quality: int = 95) -> bytes:
    """JPEG without chroma subsampling: fast, and flat colours stay within a level or two."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """A stored image back to RGB (its size was checked at upload: PIL's size warning is not repeated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def display_shape(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(h, w) scaled so the longer side is at most max_side (never upscaled)."""
    h, w = shape
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Downscale an RGB(A) array for display (PIL's reduce + bilinear: fast and smooth)."""
    h, w = shape
    if arr.shape[:2] == (h, w):
        return arr
    im = Image.fromarray(arr)
    return np.asarray(im.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0))
