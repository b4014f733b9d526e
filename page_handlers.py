"""The page's event handlers: read the controls, change the tab's PageState, ask the studio, return what shows.

Every handler returns the same first five values (`show`): the state, the composite, the selection line, the
painted table and the gallery (its highlighted thumbnail follows the selection); a click on the picture returns
the first four (`show_picture`) and the gallery's highlight follows in an event of its own (`on_highlight`).
Handlers that open another image also empty the Download panel. Our errors become toasts in one place,
app.user_errors, where these are wired.
"""

# No `from __future__ import annotations`: Gradio reads these hints as objects (gr.SelectData, gr.Request).
import json
import secrets
from collections.abc import Callable

import gradio as gr

import imaging
import masks as rle
import render
import views
from access import Access, is_browser_key
from errors import InvalidInput, NotFound, Unauthorized
from page_state import PageState, click_tolerance
from studio import Studio
from web_io import Outputs, cancel_on_leave, client_address, upload_bytes, upload_name

MODE_SELECT, MODE_INCLUDE, MODE_EXCLUDE = "Select masks", "Add object: include", "Add object: exclude"
NO_IMAGE = "Upload a photo first."
NO_THUMBNAIL = -1
NO_LIBRARY_CHOICE = "Choose an image in the library first."


def owner_of(state: PageState) -> str:
    """The page's owner; never None (None would mean "everyone's images" to the studio)."""
    if not state.owner:
        raise Unauthorized("This page has not finished loading (or lost its session): reload the page.")
    return state.owner


