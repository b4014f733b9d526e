"""Test data built in code: photo-like images, masks, records, encoded files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

import masks as rle


def make_photo(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: a gradient sky, a 'sun', a 'house' with a 'window', light noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float64)
    img[..., 0] = 90 + 60 * yy / h
    img[..., 1] = 140 + 40 * xx / w
    img[..., 2] = 220 - 50 * yy / h
    sun = (yy - h * 0.2) ** 2 + (xx - w * 0.8) ** 2 < (min(h, w) * 0.12) ** 2
    img[sun] = (250, 220, 60)
    house = (yy > h * 0.45) & (yy < h * 0.95) & (xx > w * 0.15) & (xx < w * 0.55)
    img[house] = (170, 60, 40)
    window = (yy > h * 0.55) & (yy < h * 0.7) & (xx > w * 0.25) & (xx < w * 0.35)
    img[window] = (240, 240, 250)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def house_masks(h: int, w: int) -> list[np.ndarray]:
    """Nested masks matching make_photo: house (whole), window (part), sun, lower half."""
    yy, xx = np.mgrid[0:h, 0:w]
    house = (yy > h * 0.45) & (yy < h * 0.95) & (xx > w * 0.15) & (xx < w * 0.55)
    window = (yy > h * 0.55) & (yy < h * 0.7) & (xx > w * 0.25) & (xx < w * 0.35)
    sun = (yy - h * 0.2) ** 2 + (xx - w * 0.8) ** 2 < (min(h, w) * 0.12) ** 2
    lower = yy >= h // 2
    return [house, window, sun, lower]


def record(mask: np.ndarray, **extra) -> dict:
    """A SAM2 automatic-mask-generator record for a boolean mask."""
    out = {
        "segmentation": rle.encode(mask),
        "area": int(mask.sum()),
        "bbox": rle.bbox_of(mask),
        "predicted_iou": 0.9,
        "stability_score": 0.95,
        "point_coords": [[0, 0]],
        "crop_box": [0, 0, mask.shape[1], mask.shape[0]],
    }
    out.update(extra)
    return out


def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


class RecordsSegmenter:
    """A Segmenter that answers with the records it was given (to test the pipeline on known masks)."""

    engine = "fixed test segmenter"
    prompts_natively = True

    def __init__(self, masks_for_shape):
        self.masks_for_shape = masks_for_shape
        self.calls = 0

    def generate(self, image, *, progress=None, cancel=None):
        self.calls += 1
        h, w = image.shape[:2]
        return [record(m) for m in self.masks_for_shape(h, w)]

    def segment(self, image, *, points=None, point_labels=None, box=None, progress=None, cancel=None):
        """The smallest of its masks holding every include point and no exclude point."""
        h, w = image.shape[:2]
        labels = point_labels or [1] * len(points or [])
        fits = [
            m
            for m in self.masks_for_shape(h, w)
            if all(bool(m[int(y), int(x)]) == bool(lab) for (x, y), lab in zip(points or [], labels))
        ]
        if not fits:
            from errors import SegmentationRejected

            raise SegmentationRejected("No mask fits those points.")
        return record(min(fits, key=lambda m: int(m.sum())))

    def prepare(self, image):
        pass

    def health(self):
        return True, "ready"

    def close(self):
        pass
