"""Mask Studio: the Gradio app. The page's layout, its event wiring and the API's publication; `main` starts it.

Run it with `python app.py` (settings from the environment and `.env`; see README.md). Every function is also
a public, named API endpoint for gradio_client (README "API"). The work is done elsewhere: the page's state
in page_state, its handlers in page_handlers, its texts in views, the endpoints in api, the service in studio.
"""

import sys

import commands

if __name__ == "__main__" and commands.is_command(sys.argv[1:]):
    raise SystemExit(commands.run(sys.argv[1:]))  # before the web framework's import (commands.py)

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

import render
from access import EVERYONE, Access, browser_secret
from agent_tools import describe_endpoints
from api import HEAVY, Endpoints
from errors import MaskStudioError
from hf_sign_in import sign_in_problem
from image_cache import ImageCache
from legacy_api import mount_legacy_api
from page_handlers import MODE_EXCLUDE, MODE_INCLUDE, MODE_SELECT, PageHandlers
from page_state import PageState
from publish import MaskPublisher
from rate_limits import run_periodically
from s3_store import S3BlobStore
from segmenter import make_segmenter
from settings import Settings
from storage import Database, LocalBlobStore
from studio import Studio
from views import DEFAULT_COLOR, DEFAULT_OPACITY, selection_text, status_text
from web_io import Outputs

log = logging.getLogger("mask_studio")

GENERIC_ERROR = "Something unexpected went wrong; it has been logged. Please try again."
# The picture keeps its aspect and fits the screen (a fixed-height box leaves big empty bands on a phone);
# the gallery wraps its thumbnails to the width (a fixed 8 columns hid most of them sideways on a phone).
CSS = """
#composite img { max-height: min(600px, calc(100vh - 140px)); width: auto; max-width: 100%; }
#title h2 { margin: 0 0 4px 0; }
#gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); }
#library_gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); }
"""
# On a phone, notices appear at the bottom: at the top they covered the title and the status line. In the page's
# head, because Gradio scopes `css` inside @media to the app's content, where its notices are not.
HEAD = "<style>@media (max-width: 639px) { .toast-wrap { top: auto !important; bottom: var(--size-3); } }</style>"
STATUS_REFRESH_S = 20  # how often an open page refreshes its status line
PASS_REFRESH_S = 1.0  # how often a page looks at the running automatic pass of its image
RETENTION_SWEEP_S = 3600  # how often expired images are looked for, after the sweep at start-up


# ---- errors: the one place where our exceptions become what people see ----------------------
def user_errors(fn: Callable) -> Callable:
    """Show MaskStudioError as gr.Error with its message; anything else as a generic error.

    A refusal we expect (unknown id, bad colour, a limit) is logged as one line; only an unexpected error
    is logged with its traceback (Gradio's own traceback print is turned off for both)."""
    name = getattr(fn, "__name__", repr(fn))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MaskStudioError as exc:
            log.info("Refused %s: %s", name, exc.message)
            raise gr.Error(exc.message, title=exc.title, print_exception=False) from None
        except Exception:
            log.exception("Unexpected error in %s", name)
            raise gr.Error(GENERIC_ERROR, title="Unexpected error", print_exception=False) from None

    return wrapper


# ---- the page --------------------------------------------------------------------------------
@dataclass
class Page:
    """The page's components that events read or change."""

    state: Any
    browser_key: Any
    status: Any
    upload: Any
    custom_id: Any
    composite: Any
    selection: Any
    color: Any
    opacity: Any
    mode: Any
    object_buttons: Any
    keep_object: Any
    reset_points: Any
    background: Any
    undo: Any
    remove: Any
    clear: Any
    painted: Any
    pass_progress: Any
    pass_timer: Any
    pass_shown: Any
    gallery: Any
    dl_png: Any
    dl_coco_painted: Any
    dl_coco_all: Any
    downloads: Any
    library: Any
    library_gallery: Any
    library_ids: Any
    open_btn: Any
    delete_btn: Any
    confirm_row: Any
    confirm_text: Any
    confirm_delete: Any
    cancel_delete: Any


