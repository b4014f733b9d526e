"""Checks on what callers send (points, prompts, mask ids), with one message per kind of mistake.

Every engine and endpoint refuses the same mistake in the same words: the functions here raise
`InvalidInput` with the text a person reads, and return the values cleaned (ints, floats, lists).
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np

from errors import InvalidInput

MAX_POINTS = 64  # more prompt points than anyone clicks: a bigger list is a mistake or an attack


def shown(value: object) -> str:
    """What the caller sent, cut short: a message must not echo a megabyte back."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def point_outside(x: object, y: object, width: int, height: int) -> str:
    """The one sentence for a point that is not on the image, giving the image's size and valid range."""
    return (
        f"Point ({_number(x)}, {_number(y)}) is outside the image, which is {width}×{height} pixels "
        f"(x from 0 to {width - 1}, y from 0 to {height - 1})."
    )


def check_point(x: object, y: object, width: int, height: int) -> tuple[int, int]:
    """Pixel coordinates as ints inside the image (fractions floored), or a message giving the image's size."""
    out = []
    for name, v in (("x", x), ("y", y)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidInput(f"{name} must be a number (a pixel coordinate), got {shown(v)}.")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidInput(f"{name} must be a finite number, got {shown(v)}.")
        out.append(int(math.floor(v)))
    px, py = out
    if not (0 <= px < width and 0 <= py < height):
        raise InvalidInput(point_outside(x, y, width, height))
    return px, py


def check_rgb(image: object) -> None:
    """The image an engine takes: an upright RGB uint8 array of shape (H, W, 3)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidInput(f"The segmenter needs an RGB uint8 image of shape (H, W, 3); got {got}.")


def check_mask_id(mask_id: object) -> int:
    """A mask id as an int (a whole float such as 3.0 is accepted: JSON clients send those)."""
    if (
        isinstance(mask_id, bool)
        or not isinstance(mask_id, (int, float))
        or (isinstance(mask_id, float) and not mask_id.is_integer())
    ):
        raise InvalidInput(f"mask_id must be a whole number, got {shown(mask_id)}.")
    return int(mask_id)


def check_prompt(
    points: object, point_labels: object, box: object, width: int, height: int
) -> tuple[list[list[float]] | None, list[int] | None, list[float] | None]:
    """Point/box prompts checked against the image size: (points, labels, box) ready for a segmenter.

    points: [[x, y], ...] pixels, floored to ints; point_labels: 1 include / 0 exclude, one per point
    (default: all include); box: [x0, y0, x1, y1] inside the image with x0 < x1 and y0 < y1. At least one
    include point or a box. Absent parts come back as None."""
    pts = _check_points(points, width, height)
    labels = _check_labels(point_labels, len(pts))
    bx = _check_box(box, width, height)
    if not any(label == 1 for label in labels) and bx is None:
        raise InvalidInput("Give at least one include point (label 1) or a box.")
    return pts or None, labels or None, bx


def _check_points(points: object, width: int, height: int) -> list[list[float]]:
    # The values are ints (floored); typed float because every Segmenter.segment takes `list[list[float]]`.
    if points is None:
        return []
    if not isinstance(points, (list, tuple)) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in points):
        raise InvalidInput("points must be a list of [x, y] pairs, e.g. [[120, 80], [200, 90]].")
    if len(points) > MAX_POINTS:
        raise InvalidInput(f"At most {MAX_POINTS} points, got {len(points)}.")
    return [list(check_point(p[0], p[1], width, height)) for p in points]


def _check_labels(point_labels: object, n_points: int) -> list[int]:
    if point_labels is None:
        return [1] * n_points
    if not isinstance(point_labels, (list, tuple)) or any(isinstance(v, bool) or v not in (0, 1) for v in point_labels):
        raise InvalidInput("point_labels must be a list of 1 (include) and 0 (exclude), one per point.")
    if len(point_labels) != n_points:
        raise InvalidInput(f"point_labels has {len(point_labels)} labels for {n_points} points: give one per point.")
    return [int(v) for v in point_labels]


def _check_box(box: object, width: int, height: int) -> list[float] | None:
    if box is None:
        return None
    if (
        not isinstance(box, (list, tuple))
        or len(box) != 4
        or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in box)
    ):
        raise InvalidInput("box must be [x0, y0, x1, y1] in pixels.")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InvalidInput(
            f"box {list(box)} must have x0 < x1 and y0 < y1 inside the image, which is {width}×{height} pixels."
        )
    return [x0, y0, x1, y1]


def _number(v: object) -> str:
    """A coordinate as a person wrote it: 5 stays 5, 5.5 stays 5.5; anything else as sent, cut short."""
    if isinstance(v, Integral):
        return str(int(v))
    return f"{float(v):g}" if isinstance(v, Real) else shown(v)
