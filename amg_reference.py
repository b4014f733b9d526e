"""SAM's standard automatic mask generator, written from its published behaviour: the benchmark's baseline.

What it does (Kirillov et al. 2023, `SamAutomaticMaskGenerator` with its defaults and no crop layers):
1. a regular grid of points_per_side² points, at the centres of a points_per_side × points_per_side tiling of
   the image, decoded points_per_batch at a time, one include point each, three multimask outputs;
2. an output is kept when its predicted IoU > pred_iou_thresh, then when its stability score (on the full-size
   logits: |logits > +offset| / |logits > -offset|) ≥ stability_score_thresh; mask = logits > 0;
3. greedy box NMS over all kept masks (boxes from the masks, score = predicted IoU, IoU > box_nms_thresh removed);
4. what the issue compares against: of those, the masks of at least min_area_fraction of the image.
The predicted-IoU filter runs before the (costly) upscale; SAM upscales first, which gives the same result.
"""

from __future__ import annotations

import threading

import numpy as np

import masks as rle
from auto_masks import Progress, box_nms, boxes_of, stability_score
from errors import SegmentationCancelled


def grid_points(points_per_side: int, h: int, w: int) -> np.ndarray:
    """[n², 2] (x, y) in original pixels: row by row, each at the centre of its cell."""
    side = np.linspace(1 / (2 * points_per_side), 1 - 1 / (2 * points_per_side), points_per_side)
    xs = np.tile(side[None, :], (points_per_side, 1))
    ys = np.tile(side[:, None], (1, points_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2) * np.array([w, h], np.float64)


def generate_reference(
    model,
    emb,
    image: np.ndarray,
    *,
    points_per_side: int = 32,
    points_per_batch: int = 64,
    pred_iou_thresh: float = 0.88,
    stability_score_thresh: float = 0.95,
    stability_score_offset: float = 1.0,
    box_nms_thresh: float = 0.7,
    min_area_fraction: float = 0.001,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> list[dict]:
    """The standard generator's masks of `image` (embedded as `emb`) as SAM2 records, full-size masks under "mask"."""
    h, w = image.shape[:2]
    points = grid_points(points_per_side, h, w)
    kept_masks: list[np.ndarray] = []
    kept_boxes: list[np.ndarray] = []
    kept_iou: list[float] = []
    kept_stab: list[float] = []
    kept_points: list[np.ndarray] = []
    for start in range(0, len(points), points_per_batch):
        if cancel is not None and cancel.is_set():
            raise SegmentationCancelled("The reference generator was cancelled.")
        batch = points[start : start + points_per_batch].astype(np.float32)
        labels = np.ones((len(batch), 1), np.int64)
        low, iou = model.decode(emb, batch[:, None, :], labels, None, multimask=True)
        low = np.asarray(low, np.float32).reshape(-1, *np.shape(low)[-2:])
        iou = np.asarray(iou, np.float32).reshape(-1)
        owner = np.repeat(batch, 3, axis=0)
        passed = np.flatnonzero(iou > pred_iou_thresh)
        for chunk in (passed[i : i + 16] for i in range(0, passed.size, 16)):
            full = np.asarray(model.to_full(emb, low[chunk]), np.float32)
            stab = stability_score(full, 0.0, stability_score_offset)
            for j in np.flatnonzero(stab >= stability_score_thresh):
                mask = full[j] > 0
                box = boxes_of(mask[None])[0]
                kept_boxes.append(box)
                kept_masks.append(mask[box[1] : box[3] + 1, box[0] : box[2] + 1].copy())  # bbox crop: memory
                kept_iou.append(float(iou[chunk[j]]))
                kept_stab.append(float(stab[j]))
                kept_points.append(owner[chunk[j]])
        if progress is not None:
            progress(min(1.0, (start + points_per_batch) / len(points)), "standard generator")
    if not kept_masks:
        return []
    keep = box_nms(np.stack(kept_boxes), np.asarray(kept_iou), box_nms_thresh)
    out = []
    for i in keep:
        x0, y0, x1, y1 = kept_boxes[i]
        mask = np.zeros((h, w), bool)
        mask[y0 : y1 + 1, x0 : x1 + 1] = kept_masks[i]
        area = int(mask.sum())
        if area < min_area_fraction * h * w:
            continue
        out.append(
            {
                "segmentation": rle.encode(mask),
                "area": area,
                "bbox": rle.bbox_of(mask),
                "predicted_iou": kept_iou[i],
                "stability_score": kept_stab[i],
                "point_coords": [[float(kept_points[i][0]), float(kept_points[i][1])]],
                "crop_box": [0, 0, w, h],
                "mask": mask,
            }
        )
    return out
