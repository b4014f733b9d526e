"""The fast automatic pass (auto_masks) with the real MobileSAM weights, and its pure helpers on tiny literal arrays."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

import masks as rle
from amg_reference import generate_reference, grid_points
from auto_masks import (
    LATTICE_STEP,
    Guide,
    _Pass,
    box_iou_matrix,
    box_nms,
    boxes_of,
    coarse_to_fine,
    embedding_at,
    generate,
    mask_nms,
    pair_iou,
    stability_score,
)
from errors import SegmentationCancelled

# ---- pure helpers ---------------------------------------------------------------------------------------------


def test_stability_score_counts_pixels_above_plus_and_minus_offset():
    logits = np.array(
        [
            [[-2.0, -0.5, 0.5], [1.5, 2.0, 3.0]],  # > 1: 3 pixels; > -1: 5 pixels
            [[-3.0, -3.0, -3.0], [-3.0, -3.0, -3.0]],  # empty at both cutoffs
            [[5.0, 5.0, -5.0], [-5.0, -5.0, -5.0]],  # sharp edges: stable
        ],
        np.float32,
    )
    np.testing.assert_allclose(stability_score(logits, 0.0, 1.0), [3 / 5, 0.0, 1.0])
    np.testing.assert_allclose(stability_score(logits[:1], 1.0, 1.0), [1 / 4])  # > 2: one pixel; > 0: four


def test_boxes_of_is_inclusive_and_zero_for_an_empty_mask():
    m = np.zeros((3, 4, 5), bool)
    m[0, 1:3, 2:5] = True
    m[1, 3, 0] = True
    np.testing.assert_array_equal(boxes_of(m), [[2, 1, 4, 2], [0, 3, 0, 3], [0, 0, 0, 0]])


def test_box_iou_uses_torchvision_areas():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 9]])
    np.testing.assert_allclose(box_iou_matrix(a, b)[0], [1.0, 50 / 150, 0.0, 0.9])


@pytest.mark.parametrize(
    ("threshold", "kept"),
    [
        (0.95, [1, 0, 2, 3]),  # nothing above 0.95
        (0.85, [1, 2, 3]),  # box 0 has IoU 0.9 with the better-scored box 1
        (0.3, [1, 3]),  # box 2 (IoU 50/150 with box 1) goes too; box 3 is far away
    ],
)
def test_box_nms_keeps_the_best_scored_of_overlapping_boxes(threshold, kept):
    boxes = np.array([[0, 0, 10, 9], [0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    scores = np.array([0.8, 0.9, 0.7, 0.6])
    np.testing.assert_array_equal(box_nms(boxes, scores, threshold), kept)


def _square(top: int, left: int, side: int, size: int = 12) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[top : top + side, left : left + side] = True
    return m


def test_pair_iou_is_exact():
    a, b = _square(0, 0, 4), _square(2, 2, 4)  # overlap 2x2 = 4, union 28
    box_a, box_b = boxes_of(np.stack([a, b]))
    assert pair_iou(a, box_a, 16, b, box_b, 16) == pytest.approx(4 / 28)
    assert pair_iou(a, box_a, 16, _square(8, 8, 4), boxes_of(_square(8, 8, 4)[None])[0], 16) == 0.0


def test_dedupe_drops_a_mask_one_pixel_away_from_a_better_one():
    big = _square(0, 0, 10)  # 100 pixels
    near = big.copy()
    near[9, 9] = False  # IoU 99/100 with big
    part = _square(0, 0, 5)  # nested, IoU 0.25
    other = _square(10, 10, 2)
    stack = np.stack([near, big, part, other])
    np.testing.assert_array_equal(mask_nms(stack, np.array([0.95, 0.9, 0.8, 0.7]), 0.95), [0, 2, 3])
    np.testing.assert_array_equal(mask_nms(stack, np.array([0.5, 0.9, 0.8, 0.7]), 0.95), [1, 2, 3])
    np.testing.assert_array_equal(mask_nms(stack, np.array([0.5, 0.9, 0.8, 0.7]), 0.2), [1, 3])


def test_grid_points_sit_at_cell_centres_row_by_row():
    np.testing.assert_allclose(grid_points(2, 4, 8), [[2, 1], [6, 1], [2, 3], [6, 3]])


def test_coarse_to_fine_ranks_the_4x4_points_first_then_the_8x8_ones():
    rank = coarse_to_fine(16).reshape(16, 16)
    assert sorted(rank.ravel()) == list(range(256))  # every point once
    coarse = rank[2::4, 2::4]  # the 4×4 grid's points, at the centres of its cells
    assert sorted(coarse.ravel()) == list(range(16))
    finer = rank[1::2, 1::2].copy()  # the 8×8 grid's points
    assert sorted(finer.ravel()) == list(range(16, 80))
    np.testing.assert_array_equal(coarse_to_fine(16), coarse_to_fine(16))  # deterministic


def _guide(features, order=None):
    """Four points on one low-res row: (x, y) = (i, 0), low-res pixel (0, i)."""
    n = len(features)
    order = np.arange(n) if order is None else order
    return Guide(np.arange(n), np.zeros(n), np.zeros(n, int), np.arange(n), np.asarray(features, np.float32), order)


def _outputs(*covered_columns, width=4, iou=0.9):
    logits = np.full((3, 1, width), -5.0, np.float32)
    for k, cols in enumerate(covered_columns):
        logits[k, 0, list(cols)] = 5.0
    return logits, np.full(3, iou, np.float32)


def test_the_guide_starts_with_uncovered_points_in_coarse_to_fine_order():
    guide = _guide(np.eye(4), order=np.array([2, 0, 3, 1]))
    assert guide.next_point() == 1
    guide.explore(1, *_outputs([1]))
    assert guide.next_point() == 3  # rank 1 among the points nothing covers
    assert guide.xy(3) == (3.0, 0.0)


def test_a_point_inside_a_mask_that_looks_like_the_prompt_is_explained():
    same, other = [1.0, 0.0], [0.0, 1.0]
    guide = _guide([same, same, other, same])
    guide.explore(0, *_outputs([0, 1, 2], [0, 1, 2], [0]))  # points 1 and 2 inside; 3 outside every mask
    assert guide.next_point() == 3  # uncovered: first
    guide.explore(3, *_outputs([3], [3], [3]))
    assert guide.next_point() == 2  # inside the mask, but it does not look like the prompt: a new thing
    guide.explore(2, *_outputs([2], [2], [2]))
    assert guide.next_point() is None  # point 1 is explained by point 0: the pass is done


def test_the_largest_output_explains_nothing_when_a_smaller_one_passed():
    """Another coin on the tray looks just like the prompt's coin: it lies inside the tray's mask, still open."""
    guide = _guide([[1.0, 0.0]] * 4)
    guide.explore(0, *_outputs([0], [0, 1], [0, 1, 2, 3]))
    assert guide.next_point() == 2
    alone = _guide([[1.0, 0.0]] * 4)
    logits, ious = _outputs([0, 1, 2, 3], [0], [0])
    alone.explore(0, logits, np.array([0.9, 0.2, 0.2], np.float32))  # the only good output: it explains
    assert alone.next_point() is None


def test_poorly_rated_outputs_explain_nothing():
    guide = _guide([[1.0, 0.0]] * 4)
    guide.explore(0, *_outputs([0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3], iou=0.3))
    assert guide.next_point() == 1


def test_a_prompt_spared_its_upscaling_explains_points_from_its_lattice():
    """With step 4 the logits are the lattice's: the point at low-res column c is judged at lattice column c // 4."""
    guide = Guide(np.arange(8), np.zeros(8), np.zeros(8, int), np.arange(8), np.ones((8, 1), np.float32), np.arange(8))
    lattice = np.full((3, 1, 2), -5.0, np.float32)
    lattice[0, 0, 0] = 5.0  # the sub-part covers lattice column 0: low-res columns 0-3
    guide.explore(0, lattice, np.array([0.9, 0.1, 0.1], np.float32), step=4)
    assert guide.next_point() == 4  # 1-3 explained; 4 is the first open point


