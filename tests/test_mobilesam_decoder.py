"""The rearranged mask decoder (mask_decoder_fast, the default) computes what the plain module computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

import mobilesam_model
import model_weights

MODELS = Path(__file__).resolve().parent.parent / "models"


@pytest.fixture(scope="module")
def models():
    path, _ = model_weights.resolve(None, MODELS)
    fast = mobilesam_model.load(path)
    plain = mobilesam_model.MobileSam(fast.net, fast_decoder=False)  # the same weights, the plain module
    return fast, plain


@pytest.fixture(scope="module")
def emb(models):
    return models[0].embed(data.coffee())


def _same(fast_out, plain_out) -> None:
    (logits_a, iou_a), (logits_b, iou_b) = fast_out, plain_out
    assert logits_a.shape == logits_b.shape and iou_a.shape == iou_b.shape
    assert np.abs(logits_a - logits_b).max() < 1e-3
    assert np.abs(iou_a - iou_b).max() < 1e-4
    decided = np.abs(logits_b) > 1e-3  # a pixel whose logit is this close to 0 may fall either way
    np.testing.assert_array_equal((logits_a > 0)[decided], (logits_b > 0)[decided])


def test_the_default_decoder_is_the_fast_one(models):
    assert models[0].fast_decoder and not models[1].fast_decoder


@pytest.mark.parametrize("count", [1, mobilesam_model.DECODE_CHUNK + 3])
def test_include_and_exclude_points_match(models, emb, count):
    fast, plain = models
    rng = np.random.default_rng(count)
    points = rng.uniform(0, 400, (count, 2, 2)).astype(np.float32)
    labels = np.tile(np.array([[1, 0]]), (count, 1))
    _same(fast.decode(emb, points, labels), plain.decode(emb, points, labels))


def test_a_box_with_a_point_matches_on_the_single_answer(models, emb):
    fast, plain = models
    points, labels = np.array([[[300.0, 200.0]]], np.float32), np.ones((1, 1), np.int64)
    boxes = np.array([[180.0, 100.0, 420.0, 300.0]], np.float32)
    _same(
        fast.decode(emb, points, labels, boxes, multimask=False),
        plain.decode(emb, points, labels, boxes, multimask=False),
    )


def test_the_staged_decoder_gives_decode_s_answers(models, emb):
    fast, _ = models
    points, labels = np.array([[[300.0, 200.0]]], np.float32), np.ones((1, 1), np.int64)
    logits, iou = fast.decode(emb, points, labels)
    staged = fast.decode_staged(emb, points, labels)
    assert fast.staged_decoding  # torch: the first stage costs no more than in the one-stage decoder
    np.testing.assert_allclose(staged.iou, iou, atol=1e-5)
    np.testing.assert_allclose(staged.lattice, logits[..., ::4, ::4], atol=1e-4)  # every 4th low-res pixel
    np.testing.assert_allclose(staged.logits(), logits, atol=1e-4)
    assert staged.logits() is staged.logits()  # upscaled once


def test_the_per_image_part_is_reused_only_for_its_own_embedding(models, emb):
    fast, _ = models
    assert fast._shared_part(emb) is fast._shared_part(emb)
    other = fast.embed(data.astronaut())
    assert fast._shared_part(other) is not fast._shared_part(emb)


def test_the_onnxruntime_decoder_matches_torch_and_is_cached(models, emb, tmp_path):
    import mobilesam_onnx

    fast, plain = models
    on_ort = mobilesam_model.MobileSam(fast.net)
    # an export of an earlier graph version, and one of another checkpoint: the first is replaced, not kept
    stale = tmp_path / "mobilesam_decoder_0123456789ab_g1.onnx"
    other = tmp_path / "mobilesam_decoder_feedfacefeed_g2.onnx"
    for file in (
        stale,
        stale.with_name(stale.name + ".checked"),
        tmp_path / "mobilesam_decoder_0123456789ab.onnx",
        other,
    ):
        file.write_bytes(b"an older export")
    assert mobilesam_onnx.attach(on_ort, tmp_path, "0123456789abcdef")
    path = mobilesam_onnx.cached_path(tmp_path, "0123456789abcdef")
    staged = mobilesam_onnx.staged_path(tmp_path, "0123456789abcdef")
    made = [path, staged, mobilesam_onnx.masks_path(staged)]
    expected = [p.name for p in made] + [path.name + ".checked", staged.name + ".checked", other.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    points = np.array([[[300.0, 200.0]], [[100.0, 350.0]], [[500.0, 50.0]]], np.float32)
    labels = np.ones((3, 1), np.int64)
    logits, iou = plain.decode(emb, points, labels)
    _same(on_ort.decode(emb, points, labels), (logits, iou))
    assert on_ort.onnx_staged is not None and on_ort.staged_decoding
    two = on_ort.decode_staged(emb, points[:1], labels[:1])
    _same((two.logits(), two.iou), (logits[:1], iou[:1]))
    np.testing.assert_allclose(two.lattice, two.logits()[..., ::4, ::4], atol=1e-4)


def test_a_damaged_onnx_file_leaves_the_torch_decoder_in_charge(models, tmp_path, caplog):
    import mobilesam_onnx

    mobilesam_onnx.cached_path(tmp_path, "feedfacefeedface").write_bytes(b"not an onnx graph")
    model = mobilesam_model.MobileSam(models[0].net)
    assert not mobilesam_onnx.attach(model, tmp_path, "feedfacefeedface")
    assert model.onnx_decoder is None
    assert "decoder in torch" in caplog.text


def test_a_damaged_staged_graph_leaves_the_automatic_pass_one_stage(models, tmp_path, caplog):
    import mobilesam_onnx

    digest = "0123456789abcdef"
    assert mobilesam_onnx.attach(mobilesam_model.MobileSam(models[0].net), tmp_path, digest)
    mobilesam_onnx.masks_path(mobilesam_onnx.staged_path(tmp_path, digest)).write_bytes(b"not an onnx graph")
    model = mobilesam_model.MobileSam(models[0].net)
    assert mobilesam_onnx.attach(model, tmp_path, digest)  # the one-stage decoder is still good
    assert model.onnx_decoder is not None and model.onnx_staged is None
    assert not model.staged_decoding  # the pass decodes in one stage on onnxruntime, not the first stage in torch
    assert "staged decoder" in caplog.text and "one stage" in caplog.text
