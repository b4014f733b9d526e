"""COCO export as pure functions: an image's rows in, a COCO dict (RLE segmentations, one category) out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from storage import ImageRow, MaskRow


def annotation(m: MaskRow, size: tuple[int, int], mask_url: str | None) -> dict:
    """One mask of an image of `size` (h, w) as a COCO annotation (ids from 1), Mask Studio's fields last."""
    return {
        "id": m.mask_id + 1,
        "image_id": 1,
        "category_id": 1,
        "segmentation": {"size": list(size), "counts": m.counts},
        "area": m.area,
        "bbox": m.bbox,
        "iscrowd": 1,
        "mask_id": m.mask_id,
        "predicted_iou": m.predicted_iou,
        "stability_score": m.stability_score,
        "point_coords": m.point_coords,
        "mask_url": mask_url,
    }


def export(
    row: ImageRow,
    shown_id: str,
    masks: Sequence[MaskRow],
    urls: Sequence[str | None],
    *,
    created: str,
    colors: Mapping[int, object] | None = None,
) -> dict:
    """A COCO dict of `masks` (in the order given; `urls[i]` is masks[i]'s URL) of the image `row`, which
    its owner knows as `shown_id`; a mask listed in `colors` (by mask id) carries its colour."""
    colors = colors or {}
    annotations = []
    for m, url in zip(masks, urls, strict=True):
        ann = annotation(m, (row.height, row.width), url)
        if m.mask_id in colors:
            ann["color"] = colors[m.mask_id]
        annotations.append(ann)
    return {
        "info": {"description": f"Mask Studio export of {shown_id}", "date_created": created, "engine": row.engine},
        "images": [
            {"id": 1, "width": row.width, "height": row.height, "file_name": f"{shown_id}.png", "image_id": shown_id}
        ],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }
