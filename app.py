"""Mask Studio: the Gradio app. UI and API wiring only; the work is done by studio.Studio.

Run it with `python app.py` (settings from the environment and `.env`; see README.md).
Every function is also a public, named API endpoint for gradio_client (README "API").
"""

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils as gradio_utils
from gradio.data_classes import FileData

import imaging
import masks as rle
import render
from access import Access, Caller, browser_secret, is_browser_key
from agent_tools import describe_endpoints, mcp_switch
from errors import InvalidInput, MaskStudioError, Unauthorized
from sam2_client import make_segmenter
from legacy_api import mount_legacy_api, parse_cors_origins
from limits import run_periodically
from settings import Settings
from s3_store import S3BlobStore
from storage import Database, LocalBlobStore
from studio import Studio

log = logging.getLogger("mask_studio")

DEFAULT_COLOR = "#ff3b30"
DEFAULT_OPACITY = 0.6
MODE_SELECT, MODE_INCLUDE, MODE_EXCLUDE = "Select masks", "Add object: include", "Add object: exclude"
GENERIC_ERROR = "Something unexpected went wrong; it has been logged. Please try again."
# The picture keeps its aspect and fits the screen (a fixed-height box leaves big empty bands on a phone);
# the gallery wraps its thumbnails to the width (a fixed 8 columns hid most of them sideways on a phone).
CSS = """
#composite img { max-height: min(600px, calc(100vh - 140px)); width: auto; max-width: 100%; }
#title h2 { margin: 0 0 4px 0; }
#gallery .grid-container { grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); }
"""
STATUS_REFRESH_S = 20  # how often an open page refreshes its status line
RETENTION_SWEEP_S = 3600  # how often expired images are looked for, after the sweep at start-up


# ---- errors: the one place where our exceptions become what people see ----------------------
def user_errors(fn):
    """Show MaskStudioError as gr.Error with its message; anything else as a generic error (logged)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MaskStudioError as exc:
            raise gr.Error(exc.message, title=exc.title) from None
        except Exception:
            log.exception("Unexpected error in %s", fn.__name__)
            raise gr.Error(GENERIC_ERROR, title="Unexpected error") from None

    return wrapper


# ---- files handed to Gradio --------------------------------------------------------------------
class Outputs:
    """Files we hand to Gradio (composites, downloads), in one temp folder pruned as it goes."""

    def __init__(self, root: Path | None = None, max_age_s: float = 3600):
        self.root = root or Path(tempfile.gettempdir()) / "mask-studio-out"
        self.max_age_s = max_age_s
        self._last_prune = 0.0

    def write(self, name: str, data: bytes) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self._prune()
        # A folder of its own keeps the file's name clean: it is the name a person's download gets.
        path = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{int(time.time())}-")) / name
        path.write_bytes(data)
        return str(path)

    def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        for p in self.root.iterdir():
            try:
                if now - p.stat().st_mtime > self.max_age_s:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


def client_address(request: gr.Request | None) -> str | None:
    """The caller's network address as the server sees it (abuse limits are also counted per address)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


def oauth_available() -> bool:
    """Whether gradio[oauth]'s extra packages are installed (the HF sign-in button needs them)."""
    try:
        import authlib  # noqa: F401
        import itsdangerous  # noqa: F401
    except ImportError:
        log.warning("HF_LOGIN is on but gradio[oauth] is not installed: no sign-in button.")
        return False
    return True


def _upload_bytes(image: Any) -> bytes | None:
    """A file parameter as gr.api delivers it (a path, or a FileData-like dict) → bytes."""
    if image is None:
        return None
    path = image.get("path") if isinstance(image, dict) else getattr(image, "path", image)
    if not isinstance(path, (str, Path)) or not str(path).strip() or "\x00" in str(path):
        raise InvalidInput("image must be an image file (use gradio_client.handle_file(path)).")
    # gr.api passes a bare string through unchecked: without this, a caller could name any file
    # on the server (another owner's blob, any picture on disk) and have it ingested.
    uploads = Path(gradio_utils.get_upload_folder()).resolve()
    if not Path(path).resolve().is_relative_to(uploads):
        raise InvalidInput(
            "image must be a file uploaded with the request (gradio_client.handle_file(path)); "
            "paths on the server are not accepted."
        )
    try:
        return Path(path).read_bytes()
    except OSError:
        raise InvalidInput("The uploaded file could not be read; please upload it again.") from None


