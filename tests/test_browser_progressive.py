"""In a real browser with the real MobileSAM weights: the picture is there to click at once, and the gallery fills.

Headless Chromium drives the app as a person does: upload scikit-image's astronaut, click her face while the
automatic pass still runs (a SAM mask is stored and selected), then watch the progress line and the gallery
until the pass has found all its masks. Screenshots go to test-artifacts/browser/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from skimage import data

import model_weights
from app_server import running_app
from helpers import encode
from mobilesam_engine import MobileSamSegmenter
from test_browser import DESKTOP, Shots, click_pixel, selection, upload

ROOT = Path(__file__).resolve().parent.parent
FACE = (215, 130)  # the astronaut's cheek
SLOW_MS = 600_000  # a pass on a busy 2-core box; only a hang reaches it


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    weights, _ = model_weights.resolve(None, ROOT / "models")
    models_dir = tmp_path_factory.mktemp("models")
    (models_dir / model_weights.FILE_NAME).symlink_to(weights)
    for export in (ROOT / "models").glob("mobilesam_*.onnx"):  # onnxruntime exports made earlier: not made again
        (models_dir / export.name).symlink_to(export.resolve())
    seg = MobileSamSegmenter.load(checkpoint=None, models_dir=models_dir, max_masks=64)
    with running_app(tmp_path_factory.mktemp("data"), seg, max_masks=64) as (url, studio, _):
        yield url, studio


def test_the_astronaut_is_clickable_at_once_and_the_gallery_fills(browser, app, tmp_path, request):
    url, studio = app
    photo = tmp_path / "astronaut.png"
    photo.write_bytes(encode(data.astronaut()))
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(120_000)
    page = context.new_page()
    shots = Shots(request.node.name)
    page.goto(url)
    page.wait_for_selector("#upload")

    upload(page, photo)  # returns when the picture is shown
    assert page.locator("#pass_progress").inner_text().startswith("Finding masks…")
    shots.take(page, "picture-shown")

    click_pixel(page, *FACE)  # during the pass: SAM's masks at the point are stored, the smallest selected
    assert re.match(r"Selected mask \d+", selection(page)), selection(page)
    shots.take(page, "face-selected")

    page.wait_for_function(
        "() => (document.querySelector('#pass_progress')?.innerText || '').startsWith('Found all masks')",
        timeout=SLOW_MS,
    )
    count = int(re.search(r"(\d+) in all", page.locator("#pass_progress").inner_text()).group(1))
    page.wait_for_function(
        "(n) => document.querySelectorAll('#gallery .thumbnail-item').length === n", arg=count, timeout=60_000
    )
    assert count > 3
    shots.take(page, "gallery-filled")
    context.close()
