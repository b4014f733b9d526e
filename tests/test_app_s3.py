"""The app with S3 configured, against a real S3-compatible server (moto, a subprocess on loopback)."""

import datetime as dt
import io
import logging
import os
import time
import uuid
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import image_cache
from access import EVERYONE
from app_server import running_app
from errors import StorageError
from helpers import RecordsSegmenter, encode, house_masks, make_photo, record
from publish import MaskPublisher
from s3_server import DUMMY_KEY_ID, DUMMY_SECRET, REGION, MotoServer, SilentServer
from s3_store import S3BlobStore, make_s3_client
from settings import Settings
from storage import Database, LocalBlobStore
from studio import Studio

H, W = 96, 128


@pytest.fixture(scope="module")
def server():
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=DUMMY_KEY_ID, AWS_SECRET_ACCESS_KEY=DUMMY_SECRET)
    with MotoServer() as srv:
        yield srv
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def s3_app(server, tmp_path, bucket, **overrides):
    return running_app(
        tmp_path,
        RecordsSegmenter(house_masks),
        s3_bucket=bucket,
        s3_endpoint_url=server.url,
        aws_region=REGION,
        **overrides,
    )


def objects(server, bucket) -> list[str]:
    listed = server.raw_client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def fetch_png(url: str) -> np.ndarray:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, (r.status_code, r.text[:200])
    assert r.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.content)))


@pytest.mark.parametrize("mode, acl", [("public", "public-read"), ("presigned", None)])
def test_masks_are_uploaded_and_urls_served(server, tmp_path, house_photo, mode, acl):
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    with s3_app(server, tmp_path, bucket, s3_url_mode=mode, s3_object_acl=acl) as (url, studio, _):
        c = Client(url, verbose=False)
        out = c.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
        assert out["s3"] == {"uploaded": 4, "failed": 0}
        keys = objects(server, bucket)
        assert len(keys) == 4 and all(k.startswith("sam2-api-masks/") and k.endswith(".png") for k in keys)
        info = c.predict("house", api_name="/image_info")
        expected = {i: m for i, m in enumerate(house_masks(H, W))}
        by_area = sorted(expected, key=lambda i: -expected[i].sum())
        # The answer has each mask's URL, in the order of mask_ids.
        assert out["mask_ids"] == [0, 1, 2, 3] and len(out["mask_urls"]) == 4
        for mid, mask_url in zip(out["mask_ids"], out["mask_urls"]):
            np.testing.assert_array_equal(fetch_png(mask_url) == 255, expected[by_area[mid]])
        for m in info["available_masks"]:
            if mode == "public":
                assert m["mask_url"] == f"{server.url}/{bucket}/{studio.db.masks('house')[m['id']].s3_key}"
            else:
                assert "Signature" in m["mask_url"] or "X-Amz-Signature" in m["mask_url"]
            png = fetch_png(m["mask_url"])
            np.testing.assert_array_equal(png == 255, expected[by_area[m["id"]]])
        coco = c.predict("house", None, api_name="/export_coco")
        assert all(a["mask_url"] for a in coco["annotations"])
        # A prompt that finds one of the stored masks answers with it (its URL; nothing new to upload)...
        seg = c.predict(None, "house", [[38, 60]], [1], None, api_name="/segment")
        assert seg["existing"] and seg["mask_url"] and fetch_png(seg["mask_url"]).shape == (H, W)
        assert seg["s3"] == {"uploaded": 0, "failed": 0}
        # ...and a prompt-made mask of a new image is uploaded.
        fresh = c.predict(handle_file(house_photo), None, [[38, 60]], [1], None, api_name="/segment")
        assert fresh["s3"] == {"uploaded": 1, "failed": 0} and fetch_png(fresh["mask_url"]).shape == (H, W)
        c.predict(fresh["image_id"], api_name="/delete_image")
        # Sharing a render uploads the composite.
        shared = c.predict("house", [{"mask_id": 0, "color": "#ff0000"}], "original", api_name="/share_render")
        assert fetch_png(shared["url"]).shape == (H, W, 3)
        # Deleting the image removes its objects from the bucket.
        c.predict("house", api_name="/delete_image")
        assert objects(server, bucket) == []


