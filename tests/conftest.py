"""Shared test set-up: Gradio quiet and offline, its cache in a temp folder (modules are found through pytest.ini)."""

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Gradio reads these at import time: set them before any test module imports it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="mask-studio-gradio-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def house_photo(tmp_path_factory) -> str:
    """A 128×96 photo-like PNG on disk (helpers.make_photo), the upload most app tests use."""
    from helpers import encode, make_photo

    path = tmp_path_factory.mktemp("in") / "house.png"
    path.write_bytes(encode(make_photo(96, 128)))
    return str(path)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for a browser test module (tests/chromium.py: skipped off CI without it)."""
    from chromium import launch, require_browser

    sync_api = require_browser()
    with sync_api.sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()
