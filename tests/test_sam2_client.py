"""The SAM2 service client against a real HTTP server on loopback: every response shape, every failure."""

from __future__ import annotations

import base64
import io
import logging
import socket
import threading
import time
import traceback

import httpx
import numpy as np
import pytest
from PIL import Image

import masks as rle
from errors import (
    InvalidInput,
    SegmentationAuthError,
    SegmentationBadResponse,
    SegmentationBusy,
    SegmentationCancelled,
    SegmentationEndpointNotFound,
    SegmentationImageTooLarge,
    SegmentationMaskURLError,
    SegmentationPredictionFailed,
    SegmentationRejected,
    SegmentationServerError,
    SegmentationTimeout,
    SegmentationUnreachable,
)
from sam2_client import HttpSegmenter
from sam2_server import Reply, SamServer
from settings import Settings

TOKEN = "r8_SECRET-token-1234567890"
H, W = 48, 64


# -- test data, built in code --------------------------------------------------------------------------


def make_image(h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1).astype(np.uint8)


def rect(h: int, w: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


BIG = rect(H, W, 4, 4, 60, 44)
MID = rect(H, W, 10, 10, 40, 30)
SMALL = rect(H, W, 20, 15, 30, 25)


def png(mask: np.ndarray, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def b64png(mask: np.ndarray) -> str:
    return base64.b64encode(png(mask)).decode()


def uncompressed(mask: np.ndarray) -> dict:
    return {"size": list(mask.shape), "counts": rle.runs_of(mask)}


def decoded(records: list[dict]) -> list[np.ndarray]:
    return [rle.decode(r["segmentation"]) for r in records]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    with SamServer() as s:
        yield s


@pytest.fixture
def client(server):
    """A client with a token, short timeouts and fast backoff; make(...) for other settings."""
    made = []

    def make(**changes) -> HttpSegmenter:
        base = dict(sam_api_url=server.url, sam_api_token=TOKEN, sam_api_timeout=5.0, sam_api_retries=2)
        seg = HttpSegmenter(Settings(**{**base, **changes}), backoff=0.02)
        made.append(seg)
        return seg

    yield make
    for seg in made:
        seg.close()


def assert_no_token(caplog, exc: BaseException | None = None) -> None:
    assert TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    if exc is not None:
        assert TOKEN not in "".join(traceback.format_exception(exc))


# -- response shapes -------------------------------------------------------------------------------------


def test_mask_studio_auto_sends_the_documented_request_and_normalises_coco_rle(server, client, caplog):
    caplog.set_level(logging.DEBUG)
    records = [
        {
            "segmentation": rle.encode(BIG),
            "area": 1,
            "bbox": [0, 0, 1, 1],
            "predicted_iou": 0.9,
            "stability_score": 0.97,
            "point_coords": [[30.0, 20.0]],
            "crop_box": [0, 0, W, H],
        },
        {"segmentation": rle.encode(SMALL), "predicted_iou": 0.8},
    ]
    server.add("POST", "/segment", Reply(json={"masks": records}))
    seg = client()

    out = seg.generate(make_image())

    (req,) = server.requests
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    body = req.json()
    assert body["mode"] == "auto"
    assert body["params"] == {"points_per_side": 32, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))))
    np.testing.assert_array_equal(sent, make_image())  # small images go as lossless PNG
    assert [r["area"] for r in out] == [int(BIG.sum()), int(SMALL.sum())]
    assert out[0]["bbox"] == [4, 4, 56, 40]  # recomputed from the mask, not trusted
    assert out[0]["predicted_iou"] == 0.9 and out[0]["stability_score"] == 0.97
    assert out[0]["point_coords"] == [[30.0, 20.0]] and out[0]["crop_box"] == [0, 0, W, H]
    assert out[1]["crop_box"] == [0, 0, W, H] and out[1]["point_coords"] is None
    assert all(isinstance(r["segmentation"]["counts"], str) for r in out)
    for got, want in zip(decoded(out), [BIG, SMALL]):
        np.testing.assert_array_equal(got, want)
    assert seg.engine == f"SAM2 service at {server.url}"
    assert_no_token(caplog)


@pytest.mark.parametrize(
    "segmentation",
    [
        pytest.param(uncompressed(MID), id="uncompressed-rle"),
        pytest.param(b64png(MID), id="base64-png"),
        pytest.param("data:image/png;base64," + b64png(MID), id="data-url"),
        pytest.param(MID.astype(int).tolist(), id="nested-list"),
        pytest.param({"size": [H, W], "counts": rle.encode(MID)["counts"].encode().decode()}, id="coco-rle"),
    ],
)
def test_every_segmentation_encoding_decodes_to_the_same_mask(server, client, segmentation):
    server.add("POST", "/segment", Reply(json={"masks": [{"segmentation": segmentation}]}))
    (record,) = client().generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)
    assert record["area"] == int(MID.sum()) and record["predicted_iou"] is None


def test_hugging_face_pipeline_shape(server, client):
    server.add("POST", "/segment", Reply(json={"masks": [SMALL.tolist(), BIG.tolist()], "scores": [0.6, 0.9]}))
    out = client().generate(make_image())
    assert [r["predicted_iou"] for r in out] == [0.6, 0.9]
    np.testing.assert_array_equal(rle.decode(out[1]["segmentation"]), BIG)


