"""S3BlobStore against a real S3-compatible server (moto's standalone server, a subprocess on loopback)."""

from __future__ import annotations

import io
import logging
import re
import socket
import threading
import time
import uuid

import httpx
import numpy as np
import pytest
from PIL import Image

import masks
import s3_store
from errors import InvalidInput, NotFound, StorageError
from helpers import encode, house_masks, make_photo
from s3_server import DUMMY_KEY_ID, DUMMY_SECRET, MotoServer, SilentServer
from s3_store import S3BlobStore, S3Unavailable, UploadReport, make_s3_client
from settings import Settings

KEY_FORM = re.compile(r"^sam2-api-masks/\d{8}_\d{6}_[0-9a-f]{8}\.png$")


@pytest.fixture(scope="module")
def server():
    with MotoServer() as srv:
        yield srv


@pytest.fixture
def bucket(server) -> str:
    """A fresh bucket per test: tests share the server, never objects."""
    name = f"masks-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    return name


@pytest.fixture
def auth(server):
    """moto with IAM authentication on; users: full S3 access and read-only. Turned off afterwards."""
    suffix = uuid.uuid4().hex[:8]
    users = {
        "full": server.create_user(f"full-{suffix}", ["s3:*"]),
        "readonly": server.create_user(f"readonly-{suffix}", ["s3:GetObject"]),
    }
    server.enforce_auth(True)
    yield users
    server.enforce_auth(False)


def store_for(server: MotoServer, bucket: str, session=None, client_options: dict | None = None, **changes):
    """The store the app would build from settings pointing at `server` (dummy credentials by default)."""
    settings = server.settings(s3_bucket=bucket, **changes)
    store = S3BlobStore.from_settings(settings, session or server.session())
    if client_options:
        store.client = make_s3_client(settings, session or server.session(), **client_options)
    return store


def mask_pngs(n: int, h: int = 96, w: int = 128) -> dict[str, tuple[np.ndarray, bytes]]:
    """n distinct masks (shifted house-scene masks) and their PNGs: {index: (mask, png)}."""
    base = house_masks(h, w)
    out = {}
    for i in range(n):
        m = np.roll(base[i % len(base)], shift=i // len(base), axis=1)
        out[str(i)] = (m, masks.to_png(m))
    return out


def png_to_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def no_secrets(*texts: str) -> None:
    for text in texts:
        for secret in (DUMMY_SECRET, DUMMY_KEY_ID):
            assert secret not in text


# --------------------------------------------------------------------------------------------
# Round trip, content type, keys, deletion
# --------------------------------------------------------------------------------------------


def test_upload_many_round_trips_the_mask_png_with_its_content_type(server, bucket):
    store = store_for(server, bucket)
    data = mask_pngs(12)
    items = {store.new_mask_key(): png for _, png in data.values()}
    seen: list[tuple[int, int]] = []

    report = store.upload_many(items.items(), progress=lambda done, total: seen.append((done, total)))

    assert report.counts() == {"uploaded": 12, "failed": 0}
    assert report.ok and list(report.uploaded) == list(items)  # the caller's order
    assert seen[0] == (0, 12) and seen[-1] == (12, 12) and [d for d, _ in seen] == list(range(13))
    for key, (mask, png) in zip(items, data.values()):
        stored = store.get(key)
        assert stored == png
        np.testing.assert_array_equal(png_to_array(stored), mask.astype(np.uint8) * 255)
        assert store.content_type(key) == "image/png"
    assert set(store.keys()) == set(items)


def test_new_mask_keys_have_the_old_service_form_and_never_repeat(server, bucket):
    store = store_for(server, bucket)
    keys = [store.new_mask_key() for _ in range(5000)]
    assert all(KEY_FORM.match(k) for k in keys)
    assert len(set(keys)) == len(keys)
    assert store_for(server, bucket, s3_prefix="renders").new_key(".jpg").startswith("renders/")


def test_keys_lists_only_objects_under_the_prefix(server, bucket):
    store = store_for(server, bucket)
    server.raw_client().put_object(Bucket=bucket, Key="elsewhere/a.png", Body=b"x")
    key = store.new_mask_key()
    store.put(key, b"png", "image/png")
    assert list(store.keys()) == [key]


def test_delete_many_removes_the_objects_in_batches(server, bucket, monkeypatch):
    monkeypatch.setattr(s3_store, "DELETE_BATCH", 3)  # several DeleteObjects requests for 7 keys
    store = store_for(server, bucket)
    keys = [store.new_mask_key() for _ in range(9)]
    assert store.upload_many((k, b"png") for k in keys).ok

    store.delete_many(keys[:7] + ["sam2-api-masks/never-uploaded.png"])

    assert set(store.keys()) == set(keys[7:])
    with pytest.raises(NotFound, match="is not in the S3 bucket"):
        store.get(keys[0])
    store.delete(keys[7])
    store.delete(keys[7])  # a missing object is not an error
    assert list(store.keys()) == [keys[8]]


def test_no_acl_is_sent_unless_configured(server, bucket):
    plain, public = store_for(server, bucket), store_for(server, bucket, s3_object_acl="public-read")
    k1, k2 = plain.new_mask_key(), public.new_mask_key()
    plain.put(k1, b"a", "image/png")
    public.put(k2, b"b", "image/png")
    raw = server.raw_client()

    def grantees(key):
        return {g["Grantee"].get("URI", "owner") for g in raw.get_object_acl(Bucket=bucket, Key=key)["Grants"]}

    assert grantees(k1) == {"owner"}
    assert "http://acs.amazonaws.com/groups/global/AllUsers" in grantees(k2)


def test_upload_many_rejects_a_repeated_key_and_accepts_an_empty_batch(server, bucket):
    store = store_for(server, bucket)
    with pytest.raises(InvalidInput, match="same key twice"):
        store.upload_many([("sam2-api-masks/a.png", b"1"), ("sam2-api-masks/a.png", b"2")])
    seen = []
    assert store.upload_many([], progress=lambda d, t: seen.append((d, t))) == UploadReport()
    assert seen == [(0, 0)]


def test_from_settings_is_none_without_a_bucket():
    assert S3BlobStore.from_settings(Settings()) is None


# --------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"aws_region": "eu-west-2"}, "https://bkt.s3.eu-west-2.amazonaws.com/sam2-api-masks/x.png"),
        ({}, "https://bkt.s3.us-east-1.amazonaws.com/sam2-api-masks/x.png"),
        ({"s3_endpoint_url": "https://minio.example:9000/"}, "https://minio.example:9000/bkt/sam2-api-masks/x.png"),
        (
            {"s3_endpoint_url": "https://minio.example:9000", "s3_public_base_url": "https://cdn.example/m"},
            "https://cdn.example/m/sam2-api-masks/x.png",
        ),
    ],
)
def test_public_url_forms(changes, expected):
    import boto3

    settings = Settings(s3_bucket="bkt", **changes)
    store = S3BlobStore.from_settings(settings, boto3.session.Session(aws_access_key_id="a", aws_secret_access_key="b"))
    assert store.url_for("sam2-api-masks/x.png") == expected


