"""Settings read once from the environment and .env: defaults, the old names, aliases, clear errors."""

from pathlib import Path

import pytest

from errors import InvalidInput
from settings import ENGINE_BUILTIN, Settings


def test_defaults_need_nothing():
    s = Settings.from_env({}, dotenv_path=None)
    assert (s.host, s.port, s.data_dir) == ("127.0.0.1", 7860, Path("data"))
    assert s.sam_api_url is None and s.engine_name == ENGINE_BUILTIN
    assert s.s3_bucket is None and s.s3_prefix == "sam2-api-masks/" and s.auth_mode == "open"
    assert (s.max_masks, s.max_image_pixels, s.sam_api_timeout) == (128, 40_000_000, 150.0)


def test_old_names_and_aliases():
    s = Settings.from_env(
        {
            "GRADIO_SERVER_NAME": "0.0.0.0",
            "GRADIO_SERVER_PORT": "8000",
            "S3_BUCKET": "b",
            "SAM_API_URL": "http://x/",
            "SAM_API_TOKEN": "t",
            "SAM_API_TIMEOUT": "30",
            "AWS_REGION": "eu-west-1",
        },
        dotenv_path=None,
    )
    assert (s.host, s.port, s.s3_bucket, s.sam_api_url, s.sam_api_timeout) == ("0.0.0.0", 8000, "b", "http://x", 30.0)
    assert s.engine_name == "SAM2 service at http://x"
    assert Settings.from_env({"S3_BUCKET_NAME_STAGING": "old", "S3_BUCKET": "new"}, None).s3_bucket == "old"
    assert Settings.from_env({"HOST": "h", "GRADIO_SERVER_NAME": "g"}, None).host == "h"


def test_space_defaults_to_per_owner_data():
    s = Settings.from_env({"SPACE_ID": "me/mask-studio"}, dotenv_path=None)
    assert s.auth_mode == "keys" and s.hf_login
    assert s.max_images_per_owner == 50  # limited unless told otherwise
    assert Settings.from_env({"SPACE_ID": "x", "MAX_IMAGES_PER_OWNER": "0"}, None).max_images_per_owner == 0
    assert Settings.from_env({}, None).max_images_per_owner == 0
    assert Settings.from_env({"SPACE_ID": "x", "AUTH_MODE": "open"}, None).auth_mode == "open"


def test_dotenv_fills_in_what_the_environment_leaves_unset(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9001\nDATA_DIR=/srv/masks\nMAX_MASKS=64\n")
    s = Settings.from_env({"PORT": "9002"}, dotenv_path=env_file)
    assert (s.port, s.data_dir, s.max_masks) == (9002, Path("/srv/masks"), 64)


def test_engine_choice_and_model_folders():
    s = Settings.from_env({"DATA_DIR": "/srv/masks"}, dotenv_path=None)
    assert (s.segmenter, s.mobilesam_checkpoint, s.models_dir) == ("auto", None, Path("/srv/masks/models"))
    s = Settings.from_env(
        {"SEGMENTER": "MobileSAM", "MOBILESAM_CHECKPOINT": "/w/mobile_sam.pt", "MODELS_DIR": "/w"}, dotenv_path=None
    )
    assert (s.segmenter, s.mobilesam_checkpoint, s.models_dir) == ("mobilesam", Path("/w/mobile_sam.pt"), Path("/w"))
    # the default follows DATA_DIR when settings are changed later, as db_path does
    assert Settings().with_(data_dir=Path("/d")).models_dir == Path("/d/models")


def test_secrets_are_not_in_repr():
    s = Settings.from_env(
        {"SAM_API_TOKEN": "sekrit-token", "APP_API_KEYS": "alice:k-123", "ADMIN_API_KEY": "adm"}, dotenv_path=None
    )
    assert "sekrit-token" not in repr(s) and "k-123" not in repr(s) and "adm'" not in repr(s)
    assert s.app_api_keys == (("alice", "k-123"),)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PORT": "eighty"}, "PORT must be a number, got 'eighty'."),
        ({"MAX_MASKS": "0"}, "MAX_MASKS must be at least 1"),
        ({"SAM_API_PROTOCOL": "grpc"}, "SAM_API_PROTOCOL must be one of mask-studio, cog, replicate; got 'grpc'."),
        ({"S3_URL_MODE": "private"}, "S3_URL_MODE must be one of public, presigned"),
        ({"APP_API_KEYS": "just-a-key"}, "APP_API_KEYS must look like 'owner1:key1,owner2:key2'."),
        ({"SEGMENTER": "sam3"}, "SEGMENTER must be one of auto, service, sam2, mobilesam, builtin; got 'sam3'."),
    ],
)
def test_bad_values_say_what_to_fix(env, message):
    with pytest.raises(InvalidInput) as info:
        Settings.from_env(env, dotenv_path=None)
    assert message in info.value.message


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SPACE_ID": "me/app"}, True),
        ({"SPACE_ID": "me/app", "HF_LOGIN": "false"}, False),  # a Space may turn the button off
        ({"HF_LOGIN": "true"}, True),
    ],
)
def test_hf_login_as_set_wins_over_the_space_default(env, expected):
    assert Settings.from_env(env, dotenv_path=None).hf_login is expected


def test_credentials_in_the_service_url_are_never_shown():
    s = Settings.from_env({"SAM_API_URL": "https://user:s3cret@sam.example:8443/v1?api_key=k3y"}, dotenv_path=None)
    assert s.engine_name == "SAM2 service at https://sam.example:8443/v1"
    assert "s3cret" not in repr(s) and "k3y" not in repr(s)


def test_every_setting_is_documented_in_the_readme_and_env_example():
    """Each variable settings.py reads appears in the README's table and in .env.example (or as its alias)."""
    import re

    root = Path(__file__).resolve().parent.parent
    source = (root / "settings.py").read_text()
    names = set(re.findall(r'"([A-Z][A-Z0-9_]{2,})"', source.split("def _parse", 1)[1])) - {"SPACE_ID"}
    readme, example = (root / "README.md").read_text(), (root / ".env.example").read_text()
    missing = sorted(n for n in names if f"`{n}`" not in readme or n not in example)
    assert not missing, f"not documented in README.md and .env.example: {missing}"