def test_bare_list_and_mask_urls_on_the_service_host(server, client):
    server.add("GET", "/files/a.png", Reply(body=png(BIG), headers={"Content-Type": "image/png"}))
    server.add("GET", "/files/b.png", Reply(body=png(SMALL, "RGBA")))
    server.add(
        "POST",
        "/segment",
        Reply(
            json=[
                {"mask_url": "/files/a.png", "predicted_iou": 0.7},
                {"segmentation": f"{server.url}/files/b.png"},
            ]
        ),
    )
    out = client().generate(make_image())
    for got, want in zip(decoded(out), [BIG, SMALL]):
        np.testing.assert_array_equal(got, want)
    # the service's own host gets the token; downloads reuse the pooled connection
    assert server.requests_to("GET", "/files/a.png")[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_old_s3_service_single_mask_url(server, client):
    server.add("GET", "/bucket/m.png", Reply(body=png(MID)))
    server.add("POST", "/segment", Reply(json={"mask_url": f"{server.url}/bucket/m.png"}))
    (record,) = client().generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)


def test_old_s3_service_null_mask_url_is_reported(server, client):
    server.add("POST", "/segment", Reply(json={"mask_url": None}))
    with pytest.raises(SegmentationBadResponse, match="mask_url null"):
        client().generate(make_image())


def test_empty_masks_dropped_duplicates_merged_and_cap_keeps_the_best(server, client):
    nearly_big = BIG.copy()
    nearly_big[4, 4] = False  # IoU with BIG > 0.95
    empty = np.zeros((H, W), bool)
    server.add(
        "POST",
        "/segment",
        Reply(
            json={
                "masks": [
                    {"segmentation": rle.encode(BIG), "predicted_iou": 0.80},
                    {"segmentation": rle.encode(nearly_big), "predicted_iou": 0.95},
                    {"segmentation": rle.encode(empty), "predicted_iou": 0.99},
                    {"segmentation": rle.encode(MID), "predicted_iou": 0.85},
                    {"segmentation": rle.encode(SMALL), "predicted_iou": 0.90},
                ]
            }
        ),
    )
    out = client(max_masks=2).generate(make_image())
    # the duplicate kept is the better-scored one; of the three left, the two highest predicted_iou
    assert [r["predicted_iou"] for r in out] == [0.95, 0.90]
    np.testing.assert_array_equal(rle.decode(out[0]["segmentation"]), nearly_big)


def test_large_image_is_sent_downscaled_and_masks_come_back_full_size(server, client):
    image = make_image(400, 600)
    small = rect(100, 150, 30, 20, 90, 70)  # what the service sees: 150×100
    server.add(
        "POST",
        "/segment",
        Reply(
            json={
                "masks": [{"segmentation": rle.encode(small), "point_coords": [[60, 40]], "crop_box": [0, 0, 150, 100]}]
            }
        ),
    )
    (record,) = client(sam_max_side=150).generate(image)
    sent = Image.open(io.BytesIO(base64.b64decode(server.requests[0].json()["image"])))
    assert sent.size == (150, 100)
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), rect(400, 600, 120, 80, 360, 280))
    assert record["segmentation"]["size"] == [400, 600]
    assert record["point_coords"] == [[240.0, 160.0]] and record["crop_box"] == [0, 0, 600, 400]


def test_mask_at_another_size_with_the_same_proportions_is_resized(server, client):
    half = rect(H // 2, W // 2, 5, 5, 20, 15)
    server.add("POST", "/segment", Reply(json={"masks": [{"segmentation": b64png(half)}]}))
    (record,) = client().generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), rect(H, W, 10, 10, 40, 30))


def test_prompted_segment_scales_prompts_and_picks_the_best_of_several(server, client):
    image = make_image(200, 400)
    server.add(
        "POST",
        "/segment",
        Reply(
            json={
                "masks": [
                    {"segmentation": rle.encode(rect(50, 100, 10, 10, 90, 40)), "predicted_iou": 0.7},
                    {"segmentation": rle.encode(rect(50, 100, 20, 20, 40, 30)), "predicted_iou": 0.9},
                ]
            }
        ),
    )
    record = client(sam_max_side=100).segment(
        image, points=[[120, 100], [300, 60]], point_labels=[1, 0], box=[40, 40, 200, 160]
    )
    body = server.requests[0].json()
    assert body["mode"] == "points"
    assert body["points"] == [[30.0, 25.0], [75.0, 15.0]] and body["point_labels"] == [1, 0]
    assert body["box"] == [10.0, 10.0, 50.0, 40.0] and "params" not in body
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), rect(200, 400, 80, 80, 160, 120))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one include point"),
        ({"points": [[999, 1]]}, "outside"),
        ({"points": [[1, 1]], "point_labels": [1, 1]}, "point_labels"),
        ({"points": [[1, 1]], "point_labels": [0]}, "include point"),
        ({"box": [10, 10, 5, 20]}, "x0 < x1"),
    ],
)
def test_bad_prompts_are_refused_before_any_request(server, client, kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        client().segment(make_image(), **kwargs)
    assert server.requests == []


# -- failures --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, error, message",
    [
        (Reply(401, json={"detail": f"Invalid token {TOKEN}"}), SegmentationAuthError, "check SAM_API_TOKEN"),
        (Reply(403, body=b"forbidden"), SegmentationAuthError, "refused the token"),
        (Reply(404, json={"detail": "Not Found"}), SegmentationEndpointNotFound, "POST http://127.0.0.1:\\d+/segment"),
        (Reply(413), SegmentationImageTooLarge, "Lower SAM_MAX_SIDE"),
        (Reply(422, json={"detail": "points_per_side must be <= 64"}), SegmentationRejected, "points_per_side"),
        (
            Reply(200, body=b"<html>gateway</html>", headers={"Content-Type": "text/html"}),
            SegmentationBadResponse,
            "did not answer JSON",
        ),
        (Reply(json={"result": "ok"}), SegmentationBadResponse, "keys 'result'"),
        (Reply(json=42), SegmentationBadResponse, "not masks"),
        (Reply(json={"masks": [{"area": 3}]}), SegmentationBadResponse, "no 'segmentation'"),
        (
            Reply(json={"masks": [{"segmentation": {"size": [H, W], "counts": [5, 5]}}]}),
            SegmentationBadResponse,
            "Mask 0's RLE is unusable: The mask's run lengths add up to 10 pixels, but its size 48x64 has 3072",
        ),
        (
            Reply(json={"masks": [{"segmentation": {"size": [H, W], "counts": "\x01garbage"}}]}),
            SegmentationBadResponse,
            "RLE",
        ),
        (
            Reply(json={"masks": [{"segmentation": rle.encode(np.ones((W, H), bool))}]}),
            SegmentationBadResponse,
            "sizes disagree",
        ),
        (
            Reply(json={"masks": [{"segmentation": b64png(np.ones((10, 40), bool))}]}),
            SegmentationBadResponse,
            "Mask 0 is 40×10, but the image sent was 64×48: sizes disagree",
        ),
        (Reply(json={"masks": [{"segmentation": "not base64 !"}]}), SegmentationBadResponse, "neither a URL"),
        (
            Reply(302, headers={"Location": "https://elsewhere.example/segment?key=abc"}),
            SegmentationBadResponse,
            "redirected",
        ),
    ],
    ids=[
        "401",
        "403",
        "404",
        "413",
        "422",
        "html",
        "wrong-keys",
        "number",
        "no-segmentation",
        "rle-sum",
        "rle-corrupt",
        "rle-size",
        "png-size",
        "bad-base64",
        "redirect",
    ],
)
def test_each_failure_is_a_distinct_clear_error(server, client, caplog, reply, error, message):
    caplog.set_level(logging.DEBUG)
    server.add("POST", "/segment", reply)
    with pytest.raises(error, match=message) as info:
        client().generate(make_image())
    assert len(server.requests) == 1  # none of these is sent twice
    assert "key=abc" not in str(info.value)
    assert_no_token(caplog, info.value)