def test_s3_down_loses_nothing_and_retry_recovers(server, tmp_path, house_photo):
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    with s3_app(server, tmp_path, bucket) as (url, studio, _):
        c = Client(url, verbose=False)
        server.stop()  # the network / S3 goes away
        out = c.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
        assert out["mask_count"] == 4 and (out["s3"]["uploaded"], out["s3"]["failed"]) == (0, 4)
        assert out["mask_urls"] == [None] * 4
        assert "could not" in out["s3"]["error"].lower() or "connect" in out["s3"]["error"].lower()
        assert "AKIA" not in out["s3"]["error"]  # the reason names no credentials
        info = c.predict("house", api_name="/image_info")
        assert [m["mask_url"] for m in info["available_masks"]] == [None] * 4
        assert c.predict("house", 38, 60, api_name="/mask_at_point")["mask_id"] is not None  # masks kept
        server.start()  # back (empty: moto keeps nothing), with its bucket
        server.create_bucket(bucket)
        result = c.predict(api_name="/retry_uploads")
        assert result["uploaded"] == 4 and result["failed"] == 0
        assert all(m["mask_url"] for m in c.predict("house", api_name="/image_info")["available_masks"])
        assert len(objects(server, bucket)) == 4
        # What the retry put in the bucket is each mask's PNG (0/255, the image's size), under its own key.
        raw = server.raw_client()
        for m in studio.db.masks("house"):
            body = raw.get_object(Bucket=bucket, Key=m.s3_key)["Body"].read()
            np.testing.assert_array_equal(
                np.asarray(Image.open(io.BytesIO(body))), studio.load("house", EVERYONE).index.mask(m.mask_id) * 255
            )


def test_pending_uploads_are_retried_at_start(server, tmp_path, house_photo):
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    with s3_app(server, tmp_path, bucket) as (url, studio, _):
        server.stop()
        Client(url, verbose=False).predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
    server.start()
    server.create_bucket(bucket)
    with s3_app(server, tmp_path, bucket) as (url, studio, _):
        import time

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and studio.db.pending_uploads():
            time.sleep(0.2)
        assert studio.db.pending_uploads() == []
        assert len(objects(server, bucket)) == 4


def checked_s3_status(studio, timeout_s: float = 30):
    """The status line's S3 part once the start-up check (in the background) has run."""
    import time

    deadline = time.monotonic() + timeout_s
    while "checking" in studio.s3_status[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    return studio.s3_status


def test_missing_bucket_is_reported_at_start_and_the_app_works(server, tmp_path, house_photo):
    with s3_app(server, tmp_path, "no-such-bucket-here") as (url, studio, _):
        ok, sentence = checked_s3_status(studio)
        assert not ok and "no-such-bucket-here" in sentence
        out = Client(url, verbose=False).predict(handle_file(house_photo), api_name="/generate_and_store_masks")
        assert out["mask_count"] == 4 and out["s3"]["failed"] == 4


def test_without_s3_mask_url_is_null_and_s3_endpoints_say_so(tmp_path, house_photo):
    with running_app(tmp_path, RecordsSegmenter(house_masks)) as (url, studio, _):
        c = Client(url, verbose=False)
        out = c.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
        assert out["s3"] is None and out["mask_urls"] == [None] * 4
        seg = c.predict(None, "house", [[38, 60]], None, None, api_name="/segment")
        assert seg["mask_url"] is None and seg["s3"] is None
        for call in (
            lambda: c.predict(api_name="/retry_uploads"),
            lambda: c.predict("house", [], "original", api_name="/share_render"),
        ):
            with pytest.raises(AppError, match="S3"):
                call()


def test_originals_are_uploaded_when_asked(server, tmp_path, house_photo):
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    with s3_app(server, tmp_path, bucket, s3_upload_originals=True) as (url, studio, _):
        c = Client(url, verbose=False)
        c.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
        keys = objects(server, bucket)
        assert len(keys) == 5  # four masks and the original
        (original,) = [k for k, kind, state in studio.db.objects("house")]
        body = server.raw_client().get_object(Bucket=bucket, Key=original)["Body"].read()
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), np.asarray(Image.open(house_photo)))
        c.predict("house", api_name="/delete_image")
        assert objects(server, bucket) == []


