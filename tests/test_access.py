"""Who is asking (access.py): API keys, the admin key, browsers and Hugging Face sign-in."""

import pytest

from access import (
    EVERYONE,
    LOCAL_OWNER,
    Access,
    browser_secret,
    counted_as,
    is_browser_key,
    meanings,
    owner_tag,
    shown_image_id,
    stored_image_id,
)
from errors import Unauthorized
from settings import Settings

KEYED = Settings(auth_mode="keys", app_api_keys=(("alice", "alice-key-0123"),), admin_api_key="admin-key-0123")


@pytest.mark.parametrize(
    "headers, owner, admin",
    [
        ({"Authorization": "Bearer alice-key-0123"}, "alice", False),
        ({"authorization": "bearer alice-key-0123"}, "alice", False),
        ({"X-API-Key": "alice-key-0123"}, "alice", False),
        ({"Authorization": "Bearer admin-key-0123"}, "admin", True),
    ],
)
def test_api_keys_name_their_owner(headers, owner, admin):
    caller = Access(KEYED).api_caller(headers)
    assert (caller.owner, caller.admin, caller.scope) == (owner, admin, EVERYONE if admin else owner)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic alice-key-0123"}])
def test_keys_mode_refuses_a_missing_or_unknown_key(headers):
    with pytest.raises(Unauthorized) as info:
        Access(KEYED).api_caller(headers)
    assert "Authorization: Bearer <key>" in info.value.message and "alice-key" not in info.value.message


def test_open_mode_is_one_local_owner_for_page_and_api():
    access = Access(Settings())
    assert access.api_caller({}).owner == LOCAL_OWNER
    assert access.browser_caller(None).owner == LOCAL_OWNER


def test_browsers_get_their_own_owner_and_hf_sign_in_wins():
    access = Access(KEYED)
    one, two = "a" * 32, "b" * 32
    assert access.browser_caller(one).owner.startswith("anon:")
    assert access.browser_caller(one) == access.browser_caller(one) != access.browser_caller(two)
    assert access.browser_caller(one, "octocat").owner == "hf:octocat"
    assert one not in access.browser_caller(one).owner  # the key itself is never the owner name
    with pytest.raises(Unauthorized):
        access.browser_caller("short")


@pytest.mark.parametrize(
    "value, ok", [("x" * 32, True), ("a-b_c" * 5, True), ("short", False), (None, False), (7, False)]
)
def test_only_keys_the_app_made_are_browser_keys(value, ok):
    assert is_browser_key(value) is ok


def test_the_browser_secret_survives_a_restart(tmp_path):
    first = browser_secret(tmp_path / "data")
    assert len(first) >= 24 and browser_secret(tmp_path / "data") == first
    assert browser_secret(tmp_path / "other") != first


def test_owner_scoped_ids():
    tag = owner_tag("alice")
    assert len(tag) == 12 and tag != owner_tag("bob")
    assert stored_image_id("house", "alice") == f"house.{tag}" and stored_image_id("house", LOCAL_OWNER) == "house"
    assert shown_image_id(f"house.{tag}", "alice") == "house"
    assert shown_image_id(f"house.{tag}", EVERYONE) == f"house.{tag}"  # the admin sees stored ids
    # What an id may name, in lookup order: the owner's own id, then a generated one kept as made.
    assert meanings("img_1", "alice") == [f"img_1.{tag}", "img_1"]
    assert meanings("house", LOCAL_OWNER) == ["house"]
    assert meanings(f"house.{tag}", "alice") == [f"house.{tag}"] and meanings("house", EVERYONE) == ["house"]
    assert counted_as(EVERYONE) == "admin" and counted_as("alice") == "alice"
