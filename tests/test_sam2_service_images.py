"""Images named by their SHA-256 instead of resent: the real service on loopback, the app's own client, real HTTP."""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import numpy as np
import pytest

import masks as rle
import sam2_service
from builtin_segmenter import BuiltinSegmenter
from errors import InvalidInput, SegmentationRejected
from helpers import encode, make_photo
from sam2_client import HttpSegmenter
from sam2_server import Reply, SamServer
from service_images import ImageStore, UnknownImage, sha256_of
from service_protocols import prepare_image
from settings import Settings

TOKEN = "service-token-for-image-tests"
H, W = 96, 128
ONE_IMAGE = H * W * 3  # bytes of one decoded photo: a store this size keeps exactly one


class Recorder:
    """Wraps the service's ASGI app and keeps the JSON body of every POST /segment, as it arrived."""

    def __init__(self, app):
        self.app = app
        self.bodies: list[dict] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/segment":
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.bodies.append(json.loads(body))
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def sent(self) -> list[str]:
        """Per request: 'image' when it carried the image, 'hash' when it only named it."""
        return ["image" if "image" in b else "hash" if "image_sha256" in b else "neither" for b in self.bodies]


@pytest.fixture(scope="module")
def photos():
    """Two images whose masks at POINT differ: a photo and its mirror image (the house moves right)."""
    a = make_photo(H, W, seed=0)
    return a, np.ascontiguousarray(a[:, ::-1])


@pytest.fixture(scope="module")
def builtin():
    return BuiltinSegmenter(max_masks=32)


def serve(builtin, *, store_bytes: int = 64 * ONE_IMAGE, token: str | None = TOKEN):
    """(Recorder, context manager yielding the URL) for the service with the built-in engine."""
    options = sam2_service.ServiceOptions(token=token)
    app = sam2_service.build_service(Settings(), builtin, options=options, images=ImageStore(store_bytes))
    recorder = Recorder(app)
    return recorder, sam2_service.serving(recorder)


def client_for(url: str) -> HttpSegmenter:
    return HttpSegmenter(Settings(sam_api_url=url, sam_api_token=TOKEN, max_masks=32))


def file_of(image: np.ndarray) -> bytes:
    """The image file exactly as the client sends it."""
    return prepare_image(image, Settings()).data