def test_bad_credentials_keep_the_masks_and_say_why_without_the_secret(server, tmp_path, house_photo, caplog):
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    key_id, real_secret = server.create_user(f"u-{uuid.uuid4().hex[:8]}", ["s3:*"])
    wrong_secret = "wrong-" + real_secret[6:]
    saved = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=wrong_secret)
    caplog.set_level(logging.INFO)
    server.enforce_auth(True)
    try:
        with s3_app(server, tmp_path, bucket) as (url, studio, _):
            ok, sentence = checked_s3_status(studio)
            assert not ok and "secret access key does not match" in sentence
            c = Client(url, verbose=False)
            out = c.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
            assert out["mask_count"] == 4 and out["s3"]["uploaded"] == 0 and out["s3"]["failed"] == 4
            assert "secret access key does not match" in out["s3"]["error"]
            info = c.predict("house", api_name="/image_info")
            assert len(info["available_masks"]) == 4 and all(m["mask_url"] is None for m in info["available_masks"])
            assert len(studio.db.pending_uploads()) == 4  # kept, to upload once the credentials are fixed
            for text in (sentence, out["s3"]["error"], caplog.text):
                for secret in (key_id, wrong_secret, real_secret, DUMMY_SECRET):
                    assert secret not in text
    finally:
        server.enforce_auth(False)
        os.environ.update(saved)


# --------------------------------------------------------------------------------------------
# The studio and its publisher against the same server (no UI): deletions, shares, retries, races
# --------------------------------------------------------------------------------------------


def new_bucket(server) -> str:
    bucket = f"b-{uuid.uuid4().hex[:10]}"
    server.create_bucket(bucket)
    return bucket