def build_demo(settings: Settings, studio: Studio, outputs: Outputs | None = None) -> gr.Blocks:
    """The page and the API over one studio."""
    sign_in_note = sign_in_problem(os.environ) if settings.hf_login else None
    if sign_in_note:
        log.warning("%s", sign_in_note)

    def status() -> str:
        health = studio.health()
        return status_text(
            studio.segmenter.engine, health, settings.data_dir, studio.s3_status, sign_in_note, studio.engine_note
        )

    outputs = outputs or Outputs()
    access = Access(settings)
    with gr.Blocks(title="Mask Studio", delete_cache=(3600, 3600)) as demo:
        # The same secret after a restart, or every browser would lose its library (the key is unreadable).
        page = layout(browser_secret(settings.data_dir), sign_in=settings.hf_login and not sign_in_note)
        wire(demo, page, PageHandlers(studio, access, outputs, status, demo), status)
        for fn in Endpoints(studio, access, outputs, demo).all():
            heavy = fn.__name__ in HEAVY
            gr.api(
                user_errors(fn),
                api_name=fn.__name__,
                concurrency_id="segment" if heavy else None,
                concurrency_limit=2 if heavy else 8,
            )
    return demo


def layout(secret: str, *, sign_in: bool) -> Page:
    """The components, top to bottom (inside a gr.Blocks)."""
    c: dict[str, Any] = {"state": gr.State(PageState())}
    c["browser_key"] = gr.BrowserState(None, storage_key="mask-studio-owner", secret=secret)
    gr.Markdown("## Mask Studio\nUpload a photo, click the picture to pick a mask, colour it.", elem_id="title")
    if sign_in:
        gr.LoginButton(elem_id="login")  # signed in, your library follows your HF account
    c["status"] = gr.Markdown(elem_id="status")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3, min_width=300):
            # Upload first: it is what a new visitor does first, on a phone as on a desktop. Side by side
            # with the optional id (stacked on a phone), so the picture starts high enough to fit the screen.
            with gr.Row(equal_height=True):
                c["upload"] = gr.File(
                    label="Upload a photo", file_types=["image"], elem_id="upload", height=110, scale=3, min_width=220
                )
                c["custom_id"] = gr.Textbox(
                    label="Image id for the next upload (optional)",
                    elem_id="custom_id",
                    placeholder="auto: img_YYYYMMDD_HHMMSS_xxxxxxxx",
                    max_lines=1,
                    scale=2,
                    min_width=200,
                )
            # Hidden until there is a picture: no big empty box before the first upload.
            c["composite"] = gr.Image(
                label="Composite (click to select)",
                elem_id="composite",
                interactive=False,
                type="filepath",
                buttons=["fullscreen"],
                height=None,
                visible=False,
            )
        with gr.Column(scale=2, min_width=300):
            # Beside the picture, first: what the last click selected and what the next one does is in view
            # on a desktop without scrolling (under the picture it fell below the fold), right under it on a phone.
            c["selection"] = gr.Markdown(selection_text(PageState()), elem_id="selection")
            with gr.Row():
                c["color"] = gr.ColorPicker(value=DEFAULT_COLOR, label="Colour", elem_id="color")
                c["opacity"] = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.01, label="Opacity", elem_id="opacity")
            c["mode"] = gr.Radio(
                [MODE_SELECT, MODE_INCLUDE, MODE_EXCLUDE],
                value=MODE_SELECT,
                label="A click on the picture",
                elem_id="click_mode",
            )
            with gr.Row(visible=False) as c["object_buttons"]:
                c["keep_object"] = gr.Button("Keep object", elem_id="keep_object", size="sm", variant="primary")
                c["reset_points"] = gr.Button("Reset points", elem_id="reset_points", size="sm")
            c["background"] = gr.Radio(
                list(render.BACKGROUNDS), value="original", label="Background", elem_id="background"
            )
            with gr.Row():
                c["undo"] = gr.Button("Undo", elem_id="undo", size="sm")
                c["remove"] = gr.Button("Remove selected", elem_id="remove", size="sm")
                c["clear"] = gr.Button("Clear all", elem_id="clear", size="sm")
            c["painted"] = gr.Dataframe(
                headers=["mask", "colour", "alpha"],
                value=[],
                label="Painted masks",
                elem_id="painted",
                interactive=False,
                max_height=220,
            )
    # While the automatic pass of the open image runs (a SAM engine): its progress, the gallery filling up.
    c["pass_progress"] = gr.Markdown(elem_id="pass_progress", visible=False)
    c["pass_timer"] = gr.Timer(PASS_REFRESH_S, active=False)
    c["pass_shown"] = gr.State(-1)  # the mask count the gallery shows, as the pass timer last refreshed it
    c["gallery"] = thumbnail_grid("Masks, largest first (click to select)", "gallery", height=300, fit="contain")
    with gr.Accordion("Download", open=False, elem_id="downloads_panel"):
        with gr.Row():
            c["dl_png"] = gr.Button("Composite (PNG, full size)", elem_id="dl_png", size="sm")
            c["dl_coco_painted"] = gr.Button("COCO JSON: painted masks", elem_id="dl_coco_painted", size="sm")
            c["dl_coco_all"] = gr.Button("COCO JSON: all masks", elem_id="dl_coco_all", size="sm")
        c["downloads"] = gr.File(label="Your file", elem_id="downloads", interactive=False)
    with gr.Accordion("Library", open=False, elem_id="library_panel"):
        # Newest first; a click on a thumbnail opens that image. The list below names every image (and is
        # what Open and Delete act on).
        c["library_gallery"] = thumbnail_grid(
            "Newest first: click a picture to open it", "library_gallery", height=260, fit="cover"
        )
        c["library_ids"] = gr.State([])  # the image ids in the thumbnails' order
        with gr.Row():
            c["library"] = gr.Dropdown(label="Stored images", choices=[], elem_id="library", scale=3)
            c["open_btn"] = gr.Button("Open", elem_id="open", size="sm", scale=1)
            c["delete_btn"] = gr.Button("Delete", elem_id="delete", size="sm", variant="stop", scale=1)
        # Deleting cannot be undone: it asks first, naming the image.
        with gr.Row(visible=False, elem_id="confirm_delete_row") as c["confirm_row"]:
            c["confirm_text"] = gr.Markdown(elem_id="confirm_delete_text")
            c["confirm_delete"] = gr.Button("Yes, delete it", elem_id="confirm_delete", size="sm", variant="stop")
            c["cancel_delete"] = gr.Button("Keep it", elem_id="cancel_delete", size="sm")
    return Page(**c)