def test_public_url_on_a_custom_endpoint_serves_a_public_object_and_not_a_private_one(server, bucket):
    public, private = store_for(server, bucket, s3_object_acl="public-read"), store_for(server, bucket)
    png = masks.to_png(house_masks(40, 60)[0])
    k1, k2 = public.new_mask_key(), private.new_mask_key()
    public.put(k1, png, "image/png")
    private.put(k2, png, "image/png")

    assert public.url_for(k1) == f"{server.url}/{bucket}/{k1}"
    response = httpx.get(public.url_for(k1))
    assert response.status_code == 200 and response.content == png
    assert response.headers["content-type"] == "image/png"
    assert httpx.get(private.url_for(k2)).status_code == 403  # ACLs off: public URLs need a bucket policy or CDN


def test_presigned_url_fetched_with_httpx_returns_the_private_png(server, bucket):
    # (moto's IAM mode cannot check query-string signatures, so this runs with auth off; the object is
    # still private: the unsigned URL is refused.)
    store = store_for(server, bucket, s3_url_mode="presigned", s3_presign_seconds=120)
    key = store.new_mask_key()
    png = masks.to_png(house_masks(40, 60)[1])
    store.put(key, png, "image/png")

    url = store.url_for(key)

    assert url.startswith(f"{server.url}/{bucket}/{key}?") and "X-Amz-Expires=120" in url and "X-Amz-Signature=" in url
    assert DUMMY_SECRET not in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == png and response.headers["content-type"] == "image/png"
    assert httpx.get(f"{server.url}/{bucket}/{key}").status_code == 403  # unsigned: refused


# --------------------------------------------------------------------------------------------
# Failure modes: each item failed with a clear reason, nothing raised, nothing secret; retry recovers
# --------------------------------------------------------------------------------------------