def many_masks(n: int):
    """A segmenter answer of n distinct masks (the house scene's, shifted)."""

    def masks_for(h, w):
        base = house_masks(h, w)
        return [np.roll(base[i % len(base)], shift=i // len(base), axis=1) for i in range(n)]

    return masks_for


class RacingDatabase(Database):
    """A Database that runs `between()` once, right after a load has read an image's mask rows."""

    between = None

    def masks(self, image_id):
        rows = super().masks(image_id)
        hook, self.between = self.between, None
        if hook is not None:
            hook()
        return rows


def s3_studio(server, tmp_path, bucket, *, endpoint=None, segmenter=None, db_class=Database, client=None, **changes):
    """A Studio publishing to `bucket` (at `endpoint`, the moto server by default)."""
    settings = Settings(
        data_dir=tmp_path, s3_bucket=bucket, s3_endpoint_url=endpoint or server.url, aws_region=REGION, **changes
    )
    store = S3BlobStore.from_settings(settings, server.session())
    if client is not None:
        store.client = make_s3_client(settings, server.session(), **client)
    db, blobs = db_class(settings.db_path), LocalBlobStore(settings.blob_dir)
    cache = image_cache.ImageCache(db, blobs)
    publisher = MaskPublisher(store, db, settings, on_change=cache.rows_changed)
    return Studio(settings, segmenter or RecordsSegmenter(house_masks), db, blobs, publisher, cache=cache)


@contextmanager
def unreachable(studio: Studio):
    """S3 out of the studio's reach (its client sent to a port nobody listens on); the bucket keeps its objects."""
    good = studio.s3.client
    dead = MotoServer()  # never started
    studio.s3.client = make_s3_client(dead.settings(), dead.session(), connect_timeout=1, max_attempts=1)
    try:
        yield
    finally:
        studio.s3.client = good


PHOTO = encode(make_photo(H, W))


def test_delete_while_s3_is_down_keeps_the_keys_and_a_retry_deletes_them(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket, s3_upload_originals=True)
    studio.generate_and_store(PHOTO, image_id="house")
    keys = objects(server, bucket)
    assert len(keys) == 5  # four masks and the original
    with unreachable(studio):
        assert studio.delete("house", "local")["image_id"] == "house"  # the image goes at once ...
        assert objects(server, bucket) == keys  # ... its objects cannot go yet ...
        assert sorted(studio.db.s3_deletions()) == keys  # ... and are remembered
        still_down = studio.retry_uploads("local")
        assert still_down["deleted"] == 0 and sorted(studio.db.s3_deletions()) == keys
    result = studio.retry_uploads("local")  # S3 is back
    assert result["deleted"] == 5 and result["failed"] == 0
    assert objects(server, bucket) == [] and studio.db.s3_deletions() == []


def test_a_crash_between_the_delete_and_s3_leaves_the_keys_for_the_next_start(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket)
    studio.generate_and_store(PHOTO, image_id="house")
    assert len(objects(server, bucket)) == 4
    studio.db.delete_image("house")  # the delete commits; the process dies before telling S3
    restarted = s3_studio(server, tmp_path, bucket)
    assert restarted.retry_uploads(EVERYONE)["deleted"] == 4  # what app.py runs at start-up
    assert objects(server, bucket) == [] and restarted.db.s3_deletions() == []


def test_retention_deletes_the_images_objects_from_the_bucket(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket, retention_days=7, s3_upload_originals=True)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)
    studio.generate_and_store(PHOTO, image_id="old")
    assert len(objects(server, bucket)) == 5
    assert studio.purge_expired(later) == 1
    assert objects(server, bucket) == [] and studio.db.s3_deletions() == []
    # With S3 down during a sweep the keys wait for the next sweep.
    studio.generate_and_store(PHOTO, image_id="older")
    with unreachable(studio):
        assert studio.purge_expired(later) == 1
    assert len(objects(server, bucket)) == 5 and len(studio.db.s3_deletions()) == 5
    assert studio.purge_expired(later) == 0
    assert objects(server, bucket) == [] and studio.db.s3_deletions() == []


def test_a_failed_share_says_so_and_a_retry_never_uploads_the_photo_as_a_render(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket)
    studio.generate_and_store(PHOTO, image_id="house")
    with unreachable(studio):
        with pytest.raises(StorageError, match=r"^Could not upload the render to S3: Could not connect to the S3"):
            studio.share_render("house", [{"mask_id": 0, "color": "#ff0000"}], "original", "local")
    assert studio.db.objects("house") == []  # no render left pending
    # A render row a crash left pending (between its row and its upload) is dropped, never filled with the photo.
    key = studio.s3.new_key(".png")
    studio.db.add_object("house", key, "render", "pending")
    result = studio.retry_uploads("local")
    assert result["uploaded"] == 0 and result["failed"] == 0
    assert studio.db.objects("house") == [] and key not in objects(server, bucket)
    shared = studio.share_render("house", [{"mask_id": 0, "color": "#ff0000"}], "original", "local")
    assert studio.db.objects("house") == [(shared["key"], "render", "uploaded")]
    body = server.raw_client().get_object(Bucket=bucket, Key=shared["key"])["Body"].read()
    assert np.asarray(Image.open(io.BytesIO(body))).shape == (H, W, 3)


def test_a_retry_on_request_uploads_the_callers_pending_originals(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket, s3_upload_originals=True)
    with unreachable(studio):
        out = studio.generate_and_store(PHOTO, image_id="house")  # open mode: the owner is "local"
        studio.generate_and_store(PHOTO, image_id="bobs", owner="bob")
    assert out["s3"]["failed"] == 4 and objects(server, bucket) == []
    result = studio.retry_uploads("local")  # what /retry_uploads passes in open mode
    assert (result["uploaded"], result["failed"]) == (5, 0)
    [(original, kind, state)] = studio.db.objects("house")
    assert (kind, state) == ("original", "uploaded")
    body = server.raw_client().get_object(Bucket=bucket, Key=original)["Body"].read()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), make_photo(H, W))
    assert [state for _, _, state in studio.db.objects(studio.find("bobs", "bob").id)] == ["pending"]  # not yours
    assert studio.retry_uploads(EVERYONE)["uploaded"] == 5  # everyone's (start-up, admin)
    assert len(objects(server, bucket)) == 10


