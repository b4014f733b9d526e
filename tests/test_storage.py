"""SQLite storage and the local blob store: round trips, transactions, ids, restarts."""

import re

import numpy as np
import pytest

import masks as rle
from errors import Conflict, InvalidInput, NotFound, StorageError
from storage import Database, ImageRow, LocalBlobStore, MaskRow, check_image_id, new_image_id


def _image(image_id="img_a", owner="local", masks=2):
    return ImageRow(image_id, owner, 8, 6, "2026-01-01T00:00:00+00:00", "test", masks, f"images/{image_id}.png")


def _mask(image_id="img_a", mask_id=0):
    m = np.zeros((6, 8), bool)
    m[1:4, 2 : 3 + mask_id] = True
    return MaskRow(
        image_id,
        mask_id,
        rle.encode(m)["counts"],
        int(m.sum()),
        rle.bbox_of(m),
        0.9,
        None,
        [[2, 1]],
        None,
        None,
        "none",
    )


@pytest.fixture
def db(tmp_path):
    return Database(tmp_path / "t.db")


def test_round_trip(db):
    db.insert_image(_image(), [_mask(mask_id=0), _mask(mask_id=1)])
    row = db.get_image("img_a")
    assert row == _image()
    got = db.masks("img_a")
    assert [m.mask_id for m in got] == [0, 1]
    assert got[1] == _mask(mask_id=1)
    assert got[1].bbox == [2, 1, 2, 3] and got[1].point_coords == [[2, 1]]


def test_transaction_rolls_back_whole_ingest(db):
    with pytest.raises(Conflict):  # the second mask repeats a primary key: nothing may remain
        db.insert_image(_image(), [_mask(mask_id=0), _mask(mask_id=0)])
    assert db.list_images() == []
    assert db.masks("img_a") == []
    with pytest.raises(NotFound):
        db.get_image("img_a")


def test_taken_id_is_refused_never_overwritten(db):
    db.insert_image(_image(), [_mask()])
    with pytest.raises(Conflict, match="'img_a' is already taken"):
        db.insert_image(_image(masks=1), [_mask(mask_id=0)])
    assert db.get_image("img_a").mask_count == 2


def test_survives_restart(tmp_path):
    Database(tmp_path / "t.db").insert_image(_image(), [_mask()])
    again = Database(tmp_path / "t.db")
    assert [r.id for r in again.list_images()] == ["img_a"]
    assert again.integrity_ok()


def test_owner_sees_only_own_images(db):
    db.insert_image(_image("img_a", owner="alice"), [])
    db.insert_image(_image("img_b", owner="bob"), [])
    assert [r.id for r in db.list_images("alice")] == ["img_a"]
    with pytest.raises(NotFound, match="No image with id 'img_b'"):
        db.get_image("img_b", owner="alice")
    assert {r.id for r in db.list_images()} == {"img_a", "img_b"}


def test_delete_cascades_to_masks(db):
    db.insert_image(_image(), [_mask()])
    db.delete_image("img_a")
    assert db.masks("img_a") == []


def test_add_mask_takes_next_id(db):
    db.insert_image(_image(), [_mask(mask_id=0), _mask(mask_id=1)])
    added = db.add_mask(_mask(mask_id=99))
    assert added.mask_id == 2
    assert db.get_image("img_a").mask_count == 3


def test_generated_ids_have_the_old_backends_form():
    ids = {new_image_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"img_\d{8}_\d{6}_[0-9a-f]{8}", i) for i in ids)


@pytest.mark.parametrize("bad", ["", "-x", "../etc/passwd", "a b", "x" * 65, "é", "a;DROP TABLE images", None, 5])
def test_bad_custom_ids(bad):
    with pytest.raises(InvalidInput, match="is not valid: use 1–64 characters"):
        check_image_id(bad)


def test_good_custom_ids():
    for good in ["a", "Photo_1", "x" * 64, "0-abc"]:
        assert check_image_id(good) == good


def test_local_blobs(tmp_path):
    blobs = LocalBlobStore(tmp_path / "blobs")
    assert list(blobs.keys()) == []  # nothing created before the first write
    blobs.put("images/a.png", b"abc")
    assert blobs.get("images/a.png") == b"abc"
    (tmp_path / "blobs" / "images" / ".tmp-crashed").write_bytes(b"half")
    assert list(blobs.keys()) == ["images/a.png"]  # an interrupted write is cleaned, not listed
    blobs.delete("images/a.png")
    blobs.delete("images/a.png")  # deleting twice is fine
    with pytest.raises(NotFound):
        blobs.get("images/a.png")
    with pytest.raises(StorageError, match="Invalid blob key"):
        blobs.put("../escape", b"x")