DEEP_JSON = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "reply, error, message",
    [
        (Reply(json={"masks": [{"mask_url": "http://[::1/x"}]}), SegmentationMaskURLError, "Invalid IPv6 URL"),
        (
            Reply(json={"masks": [{"mask_url": "http://127.0.0.1:99999/x"}]}),
            SegmentationMaskURLError,
            "Mask 0's URL 'http://127.0.0.1:99999/x' is not a valid URL \\(Port out of range",
        ),
        (
            Reply(json={"masks": [{"mask_url": "http://127.0.0.1/x\x00y"}]}),
            SegmentationMaskURLError,
            "Mask 0's URL .* is not a valid URL .*non-printable",
        ),
        (
            Reply(json={"masks": [{"mask_url": "http://[::1/x?key=abc"}]}),
            SegmentationMaskURLError,
            "Mask 0's URL 'http://\\[::1/x\\?…' is not a valid URL",
        ),
        (
            Reply(json={"masks": [{"segmentation": {"size": [H, W], "counts": [10**30]}}]}),
            SegmentationBadResponse,
            f"add up to {10**30} pixels, but its size 48x64 has 3072",
        ),
        (
            Reply(json={"masks": [{"segmentation": {"size": [H, W], "counts": [1.5, 3071.5]}}]}),
            SegmentationBadResponse,
            "Mask 0's RLE is unusable: .*whole non-negative integers \\(got 1.5\\)",
        ),
        (
            Reply(json={"masks": [{"segmentation": {"size": [H, W], "counts": [-5, 3077]}}]}),
            SegmentationBadResponse,
            "whole non-negative integers \\(got -5\\)",
        ),
        (
            Reply(json={"masks": [{"segmentation": [[], []]}]}),
            SegmentationBadResponse,
            "Mask 0 has no pixels \\(0×2\\)",
        ),
        (Reply(json={"masks": [{"segmentation": [[10**400]]}]}), SegmentationBadResponse, "not a 2-D array of 0/1"),
        (
            Reply(json={"masks": [{"segmentation": rle.encode(MID), "predicted_iou": 10**400}]}),
            None,
            "",
        ),
        (Reply(body=DEEP_JSON), SegmentationBadResponse, "nested too deeply"),
        (Reply(422, body=DEEP_JSON), SegmentationRejected, "refused the request \\(HTTP 422"),
        (
            Reply(302, headers={"Location": "http://[::1/elsewhere?key=abc"}),
            SegmentationBadResponse,
            "answered a redirect to an invalid address; redirects are not followed",
        ),
    ],
    ids=[
        "url-ipv6",
        "url-port",
        "url-nul",
        "url-query",
        "rle-huge",
        "rle-fraction",
        "rle-negative",
        "empty-array",
        "huge-number",
        "huge-iou",
        "deep-json",
        "deep-json-error",
        "bad-redirect",
    ],
)
def test_bad_service_data_is_a_clear_error(server, client, caplog, reply, error, message):
    """Nonsense from the service becomes its own SegmentationError, never a generic 'unexpected error'."""
    caplog.set_level(logging.DEBUG)
    server.add("POST", "/segment", reply)
    if error is None:  # tolerated: the mask is kept, the unreadable score dropped
        (record,) = client().generate(make_image())
        assert record["predicted_iou"] is None
        return
    with pytest.raises(error, match=message) as info:
        client().generate(make_image())
    assert type(info.value) is error
    assert "key=abc" not in str(info.value)
    assert_no_token(caplog, info.value)


def test_401_without_a_token_says_one_is_needed(server, client):
    server.add("POST", "/segment", Reply(401))
    with pytest.raises(SegmentationAuthError, match="it needs a token: set SAM_API_TOKEN"):
        client(sam_api_token=None).generate(make_image())
    assert "Authorization" not in server.requests[0].headers