class LeaveWatch:
    """Tells whether the person (or API client) behind a request has gone: tab closed, job cancelled.

    Gradio has no public call for this. While our job runs it sits in the queue's `active_jobs` with
    `alive` True; a closed event stream sets `alive` False, and a cancel removes the job. We only answer
    "gone" after having seen the job alive once, so if Gradio's internals change this answers False
    (nothing is cancelled) rather than cancelling work wrongly.
    """

    def __init__(self, demo: gr.Blocks, request: gr.Request | None):
        self.demo = demo
        self.session = getattr(request, "session_hash", None)
        self.seen = False

    def gone(self) -> bool:
        if self.session is None:
            return False
        alive = False
        for jobs in getattr(getattr(self.demo, "_queue", None), "active_jobs", None) or []:
            for job in jobs or []:
                if getattr(job, "session_hash", None) == self.session and getattr(job, "alive", False) is True:
                    alive = True
        if alive:
            self.seen = True
        return self.seen and not alive


@contextlib.contextmanager
def cancel_on_leave(demo: gr.Blocks, request: gr.Request | None) -> Iterator[threading.Event]:
    """An event that is set if the person behind the request goes away (tab closed, job cancelled)
    while the block runs, so a (possibly paid) segmentation can stop; watched every half second."""
    cancel, done, watch = threading.Event(), threading.Event(), LeaveWatch(demo, request)

    def watch_loop() -> None:
        while not done.wait(0.5):
            if watch.gone():
                cancel.set()
                return

    if watch.session is not None:
        threading.Thread(target=watch_loop, daemon=True, name="leave-watch").start()
    try:
        yield cancel
    finally:
        done.set()


def warn_s3(s3: dict | None, total: int) -> None:
    """A warning on the page when some mask uploads to S3 failed (the masks themselves are kept)."""
    if s3 and s3.get("failed"):
        gr.Warning(
            f"{s3['failed']} of {total} masks could not be uploaded to S3 ({s3.get('error', 'see the log')}). "
            "They are kept here and will be uploaded again later (at the next start, or with /retry_uploads)."
        )


def same_spot(last: list[int] | None, now: list[int], size: tuple[int, int], display_width: int) -> bool:
    """Whether a click lands where the last one did, give or take a few screen pixels (a finger is not
    a mouse): within 1 % of the picture's width, and at least one display pixel."""
    if not last:
        return False
    tolerance = max(1.0, 0.01 * size[0], size[0] / max(1, display_width))
    return math.dist(last, now) <= tolerance


def hex_to_rgba(color: str | None, opacity: float | None) -> list[int]:
    """Colour picker value (#rrggbb, or rgb()/rgba() text) plus an opacity slider → [r, g, b, a]."""
    r, g, b, _ = render.parse_color(color or DEFAULT_COLOR, 0)  # type: ignore[misc]
    a = DEFAULT_OPACITY if opacity is None else float(opacity)
    return [r, g, b, int(round(max(0.0, min(1.0, a)) * 255))]


# ---- the UI's per-session state (ids and small lists only, never arrays) ----------------------
def new_session(image_id: str | None = None, owner: str | None = None) -> dict:
    """A page's state; `owner` stays None until the page has loaded and said who is using it."""
    return {
        "image_id": image_id,
        "owner": owner,
        "steps": [],
        "history": [],
        "selected": None,
        "click": None,
        "candidates": [],
        "order": [],
    }


def owner_of(sess: dict) -> str:
    """The page's owner; never None (None would mean "everyone's images" to the studio)."""
    owner = sess.get("owner")
    if not owner:
        raise Unauthorized("This page has not finished loading (or lost its session): reload the page.")
    return owner