def test_embedding_at_takes_the_cell_under_each_point_at_unit_length():
    features = np.zeros((2, 4, 4), np.float32)
    features[:, 1, 2] = (3.0, 4.0)  # the cell at row 1, column 2 of a 4×4 map over a 64² input (16 px cells)
    features[:, 3, 3] = (0.0, 2.0)
    # original pixels at half the input's scale: (x, y) = (20, 10) → input (40, 20) → cell (row 1, column 2)
    got = embedding_at(features, np.array([20.0, 31.9]), np.array([10.0, 31.9]), 2.0, 2.0, 64)
    np.testing.assert_allclose(got, [[0.6, 0.8], [0.0, 1.0]])


# ---- with the real weights ----------------------------------------------------------------------------------

CHECKPOINT = Path(__file__).resolve().parent.parent / "models" / "mobile_sam.pt"


@pytest.fixture(scope="module")
def model():
    path = Path(os.environ.get("MOBILESAM_CHECKPOINT", CHECKPOINT))
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"The MobileSAM weights are missing on CI: {path}")
        pytest.skip(f"the MobileSAM weights are not here ({path}); scripts/test.sh downloads them")
    from mobilesam_model import load

    return load(path)


@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return np.ascontiguousarray(data.astronaut()[:, :, :3])


@pytest.fixture(scope="module")
def embedded(model, astronaut):
    return model.embed(astronaut)


@pytest.fixture(scope="module")
def records(model, embedded, astronaut):
    return generate(model, embedded, astronaut, max_masks=128)


def _decoded(records: list[dict]) -> list[np.ndarray]:
    return [rle.decode(r["segmentation"]) for r in records]


class OneStage:
    """The same model through the pass's interface without its optional staged decoding."""

    staged_decoding = False

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name: str):
        return getattr(self.model, name)


