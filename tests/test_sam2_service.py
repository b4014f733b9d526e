"""The SAM2 service on loopback: real uvicorn, real HTTP, the app's own client, a real S3-compatible server (moto)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
import socket
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

import masks as rle
import sam2_service
from builtin_segmenter import BuiltinSegmenter
from errors import SegmentationAuthError, SegmentationBusy, SegmentationCancelled, SegmentationImageTooLarge
from helpers import encode, make_photo
from s3_server import MotoServer
from s3_store import S3BlobStore, make_s3_client
from sam2_client import HttpSegmenter
from settings import Settings

TOKEN = "service-token-for-tests"
KEY_FORM = re.compile(r"sam2-api-masks/\d{8}_\d{6}_[0-9a-f]{8}\.png")


def b64(image: np.ndarray, fmt: str = "PNG") -> str:
    return base64.b64encode(encode(image, fmt)).decode("ascii")


def decoded(records: list[dict]) -> list[np.ndarray]:
    """The masks of records, in a canonical order (by their RLE)."""
    return [rle.decode(r["segmentation"]) for r in sorted(records, key=lambda r: r["segmentation"]["counts"])]


@pytest.fixture(scope="module")
def photo():
    return make_photo(96, 128)


@pytest.fixture(scope="module")
def builtin():
    return BuiltinSegmenter(max_masks=64)


@pytest.fixture(scope="module")
def service(builtin):
    """The service with the built-in engine, a token, no S3."""
    app = sam2_service.build_service(Settings(max_masks=64), builtin, options=sam2_service.ServiceOptions(token=TOKEN))
    with sam2_service.serving(app) as url:
        yield url


def client_for(url: str, **changes) -> HttpSegmenter:
    return HttpSegmenter(Settings(sam_api_url=url, sam_api_token=TOKEN, max_masks=64, **changes))


def post(url: str, body: dict | bytes, token: str | None = TOKEN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if isinstance(body, bytes):
        return httpx.post(url + "/segment", content=body, headers=headers, timeout=30, **kw)
    return httpx.post(url + "/segment", json=body, headers=headers, timeout=30, **kw)


# ---- one engine code, two deployments ----------------------------------------------------------------------


def test_app_client_gets_exactly_the_in_process_automatic_masks(service, builtin, photo):
    in_process = builtin.generate(photo)
    with client_for(service) as client:
        over_http = client.generate(photo)
    assert len(over_http) == len(in_process) > 3
    for a, b in zip(decoded(over_http), decoded(in_process)):
        np.testing.assert_array_equal(a, b)
    by_counts = {r["segmentation"]["counts"]: r for r in in_process}
    for record in over_http:
        assert record["predicted_iou"] == by_counts[record["segmentation"]["counts"]]["predicted_iou"]


def test_app_client_gets_the_in_process_prompt_answer(service, builtin, photo):
    for prompt in ({"points": [[40.0, 70.0]]}, {"points": [[40.0, 70.0], [100.0, 20.0]], "point_labels": [1, 0]}):
        expected = rle.decode(builtin.segment(photo, **prompt)["segmentation"])
        with client_for(service) as client:
            got = rle.decode(client.segment(photo, **prompt)["segmentation"])
        np.testing.assert_array_equal(got, expected)


def test_prompt_answer_without_s3_has_mask_url_null(service, photo):
    reply = post(service, {"image": b64(photo), "points": [[40, 70]], "point_labels": [1]})
    assert reply.status_code == 200
    body = reply.json()
    assert body["mask_url"] is None and len(body["masks"]) == 1
    assert rle.decode(body["masks"][0]["segmentation"]).shape == (96, 128)


def test_health_names_the_engine_and_the_client_sees_it_up(service):
    body = httpx.get(service + "/health").json()
    assert body["ok"] is True and body["engine"] == "built-in classical segmenter (offline)"
    assert body["device"] == "cpu" and body["model"] is None and body["s3"] is False
    with client_for(service) as client:
        ok, message = client.health()
    assert ok and "health check OK" in message
    assert httpx.get(service + "/docs").status_code == 200
    assert "/segment" in httpx.get(service + "/openapi.json").json()["paths"]


# ---- S3: the old service's mask_url ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto():
    with MotoServer() as server:
        server.create_bucket("masks")
        yield server


def test_prompt_answer_uploads_a_full_size_png_to_s3(moto, builtin, photo):
    settings = moto.settings(s3_bucket="masks")
    store = S3BlobStore.from_settings(settings, moto.session())
    app = sam2_service.build_service(settings, builtin, s3=store)
    with sam2_service.serving(app) as url:
        reply = post(url, {"image": b64(photo), "points": [[40, 70]]}, token=None)
        auto = post(url, {"image": b64(photo), "mode": "auto", "upload": True}, token=None).json()
    body = reply.json()
    key = body["mask_url"].removeprefix(f"{moto.url}/masks/")
    assert KEY_FORM.fullmatch(key), body["mask_url"]
    stored = moto.raw_client().get_object(Bucket="masks", Key=key)
    assert stored["ContentType"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(stored["Body"].read())))
    assert png.shape == (96, 128) and set(np.unique(png)) <= {0, 255}
    np.testing.assert_array_equal(png == 255, rle.decode(body["masks"][0]["segmentation"]))
    assert auto["masks"] and all(KEY_FORM.search(r["mask_url"]) for r in auto["masks"])


def test_failed_upload_answers_mask_url_null_and_logs(moto, builtin, photo, caplog):
    settings = moto.settings(s3_bucket="no-such-bucket")
    store = S3BlobStore(make_s3_client(settings, moto.session()), "no-such-bucket", endpoint_url=moto.url)
    app = sam2_service.build_service(settings, builtin, s3=store)
    with caplog.at_level(logging.WARNING, logger="mask_studio.sam2_service"), sam2_service.serving(app) as url:
        reply = post(url, {"image": b64(photo), "points": [[40, 70]]}, token=None)
    assert reply.status_code == 200
    assert reply.json()["mask_url"] is None and reply.json()["masks"]
    assert any("does not exist" in r.getMessage() for r in caplog.records)


# ---- token ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", f"Basic {TOKEN}", f"Bearer {TOKEN}x"])
def test_token_is_required(service, photo, header, caplog):
    headers = {"Authorization": header} if header else {}
    with caplog.at_level(logging.DEBUG):
        reply = httpx.post(service + "/segment", json={"image": b64(photo)}, headers=headers)
    assert reply.status_code == 401
    assert reply.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization: Bearer" in reply.json()["detail"]
    assert TOKEN not in caplog.text and TOKEN not in reply.text


def test_client_with_a_wrong_token_is_told_so(service, photo):
    client = HttpSegmenter(Settings(sam_api_url=service, sam_api_token="wrong"))
    with client, pytest.raises(SegmentationAuthError):
        client.segment(photo, points=[[40, 70]])


# ---- limits -----------------------------------------------------------------------------------------------------


def test_request_over_the_upload_limit_is_413_before_it_is_read(builtin):
    app = sam2_service.build_service(Settings(max_upload_mb=1), builtin)
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)  # ~2.4 MB as PNG
    with sam2_service.serving(app) as url:
        reply = post(url, {"image": b64(noise)}, token=None)
        assert reply.status_code == 413 and "MAX_UPLOAD_MB" in reply.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"image": "'
            for _ in range(40):
                yield b"A" * 65536

        reply = httpx.post(url + "/segment", content=chunks(), timeout=30)
        assert reply.status_code == 413


def test_image_over_the_pixel_limit_is_413_with_the_numbers(builtin, photo):
    app = sam2_service.build_service(Settings(max_image_pixels=10_000), builtin)
    with sam2_service.serving(app) as url:
        reply = post(url, {"image": b64(photo)}, token=None)
        assert reply.status_code == 413
        assert "128×96" in reply.json()["detail"] and "MAX_IMAGE_PIXELS" in reply.json()["detail"]
        with HttpSegmenter(Settings(sam_api_url=url, sam_api_retries=0)) as client:
            with pytest.raises(SegmentationImageTooLarge):
                client.generate(photo)


class HeldSegmenter(BuiltinSegmenter):
    """The built-in engine, held at the start of each call until released (or cancelled): a slow model."""

    def __init__(self):
        super().__init__(max_masks=16)
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)

    def segment(self, image, *, cancel=None, **prompts):
        self.entered.release()
        while not self.release.wait(0.02):
            if cancel is not None and cancel.is_set():
                raise SegmentationCancelled("Segmentation cancelled.")
        return super().segment(image, cancel=cancel, **prompts)


def test_past_the_queue_limit_the_answer_is_429_with_retry_after(photo):
    held = HeldSegmenter()
    options = sam2_service.ServiceOptions(concurrency=1, queue=1)
    app = sam2_service.build_service(Settings(), held, options=options)
    body = {"image": b64(photo), "points": [[40, 70]]}
    with sam2_service.serving(app) as url:
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(post(url, body, token=None).status_code))
        second = threading.Thread(target=lambda: results.append(post(url, body, token=None).status_code))
        first.start()
        assert held.entered.acquire(timeout=10)  # the first runs
        second.start()  # the second waits in the queue
        while app.app.state.gate._pending < 2:
            threading.Event().wait(0.01)
        third = post(url, body, token=None)
        assert third.status_code == 429
        assert int(third.headers["Retry-After"]) >= 1 and "busy" in third.json()["detail"]
        with HttpSegmenter(Settings(sam_api_url=url, sam_api_retries=0)) as client:
            with pytest.raises(SegmentationBusy):
                client.segment(photo, points=[[40, 70]])
        held.release.set()
        first.join(10)
        second.join(10)
        assert results == [200, 200]


def test_a_request_past_the_timeout_is_504_and_the_engine_is_told_to_stop(photo):
    held = HeldSegmenter()
    options = sam2_service.ServiceOptions(timeout=0.3)
    app = sam2_service.build_service(Settings(), held, options=options)
    with sam2_service.serving(app) as url:
        reply = post(url, {"image": b64(photo), "points": [[40, 70]]}, token=None)
        assert reply.status_code == 504 and "SAM_SERVICE_TIMEOUT" in reply.json()["detail"]
        held.release.set()  # the next one runs: the timed-out job gave its slot back
        assert post(url, {"image": b64(photo), "points": [[40, 70]]}, token=None).status_code == 200


# ---- bad requests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "JSON object"),
        ({"mode": "auto"}, 400, "needs 'image'"),
        ({"image": "!!!not base64"}, 400, "image is not valid base64"),
        ({"image": base64.b64encode(b"plain text").decode()}, 400, "not an image"),
        ({"image": "IMAGE", "mode": "everything"}, 400, "'mode' is not valid"),
        ({"image": "IMAGE", "mode": "points"}, 400, "needs 'points'"),
        ({"image": "IMAGE", "points": [[1000, 5]]}, 400, "outside"),
        ({"image": "IMAGE", "points": [[5, 5, 5]]}, 400, "'points.0' is not valid"),
        ({"image": "IMAGE", "points": [[5, 5]], "point_labels": [7]}, 400, "label"),
        ({"image": "IMAGE", "box": [50, 50, 10, 10]}, 400, "box"),
    ],
)
def test_bad_requests_get_a_sentence(service, photo, body, status, words):
    if isinstance(body, dict) and body.get("image") == "IMAGE":
        body = {**body, "image": b64(photo)}
    reply = post(service, body)
    assert reply.status_code == status, reply.text
    detail = reply.json()["detail"]
    assert isinstance(detail, str) and words in detail, detail


def test_options_from_env():
    options = sam2_service.ServiceOptions.from_env(
        {
            "SAM_SERVICE_TOKEN": " t ",
            "SAM_SERVICE_CONCURRENCY": "2",
            "SAM_SERVICE_TIMEOUT": "9.5",
            "SAM_SERVICE_IMAGE_CACHE_MB": "64",
        }
    )
    assert (options.token, options.concurrency, options.queue, options.timeout) == ("t", 2, 8, 9.5)
    assert options.image_cache_mb == 64 and sam2_service.ServiceOptions.from_env({}).image_cache_mb == 256
    assert "t" not in repr(options).replace("timeout", "").replace("ServiceOptions", "")
    with pytest.raises(Exception, match="SAM_SERVICE_QUEUE"):
        sam2_service.ServiceOptions.from_env({"SAM_SERVICE_QUEUE": "-1"})


# ---- another engine behind the same service: SAM 2 (tiny, random weights) -------------------------------------


def test_sam2_engine_behind_the_service(photo):
    pytest.importorskip("transformers")
    import functools

    import torch

    import auto_masks
    import sam2_engine
    import sam2_model
    from test_sam2_engine import tiny_sam2

    torch.set_num_threads(1)
    adapter = sam2_model.Sam2Adapter(tiny_sam2(), model_id="tiny-random-sam2")
    auto_pass = functools.partial(auto_masks.generate, pred_iou=0.0, stability=0.0)
    engine = sam2_engine.Sam2Segmenter.from_adapter(adapter, max_masks=8, auto_pass=auto_pass)
    app = sam2_service.build_service(Settings(max_masks=8), engine)
    with sam2_service.serving(app) as url:
        health = httpx.get(url + "/health").json()
        assert health["model"] == "tiny-random-sam2" and health["device"] == "cpu"
        with HttpSegmenter(Settings(sam_api_url=url, max_masks=8)) as client:
            expected = rle.decode(engine.segment(photo, points=[[40, 70]])["segmentation"])
            got = rle.decode(client.segment(photo, points=[[40, 70]])["segmentation"])
            np.testing.assert_array_equal(got, expected)
            over_http = client.generate(photo)
        assert [m.sum() for m in decoded(over_http)] == [m.sum() for m in decoded(engine.generate(photo))]


def test_connections_to_the_service_send_without_waiting_for_acks():
    """TCP_NODELAY on each accepted connection, as uvicorn's asyncio server makes them (without it every answer
    waited for the client's delayed ACK of its headers)."""
    flags: list[int] = []

    class Probe(asyncio.Protocol):
        def connection_made(self, transport):
            flags.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def accept_one() -> None:
        sock = sam2_service.listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            while not flags:
                await asyncio.sleep(0.01)
            writer.close()

    asyncio.run(asyncio.wait_for(accept_one(), 10))
    assert flags[0] != 0