def build_demo(settings: Settings, studio: Studio, outputs: Outputs | None = None) -> gr.Blocks:
    outputs = outputs or Outputs()
    access = Access(settings)

    def api_caller(request: gr.Request | None) -> Caller:
        return access.api_caller(request.headers if request is not None else {})

    # ---- rendering helpers for the UI -------------------------------------------------------
    def display_path(sess: dict, background: str) -> str | None:
        if not sess.get("image_id"):
            return None
        arr = studio.render(sess["image_id"], _instructions(sess), background, owner_of(sess), display=True)
        if arr.shape[2] == 4:
            arr = render.on_checkerboard(arr)
        if sess.get("points"):
            loaded = studio.load(sess["image_id"], owner_of(sess))
            preview = rle.decode(sess["preview"]["segmentation"]) if sess.get("preview") else None
            arr = render.prompt_overlay(arr, preview, sess["points"], (loaded.row.height, loaded.row.width))
        return outputs.write("composite.jpg", imaging.encode_jpeg(arr))

    def painted_table(sess: dict) -> list[list]:
        rows = []
        for mid, color in sess["steps"]:
            if color == "original":
                rows.append([mid, "original pixels", 255])
            else:
                r, g, b, a = color
                rows.append([mid, f"#{r:02x}{g:02x}{b:02x}", a])
        return rows

    def selection_text(sess: dict) -> str:
        if not sess.get("image_id"):
            return "Upload a photo, or open one from the library."
        if sess.get("points"):
            n_in = sum(1 for p in sess["points"] if p[2] == 1)
            n_out = len(sess["points"]) - n_in
            return (
                f"**New object** (cyan) from {n_in} include and {n_out} exclude point(s): "
                "click to refine, **Keep object** to store it as a mask."
            )
        sel = sess.get("selected")
        if sel is None:
            return "Click the picture (or a thumbnail) to select a mask."
        loaded = studio.load(sess["image_id"], owner_of(sess))
        m = loaded.masks[sel]
        pct = 100 * m.area / (loaded.row.width * loaded.row.height)
        cands = sess.get("candidates") or []
        where = ""
        if sel in cands and len(cands) > 1:
            pos = cands.index(sel) + 1
            where = f" · {pos} of {len(cands)} masks under this point: click again for the next larger"
        return f"**Selected mask {sel}** · {m.area:,} px ({pct:.1f} % of the image){where}"

    def gallery_items(image_id: str, owner: str) -> tuple[list, list[int]]:
        items, order = [], []
        for mid, thumb in studio.cutouts(image_id, owner):
            items.append((thumb, f"#{mid}"))
            order.append(mid)
        return items, order

    def status_text() -> str:
        ok, health = studio.health()
        engine = studio.segmenter.engine
        # Health sentences usually name the engine already: say it once.
        engine_text = health if engine in health else f"{engine}: {health}"
        warn = "" if ok else "⚠️ "
        storage = f"SQLite and images in `{settings.data_dir}`"
        s3_ok, s3_text = studio.s3_status
        s3 = f" · **S3:** {'' if s3_ok else '⚠️ '}{s3_text}"
        return f"**Engine:** {warn}{engine_text} · **Storage:** {storage}{s3}"

    def library_choices(owner: str):
        rows = studio.list_images(owner)
        choices = [
            (f"{r['image_id']} · {r['width']}×{r['height']} · {r['mask_count']} masks", r["image_id"]) for r in rows
        ]
        return gr.update(choices=choices, value=choices[0][1] if choices else None)

    def view(sess: dict, background: str, *, gallery: bool = False) -> tuple:
        """Everything that shows the session: composite, selection, painted table (+ gallery)."""
        image = display_path(sess, background)
        # The picture and the gallery are shown only when there is something in them.
        out = (sess, gr.update(value=image, visible=image is not None), selection_text(sess), painted_table(sess))
        if gallery:
            items, order = gallery_items(sess["image_id"], owner_of(sess)) if sess.get("image_id") else ([], [])
            sess["order"] = order
            out = out + (gr.update(value=items, visible=bool(items)),)
        return out

    def paint(sess: dict, mask_id: int, color: list[int], *, replace: int | None = None) -> None:
        """Select mask_id and paint it; `replace` is a mask whose paint this click takes back."""
        sess["history"] = (sess["history"] + [list(map(list, sess["steps"]))])[-50:]
        steps = [s for s in sess["steps"] if s[0] != mask_id and (replace is None or s[0] != replace)]
        sess["steps"] = steps + [[mask_id, color]]
        sess["selected"] = mask_id

    # ---- UI handlers ------------------------------------------------------------------------
    @user_errors
    def on_upload(file, custom_id, sess, background, request: gr.Request, progress=gr.Progress()):
        data = _upload_bytes(file)
        if data is None:
            raise InvalidInput("Choose an image file to upload.")
        with cancel_on_leave(demo, request) as cancel:  # the tab closed: stop a (possibly paid) segmentation
            summary = studio.generate_and_store(
                data,
                image_id=(custom_id or "").strip() or None,
                owner=owner_of(sess),
                progress=lambda fraction, text: progress(fraction, desc=text),
                address=client_address(request),
                cancel=cancel,
            )
        sess = new_session(summary["image_id"], owner_of(sess))
        gr.Info(f"{summary['mask_count']} masks from the {summary['engine']}.", duration=4)
        warn_s3(summary["s3"], summary["mask_count"])
        # Empty the upload box and the id: ready for the next photo without first clearing them.
        return view(sess, background, gallery=True) + (library_choices(owner_of(sess)), status_text(), None, "")

    @user_errors
    def on_open(image_id, sess, background):
        if not image_id:
            raise InvalidInput("Choose an image in the library first.")
        studio.load(image_id, owner_of(sess))
        return view(new_session(image_id, owner_of(sess)), background, gallery=True)

    @user_errors
    def on_ask_delete(image_id, sess):
        if not image_id:
            raise InvalidInput("Choose an image in the library first.")
        row = studio.find(image_id, owner_of(sess))
        text = f"Delete **{image_id}** and its {row.mask_count} masks? This cannot be undone."
        return gr.update(visible=True), text

    @user_errors
    def on_delete(image_id, sess, background):
        if not image_id:
            raise InvalidInput("Choose an image in the library first.")
        result = studio.delete(image_id, owner_of(sess))
        gr.Info(result["message"], duration=4)
        if sess.get("image_id") == image_id:
            sess = new_session(None, owner_of(sess))
        return view(sess, background, gallery=True) + (library_choices(owner_of(sess)),)

    @user_errors
    def on_click(sess, color, opacity, background, mode, evt: gr.SelectData, request: gr.Request):
        if not sess.get("image_id"):
            raise InvalidInput("Upload a photo first.")
        loaded = studio.load(sess["image_id"], owner_of(sess))
        dh, dw = loaded.display_rgb.shape[:2]
        dx, dy = evt.index
        x = min(loaded.row.width - 1, int((dx + 0.5) * loaded.row.width / dw))
        y = min(loaded.row.height - 1, int((dy + 0.5) * loaded.row.height / dh))
        if mode in (MODE_INCLUDE, MODE_EXCLUDE):
            # Object mode: each click adds an include (or exclude) point; the object is previewed.
            points = (sess.get("points") or []) + [[x, y, 0 if mode == MODE_EXCLUDE else 1]]
            if not any(p[2] == 1 for p in points):
                raise InvalidInput("Start an object with an include point.")
            with cancel_on_leave(demo, request) as cancel:
                sess["preview"] = studio.preview_object(
                    sess["image_id"],
                    [p[:2] for p in points],
                    [p[2] for p in points],
                    owner_of(sess),
                    address=client_address(request),
                    cancel=cancel,
                )
            sess["points"] = points
            return view(sess, background)
        found = studio.mask_at_point(sess["image_id"], x, y, owner_of(sess))
        if found["mask_id"] is None:
            sess["click"], sess["candidates"] = [x, y], []
            gr.Info(f"No mask covers pixel ({x}, {y}).", duration=3)
            return view(sess, background)
        cands = found["candidates"]
        replace = None
        if same_spot(sess.get("click"), [x, y], (loaded.row.width, loaded.row.height), dw) and (
            sess.get("candidates") == cands and sess.get("selected") in cands
        ):
            # Same pixel again: step from this part to the next larger mask (part → whole).
            pos = cands.index(sess["selected"])
            target = cands[(pos + 1) % len(cands)]
            replace = sess["selected"]
        else:
            target = cands[0]
        sess["click"], sess["candidates"] = [x, y], cands
        paint(sess, target, hex_to_rgba(color, opacity), replace=replace)
        return view(sess, background)

    @user_errors
    def on_keep_object(sess, color, opacity, background):
        """Store the previewed object as a new mask of this image, selected and painted."""
        if not sess.get("preview"):
            raise InvalidInput("Choose 'Add object: include' above the picture and click the object first.")
        loaded = studio.load(sess["image_id"], owner_of(sess))
        added = studio.add_object_mask(loaded, sess["preview"])
        sess["points"], sess["preview"] = [], None
        sess["click"], sess["candidates"] = None, []
        paint(sess, added["mask_id"], hex_to_rgba(color, opacity))
        if added["existing"]:
            gr.Info(f"That object is mask {added['mask_id']} already: it is selected.", duration=4)
        else:
            gr.Info(f"Stored the object as mask {added['mask_id']}.", duration=4)
        warn_s3(added["s3"], 1)
        return view(sess, background, gallery=True)

    @user_errors
    def on_reset_points(sess, background):
        sess["points"], sess["preview"] = [], None
        return view(sess, background)

    @user_errors
    def on_gallery(sess, color, opacity, background, evt: gr.SelectData):
        order = sess.get("order") or []
        if not sess.get("image_id") or not (0 <= evt.index < len(order)):
            raise InvalidInput("Upload a photo first.")
        sess["click"], sess["candidates"] = None, []
        paint(sess, order[evt.index], hex_to_rgba(color, opacity))
        return view(sess, background)

    @user_errors
    def on_color(sess, color, opacity, background):
        sel = sess.get("selected")
        if sel is None or not sess.get("image_id"):
            return view(sess, background)
        rgba = hex_to_rgba(color, opacity)
        current = next((s for s in sess["steps"] if s[0] == sel), None)
        if current is not None and current[1] == rgba:
            return view(sess, background)
        # A drag of the picker or slider is one undo step, not fifty.
        last = sess["history"][-1] if sess["history"] else None
        coalesce = last is not None and [s[0] for s in last] == [s[0] for s in sess["steps"]]
        if not coalesce:
            sess["history"] = (sess["history"] + [list(map(list, sess["steps"]))])[-50:]
        if current is not None:
            current[1] = rgba
        else:
            sess["steps"].append([sel, rgba])
        return view(sess, background)

    @user_errors
    def on_background(sess, background):
        return view(sess, background)

    @user_errors
    def on_undo(sess, background):
        if sess["history"]:
            sess["steps"] = sess["history"].pop()
            if not any(s[0] == sess.get("selected") for s in sess["steps"]):
                sess["selected"] = None  # a colour change must not repaint the mask just taken back
        else:
            gr.Info("Nothing to undo.", duration=3)
        return view(sess, background)

    @user_errors
    def on_remove(sess, background):
        sel = sess.get("selected")
        if sel is None or not any(s[0] == sel for s in sess["steps"]):
            raise InvalidInput("Select a painted mask first (click it), then remove it.")
        sess["history"] = (sess["history"] + [list(map(list, sess["steps"]))])[-50:]
        sess["steps"] = [s for s in sess["steps"] if s[0] != sel]
        sess["selected"] = None  # removed means unselected: the next colour change must not bring it back
        return view(sess, background)

    @user_errors
    def on_clear(sess, background):
        if sess["steps"]:
            sess["history"] = (sess["history"] + [list(map(list, sess["steps"]))])[-50:]
        sess["steps"], sess["selected"], sess["candidates"] = [], None, []
        return view(sess, background) + (gr.update(selected_index=None),)  # no thumbnail stays highlighted

    @user_errors
    def on_download_png(sess, background):
        if not sess.get("image_id"):
            raise InvalidInput("Upload a photo first.")
        arr = studio.render(sess["image_id"], _instructions(sess), background, owner_of(sess))
        return outputs.write(f"{sess['image_id']}-composite.png", imaging.encode_png(arr))

    @user_errors
    def on_download_coco(sess, which):
        if not sess.get("image_id"):
            raise InvalidInput("Upload a photo first.")
        painted = [mid for mid, _ in sess["steps"]]
        if which == "painted" and not painted:
            raise InvalidInput("No mask is painted yet: paint some, or export all masks.")
        coco = studio.export_coco(
            sess["image_id"],
            painted if which == "painted" else None,
            owner_of(sess),
            colors={mid: c for mid, c in sess["steps"]},
        )
        name = f"{sess['image_id']}-coco-{which}.json"
        return outputs.write(name, json.dumps(coco).encode())

    # ---- API handlers (public, named; parameter names and order are the contract) ------------
    def generate_and_store_masks(
        image: FileData | None = None,
        image_id: str | None = None,
        original_image_b64: str | None = None,
        request: gr.Request = None,
    ) -> dict:
        """Segment an image and store it with its masks. Send `image` (handle_file(path)) or `original_image_b64`.
        Returns {"message", "image_id", "mask_count", "image_dimensions", "mask_ids", "mask_urls", "engine", "s3"}."""
        caller = api_caller(request)
        data = _upload_bytes(image)
        if data is None:
            if original_image_b64 is None:
                raise InvalidInput("Send an image: `image` as a file, or `original_image_b64`.")
            data = imaging.decode_base64(original_image_b64)
        with cancel_on_leave(demo, request) as cancel:  # the client cancelled or went away: stop segmenting
            return studio.generate_and_store(
                data, image_id=image_id, owner=caller.owner, address=client_address(request), cancel=cancel
            )

    def render_masks(
        image_id: str, render_instructions: list[dict], background: str = "original", request: gr.Request = None
    ) -> FileData:
        """The composite as a full-size PNG: instructions [{"mask_id", "color"}], later over earlier."""
        arr = studio.render(image_id, render_instructions, background, api_caller(request).scope)
        return FileData(path=outputs.write(f"{image_id}-render.png", imaging.encode_png(arr)))

    def image_info(image_id: str, request: gr.Request = None) -> dict:
        """An image's size, engine and masks (id, area, bbox, scores, mask_url)."""
        return studio.info(image_id, api_caller(request).scope)

    def list_images(request: gr.Request = None) -> list[dict]:
        """Stored images, newest first."""
        return studio.list_images(api_caller(request).scope)

    def mask_at_point(image_id: str, x: float, y: float, request: gr.Request = None) -> dict:
        """The smallest mask containing pixel (x, y), and every containing mask smallest first."""
        return studio.mask_at_point(image_id, x, y, api_caller(request).scope)

    def delete_image(image_id: str, request: gr.Request = None) -> dict:
        """Delete an image, its masks and its files."""
        return studio.delete(image_id, api_caller(request).scope)

    def get_mask(image_id: str, mask_id: int, request: gr.Request = None) -> FileData:
        """One mask as a PNG (0 outside, 255 inside) of the image's size."""
        png = studio.mask_png(image_id, mask_id, api_caller(request).scope)
        return FileData(path=outputs.write(f"{image_id}-mask-{int(mask_id)}.png", png))

    def export_coco(image_id: str, mask_ids: list[int] | None = None, request: gr.Request = None) -> dict:
        """A COCO dict (RLE segmentations) of all masks, or of the listed mask ids."""
        return studio.export_coco(image_id, mask_ids, api_caller(request).scope)

    def segment(
        image: FileData | None = None,
        image_id: str | None = None,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
        request: gr.Request = None,
    ) -> dict:
        """One object from points (label 1 include, 0 exclude) and/or a box [x0, y0, x1, y1], stored as a mask
        of a new image (`image`) or of a stored one (`image_id`).
        Returns {"image_id", "mask_id", "mask_url", "s3", "existing"} (existing: it was one of the image's masks)."""
        caller = api_caller(request)
        data = _upload_bytes(image)
        if data is None and not image_id:
            raise InvalidInput("Send an image file (`image`), or the `image_id` of a stored image.")
        with cancel_on_leave(demo, request) as cancel:
            return studio.segment_object(
                data=data,
                image_id=image_id,
                points=points,
                point_labels=point_labels,
                box=box,
                owner=caller.owner if data is not None else caller.scope,
                address=client_address(request),
                cancel=cancel,
            )

    def retry_uploads(request: gr.Request = None) -> dict:
        """Upload to S3 what failed earlier (yours) and finish deletions S3 missed.
        Returns {"message", "uploaded", "failed", "deleted"}."""
        return studio.retry_uploads(api_caller(request).scope)

    def share_render(
        image_id: str, render_instructions: list[dict], background: str = "original", request: gr.Request = None
    ) -> dict:
        """Upload a rendered composite to S3. Returns {"image_id", "url", "key"}."""
        return studio.share_render(image_id, render_instructions, background, api_caller(request).scope)

    api_functions = [
        generate_and_store_masks,
        render_masks,
        image_info,
        list_images,
        mask_at_point,
        delete_image,
        get_mask,
        export_coco,
        segment,
        retry_uploads,
        share_render,
    ]

    # ---- layout ------------------------------------------------------------------------------
    with gr.Blocks(title="Mask Studio", delete_cache=(3600, 3600)) as demo:
        sess = gr.State(new_session())
        # The same secret after a restart, or every browser would lose its library (the key is unreadable).
        browser_key = gr.BrowserState(None, storage_key="mask-studio-owner", secret=browser_secret(settings.data_dir))
        gr.Markdown("## Mask Studio\nUpload a photo, click the picture to pick a mask, colour it.", elem_id="title")
        if settings.hf_login and oauth_available():
            gr.LoginButton(elem_id="login")  # signed in, your library follows your HF account
        status = gr.Markdown(elem_id="status")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=300):
                # Upload first: it is what a new visitor does first, on a phone as on a desktop. Side by side
                # with the optional id (stacked on a phone), so the picture starts high enough to fit the screen.
                with gr.Row(equal_height=True):
                    upload = gr.File(
                        label="Upload a photo",
                        file_types=["image"],
                        elem_id="upload",
                        height=110,
                        scale=3,
                        min_width=220,
                    )
                    custom_id = gr.Textbox(
                        label="Image id for the next upload (optional)",
                        elem_id="custom_id",
                        placeholder="auto: img_YYYYMMDD_HHMMSS_xxxxxxxx",
                        max_lines=1,
                        scale=2,
                        min_width=200,
                    )
                # Hidden until there is a picture: no big empty box before the first upload.
                composite = gr.Image(
                    label="Composite (click to select)",
                    elem_id="composite",
                    interactive=False,
                    type="filepath",
                    buttons=["fullscreen"],
                    height=None,
                    visible=False,
                )
                selection = gr.Markdown(selection_text(new_session()), elem_id="selection")
            with gr.Column(scale=2, min_width=300):
                # What a person reaches for after each click comes first (right under the picture on a phone).
                with gr.Row():
                    color = gr.ColorPicker(value=DEFAULT_COLOR, label="Colour", elem_id="color")
                    opacity = gr.Slider(0, 1, value=DEFAULT_OPACITY, step=0.01, label="Opacity", elem_id="opacity")
                mode = gr.Radio(
                    [MODE_SELECT, MODE_INCLUDE, MODE_EXCLUDE],
                    value=MODE_SELECT,
                    label="A click on the picture",
                    elem_id="click_mode",
                )
                with gr.Row(visible=False) as object_buttons:
                    keep_object = gr.Button("Keep object", elem_id="keep_object", size="sm", variant="primary")
                    reset_points = gr.Button("Reset points", elem_id="reset_points", size="sm")
                background = gr.Radio(
                    list(render.BACKGROUNDS), value="original", label="Background", elem_id="background"
                )
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="undo", size="sm")
                    remove = gr.Button("Remove selected", elem_id="remove", size="sm")
                    clear = gr.Button("Clear all", elem_id="clear", size="sm")
                painted = gr.Dataframe(
                    headers=["mask", "colour", "alpha"],
                    value=[],
                    label="Painted masks",
                    elem_id="painted",
                    interactive=False,
                    max_height=220,
                )
        gallery = gr.Gallery(
            label="Masks, largest first (click to select)",
            elem_id="gallery",
            columns=8,
            fit_columns=False,
            height=300,
            allow_preview=False,
            object_fit="contain",
            visible=False,
        )
        with gr.Accordion("Download", open=False, elem_id="downloads_panel"):
            with gr.Row():
                dl_png = gr.Button("Composite (PNG, full size)", elem_id="dl_png", size="sm")
                dl_coco_painted = gr.Button("COCO JSON: painted masks", elem_id="dl_coco_painted", size="sm")
                dl_coco_all = gr.Button("COCO JSON: all masks", elem_id="dl_coco_all", size="sm")
            downloads = gr.File(label="Your file", elem_id="downloads", interactive=False)
        with gr.Accordion("Library", open=False, elem_id="library_panel"):
            with gr.Row():
                library = gr.Dropdown(label="Stored images", choices=[], elem_id="library", scale=3)
                open_btn = gr.Button("Open", elem_id="open", size="sm", scale=1)
                delete_btn = gr.Button("Delete", elem_id="delete", size="sm", variant="stop", scale=1)
            # Deleting cannot be undone: it asks first, naming the image.
            with gr.Row(visible=False, elem_id="confirm_delete_row") as confirm_row:
                confirm_text = gr.Markdown(elem_id="confirm_delete_text")
                confirm_delete = gr.Button("Yes, delete it", elem_id="confirm_delete", size="sm", variant="stop")
                cancel_delete = gr.Button("Keep it", elem_id="cancel_delete", size="sm")

        shown = [sess, composite, selection, painted]
        private = {"api_visibility": "private"}
        # Quick picture edits: no spinner, and a refusal is a toast, not an "Error" badge over the picture.
        quick = {**private, "show_progress": "hidden"}
        upload.upload(
            on_upload,
            [upload, custom_id, sess, background],
            shown + [gallery, library, status, upload, custom_id],
            # Progress (and an error badge) on the upload box only, not on every output.
            show_progress_on=[upload],
            concurrency_id="segment",
            concurrency_limit=2,
            **private,
        ).failure(lambda: None, None, upload, **private)  # the box is ready for another file
        composite.select(on_click, [sess, color, opacity, background, mode], shown, **quick)
        keep_object.click(
            on_keep_object,
            [sess, color, opacity, background],
            shown + [gallery],
            concurrency_id="segment",
            concurrency_limit=2,
            **private,
        )
        reset_points.click(on_reset_points, [sess, background], shown, **private)

        @user_errors
        def on_mode(sess, mode_value, background):
            # Leaving object mode drops an object not kept; the Keep / Reset buttons only show in it.
            if mode_value == MODE_SELECT and sess.get("points"):
                sess["points"], sess["preview"] = [], None
            return view(sess, background) + (gr.update(visible=mode_value != MODE_SELECT),)

        # The engine's and the bucket's health as last checked (in the background, never blocking the page).
        gr.Timer(STATUS_REFRESH_S).tick(status_text, None, status, **quick)
        mode.change(on_mode, [sess, mode, background], shown + [object_buttons], **quick)
        gallery.select(on_gallery, [sess, color, opacity, background], shown, **quick)
        color.change(on_color, [sess, color, opacity, background], shown, **quick)
        opacity.release(on_color, [sess, color, opacity, background], shown, **quick)
        background.change(on_background, [sess, background], shown, **quick)
        undo.click(on_undo, [sess, background], shown, **quick)
        remove.click(on_remove, [sess, background], shown, **quick)
        clear.click(on_clear, [sess, background], shown + [gallery], **quick)
        dl_png.click(on_download_png, [sess, background], downloads, **private)
        dl_coco_painted.click(functools.partial(on_download_coco, which="painted"), [sess], downloads, **private)
        dl_coco_all.click(functools.partial(on_download_coco, which="all"), [sess], downloads, **private)
        open_btn.click(on_open, [library, sess, background], shown + [gallery], **private)
        hide = {"fn": lambda: gr.update(visible=False), "inputs": None, "outputs": confirm_row, **private}
        delete_btn.click(on_ask_delete, [library, sess], [confirm_row, confirm_text], **private)
        confirm_delete.click(on_delete, [library, sess, background], shown + [gallery, library], **private).then(**hide)
        cancel_delete.click(**hide)
        library.change(**hide)

        @user_errors
        def on_load(browser_key, sess, profile: gr.OAuthProfile | None = None):
            # Each browser keeps a random key of its own: its anonymous owner when AUTH_MODE=keys.
            # Signed in with Hugging Face (HF_LOGIN / on a Space), the owner is "hf:<username>".
            if not is_browser_key(browser_key):  # none yet, or not one we made: start a new library
                browser_key = secrets.token_urlsafe(24)
            username = profile.username if profile is not None else None
            sess = new_session(None, access.browser_caller(browser_key, username).owner)
            return browser_key, sess, library_choices(sess["owner"]), status_text()

        demo.load(on_load, [browser_key, sess], [browser_key, sess, library, status], **private)

        for fn in api_functions:
            heavy = fn in (generate_and_store_masks, segment)
            gr.api(
                user_errors(fn),
                api_name=fn.__name__,
                concurrency_id="segment" if heavy else None,
                concurrency_limit=2 if heavy else 8,
            )
    return demo


