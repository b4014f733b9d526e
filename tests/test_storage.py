"""SQLite storage and the local blob store: round trips, transactions, ids, restarts."""

import contextlib
import re
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

import masks as rle
from access import EVERYONE, check_image_id, new_image_id, stored_image_id
from errors import Conflict, InvalidInput, LimitExceeded, NotFound, StorageError
from helpers import house_masks
from storage import Database, ImageRow, LocalBlobStore, MaskRow, OwnerFull

MADE_BY_MAIN = Path(__file__).parent / "data" / "made-by-main.db"  # see tests/data/README.md


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
        db.get_image("img_b", "alice")
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


def test_quota_is_checked_inside_the_insert(db):
    db.insert_image(_image("img_a", owner="alice"), [], max_per_owner=2)
    db.insert_image(_image("img_b", owner="alice"), [], max_per_owner=2)
    with pytest.raises(OwnerFull) as info:
        db.insert_image(_image("img_c", owner="alice"), [_mask("img_c")], max_per_owner=2)
    assert info.value.count == 2 and not isinstance(info.value, LimitExceeded)  # Studio words the refusal
    assert db.count_images("alice") == 2 and db.masks("img_c") == []


def test_scope_is_explicit(db):
    db.insert_image(_image("img_a", owner="alice"), [])
    assert db.image_exists("img_a", "alice") and db.image_exists("img_a", EVERYONE)
    assert not db.image_exists("img_a", "bob")
    with pytest.raises(NotFound):
        db.get_image("img_a", "bob")
    assert [r.id for r in db.list_images(EVERYONE)] == ["img_a"] and db.list_images("bob") == []


def test_delete_records_the_s3_keys_with_the_owner(db):
    m = MaskRow(**{**vars(_mask()), "s3_key": "masks/k0.png", "upload_state": "pending"})
    db.insert_image(_image(owner="alice"), [m, _mask(mask_id=1)])
    db.add_object("img_a", "originals/o.png", "original", "uploaded")
    assert db.delete_image("img_a") == ["masks/k0.png", "originals/o.png"]
    assert db.s3_deletions("alice") == ["masks/k0.png", "originals/o.png"] and db.s3_deletions("bob") == []
    assert db.objects("img_a") == [] and db.pending_uploads() == []
    db.forget_s3_deletions(["masks/k0.png"])
    assert db.s3_deletions(EVERYONE) == ["originals/o.png"]


@pytest.fixture
def old_db(tmp_path):
    """A copy of a database written by main's storage code before this one (tests/data/README.md)."""
    path = tmp_path / "old.db"
    shutil.copyfile(MADE_BY_MAIN, path)
    return Database(path)


def test_a_database_made_by_the_previous_code_reads_unchanged(old_db):
    garden = stored_image_id("garden", "alice")
    assert [r.id for r in old_db.list_images("alice")] == ["img_20260101_120000_0a1b2c3d", garden]
    assert old_db.get_image("house", "local") == ImageRow(
        "house", "local", 64, 48, "2026-01-01T12:00:00+00:00", "fixed test segmenter", 4, "images/house-0000.png"
    )
    masks = old_db.masks("house")
    for m, expected in zip(masks, house_masks(48, 64), strict=True):
        np.testing.assert_array_equal(rle.decode({"size": [48, 64], "counts": m.counts}), expected)
        assert m.area == int(expected.sum()) and m.bbox == rle.bbox_of(expected) and m.upload_state == "none"
    assert masks[0].point_coords == [[1, 2]] and masks[1].point_coords is None
    assert [m.image_id for m in old_db.pending_uploads("alice")] == [garden] * 4
    assert old_db.pending_objects() == [("originals/garden.png", garden, "original")]
    assert old_db.objects("img_20260101_120000_0a1b2c3d") == [("renders/r1.png", "render", "uploaded")]
    assert old_db.s3_deletions("alice") == ["masks/gone-0.png", "masks/gone-1.png"]
    assert old_db.s3_deletions() == ["masks/gone-0.png", "masks/gone-1.png", "masks/orphan.png"]
    assert old_db.integrity_ok()


def test_a_database_made_by_the_previous_code_takes_writes(old_db):
    added = old_db.add_mask(_mask("house", 0))
    assert added.mask_id == 4 and old_db.get_image("house").mask_count == 5
    old_db.set_mask_urls("house", [(4, "https://x/4.png", "masks/4.png", "uploaded")])
    assert old_db.masks("house")[4].mask_url == "https://x/4.png"
    old_db.insert_image(_image("img_new", owner="local"), [_mask("img_new")])
    assert old_db.delete_image(stored_image_id("garden", "alice")) == sorted(
        ["originals/garden.png"] + [f"masks/{stored_image_id('garden', 'alice')}-{i}.png" for i in range(4)]
    )
    assert [r.id for r in old_db.list_images("local")] == ["house", "img_new"]  # newest first
    assert old_db.integrity_ok()


def test_an_old_database_gains_the_name_column_and_keeps_every_row(tmp_path):
    path = tmp_path / "old.db"
    shutil.copyfile(MADE_BY_MAIN, path)

    def everything(conn):
        tables = ("images", "masks", "objects", "s3_deletions")
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}

    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert "name" not in {r[1] for r in conn.execute("PRAGMA table_info(images)")}
        before = everything(conn)
    assert sum(len(rows) for rows in before.values()) == 3 + 12 + 2 + 3
    db = Database(path)
    assert [r.name for r in db.list_images()] == [None, None, None]
    db.insert_image(ImageRow(**{**vars(_image("img_new")), "name": "photo.jpg"}), [])
    assert db.get_image("img_new").name == "photo.jpg"
    assert db.get_image("img_new").summary("local")["name"] == "photo.jpg"
    del db
    Database(path)  # opened again: the column is there already, nothing is added twice
    with contextlib.closing(sqlite3.connect(path)) as conn:
        after = everything(conn)
    assert after["images"] == [(*r, None) for r in before["images"]] + [
        ("img_new", "local", 8, 6, "2026-01-01T00:00:00+00:00", "test", 2, "images/img_new.png", "photo.jpg")
    ]
    assert {t: after[t] for t in ("masks", "objects", "s3_deletions")} == {
        t: before[t] for t in ("masks", "objects", "s3_deletions")
    }


def test_two_opens_at_once_add_the_column_once(tmp_path):
    path = tmp_path / "old.db"
    shutil.copyfile(MADE_BY_MAIN, path)
    errors = []

    def open_it():
        try:
            Database(path).list_images()
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [r.name for r in Database(path).list_images()] == [None, None, None]