def _fail_then_recover(store: S3BlobStore, caplog, expected: str, fix) -> None:
    """Upload 10 masks and see them all fail with `expected`; fix the cause; retry the failed ones."""
    caplog.set_level(logging.DEBUG, logger="s3_store")
    items = {store.new_mask_key(): png for _, png in mask_pngs(10).values()}

    report = store.upload_many(items.items())

    assert report.counts() == {"uploaded": 0, "failed": 10}
    assert set(report.failed) == set(items)
    assert all(re.search(expected, reason) for reason in report.failed.values()), report.failed
    ok, sentence = store.check()
    assert not ok and re.search(expected, sentence), sentence
    assert any(r.levelno == logging.WARNING and re.search(expected, r.getMessage()) for r in caplog.records)
    no_secrets(caplog.text, sentence, *report.failed.values())

    fix()
    retry = store.upload_many((k, items[k]) for k in report.failed)
    assert retry.counts() == {"uploaded": 10, "failed": 0}
    assert all(store.get(k) == items[k] for k in items)
    assert store.check()[0]


def test_missing_bucket_fails_each_item_then_retry_recovers(server, caplog):
    name = f"masks-{uuid.uuid4().hex[:12]}"
    store = store_for(server, name)
    _fail_then_recover(store, caplog, rf"bucket '{name}' does not exist", lambda: server.create_bucket(name))


def test_endpoint_down_fails_each_item_then_retry_recovers(caplog):
    srv = MotoServer()  # not started yet: nothing listens on its port
    store = store_for(srv, "masks-down")
    try:
        _fail_then_recover(
            store,
            caplog,
            rf"Could not connect to the S3 endpoint {srv.url}",
            lambda: (srv.start(), srv.create_bucket("masks-down")),
        )
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("who", "expected"),
    [
        ("unknown key id", "does not recognise the AWS access key id"),
        ("wrong secret", "secret access key does not match"),
        ("read-only user", r"denied access to bucket '[^']+'.*lack that permission"),
    ],
)
def test_bad_credentials_fail_each_item_then_retry_recovers(server, bucket, auth, caplog, who, expected):
    key_id, secret = {
        "unknown key id": (DUMMY_KEY_ID, DUMMY_SECRET),
        "wrong secret": (auth["full"][0], DUMMY_SECRET),
        "read-only user": auth["readonly"],
    }[who]
    store = store_for(server, bucket, server.session(key_id, secret))
    good = make_s3_client(server.settings(), server.session(*auth["full"]))

    def fix():  # what an operator does: put working credentials in place
        store.client = good

    _fail_then_recover(store, caplog, expected, fix)
    no_secrets(*(r.getMessage() for r in caplog.records))
    assert auth["full"][1] not in caplog.text and secret not in caplog.text


def test_missing_credentials_fail_with_a_sentence_saying_where_to_set_them(server, bucket, monkeypatch, tmp_path):
    import boto3

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-role lookup off this machine
    store = store_for(server, bucket, boto3.session.Session())

    report = store.upload_many([(store.new_mask_key(), b"png")])

    assert report.n_failed == 1
    assert "No AWS credentials were found" in next(iter(report.failed.values()))
    ok, sentence = store.check()
    assert not ok and "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in sentence


def test_check_reports_a_reachable_bucket(server, bucket):
    ok, sentence = store_for(server, bucket).check()
    assert ok
    assert sentence == (
        f"S3 bucket '{bucket}' at {server.url} is reachable; masks go under 'sam2-api-masks/' with public URLs."
    )


def test_single_operations_raise_storage_errors_from_the_botocore_error(server):
    from botocore.exceptions import ClientError

    store = store_for(server, "masks-absent")
    with pytest.raises(S3Unavailable, match="does not exist") as info:
        store.put(store.new_mask_key(), b"png", "image/png")
    assert isinstance(info.value.__cause__, ClientError)
    with pytest.raises(StorageError, match="does not exist"):
        list(store.keys())


def test_a_server_that_never_answers_is_a_timeout():
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        srv = MotoServer(port=listener.getsockname()[1])
        store = store_for(srv, "masks-slow", client_options={"read_timeout": 0.3, "max_attempts": 1})
        report = store.upload_many([(store.new_mask_key(), b"png")])
    assert list(report.failed.values()) == [f"The S3 endpoint {srv.url} did not answer in time while trying to upload."]


