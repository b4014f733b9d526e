"""End to end: the real app on a loopback port, every public endpoint driven through gradio_client."""

import base64
import json
import threading

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_server import running_app
from helpers import RecordsSegmenter, encode, house_masks, make_photo

H, W = 96, 128
ENDPOINTS = [
    "/generate_and_store_masks",
    "/render_masks",
    "/image_info",
    "/list_images",
    "/mask_at_point",
    "/delete_image",
    "/get_mask",
    "/export_coco",
]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("data"), RecordsSegmenter(house_masks)) as (url, studio, settings):
        yield url, studio


@pytest.fixture(scope="module")
def client(app):
    return Client(app[0], verbose=False)


@pytest.fixture(scope="module")
def house(client, house_photo):
    return client.predict(handle_file(house_photo), "house", api_name="/generate_and_store_masks")


def error_of(call) -> str:
    with pytest.raises(AppError) as info:
        call()
    return info.value.message


def test_every_endpoint_is_public_and_named(client):
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(ENDPOINTS) <= set(named)
    params = [p["parameter_name"] for p in named["/generate_and_store_masks"]["parameters"]]
    assert params == ["image", "image_id", "original_image_b64"]
    assert [p["parameter_name"] for p in named["/render_masks"]["parameters"]] == [
        "image_id",
        "render_instructions",
        "background",
    ]


CONTRACT = {
    "/generate_and_store_masks": [("image", None), ("image_id", None), ("original_image_b64", None)],
    "/render_masks": [("image_id",), ("render_instructions",), ("background", "original")],
    "/image_info": [("image_id",)],
    "/list_images": [],
    "/mask_at_point": [("image_id",), ("x",), ("y",)],
    "/delete_image": [("image_id",)],
    "/get_mask": [("image_id",), ("mask_id",)],
    "/export_coco": [("image_id",), ("mask_ids", None)],
    "/segment": [("image", None), ("image_id", None), ("points", None), ("point_labels", None), ("box", None)],
    "/retry_uploads": [],
    "/share_render": [("image_id",), ("render_instructions",), ("background", "original")],
}


