"""Importing the old backend's data.json: files generated here in its documented shape, good and broken."""

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import masks as rle
from access import EVERYONE, LOCAL_OWNER, stored_image_id
from errors import Conflict
from helpers import RecordsSegmenter, encode, house_masks, make_photo
from json_entries import JSONFormatError, entries
from legacy_import import IMPORTED_ENGINE, Importer, import_file, parse_entry
from publish import MaskPublisher
from s3_server import DUMMY_KEY_ID, DUMMY_SECRET, REGION, MotoServer
from s3_store import S3BlobStore
from settings import Settings
from storage import Database, LocalBlobStore
from studio import Studio

ROOT = Path(__file__).resolve().parent.parent


# ---- old data.json files, generated in the old documented shape ----------------------------------
def b64_png(arr: np.ndarray) -> str:
    return base64.b64encode(encode(arr)).decode()


def old_masks(h: int, w: int, seed: int) -> list[np.ndarray]:
    """Overlapping masks drawn with numpy: the house set, plus a random blob and a one-pixel mask."""
    rng = np.random.default_rng(seed)
    blob = rng.random((h, w)) > 0.7
    dot = np.zeros((h, w), bool)
    dot[rng.integers(h), rng.integers(w)] = True
    return [*house_masks(h, w), blob, dot]


def old_entry(image_id: str, rgb: np.ndarray, masks: list[np.ndarray], created_at: str, first_id: int = 1) -> dict:
    """What the old GET /images/{id}/info answered (and its data.json kept): ids need not start at 0."""
    h, w = rgb.shape[:2]
    return {
        "image_id": image_id,
        "width": w,
        "height": h,
        "created_at": created_at,
        "original_image_b64": "data:image/png;base64," + b64_png(rgb),
        "available_masks": [
            {
                "id": first_id + 2 * i,  # old ids kept as they were, gaps included
                "area": int(m.sum()),
                "bbox": rle.bbox_of(m),
                "mask_b64": base64.b64encode(rle.to_png(m)).decode(),
            }
            for i, m in enumerate(masks)
        ],
    }


def twenty_images() -> dict[str, tuple[np.ndarray, list[np.ndarray], dict]]:
    out = {}
    for i in range(20):
        h, w = 40 + 4 * i, 64 - i  # every image its own size
        rgb = make_photo(h, w, seed=i)
        masks = old_masks(h, w, seed=i)
        image_id = f"img_20250{1 + i % 9}0{1 + i % 9}_1200{i:02d}_{i:08x}"
        out[image_id] = (rgb, masks, old_entry(image_id, rgb, masks, f"2025-0{1 + i % 9}-0{1 + i % 9}T12:00:{i:02d}"))
    return out


def write_store(path: Path, store: dict, indent: int | None = None) -> Path:
    path.write_text(json.dumps(store, indent=indent))
    return path


@pytest.fixture
def settings(tmp_path):
    return Settings(data_dir=tmp_path / "data")


def storage(settings):
    return Database(settings.db_path), LocalBlobStore(settings.blob_dir)


def check_stored(db, blobs, stored_id, name, rgb, masks, first_id=1):
    row = db.get_image(stored_id)
    h, w = rgb.shape[:2]
    assert (row.name, row.width, row.height, row.engine) == (name, w, h, IMPORTED_ENGINE)
    assert row.mask_count == len(masks)
    stored_rgb = np.asarray(Image.open(io.BytesIO(blobs.get(row.blob_key))).convert("RGB"))
    np.testing.assert_array_equal(stored_rgb, rgb)
    rows = db.masks(stored_id)
    assert [m.mask_id for m in rows] == [first_id + 2 * i for i in range(len(masks))]
    for m, expected in zip(rows, masks, strict=True):
        np.testing.assert_array_equal(rle.decode({"size": [h, w], "counts": m.counts}), expected)
        assert m.area == int(expected.sum()) and m.bbox == rle.bbox_of(expected)
        assert (m.upload_state, m.s3_key) == ("none", None)
    return row


