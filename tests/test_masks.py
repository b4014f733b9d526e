"""COCO RLE: our encoder and decoder agree with pycocotools, byte for byte."""

import numpy as np
import pytest
from pycocotools import mask as coco

import masks as rle
from errors import InvalidInput


def _random_masks():
    rng = np.random.default_rng(7)
    out = [np.zeros((5, 7), bool), np.ones((5, 7), bool), np.eye(6, dtype=bool)]
    for _ in range(60):
        h, w = rng.integers(1, 70, 2)
        m = rng.random((h, w)) < rng.random()
        out.append(m)
        blob = np.zeros((h, w), bool)
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        blob[y0 : y0 + rng.integers(1, 30), x0 : x0 + rng.integers(1, 30)] = True
        out.append(blob)
    return out


@pytest.mark.parametrize("mask", _random_masks())
def test_encode_matches_pycocotools(mask):
    ours = rle.encode(mask)
    ref = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert ours["size"] == [mask.shape[0], mask.shape[1]]
    assert ours["counts"] == ref["counts"].decode("ascii")
    np.testing.assert_array_equal(rle.decode(ours), mask)
    np.testing.assert_array_equal(coco.decode({"size": ours["size"], "counts": ours["counts"].encode()}), mask)
    assert rle.area_of_counts(rle.string_to_counts(ours["counts"])) == int(coco.area(ref))


def test_large_mask_round_trip_and_bbox():
    m = np.zeros((2048, 1536), bool)
    m[100:900, 300:1200] = True
    m[1500:1510, 0:5] = True
    r = rle.encode(m)
    np.testing.assert_array_equal(rle.decode(r), m)
    assert rle.bbox_of(m) == [0, 100, 1200, 1410]
    ref_bbox = coco.toBbox({"size": r["size"], "counts": r["counts"].encode()}).tolist()
    assert ref_bbox == [0.0, 100.0, 1200.0, 1410.0]


def test_uncompressed_counts_decode():
    m = np.array([[0, 1], [1, 1]], bool)  # column-major: 0,1 | 1,1 → counts [1, 3]
    np.testing.assert_array_equal(rle.decode({"size": [2, 2], "counts": [1, 3]}), m)
    np.testing.assert_array_equal(rle.decode({"size": [2, 2], "counts": [1.0, 3.0]}), m)  # whole, as floats
    assert not rle.decode({"size": [2, 2], "counts": [4]}).any()


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"size": [2, 2], "counts": [1, 2]}, "add up to 3 pixels, but its size 2x2 has 4"),
        ({"size": [2, 2]}, "needs 'size' and 'counts'"),
        ({"size": [2, 2], "counts": "\x01\x02"}, "corrupt"),
        ({"size": [2, 2], "counts": [1.5, 2.5]}, "whole non-negative integers \\(got 1.5\\)"),
        ({"size": [2, 2], "counts": [float("nan"), 4]}, "whole non-negative integers \\(got nan\\)"),
        ({"size": [2, 2], "counts": [-1, 5]}, "whole non-negative integers \\(got -1\\)"),
        ({"size": [2, 2], "counts": [10**30]}, f"add up to {10**30} pixels, but its size 2x2 has 4"),
        ({"size": [2, 2], "counts": [2**63, 1]}, "add up to 9.22337e\\+18 pixels"),
        ({"size": [2, 2], "counts": [1e300, 1]}, "add up to 1e\\+300 pixels"),
        ({"size": [2, 2], "counts": [1, None]}, "whole non-negative integers"),
        ({"size": [2, 2], "counts": [[1, 3]]}, "flat list"),
        ({"size": [2, 2], "counts": [[1], [1, 2]]}, "flat list"),
        ({"size": [2, 2], "counts": "o" * 20 + "?"}, "add up to"),
    ],
)
def test_bad_rle_is_a_clear_error(bad, message):
    with pytest.raises(InvalidInput, match=message):
        rle.decode(bad)


def test_png_is_0_and_255():
    from io import BytesIO

    from PIL import Image

    m = np.zeros((4, 5), bool)
    m[1:3, 2:4] = True
    im = Image.open(BytesIO(rle.to_png(m)))
    assert im.size == (5, 4)
    np.testing.assert_array_equal(np.asarray(im), m.astype(np.uint8) * 255)


def test_encode_matches_pycocotools_on_large_masks():
    """Photo-sized masks: long runs (counts of several 5-bit groups) and deltas of either sign."""
    rng = np.random.default_rng(11)
    for h, w in ((3000, 2000), (1024, 4096), (4096, 4096)):
        m = np.zeros((h, w), bool)
        for _ in range(12):
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            m[y0 : y0 + rng.integers(1, h), x0 : x0 + rng.integers(1, w)] ^= True
        ref = coco.encode(np.asfortranarray(m.astype(np.uint8)))
        assert rle.encode(m)["counts"] == ref["counts"].decode("ascii")
    ones = np.ones((4096, 4096), bool)  # one run of 2^24 after an empty 0-run
    assert rle.encode(ones)["counts"] == coco.encode(np.asfortranarray(ones.astype(np.uint8)))["counts"].decode()