def test_a_prompt_that_repeats_an_accepted_mask_is_not_upscaled(model, embedded, astronaut):
    h, w = astronaut.shape[:2]
    state = _Pass(model, embedded, h, w, max_masks=128)
    _, _, step = state.prompt((256.0, 150.0))  # the face: new masks, judged on the upscaled logits
    assert step == 1 and len(state.accepted) >= 1
    accepted = len(state.accepted)
    _, ious, step = state.prompt((256.0, 150.0))  # the same point again: its outputs repeat what was accepted
    assert step == LATTICE_STEP and len(state.accepted) == accepted and ious.max() >= 0.86
    _, _, step = state.prompt((100.0, 460.0))  # somewhere else (the suit): upscaled again
    assert step == 1 and len(state.accepted) > accepted
    assert state.prompts == 3


def test_the_staged_pass_finds_what_the_one_stage_pass_finds(model, embedded, astronaut, records):
    assert model.staged_decoding  # the records fixture ran staged
    one_stage = _decoded(generate(OneStage(model), embedded, astronaut, max_masks=128))
    staged = _decoded(records)
    boxes = [boxes_of(m[None])[0] for m in staged]
    found = sum(
        any(pair_iou(m, boxes_of(m[None])[0], int(m.sum()), s, b, int(s.sum())) >= 0.8 for s, b in zip(staged, boxes))
        for m in one_stage
    )
    assert found >= 0.9 * len(one_stage), (found, len(one_stage))


def test_automatic_masks_are_deterministic(model, embedded, astronaut, records):
    again = generate(model, embedded, astronaut, max_masks=128)
    assert [r["segmentation"] for r in again] == [r["segmentation"] for r in records]
    assert [r["predicted_iou"] for r in again] == [r["predicted_iou"] for r in records]


def test_records_are_valid_sam2_records(records, astronaut):
    h, w = astronaut.shape[:2]
    assert len(records) >= 10
    for record, mask in zip(records, _decoded(records)):
        assert record["segmentation"]["size"] == [h, w]
        assert record["area"] == int(mask.sum()) >= 0.001 * h * w * 0.5
        assert record["bbox"] == rle.bbox_of(mask)
        assert record["crop_box"] == [0, 0, w, h]
        assert 0.0 <= record["predicted_iou"] <= 1.5 and 0.0 <= record["stability_score"] <= 1.0
        [[x, y]] = record["point_coords"]
        assert 0 <= x < w and 0 <= y < h


def test_no_two_masks_are_near_duplicates(records):
    decoded = _decoded(records)
    boxes = boxes_of(np.stack(decoded))
    areas = [int(m.sum()) for m in decoded]
    for i in range(len(decoded)):
        for j in range(i):
            assert pair_iou(decoded[i], boxes[i], areas[i], decoded[j], boxes[j], areas[j]) < 0.95, (i, j)


def test_masks_are_hierarchical(records):
    """Some mask lies (almost) wholly inside a clearly larger one: whole / part / sub-part."""
    decoded = _decoded(records)
    nested = 0
    for i, part in enumerate(decoded):
        for j, whole in enumerate(decoded):
            if i != j and whole.sum() >= 1.5 * part.sum() and (part & whole).sum() >= 0.95 * part.sum():
                nested += 1
                break
    assert nested >= 3


def test_at_most_max_masks(model, embedded, astronaut):
    few = generate(model, embedded, astronaut, max_masks=5)
    assert 1 <= len(few) <= 5


def test_progress_and_masks_arrive_as_they_are_made(model, embedded, astronaut, records):
    fractions: list[float] = []
    arrived: list[dict] = []
    out = generate(
        model,
        embedded,
        astronaut,
        max_masks=128,
        progress=lambda f, text: fractions.append(f),
        on_masks=arrived.extend,
    )
    assert arrived == out and [r["segmentation"] for r in out] == [r["segmentation"] for r in records]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_cancel_stops_the_pass(model, embedded, astronaut):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SegmentationCancelled):
        generate(model, embedded, astronaut, max_masks=128, cancel=cancel)
    later = threading.Event()
    calls = []

    def progress(fraction, text):
        calls.append(fraction)
        later.set()  # the person leaves after the first batch

    with pytest.raises(SegmentationCancelled):
        generate(model, embedded, astronaut, max_masks=128, progress=progress, cancel=later)
    assert len(calls) == 1


def test_reference_generator_keeps_filtered_box_nms_masks(model, embedded, astronaut):
    found = generate_reference(model, embedded, astronaut, points_per_side=4)
    assert found
    boxes = np.array([[b[0], b[1], b[0] + b[2] - 1, b[1] + b[3] - 1] for b in (r["bbox"] for r in found)])
    ious = box_iou_matrix(boxes, boxes)
    assert (ious[~np.eye(len(found), dtype=bool)] <= 0.7).all()
    for r in found:
        assert r["predicted_iou"] > 0.88 and r["stability_score"] >= 0.95
        assert r["area"] == int(r["mask"].sum()) >= 0.001 * astronaut.shape[0] * astronaut.shape[1]
