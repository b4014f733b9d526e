"""Behaviour of the built-in classical segmenter, through its public Segmenter interface."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from pycocotools import mask as coco
from skimage import data

from builtin_segmenter import BuiltinSegmenter
from errors import InvalidInput
from settings import ENGINE_BUILTIN

KEYS = {"segmentation", "area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box"}

# The synthetic scene: grey background, a red square (the object) holding a blue square (its part).
H, W = 200, 240
RED = (slice(40, 160), slice(60, 180))
BLUE = (slice(80, 120), slice(100, 140))
IN_BLUE, IN_RED, IN_BACKGROUND = [120, 100], [75, 60], [20, 20]  # [x, y]


def make_scene() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full((H, W, 3), 128, np.int16)
    image[RED] = (200, 40, 40)
    image[BLUE] = (30, 60, 210)
    image += rng.integers(-6, 7, image.shape, dtype=np.int16)  # a little sensor noise
    return image.clip(0, 255).astype(np.uint8)


def region(*slices: tuple[slice, slice], minus: tuple[slice, slice] | None = None) -> np.ndarray:
    out = np.zeros((H, W), bool)
    for s in slices:
        out[s] = True
    if minus is not None:
        out[minus] = False
    return out


def decode(record: dict) -> np.ndarray:
    return coco.decode(record["segmentation"]).astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def check_record(record: dict, height: int, width: int) -> np.ndarray:
    """Assert the exact SAM2 record shape and types; return the decoded mask."""
    assert set(record) == KEYS
    rle = record["segmentation"]
    assert set(rle) == {"size", "counts"} and rle["size"] == [height, width] and isinstance(rle["counts"], str)
    mask = decode(record)
    assert mask.shape == (height, width)
    assert type(record["area"]) is int and record["area"] == int(mask.sum()) == int(coco.area(rle)) > 0
    assert all(type(v) is int for v in record["bbox"])
    assert record["bbox"] == [int(v) for v in coco.toBbox(rle)]
    assert type(record["predicted_iou"]) is float and 0.0 <= record["predicted_iou"] <= 1.0
    assert type(record["stability_score"]) is float and 0.0 <= record["stability_score"] <= 1.0
    [[x, y]] = record["point_coords"]
    assert type(x) is int and type(y) is int and mask[y, x], "the point must lie inside its mask"
    assert record["crop_box"] == [0, 0, width, height]
    return mask


@pytest.fixture(scope="module")
def segmenter() -> BuiltinSegmenter:
    return BuiltinSegmenter()


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return make_scene()


@pytest.fixture(scope="module", params=["astronaut", "coffee"])
def photo(request) -> tuple[np.ndarray, list[dict]]:
    image = getattr(data, request.param)()
    return image, BuiltinSegmenter().generate(image)


def test_engine_and_health(segmenter):
    assert segmenter.engine == ENGINE_BUILTIN
    assert segmenter.health() == (True, "built-in classical segmenter (offline) ready")


def test_photo_records_have_the_sam2_shape(photo):
    image, records = photo
    assert 10 <= len(records) <= 128
    for record in records:
        check_record(record, *image.shape[:2])


def test_photo_masks_cover_the_image(photo):
    image, records = photo
    covered = np.zeros(image.shape[:2], bool)
    for record in records:
        covered |= decode(record)
    assert covered.mean() >= 0.9


def test_photo_masks_nest_as_a_hierarchy(photo):
    _, records = photo
    decoded = [decode(r) for r in records]
    nested = [
        (i, j)
        for i, small in enumerate(decoded)
        for j, large in enumerate(decoded)
        if records[i]["area"] < records[j]["area"] and not (small & ~large).any()
    ]
    assert len(nested) >= 10
    # Chains of three (whole ⊃ part ⊃ sub-part) exist too.
    inside = {i: {j for a, j in nested if a == i} for i in range(len(records))}
    assert any(inside[j] for i, js in inside.items() for j in js)


def test_photo_has_no_specks_and_no_near_duplicates(photo):
    image, records = photo
    height, width = image.shape[:2]
    assert min(r["area"] for r in records) >= height * width / 2000
    flat = np.stack([decode(r).ravel() for r in records]).astype(np.float32)
    inter = flat @ flat.T
    areas = np.diag(inter)
    union = areas[:, None] + areas[None, :] - inter
    np.fill_diagonal(union, np.inf)
    assert (inter / union).max() <= 0.95


def test_generate_is_deterministic(scene):
    photo = data.chelsea()
    for image in (scene, photo):
        first = BuiltinSegmenter().generate(image)
        second = BuiltinSegmenter().generate(image.copy())
        assert json.dumps(first).encode() == json.dumps(second).encode()


def test_generate_returns_copies_not_the_cache(segmenter, scene):
    records = segmenter.generate(scene)
    expected = json.dumps(records)
    records[0]["area"] = -1
    records.clear()
    assert json.dumps(segmenter.generate(scene)) == expected


def test_scene_masks_are_the_object_and_its_part(segmenter, scene):
    decoded = [check_record(r, H, W) for r in segmenter.generate(scene)]
    square, part = region(RED), region(BLUE)
    assert max(iou(m, square) for m in decoded) > 0.97
    assert max(iou(m, part) for m in decoded) > 0.97


@pytest.mark.parametrize("max_masks", [1, 3, 10])
def test_max_masks_is_honoured_and_coarse_levels_come_first(max_masks):
    image = data.astronaut()
    records = BuiltinSegmenter(max_masks=max_masks).generate(image)
    assert 1 <= len(records) <= max_masks
    covered = np.zeros(image.shape[:2], bool)
    for record in records:
        covered |= decode(record)
    if max_masks > 1:
        assert covered.mean() >= 0.9


def test_max_masks_must_be_positive():
    with pytest.raises(InvalidInput, match="max_masks must be at least 1"):
        BuiltinSegmenter(max_masks=0)


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 2, 3), (8, 8, 3), (1, 50, 3), (50, 1, 3), (3, 700, 3)])
def test_tiny_and_thin_images_give_valid_records(shape):
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    records = BuiltinSegmenter().generate(image)
    assert records, "something sensible, never nothing, for a non-empty image"
    for record in records:
        check_record(record, *shape[:2])


@pytest.mark.parametrize("shape", [(2, 2, 3), (300, 400, 3), (1, 1, 3)])
def test_flat_image_gives_one_whole_image_mask(shape):
    image = np.zeros(shape, np.uint8)
    image[...] = (40, 120, 200)
    [record] = BuiltinSegmenter().generate(image)
    mask = check_record(record, *shape[:2])
    assert mask.all()


def test_greyscale_looking_and_single_channel_images(segmenter):
    grey = data.camera()  # 512x512, 2-D
    as_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    records = segmenter.generate(as_rgb)
    assert len(records) >= 10
    covered = np.zeros(grey.shape, bool)
    for record in records:
        covered |= check_record(record, *grey.shape)
    assert covered.mean() >= 0.9
    assert json.dumps(segmenter.generate(grey)) == json.dumps(records)


def test_large_image_is_worked_at_reduced_resolution():
    image = np.repeat(np.repeat(data.coffee(), 5, axis=0), 5, axis=1)  # 2000x3000
    records = BuiltinSegmenter(max_masks=16).generate(image)
    assert 2 <= len(records) <= 16
    for record in records[:3]:
        check_record(record, 2000, 3000)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((10, 10, 3), np.float32), "dtype uint8, got shape (10, 10, 3) and dtype float32"),
        (np.zeros((10, 10, 2), np.uint8), "shape (H, W, 3)"),
        (np.zeros((0, 10, 3), np.uint8), "The image is empty"),
    ],
)
def test_bad_images_are_refused(segmenter, image, message):
    with pytest.raises(InvalidInput) as info:
        segmenter.generate(image)
    assert message in str(info.value)


def test_progress_is_reported_up_to_one(scene):
    seen: list[tuple[float, str]] = []
    BuiltinSegmenter().generate(scene, progress=lambda f, d: seen.append((f, d)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and all(0 <= f <= 1 for f in fractions)
    assert all(isinstance(d, str) and d for _, d in seen)


def test_concurrent_generate_matches_sequential(scene):
    images = [scene, data.chelsea(), np.ascontiguousarray(scene[::-1])]
    expected = [json.dumps(BuiltinSegmenter().generate(i)) for i in images]
    shared = BuiltinSegmenter(cache_size=2)
    got: dict[int, str] = {}

    def run(k: int) -> None:
        got[k] = json.dumps(shared.generate(images[k % 3]))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(6)] == expected * 2


# ---------------------------------------------------------------- prompts


def test_point_on_the_part_gives_the_part(segmenter, scene):
    mask = check_record(segmenter.segment(scene, points=[IN_BLUE]), H, W)
    assert iou(mask, region(BLUE)) > 0.97


def test_point_on_the_object_gives_the_smallest_mask_under_it(segmenter, scene):
    mask = check_record(segmenter.segment(scene, points=[IN_RED], point_labels=[1]), H, W)
    assert iou(mask, region(RED, minus=BLUE)) > 0.97


def test_two_positive_points_give_the_whole_object(segmenter, scene):
    mask = check_record(segmenter.segment(scene, points=[IN_RED, IN_BLUE]), H, W)
    assert iou(mask, region(RED)) > 0.97


def test_negative_point_excludes_masks_holding_it(segmenter, scene):
    record = segmenter.segment(scene, points=[IN_RED, IN_BLUE], point_labels=[1, 0])
    mask = check_record(record, H, W)
    x, y = IN_BLUE
    assert not mask[y, x] and mask[IN_RED[1], IN_RED[0]]
    assert iou(mask, region(RED, minus=BLUE)) > 0.97


def test_union_when_no_single_mask_qualifies(segmenter, scene):
    # Blue and background are only together in masks that also hold the red ring, which is excluded.
    record = segmenter.segment(scene, points=[IN_BLUE, IN_BACKGROUND, IN_RED], point_labels=[1, 1, 0])
    mask = check_record(record, H, W)
    assert mask[IN_BLUE[1], IN_BLUE[0]] and mask[IN_BACKGROUND[1], IN_BACKGROUND[0]]
    assert not mask[IN_RED[1], IN_RED[0]]
    assert iou(mask, ~region(RED, minus=BLUE)) > 0.97


def test_box_alone_gives_the_mask_best_filling_it(segmenter, scene):
    mask = check_record(segmenter.segment(scene, box=[58, 38, 182, 162]), H, W)
    assert iou(mask, region(RED)) > 0.97
    inner = check_record(segmenter.segment(scene, box=[100, 80, 140, 120]), H, W)
    assert iou(inner, region(BLUE)) > 0.97


def test_result_is_clipped_to_the_box(segmenter, scene):
    record = segmenter.segment(scene, points=[[10, 10]], box=[0, 0, 50, 30])
    mask = check_record(record, H, W)
    assert not mask[30:, :].any() and not mask[:, 50:].any()
    assert mask[:30, :50].mean() > 0.95


def test_segment_works_before_generate_and_on_a_photo():
    image = data.coffee()
    record = BuiltinSegmenter().segment(image, points=[[300, 100]])
    mask = check_record(record, *image.shape[:2])
    assert mask[100, 300]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "Give at least one include point (label 1) or a box."),
        ({"points": []}, "Give at least one include point (label 1) or a box."),
        ({"points": [[240, 5]]}, "Point (240, 5) is outside the image, which is 240×200 pixels"),
        ({"points": [[5, -1]]}, "Point (5, -1) is outside the image, which is 240×200 pixels"),
        ({"points": [[5, 5], [6, 6]], "point_labels": [1]}, "point_labels has 1 labels for 2 points"),
        ({"points": [[5, 5]], "point_labels": [2]}, "point_labels must be a list of 1 (include) and 0 (exclude)"),
        ({"points": [[5, 5]], "point_labels": [0]}, "Give at least one include point (label 1) or a box."),
        ({"points": [["a", 5]]}, "x must be a number (a pixel coordinate), got 'a'."),
        ({"box": [10, 10, 5, 20]}, "x0 < x1 and y0 < y1"),
        ({"box": [1, 2, 3]}, "box must be [x0, y0, x1, y1] in pixels."),
        ({"box": [300, 300, 400, 400]}, "inside the image, which is 240×200 pixels"),
    ],
)
def test_prompt_errors_say_what_to_fix(segmenter, scene, kwargs, message):
    with pytest.raises(InvalidInput) as info:
        segmenter.segment(scene, **kwargs)
    assert message in str(info.value)


def test_close_empties_the_cache_and_the_segmenter_still_works(scene):
    segmenter = BuiltinSegmenter()
    before = segmenter.generate(scene)
    segmenter.close()
    assert segmenter.generate(scene) == before


def test_generate_stops_when_cancelled():
    import threading

    from errors import SegmentationCancelled

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SegmentationCancelled, match="has left"):
        BuiltinSegmenter().generate(make_scene(), cancel=cancel)
