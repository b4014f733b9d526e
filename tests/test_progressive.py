"""No waiting to start working (issue 11, items 3 and 5): with MobileSAM the page's upload answers with the picture
and its embedding, the automatic pass fills the gallery in the background, and clicks meanwhile store SAM's masks.

The real weights and the real app (running_app, launched once per module); the page's handlers are driven
directly over that app's studio, as Gradio calls them. To hold a pass back while a click is tested, another
job occupies the one background worker first (as another person's pass would): the pass of the upload under
test then waits its turn, so "the pass is still running" holds for as long as the test needs, without timing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio import utils as gradio_utils
from gradio_client import Client, handle_file
from skimage import data

import imaging
import masks
import model_weights
from access import Access
from app_server import running_app
from embedding_cache import image_key
from errors import InvalidInput
from helpers import encode
from ingest import same_mask
from mask_passes import MaskPasses
from mobilesam_engine import MobileSamSegmenter
from page_handlers import MODE_SELECT, PageHandlers
from page_state import PageState
from web_io import Outputs

ROOT = Path(__file__).resolve().parent.parent
FACE = (215, 130)  # the astronaut's cheek (tests/test_mobilesam.py chose these pixels by looking)
WAIT_S = 600  # a pass on a busy 2-core box; only a hang reaches it


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    weights, official = model_weights.resolve(None, ROOT / "models")
    assert official
    models_dir = tmp_path_factory.mktemp("models")
    (models_dir / model_weights.FILE_NAME).symlink_to(weights)
    for export in (ROOT / "models").glob("mobilesam_*.onnx"):  # onnxruntime exports made earlier: not made again
        (models_dir / export.name).symlink_to(export.resolve())
    seg = MobileSamSegmenter.load(checkpoint=None, models_dir=models_dir, max_masks=64)
    yield seg
    seg.close()


@pytest.fixture(scope="module")
def app(tmp_path_factory, segmenter):
    with running_app(tmp_path_factory.mktemp("data"), segmenter, max_masks=64) as (url, studio, settings):
        yield url, studio, settings


@pytest.fixture
def handlers(app):
    _, studio, settings = app
    return PageHandlers(studio, Access(settings), Outputs(), lambda: "status", gr.Blocks())


@pytest.fixture
def held(app):
    """The background worker kept busy by another job until the test releases it (set())."""
    _, studio, _ = app
    gate = threading.Event()
    studio.passes.start("someone else's image", lambda state: gate.wait(WAIT_S))
    yield gate
    gate.set()


def upload_file(rgb: np.ndarray, name: str) -> dict:
    """A file in Gradio's upload folder, as the page's upload box hands it over."""
    folder = Path(gradio_utils.get_upload_folder())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(encode(rgb))
    return {"path": str(path)}


def upload(handlers: PageHandlers, rgb: np.ndarray, name: str) -> tuple:
    state = PageState(owner="local")
    return handlers.on_upload(upload_file(rgb, name), "", state, "original", gr.Request(), progress=_no_progress)


def click(handlers: PageHandlers, state: PageState, x: int, y: int) -> PageState:
    """A click on display pixel (x, y) in select mode (the astronaut is shown at full size)."""
    evt = gr.SelectData(None, {"index": [x, y], "value": None})
    return handlers.on_click(state, "#ff0000", 0.6, "original", MODE_SELECT, evt, gr.Request())[0]


def finish(studio, image_id: str) -> None:
    pass_state = studio.passes.status(image_id)
    assert pass_state is not None and pass_state.finished.wait(WAIT_S)


def _no_progress(fraction, desc=None):
    pass


def assert_no_near_duplicates(studio, image_id: str) -> None:
    row = studio.find(image_id, "local")
    stored = studio.db.masks(row.id)
    for i, a in enumerate(stored):
        for b in stored[i + 1 :]:
            assert not same_mask(a, b, (row.height, row.width)), (a.mask_id, b.mask_id)


# ---- the upload answers before the pass ---------------------------------------------------------------
def test_the_upload_shows_the_picture_and_its_embedding_is_ready_before_the_pass_ends(app, handlers, held):
    _, studio, _ = app
    rgb = data.astronaut()
    out = upload(handlers, rgb, "astronaut-a.png")
    state, composite, gallery = out[0], out[1], out[4]
    timer, progress = out[-3], out[-2]  # the pass watch comes last
    assert state.image_id and composite["visible"] and Path(composite["value"]).is_file()
    assert image_key(rgb) in studio.segmenter.cache  # a click costs only the decoder from now on
    status = studio.pass_status(state.image_id, "local")
    assert status["running"] and status["mask_count"] == 0
    assert gallery["visible"] is False  # no masks yet: the gallery appears as they arrive
    assert timer.active is True and progress["value"].startswith("Finding masks… 0 so far")
    studio.delete(state.image_id, "local")  # its pass would only hold up the next tests


def test_a_click_during_the_pass_stores_and_selects_sam_masks_then_steps_up_and_the_pass_adds_no_copy(
    app, handlers, held
):
    _, studio, _ = app
    state = upload(handlers, data.astronaut(), "astronaut-b.png")[0]
    image_id = state.image_id
    state = click(handlers, state, *FACE)
    assert studio.pass_status(image_id, "local")["running"]
    loaded = studio.load(image_id, "local")
    assert 1 <= len(loaded.masks) <= 3  # SAM's whole / part / sub-part at the point, near-duplicates merged
    selected = state.selected
    assert selected is not None and loaded.index.mask(selected)[FACE[1], FACE[0]]
    assert selected == state.candidates[0]  # the smallest, as a click on stored masks selects

    again = click(handlers, state, *FACE)  # the same spot: the next larger mask, no new masks
    assert len(studio.load(image_id, "local").masks) == len(loaded.masks)
    if len(state.candidates) > 1:
        assert again.selected == state.candidates[1]
        assert loaded.masks[again.selected].area > loaded.masks[selected].area

    held.set()  # the pass gets the worker now
    finish(studio, image_id)
    status = studio.pass_status(image_id, "local")
    assert not status["running"] and status["error"] is None and status["stored"] > 0
    after = studio.load(image_id, "local")
    assert after.masks[selected].counts == loaded.masks[selected].counts  # the clicked mask stays as it was
    assert status["mask_count"] == len(after.masks) <= 64
    assert_no_near_duplicates(studio, image_id)


def test_the_timer_fills_the_gallery_and_says_how_the_pass_ended(app, handlers):
    _, studio, _ = app
    state = upload(handlers, data.astronaut()[::2, ::2].copy(), "astronaut-c.png")[0]
    finish(studio, state.image_id)
    gallery, progress, timer, shown, listed = handlers.on_pass_tick(state, -1)
    count = studio.pass_status(state.image_id, "local")["mask_count"]
    assert shown == count > 0 and len(gallery["value"]) == count and gallery["visible"]
    assert progress["value"] == f"Found all masks: {count} in all." and timer.active is False
    labels = [label for label, image_id in listed["choices"] if image_id == state.image_id]
    assert len(labels) == 1 and labels[0].endswith(f" · {count} masks")  # the Library's list says so too
    assert "value" not in listed  # what the person chose in it stays chosen
    unchanged = handlers.on_pass_tick(state, count)
    assert unchanged[0] == gr.skip()  # nothing new: the thumbnails are not sent again
    thumb = gallery["value"][2]
    picked = handlers.on_gallery(
        state, "#00ff00", 1.0, "original", gr.SelectData(None, {"index": 2, "value": {"caption": thumb[1]}})
    )[0]
    assert picked.selected == int(thumb[1][1:])


def test_a_delete_during_the_pass_stops_it_and_nothing_more_is_stored(app, handlers):
    _, studio, _ = app
    state = upload(handlers, data.astronaut()[:, ::-1].copy(), "astronaut-d.png")[0]
    row = studio.find(state.image_id, "local")
    pass_state = studio.passes.status(row.id)
    studio.delete(state.image_id, "local")
    assert pass_state.stop.is_set() and pass_state.finished.wait(WAIT_S)
    assert pass_state.error is None  # stopped on purpose: nothing to show
    assert studio.db.masks(row.id) == [] and not studio.db.image_exists(row.id)
    assert studio.passes.status(row.id) is None
    gallery, progress, timer, _, _ = handlers.on_pass_tick(state, 0)  # the page still showing it stops asking
    assert timer.active is False and progress["visible"] is False


def test_the_api_upload_stays_synchronous_and_returns_every_mask(app, tmp_path):
    url, studio, _ = app
    path = tmp_path / "coffee.png"
    path.write_bytes(encode(imaging.resize(data.coffee(), (200, 300))))
    out = Client(url, verbose=False).predict(handle_file(str(path)), None, None, api_name="/generate_and_store_masks")
    assert out["mask_count"] > 0 and len(out["mask_ids"]) == out["mask_count"] and "pending" not in out
    assert len(studio.load(out["image_id"], "local").masks) == out["mask_count"]
    assert studio.passes.status(studio.find(out["image_id"], "local").id) is None  # no pass behind its back


def test_a_failed_pass_says_why_and_other_passes_go_on():
    passes = MaskPasses()

    def broken(state):
        raise InvalidInput("The picture could not be encoded.")

    def working(state):
        state.stored = 3

    failed, ok = passes.start("a", broken), passes.start("b", working)
    assert failed.finished.wait(WAIT_S) and ok.finished.wait(WAIT_S)
    assert failed.error == "The picture could not be encoded." and ok.error is None and ok.stored == 3
    passes.close()


def test_the_mask_at_a_click_covers_the_point_on_the_stored_masks(app):
    _, studio, _ = app
    image_id = studio.upload(encode(data.astronaut()[50:, 30:].copy()), owner="local")["image_id"]
    found = studio.click_masks(image_id, FACE[0] - 30, FACE[1] - 50, "local")
    loaded = studio.load(image_id, "local")
    for mid in found["candidates"]:
        assert masks.decode({"size": [loaded.row.height, loaded.row.width], "counts": loaded.masks[mid].counts})[
            FACE[1] - 50, FACE[0] - 30
        ]
    finish(studio, loaded.row.id)
