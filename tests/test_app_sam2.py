"""The app's endpoints with an external SAM2 service (a real HTTP server on loopback), and /segment."""

import base64
import logging

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import masks as rle
from app_server import free_port, running_app
from helpers import house_masks
from sam2_server import Reply, SamServer

H, W = 96, 128
TOKEN = "sk-service-token-never-shown-123"


@pytest.fixture(scope="module")
def sam():
    with SamServer() as server:
        yield server


@pytest.fixture(scope="module")
def app(sam, tmp_path_factory):
    with running_app(
        tmp_path_factory.mktemp("data"),
        sam_api_url=sam.url,
        sam_api_token=TOKEN,
        sam_api_timeout=3.0,
        sam_api_retries=1,
    ) as (url, studio, settings):
        yield url, studio


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False)


def sam_records():
    return {
        "masks": [
            {"segmentation": rle.encode(m), "predicted_iou": 0.9, "stability_score": 0.97} for m in house_masks(H, W)
        ]
    }


def test_masks_come_from_the_service(sam, client, app, house_photo):
    sam.add("POST", "/segment", Reply(json=sam_records()))
    out = client.predict(handle_file(house_photo), "svc", api_name="/generate_and_store_masks")
    assert out["mask_count"] == 4 and out["engine"] == f"SAM2 service at {sam.url}"
    req = sam.requests_to("POST", "/segment")[-1]
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    body = req.json()
    assert body["mode"] == "auto" and base64.b64decode(body["image"])[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0")
    info = client.predict("svc", api_name="/image_info")
    assert info["engine"] == f"SAM2 service at {sam.url}"
    assert sorted(m["predicted_iou"] for m in info["available_masks"]) == [0.9] * 4


@pytest.mark.parametrize(
    "replies, message",
    [
        ([Reply(status=401, json={"detail": "bad token"})], "refused the token"),
        ([Reply(status=500)] * 2, "500"),
        ([Reply(body=b"<html>oops</html>", headers={"Content-Type": "text/html"})], "JSON"),
        (
            [Reply(json={"masks": [{"segmentation": rle.encode(np.ones((5, 5), bool))}]})],
            "Mask 0 is 5×5, but the image sent was 128×96: sizes disagree",
        ),
        ([Reply(json=sam_records(), delay=5)], "did not answer"),
        ([Reply(404, json={"detail": "Not Found"})], "answered 404 Not Found for POST {url}/segment"),
        ([Reply(413)], "refused the image as too large (HTTP 413"),
        (
            [Reply(json={"masks": [{"mask_url": "/gone.png"}]})],
            "The mask at {url}/gone.png could not be fetched (HTTP 404)",
        ),
        (
            lambda sam: [Reply(json={"masks": [{"mask_url": f"http://localhost:{sam.port}/m.png"}]})],
            "Mask 0's URL is on localhost, which is neither the SAM2 service's host (127.0.0.1) "
            "nor listed in SAM_MASK_URL_HOSTS; it was not fetched.",
        ),
    ],
    ids=["401", "500-twice", "not-json", "wrong-size", "timeout", "404", "413", "mask-url-404", "mask-url-host"],
)
def test_service_failures_are_clear_and_store_nothing(sam, client, house_photo, caplog, replies, message):
    before = len(client.predict(api_name="/list_images"))
    replies = replies(sam) if callable(replies) else replies
    message = message.replace("{url}", sam.url)
    sam.add("POST", "/segment", *replies)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AppError) as info:
            client.predict(handle_file(house_photo), api_name="/generate_and_store_masks")
    assert message.lower() in info.value.message.lower()
    assert TOKEN not in info.value.message and TOKEN not in caplog.text
    assert "Traceback" not in info.value.message
    assert len(client.predict(api_name="/list_images")) == before  # nothing half-stored
    sam.add("POST", "/segment", Reply(json=sam_records()))  # ...and the next request is served
    ok = client.predict(handle_file(house_photo), api_name="/generate_and_store_masks")
    client.predict(ok["image_id"], api_name="/delete_image")
    assert sam.requests_to("GET", "/m.png") == []  # a mask URL on a host not allowed is never fetched


def test_rate_limited_then_served(sam, client, house_photo):
    """HTTP 429 with Retry-After: 1 is retried after (at least) that second, and the masks are stored."""
    before = len(client.predict(api_name="/list_images"))
    sent = len(sam.requests_to("POST", "/segment"))
    sam.add("POST", "/segment", Reply(429, headers={"Retry-After": "1"}), Reply(json=sam_records()))
    out = client.predict(handle_file(house_photo), api_name="/generate_and_store_masks")
    assert out["mask_count"] == 4
    limited, served = sam.requests_to("POST", "/segment")[sent:]
    assert served.at - limited.at >= 1.0
    assert len(client.predict(api_name="/list_images")) == before + 1
    client.predict(out["image_id"], api_name="/delete_image")


def test_service_refusing_connections_is_clear_and_stores_nothing(tmp_path, house_photo, caplog):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with running_app(tmp_path, sam_api_url=down, sam_api_token=TOKEN, sam_api_retries=1) as (url, studio, _):
        c = Client(url, verbose=False)
        with caplog.at_level(logging.INFO):
            with pytest.raises(AppError) as info:
                c.predict(handle_file(house_photo), api_name="/generate_and_store_masks")
        assert info.value.message == (
            f"The SAM2 service at {down} cannot be reached: connection refused "
            f"(nothing listens at 127.0.0.1:{down.rsplit(':', 1)[1]})."
        )
        assert TOKEN not in info.value.message and TOKEN not in caplog.text
        assert c.predict(api_name="/list_images") == [] and studio.list_images("local") == []  # nothing stored
        with pytest.raises(AppError) as again:  # the app still serves, with the same clear message
            c.predict(handle_file(house_photo), api_name="/generate_and_store_masks")
        assert again.value.message == info.value.message