def thumbnail_grid(label: str, elem_id: str, *, height: int, fit: str) -> gr.Gallery:
    """A gallery of clickable thumbnails, hidden until it has some (its columns wrap to the width: CSS)."""
    return gr.Gallery(
        label=label,
        elem_id=elem_id,
        fit_columns=False,
        height=height,
        allow_preview=False,
        object_fit=fit,  # type: ignore[arg-type]
        visible=False,
    )


def wire(demo: gr.Blocks, p: Page, h: PageHandlers, status: Callable[[], str]) -> None:
    """Which handler answers which event, with what inputs and outputs (inside the gr.Blocks)."""
    # What every handler returns first; handlers that open another image also empty the Download panel.
    shown = [p.state, p.composite, p.selection, p.painted, p.gallery]
    fresh = [*shown, p.downloads]
    # Where an event's progress shows: never on a gallery. Gradio's page copies every component that was ever a
    # progress target (by default: every output) at each status message of every later event, and copying a
    # gallery of 128 thumbnails made each click on the picture ~90 ms slower (bench_click).
    private: dict[str, Any] = {"api_visibility": "private"}
    on_picture: dict[str, Any] = {**private, "show_progress_on": [p.composite]}
    on_library: dict[str, Any] = {**private, "show_progress_on": [p.library]}
    # Quick picture edits: no spinner, and a refusal is a toast, not an "Error" badge over the picture. Their
    # progress goes to the page's state, which is not drawn: no status tracker even ticks for them.
    quick: dict[str, Any] = {**private, "show_progress": "hidden", "show_progress_on": [p.state]}
    segment: dict[str, Any] = {"concurrency_id": "segment", "concurrency_limit": 2, **on_picture}
    paint_inputs = [p.state, p.color, p.opacity, p.background]
    watch = [p.pass_timer, p.pass_progress, p.pass_shown]  # the open image's automatic pass (SAM engines)
    library = [p.library, p.library_gallery, p.library_ids]  # its list, its thumbnails, their image ids
    p.upload.upload(
        user_errors(h.on_upload),
        [p.upload, p.custom_id, p.state, p.background],
        [*fresh, *library, p.status, p.upload, p.custom_id, *watch],
        **{**segment, "show_progress_on": [p.upload]},  # progress (and an error badge) on the upload box only
    ).failure(lambda: None, None, p.upload, **private)  # the box is ready for another file
    # A click: the picture first, then the gallery's highlight (an update of the gallery costs Gradio tens of ms).
    picture = shown[:4]
    p.composite.select(user_errors(h.on_click), [*paint_inputs, p.mode], picture, **quick).then(
        h.on_highlight, [p.state], p.gallery, **quick
    )
    p.keep_object.click(user_errors(h.on_keep_object), paint_inputs, shown, **segment)
    p.reset_points.click(user_errors(h.on_reset_points), [p.state, p.background], shown, **on_picture)
    # The engine's and the bucket's health as last checked (in the background, never blocking the page).
    gr.Timer(STATUS_REFRESH_S).tick(status, None, p.status, **quick)
    p.mode.change(user_errors(h.on_mode), [p.state, p.mode, p.background], [*shown, p.object_buttons], **quick)
    p.gallery.select(user_errors(h.on_gallery), paint_inputs, shown, **quick)
    p.gallery.change(h.on_highlight, [p.state], p.gallery, **quick)  # new thumbnails: highlight the selection
    on_color = user_errors(h.on_color)  # one function: the picker and the slider share a concurrency group
    p.color.change(on_color, paint_inputs, shown, **quick)
    p.opacity.release(on_color, paint_inputs, shown, **quick)
    for button, handler in ((p.undo, h.on_undo), (p.remove, h.on_remove), (p.clear, h.on_clear)):
        button.click(user_errors(handler), [p.state, p.background], shown, **quick)
    p.background.change(user_errors(h.on_background), [p.state, p.background], shown, **quick)
    p.dl_png.click(user_errors(h.on_download_png), [p.state, p.background], p.downloads, **private)
    for button, which in ((p.dl_coco_painted, "painted"), (p.dl_coco_all, "all")):
        button.click(functools.partial(user_errors(h.on_download_coco), which=which), [p.state], p.downloads, **private)
    p.open_btn.click(user_errors(h.on_open), [p.library, p.state, p.background], [*fresh, *watch], **on_library)
    pick_inputs = [p.library_ids, p.state, p.background]
    p.library_gallery.select(user_errors(h.on_library_pick), pick_inputs, [*fresh, *watch, p.library], **on_library)
    ticked = [p.gallery, p.pass_progress, p.pass_timer, p.pass_shown, p.library]
    p.pass_timer.tick(user_errors(h.on_pass_tick), [p.state, p.pass_shown], ticked, **quick)
    hide: dict[str, Any] = {"fn": lambda: gr.update(visible=False), "inputs": None, "outputs": p.confirm_row, **private}
    p.delete_btn.click(user_errors(h.on_ask_delete), [p.library, p.state], [p.confirm_row, p.confirm_text], **private)
    p.confirm_delete.click(
        user_errors(h.on_delete), [p.library, p.state, p.background], [*fresh, *library], **on_library
    ).then(**hide)
    p.cancel_delete.click(**hide)
    p.library.change(**hide)
    load_outputs = [p.browser_key, p.state, *library, p.status]
    demo.load(user_errors(h.on_load), [p.browser_key, p.state], load_outputs, **on_library)


