"""The Library's thumbnails: made once per image from its picture, kept in the database, gone with the image."""

import io
import shutil

import numpy as np
from PIL import Image

import imaging
from helpers import RecordsSegmenter, encode, house_masks, make_photo
from settings import Settings
from storage import Database, LocalBlobStore
from studio import Studio
from thumbnails import SIDE, LibraryThumbnails, make_thumbnail


def make_studio(tmp_path):
    s = Settings(data_dir=tmp_path / "data")
    db, blobs = Database(s.db_path), LocalBlobStore(s.blob_dir)
    studio = Studio(s, RecordsSegmenter(house_masks), db, blobs)
    studio.thumbnails = LibraryThumbnails(db, blobs, studio.cache, folder=tmp_path / "thumbs")
    return studio


def picture(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_a_thumbnail_keeps_the_shape_and_is_never_enlarged():
    wide = make_thumbnail(make_photo(300, 900))
    assert Image.open(io.BytesIO(wide)).size == (SIDE, round(SIDE * 300 / 900))
    small = make_thumbnail(make_photo(40, 60))
    assert Image.open(io.BytesIO(small)).size == (60, 40)


def test_the_library_lists_newest_first_with_a_thumbnail_of_each_picture(tmp_path):
    studio = make_studio(tmp_path)
    red, blue = np.zeros((120, 160, 3), np.uint8), np.zeros((90, 90, 3), np.uint8)
    red[..., 0], blue[..., 2] = 220, 200
    studio.generate_and_store(encode(red), image_id="red", name="red.png")
    studio.generate_and_store(encode(blue), image_id="blue", name="blue.png")
    rows, files = studio.library("local")
    assert [r["image_id"] for r in rows] == ["blue", "red"] and [r["name"] for r in rows] == ["blue.png", "red.png"]
    blue_thumb, red_thumb = (picture(f) for f in files)
    assert blue_thumb.shape == (90, 90, 3) and red_thumb.shape == (120, 160, 3)
    assert abs(int(blue_thumb[..., 2].mean()) - 200) <= 3 and blue_thumb[..., 0].max() <= 8
    assert abs(int(red_thumb[..., 0].mean()) - 220) <= 3 and red_thumb[..., 2].max() <= 8


def test_thumbnails_are_made_once_and_survive_a_restart(tmp_path):
    studio = make_studio(tmp_path)
    studio.generate_and_store(encode(make_photo(96, 128)), image_id="house")
    first = open(studio.library("local")[1][0], "rb").read()
    shutil.rmtree(tmp_path / "thumbs")  # a new machine's temp folder; the original is gone too:
    (tmp_path / "data" / "blobs").rename(tmp_path / "blobs-away")  # only the database can answer now
    again = make_studio(tmp_path)
    assert open(again.library("local")[1][0], "rb").read() == first


def test_an_unreadable_picture_gets_no_thumbnail_and_the_others_still_show(tmp_path, caplog):
    studio = make_studio(tmp_path)
    studio.generate_and_store(encode(make_photo(96, 128)), image_id="lost")
    studio.generate_and_store(encode(make_photo(96, 128, seed=1)), image_id="kept")
    row = studio.db.get_image("lost")
    (tmp_path / "data" / "blobs" / row.blob_key).unlink()
    studio.cache.forget("lost")
    rows, files = studio.library("local")
    assert [r["image_id"] for r in rows] == ["kept", "lost"]
    assert files[0] is not None and files[1] is None
    assert "No thumbnail for image lost" in caplog.text


def test_a_deleted_image_takes_its_thumbnail_with_it(tmp_path):
    studio = make_studio(tmp_path)
    studio.generate_and_store(encode(make_photo(96, 128)), image_id="house")
    studio.library("local")
    assert set(studio.db.thumbnails(["house"])) == {"house"}
    studio.delete("house", "local")
    assert studio.db.thumbnails(["house"]) == {}
    assert studio.db.set_thumbnail("house", imaging.encode_jpeg(make_photo(8, 8))) is False  # never an orphan
    assert studio.library("local") == ([], [])


def test_a_database_made_by_the_previous_code_gains_the_thumbnails_table(tmp_path):
    from test_storage import MADE_BY_MAIN

    shutil.copyfile(MADE_BY_MAIN, tmp_path / "old.db")
    db = Database(tmp_path / "old.db")
    jpeg = imaging.encode_jpeg(make_photo(8, 8))
    assert db.thumbnails(["house"]) == {} and db.set_thumbnail("house", jpeg)
    assert Database(tmp_path / "old.db").thumbnails(["house", "nothing"]) == {"house": jpeg}
    assert db.integrity_ok()
