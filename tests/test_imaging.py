"""Every kind of upload either works (upright RGB) or gets a sentence a person understands."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

import imaging
from errors import InvalidInput, LimitExceeded
from helpers import encode, make_photo

LIMITS = {"max_pixels": 40_000_000, "max_bytes": 5 * 1024 * 1024}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(w: int = 30000, h: int = 30000) -> bytes:
    """A few-hundred-byte PNG that claims w×h pixels (its pixels are never decoded by us)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def test_photo_png_round_trips_exactly():
    arr = make_photo(40, 60)
    np.testing.assert_array_equal(imaging.load_image(encode(arr), **LIMITS), arr)


@pytest.mark.parametrize(
    "data, error, message",
    [
        (b"", InvalidInput, "The uploaded file is empty."),
        (b"hello, this is not an image at all", InvalidInput, "not an image Mask Studio can read"),
        (encode(make_photo(64, 64))[:300], InvalidInput, "damaged or incomplete"),
        (encode(np.zeros((1, 1, 3), np.uint8)), InvalidInput, "is 1×1 pixels; Mask Studio needs at least 8×8"),
        (bomb_png(10000, 5000), LimitExceeded, "10000×5000 = 50.0 megapixels; the limit is 40.0 megapixels"),
        (bomb_png(), LimitExceeded, "The image is 900.0 megapixels; the limit is 40.0 megapixels"),  # PIL's refusal
        (b"\x89PNG" + b"\x00" * (6 * 1024 * 1024), LimitExceeded, "the limit is 5.0 MB (MAX_UPLOAD_MB)"),
    ],
    ids=["empty", "not-an-image", "truncated-png", "1x1", "over-the-limit", "decompression-bomb", "too-large"],
)
def test_bad_uploads_get_clear_messages(data, error, message):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's size warning (over 89 MP) must not escape either
        with pytest.raises(error) as info:
            imaging.load_image(data, **LIMITS)
    assert message in info.value.message


def test_pils_own_guard_stays_on():
    """Importing imaging changes no process-wide setting: PIL still refuses a bomb opened elsewhere."""
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(bomb_png()))


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (16, 12), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    arr = imaging.load_image(buf.getvalue(), **LIMITS)
    assert arr.shape == (12, 16, 3)
    assert tuple(arr[5, 5]) == (255, 0, 0)


def test_rgba_is_composited_over_white():
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :5, 3] = 255  # left opaque red, right fully transparent
    arr = imaging.load_image(encode(rgba), **LIMITS)
    assert tuple(arr[0, 0]) == (200, 0, 0)
    assert tuple(arr[0, 9]) == (255, 255, 255)


def test_16_bit_png_is_scaled_not_clipped():
    grey16 = np.full((10, 10), 32896, np.uint16)  # 128 * 257
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    arr = imaging.load_image(buf.getvalue(), **LIMITS)
    assert tuple(arr[3, 3]) == (128, 128, 128)


def test_greyscale_and_cmyk_jpeg():
    grey = np.full((12, 12), 77, np.uint8)
    assert tuple(imaging.load_image(encode(grey), **LIMITS)[0, 0]) == (77, 77, 77)
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    r, g, b = imaging.load_image(buf.getvalue(), **LIMITS)[8, 8]
    assert r > 240 and g < 15 and b < 15


def test_exif_rotated_phone_jpeg_is_upright():
    # Stored 40 wide × 20 high, left half red; orientation 6 means "rotate 90° clockwise to view".
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    arr = imaging.load_image(data, **LIMITS)
    assert arr.shape == (40, 20, 3)  # what the person sees: 20 wide × 40 high
    # Rotating clockwise puts the stored left (red) half at the top.
    assert arr[5, 10, 0] > 200 and arr[35, 10, 2] > 200


@pytest.mark.parametrize(
    "text, message",
    [("", "empty"), ("not base64!!", "not valid base64"), ("data:image/png,abc", "without base64 data")],
)
def test_bad_base64(text, message):
    with pytest.raises(InvalidInput, match=message):
        imaging.decode_base64(text)


def test_base64_and_data_url():
    import base64

    raw = encode(make_photo(16, 16))
    b64 = base64.b64encode(raw).decode()
    assert imaging.decode_base64(b64) == raw
    assert imaging.decode_base64("data:image/png;base64," + b64) == raw
