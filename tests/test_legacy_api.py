"""The old backend's REST API on the real app (loopback), called with httpx exactly as its README documented."""

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from app_server import running_app
from errors import (
    Conflict,
    InvalidInput,
    LimitExceeded,
    MaskStudioError,
    NotFound,
    SegmentationBadResponse,
    SegmentationBusy,
    StorageError,
    Unauthorized,
)
from helpers import RecordsSegmenter, encode, house_masks, make_photo
from legacy_api import status_for
from settings import Settings, parse_cors_origins

H, W = 96, 128
PHOTO = make_photo(H, W)
DATA_URL = "data:image/png;base64," + base64.b64encode(encode(PHOTO)).decode()
FRONT_END = "http://localhost:3000"


def png_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("data"), RecordsSegmenter(house_masks)) as (url, studio, settings):
        yield url


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def house(api):
    r = api.post("/generate_and_store_masks", params={"image_id": "house"}, json={"original_image_b64": DATA_URL})
    assert r.status_code == 200, r.text
    return r.json()


# ---- an old script's calls, unchanged -------------------------------------------------------------
def test_generate_answers_the_old_fields(house):
    assert house["image_id"] == "house" and house["mask_count"] == 4
    assert house["image_dimensions"] == {"width": W, "height": H}
    assert house["mask_ids"] == [0, 1, 2, 3] and isinstance(house["message"], str)


def test_generate_takes_a_bare_base64_string_and_makes_an_id(api):
    bare = DATA_URL.split(",", 1)[1]
    r = api.post("/generate_and_store_masks", json={"original_image_b64": bare})
    assert r.status_code == 200 and r.json()["image_id"].startswith("img_")
    assert api.delete(f"/images/{r.json()['image_id']}").status_code == 200


def test_list_is_an_object_of_images(api, house):
    r = api.get("/images")
    assert r.status_code == 200
    row = next(i for i in r.json()["images"] if i["image_id"] == "house")
    assert {k: row[k] for k in ("width", "height", "mask_count")} == {"width": W, "height": H, "mask_count": 4}
    assert row["created_at"]


def test_info_has_the_original_and_every_mask_png(api, house):
    r = api.get("/images/house/info")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert "content-length" not in r.headers  # streamed: built one PNG at a time, not whole in memory
    info = r.json()
    assert {k: info[k] for k in ("image_id", "width", "height")} == {"image_id": "house", "width": W, "height": H}
    assert info["created_at"]
    prefix, b64 = info["original_image_b64"].split(",", 1)
    assert prefix == "data:image/png;base64"
    np.testing.assert_array_equal(png_of(b64), PHOTO)
    masks = info["available_masks"]
    assert [m["id"] for m in masks] == [0, 1, 2, 3]
    truth = sorted(house_masks(H, W), key=lambda m: -int(m.sum()))  # stored largest first
    for m, want in zip(masks, truth):
        assert {"id", "area", "bbox", "mask_b64"} <= set(m)
        np.testing.assert_array_equal(png_of(m["mask_b64"]) > 0, want)
        assert m["area"] == int(want.sum())


def test_mask_at_point_keeps_the_old_fields_and_adds_candidates(api, house):
    r = api.get("/images/house/mask_at_point", params={"x": 38, "y": 60})
    assert r.status_code == 200
    hit = r.json()
    assert hit["mask_id"] == hit["candidates"][0] and len(hit["candidates"]) == 3
    assert hit["point"] == {"x": 38, "y": 60}
    assert hit["mask_area"] == hit["area"] and hit["mask_bbox"] == hit["bbox"]
    assert hit["all_containing_masks"] == hit["candidates"] and hit["total_containing_masks"] == 3
    miss = api.get("/images/house/mask_at_point", params={"x": 2, "y": 2}).json()
    assert miss["mask_id"] is None and miss["candidates"] == [] and miss["total_masks_checked"] == 4
    assert miss["message"] == "No mask found containing point (2, 2)"