def test_500_then_200_is_retried_once(server, client, caplog):
    server.add("POST", "/segment", Reply(500), Reply(json={"masks": [{"segmentation": rle.encode(MID)}]}))
    assert len(client().generate(make_image())) == 1
    assert len(server.requests) == 2
    assert "HTTP 500; retrying" in caplog.text


def test_5xx_reported_after_the_retries(server, client):
    server.add("POST", "/segment", *[Reply(503, json={"detail": "model loading"})] * 3)
    with pytest.raises(SegmentationServerError, match="HTTP 503: model loading after 2 retries"):
        client().generate(make_image())
    assert len(server.requests) == 3


def test_429_honours_retry_after(server, client, caplog):
    server.add(
        "POST",
        "/segment",
        Reply(429, headers={"Retry-After": "0"}),
        Reply(json={"masks": [{"segmentation": rle.encode(MID)}]}),
    )
    assert len(client().generate(make_image())) == 1
    assert "HTTP 429; retrying in 0.0 s (Retry-After)" in caplog.text


def test_retry_after_of_one_second_is_waited_for(server, client):
    server.add(
        "POST",
        "/segment",
        Reply(429, headers={"Retry-After": "1"}),
        Reply(json={"masks": [{"segmentation": rle.encode(MID)}]}),
    )
    assert len(client().generate(make_image())) == 1
    first, second = server.requests
    assert second.at - first.at >= 1.0  # a lower bound only: the retry waited the second it was asked to


def test_429_asking_for_longer_than_the_timeout_gives_up_at_once(server, client):
    server.add("POST", "/segment", Reply(429, headers={"Retry-After": "3600"}))
    with pytest.raises(SegmentationBusy, match="asked to wait 3600 s, beyond SAM_API_TIMEOUT"):
        client().generate(make_image())
    assert len(server.requests) == 1


def test_429_reported_after_the_retries(server, client):
    server.add("POST", "/segment", *[Reply(429, headers={"Retry-After": "0"})] * 2)
    with pytest.raises(SegmentationBusy, match="rate-limiting .* after 1 retry"):
        client(sam_api_retries=1).generate(make_image())


def test_a_slow_answer_times_out_and_is_not_sent_again(server, client):
    server.add("POST", "/segment", Reply(json={"masks": []}, delay=5))
    with pytest.raises(SegmentationTimeout, match="within 0.5 s \\(SAM_API_TIMEOUT\\)"):
        client(sam_api_timeout=0.5).generate(make_image())
    assert len(server.requests) == 1


def test_a_trickling_answer_cannot_outlast_the_timeout(server, client):
    server.add("POST", "/segment", Reply(json={"masks": [{"segmentation": rle.encode(MID)}]}, chunk_delay=0.2))
    with pytest.raises(SegmentationTimeout, match="SAM_API_TIMEOUT"):
        client(sam_api_timeout=0.5).generate(make_image())


def test_connection_refused_is_retried_then_reported(client):
    seg = client(sam_api_url=f"http://127.0.0.1:{free_port()}", sam_api_retries=1)
    with pytest.raises(SegmentationUnreachable, match="connection refused"):
        seg.generate(make_image())


def test_unresolvable_host_is_reported(client):
    seg = client(sam_api_url="http://sam2-service.invalid", sam_api_retries=0)
    with pytest.raises(SegmentationUnreachable, match="sam2-service.invalid"):
        seg.generate(make_image())


