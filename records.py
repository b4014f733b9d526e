"""A segmenter's mask records (SAM2 automatic-mask-generator dicts) turned into mask rows: checked, empty masks
dropped, numbered largest first. Pure: a refusal is a SegmentationRejected naming the record."""

from __future__ import annotations

import math
from collections.abc import Callable

import masks as rle
from errors import SegmentationRejected
from storage import MaskRow


def mask_rows(
    image_id: str,
    records: list[dict],
    shape: tuple[int, int],
    max_masks: int,
    new_key: Callable[[], str] | None = None,
) -> list[MaskRow]:
    """Rows for the records' non-empty masks, largest first (ties in the segmenter's order), at most
    `max_masks`; with `new_key` (S3 configured) each row gets an object key and waits for its upload."""
    h, w = shape
    parsed = []
    for i, rec in enumerate(records):
        counts, area = _checked_counts(i, rec, h, w)
        if area:
            parsed.append((area, i, counts, rec))
    parsed.sort(key=lambda p: (-p[0], p[1]))
    rows = []
    for mask_id, (area, _, counts, rec) in enumerate(parsed[:max_masks]):
        bbox = rec.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
            bbox = rle.bbox_of(rle.decode({"size": [h, w], "counts": counts}))
        rows.append(
            MaskRow(
                image_id=image_id,
                mask_id=mask_id,
                counts=counts,
                area=int(area),
                bbox=[int(round(float(v))) for v in bbox],
                predicted_iou=_opt_float(rec.get("predicted_iou")),
                stability_score=_opt_float(rec.get("stability_score")),
                point_coords=rec.get("point_coords"),
                mask_url=None,
                s3_key=new_key() if new_key is not None else None,
                upload_state="pending" if new_key is not None else "none",
            )
        )
    return rows


def _checked_counts(i: int, rec: dict, h: int, w: int) -> tuple[str, int]:
    """Record i's mask as a compressed COCO RLE string of an h×w image, and its area."""
    try:
        seg = rec["segmentation"]
        size = [int(s) for s in seg["size"]]
        counts = seg["counts"]
    except (KeyError, TypeError, ValueError):
        raise SegmentationRejected(f"Mask {i} from the segmenter has no usable 'segmentation'.") from None
    if size != [h, w]:
        raise SegmentationRejected(f"Mask {i} from the segmenter is {size[1]}×{size[0]}, but the image is {w}×{h}.")
    runs = rle.string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if sum(runs) != h * w:
        raise SegmentationRejected(f"Mask {i} from the segmenter has a corrupt RLE.")
    return (counts if isinstance(counts, str) else rle.counts_to_string(runs)), rle.area_of_counts(runs)


def _opt_float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
