"""Whether the "Sign in with Hugging Face" button can work where the app runs, and if not, why.

On a Space (SYSTEM=spaces, with `hf_oauth: true` in the README) Gradio signs people in for real. Anywhere else
Gradio fakes the sign-in with the machine's own Hugging Face account, and crashes at start-up when the machine
is not logged in ("Your machine must be logged in to HF to debug a Gradio app locally"). So the button is only
built when one of the two can work; otherwise the app starts without it and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

SPACE_OAUTH_VARIABLES = ("OAUTH_CLIENT_ID", "OAUTH_CLIENT_SECRET", "OAUTH_SCOPES", "OPENID_PROVIDER_URL")


def oauth_installed() -> bool:
    """Whether gradio[oauth]'s extra packages are installed (the sign-in button needs them)."""
    try:
        import authlib  # noqa: F401
        import itsdangerous  # noqa: F401
    except ImportError:
        return False
    return True


def local_account_problem() -> str | None:
    """Off a Space: why this machine's Hugging Face login cannot stand in for a sign-in (None: it can)."""
    from huggingface_hub import get_token, whoami

    if get_token() is None:
        return "this machine is not logged in to Hugging Face (`hf auth login`, or set HF_TOKEN)"
    try:
        user = whoami()
    except Exception as exc:  # offline, a revoked token, Hugging Face down: any of them means no sign-in
        return f"Hugging Face did not confirm this machine's login ({type(exc).__name__})"
    if user.get("type") != "user":
        return "this machine is logged in to Hugging Face with an organisation's token, not a person's"
    return None


def sign_in_problem(
    env: Mapping[str, str],
    *,
    installed: Callable[[], bool] = oauth_installed,
    local_account: Callable[[], str | None] = local_account_problem,
) -> str | None:
    """Why HF_LOGIN cannot give a sign-in button here (None: build the button)."""
    if not installed():
        return "HF_LOGIN is on, but gradio[oauth] is not installed: no sign-in button."
    if env.get("SYSTEM") == "spaces" and env.get("SPACE_ID"):
        missing = [name for name in SPACE_OAUTH_VARIABLES if not env.get(name)]
        if missing:
            return f"HF_LOGIN is on, but this Space has no OAuth ({missing[0]} is not set; add `hf_oauth: true`)."
        return None
    problem = local_account()
    return f"HF_LOGIN is on, but this is not a Space and {problem}: no sign-in button." if problem else None