@pytest.fixture
def stalled_port():
    """A listener whose accept queue is full and never drained: new connections are never accepted."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


def test_connect_timeout_uses_its_own_short_limit(client, stalled_port):
    seg = client(sam_api_url=f"http://127.0.0.1:{stalled_port}", sam_api_timeout=0.5, sam_api_retries=0)
    with pytest.raises(SegmentationTimeout, match="Could not connect to the SAM2 service .* within 0.5 s"):
        seg.generate(make_image())


def test_transport_seam_connect_timeout():
    # The httpx transport seam, for what a loopback server cannot show: the 10 s connect limit itself.
    def stall(request: httpx.Request) -> httpx.Response:
        assert request.extensions["timeout"]["connect"] == 10.0
        raise httpx.ConnectTimeout("timed out", request=request)

    settings = Settings(sam_api_url="http://sam2.example", sam_api_timeout=150, sam_api_retries=0)
    with HttpSegmenter(settings, transport=httpx.MockTransport(stall)) as seg:
        with pytest.raises(SegmentationTimeout, match="Could not connect .* within 10 s"):
            seg.generate(make_image())


# -- mask URLs -------------------------------------------------------------------------------------------


def test_mask_url_that_404s(server, client):
    server.add("POST", "/segment", Reply(json={"masks": [{"mask_url": "/gone.png"}]}))
    with pytest.raises(SegmentationMaskURLError, match="gone.png could not be fetched \\(HTTP 404\\)"):
        client().generate(make_image())


def test_mask_url_on_a_host_not_allowed_is_not_fetched(server, client):
    other = f"http://localhost:{server.port}/m.png"
    server.add("POST", "/segment", Reply(json={"masks": [{"mask_url": other}]}))
    with pytest.raises(SegmentationMaskURLError, match="localhost, which is neither"):
        client().generate(make_image())
    assert server.requests_to("GET", "/m.png") == []


def test_mask_url_host_allowed_by_setting_gets_no_token(server, client):
    server.add("GET", "/m.png", Reply(body=png(MID)))
    server.add("POST", "/segment", Reply(json={"masks": [{"mask_url": f"http://localhost:{server.port}/m.png"}]}))
    (record,) = client(sam_mask_url_hosts=("localhost",)).generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)
    assert "Authorization" not in server.requests_to("GET", "/m.png")[0].headers


@pytest.mark.parametrize("how", ["inline", "url"])
@pytest.mark.parametrize("mode", ["L", "LA"])
def test_png_mask_of_0_and_1_is_read_not_dropped(server, client, how, mode):
    """Some services write masks as 0/1 bytes, not 0/255: thresholding at 127 would make them empty."""
    image = Image.fromarray(MID.astype(np.uint8))
    if mode == "LA":  # the mask in a 0/1 alpha channel
        image = Image.merge("LA", (Image.new("L", (W, H), 255), image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    if how == "url":
        server.add("GET", "/m01.png", Reply(body=buf.getvalue()))
        segmentation = "/m01.png"
    else:
        segmentation = base64.b64encode(buf.getvalue()).decode()
    server.add("POST", "/segment", Reply(json={"masks": [{"segmentation": segmentation}]}))
    (record,) = client().generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)


@pytest.mark.parametrize(
    "url, reply, message",
    [
        ("/page.png", Reply(body=b"<html>login</html>"), "not a PNG or JPEG"),
        ("/big.png", Reply(body=png(MID) + b"\0" * 5000), "larger than"),
        ("/broken.png", Reply(body=png(MID)[:40]), "damaged"),
        ("ftp://127.0.0.1/m.png", None, "not http or https"),
    ],
)
def test_mask_url_content_is_verified(server, client, url, reply, message):
    if reply is not None:
        server.add("GET", url, reply)
    server.add("POST", "/segment", Reply(json={"masks": [{"mask_url": url}]}))
    seg = client()
    seg.http.max_mask_bytes = 4096
    with pytest.raises(SegmentationMaskURLError, match=message):
        seg.generate(make_image())


# -- cog and replicate -----------------------------------------------------------------------------------


def test_cog_protocol(server, client):
    server.add("GET", "/out/0.png", Reply(body=png(BIG)))
    server.add("GET", "/out/1.png", Reply(body=png(SMALL)))
    server.add(
        "POST",
        "/predictions",
        Reply(
            json={
                "status": "succeeded",
                "output": {"combined_mask": "/out/c.png", "individual_masks": ["/out/0.png", "/out/1.png"]},
            }
        ),
    )
    out = client(sam_api_protocol="cog").generate(make_image(), params={"use_m2m": True})
    body = server.requests[0].json()
    assert body["input"]["image"].startswith("data:image/png;base64,")
    assert body["input"]["points_per_side"] == 32 and body["input"]["use_m2m"] is True
    for got, want in zip(decoded(out), [BIG, SMALL]):
        np.testing.assert_array_equal(got, want)
    assert server.requests_to("GET", "/out/c.png") == []  # the combined preview is not needed


def test_cog_failed_prediction(server, client):
    server.add("POST", "/predictions", Reply(json={"status": "failed", "output": None, "error": "CUDA out of memory"}))
    with pytest.raises(SegmentationPredictionFailed, match="failed: CUDA out of memory"):
        client(sam_api_protocol="cog").generate(make_image())


def prediction(server, status: str, **extra) -> dict:
    urls = {"get": f"{server.url}/v1/predictions/p1", "cancel": f"{server.url}/v1/predictions/p1/cancel"}
    return {"id": "p1", "status": status, "output": None, "error": None, "urls": urls, **extra}


def test_replicate_polls_until_succeeded_and_reports_progress(server, client, caplog):
    caplog.set_level(logging.DEBUG)
    path = "/v1/models/meta/sam-2/predictions"
    output = {
        "combined_mask": f"http://localhost:{server.port}/d/c.png",
        "individual_masks": [f"http://localhost:{server.port}/d/0.png"],
    }
    server.add("POST", path, Reply(201, json=prediction(server, "starting")))
    server.add(
        "GET",
        "/v1/predictions/p1",
        Reply(json=prediction(server, "processing")),
        Reply(json=prediction(server, "succeeded", output=output)),
    )
    server.add("GET", "/d/0.png", Reply(body=png(MID)))
    seen = []
    seg = client(sam_api_url=server.url + path, sam_api_protocol="replicate", sam_mask_url_hosts=("localhost",))

    (record,) = seg.generate(make_image(), progress=lambda f, text: seen.append((f, text)))

    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)
    post = server.requests_to("POST", path)[0]
    assert post.headers["Authorization"] == f"Bearer {TOKEN}" and post.headers["Prefer"] == "wait=1"
    assert post.json()["input"]["image"].startswith("data:image/")
    polls = server.requests_to("GET", "/v1/predictions/p1")
    assert len(polls) == 2 and all(p.headers["Authorization"] == f"Bearer {TOKEN}" for p in polls)
    assert "Authorization" not in server.requests_to("GET", "/d/0.png")[0].headers
    assert server.requests_to("POST", "/v1/predictions/p1/cancel") == []
    assert seen[0][0] == 0.0 and seen[-1][0] <= 1.0
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert_no_token(caplog)


def test_hosted_replicate_shapes_through_the_transport_seam():
    # Replicate's own hosts cannot be served from loopback: the transport seam plays them, with the documented
    # shapes. Files on replicate.delivery subdomains are allowed by default and get no token.
    api = "https://api.replicate.com/v1/models/meta/sam-2/predictions"
    seen: list[httpx.Request] = []

    def replicate(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "api.replicate.com":
            output = {
                "combined_mask": "https://replicate.delivery/pbxt/c.png",
                "individual_masks": ["https://pbxt.replicate.delivery/x/0.png"],
            }
            return httpx.Response(
                201,
                json={
                    "id": "p1",
                    "status": "succeeded",
                    "output": output,
                    "error": None,
                    "urls": {"get": api + "/p1", "cancel": api + "/p1/cancel"},
                },
            )
        if request.url.path == "/x/0.png":
            return httpx.Response(200, content=png(MID), headers={"Content-Type": "image/png"})
        return httpx.Response(404)

    settings = Settings(sam_api_url=api, sam_api_token=TOKEN, sam_api_protocol="replicate")
    with HttpSegmenter(settings, transport=httpx.MockTransport(replicate)) as seg:
        (record,) = seg.generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)
    assert [str(r.url) for r in seen] == [api, "https://pbxt.replicate.delivery/x/0.png"]
    assert seen[0].headers["Authorization"] == f"Bearer {TOKEN}" and seen[0].headers["Prefer"] == "wait=60"
    assert "Authorization" not in seen[1].headers


def test_replicate_mask_on_another_host_is_refused(server, client):
    output = {"individual_masks": ["https://evil.example/m.png"]}
    server.add("POST", "/p", Reply(json=prediction(server, "succeeded", output=output)))
    seg = client(sam_api_url=server.url + "/p", sam_api_protocol="replicate")
    with pytest.raises(SegmentationMaskURLError, match="evil.example, which is neither"):
        seg.generate(make_image())


@pytest.mark.parametrize("status", ["failed", "canceled"])
def test_replicate_prediction_that_ends_badly(server, client, status):
    server.add("POST", "/p", Reply(json=prediction(server, status, error="input image too small")))
    with pytest.raises(SegmentationPredictionFailed, match=f"{status}: input image too small"):
        client(sam_api_url=server.url + "/p", sam_api_protocol="replicate").generate(make_image())
    assert server.requests_to("POST", "/v1/predictions/p1/cancel") == []


def test_replicate_cancel_event_stops_waiting_and_cancels_the_prediction(server, client):
    server.add("POST", "/p", Reply(201, json=prediction(server, "processing")))
    server.add("GET", "/v1/predictions/p1", *[Reply(json=prediction(server, "processing"))] * 200)
    server.add("POST", "/v1/predictions/p1/cancel", Reply(json=prediction(server, "canceled")))
    cancel = threading.Event()
    threading.Thread(target=lambda: server.wait_for("GET", "/v1/predictions/p1") and cancel.set()).start()

    with pytest.raises(SegmentationCancelled):
        client(sam_api_url=server.url + "/p", sam_api_protocol="replicate").generate(make_image(), cancel=cancel)

    (cancelled,) = server.wait_for("POST", "/v1/predictions/p1/cancel")
    assert cancelled.headers["Authorization"] == f"Bearer {TOKEN}"
    assert len(server.requests_to("POST", "/p")) == 1


def test_replicate_giving_up_at_the_timeout_cancels_the_prediction(server, client):
    server.add("POST", "/p", Reply(201, json=prediction(server, "starting")))
    server.add("GET", "/v1/predictions/p1", *[Reply(json=prediction(server, "processing"))] * 200)
    server.add("POST", "/v1/predictions/p1/cancel", Reply(json=prediction(server, "canceled")))
    with pytest.raises(SegmentationTimeout, match="SAM_API_TIMEOUT"):
        client(sam_api_url=server.url + "/p", sam_api_protocol="replicate", sam_api_timeout=0.5).generate(make_image())
    assert len(server.wait_for("POST", "/v1/predictions/p1/cancel")) == 1


@pytest.mark.parametrize("timeout, wait", [(150, 60), (30, 25), (5, 1), (2, 1)])
def test_replicate_prefer_wait_is_shorter_than_the_timeout(server, client, timeout, wait):
    """Replicate holds a `Prefer: wait` POST up to 60 s: ask for less than SAM_API_TIMEOUT, so the answer (and
    with it the prediction's cancel URL) always arrives before Mask Studio gives up."""
    output = {"individual_masks": [f"{server.url}/d/0.png"]}
    server.add("POST", "/p", Reply(json=prediction(server, "succeeded", output=output)))
    server.add("GET", "/d/0.png", Reply(body=png(MID)))
    seg = client(sam_api_url=server.url + "/p", sam_api_protocol="replicate", sam_api_timeout=timeout)
    assert len(seg.generate(make_image())) == 1
    assert server.requests_to("POST", "/p")[0].headers["Prefer"] == f"wait={wait}"


def test_replicate_cancel_while_the_prediction_is_being_created_still_cancels_it(server, client):
    """The person leaves while the creating POST is held: its answer is still read, and the prediction cancelled."""
    server.add("POST", "/p", Reply(201, json=prediction(server, "starting"), delay=1.0))
    server.add("POST", "/v1/predictions/p1/cancel", Reply(json=prediction(server, "canceled")))
    cancel = threading.Event()
    threading.Thread(target=lambda: server.wait_for("POST", "/p") and cancel.set()).start()
    seg = client(sam_api_url=server.url + "/p", sam_api_protocol="replicate", sam_api_timeout=30)

    with pytest.raises(SegmentationCancelled) as info:
        seg.generate(make_image(), cancel=cancel)

    assert "will ask the service to cancel it" in info.value.message  # not "cancelled": it has not happened yet
    assert server.requests_to("POST", "/v1/predictions/p1/cancel") == []  # the POST is still held
    (cancelled,) = server.wait_for("POST", "/v1/predictions/p1/cancel")
    assert cancelled.headers["Authorization"] == f"Bearer {TOKEN}"
    time.sleep(0.5)
    assert len(server.requests_to("POST", "/v1/predictions/p1/cancel")) == 1
    assert len(server.requests_to("POST", "/p")) == 1
    assert server.requests_to("GET", "/v1/predictions/p1") == []  # no polling after the person left


def test_replicate_cancel_message_says_the_cancel_is_being_asked_for(server, client):
    server.add("POST", "/p", Reply(201, json=prediction(server, "processing")))
    server.add("GET", "/v1/predictions/p1", *[Reply(json=prediction(server, "processing"))] * 200)
    server.add("POST", "/v1/predictions/p1/cancel", Reply(json=prediction(server, "canceled")))
    cancel = threading.Event()
    threading.Thread(target=lambda: server.wait_for("GET", "/v1/predictions/p1") and cancel.set()).start()
    with pytest.raises(SegmentationCancelled, match="asking the service to cancel the prediction"):
        client(sam_api_url=server.url + "/p", sam_api_protocol="replicate").generate(make_image(), cancel=cancel)
    assert len(server.wait_for("POST", "/v1/predictions/p1/cancel")) == 1


def test_mask_studio_cancel_claims_nothing_more(server, client):
    server.add("POST", "/segment", Reply(json={"masks": []}, delay=2))
    cancel = threading.Event()
    threading.Thread(target=lambda: server.wait_for("POST", "/segment") and cancel.set()).start()
    with pytest.raises(SegmentationCancelled) as info:
        client(sam_api_timeout=30).generate(make_image(), cancel=cancel)
    assert info.value.message == "Segmentation cancelled."


def other_host(server, path: str) -> str:
    return f"http://localhost:{server.port}{path}"


@pytest.mark.parametrize(
    "urls, message, cancelled",
    [
        ({"get": "https://evil.example/v1/predictions/p1"}, "urls.get .* points to evil.example", True),
        ({"get": "ftp://127.0.0.1/v1/predictions/p1"}, "urls.get .* is not http or https", True),
        ({"get": "http://[::1/p1"}, r"urls.get 'http://\[::1/p1' that is not a valid URL", True),
        ({"get": "http://127.0.0.1:99999/p1"}, r"urls.get .* is not a valid URL \(Port out of range", True),
        ({"get": 42}, "gives no urls.get to follow", True),
        ({"cancel": "https://evil.example/v1/predictions/p1/cancel"}, "urls.cancel .* points to evil.example", False),
        ({"cancel": "http://[::1/c"}, "urls.cancel .* is not a valid URL", False),
        ({"get": "LOCALHOST"}, "urls.get .* points to localhost", True),
    ],
    ids=["get-host", "get-scheme", "get-ipv6", "get-port", "get-number", "cancel-host", "cancel-ipv6", "get-other"],
)
def test_replicate_urls_must_stay_on_allowed_hosts(server, client, urls, message, cancelled):
    """urls.get / urls.cancel are followed only to the service's origin or a host allowed for mask URLs."""
    body = prediction(server, "processing")
    for key, value in urls.items():
        body["urls"][key] = other_host(server, "/v1/predictions/p1") if value == "LOCALHOST" else value
    server.add("POST", "/p", Reply(201, json=body))
    server.add("POST", "/v1/predictions/p1/cancel", Reply(json=prediction(server, "canceled")))
    with pytest.raises(SegmentationBadResponse, match=message) as info:
        client(sam_api_url=server.url + "/p", sam_api_protocol="replicate").generate(make_image())
    assert server.requests_to("GET", "/v1/predictions/p1") == []
    if cancelled:  # the valid cancel URL is still used, so the prediction stops being billed
        assert len(server.wait_for("POST", "/v1/predictions/p1/cancel")) == 1
    else:
        assert "may still be running" in info.value.message
        assert server.requests_to("POST", "/v1/predictions/p1/cancel") == []


def test_replicate_urls_on_a_host_allowed_for_masks_are_followed(server, client):
    body = prediction(server, "processing")
    body["urls"] = {"get": other_host(server, "/v1/predictions/p1"), "cancel": other_host(server, "/c")}
    output = {"individual_masks": [other_host(server, "/d/0.png")]}
    server.add("POST", "/p", Reply(201, json=body))
    server.add("GET", "/v1/predictions/p1", Reply(json=prediction(server, "succeeded", output=output)))
    server.add("GET", "/d/0.png", Reply(body=png(MID)))
    seg = client(sam_api_url=server.url + "/p", sam_api_protocol="replicate", sam_mask_url_hosts=("localhost",))
    (record,) = seg.generate(make_image())
    np.testing.assert_array_equal(rle.decode(record["segmentation"]), MID)
    assert "Authorization" not in server.requests_to("GET", "/v1/predictions/p1")[0].headers  # another origin


def test_cancel_already_set_sends_nothing(server, client):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(SegmentationCancelled):
        client().generate(make_image(), cancel=cancel)
    assert server.requests == []


def test_cancel_during_a_slow_answer_returns_promptly(server, client):
    server.add("POST", "/segment", Reply(json={"masks": []}, delay=5))
    cancel = threading.Event()
    threading.Thread(target=lambda: server.wait_for("POST", "/segment") and cancel.set()).start()
    with pytest.raises(SegmentationCancelled):
        client(sam_api_timeout=30).generate(make_image(), cancel=cancel)


def test_segment_over_replicate_picks_from_one_automatic_call(server, client):
    server.add("GET", "/d/0.png", Reply(body=png(BIG)))
    server.add("GET", "/d/1.png", Reply(body=png(SMALL)))
    output = {"individual_masks": [f"{server.url}/d/0.png", f"{server.url}/d/1.png"]}
    server.add("POST", "/p", Reply(json=prediction(server, "succeeded", output=output)))
    seg = client(sam_api_url=server.url + "/p", sam_api_protocol="replicate")
    image = make_image()

    whole = seg.segment(image, points=[[25, 20]])
    part = seg.segment(image, points=[[25, 20], [50, 40]], point_labels=[1, 0])
    boxed = seg.segment(image, box=[19, 14, 31, 26])

    np.testing.assert_array_equal(rle.decode(whole["segmentation"]), BIG)  # no scores: the largest
    np.testing.assert_array_equal(rle.decode(part["segmentation"]), SMALL)  # (50, 40) excluded BIG
    np.testing.assert_array_equal(rle.decode(boxed["segmentation"]), SMALL)
    assert len(server.requests_to("POST", "/p")) == 1  # one paid call for three clicks
    with pytest.raises(SegmentationRejected, match="None of the 2 masks"):
        seg.segment(image, points=[[1, 1]])


# -- health, pooling, factory ----------------------------------------------------------------------------


def test_health_ok(server, client):
    server.add("GET", "/health", Reply(json={"status": "ok"}))
    assert client().health() == (True, f"The SAM2 service at {server.url} answers (health check OK).")
    assert server.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_health_falls_back_to_the_base_url(server, client):
    server.add("GET", "/v1", Reply(json={"hello": "sam2"}))
    ok, text = client(sam_api_url=server.url + "/v1").health()
    assert ok and "answers (HTTP 200)" in text
    assert [r.path for r in server.requests] == ["/v1/health", "/v1"]


@pytest.mark.parametrize(
    "reply, text",
    [(Reply(401), "rejects the token (HTTP 401)"), (Reply(503), "answers with an error (HTTP 503)")],
)
def test_health_problems(server, client, reply, text):
    server.add("GET", "/health", reply)
    ok, sentence = client().health()
    assert not ok and text in sentence


def test_health_never_raises(client):
    ok, text = client(sam_api_url=f"http://127.0.0.1:{free_port()}").health()
    assert not ok and "connection refused" in text
    closed = client()
    closed.close()
    assert closed.health()[0] is False


def test_one_pooled_connection_is_reused(server, client):
    server.add("POST", "/segment", *[Reply(json={"masks": [{"segmentation": rle.encode(MID)}]})] * 3)
    seg = client()
    for _ in range(3):
        seg.generate(make_image())
    assert len({r.client_port for r in server.requests}) == 1


def test_credentials_in_the_url_become_a_header_and_are_never_shown(server, caplog):
    caplog.set_level(logging.DEBUG)
    url = server.url.replace("http://", f"http://user:{TOKEN}@")
    server.add("POST", "/segment", Reply(401))
    with HttpSegmenter(Settings(sam_api_url=url, sam_api_retries=0)) as seg:
        assert TOKEN not in seg.engine
        with pytest.raises(SegmentationAuthError) as info:
            seg.generate(make_image())
    assert server.requests[0].headers["Authorization"].startswith("Basic ")
    assert_no_token(caplog, info.value)


@pytest.mark.parametrize("httpx_level", [None, logging.INFO, logging.DEBUG], ids=["default", "info", "debug"])
def test_a_key_in_the_url_query_never_reaches_the_logs(server, client, caplog, httpx_level):
    """The app logs at INFO, and httpx logs every request URL at INFO: a key in SAM_API_URL must not follow."""
    key = "qs-SECRET-key-987"
    caplog.set_level(logging.INFO)
    if httpx_level is not None:  # someone turned httpx's own logging up: the URLs it logs are redacted
        caplog.set_level(httpx_level, logger="httpx")
    server.add("GET", "/files/m.png", Reply(body=png(MID)))
    server.add(
        "POST",
        "/segment",
        Reply(json={"masks": [{"mask_url": f"/files/m.png?api_key={key}"}]}),
        Reply(404),
    )
    seg = client(sam_api_url=f"{server.url}?api_key={key}")
    assert len(seg.generate(make_image())) == 1
    with pytest.raises(SegmentationEndpointNotFound) as info:
        seg.generate(make_image())
    assert server.requests_to("GET", "/files/m.png")  # the query was sent, only not logged
    if httpx_level is not None:
        assert "HTTP Request: POST" in caplog.text  # httpx did log: redacted
    assert key not in caplog.text and "api_key" not in caplog.text
    for record in caplog.records:
        assert key not in record.getMessage()
    assert key not in str(info.value)
    assert_no_token(caplog, info.value)


@pytest.mark.parametrize("token", [None, TOKEN], ids=["url-credentials", "token-and-url-credentials"])
def test_a_raw_password_in_the_url_is_never_shown(server, caplog, token):
    password = "hunter2-raw-pass"
    caplog.set_level(logging.DEBUG)
    url = server.url.replace("http://", f"http://user:{password}@")
    echo = {"detail": f"user 'user' with password {password} may not segment"}
    server.add("POST", "/segment", Reply(401, json=echo), Reply(422, json=echo))
    with HttpSegmenter(Settings(sam_api_url=url, sam_api_token=token, sam_api_retries=0)) as seg:
        assert password not in seg.engine and seg.engine == f"SAM2 service at {server.url}"
        with pytest.raises(SegmentationAuthError) as auth:
            seg.generate(make_image())
        with pytest.raises(SegmentationRejected) as rejected:
            seg.generate(make_image())
    for exc in (auth.value, rejected.value):
        assert password not in "".join(traceback.format_exception(exc))
        assert "password ***" in exc.message
    assert password not in caplog.text
    assert_no_token(caplog)


@pytest.mark.parametrize(
    "url, message",
    [
        (
            "ftp://user:hunter2-raw-pass@sam2.example/x",
            "must be an http:// or https:// address; got 'ftp://sam2.example/x'",
        ),
        ("http://user:hunter2-raw-pass@sam2.example:99999/x", r"is not a valid URL \(Port out of range"),
    ],
)
def test_a_bad_sam_api_url_is_a_clear_configuration_error(url, message):
    with pytest.raises(InvalidInput, match=message) as info:
        HttpSegmenter(Settings(sam_api_url=url))
    assert "hunter2" not in str(info.value) and info.value.title == "Configuration error"