def test_render_with_the_three_instruction_kinds(api, house):
    # At (38, 60) lie the window, the house and the lower half (smallest first).
    window, house_id, lower = api.get("/images/house/mask_at_point", params={"x": 38, "y": 60}).json()["candidates"]
    body = {
        "render_instructions": [
            {"mask_id": house_id, "color": [255, 0, 0, 128]},
            {"mask_id": window, "color": [0, 255, 0, 255]},
            {"mask_id": lower, "color": None},
        ]
    }
    r = api.post("/render_masks/house", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "Image rendered successfully"
    assert not r.json()["rendered_image_b64"].startswith("data:")
    img = png_of(r.json()["rendered_image_b64"])
    assert img.shape == (H, W, 4)  # the old backend's transparent canvas
    assert tuple(img[2, 2]) == (0, 0, 0, 0)  # outside every painted mask
    house_px, _, _, lower_px = house_masks(H, W)
    y, x = np.argwhere(house_px & ~lower_px)[0]
    assert tuple(img[y, x]) == (255, 0, 0, 128)  # a colour list, with its alpha
    y, x = np.argwhere(lower_px & ~house_px)[0]
    assert tuple(img[y, x]) == (*PHOTO[y, x], 255)  # color null: the photo's own pixel
    assert tuple(img[60, 38]) == (*PHOTO[60, 38], 255)  # the lower half, drawn last, covers the green window
    composite = api.post("/render_masks/house", json={**body, "background": "original"}).json()
    assert png_of(composite["rendered_image_b64"]).shape == (H, W, 3)


# ---- errors: status codes and exact texts --------------------------------------------------------
ERRORS = [
    (
        "post",
        "/generate_and_store_masks",
        {"json": {"original_image_b64": "@@not base64@@"}},
        400,
        "original_image_b64 is not valid base64.",
    ),
    (
        "post",
        "/generate_and_store_masks",
        {"json": {"original_image_b64": base64.b64encode(b"text").decode()}},
        400,
        "This file is not an image Mask Studio can read (PNG, JPEG, WebP, GIF, BMP or TIFF).",
    ),
    ("post", "/generate_and_store_masks", {"json": {}}, 422, "Invalid request: original_image_b64: Field required."),
    (
        "post",
        "/generate_and_store_masks",
        {"content": b"{oops", "headers": {"content-type": "application/json"}},
        422,
        None,
    ),
    ("get", "/images/nope/info", {}, 404, "No image with id 'nope'. /list_images shows the stored ones."),
    (
        "get",
        "/images/nope/mask_at_point",
        {"params": {"x": 1, "y": 1}},
        404,
        "No image with id 'nope'. /list_images shows the stored ones.",
    ),
    ("delete", "/images/nope", {}, 404, "No image with id 'nope'. /list_images shows the stored ones."),
    (
        "post",
        "/render_masks/nope",
        {"json": {"render_instructions": []}},
        404,
        "No image with id 'nope'. /list_images shows the stored ones.",
    ),
    (
        "post",
        "/render_masks/house",
        {"json": {"render_instructions": [{"mask_id": 99, "color": None}]}},
        404,
        "Image house has no mask 99 (it has masks 0–3).",
    ),
    (
        "post",
        "/render_masks/house",
        {"json": {"render_instructions": [{"mask_id": 1, "color": [300, 0, 0, 128]}]}},
        400,
        'Colour for mask 1 must be [r, g, b, a] with values 0-255, "#rrggbb", "#rrggbbaa", "original" or null; '
        "got [300, 0, 0, 128].",
    ),
    (
        "post",
        "/render_masks/house",
        {"json": {"render_instructions": [{"mask_id": 1, "color": "blue"}]}},
        400,
        'Colour for mask 1 must be [r, g, b, a] with values 0-255, "#rrggbb", "#rrggbbaa", "original" or null; '
        "got 'blue'.",
    ),
    (
        "post",
        "/render_masks/house",
        {"json": {"render_instructions": [{"mask_id": "one"}]}},
        422,
        "Invalid request: render_instructions.0.mask_id: Input should be a valid integer, unable to parse string as an "
        "integer.",
    ),
    (
        "get",
        "/images/house/mask_at_point",
        {"params": {"x": 500, "y": 5}},
        400,
        "Point (500, 5) is outside the image, which is 128×96 pixels (x from 0 to 127, y from 0 to 95).",
    ),
    ("get", "/images/house/mask_at_point", {"params": {"x": 5}}, 422, "Invalid request: query.y: Field required."),
]


@pytest.mark.parametrize("method, path, kwargs, status, detail", ERRORS)
def test_errors_have_the_documented_status_and_text(api, house, method, path, kwargs, status, detail):
    r = getattr(api, method)(path, **kwargs)
    assert r.status_code == status, r.text
    assert set(r.json()) <= {"detail", "errors"} and isinstance(r.json()["detail"], str)
    if detail is not None:
        assert r.json()["detail"] == detail


def test_an_id_taken_is_400_as_in_the_old_backend(api, house):
    r = api.post("/generate_and_store_masks", params={"image_id": "house"}, json={"original_image_b64": DATA_URL})
    assert r.status_code == 400 and "house" in r.json()["detail"]


@pytest.mark.parametrize(
    "exc, status",
    [
        (InvalidInput("x"), 400),
        (LimitExceeded("x"), 400),
        (Conflict("x"), 400),
        (Unauthorized("x"), 401),
        (NotFound("x"), 404),
        (SegmentationBusy("x"), 502),
        (SegmentationBadResponse("x"), 502),
        (StorageError("x"), 500),
        (MaskStudioError("x"), 500),
    ],
)
def test_status_for_each_kind_of_error(exc, status):
    assert status_for(exc) == status


# ---- docs ------------------------------------------------------------------------------------------
def test_docs_and_openapi_show_the_rest_api(api):
    assert api.get("/docs").status_code == 200 and "swagger" in api.get("/docs").text.lower()
    paths = api.get("/openapi.json").json()["paths"]
    assert set(paths) == {
        "/generate_and_store_masks",
        "/render_masks/{image_id}",
        "/images/{image_id}/info",
        "/images",
        "/images/{image_id}/mask_at_point",
        "/images/{image_id}",
    }
    assert set(paths["/images/{image_id}"]) == {"delete"}


def test_the_gradio_app_is_still_served(api):
    assert api.get("/").status_code == 200
    assert "/generate_and_store_masks" in api.get("/gradio_api/info").json()["named_endpoints"]


# ---- CORS -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, origins",
    [
        (None, ()),
        ("  ", ()),
        ('["http://localhost:3000", "http://localhost:3001"]', ("http://localhost:3000", "http://localhost:3001")),
        ("['http://localhost:3000']", ("http://localhost:3000",)),
        ("http://a.example, https://b.example/ ,", ("http://a.example", "https://b.example")),
        ('["*"]', ("*",)),
    ],
)
def test_parse_cors_origins(raw, origins):
    assert parse_cors_origins(raw) == origins