def _instructions(sess: dict) -> list[dict]:
    return [{"mask_id": mid, "color": color} for mid, color in sess["steps"]]


def create_studio(settings: Settings) -> Studio:
    """The real dependencies, as configured."""
    try:
        s3 = S3BlobStore.from_settings(settings)
        s3_error = None
    except MaskStudioError as exc:  # e.g. a malformed S3_ENDPOINT_URL: say so, and start without S3
        s3, s3_error = None, f"not used: {exc.message}"
        log.warning("S3: %s", s3_error)
    studio = Studio(
        settings,
        make_segmenter(settings),
        Database(settings.db_path),
        LocalBlobStore(settings.blob_dir),
        s3,
        s3_error=s3_error,
    )
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
        result = studio.retry_uploads(None)
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
        # Every click returns a new picture: a browser-side history of them would only pile up photos.
        run_history=False,
        mcp_server=mcp_switch(os.environ),
        prevent_thread_lock=True,  # the REST API is mounted on the running app, then we wait (below)
        **kwargs,
    )
    # The old backend's REST API, /docs and its CORS policy, on the same server (legacy_api.py).
    cors = parse_cors_origins(os.environ.get("CORS_ORIGINS"))
    mount_legacy_api(launched[0], studio, Access(settings), settings, cors)
    if not prevent_thread_lock:
        demo.block_thread()
    return demo, launched


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # .env from the folder it is started in, else the one next to app.py (what the README says).
        dotenv = Path(".env") if Path(".env").is_file() else Path(__file__).with_name(".env")
        settings = Settings.from_env(dotenv_path=dotenv)
    except MaskStudioError as exc:
        raise SystemExit(f"Configuration error: {exc.message}") from None
    studio = create_studio(settings)
    log.info("Mask Studio: engine %s; data in %s", studio.segmenter.engine, settings.data_dir.resolve())
    try:
        launch(settings, studio)  # blocks until the server stops (Ctrl-C)
    finally:
        studio.segmenter.close()  # the SAM2 client's pooled connections


if __name__ == "__main__":
    main()
