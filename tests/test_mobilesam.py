"""MobileSAM with the real weights: prompts on real photos give the objects a person means; bad weights are refused.

The pixels below were chosen by looking at scikit-image's photos (astronaut 512×512, coffee 400×600) with a
25-pixel grid drawn over them. The weights come from `<repo>/models` (scripts/test.sh fetches them there;
the first run without them downloads them once through model_weights' real path).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from skimage import data

import masks
import model_weights
from errors import InvalidInput, SegmentationUnavailable
from mobilesam_engine import MobileSamSegmenter

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


@pytest.fixture(scope="module")
def weights() -> Path:
    path, official = model_weights.resolve(None, MODELS)
    assert official
    return path


@pytest.fixture(scope="module")
def seg(weights, tmp_path_factory) -> MobileSamSegmenter:
    # a private models folder holding a link to the shared weights: the disk cache of embeddings goes there
    models_dir = tmp_path_factory.mktemp("models")
    (models_dir / model_weights.FILE_NAME).symlink_to(weights)
    for export in MODELS.glob("mobilesam_*.onnx"):  # onnxruntime exports made earlier: not exported again
        (models_dir / export.name).symlink_to(export.resolve())
    segmenter = MobileSamSegmenter.load(checkpoint=None, models_dir=models_dir, max_masks=32)
    yield segmenter
    segmenter.close()


def covers(record: dict, inside: list[tuple[int, int]], outside: list[tuple[int, int]]) -> bool:
    mask = masks.decode(record["segmentation"])
    return all(mask[y, x] for x, y in inside) and not any(mask[y, x] for x, y in outside)


FACE = [(200, 125), (250, 125), (225, 160), (230, 90)]  # cheeks, chin, forehead
HAIR = [(225, 35), (165, 70), (290, 70)]
SUIT = [(100, 350), (320, 330), (225, 190)]  # arm, chest, black collar


def test_a_click_on_the_face_gives_the_face_not_the_hair_or_suit(seg):
    record = seg.segment(data.astronaut(), points=[[215, 130]], point_labels=[1])
    assert covers(record, FACE, HAIR + SUIT)
    assert record["segmentation"]["size"] == [512, 512]
    x, y, w, h = record["bbox"]
    assert 150 < x < 215 and 50 < y < 110 and w < 130 and h < 130
    assert record["area"] == int(masks.decode(record["segmentation"]).sum())
    assert 0.8 < record["predicted_iou"] <= 1.1 and 0.8 < record["stability_score"] <= 1.0
    assert record["point_coords"] == [[215.0, 130.0]]
    assert record["crop_box"] == [0, 0, 512, 512]


OBJECTS = {
    # name: (image, click, pixels of the whole object, pixels that are not part of it)
    "shuttle": (
        data.astronaut,
        (390, 150),
        [(390, 100), (390, 130), (375, 215), (440, 215), (410, 240)],  # nose, body, both wings, tail
        [(415, 40), (420, 290), (330, 150), (480, 150)],  # external tank, black stand, sky either side
    ),
    "helmet": (
        data.astronaut,
        (400, 460),
        [(380, 430), (330, 400), (430, 360), (480, 390)],  # black visor, white shell
        [(450, 300), (300, 330), (250, 450)],  # black backdrop, suit
    ),
    "coffee cup": (
        data.coffee,
        (300, 230),
        [(280, 25), (200, 110), (290, 140), (300, 230), (225, 260)],  # rim, inside, coffee, body, handle
        [(120, 250), (450, 300), (300, 370), (540, 100)],  # saucer left, right, front; table
    ),
}


@pytest.mark.parametrize("name", OBJECTS)
def test_the_object_comes_out_whole_at_some_step(seg, name):
    make, click, inside, outside = OBJECTS[name]
    steps = seg.candidates(make(), points=[list(click)], point_labels=[1])
    assert 1 <= len(steps) <= 3
    assert [r["area"] for r in steps] == sorted((r["area"] for r in steps), reverse=True)
    assert any(covers(r, inside, outside) for r in steps), [r["area"] for r in steps]


def test_steps_are_not_near_duplicates(seg):
    steps = seg.candidates(data.astronaut(), points=[[215, 130]], point_labels=[1])
    decoded = [masks.decode(r["segmentation"]) for r in steps]
    for i in range(len(decoded)):
        for j in range(i + 1, len(decoded)):
            a, b = decoded[i], decoded[j]
            assert (a & b).sum() / (a | b).sum() < 0.95


def test_an_exclude_point_and_a_box_shape_the_mask(seg):
    image = data.astronaut()
    whole = seg.segment(image, box=[290, 340, 512, 512])  # the helmet's box
    assert covers(whole, [(380, 430), (430, 360)], [(300, 330), (225, 120)])
    shell, visor = (430, 360), (380, 430)
    helmet = seg.segment(image, points=[[400, 460]], point_labels=[1])
    assert covers(helmet, [shell, visor], [])
    without_shell = seg.segment(image, points=[[400, 460], list(shell)], point_labels=[1, 0])
    assert covers(without_shell, [visor], [shell])


def test_large_images_are_downscaled_for_the_model_and_masks_come_back_full_size(seg):
    big = np.repeat(np.repeat(data.astronaut(), 3, axis=0), 3, axis=1)  # 1536²
    record = seg.segment(big, points=[[215 * 3, 130 * 3]], point_labels=[1])
    assert record["segmentation"]["size"] == [1536, 1536]
    assert covers(record, [(x * 3, y * 3) for x, y in FACE], [(x * 3, y * 3) for x, y in HAIR + SUIT])


def test_bad_prompts_are_refused_with_the_shared_messages(seg):
    with pytest.raises(InvalidInput, match="outside the image"):
        seg.segment(data.astronaut(), points=[[600, 10]], point_labels=[1])
    with pytest.raises(InvalidInput, match="at least one include point"):
        seg.segment(data.astronaut())


def test_the_engine_runs_encoder_and_decoder_on_onnxruntime(seg):
    assert seg.model.onnx_encoder is not None and seg.model.onnx_decoder is not None


def test_prepare_computes_the_embedding_once(seg):
    from embedding_cache import image_key

    image = data.coffee()
    seg.prepare(image)
    first = seg.cache.get(image_key(image), lambda: pytest.fail("prepare should have cached the embedding"))
    seg.prepare(image.copy())
    assert seg.cache.get(image_key(image.copy()), lambda: pytest.fail("computed again")) is first
    assert tuple(first.features.shape) == (1, 256, 64, 64)
    assert first.original_size == (400, 600) and first.input_size == (683, 1024)


def test_generate_gives_deduplicated_records_within_max_masks(seg):
    records = seg.generate(data.coffee())
    assert 3 <= len(records) <= seg.max_masks
    decoded = [masks.decode(r["segmentation"]) for r in records]
    for i in range(len(decoded)):
        for j in range(i + 1, len(decoded)):
            a, b = decoded[i], decoded[j]
            assert (a & b).sum() / (a | b).sum() < 0.95


# ------------------------------------------------------------------------------------------ weights


def test_a_checkpoint_path_that_does_not_exist_is_a_clear_message(tmp_path):
    with pytest.raises(SegmentationUnavailable, match="does not exist.*MOBILESAM_CHECKPOINT"):
        MobileSamSegmenter.load(checkpoint=tmp_path / "nope.pt", models_dir=tmp_path, max_masks=8)


def test_a_truncated_checkpoint_is_refused(weights, tmp_path):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(weights.read_bytes()[:20_000_000])
    with pytest.raises(SegmentationUnavailable, match="not a usable MobileSAM checkpoint"):
        MobileSamSegmenter.load(checkpoint=cut, models_dir=tmp_path, max_masks=8)
    models_dir = tmp_path / "models"
    models_dir.mkdir()
    (models_dir / "mobile_sam.pt").write_bytes(weights.read_bytes()[:20_000_000])
    with pytest.raises(SegmentationUnavailable, match="truncated or different file.*Delete it"):
        MobileSamSegmenter.load(checkpoint=None, models_dir=models_dir, max_masks=8)


def test_a_wrong_hash_in_the_models_folder_is_refused(weights, tmp_path):
    data_ = bytearray(weights.read_bytes())
    data_[-100] ^= 0xFF  # same size, one byte different
    (tmp_path / "mobile_sam.pt").write_bytes(bytes(data_))
    with pytest.raises(SegmentationUnavailable, match="not the official MobileSAM weights"):
        MobileSamSegmenter.load(checkpoint=None, models_dir=tmp_path, max_masks=8)


def test_another_model_file_given_explicitly_is_refused(tmp_path):
    import torch

    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(SegmentationUnavailable, match="not a usable MobileSAM checkpoint"):
        MobileSamSegmenter.load(checkpoint=other, models_dir=tmp_path, max_masks=8)


def test_a_loadable_non_official_checkpoint_is_accepted_and_said(weights, tmp_path, caplog):
    import torch

    state = torch.load(weights, map_location="cpu", weights_only=True)
    state["mask_decoder.iou_token.weight"] = state["mask_decoder.iou_token.weight"] * 1.01
    mine = tmp_path / "mine.pt"
    torch.save(state, mine)
    segmenter = MobileSamSegmenter.load(checkpoint=mine, models_dir=tmp_path, max_masks=8)
    assert not segmenter.official
    assert "non-official checkpoint (mine.pt)" in segmenter.health()[1]
    assert "not the official" in caplog.text


def test_the_official_file_in_the_models_folder_passes_the_check(weights, tmp_path):
    shutil.copyfile(weights, tmp_path / "mobile_sam.pt")
    assert model_weights.resolve(None, tmp_path, download=False) == (tmp_path / "mobile_sam.pt", True)


def test_embeddings_survive_a_restart_on_disk(seg):
    import torch

    from embedding_cache import image_key

    image = data.chelsea()
    seg.prepare(image)
    first = seg.cache.get(image_key(image), lambda: pytest.fail("prepare should have cached the embedding"))
    models_dir = seg.cache.disk.folder.parent.parent
    again = MobileSamSegmenter.load(checkpoint=None, models_dir=models_dir, max_masks=8)
    found = again.cache.get(image_key(image), lambda: pytest.fail("the embedding should come from the disk"))
    assert torch.equal(found.features, first.features)
    assert (found.original_size, found.input_size) == (first.original_size, first.input_size)