class PageHandlers:
    """The page's handlers over one studio; `status` builds the status line, `demo` is the page's Blocks."""

    def __init__(self, studio: Studio, access: Access, outputs: Outputs, status: Callable[[], str], demo: gr.Blocks):
        self.studio, self.access, self.outputs, self.status, self.demo = studio, access, outputs, status, demo

    # ---- what the page shows -------------------------------------------------------------------
    def show(self, state: PageState, background: str, *, refresh_gallery: bool = False) -> tuple:
        """state, composite, selection line, painted table, gallery (its thumbnails too if `refresh_gallery`)."""
        if refresh_gallery:
            cutouts = self.studio.cutouts(state.image_id, owner_of(state)) if state.image_id else []
            items, order = views.gallery_items(cutouts)
            state = state.with_order(order)
            gallery = {**self.highlight(state), "value": items, "visible": bool(items)}
            return self.show_picture(state, background, reveal=True) + (gallery,)
        state = self._current_order(state)  # the gallery may have grown since (the automatic pass)
        return self.show_picture(state, background) + (self.highlight(state),)

    def show_picture(self, state: PageState, background: str, *, reveal: bool = False) -> tuple:
        """state, composite, selection line, painted table: what a click changes (the gallery's highlight follows
        in an event of its own, `on_highlight`, so the picture is not held back by it). `reveal`: the composite
        may have been hidden (no picture before): show or hide it. Otherwise a bare file path is sent, since an
        update of a component's properties costs Gradio a rebuilt component and schema (~10 ms) per event."""
        image = self._composite(state, background)
        composite: dict | str
        if reveal or image is None:
            composite = gr.update(value=image, visible=image is not None)  # shown only when there is a picture
        else:
            composite = image
        return state, composite, self._selection(state), views.painted_rows(state.steps)

    @staticmethod
    def highlight(state: PageState) -> dict:
        """The gallery's highlighted thumbnail: the selected mask's, or none (None would not reach the browser;
        -1 matches no thumbnail). New thumbnails move a -1 to the first one: on_highlight then puts it back."""
        index = state.gallery_index
        return gr.update(selected_index=NO_THUMBNAIL if index is None else index)

    def on_highlight(self, state):
        """The gallery's highlight after a click on the picture, and whenever the thumbnails change."""
        return self.highlight(self._current_order(state))

    def _current_order(self, state: PageState) -> PageState:
        """The state with the gallery's order as stored now (the automatic pass may have added masks)."""
        if not state.image_id:
            return state
        return state.with_order(self.studio.load(state.image_id, owner_of(state)).by_area())

    def show_image(self, state: PageState, background: str) -> tuple:
        """`show` for a page that now has another image: new thumbnails, and no download of the previous one."""
        return self.show(state, background, refresh_gallery=True) + (None,)

    def _composite(self, state: PageState, background: str) -> str | None:
        if not state.image_id:
            return None
        owner = owner_of(state)
        arr = self.studio.render(state.image_id, state.instructions(), background, owner, display=True)
        if arr.shape[2] == 4:
            arr = render.on_checkerboard(arr)
        if state.points:
            loaded = self.studio.load(state.image_id, owner)
            preview = rle.decode(state.preview["segmentation"]) if state.preview else None
            points = [list(p) for p in state.points]
            arr = render.prompt_overlay(arr, preview, points, (loaded.row.height, loaded.row.width))
        return self.outputs.write("composite.jpg", imaging.encode_jpeg(arr))

    def _selection(self, state: PageState) -> str:
        if not state.image_id or state.selected is None or state.points:
            return views.selection_text(state)
        loaded = self.studio.load(state.image_id, owner_of(state))
        area = loaded.masks[state.selected].area
        return views.selection_text(state, area, (loaded.row.width, loaded.row.height))

    def library(self, owner: str) -> tuple:
        """The Library: its list (newest chosen), its thumbnails, and the image ids in the thumbnails' order."""
        rows, files = self.studio.library(owner)
        choices = views.library_choices(rows)
        items, ids = views.library_gallery(rows, files)
        listed = gr.update(choices=choices, value=choices[0][1] if choices else None)
        return listed, gr.update(value=items, visible=bool(items), selected_index=None), ids

    # ---- loading, uploading, opening, deleting -------------------------------------------------------
    def on_load(self, browser_key, state, profile: gr.OAuthProfile | None = None):
        # Each browser keeps a random key of its own: its anonymous owner when AUTH_MODE=keys.
        # Signed in with Hugging Face (HF_LOGIN / on a Space), the owner is "hf:<username>".
        if not is_browser_key(browser_key):  # none yet, or not one we made: start a new library
            browser_key = secrets.token_urlsafe(24)
        username = profile.username if profile is not None else None
        state = PageState(owner=self.access.browser_caller(browser_key, username).owner)
        return browser_key, state, *self.library(owner_of(state)), self.status()

    def on_upload(self, file, custom_id, state, background, request: gr.Request, progress=gr.Progress()):
        data = upload_bytes(file)
        if data is None:
            raise InvalidInput("Choose an image file to upload.")
        with cancel_on_leave(self.demo, request) as cancel:  # the tab closed: stop a (possibly paid) segmentation
            summary = self.studio.upload(
                data,
                image_id=(custom_id or "").strip() or None,
                owner=owner_of(state),
                progress=lambda fraction, text: progress(fraction, desc=text),
                address=client_address(request),
                cancel=cancel,
                name=upload_name(file),
            )
        state = state.opened(summary["image_id"])
        gr.Info(views.upload_notice(summary), duration=4)
        _warn(views.s3_warning(summary["s3"], summary["mask_count"]))
        # Empty the upload box and the id: ready for the next photo without first clearing them.
        shown = self.show_image(state, background) + (*self.library(owner_of(state)), self.status(), None, "")
        return shown + self._pass_watch(state)

    def on_open(self, image_id, state, background):
        if not image_id:
            raise InvalidInput(NO_LIBRARY_CHOICE)
        self.studio.load(image_id, owner_of(state))
        state = state.opened(image_id)
        return self.show_image(state, background) + self._pass_watch(state)

    def on_library_pick(self, ids, state, background, evt: gr.SelectData):
        """A thumbnail in the Library: open that image (and choose it in the list, for Delete)."""
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(ids or []):
            raise InvalidInput("The library changed meanwhile: choose the image again.")
        image_id = ids[evt.index]
        return self.on_open(image_id, state, background) + (gr.update(value=image_id),)

    # ---- the automatic pass of the open image, running in the background ---------------------------
    def _pass_watch(self, state: PageState) -> tuple:
        """The pass timer (ticking while the open image's pass runs), its progress line, the mask count shown."""
        status = self.studio.pass_status(state.image_id, owner_of(state)) if state.image_id else None
        text = views.pass_progress(status)
        running = status is not None and status["running"]
        shown = status["mask_count"] if status is not None else -1
        return gr.Timer(active=running), gr.update(value=text, visible=bool(text)), shown

    def on_pass_tick(self, state, shown_count):
        """While the open image's pass runs: its progress, and the gallery again whenever masks were added; when it
        has ended, the Library's list too (its labels count the masks; what is chosen in it stays chosen)."""
        try:
            status = self.studio.pass_status(state.image_id, owner_of(state)) if state.image_id else None
        except NotFound:  # the image was deleted meanwhile
            status = None
        if status is None:
            return gr.skip(), gr.update(value="", visible=False), gr.Timer(active=False), -1, gr.skip()
        gallery = gr.skip()
        if status["mask_count"] != shown_count:
            items, order = views.gallery_items(self.studio.cutouts(state.image_id, owner_of(state)))
            index = order.index(state.selected) if state.selected in order else NO_THUMBNAIL
            gallery = gr.update(value=items, visible=bool(items), selected_index=index)
        text = views.pass_progress(status)
        listed = gr.skip()
        if not status["running"]:
            listed = gr.update(choices=views.library_choices(self.studio.list_images(owner_of(state))))
        timer = gr.Timer(active=status["running"])
        return gallery, gr.update(value=text, visible=True), timer, status["mask_count"], listed

    def on_ask_delete(self, image_id, state):
        if not image_id:
            raise InvalidInput(NO_LIBRARY_CHOICE)
        row = self.studio.find(image_id, owner_of(state))
        return gr.update(visible=True), views.delete_question(image_id, row.mask_count)

    def on_delete(self, image_id, state, background):
        if not image_id:
            raise InvalidInput(NO_LIBRARY_CHOICE)
        result = self.studio.delete(image_id, owner_of(state))
        gr.Info(result["message"], duration=4)
        if state.image_id == image_id:
            shown = self.show_image(state.opened(None), background)
        else:
            shown = self.show(state, background, refresh_gallery=True) + (gr.update(),)
        return shown + self.library(owner_of(state))

    # ---- clicks on the picture and the gallery -------------------------------------------------
    def on_click(self, state, color, opacity, background, mode, evt: gr.SelectData, request: gr.Request):
        if not state.image_id:
            raise InvalidInput(NO_IMAGE)
        owner = owner_of(state)
        loaded = self.studio.load(state.image_id, owner)
        dh, dw = loaded.display_rgb.shape[:2]
        dx, dy = evt.index
        x = min(loaded.row.width - 1, int((dx + 0.5) * loaded.row.width / dw))
        y = min(loaded.row.height - 1, int((dy + 0.5) * loaded.row.height / dh))
        if mode in (MODE_INCLUDE, MODE_EXCLUDE):
            # Object mode: each click adds an include (or exclude) point; the object is previewed.
            points = state.points_with(x, y, include=mode == MODE_INCLUDE)
            with cancel_on_leave(self.demo, request) as cancel:
                preview = self.studio.preview_object(
                    state.image_id,
                    [list(p[:2]) for p in points],
                    [p[2] for p in points],
                    owner,
                    address=client_address(request),
                    cancel=cancel,
                )
            return self.show_picture(state.previewing(points, preview), background)
        # With a SAM engine, SAM's own masks at the point are stored first when nothing stored covers it yet.
        found = self.studio.click_masks(state.image_id, x, y, owner)
        if found["mask_id"] is None:
            gr.Info(f"No mask covers pixel ({x}, {y}).", duration=3)
        tolerance = click_tolerance(loaded.row.width, dw)
        state = state.clicked((x, y), found["candidates"], views.rgba_from_controls(color, opacity), tolerance)
        return self.show_picture(state, background)

    def on_gallery(self, state, color, opacity, background, evt: gr.SelectData):
        colour = views.rgba_from_controls(color, opacity)
        mask_id = views.caption_mask_id(evt.value)  # the thumbnails may be newer than the state's order
        if mask_id is not None:
            return self.show(state.picked_mask(mask_id, colour), background)
        return self.show(state.picked_thumbnail(evt.index, colour), background)

    # ---- object mode ---------------------------------------------------------------------------
    def on_mode(self, state, mode_value, background):
        # Leaving object mode drops an object not kept; the Keep / Reset buttons only show in it.
        if mode_value == MODE_SELECT:
            state = state.without_object()
        return self.show(state, background) + (gr.update(visible=mode_value != MODE_SELECT),)

    def on_keep_object(self, state, color, opacity, background):
        """Store the previewed object as a new mask of this image, selected and painted."""
        if not state.preview:
            raise InvalidInput("Choose 'Add object: include' above the picture and click the object first.")
        loaded = self.studio.load(state.image_id, owner_of(state))
        added = self.studio.add_object_mask(loaded, state.preview)
        state = state.kept_object(added["mask_id"], views.rgba_from_controls(color, opacity))
        gr.Info(views.kept_notice(added), duration=4)
        _warn(views.s3_warning(added["s3"], 1))
        return self.show(state, background, refresh_gallery=True)

    def on_reset_points(self, state, background):
        return self.show(state.without_object(), background)

    # ---- colour, background, undo, remove, clear ---------------------------------------------------
    def on_color(self, state, color, opacity, background):
        if state.image_id:
            state = state.recolour(views.rgba_from_controls(color, opacity))
        return self.show(state, background)

    def on_background(self, state, background):
        return self.show(state, background)

    def on_undo(self, state, background):
        if not state.history:
            gr.Info("Nothing to undo.", duration=3)
        return self.show(state.undo(), background)

    def on_remove(self, state, background):
        return self.show(state.remove(), background)

    def on_clear(self, state, background):
        return self.show(state.clear(), background)

    # ---- downloads -----------------------------------------------------------------------------
    def on_download_png(self, state, background):
        if not state.image_id:
            raise InvalidInput(NO_IMAGE)
        arr = self.studio.render(state.image_id, state.instructions(), background, owner_of(state))
        return self.outputs.write(f"{state.image_id}-composite.png", imaging.encode_png(arr))

    def on_download_coco(self, state, which):
        if not state.image_id:
            raise InvalidInput(NO_IMAGE)
        if which == "painted" and not state.steps:
            raise InvalidInput("No mask is painted yet: paint some, or export all masks.")
        coco = self.studio.export_coco(
            state.image_id,
            state.painted if which == "painted" else None,
            owner_of(state),
            colors={mid: list(c) for mid, c in state.steps},
        )
        return self.outputs.write(f"{state.image_id}-coco-{which}.json", json.dumps(coco).encode())


def _warn(text: str | None) -> None:
    if text:
        gr.Warning(text)
