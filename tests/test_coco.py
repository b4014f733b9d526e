"""COCO export (coco.py) as pure functions, and its round trip through pycocotools' own decoder."""

import numpy as np
from pycocotools import mask as coco_mask

import coco
import masks as rle
from helpers import house_masks
from storage import ImageRow, MaskRow

ROW = ImageRow("house.0123456789ab", "alice", 64, 48, "2026-01-01T00:00:00+00:00", "test engine", 4, "images/h.png")


def _rows() -> list[MaskRow]:
    return [
        MaskRow(ROW.id, i, rle.encode(m)["counts"], int(m.sum()), rle.bbox_of(m), 0.9, None, None, None, None, "none")
        for i, m in enumerate(house_masks(48, 64))
    ]


def test_export_names_the_image_as_its_owner_knows_it():
    rows = _rows()
    out = coco.export(ROW, "house", rows[:2], ["https://x/0.png", None], created="2026-02-02T00:00:00+00:00")
    assert out["info"] == {
        "description": "Mask Studio export of house",
        "date_created": "2026-02-02T00:00:00+00:00",
        "engine": "test engine",
    }
    assert out["images"] == [{"id": 1, "width": 64, "height": 48, "file_name": "house.png", "image_id": "house"}]
    assert out["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    first, second = out["annotations"]
    assert (first["id"], first["mask_id"], first["mask_url"], second["mask_url"]) == (1, 0, "https://x/0.png", None)
    assert first["segmentation"] == {"size": [48, 64], "counts": rows[0].counts} and "color" not in first


def test_colours_only_on_the_masks_that_have_one():
    rows = _rows()
    out = coco.export(ROW, "house", [rows[3], rows[1]], [None, None], created="t", colors={1: "#ff0000"})
    assert [a["mask_id"] for a in out["annotations"]] == [3, 1]  # the order given
    assert [a.get("color") for a in out["annotations"]] == [None, "#ff0000"]


def test_pycocotools_decodes_what_is_exported():
    rows = _rows()
    out = coco.export(ROW, "house", rows, [None] * 4, created="t")
    for ann, expected in zip(out["annotations"], house_masks(48, 64), strict=True):
        seg = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        np.testing.assert_array_equal(coco_mask.decode(seg).astype(bool), expected)
        assert int(coco_mask.area(seg)) == ann["area"]
