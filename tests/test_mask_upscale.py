"""Full-size masks computed only inside each mask's window (mask_upscale) equal SAM's plain two-step upscale > 0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data

import mask_upscale
import masks
import mobilesam_model
import model_weights
from embedding_cache import EmbeddingCache
from sam_engine import PromptModelSegmenter

MODELS = Path(__file__).resolve().parent.parent / "models"


def reference(low: np.ndarray, geo: mask_upscale.Geometry) -> np.ndarray:
    """The straightforward upscale: the whole low-res map to the frame, crop, resize to the original size."""
    (in_h, in_w), size = geo.input_size, geo.original_size
    x = torch.from_numpy(low)[:, None]
    x = F.interpolate(x, (geo.frame, geo.frame), mode="bilinear", align_corners=False)[..., :in_h, :in_w]
    return F.interpolate(x, size, mode="bilinear", align_corners=False)[:, 0].numpy()


def assert_same_masks(got: np.ndarray, logits: np.ndarray) -> None:
    """Equal to logits > 0, except where a logit is so close to 0 that float rounding may decide it."""
    assert got.shape == logits.shape and got.dtype == bool
    differ = got != (logits > 0)
    assert not differ.any() or np.abs(logits[differ]).max() < 1e-4, np.count_nonzero(differ)


def blobs(count: int, side: int, seed: int) -> np.ndarray:
    """Smooth logits with positive blobs of several sizes (a few pixels to most of the map), one map each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    out = []
    for _ in range(count):
        cy, cx = rng.uniform(0, side, 2)
        radius = rng.uniform(1, side * 0.7)
        out.append(radius - np.hypot(yy - cy, xx - cx) + rng.normal(0, 0.5, (side, side)))
    return np.stack(out).astype(np.float32)


GEOMETRIES = {
    "square at the frame's size": ((1024, 1024), (1024, 1024)),
    "a small photo (downscaled back)": ((683, 1024), (400, 600)),
    "a large photo (upscaled back)": ((740, 1024), (1111, 1537)),
    "tall and thin": ((1024, 263), (300, 77)),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_window_masks_equal_the_full_upscale(name):
    input_size, original = GEOMETRIES[name]
    geo = mask_upscale.Geometry(256, 1024, input_size, original)
    low = blobs(12, 256, seed=len(name))
    low[0] = -1.0  # nothing anywhere
    low[1] = 2.0  # everything
    low[2, :, :] = -1.0
    low[2, 255, 255] = 5.0  # positive only in the padding beyond the picture
    assert_same_masks(mask_upscale.full_masks(low, geo), reference(low, geo))


def test_at_the_frame_size_masks_are_bit_for_bit_the_full_upscale():
    geo = mask_upscale.Geometry(256, 1024, (1024, 1024), (1024, 1024))
    low = blobs(8, 256, seed=7)
    np.testing.assert_array_equal(mask_upscale.full_masks(low, geo), reference(low, geo) > 0)


# ------------------------------------------------------------------------------------------ real weights


@pytest.fixture(scope="module")
def model():
    path, _ = model_weights.resolve(None, MODELS)
    return mobilesam_model.load(path)


@pytest.mark.parametrize("image", [data.coffee(), data.astronaut(), np.repeat(data.astronaut(), 3, axis=0)[:1400]])
def test_the_models_full_masks_equal_to_full(model, image):
    emb = model.embed(image)
    h, w = image.shape[:2]
    points = (np.random.default_rng(h).uniform(0, 1, (6, 1, 2)) * [w, h]).astype(np.float32)
    low, _ = model.decode(emb, points, np.ones((6, 1), np.int64))
    low = low.reshape(-1, *low.shape[2:])
    assert_same_masks(model.full_masks(emb, low), model.to_full(emb, low))


def test_clicks_give_the_masks_of_the_plain_path(model):
    """candidates() (windowed upscale) against a reference built from decode + to_full, click by click."""
    seg = PromptModelSegmenter(model, engine="test", cache=EmbeddingCache(64 << 20))
    image = data.coffee()
    emb = model.embed(image)
    for x, y in [(300, 230), (120, 250), (540, 100), (20, 380)]:
        low, _ = model.decode(emb, np.array([[[x, y]]], np.float32), np.ones((1, 1), np.int64))
        expected = [m for m in model.to_full(emb, low[0]) > 0 if m.any()]
        got = [masks.decode(r["segmentation"]) for r in seg.candidates(image, points=[[x, y]], point_labels=[1])]
        assert 1 <= len(got) <= len(expected)
        for mask in got:  # each answer is one of the plain path's masks (near-duplicates are merged)
            assert any(np.count_nonzero(mask != m) <= 2 for m in expected), (x, y)
