"""The Studio service on known masks: ingest, lookups, renders, exports, deletes, restarts."""

import numpy as np
import pytest
from pycocotools import mask as coco

import imaging
from errors import Conflict, InvalidInput, LimitExceeded, NotFound, SegmentationRejected
from helpers import RecordsSegmenter, encode, house_masks, make_photo, record
from settings import Settings
from storage import Database, LocalBlobStore
from studio import Studio

H, W = 96, 128


def make_studio(tmp_path, segmenter=None, **settings):
    s = Settings(data_dir=tmp_path, **settings)
    return Studio(s, segmenter or RecordsSegmenter(house_masks), Database(s.db_path), LocalBlobStore(s.blob_dir))


@pytest.fixture
def studio(tmp_path):
    return make_studio(tmp_path)


@pytest.fixture
def photo():
    return make_photo(H, W)


def test_ingest_numbers_masks_largest_first(studio, photo):
    out = studio.generate_and_store(encode(photo), image_id="house")
    assert out["image_id"] == "house" and out["mask_count"] == 4
    assert out["image_dimensions"] == {"width": W, "height": H}
    assert out["engine"] == "fixed test segmenter"
    areas = [m["area"] for m in studio.info("house", "local")["available_masks"]]
    assert areas == sorted(areas, reverse=True)
    assert out["message"] == "Stored 4 masks for image house."


def test_original_is_stored_losslessly_and_survives_restart(tmp_path, photo):
    make_studio(tmp_path).generate_and_store(encode(photo), image_id="house")
    again = make_studio(tmp_path)  # a new process: nothing cached
    np.testing.assert_array_equal(again.load("house", "local").rgb, photo)
    assert [i["image_id"] for i in again.list_images("local")] == ["house"]
    assert again.mask_at_point("house", 30, 65, "local")["mask_id"] is not None


def test_mask_at_point_smallest_first(studio, photo):
    studio.generate_and_store(encode(photo), image_id="house")
    info = {m["id"]: m for m in studio.info("house", "local")["available_masks"]}
    # (x=38, y=60) lies in the window, the house and the lower half: smallest first.
    hit = studio.mask_at_point("house", 38, 60, "local")
    areas = [info[c]["area"] for c in hit["candidates"]]
    assert len(areas) == 3 and areas == sorted(areas)
    assert hit["mask_id"] == hit["candidates"][0] and hit["area"] == areas[0]
    assert studio.mask_at_point("house", 5, 5, "local") == {
        "mask_id": None,
        "candidates": [],
        "area": None,
        "bbox": None,
    }


@pytest.mark.parametrize(
    "x, y, message",
    [
        (128, 0, "Point (128, 0) is outside the image, which is 128×96 pixels (x from 0 to 127, y from 0 to 95)."),
        (-1, 5, "Point (-1, 5) is outside the image"),
        (float("nan"), 5, "x must be a finite number"),
        ("3", 5, "x must be a number"),
        (True, 5, "x must be a number"),
    ],
)
def test_bad_points(studio, photo, x, y, message):
    studio.generate_and_store(encode(photo), image_id="house")
    with pytest.raises(InvalidInput) as info:
        studio.mask_at_point("house", x, y, "local")
    assert message in info.value.message


def test_render_paints_known_pixels(studio, photo):
    studio.generate_and_store(encode(photo), image_id="house")
    window = studio.mask_at_point("house", 38, 60, "local")["mask_id"]
    out = studio.render("house", [{"mask_id": window, "color": [255, 0, 0, 255]}], "original", "local")
    assert tuple(out[60, 38]) == (255, 0, 0)
    np.testing.assert_array_equal(out[5, 5], photo[5, 5])
    assert studio.render("house", [], "black", "local")[5, 5].tolist() == [0, 0, 0]


def test_unknown_ids_are_not_found(studio, photo):
    studio.generate_and_store(encode(photo), image_id="house")
    with pytest.raises(NotFound, match="No image with id 'nope'"):
        studio.info("nope", "local")
    with pytest.raises(NotFound, match="No image with id"):
        studio.info("../../etc/passwd", "local")
    with pytest.raises(NotFound, match="Image house has no mask 99 \\(it has masks 0–3\\)"):
        studio.mask_png("house", 99, "local")
    with pytest.raises(NotFound):
        studio.info("house", "someone-else")


def test_taken_id_refused_before_segmenting(tmp_path, photo):
    seg = RecordsSegmenter(house_masks)
    studio = make_studio(tmp_path, seg)
    studio.generate_and_store(encode(photo), image_id="house")
    with pytest.raises(Conflict, match="'house' is already taken"):
        studio.generate_and_store(encode(photo), image_id="house")
    assert seg.calls == 1


def test_bad_segmenter_output_stores_nothing(tmp_path, photo):
    wrong_size = RecordsSegmenter(lambda h, w: [np.ones((h + 1, w), bool)])
    studio = make_studio(tmp_path, wrong_size)
    with pytest.raises(SegmentationRejected, match="is 128×97, but the image is 128×96"):
        studio.generate_and_store(encode(photo), image_id="house")
    assert studio.list_images("local") == []
    assert list(studio.blobs.keys()) == []


def test_unreadable_image_stores_nothing(studio):
    with pytest.raises(InvalidInput, match="not an image"):
        studio.generate_and_store(b"GIF89a but not really", image_id="x")
    assert studio.list_images("local") == [] and list(studio.blobs.keys()) == []


