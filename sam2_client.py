"""Segmenters: the `Segmenter` interface every engine implements, and the factory that picks one.

Engines:
- the built-in classical segmenter (`builtin_segmenter.BuiltinSegmenter`), used when SAM_API_URL is unset;
- the external SAM2 service client (HTTP, this module), used when SAM_API_URL is set.

A mask record has the SAM2 automatic-mask-generator shape:
    {"segmentation": {"size": [h, w], "counts": "<COCO compressed RLE>"}, "area": int,
     "bbox": [x, y, w, h], "predicted_iou": float | None, "stability_score": float | None,
     "point_coords": [[x, y]] | None, "crop_box": [x, y, w, h]}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

# progress(fraction 0..1, description)
Progress = Callable[[float, str], None]


class Segmenter(Protocol):
    engine: str  # shown to people: which engine produced the masks

    def generate(self, image: np.ndarray, *, progress: Progress | None = None) -> list[dict]:
        """Automatic masks of an upright RGB uint8 HxWx3 image, as SAM2 records (overlapping, unsorted)."""

    def segment(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
    ) -> dict:
        """One object's mask from point prompts (label 1 include, 0 exclude) and/or a box [x0, y0, x1, y1]."""

    def health(self) -> tuple[bool, str]:
        """(ok, a short sentence for the status line); must not block for long."""

    def close(self) -> None:
        """Release connections and threads."""