# ---- the 20-image file ---------------------------------------------------------------------------
def test_twenty_images_import_with_every_pixel_of_every_mask_identical(tmp_path, settings):
    store = twenty_images()
    path = write_store(tmp_path / "data.json", {k: v[2] for k, v in store.items()}, indent=2)
    db, blobs = storage(settings)
    progress = io.StringIO()
    summary = import_file(path, Importer(settings, db, blobs), progress)
    assert (summary.imported, summary.skipped, summary.refused, summary.exit_code) == (20, [], [], 0)
    for image_id, (rgb, masks, entry) in store.items():
        row = check_stored(db, blobs, image_id, image_id, rgb, masks)
        assert row.owner == LOCAL_OWNER
        assert row.created_at == entry["created_at"] + "+00:00"  # no zone in the old file: UTC
    # Newest first, as the Library and /list_images show them.
    listed = [r.id for r in db.list_images(LOCAL_OWNER)]
    assert listed == sorted(store, key=lambda k: store[k][2]["created_at"], reverse=True)
    assert sorted(blobs.keys()) == sorted(r.blob_key for r in db.list_images())
    assert "20 imported · 0 skipped · 0 refused" in progress.getvalue()

    again = import_file(path, Importer(settings, db, blobs))
    assert (again.imported, sorted(again.skipped), again.refused, again.exit_code) == (0, sorted(store), [], 0)
    assert len(db.list_images()) == 20 and len(list(blobs.keys())) == 20


def test_an_imported_image_works_like_an_uploaded_one(tmp_path, settings):
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    path = write_store(tmp_path / "data.json", {"house": old_entry("house", rgb, masks, "2025-05-05T10:00:00+02:00")})
    db, blobs = storage(settings)
    import_file(path, Importer(settings, db, blobs))
    studio = Studio(settings, RecordsSegmenter(house_masks), db, blobs)
    (listed,) = studio.list_images(LOCAL_OWNER)
    assert listed == {
        "image_id": "house",
        "width": 64,
        "height": 48,
        "created_at": "2025-05-05T08:00:00+00:00",
        "mask_count": 4,
        "name": "house",
    }
    info = studio.info("house", LOCAL_OWNER)
    assert [m["id"] for m in info["available_masks"]] == [1, 3, 5, 7]
    png = studio.mask_png("house", 3, LOCAL_OWNER)  # what the old /images/{id}/info serves as mask_b64
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))) > 0, masks[1])
    window = masks[1]
    y, x = map(int, np.argwhere(window)[0])
    assert studio.mask_at_point("house", x, y, LOCAL_OWNER)["mask_id"] == 3  # the smallest mask under it


# ---- broken entries --------------------------------------------------------------------------------
def _broken(rgb, masks):
    good = old_entry("x", rgb, masks, "2025-01-01T00:00:00")

    def changed(**fields):
        return {**good, **fields}

    def mask_changed(i, **fields):
        ms = [dict(m) for m in good["available_masks"]]
        ms[i].update(fields)
        return changed(available_masks=ms)

    no_created = {k: v for k, v in good.items() if k != "created_at"}
    small = base64.b64encode(rle.to_png(np.ones((10, 10), bool))).decode()
    return {
        "not_an_image": (
            changed(original_image_b64="data:image/png;base64," + base64.b64encode(b"junk").decode()),
            "original_image_b64: This file is not an image",
        ),
        "not_base64": (changed(original_image_b64="data:image/png;base64,%%%"), "original_image_b64 is not valid"),
        "no_created_at": (no_created, "the field created_at is missing"),
        "bad_date": (changed(created_at="yesterday"), "created_at 'yesterday' is not an ISO date"),
        "wrong_size_mask": (mask_changed(2, mask_b64=small), "mask 5 is 10×10, but the image is 64×48"),
        "mask_not_png": (mask_changed(0, mask_b64=base64.b64encode(b"nope").decode()), "mask 1's mask_b64 is not"),
        "mask_without_id": (changed(available_masks=[{"mask_b64": small}]), "available_masks[0] needs an 'id'"),
        "twice": (mask_changed(1, id=1), "mask id 1 appears twice"),
        "bad_bbox": (mask_changed(0, bbox=[1, 2]), "mask 1 has the bbox [1, 2]"),
        "wrong_width": (changed(width=65), "width and height say 65×48, but the image is 64×48"),
        "not_a_dict": ([1, 2], "the entry is list, not an object"),
        "bad id!": (good, "Image id 'bad id!' is not valid"),
    }