def create_studio(settings: Settings) -> Studio:
    """The real dependencies, as configured."""
    db, blobs = Database(settings.db_path), LocalBlobStore(settings.blob_dir)
    cache = ImageCache(db, blobs)
    try:
        s3 = S3BlobStore.from_settings(settings)
        s3_error = None
    except MaskStudioError as exc:  # e.g. a malformed S3_ENDPOINT_URL: say so, and start without S3
        s3, s3_error = None, f"not used: {exc.message}"
        log.warning("S3: %s", s3_error)
    segmenter, engine_note = make_segmenter(settings)  # engine_note: why a preferred engine is not used
    # No bucket, no publisher: masks then have no URL and the S3 endpoints say S3 is not configured.
    publisher = MaskPublisher(s3, db, settings, on_change=cache.rows_changed) if s3 is not None else None
    studio = Studio(settings, segmenter, db, blobs, publisher, cache=cache, s3_error=s3_error, engine_note=engine_note)
    studio.health()  # the first check starts now, in the background, not when the first page asks
    # Expired images go before the first request; their S3 objects are deleted by the retry below (in the
    # background, after the bucket check), so a slow or hung S3 cannot hold up the start.
    studio.purge_expired(flush_s3=False)
    studio.cleanup_orphans()
    if studio.s3 is not None:
        # The bucket is checked once (log + status line), then what a crash or an outage left pending is
        # uploaded or deleted: in the background, so a slow or hung S3 does not hold up the start.
        threading.Thread(target=_check_and_retry_s3, args=(studio,), daemon=True, name="s3 start-up").start()
    if settings.retention_days > 0:
        run_periodically(studio.purge_expired, RETENTION_SWEEP_S, "retention sweep")
    return studio


