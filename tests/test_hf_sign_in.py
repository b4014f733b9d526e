"""When HF_LOGIN can give a sign-in button: on a Space with OAuth, or off one with a usable local HF login."""

import pytest

from hf_sign_in import sign_in_problem

SPACE = {
    "SYSTEM": "spaces",
    "SPACE_ID": "someone/mask-studio",
    "OAUTH_CLIENT_ID": "id",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_SCOPES": "openid profile",
    "OPENID_PROVIDER_URL": "https://provider.example",
}


def installed() -> bool:
    return True


def not_logged_in() -> str:
    return "this machine is not logged in to Hugging Face (`hf auth login`, or set HF_TOKEN)"


def logged_in() -> None:
    return None


@pytest.mark.parametrize(
    ("env", "local_account", "expected"),
    [
        (SPACE, not_logged_in, None),  # on a Space the machine's own login does not matter
        ({}, logged_in, None),  # off a Space, Gradio stands in with the machine's login
        (
            {},
            not_logged_in,
            "HF_LOGIN is on, but this is not a Space and this machine is not logged in to Hugging Face "
            "(`hf auth login`, or set HF_TOKEN): no sign-in button.",
        ),
        (
            {**SPACE, "SYSTEM": ""},  # SPACE_ID without SYSTEM=spaces: Gradio treats it as local
            not_logged_in,
            "HF_LOGIN is on, but this is not a Space and this machine is not logged in to Hugging Face "
            "(`hf auth login`, or set HF_TOKEN): no sign-in button.",
        ),
        (
            {**SPACE, "OAUTH_CLIENT_ID": ""},
            logged_in,
            "HF_LOGIN is on, but this Space has no OAuth (OAUTH_CLIENT_ID is not set; add `hf_oauth: true`).",
        ),
    ],
)
def test_sign_in_problem(env, local_account, expected):
    assert sign_in_problem(env, installed=installed, local_account=local_account) == expected


def test_without_the_oauth_extra_there_is_no_button_anywhere():
    for env in (SPACE, {}):
        problem = sign_in_problem(env, installed=lambda: False, local_account=logged_in)
        assert problem == "HF_LOGIN is on, but gradio[oauth] is not installed: no sign-in button."
