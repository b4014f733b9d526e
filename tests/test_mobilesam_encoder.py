"""The image encoder on onnxruntime (mobilesam_onnx.attach_encoder) gives torch's embedding; a bad file leaves torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage import data

import mobilesam_model
import mobilesam_onnx
import model_weights

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGEST = "0123456789abcdef"


@pytest.fixture(scope="module")
def net():
    path, _ = model_weights.resolve(None, MODELS)
    return mobilesam_model.load(path).net


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory) -> Path:
    """A models folder holding an encoder export made by attach_encoder."""
    folder = tmp_path_factory.mktemp("models")
    assert mobilesam_onnx.attach_encoder(mobilesam_model.MobileSam(net), folder, DIGEST)
    return folder


def test_the_export_is_one_file_named_by_the_checkpoint_and_its_check_record(exported):
    name = mobilesam_onnx.encoder_path(exported, DIGEST).name
    assert sorted(p.name for p in exported.iterdir()) == [name, name + ".checked"]


def test_a_checked_file_is_not_checked_again_until_its_bytes_change(net, exported, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(exported, folder)

    def refuse(model, encoder):
        raise ValueError("checked again")

    monkeypatch.setattr(mobilesam_onnx, "_check_encoder", refuse)
    assert mobilesam_onnx.attach_encoder(mobilesam_model.MobileSam(net), folder, DIGEST)  # vouched for: no check
    path = mobilesam_onnx.encoder_path(folder, DIGEST)
    path.write_bytes(path.read_bytes() + b"\0")  # other bytes (onnxruntime still reads them): checked again
    model = mobilesam_model.MobileSam(net)
    assert not mobilesam_onnx.attach_encoder(model, folder, DIGEST) and model.onnx_encoder is None


def test_the_onnxruntime_encoder_gives_torchs_embedding(net, exported):
    on_ort, on_torch = mobilesam_model.MobileSam(net), mobilesam_model.MobileSam(net)
    assert mobilesam_onnx.attach_encoder(on_ort, exported, DIGEST)
    assert on_ort.onnx_encoder is not None and on_torch.onnx_encoder is None
    image = data.coffee()
    a, b = on_ort.embed(image), on_torch.embed(image)
    assert (a.original_size, a.input_size) == (b.original_size, b.input_size) == ((400, 600), (683, 1024))
    assert a.features.shape == b.features.shape == (1, 256, 64, 64)
    assert float((a.features - b.features).abs().max()) < 1e-3
    points, labels = np.array([[[300.0, 230.0]]], np.float32), np.ones((1, 1), np.int64)
    low_a, iou_a = on_ort.decode(a, points, labels)
    low_b, iou_b = on_torch.decode(b, points, labels)
    assert np.abs(iou_a - iou_b).max() < 1e-3
    decided = np.abs(low_b) > 1e-2
    np.testing.assert_array_equal((low_a > 0)[decided], (low_b > 0)[decided])


def test_a_cached_export_is_reused(net, exported, caplog):
    caplog.set_level("INFO", logger="mask_studio.mobilesam")
    before = mobilesam_onnx.encoder_path(exported, DIGEST).stat().st_mtime_ns
    assert mobilesam_onnx.attach_encoder(mobilesam_model.MobileSam(net), exported, DIGEST)
    assert "Exporting" not in caplog.text
    assert mobilesam_onnx.encoder_path(exported, DIGEST).stat().st_mtime_ns == before


def test_a_damaged_encoder_file_leaves_the_torch_encoder_in_charge(net, tmp_path, caplog):
    mobilesam_onnx.encoder_path(tmp_path, "feedfacefeedface").write_bytes(b"not an onnx graph")
    model = mobilesam_model.MobileSam(net)
    assert not mobilesam_onnx.attach_encoder(model, tmp_path, "feedfacefeedface")
    assert model.onnx_encoder is None
    assert "image encoder in torch" in caplog.text
    assert model.embed(data.coffee()).features.shape == (1, 256, 64, 64)
