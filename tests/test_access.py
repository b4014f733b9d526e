"""Who is asking (access.py): API keys, the admin key, browsers and Hugging Face sign-in."""

import pytest

from access import LOCAL_OWNER, Access, browser_secret, is_browser_key
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
    assert (caller.owner, caller.admin, caller.scope) == (owner, admin, None if admin else owner)


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