def post(url: str, body: dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/segment", json=body, headers=headers, timeout=30)


def mask_of(record: dict) -> np.ndarray:
    return rle.decode(record["segmentation"])


POINT = [[40.0, 70.0]]


# ---- the app's client and the service ----------------------------------------------------------------------


def test_once_the_service_kept_the_image_prompts_send_only_its_hash(builtin, photos):
    a, _ = photos
    recorder, serving = serve(builtin)
    with serving as url, client_for(url) as client:
        client.generate(a)
        answers = [client.segment(a, points=POINT), client.segment(a, points=[[100.0, 20.0]])]
    assert recorder.sent() == ["image", "hash", "hash"]
    digest = hashlib.sha256(file_of(a)).hexdigest()
    assert [b["image_sha256"] for b in recorder.bodies] == [digest] * 3
    np.testing.assert_array_equal(mask_of(answers[0]), mask_of(builtin.segment(a, points=POINT)))
    np.testing.assert_array_equal(mask_of(answers[1]), mask_of(builtin.segment(a, points=[[100.0, 20.0]])))


def test_an_evicted_image_is_sent_again_within_the_same_call(builtin, photos):
    a, b = photos
    recorder, serving = serve(builtin, store_bytes=ONE_IMAGE)
    with serving as url, client_for(url) as client:
        client.segment(a, points=POINT)  # kept
        client.segment(b, points=POINT)  # kept; a evicted
        again = client.segment(a, points=POINT)  # named, 409 image_needed, sent again
        after = client.segment(a, points=POINT)  # kept again: named
    assert recorder.sent() == ["image", "image", "hash", "image", "hash"]
    np.testing.assert_array_equal(mask_of(again), mask_of(builtin.segment(a, points=POINT)))
    np.testing.assert_array_equal(mask_of(after), mask_of(again))


def test_clients_naming_different_images_each_get_their_own_image_s_masks(builtin, photos):
    a, b = photos
    recorder, serving = serve(builtin)
    with serving as url, client_for(url) as first, client_for(url) as second:
        for _ in range(2):
            got_a = first.segment(a, points=POINT)
            got_b = second.segment(b, points=POINT)
            np.testing.assert_array_equal(mask_of(got_a), mask_of(builtin.segment(a, points=POINT)))
            np.testing.assert_array_equal(mask_of(got_b), mask_of(builtin.segment(b, points=POINT)))
    assert recorder.sent() == ["image", "image", "hash", "hash"]
    assert not np.array_equal(mask_of(got_a), mask_of(got_b))  # the two answers really differ


# ---- the protocol, spoken directly ------------------------------------------------------------------------------


def test_an_answer_names_the_hash_the_service_computed_and_old_clients_keep_working(builtin, photos):
    a, _ = photos
    data = file_of(a)
    _, serving = serve(builtin)
    with serving as url:
        reply = post(url, {"image": base64.b64encode(data).decode(), "points": POINT, "point_labels": [1]})
    assert reply.status_code == 200
    body = reply.json()
    assert body["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert body["mask_url"] is None and len(body["masks"]) == 1


def test_a_hash_the_service_never_received_is_409_image_needed(builtin, photos):
    a, b = photos
    _, serving = serve(builtin)
    with serving as url:
        assert post(url, {"image": base64.b64encode(file_of(a)).decode(), "points": POINT}).status_code == 200
        reply = post(url, {"image_sha256": sha256_of(file_of(b)), "points": POINT})
    assert reply.status_code == 409
    body = reply.json()
    assert body["image_needed"] is True
    assert "send the request again with 'image'" in body["detail"]


def test_a_claimed_hash_is_checked_so_no_image_is_filed_under_another_s_hash(builtin, photos):
    a, b = photos
    wrong = sha256_of(file_of(b))
    _, serving = serve(builtin)
    with serving as url:
        reply = post(url, {"image": base64.b64encode(file_of(a)).decode(), "image_sha256": wrong, "points": POINT})
        assert reply.status_code == 400
        assert "is not the SHA-256 of the image sent" in reply.json()["detail"]
        assert post(url, {"image_sha256": wrong, "points": POINT}).status_code == 409
        assert post(url, {"image_sha256": sha256_of(file_of(a)), "points": POINT}).status_code == 409


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_naming_an_image_still_needs_the_token(builtin, photos, token):
    a, _ = photos
    _, serving = serve(builtin)
    with serving as url:
        assert post(url, {"image": base64.b64encode(file_of(a)).decode(), "points": POINT}).status_code == 200
        reply = post(url, {"image_sha256": sha256_of(file_of(a)), "points": POINT}, token=token)
    assert reply.status_code == 401 and "masks" not in reply.json()


@pytest.mark.parametrize(
    "body, words",
    [
        ({"image_sha256": "abc", "points": POINT}, "64 hexadecimal digits"),
        ({"image_sha256": "g" * 64, "points": POINT}, "64 hexadecimal digits"),
        ({"points": POINT}, "needs 'image'"),
    ],
)
def test_a_malformed_or_missing_image_reference_gets_a_sentence(builtin, body, words):
    _, serving = serve(builtin)
    with serving as url:
        reply = post(url, body)
    assert reply.status_code == 400 and words in reply.json()["detail"]


# ---- the client against other services --------------------------------------------------------------------------


def kept_answer(image: np.ndarray) -> dict:
    """What a service that kept the image answers to a prompt: the whole image as the mask, and its hash."""
    whole = {"segmentation": rle.encode(np.ones(image.shape[:2], bool)), "predicted_iou": 0.9}
    return {"masks": [whole], "mask_url": None, "image_sha256": sha256_of(file_of(image))}


def test_a_service_that_does_not_say_it_kept_the_image_gets_it_every_time(photos):
    a, _ = photos
    old = {"masks": [{"segmentation": rle.encode(np.ones((H, W), bool))}], "mask_url": None}
    with SamServer() as server, HttpSegmenter(Settings(sam_api_url=server.url)) as client:
        server.add("POST", "/segment", Reply(json=old), Reply(json=old))
        client.segment(a, points=POINT)
        client.segment(a, points=POINT)
    assert ["image" in r.json() for r in server.requests] == [True, True]


def test_image_needed_twice_is_reported_not_looped(photos):
    a, _ = photos
    needed = Reply(status=409, json={"detail": "I do not have it.", "image_needed": True})
    with SamServer() as server, HttpSegmenter(Settings(sam_api_url=server.url)) as client:
        server.add("POST", "/segment", Reply(json=kept_answer(a)), needed, needed)
        client.segment(a, points=POINT)
        with pytest.raises(SegmentationRejected, match="HTTP 409: I do not have it"):
            client.segment(a, points=POINT)
    assert ["image" in r.json() for r in server.requests] == [True, False, True]


def test_a_409_that_does_not_ask_for_the_image_is_not_answered_with_it(photos):
    a, _ = photos
    with SamServer() as server, HttpSegmenter(Settings(sam_api_url=server.url)) as client:
        server.add("POST", "/segment", Reply(json=kept_answer(a)), Reply(status=409, json={"detail": "Locked."}))
        client.segment(a, points=POINT)
        with pytest.raises(SegmentationRejected, match="Locked"):
            client.segment(a, points=POINT)
    assert ["image" in r.json() for r in server.requests] == [True, False]


# ---- the store itself ------------------------------------------------------------------------------------------


def b64_file(image: np.ndarray) -> str:
    return base64.b64encode(encode(image)).decode()


def test_the_store_evicts_the_least_recently_used_image_by_bytes(photos):
    a, b = photos
    c = make_photo(H, W, seed=2)
    store = ImageStore(2 * ONE_IMAGE)
    keys = [store.received(b64_file(x), None, Settings())[0] for x in (a, b)]
    store.named(keys[0])  # a used: b is now the oldest
    key_c, got_c, kept = store.received(b64_file(c), None, Settings())
    assert kept and len(store) == 2
    assert keys[0] in store and key_c in store and keys[1] not in store
    np.testing.assert_array_equal(store.named(keys[0]), a)
    np.testing.assert_array_equal(got_c, c)
    with pytest.raises(UnknownImage):
        store.named(keys[1])


def test_an_image_larger_than_the_store_is_used_but_not_kept(photos):
    a, _ = photos
    store = ImageStore(ONE_IMAGE - 1)
    key, image, kept = store.received(b64_file(a), None, Settings())
    np.testing.assert_array_equal(image, a)
    assert not kept and key not in store and len(store) == 0


def test_the_store_refuses_a_wrong_claim_and_keeps_nothing(photos):
    a, b = photos
    store = ImageStore()
    with pytest.raises(InvalidInput, match="is not the SHA-256"):
        store.received(b64_file(a), sha256_of(encode(b)), Settings())
    assert len(store) == 0
    key, _, _ = store.received(b64_file(a), sha256_of(encode(a)).upper(), Settings())  # hex in any case
    assert key == sha256_of(encode(a))