@pytest.mark.parametrize("endpoint", list(CONTRACT))
def test_each_endpoint_has_its_parameter_names_order_and_defaults(client, endpoint):
    """The contract scripts rely on: (name,) is required, (name, default) is optional with that default."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][endpoint]["parameters"]
    got = [
        (p["parameter_name"], p["parameter_default"]) if p["parameter_has_default"] else (p["parameter_name"],)
        for p in params
    ]
    assert got == CONTRACT[endpoint]


def test_generate_and_store(house):
    assert house["image_id"] == "house"
    assert house["mask_count"] == 4 and house["mask_ids"] == [0, 1, 2, 3]
    assert house["image_dimensions"] == {"width": W, "height": H}
    assert house["engine"] == "fixed test segmenter"
    assert "Stored 4 masks" in house["message"]


def test_generate_from_base64_data_url(client, house_photo):
    b64 = base64.b64encode(open(house_photo, "rb").read()).decode()
    out = client.predict(None, None, "data:image/png;base64," + b64, api_name="/generate_and_store_masks")
    assert out["image_id"].startswith("img_") and out["mask_count"] == 4
    client.predict(out["image_id"], api_name="/delete_image")


def test_image_info_and_list(client, house):
    info = client.predict("house", api_name="/image_info")
    assert {k: info[k] for k in ("image_id", "width", "height", "mask_count")} == {
        "image_id": "house",
        "width": W,
        "height": H,
        "mask_count": 4,
    }
    m = info["available_masks"][0]
    assert set(m) == {"id", "area", "bbox", "predicted_iou", "stability_score", "mask_url"}
    assert m["mask_url"] is None
    listed = client.predict(api_name="/list_images")
    assert any(i["image_id"] == "house" and i["mask_count"] == 4 for i in listed)


def test_mask_at_point_and_render(client, house):
    hit = client.predict("house", 38, 60, api_name="/mask_at_point")
    assert len(hit["candidates"]) == 3 and hit["mask_id"] == hit["candidates"][0]
    path = client.predict(
        "house",
        [{"mask_id": hit["mask_id"], "color": "#00ff00"}, {"mask_id": hit["candidates"][1], "color": [0, 0, 255, 128]}],
        "original",
        api_name="/render_masks",
    )
    img = np.asarray(Image.open(path))
    assert img.shape == (H, W, 3)
    assert tuple(img[60, 38]) == (0, 127, 128) or tuple(img[60, 38]) == (0, 128, 127)  # blue at 50 % over green
    transparent = np.asarray(
        Image.open(
            client.predict(
                "house", [{"mask_id": hit["mask_id"], "color": None}], "transparent", api_name="/render_masks"
            )
        )
    )
    assert transparent.shape == (H, W, 4) and transparent[5, 5, 3] == 0 and transparent[60, 38, 3] == 128


def test_get_mask_and_export_coco(client, house, tmp_path):
    from pycocotools.coco import COCO

    png = np.asarray(Image.open(client.predict("house", 1, api_name="/get_mask")))
    assert png.shape == (H, W) and set(np.unique(png)) == {0, 255}
    data = client.predict("house", [1, 2], api_name="/export_coco")
    (tmp_path / "c.json").write_text(json.dumps(data))
    c = COCO(str(tmp_path / "c.json"))
    assert sorted(a["mask_id"] for a in c.loadAnns(c.getAnnIds())) == [1, 2]
    assert int(c.annToMask(c.loadAnns(c.getAnnIds())[0]).sum()) == c.loadAnns(c.getAnnIds())[0]["area"]


@pytest.mark.parametrize(
    "call, message",
    [
        (("nope", api := "/image_info"), "No image with id 'nope'"),
        ((("house", 999), "/get_mask"), "Image house has no mask 999 (it has masks 0–3)."),
        ((("house", 500, 5), "/mask_at_point"), "Point (500, 5) is outside the image, which is 128×96 pixels"),
        ((("house", [{"mask_id": 0, "color": "blue"}], "original"), "/render_masks"), "Colour for mask 0"),
        ((("house", [], "sepia"), "/render_masks"), "sepia"),
        ((("../etc",), "/delete_image"), "No image with id '../etc'"),
    ],
)
def test_errors_are_clear(client, house, call, message):
    args, api_name = call if isinstance(call[0], tuple) else ((call[0],), call[1])
    assert message in error_of(lambda: client.predict(*args, api_name=api_name))


def test_bad_uploads_and_taken_ids(client, house, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a picture")
    assert "not an image Mask Studio can read" in error_of(
        lambda: client.predict(handle_file(str(junk)), api_name="/generate_and_store_masks")
    )
    assert "is already taken" in error_of(
        lambda: client.predict(
            None, "house", base64.b64encode(encode(make_photo(H, W))).decode(), api_name="/generate_and_store_masks"
        )
    )
    assert "Send an image" in error_of(lambda: client.predict(api_name="/generate_and_store_masks"))
    assert "not valid base64" in error_of(
        lambda: client.predict(None, None, "%%%", api_name="/generate_and_store_masks")
    )
    # ...and the app keeps serving.
    assert client.predict("house", api_name="/image_info")["mask_count"] == 4


def test_delete_image(client, house_photo):
    client.predict(handle_file(house_photo), "doomed", api_name="/generate_and_store_masks")
    assert client.predict("doomed", api_name="/delete_image") == {
        "message": "Image doomed and its 4 masks were deleted.",
        "image_id": "doomed",
    }
    assert "No image with id 'doomed'" in error_of(lambda: client.predict("doomed", api_name="/image_info"))
    assert all(i["image_id"] != "doomed" for i in client.predict(api_name="/list_images"))


def test_list_is_newest_first_with_every_field(client, house, house_photo):
    """Two uploads in the same second still list the later one first."""
    ids = ["zz-uploaded-first", "aa-uploaded-second"]  # the other way round alphabetically
    for image_id in ids:
        client.predict(handle_file(house_photo), image_id, api_name="/generate_and_store_masks")
    listed = client.predict(api_name="/list_images")
    assert [i["image_id"] for i in listed][:2] == ids[::-1]
    assert set(listed[0]) == {"image_id", "width", "height", "created_at", "mask_count", "name"}
    assert listed[0]["name"] == "house.png"  # the uploaded file's own name, for the library
    info = client.predict("zz-uploaded-first", api_name="/image_info")
    assert info["engine"] == "fixed test segmenter" and info["created_at"] == listed[1]["created_at"]
    hit = client.predict("zz-uploaded-first", 38, 60, api_name="/mask_at_point")
    window = next(m for m in info["available_masks"] if m["id"] == hit["mask_id"])
    assert (hit["area"], hit["bbox"]) == (window["area"], window["bbox"])
    coco = client.predict("zz-uploaded-first", None, api_name="/export_coco")
    assert {a["iscrowd"] for a in coco["annotations"]} == {1} and coco["categories"][0]["id"] == 1
    for image_id in ids:
        client.predict(image_id, api_name="/delete_image")


class HeldSegmenter(RecordsSegmenter):
    """Holds every segmentation until released: a slow SAM2 service, without timing anything."""

    def __init__(self, masks_for_shape):
        super().__init__(masks_for_shape)
        self.started, self.release = threading.Event(), threading.Event()

    def generate(self, image, *, progress=None, cancel=None):
        self.started.set()
        assert self.release.wait(60)
        return super().generate(image, progress=progress, cancel=cancel)


def test_a_running_segmentation_does_not_hold_up_other_peoples_lookups(tmp_path, house_photo):
    segmenter = HeldSegmenter(house_masks)
    segmenter.release.set()
    with running_app(tmp_path / "data", segmenter) as (url, *_):
        one, two = Client(url, verbose=False), Client(url, verbose=False)
        one.predict(handle_file(house_photo), "ready", api_name="/generate_and_store_masks")
        segmenter.release.clear()
        held = one.submit(handle_file(house_photo), "held", api_name="/generate_and_store_masks")
        assert segmenter.started.wait(30)
        # While that segmentation runs, another client's lookups, renders and reads are answered.
        jobs = [
            two.submit("ready", 38, 60, api_name="/mask_at_point"),
            two.submit("ready", [{"mask_id": 0, "color": "#ff0000"}], "original", api_name="/render_masks"),
            two.submit("ready", api_name="/image_info"),
        ]
        try:
            assert jobs[0].result(timeout=30)["mask_id"] is not None
            assert jobs[1].result(timeout=30).endswith(".png")
            assert jobs[2].result(timeout=30)["mask_count"] == 4
            assert not held.done()
        finally:
            segmenter.release.set()
        assert held.result(timeout=30)["image_id"] == "held"
