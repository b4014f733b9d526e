"""validation: one exact message per kind of mistake, and the cleaned values that pass."""

from __future__ import annotations

import numpy as np
import pytest

from errors import InvalidInput
from validation import check_mask_id, check_point, check_prompt, point_outside

W, H = 128, 96
OUTSIDE = "is outside the image, which is 128×96 pixels (x from 0 to 127, y from 0 to 95)."


@pytest.mark.parametrize(
    "x, y, expected",
    [(0, 0, (0, 0)), (127, 95, (127, 95)), (5.9, 0.2, (5, 0)), (127.99, 95.5, (127, 95))],
)
def test_check_point_floors_to_pixels(x, y, expected):
    assert check_point(x, y, W, H) == expected


@pytest.mark.parametrize(
    "x, y, message",
    [
        (128, 0, f"Point (128, 0) {OUTSIDE}"),
        (-1, 5, f"Point (-1, 5) {OUTSIDE}"),
        (5, 96, f"Point (5, 96) {OUTSIDE}"),
        (-0.5, 5, f"Point (-0.5, 5) {OUTSIDE}"),
        (float("nan"), 5, "x must be a finite number, got nan."),
        (5, float("inf"), "y must be a finite number, got inf."),
        ("3", 5, "x must be a number (a pixel coordinate), got '3'."),
        (True, 5, "x must be a number (a pixel coordinate), got True."),
        (None, 5, "x must be a number (a pixel coordinate), got None."),
        ("z" * 100, 5, f"x must be a number (a pixel coordinate), got '{'z' * 56}...."),
    ],
)
def test_check_point_refusals(x, y, message):
    with pytest.raises(InvalidInput) as info:
        check_point(x, y, W, H)
    assert info.value.message == message


@pytest.mark.parametrize(
    "x, y, shown",
    [
        (3, 0, "(3, 0)"),
        (2.5, 1.0, "(2.5, 1)"),
        (np.int64(7), np.int32(-1), "(7, -1)"),
        (np.float32(1.5), 9, "(1.5, 9)"),
    ],
)
def test_point_outside_writes_numbers_as_a_person_would(x, y, shown):
    assert (
        point_outside(x, y, 3, 1)
        == f"Point {shown} is outside the image, which is 3×1 pixels (x from 0 to 2, y from 0 to 0)."
    )


@pytest.mark.parametrize("value, expected", [(0, 0), (7, 7), (3.0, 3)])
def test_check_mask_id_accepts_whole_numbers(value, expected):
    assert check_mask_id(value) == expected and type(check_mask_id(value)) is int


@pytest.mark.parametrize(
    "value, message",
    [
        (2.5, "mask_id must be a whole number, got 2.5."),
        ("4", "mask_id must be a whole number, got '4'."),
        (True, "mask_id must be a whole number, got True."),
        (None, "mask_id must be a whole number, got None."),
        ([1], "mask_id must be a whole number, got [1]."),
    ],
)
def test_check_mask_id_refusals(value, message):
    with pytest.raises(InvalidInput) as info:
        check_mask_id(value)
    assert info.value.message == message


@pytest.mark.parametrize(
    "points, labels, box, expected",
    [
        ([[10, 20]], None, None, ([[10, 20]], [1], None)),
        ([[10.7, 20.2], (30, 40)], [1, 0], None, ([[10, 20], [30, 40]], [1, 0], None)),
        (None, None, [0, 0, 128, 96], (None, None, [0.0, 0.0, 128.0, 96.0])),
        ([[5, 5]], [0], (1, 2, 3.5, 4), ([[5, 5]], [0], [1.0, 2.0, 3.5, 4.0])),
        ([], [], [1, 1, 2, 2], (None, None, [1.0, 1.0, 2.0, 2.0])),
    ],
)
def test_check_prompt_cleans_what_passes(points, labels, box, expected):
    assert check_prompt(points, labels, box, W, H) == expected


BOX_INSIDE = "must have x0 < x1 and y0 < y1 inside the image, which is 128×96 pixels."
PAIRS = "points must be a list of [x, y] pairs, e.g. [[120, 80], [200, 90]]."
LABELS = "point_labels must be a list of 1 (include) and 0 (exclude), one per point."
NOTHING = "Give at least one include point (label 1) or a box."


@pytest.mark.parametrize(
    "points, labels, box, message",
    [
        (None, None, None, NOTHING),
        ([], None, None, NOTHING),
        ([[1, 1]], [0], None, NOTHING),
        ("1,1", None, None, PAIRS),
        ([[1, 1, 1]], None, None, PAIRS),
        ([1, 1], None, None, PAIRS),
        ([[1, 1]] * 65, None, None, "At most 64 points, got 65."),
        ([[500, 5]], None, None, f"Point (500, 5) {OUTSIDE}"),
        ([[1, 1]], [2], None, LABELS),
        ([[1, 1]], [True], None, LABELS),
        ([[1, 1]], "1", None, LABELS),
        ([[1, 1], [2, 2]], [1], None, "point_labels has 1 labels for 2 points: give one per point."),
        (None, [1], None, "point_labels has 1 labels for 0 points: give one per point."),
        (None, None, [1, 2, 3], "box must be [x0, y0, x1, y1] in pixels."),
        (None, None, [1, 2, 3, "4"], "box must be [x0, y0, x1, y1] in pixels."),
        (None, None, [0, 0, float("inf"), 4], "box must be [x0, y0, x1, y1] in pixels."),
        (None, None, [10, 10, 5, 20], f"box [10, 10, 5, 20] {BOX_INSIDE}"),
        (None, None, [0, 0, 129, 96], f"box [0, 0, 129, 96] {BOX_INSIDE}"),
        (None, None, [-1, 0, 5, 5], f"box [-1, 0, 5, 5] {BOX_INSIDE}"),
    ],
)
def test_check_prompt_refusals(points, labels, box, message):
    with pytest.raises(InvalidInput) as info:
        check_prompt(points, labels, box, W, H)
    assert info.value.message == message