def test_bad_entries_are_reported_and_skipped_and_nothing_is_half_stored(tmp_path, settings):
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    broken = _broken(rgb, masks)
    store = {"good_1": old_entry("good_1", rgb, masks, "2025-01-01T00:00:00")}
    store.update({k: v for k, (v, _) in broken.items()})
    store["good_2"] = old_entry("good_2", rgb, masks, "2025-01-02T00:00:00")
    path = write_store(tmp_path / "data.json", store)
    db, blobs = storage(settings)
    summary = import_file(path, Importer(settings, db, blobs))
    assert summary.imported == 2 and summary.skipped == [] and summary.exit_code == 1
    assert [k for k, _ in summary.refused] == list(broken)
    for (key, why), (_, expected) in zip(summary.refused, broken.values(), strict=True):
        assert expected in why, (key, why)
    assert sorted(r.id for r in db.list_images()) == ["good_1", "good_2"]
    assert sorted(blobs.keys()) == sorted(r.blob_key for r in db.list_images())  # no blob of a refused entry
    (masks_rows,) = {len(db.masks(i)) for i in ("good_1", "good_2")}
    assert masks_rows == 4 and all(db.masks(k) == [] for k in broken)
    text = summary.text()
    assert text.splitlines()[0] == "Imported 2 image(s); skipped 0 whose id is already stored; refused 12."
    assert "  refused wrong_size_mask: mask 5 is 10×10, but the image is 64×48" in text


def test_an_id_stored_meanwhile_takes_the_blob_back(tmp_path, settings):
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    db, blobs = storage(settings)
    importer = Importer(settings, db, blobs)
    old = parse_entry("house", old_entry("house", rgb, masks, "2025-01-01T00:00:00"), settings)
    importer.store(old)
    with pytest.raises(Conflict):  # e.g. the server stored "house" between the check and the insert
        importer.store(old)
    assert len(list(blobs.keys())) == 1 and len(db.list_images()) == 1 and len(db.masks("house")) == 4


# ---- owners ----------------------------------------------------------------------------------------------
def test_owner_option_stores_under_that_owner(tmp_path, settings):
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    entry = old_entry("house", rgb, masks, "2025-01-01T00:00:00Z")
    path = write_store(tmp_path / "data.json", {"house": entry})
    db, blobs = storage(settings)
    assert import_file(path, Importer(settings, db, blobs, owner="alice")).imported == 1
    stored = stored_image_id("house", "alice")
    check_stored(db, blobs, stored, "house", rgb, masks)
    studio = Studio(settings, RecordsSegmenter(house_masks), db, blobs)
    assert [r["image_id"] for r in studio.list_images("alice")] == ["house"]  # alice's own id
    assert studio.list_images(LOCAL_OWNER) == [] and studio.list_images("bob") == []
    assert import_file(path, Importer(settings, db, blobs, owner="alice")).skipped == ["house"]
    # The same old id is free for another owner: each owner's ids are their own.
    assert import_file(path, Importer(settings, db, blobs)).imported == 1
    assert sorted(r.id for r in db.list_images(EVERYONE)) == sorted(["house", stored])


# ---- the file itself -----------------------------------------------------------------------------------------
def test_unreadable_files_stop_with_a_reason(tmp_path, settings):
    db, blobs = storage(settings)
    importer = Importer(settings, db, blobs)
    assert import_file(tmp_path / "nope.json", importer).stopped == f"there is no file {str(tmp_path / 'nope.json')!r}."
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    good = json.dumps({"a": old_entry("a", rgb, masks, "2025-01-01T00:00:00")})
    cut = tmp_path / "cut.json"
    cut.write_text(good[:-1] + ', "b": {"width": 3,, }}')  # "a" is whole, then the file is broken
    summary = import_file(cut, importer)
    assert summary.imported == 1 and summary.exit_code == 2
    assert summary.stopped.startswith("The file is not valid JSON at character ")
    assert "Stopped before the end of the file: The file is not valid JSON" in summary.text()
    (tmp_path / "list.json").write_text("[]")
    assert "does not hold a JSON object" in import_file(tmp_path / "list.json", importer).stopped


GOOD_JSON = [
    "{}",
    ' \n{ "a" : 1 , "b":[1, 2.5e3, {"c": "x\\u00e9\\"y"}], "long": 12345678901234567890, "n": null, "t": true }\n',
    '\ufeff{"k": "' + "z" * 5000 + '", "é": "ü"}',
]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("text", GOOD_JSON)
def test_entries_read_in_any_chunk_size_match_the_standard_library(text, chunk):
    got = list(entries(io.BytesIO(text.encode()), chunk=chunk))
    assert got == list(json.loads(text.lstrip("\ufeff")).items())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1]", "does not hold a JSON object"),
        ('{"a": 1,, }', "Expected an image id in quotes at character 8, found ','"),
        ('{"a": 1', "Expected ',' or '}' after an entry at character 7, found the end of the file"),
        ('{"a": {"b": [1, 2', "The file is not valid JSON at character"),
        ('{"a": 1} x', "Unexpected text after the JSON object at character 9"),
        ('{"a": tru}', "The file is not valid JSON at character 6: Expecting value"),
        ('{"a": "' + "y" * 100 + '"}', "larger than 50 characters"),
    ],
)
def test_entries_refuse_what_is_not_one_object(text, message):
    with pytest.raises(JSONFormatError, match=message.replace("(", r"\(").replace("[", r"\[")):
        list(entries(io.BytesIO(text.encode()), chunk=4, max_entry_chars=50))