@pytest.mark.parametrize("raw", ['["http://a", 3]', "[not a list", '["http://a"'])
def test_parse_cors_origins_refuses_what_is_not_a_list(raw):
    with pytest.raises(InvalidInput, match="CORS_ORIGINS must be a JSON list"):
        parse_cors_origins(raw)


def preflight(url: str, path: str, origin: str) -> httpx.Response:
    return httpx.options(
        url.rstrip("/") + path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )


def test_without_cors_origins_no_origin_may_call(server):
    r = preflight(server, "/render_masks/house", FRONT_END)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    simple = httpx.get(server.rstrip("/") + "/images", headers={"Origin": FRONT_END})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory):
    """The app with CORS_ORIGINS as the old .env wrote it (a JSON list), read as the app reads its settings."""
    origins = Settings.from_env({"CORS_ORIGINS": '["http://localhost:3000", "http://localhost:3001"]'}, None)
    segmenter = RecordsSegmenter(house_masks)
    with running_app(tmp_path_factory.mktemp("cors"), segmenter, cors_origins=origins.cors_origins) as (url, _, _):
        yield url


def test_cors_origins_from_the_old_json_list(cors_server):
    r = preflight(cors_server, "/render_masks/house", FRONT_END)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == FRONT_END
    assert "POST" in r.headers["access-control-allow-methods"]
    simple = httpx.get(cors_server.rstrip("/") + "/images", headers={"Origin": FRONT_END})
    assert simple.headers["access-control-allow-origin"] == FRONT_END
    other = preflight(cors_server, "/images", "http://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


# ---- keys and owners ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    keys = (("alice", "alice-key-0123456789"), ("bob", "bob-key-0123456789"))
    with running_app(
        tmp_path_factory.mktemp("keys"), RecordsSegmenter(house_masks), auth_mode="keys", app_api_keys=keys
    ) as (url, _, _):
        yield url


def test_keys_and_owners_as_on_the_gradio_api(keyed_server):
    alice = httpx.Client(base_url=keyed_server, headers={"Authorization": "Bearer alice-key-0123456789"}, timeout=60)
    bob = httpx.Client(base_url=keyed_server, headers={"Authorization": "Bearer bob-key-0123456789"}, timeout=60)
    anonymous = httpx.Client(base_url=keyed_server, timeout=60)
    r = anonymous.get("/images")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["detail"].startswith("This server needs an API key")
    wrong = httpx.get(keyed_server.rstrip("/") + "/images", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"].startswith("That API key is not recognised")
    made = alice.post("/generate_and_store_masks", params={"image_id": "mine"}, json={"original_image_b64": DATA_URL})
    assert made.status_code == 200 and made.json()["image_id"] == "mine"
    assert [i["image_id"] for i in alice.get("/images").json()["images"]] == ["mine"]
    assert bob.get("/images").json() == {"images": []}
    for call in (bob.get("/images/mine/info"), bob.delete("/images/mine")):
        assert call.status_code == 404 and call.json()["detail"] == (
            "No image with id 'mine'. /list_images shows the stored ones."
        )
    assert alice.get("/images/mine/info").status_code == 200