def test_export_coco_loads_in_pycocotools(studio, photo, tmp_path):
    import json

    from pycocotools.coco import COCO

    studio.generate_and_store(encode(photo), image_id="house")
    data = studio.export_coco("house", [1, 0], "local")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    c = COCO(str(path))
    anns = c.loadAnns(c.getAnnIds(imgIds=[1]))
    assert [a["mask_id"] for a in anns] == [1, 0]
    for a in anns:
        m = c.annToMask(a)
        assert m.shape == (H, W) and int(m.sum()) == a["area"]
        assert coco.toBbox(a["segmentation"]).tolist() == a["bbox"]
    assert len(studio.export_coco("house", None, "local")["annotations"]) == 4
    with pytest.raises(InvalidInput, match="mask_ids must be a list"):
        studio.export_coco("house", "1,2", "local")


def test_get_mask_png(studio, photo):
    studio.generate_and_store(encode(photo), image_id="house")
    arr = imaging.decode_png(studio.mask_png("house", 0, "local"))[..., 0]
    assert arr.shape == (H, W) and set(np.unique(arr)) <= {0, 255}
    assert int((arr == 255).sum()) == studio.info("house", "local")["available_masks"][0]["area"]


def test_delete_removes_everything(studio, photo):
    studio.generate_and_store(encode(photo), image_id="house")
    assert studio.delete("house", "local")["image_id"] == "house"
    assert studio.list_images("local") == [] and list(studio.blobs.keys()) == []
    with pytest.raises(NotFound):
        studio.delete("house", "local")


def test_orphaned_blobs_are_cleaned_on_start(studio, photo):
    studio.generate_and_store(encode(photo), image_id="house")
    studio.blobs.put("images/crashed-ingest.png", b"half")
    assert studio.cleanup_orphans() == 1
    assert list(studio.blobs.keys()) == [studio.db.get_image("house").blob_key]


def test_zero_area_masks_are_dropped_and_max_masks_kept(tmp_path, photo):
    many = RecordsSegmenter(lambda h, w: house_masks(h, w) + [np.zeros((h, w), bool)])
    studio = make_studio(tmp_path, many, max_masks=2)
    assert studio.generate_and_store(encode(photo))["mask_count"] == 2


def test_records_with_integer_counts_are_accepted(tmp_path, photo):
    def uncompressed(h, w):
        return house_masks(h, w)[:1]

    class Uncompressed(RecordsSegmenter):
        def generate(self, image, *, progress=None, cancel=None):
            rec = record(uncompressed(*image.shape[:2])[0])
            from masks import runs_of

            rec["segmentation"] = {"size": list(image.shape[:2]), "counts": runs_of(uncompressed(*image.shape[:2])[0])}
            return [rec]

    studio = make_studio(tmp_path, Uncompressed(uncompressed))
    studio.generate_and_store(encode(photo), image_id="u")
    np.testing.assert_array_equal(studio.load("u", "local").index.mask(0), house_masks(H, W)[0])


class EmptyObjectSegmenter(RecordsSegmenter):
    """Answers every prompt with an empty mask (a service that found nothing there)."""

    def segment(self, image, *, points=None, point_labels=None, box=None, progress=None, cancel=None):
        return record(np.zeros(image.shape[:2], bool))


def test_segment_on_a_new_image_that_finds_nothing_stores_nothing(tmp_path, photo):
    studio = make_studio(tmp_path, EmptyObjectSegmenter(house_masks))
    with pytest.raises(SegmentationRejected, match="found no object"):
        studio.segment_object(data=encode(photo), image_id="nothing-here", points=[[5, 5]])
    assert studio.list_images("local") == [] and not studio.db.image_exists("nothing-here")
    assert [k for k in studio.blobs.keys()] == []


def test_previews_count_per_client_address_too(tmp_path, photo):
    studio = make_studio(tmp_path, segment_rate_limit=2)
    studio.generate_and_store(encode(photo), image_id="house", owner="alice", address="10.0.0.1")
    studio.preview_object("house", [[38, 60]], [1], "alice", address="10.0.0.1")
    with pytest.raises(LimitExceeded, match="network address"):
        # Another owner from the same address: the address has used its 2 segmentations.
        studio.allow_segmentation("bob", "10.0.0.1")


class AutomaticOnlySegmenter(RecordsSegmenter):
    """Like a cog / replicate service: cannot take prompts, so each prompt would cost a full prediction."""

    prompts_natively = False

    def segment(self, image, **kw):
        self.calls += 1
        return super().segment(image, **kw)


def test_prompts_on_a_stored_image_reuse_the_services_masks(tmp_path, photo):
    segmenter = AutomaticOnlySegmenter(house_masks)
    studio = make_studio(tmp_path, segmenter)
    studio.generate_and_store(encode(photo), image_id="house")
    assert segmenter.calls == 1  # the one paid automatic prediction
    preview = studio.preview_object("house", [[38, 60]], [1], "local")
    out = studio.segment_object(image_id="house", points=[[38, 60], [5, 90]], point_labels=[1, 0])
    assert segmenter.calls == 1  # answered from the stored masks: no second call
    assert studio.load("house", "local").index.mask(out["mask_id"])[60, 38]
    assert preview["segmentation"]["size"] == [H, W]
