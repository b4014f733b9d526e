"""Per-owner data through the real app and gradio_client: API keys, the admin key, open mode."""

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from app_server import running_app
from helpers import RecordsSegmenter, encode, house_masks, make_photo

KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}
ADMIN = "admin-key-0123456789abcdef"

# (endpoint, extra arguments after the image id)
READS = [
    ("/image_info", ()),
    ("/render_masks", ([{"mask_id": 0, "color": "#ff0000"}], "original")),
    ("/mask_at_point", (10, 10)),
    ("/get_mask", (0,)),
    ("/export_coco", (None,)),
    ("/delete_image", ()),
]


def error_of(call) -> str:
    with pytest.raises(AppError) as info:
        call()
    return info.value.message


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "house.png"
    path.write_bytes(encode(make_photo(48, 64)))
    return str(path)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, photo):
    settings = {"auth_mode": "keys", "app_api_keys": tuple(KEYS.items()), "admin_api_key": ADMIN}
    with running_app(tmp_path_factory.mktemp("data"), RecordsSegmenter(house_masks), **settings) as (url, *_):
        clients = {
            who: Client(url, verbose=False, headers={"Authorization": f"Bearer {key}"}) for who, key in KEYS.items()
        }
        clients["admin"] = Client(url, verbose=False, headers={"X-API-Key": ADMIN})
        for who in KEYS:
            clients[who].predict(handle_file(photo), f"{who}-img", api_name="/generate_and_store_masks")
        yield url, clients


def test_each_key_lists_only_its_own(keyed):
    _, clients = keyed
    assert [i["image_id"] for i in clients["alice"].predict(api_name="/list_images")] == ["alice-img"]
    assert [i["image_id"] for i in clients["bob"].predict(api_name="/list_images")] == ["bob-img"]


@pytest.mark.parametrize("endpoint, extra", READS, ids=[e for e, _ in READS])
def test_someone_elses_image_answers_like_an_unknown_id(keyed, endpoint, extra):
    _, clients = keyed
    theirs = error_of(lambda: clients["bob"].predict("alice-img", *extra, api_name=endpoint))
    unknown = error_of(lambda: clients["bob"].predict("nobody-img", *extra, api_name=endpoint))
    assert theirs.replace("alice-img", "ID") == unknown.replace("nobody-img", "ID")
    assert "No image with id 'alice-img'" in theirs
    # ...and alice's image is untouched by bob's attempts.
    assert clients["alice"].predict("alice-img", api_name="/image_info")["mask_count"] == 4


def test_segment_on_someone_elses_image_answers_like_an_unknown_id(keyed):
    _, clients = keyed
    call = lambda image_id: clients["bob"].predict(None, image_id, [[10, 40]], [1], None, api_name="/segment")  # noqa: E731
    theirs, unknown = error_of(lambda: call("alice-img")), error_of(lambda: call("nobody-img"))
    assert theirs.replace("alice-img", "ID") == unknown.replace("nobody-img", "ID")
    assert clients["alice"].predict("alice-img", api_name="/image_info")["mask_count"] == 4


def test_admin_lists_and_deletes_everything(keyed, photo):
    _, clients = keyed
    clients["bob"].predict(handle_file(photo), "bob-doomed", api_name="/generate_and_store_masks")
    # The admin sees every image with its owner, under the id it is stored as (an owner's own ids carry
    # the owner's tag, so two owners may use the same id), and reads and deletes by that id.
    listed = {i["image_id"]: i["owner"] for i in clients["admin"].predict(api_name="/list_images")}
    by_name = {image_id.split(".")[0]: (image_id, owner) for image_id, owner in listed.items()}
    assert {k: v[1] for k, v in by_name.items() if k in ("alice-img", "bob-img", "bob-doomed")} == {
        "alice-img": "alice",
        "bob-img": "bob",
        "bob-doomed": "bob",
    }
    doomed = by_name["bob-doomed"][0]
    assert clients["admin"].predict(doomed, api_name="/image_info")["mask_count"] == 4
    assert clients["admin"].predict(doomed, api_name="/delete_image")["image_id"] == doomed
    assert [i["image_id"] for i in clients["bob"].predict(api_name="/list_images")] == ["bob-img"]


def test_owners_may_use_the_same_id_and_cannot_learn_that_another_does(keyed, photo):
    _, clients = keyed
    # Bob picks the id Alice uses: it is his, as if nobody else had it (nothing to learn from a refusal).
    mine = clients["bob"].predict(handle_file(photo), "alice-img", api_name="/generate_and_store_masks")
    assert mine["image_id"] == "alice-img"
    assert {i["image_id"] for i in clients["bob"].predict(api_name="/list_images")} >= {"alice-img", "bob-img"}
    # Each owner reaches their own image under that id; Bob's delete leaves Alice's image alone.
    assert clients["bob"].predict("alice-img", api_name="/delete_image")["image_id"] == "alice-img"
    assert clients["alice"].predict("alice-img", api_name="/image_info")["mask_count"] == 4
    # Taken twice by the same owner is still a clear refusal.
    assert "already taken" in error_of(
        lambda: clients["alice"].predict(handle_file(photo), "alice-img", api_name="/generate_and_store_masks")
    )


def test_a_generated_id_cannot_be_taken_again_by_its_owner(keyed, photo):
    _, clients = keyed
    gid = clients["alice"].predict(handle_file(photo), None, api_name="/generate_and_store_masks")["image_id"]
    refused = error_of(lambda: clients["alice"].predict(handle_file(photo), gid, api_name="/generate_and_store_masks"))
    assert refused == f"Image id {gid!r} is already taken: choose another id, or delete that image first."
    assert [i["image_id"] for i in clients["alice"].predict(api_name="/list_images")].count(gid) == 1
    assert clients["alice"].predict(gid, api_name="/image_info")["mask_count"] == 4
    # Another owner may use that id as their own: nothing is revealed about Alice's images.
    assert clients["bob"].predict(handle_file(photo), gid, api_name="/generate_and_store_masks")["image_id"] == gid
    assert clients["bob"].predict(gid, api_name="/delete_image")["image_id"] == gid
    assert clients["alice"].predict(gid, api_name="/delete_image")["image_id"] == gid


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "This server needs an API key: send it as the header 'Authorization: Bearer <key>'"),
        ({"Authorization": "Bearer wrong-key"}, "That API key is not recognised."),
        ({"X-API-Key": "alice"}, "That API key is not recognised."),
    ],
)
def test_missing_or_wrong_key_is_unauthorized(keyed, headers, message):
    url, _ = keyed
    c = Client(url, verbose=False, headers=headers)
    for endpoint, args in [
        ("/list_images", ()),
        ("/image_info", ("alice-img",)),
        ("/generate_and_store_masks", (None, None, "aGVsbG8=")),
    ]:
        assert message in error_of(lambda args=args, endpoint=endpoint: c.predict(*args, api_name=endpoint))


def test_open_mode_without_keys_is_one_owner(tmp_path, photo):
    with running_app(tmp_path, RecordsSegmenter(house_masks)) as (url, *_):
        one, two = Client(url, verbose=False), Client(url, verbose=False)
        one.predict(handle_file(photo), "shared", api_name="/generate_and_store_masks")
        assert [i["image_id"] for i in two.predict(api_name="/list_images")] == ["shared"]
        assert two.predict("shared", 10, 40, api_name="/mask_at_point")["mask_id"] is not None
        assert two.predict("shared", api_name="/delete_image")["image_id"] == "shared"
        assert one.predict(api_name="/list_images") == []