def _check_and_retry_s3(studio: Studio) -> None:
    if not studio.check_s3()[0]:
        return
    try:
        result = studio.retry_uploads(EVERYONE)
        if result["uploaded"] or result["failed"] or result.get("deleted") or result.get("error"):
            log.info("S3 at start-up: %s", result["message"])
    except MaskStudioError as exc:
        log.warning("S3 at start-up: %s", exc.message)


def launch(settings: Settings, studio: Studio, *, prevent_thread_lock: bool = False, **kwargs):
    demo = build_demo(settings, studio)
    describe_endpoints(demo)  # the API page's and the MCP tools' descriptions
    demo.queue(default_concurrency_limit=8, max_size=256)
    launched = demo.launch(
        server_name=settings.host,
        server_port=settings.port,
        max_file_size=f"{settings.max_upload_mb}mb",
        show_error=False,
        css=CSS,
        head=HEAD,
        # Every click returns a new picture: a browser-side history of them would only pile up photos.
        run_history=False,
        mcp_server=settings.mcp_server,
        prevent_thread_lock=True,  # the REST API is mounted on the running app, then we wait (below)
        **kwargs,
    )
    # The old backend's REST API, /docs and its CORS policy, on the same server (legacy_api.py).
    mount_legacy_api(launched[0], studio, Access(settings), settings, settings.cors_origins)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo, launched


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if commands.is_command(argv):
        raise SystemExit(commands.run(argv))
    _, settings = commands.start(argv)  # --help, an unknown argument or a configuration error ends here
    studio = create_studio(settings)
    log.info("Mask Studio: engine %s; data in %s", studio.segmenter.engine, settings.data_dir.resolve())
    try:
        launch(settings, studio)  # blocks until the server stops (Ctrl-C)
    finally:
        studio.passes.close()  # automatic passes still running or waiting stop
        studio.segmenter.close()  # the SAM2 client's pooled connections


if __name__ == "__main__":
    main()
