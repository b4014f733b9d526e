"""render.py: exact colours on tiny literal arrays, agreement with a float64 reference, the index, errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

import render
from errors import InvalidInput, LimitExceeded, NotFound

# A 1×3 photo and two overlapping masks: mask 0 covers pixels 0 and 1, mask 1 covers pixels 1 and 2.
PHOTO = np.array([[[100, 100, 100], [200, 0, 50], [10, 20, 30]]], dtype=np.uint8)
M0 = np.array([[True, True, False]])
M1 = np.array([[False, True, True]])
ONLY_M0 = np.array([[True, False, False]])
NOTHING = np.zeros((1, 3), dtype=bool)


def tiny_index(*masks: np.ndarray) -> render.MaskIndex:
    return render.MaskIndex.build((1, 3), enumerate(masks))


def paint(steps, background="original", masks=(M0, M1), image=PHOTO) -> np.ndarray:
    return render.render(image, render.MaskIndex.build(image.shape[:2], enumerate(masks)), steps, background)


# ---- every colour form, over the photo ------------------------------------------------------
# Hand-computed at pixel 0 (photo 100, 100, 100) under mask 0 alone: out = a·colour + (1 − a)·100,
# a = alpha / 255, rounded to nearest. With a = 128/255: 128 + 49.80 = 177.80 → 178 and 49.80 → 50.
COLOUR_FORMS = [
    ([255, 0, 0, 255], (255, 0, 0, 255), [255, 0, 0]),
    ([255, 0, 0], (255, 0, 0, 255), [255, 0, 0]),
    ((0, 255, 0, 255), (0, 255, 0, 255), [0, 255, 0]),
    ([255, 0, 0, 128], (255, 0, 0, 128), [178, 50, 50]),
    ([255, 0, 0, 0], (255, 0, 0, 0), [100, 100, 100]),
    ([255.0, 0, 0, 128.0], (255, 0, 0, 128), [178, 50, 50]),
    (np.array([0, 0, 255, 128]).tolist(), (0, 0, 255, 128), [50, 50, 178]),
    ("#00ff00", (0, 255, 0, 255), [0, 255, 0]),
    ("#0000FF80", (0, 0, 255, 128), [50, 50, 178]),
    ("  #0000ff80 ", (0, 0, 255, 128), [50, 50, 178]),
    ("rgb(0, 0, 255)", (0, 0, 255, 255), [0, 0, 255]),
    ("rgba(255, 255, 255, 0.5)", (255, 255, 255, 128), [178, 178, 178]),
    ("rgba(254.6, 0.4, 0, 1)", (255, 0, 0, 255), [255, 0, 0]),
    ("RGBA(0,0,255,0.50196)", (0, 0, 255, 128), [50, 50, 178]),
    ("original", "original", [100, 100, 100]),
    ("Original", "original", [100, 100, 100]),
    # default_color(0) is (242, 36, 36, 128): 121.47 + 49.80 = 171.28 → 171; 18.07 + 49.80 = 67.87 → 68.
    (None, (242, 36, 36, 128), [171, 68, 68]),
]


@pytest.mark.parametrize(("value", "parsed", "pixel0"), COLOUR_FORMS)
def test_colour_forms_parse_and_paint(value, parsed, pixel0):
    assert render.parse_color(value, 0) == parsed
    out = paint([(0, render.parse_color(value, 0))], masks=(ONLY_M0,))
    np.testing.assert_array_equal(out[0, 0], pixel0)
    np.testing.assert_array_equal(out[0, 1:], PHOTO[0, 1:])  # unpainted pixels keep the photo


def test_default_colours_are_deterministic_distinct_and_half_transparent():
    colours = [render.default_color(i) for i in range(64)]
    assert colours == [render.default_color(i) for i in range(64)]
    assert render.default_color(0) == (242, 36, 36, 128)
    assert len(set(colours)) == 64
    assert all(c[3] == 128 and all(0 <= v <= 255 for v in c) for c in colours)


# ---- every background --------------------------------------------------------------------------
RED_HALF = (255, 0, 0, 128)
# Mask 0 (pixels 0 and 1) painted RED_HALF; pixel 2 is unpainted. a = 128/255, 1 − a = 127/255.
BACKGROUND_TABLE = [
    # original: pixel 0 → 128 + 49.80; pixel 1 (200, 0, 50) → 128 + 99.61 = 227.61, 0, 24.90
    ("original", [[178, 50, 50], [228, 0, 25], [10, 20, 30]]),
    # dim: the photo halved (50, 50, 50) → 128 + 24.90 = 152.90; pixel 2 → 5, 10, 15
    ("dim", [[153, 25, 25], [178, 0, 12], [5, 10, 15]]),
    ("black", [[128, 0, 0], [128, 0, 0], [0, 0, 0]]),
    # white: 128 + 127 = 255 and 127
    ("white", [[255, 127, 127], [255, 127, 127], [255, 255, 255]]),
    ("transparent", [[255, 0, 0, 128], [255, 0, 0, 128], [0, 0, 0, 0]]),
]


@pytest.mark.parametrize(("background", "expected"), BACKGROUND_TABLE)
def test_every_background(background, expected):
    out = paint([(0, RED_HALF)], background)
    assert out.dtype == np.uint8
    assert out.shape == (1, 3, 4 if background == "transparent" else 3)
    np.testing.assert_array_equal(out[0], expected)


@pytest.mark.parametrize(
    ("background", "expected"),
    [
        ("original", [[100, 100, 100], [200, 0, 50], [10, 20, 30]]),
        ("dim", [[50, 50, 50], [100, 0, 25], [5, 10, 15]]),
        ("black", [[0, 0, 0]] * 3),
        ("white", [[255, 255, 255]] * 3),
        ("transparent", [[0, 0, 0, 0]] * 3),
    ],
)
def test_backgrounds_with_nothing_painted(background, expected):
    np.testing.assert_array_equal(paint([], background)[0], expected)


@pytest.mark.parametrize(
    ("background", "expected"),
    [
        ("original", [[100, 100, 100], [200, 0, 50], [10, 20, 30]]),
        ("dim", [[100, 100, 100], [200, 0, 50], [5, 10, 15]]),
        ("black", [[100, 100, 100], [200, 0, 50], [0, 0, 0]]),
        ("white", [[100, 100, 100], [200, 0, 50], [255, 255, 255]]),
        ("transparent", [[100, 100, 100, 255], [200, 0, 50, 255], [0, 0, 0, 0]]),
    ],
)
def test_original_colour_is_an_opaque_cutout_on_every_background(background, expected):
    np.testing.assert_array_equal(paint([(0, "original")], background)[0], expected)


def test_original_colour_under_a_later_translucent_mask():
    # Pixel 1: the photo (200, 0, 50) cut out, then mask 1 in half blue: 99.61, 0, 24.90 + 128.
    out = paint([(0, "original"), (1, (0, 0, 255, 128))], "black")
    np.testing.assert_array_equal(out[0], [[100, 100, 100], [100, 0, 153], [0, 0, 128]])


# ---- order -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "pixel1"),
    [
        ([(0, (255, 0, 0, 255)), (1, (0, 0, 255, 255))], [0, 0, 255]),
        ([(1, (0, 0, 255, 255)), (0, (255, 0, 0, 255))], [255, 0, 0]),
        # red, then half blue over it: 255·127/255 = 127, and 128
        ([(0, (255, 0, 0, 255)), (1, (0, 0, 255, 128))], [127, 0, 128]),
        ([(1, (0, 0, 255, 128)), (0, (255, 0, 0, 255))], [255, 0, 0]),
    ],
)
def test_later_masks_paint_over_earlier_ones(steps, pixel1):
    np.testing.assert_array_equal(paint(steps)[0, 1], pixel1)


def test_the_same_mask_twice_blends_twice():
    # Pixel 0: 177.80 after the first coat; 128 + 177.80·127/255 = 216.55 → 217; 49.80·127/255 = 24.80 → 25.
    out = paint([(0, RED_HALF), (0, RED_HALF)])
    np.testing.assert_array_equal(out[0, 0], [217, 25, 25])
    # Later wins: the same mask repainted opaque hides the first coat.
    np.testing.assert_array_equal(paint([(0, RED_HALF), (0, (0, 255, 0, 255))])[0, 0], [0, 255, 0])


def test_transparent_background_two_translucent_layers():
    # Pixel 1: alpha = a + a(1 − a) = 0.752 → 191.75 → 192; straight colour R = 63.75 / 0.752 = 84.78 → 85,
    # B = 128 / 0.752 = 170.22 → 170.
    out = paint([(0, RED_HALF), (1, (0, 0, 255, 128))], "transparent")
    np.testing.assert_array_equal(out[0], [[255, 0, 0, 128], [85, 0, 170, 192], [0, 0, 255, 128]])


# ---- agreement with a float64 reference ------------------------------------------------------------
def reference(image, masks, steps, background):
    """Straightforward float64 source-over, one full-frame mask at a time, rounded once at the end."""
    photo = image.astype(np.float64)
    h, w = image.shape[:2]
    alpha = np.zeros((h, w))
    if background == "transparent":
        acc = np.zeros((h, w, 3))  # premultiplied
    else:
        acc = {"original": photo, "dim": photo * 0.5, "black": np.zeros((h, w, 3))}.get(background)
        acc = np.full((h, w, 3), 255.0) if acc is None else acc.copy()
    for mid, colour in steps:
        m = masks[mid]
        if colour == "original":
            acc[m] = photo[m]
            alpha[m] = 1.0
            continue
        a = colour[3] / 255.0
        acc[m] = a * np.array(colour[:3], dtype=np.float64) + (1 - a) * acc[m]
        alpha[m] = a + (1 - a) * alpha[m]
    if background != "transparent":
        return np.floor(acc + 0.5).astype(np.uint8)
    rgb = np.where(alpha[..., None] > 0, acc / np.maximum(alpha, 1e-300)[..., None], 0.0)
    return np.floor(np.dstack([rgb, alpha * 255.0]) + 0.5).astype(np.uint8)


def random_scene(seed: int, h: int = 37, w: int = 53, n: int = 12):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for i in range(n):
        kind = i % 3
        if kind == 0:  # rectangle
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m = (yy >= y0) & (yy < y0 + rng.integers(1, h)) & (xx >= x0) & (xx < x0 + rng.integers(1, w))
        elif kind == 1:  # ellipse
            cy, cx, ry, rx = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, h), rng.uniform(2, w)
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:  # speckle
            m = rng.random((h, w)) < rng.uniform(0.05, 0.6)
        masks.append(m)
    masks.append(np.zeros((h, w), bool))  # an empty mask is allowed and paints nothing
    steps = []
    for _ in range(30):
        mid = int(rng.integers(0, n + 1))
        r = rng.random()
        colour = "original" if r < 0.15 else tuple(int(v) for v in rng.integers(0, 256, 4))
        steps.append((mid, colour))
    return image, masks, steps


@pytest.mark.parametrize("background", render.BACKGROUNDS)
@pytest.mark.parametrize("seed", range(6))
def test_matches_float64_reference_within_one(seed, background):
    image, masks, steps = random_scene(seed)
    index = render.MaskIndex.build(image.shape[:2], enumerate(masks))
    got = render.render(image, index, steps, background).astype(int)
    want = reference(image, masks, steps, background).astype(int)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1


def test_render_bands_cover_every_row(monkeypatch):
    # Narrow bands force many band boundaries, including a short last band.
    monkeypatch.setattr(render, "_BAND_PIXELS", 3 * 53 + 7)
    image, masks, steps = random_scene(11)
    index = render.MaskIndex.build(image.shape[:2], enumerate(masks))
    want = reference(image, masks, steps, "dim").astype(int)
    assert np.abs(render.render(image, index, steps, "dim").astype(int) - want).max() <= 1


@pytest.mark.parametrize("background", ["original", "transparent"])
def test_large_frames_split_over_two_threads_render_the_same(monkeypatch, background):
    # Small frames take the one-thread path; lowering the threshold sends them down the two-thread path.
    image, masks, steps = random_scene(5, h=41, w=29)
    index = render.MaskIndex.build(image.shape[:2], enumerate(masks))
    monkeypatch.setattr(render, "_BAND_PIXELS", 29 * 3)
    one = render.render(image, index, steps, background)
    monkeypatch.setattr(render, "_PARALLEL_PIXELS", 1)
    np.testing.assert_array_equal(render.render(image, index, steps, background), one)
    want = reference(image, masks, steps, background).astype(int)
    assert np.abs(one.astype(int) - want).max() <= 1


# ---- the index -------------------------------------------------------------------------------------
def test_masks_at_lists_every_mask_smallest_first_ties_by_id():
    big = np.ones((4, 5), bool)
    mid_a = np.zeros((4, 5), bool)
    mid_a[1:3, 1:4] = True  # 6 px
    mid_b = np.zeros((4, 5), bool)
    mid_b[1:4, 2:4] = True  # 6 px, ties with mid_a
    small = np.zeros((4, 5), bool)
    small[2, 2] = True
    index = render.MaskIndex.build((4, 5), [(7, big), (3, mid_b), (5, mid_a), (9, small)])
    assert index.mask_ids == [7, 3, 5, 9]
    assert index.areas == {7: 20, 3: 6, 5: 6, 9: 1}
    assert index.masks_at(2, 2) == [9, 3, 5, 7]
    assert index.masks_at(1, 1) == [5, 7]
    assert index.masks_at(3, 3) == [3, 7]
    assert index.masks_at(0, 0) == [7]


def test_masks_at_an_empty_point_and_outside_the_image():
    index = tiny_index(ONLY_M0)
    assert index.masks_at(2, 0) == []
    with pytest.raises(InvalidInput) as err:
        index.masks_at(3, 0)
    assert str(err.value) == "Point (3, 0) is outside the image, which is 3×1 pixels (x from 0 to 2, y from 0 to 0)."


def test_an_index_without_masks():
    index = render.MaskIndex.build((2, 2), [])
    assert index.mask_ids == [] and index.masks_at(1, 1) == []
    np.testing.assert_array_equal(render.render(np.zeros((2, 2, 3), np.uint8), index, [], "white"), 255)


@pytest.mark.parametrize("seed", range(4))
def test_mask_round_trip_and_masks_at_agree_with_the_masks(seed):
    _, masks, _ = random_scene(seed)
    index = render.MaskIndex.build(masks[0].shape, enumerate(masks))
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(index.mask(i), m)
        assert index.areas[i] == int(m.sum())
    h, w = masks[0].shape
    for y in range(0, h, 5):
        for x in range(0, w, 3):
            under = [i for i, m in enumerate(masks) if m[y, x]]
            assert index.masks_at(x, y) == sorted(under, key=lambda i: (int(masks[i].sum()), i))
    with pytest.raises(NotFound) as err:
        index.mask(99)
    assert str(err.value) == "There is no mask 99 (it has masks 0–12)."


def test_nbytes_counts_the_label_map():
    index = render.MaskIndex.build((30, 40), [(0, np.ones((30, 40), bool))])
    assert index.nbytes >= 30 * 40 * 2


@pytest.mark.parametrize(
    ("shape", "display"), [((37, 53), (20, 29)), ((64, 64), (32, 32)), ((10, 300), (3, 100)), ((5, 7), (5, 7))]
)
def test_display_index_agrees_with_a_nearest_downscale(shape, display):
    _, masks, _ = random_scene(5, *shape)
    full, small = render.build_indexes(shape, enumerate(masks), display)
    assert small is not None and small.shape == display
    for i, m in enumerate(masks):
        as_image = Image.fromarray(m.astype(np.uint8) * 255)
        pil = np.asarray(as_image.resize(display[::-1], Image.Resampling.NEAREST))
        np.testing.assert_array_equal(small.mask(i), pil > 127)
        assert small.areas[i] == int((pil > 127).sum())
        np.testing.assert_array_equal(full.mask(i), m)


def test_build_indexes_without_a_display_copy():
    full, small = render.build_indexes((1, 3), enumerate([M0, M1]), None)
    assert small is None and full.masks_at(1, 0) == [0, 1]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([(0, M0), (0, M1)], "Mask id 0 appears twice."),
        ([("a", M0)], "Mask ids must be integers; got 'a'."),
        ([(0, np.zeros((3, 1), bool))], "Mask 0 is 1×3 but the image is 3×1."),
    ],
)
def test_build_rejects_bad_items(items, message):
    with pytest.raises(InvalidInput) as err:
        render.MaskIndex.build((1, 3), items)
    assert str(err.value) == message


# ---- inputs are never mutated ----------------------------------------------------------------------
def test_inputs_are_never_mutated():
    image, masks, steps = random_scene(3)
    image_before, masks_before, steps_before = image.copy(), [m.copy() for m in masks], copy.deepcopy(steps)
    index, display = render.build_indexes(image.shape[:2], enumerate(masks), (20, 25))
    instructions = [{"mask_id": m, "color": list(c) if isinstance(c, tuple) else c} for m, c in steps]
    instructions_before = copy.deepcopy(instructions)
    parsed = render.parse_instructions(instructions, index, "img")
    for background in render.BACKGROUNDS:
        out = render.render(image, index, parsed, background)
        assert not np.shares_memory(out, image)
    render.cutout(image, masks[0], [0, 0, 10, 10])
    np.testing.assert_array_equal(image, image_before)
    for m, before in zip(masks, masks_before, strict=True):
        np.testing.assert_array_equal(m, before)
    assert steps == steps_before and instructions == instructions_before
    assert render.render(image, index, [], "original") is not image


def test_render_rejects_an_unknown_background_and_a_wrong_image():
    index = tiny_index(M0)
    with pytest.raises(InvalidInput) as err:
        render.render(PHOTO, index, [], "blue")
    assert str(err.value) == "Background must be one of original, dim, transparent, black, white; got 'blue'."
    with pytest.raises(InvalidInput) as err:
        render.render(np.zeros((1, 4, 3), np.uint8), index, [])
    assert str(err.value) == "The image to render must be a uint8 array of shape (1, 3, 3); got uint8 (1, 4, 3)."


# ---- parse_color errors ----------------------------------------------------------------------------
ACCEPTED = '[r, g, b, a] with values 0-255, "#rrggbb", "#rrggbbaa", "original" or null'


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("blue", "'blue'"),
        ("", "''"),
        ("#12345", "'#12345'"),
        ("#1234567", "'#1234567'"),
        ("#gggggg", "'#gggggg'"),
        ("ff0000", "'ff0000'"),
        ("rgb(300, 0, 0)", "'rgb(300, 0, 0)'"),
        ("rgba(0, 0, 0, 2)", "'rgba(0, 0, 0, 2)'"),
        ("rgb(0, 0)", "'rgb(0, 0)'"),
        ([], "[]"),
        ([255, 0], "[255, 0]"),
        ([255, 0, 0, 255, 0], "[255, 0, 0, 255, 0]"),
        ([256, 0, 0], "[256, 0, 0]"),
        ([-1, 0, 0, 255], "[-1, 0, 0, 255]"),
        ([True, 0, 0], "[True, 0, 0]"),
        ([float("nan"), 0, 0, 255], "[nan, 0, 0, 255]"),
        ([float("inf"), 0, 0], "[inf, 0, 0]"),
        ([1.5, 0, 0], "[1.5, 0, 0]"),
        (["255", 0, 0], "['255', 0, 0]"),
        ({"r": 255}, "{'r': 255}"),
        (12, "12"),
        (True, "True"),
        ("x" * 100, "'" + "x" * 56 + "..."),
    ],
)
def test_parse_color_errors_say_what_is_accepted(value, shown):
    with pytest.raises(InvalidInput) as err:
        render.parse_color(value, 3)
    assert str(err.value) == f"Colour for mask 3 must be {ACCEPTED}; got {shown}."


def test_parse_color_error_exact_text():
    with pytest.raises(InvalidInput) as err:
        render.parse_color("blue", 3)
    assert str(err.value) == (
        'Colour for mask 3 must be [r, g, b, a] with values 0-255, "#rrggbb", "#rrggbbaa", "original" or null; '
        "got 'blue'."
    )


# ---- parse_instructions --------------------------------------------------------------------------
def test_parse_instructions_accepts_a_list_a_json_string_and_nothing():
    index = tiny_index(M0, M1)
    want = [(1, (255, 0, 0, 255)), (0, "original"), (0, render.default_color(0))]
    items = [{"mask_id": 1, "color": "#ff0000"}, {"mask_id": 0, "color": "original"}, {"mask_id": 0}]
    assert render.parse_instructions(items, index, "img") == want
    assert render.parse_instructions(json.dumps(items), index, "img") == want
    assert render.parse_instructions(None, index, "img") == []
    assert render.parse_instructions("", index, "img") == []
    assert render.parse_instructions([], index, "img") == []
    assert render.parse_instructions([{"mask_id": np.int64(1), "color": None}], index, "img") == [
        (1, render.default_color(1))
    ]


LIST_LIKE = 'render_instructions must be a list like [{"mask_id": 0, "color": [255, 0, 0, 128]}]'
OBJECT_LIKE = 'must be an object like {"mask_id": 0, "color": [255, 0, 0, 128]}'
NEEDS_ID = 'render_instructions[0] needs "mask_id" as an integer'


@pytest.mark.parametrize(
    ("instructions", "error", "message"),
    [
        (
            "[{",
            InvalidInput,
            "render_instructions is not valid JSON (Expecting property name enclosed in double quotes at character 2).",
        ),
        ("nope", InvalidInput, "render_instructions is not valid JSON (Expecting value at character 0)."),
        ({"mask_id": 0}, InvalidInput, f"{LIST_LIKE}; got dict."),
        ('{"mask_id": 0}', InvalidInput, f"{LIST_LIKE}; got dict."),
        (5, InvalidInput, f"{LIST_LIKE}; got int."),
        ([1], InvalidInput, f"render_instructions[0] {OBJECT_LIKE}; got 1."),
        ([{"mask_id": 0}, "x"], InvalidInput, f"render_instructions[1] {OBJECT_LIKE}; got 'x'."),
        ([{"color": "#ff0000"}], InvalidInput, f"{NEEDS_ID}; got None."),
        ([{"mask_id": "1"}], InvalidInput, f"{NEEDS_ID}; got '1'."),
        ([{"mask_id": 1.0}], InvalidInput, f"{NEEDS_ID}; got 1.0."),
        ([{"mask_id": True}], InvalidInput, f"{NEEDS_ID}; got True."),
        (
            [{"mask_id": 0, "colour": "red"}],
            InvalidInput,
            """render_instructions[0] has unknown key(s) 'colour'; the keys are "mask_id" and "color".""",
        ),
        ([{"mask_id": 999}], NotFound, "Image img_1 has no mask 999 (it has masks 0–1)."),
        ([{"mask_id": -1}], NotFound, "Image img_1 has no mask -1 (it has masks 0–1)."),
        ([{"mask_id": 1, "color": "blue"}], InvalidInput, f"Colour for mask 1 must be {ACCEPTED}; got 'blue'."),
        ([{"mask_id": 0}] * 10_001, LimitExceeded, "render_instructions has 10001 items; the limit is 10000."),
    ],
)
def test_parse_instructions_errors(instructions, error, message):
    with pytest.raises(error) as err:
        render.parse_instructions(instructions, tiny_index(M0, M1), "img_1")
    assert str(err.value) == message


def test_unknown_mask_message_for_sparse_ids():
    index = render.MaskIndex.build((1, 3), [(2, M0), (7, M1)])
    with pytest.raises(NotFound) as err:
        render.parse_instructions([{"mask_id": 3}], index, "img_1")
    assert str(err.value) == "Image img_1 has no mask 3 (it has 2 masks, ids 2–7)."


def test_exactly_the_limit_is_fine():
    steps = render.parse_instructions([{"mask_id": 0}] * render.MAX_INSTRUCTIONS, tiny_index(M0), "img")
    assert len(steps) == render.MAX_INSTRUCTIONS


# ---- cut-outs ------------------------------------------------------------------------------------
def test_cutout_crops_to_the_bbox_with_alpha_from_the_mask():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = mask[2, 2] = True
    out = render.cutout(image, mask, [1, 1, 2, 2])
    assert out.shape == (2, 2, 4)
    np.testing.assert_array_equal(out[..., :3], image[1:3, 1:3])
    np.testing.assert_array_equal(out[..., 3], [[255, 0], [0, 255]])


def test_cutout_downscales_the_longer_side_to_max_side():
    image = np.zeros((100, 400, 3), np.uint8)
    mask = np.zeros((100, 400), bool)
    mask[10:90, 0:400] = True
    out = render.cutout(image, mask, [0, 10, 400, 80], max_side=160)
    assert out.shape == (32, 160, 4)
    assert (out[..., 3] == 255).all()


def test_cutout_of_an_empty_bbox_is_one_transparent_pixel():
    out = render.cutout(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), bool), [0, 0, 0, 0])
    np.testing.assert_array_equal(out, np.zeros((1, 1, 4), np.uint8))


def test_checkerboard_shows_transparency_and_keeps_opaque_pixels():
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[:12, :, :] = (10, 20, 30, 255)  # top half opaque
    out = render.on_checkerboard(rgba)
    assert out.shape == (24, 24, 3) and tuple(out[0, 0]) == (10, 20, 30)
    assert {tuple(out[12, 0]), tuple(out[12, 12])} == {(255, 255, 255), (204, 204, 204)}  # two cells


def test_prompt_overlay_marks_points_and_tints_the_preview():
    image = np.full((50, 100, 3), 100, np.uint8)
    preview = np.zeros((100, 200), bool)
    preview[:, 100:] = True  # the right half, at full size (2x the display copy)
    out = render.prompt_overlay(image, preview, [[20, 20, 1], [180, 80, 0]], (100, 200))
    assert tuple(out[10, 10]) == (40, 220, 60)  # include point, green
    assert tuple(out[40, 90]) == (235, 40, 40)  # exclude point, red
    assert out[5, 75, 2] > 180 and tuple(out[45, 5]) == (100, 100, 100)  # cyan tint only in the preview
    np.testing.assert_array_equal(image, 100)  # the input is not changed