def test_a_hung_endpoint_ends_the_batch_after_the_first_timeouts_and_retry_recovers():
    # Each upload waits read_timeout × attempts for a server that never answers: without stopping early
    # 200 masks on 8 workers would take 25 rounds of that (~24 min with the real timeouts).
    items = {f"sam2-api-masks/hung-{i:03d}.png": png for i, (_, png) in enumerate(mask_pngs(200).values())}
    with SilentServer() as hung:
        short = {"connect_timeout": 1, "read_timeout": 1, "max_attempts": 2}
        store = store_for(hung, "masks-hung", client_options=short)
        started = time.monotonic()
        report = store.upload_many(items.items())
        elapsed = time.monotonic() - started
        attempted = hung.connections
    assert elapsed < 20, elapsed
    assert report.counts() == {"uploaded": 0, "failed": 200}
    assert report.stopped and "did not answer in time" in report.stopped
    assert all("did not answer in time" in reason for reason in report.failed.values())
    assert attempted < 40  # the first few in flight, not all 200

    with MotoServer(port=hung.port) as srv:  # the endpoint comes back on the same address
        srv.create_bucket("masks-hung")
        retry = store.upload_many((k, items[k]) for k in report.failed)
        assert retry.counts() == {"uploaded": 200, "failed": 0} and not retry.stopped
        assert all(store.get(k) == items[k] for k in list(items)[::20])


def test_server_killed_mid_batch_loses_nothing_and_retry_recovers():
    srv = MotoServer().start()
    try:
        srv.create_bucket("masks-crash")
        store = store_for(srv, "masks-crash")
        items = {store.new_mask_key(): png for _, png in mask_pngs(200, 192, 256).values()}
        seen: list[int] = []

        def progress(done: int, total: int) -> None:
            seen.append(done)
            if done == 40:
                srv.stop()  # a crash mid-batch: in-flight and later uploads must fail, not raise

        report = store.upload_many(items.items(), progress=progress)

        assert seen[-1] == 200
        assert report.n_uploaded + report.n_failed == 200
        assert set(report.uploaded) | set(report.failed) == set(items)
        assert report.n_uploaded >= 40 and report.n_failed > 0
        assert all("S3 endpoint" in reason for reason in report.failed.values()), set(report.failed.values())

        # moto keeps objects in memory: the restarted server is empty, so the bucket is re-created.
        srv.start()
        srv.create_bucket("masks-crash")
        retry = store.upload_many((k, items[k]) for k in report.failed)
        assert retry.counts() == {"uploaded": report.n_failed, "failed": 0}
        assert all(store.get(k) == items[k] for k in report.failed)
    finally:
        srv.stop()


def test_upload_many_runs_uploads_concurrently(server, bucket):
    store = store_for(server, bucket)
    threads: set[str] = set()
    put = store.put

    def recording_put(key, data, content_type="application/octet-stream"):
        threads.add(threading.current_thread().name)
        put(key, data, content_type)

    store.put = recording_put
    assert store.upload_many(((store.new_mask_key(), b"x") for _ in range(40)), workers=4).ok
    assert 1 < len(threads) <= 4


def test_small_puts_skip_the_expect_100_continue_round_trip(server, bucket):
    store = store_for(server, bucket)
    sent: dict[int, str | None] = {}

    def record(request, **_):
        sent[len(request.body.getvalue())] = request.headers.get("Expect")

    store.client.meta.events.register("before-send.s3.PutObject", record)
    store.put(store.new_mask_key(), b"p" * 5000, "image/png")
    store.put(store.new_mask_key(), b"p" * (2 * 1024 * 1024), "image/png")
    assert sent == {5000: None, 2 * 1024 * 1024: b"100-continue"}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"aws_region": "eu west 1"}, "AWS_REGION is not a valid region name"),
        ({"s3_endpoint_url": "not a url"}, "S3_ENDPOINT_URL 'not a url' is not a valid URL."),
    ],
)
def test_a_misconfigured_client_is_a_storage_error_naming_the_setting(changes, expected):
    with pytest.raises(StorageError, match=re.escape(expected)):
        make_s3_client(Settings(s3_bucket="bkt", **changes))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"aws_region": "eu west 1"}, "AWS_REGION is not a valid region name"),
        ({"s3_endpoint_url": "not a url"}, "S3_ENDPOINT_URL 'not a url' is not a valid URL."),
    ],
)
def test_the_app_still_starts_with_a_misconfigured_s3_and_says_why(tmp_path, changes, expected):
    import app

    studio = app.create_studio(Settings(data_dir=tmp_path, s3_bucket="bkt", segmenter="builtin", **changes))
    ok, sentence = studio.s3_status
    assert studio.s3 is None and not ok and expected in sentence  # shown in the status line
    out = studio.generate_and_store(encode(make_photo(48, 64)), image_id="works")
    assert out["s3"] is None and out["mask_count"] > 0
