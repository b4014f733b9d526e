"""The app with S3 configured, against a real S3-compatible server (moto, a subprocess on loopback)."""

import io
import os
import uuid

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_server import running_app
from helpers import RecordsSegmenter, house_masks
from s3_server import DUMMY_KEY_ID, DUMMY_SECRET, REGION, MotoServer

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
        for m in info["available_masks"]:
            if mode == "public":
                assert m["mask_url"] == f"{server.url}/{bucket}/{studio.db.masks('house')[m['id']].s3_key}"
            else:
                assert "Signature" in m["mask_url"] or "X-Amz-Signature" in m["mask_url"]
            png = fetch_png(m["mask_url"])
            np.testing.assert_array_equal(png == 255, expected[by_area[m["id"]]])
        coco = c.predict("house", None, api_name="/export_coco")
        assert all(a["mask_url"] for a in coco["annotations"])
        # A prompt-made mask is uploaded too.
        seg = c.predict(None, "house", [[38, 60]], [1], None, api_name="/segment")
        assert seg["mask_url"] and fetch_png(seg["mask_url"]).shape == (H, W)
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


def test_missing_bucket_is_reported_at_start_and_the_app_works(server, tmp_path, house_photo):
    with s3_app(server, tmp_path, "no-such-bucket-here") as (url, studio, _):
        ok, sentence = studio.s3_status
        assert not ok and "no-such-bucket-here" in sentence
        out = Client(url, verbose=False).predict(handle_file(house_photo), api_name="/generate_and_store_masks")
        assert out["mask_count"] == 4 and out["s3"]["failed"] == 4


def test_without_s3_mask_url_is_null_and_s3_endpoints_say_so(tmp_path, house_photo):
    with running_app(tmp_path, RecordsSegmenter(house_masks)) as (url, studio, _):
        c = Client(url, verbose=False)
        out = c.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")
        assert out["s3"] is None
        seg = c.predict(None, "house", [[38, 60]], None, None, api_name="/segment")
        assert seg["mask_url"] is None
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