def test_segment_endpoint_sends_prompts(sam, client, house_photo):
    window = house_masks(H, W)[1]
    sam.add("POST", "/segment", Reply(json={"masks": [{"segmentation": rle.encode(window), "predicted_iou": 0.8}]}))
    out = client.predict(handle_file(house_photo), None, [[38, 60], [5, 5]], [1, 0], None, api_name="/segment")
    body = sam.requests_to("POST", "/segment")[-1].json()
    assert body["mode"] == "points" and body["points"] == [[38, 60], [5, 5]] and body["point_labels"] == [1, 0]
    assert out["mask_id"] == 0 and out["mask_url"] is None
    png = client.predict(out["image_id"], 0, api_name="/get_mask")
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(png)) == 255, window)


@pytest.mark.parametrize(
    "args, message",
    [
        ((None, None, [[1, 1]], None, None), "Send an image file"),
        ((None, "nope", [[1, 1]], None, None), "No image with id 'nope'"),
        ((None, "PHOTO", [[1000, 1]], None, None), "outside the image, which is 128×96"),
        ((None, "PHOTO", [[1, 1]], [1, 0], None), "2 labels for 1 points"),
        ((None, "PHOTO", None, None, None), "at least one include point"),
        ((None, "PHOTO", None, None, [50, 50, 10, 10]), "x0 < x1"),
        ((None, "PHOTO", "1,2", None, None), "list of [x, y] pairs"),
    ],
)
def test_segment_bad_prompts(tmp_path, house_photo, args, message):
    with running_app(tmp_path) as (url, studio, _):  # the built-in segmenter answers /segment too
        c = Client(url, verbose=False)
        stored = c.predict(handle_file(house_photo), "PHOTO", api_name="/generate_and_store_masks")
        assert stored["engine"] == "built-in classical segmenter (offline)"
        with pytest.raises(AppError) as info:
            c.predict(*args, api_name="/segment")
        assert message in info.value.message


def test_builtin_segment_on_stored_image(tmp_path, house_photo):
    with running_app(tmp_path) as (url, studio, _):
        c = Client(url, verbose=False)
        stored = c.predict(handle_file(house_photo), "PHOTO", api_name="/generate_and_store_masks")
        out = c.predict(None, "PHOTO", [[38, 60]], [1], None, api_name="/segment")
        # The built-in answers from its hierarchy: either one of the stored masks (returned, not copied) or a
        # region not among the stored ones (stored as a new mask).
        count = c.predict("PHOTO", api_name="/image_info")["mask_count"]
        if out["existing"]:
            assert out["mask_id"] < stored["mask_count"] and count == stored["mask_count"]
        else:
            assert out["mask_id"] == stored["mask_count"] and count == stored["mask_count"] + 1
        hit = c.predict("PHOTO", 38, 60, api_name="/mask_at_point")
        assert out["image_id"] == "PHOTO" and out["mask_id"] in hit["candidates"]
        again = c.predict(None, "PHOTO", [[38, 60]], [1], None, api_name="/segment")
        assert again["existing"] and again["mask_id"] == out["mask_id"]  # asked twice: no copy either way
        assert c.predict("PHOTO", api_name="/image_info")["mask_count"] == count


def test_leaving_cancels_a_paid_prediction(tmp_path, house_photo):
    """A hosted (replicate) prediction still running when the client goes away is cancelled, and nothing stored."""
    import time

    with SamServer() as srv:
        api = srv.url + "/v1/predictions"
        urls = {"get": api + "/p1", "cancel": api + "/p1/cancel"}

        def prediction(status):
            return {"id": "p1", "status": status, "output": None, "error": None, "urls": urls}

        srv.add("POST", "/v1/models/meta/sam-2/predictions", Reply(201, json=prediction("starting")))
        srv.add("GET", "/v1/predictions/p1", *[Reply(json=prediction("processing"), delay=0.2)] * 100)
        srv.add("POST", "/v1/predictions/p1/cancel", Reply(json=prediction("canceled")))
        with running_app(
            tmp_path,
            sam_api_url=api.replace("/v1/predictions", "/v1/models/meta/sam-2/predictions"),
            sam_api_protocol="replicate",
            sam_api_token=TOKEN,
            sam_api_timeout=60,
        ) as (url, studio, _):
            c = Client(url, verbose=False)
            job = c.submit(handle_file(house_photo), api_name="/generate_and_store_masks")
            srv.wait_for("GET", "/v1/predictions/p1", timeout=20)  # the prediction is running
            job.cancel()  # the client leaves
            (cancelled,) = srv.wait_for("POST", "/v1/predictions/p1/cancel", timeout=20)
            assert cancelled.headers["Authorization"] == f"Bearer {TOKEN}"
            polls = len(srv.requests_to("GET", "/v1/predictions/p1"))
            time.sleep(1.0)
            assert len(srv.requests_to("GET", "/v1/predictions/p1")) == polls  # no more polling, no more cost
            assert studio.list_images("local") == []