# ---- S3 ------------------------------------------------------------------------------------------------------------
def test_masks_go_to_s3_when_it_is_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DUMMY_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    path = write_store(tmp_path / "data.json", {"house": old_entry("house", rgb, masks, "2025-01-01T00:00:00")})
    with MotoServer() as server:
        server.create_bucket("old-masks")
        settings = Settings(
            data_dir=tmp_path / "data", s3_bucket="old-masks", s3_endpoint_url=server.url, aws_region=REGION
        )
        db, blobs = storage(settings)
        publisher = MaskPublisher(S3BlobStore.from_settings(settings, server.session()), db, settings)
        summary = import_file(path, Importer(settings, db, blobs, publisher=publisher))
        assert (summary.imported, summary.s3_failed) == (1, 0)
        rows = db.masks("house")
        assert [m.upload_state for m in rows] == ["uploaded"] * 4 and all(m.mask_url for m in rows)
        raw = server.raw_client()
        for m, expected in zip(rows, masks, strict=True):
            png = raw.get_object(Bucket="old-masks", Key=m.s3_key)["Body"].read()
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))) > 0, expected)


# ---- the command ---------------------------------------------------------------------------------------------------
def run_app(*args, data_dir: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DATA_DIR": str(data_dir), "SEGMENTER": "builtin", **extra_env}
    env.pop("S3_BUCKET_NAME_STAGING", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args], env=env, cwd=data_dir.parent, capture_output=True, text=True
    )


def test_the_command_prints_a_summary_and_exits_with_what_happened(tmp_path):
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    store = {
        "house": old_entry("house", rgb, masks, "2025-01-01T00:00:00"),
        "broken": {"width": 64},
    }
    path = write_store(tmp_path / "data.json", store)
    data_dir = tmp_path / "data"
    first = run_app("import-legacy", str(path), "--owner", "alice", data_dir=data_dir)
    assert first.returncode == 1, first.stderr
    assert first.stdout == (
        "Imported 1 image(s); skipped 0 whose id is already stored; refused 1.\n"
        "  refused broken: the fields original_image_b64, created_at, available_masks are missing\n"
    )
    assert "1 imported · 0 skipped · 1 refused" in first.stderr and "for owner 'alice'" in first.stderr
    db = Database(data_dir / "mask_studio.db")
    assert [(r.id, r.owner, r.name) for r in db.list_images()] == [
        (stored_image_id("house", "alice"), "alice", "house")
    ]

    again = run_app("import-legacy", str(path), "--owner", "alice", data_dir=data_dir)
    assert again.returncode == 1 and again.stdout.startswith("Imported 0 image(s); skipped 1 whose id")

    missing = run_app("import-legacy", str(tmp_path / "none.json"), data_dir=data_dir)
    assert missing.returncode == 2
    assert "Stopped before the end of the file: there is no file" in missing.stdout

    usage = run_app("import-legacy", data_dir=data_dir)
    assert usage.returncode == 2 and "the following arguments are required: path" in usage.stderr


def test_the_command_starts_without_the_web_app(tmp_path):
    """The import needs no web framework: importing gradio alone took ~6 s before the command even said its usage."""
    usage = run_app("import-legacy", data_dir=tmp_path / "data", PYTHONPROFILEIMPORTTIME="1")
    assert usage.returncode == 2 and "the following arguments are required: path" in usage.stderr
    lines = [line for line in usage.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines}
    assert "legacy_import" in imported and "settings" in imported  # what the command does use
    assert not {name for name in imported if name.split(".")[0] in ("gradio", "fastapi", "torch")}


def test_a_mask_without_area_or_bbox_gets_them_from_its_pixels(settings):
    rgb, masks = make_photo(48, 64), house_masks(48, 64)
    entry = old_entry("house", rgb, masks, "2025-01-01T00:00:00")
    for m in entry["available_masks"]:
        del m["area"], m["bbox"]
    old = parse_entry("house", entry, settings)
    assert [(area, bbox) for _, _, area, bbox in old.masks] == [(int(m.sum()), rle.bbox_of(m)) for m in masks]