def test_a_hung_s3_ends_the_ingest_quickly_keeps_the_masks_pending_and_retry_recovers(server, tmp_path):
    bucket = "hung-masks"
    with SilentServer() as hung:
        studio = s3_studio(
            server,
            tmp_path,
            bucket,
            endpoint=hung.url,
            segmenter=RecordsSegmenter(many_masks(100)),
            client={"connect_timeout": 1, "read_timeout": 1, "max_attempts": 2},
            s3_upload_originals=True,
        )
        started = time.monotonic()
        out = studio.generate_and_store(PHOTO, image_id="house")
        elapsed = time.monotonic() - started
    assert elapsed < 20, elapsed
    assert out["mask_count"] == 100 and out["s3"]["uploaded"] == 0 and out["s3"]["failed"] == 100
    assert "did not answer in time" in out["s3"]["error"]
    assert len(studio.db.pending_uploads()) == 100
    assert [state for _, _, state in studio.db.objects("house")] == ["pending"]
    with MotoServer(port=hung.port) as back:  # S3 answers again at the same address
        back.create_bucket(bucket)
        result = studio.retry_uploads("local")
        assert (result["uploaded"], result["failed"]) == (101, 0)
        assert len(objects(back, bucket)) == 101 and studio.db.pending_uploads() == []


def test_deleting_an_image_while_its_uploads_are_in_flight_leaves_nothing_in_the_bucket(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket, segmenter=RecordsSegmenter(many_masks(100)), s3_upload_originals=True)
    deleted = []

    def progress(fraction, text):
        if text.startswith("Uploaded 1 of") and not deleted:  # the first mask is in; 99 are still to come
            deleted.append(studio.delete("house", "local"))

    out = studio.generate_and_store(PHOTO, image_id="house", progress=progress)
    assert deleted and out["image_id"] == "house"  # the ingest itself does not fail
    assert objects(server, bucket) == []
    assert studio.db.s3_deletions() == [] and studio.db.pending_objects() == []


def test_a_load_racing_an_upload_does_not_cache_the_stale_rows(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket, db_class=RacingDatabase)
    with unreachable(studio):
        studio.generate_and_store(PHOTO, image_id="house")
    loaded = studio.load("house", "local")
    studio.cache.forget("house")
    # The retry's upload lands (rows updated, cache forgotten) after a load read the pending rows, before it caches.
    studio.db.between = lambda: studio.publisher.upload_masks("house", loaded.index, list(loaded.masks.values()))
    studio.info("house", "local")  # built from rows read before the upload
    assert studio.db.between is None
    assert all(m["mask_url"] for m in studio.info("house", "local")["available_masks"])


def test_an_object_added_with_s3_down_says_it_failed(server, tmp_path):
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket)
    studio.generate_and_store(PHOTO, image_id="house")
    new_object = np.zeros((H, W), bool)
    new_object[5:20, 5:30] = True  # not one of the stored masks: it is stored and uploaded
    with unreachable(studio):
        out = studio.add_object_mask(studio.load("house", "local"), record(new_object))
    assert not out["existing"] and out["mask_url"] is None and (out["s3"]["uploaded"], out["s3"]["failed"]) == (0, 1)
    assert "Could not connect to the S3 endpoint" in out["s3"]["error"]
    assert studio.retry_uploads("local")["uploaded"] == 1
    assert studio.info("house", "local")["available_masks"][out["mask_id"]]["mask_url"]


def test_uploading_the_masks_keeps_the_built_index(server, tmp_path, monkeypatch):
    """The upload changes only the masks' URLs: the image built at ingest serves the next click as it is."""
    bucket = new_bucket(server)
    studio = s3_studio(server, tmp_path, bucket)
    builds = []
    build = image_cache.build
    monkeypatch.setattr(image_cache, "build", lambda *a: builds.append(1) or build(*a))
    studio.generate_and_store(PHOTO, image_id="house")
    assert studio.mask_at_point("house", 38, 60, "local")["mask_id"] is not None
    assert all(m["mask_url"] for m in studio.info("house", "local")["available_masks"])
    assert len(builds) == 1  # built once, at ingest; not again after the upload
