"""End to end in a real browser: headless Chromium drives the real app as a person does (issue 5).

Each test is one scenario of the issue. The app runs on a loopback port with a segmenter that answers
known masks (so pixels can be checked exactly); scenario 1 uses the real built-in segmenter on a real
photo. Every step is photographed at 1280×800 and at a 390-px phone width under test-artifacts/browser/,
and at both sizes the page must not scroll sideways.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from access import EVERYONE
from app_server import running_app
from helpers import RecordsSegmenter, encode, house_masks, make_photo

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
H, W = 480, 640
WINDOW_PX = (192, 300)  # (x, y) inside the window, itself inside the house and the lower half
HOUSE_PX = (288, 408)  # inside the house, outside the window
SUN_PX = (512, 96)
SKY_PX = (40, 40)  # inside no mask
DEFAULT_RGBA = (0xFF, 0x3B, 0x30, 153)  # the app's default colour at opacity 0.6
TIMEOUT_MS = 20_000


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("data"), RecordsSegmenter(house_masks)) as (url, studio, _):
        yield url, studio


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """make_photo at 640×480, with the house, window and sun flat (exact pixels under JPEG display)."""
    img = make_photo(H, W)
    house, window, sun, _ = house_masks(H, W)
    img[house], img[window], img[sun] = (170, 60, 40), (240, 240, 250), (250, 220, 60)
    path = tmp_path_factory.mktemp("in") / "house.png"
    path.write_bytes(encode(img))
    return path


@pytest.fixture(scope="module")
def pixels(photo) -> np.ndarray:
    return np.asarray(Image.open(photo).convert("RGB"))


@pytest.fixture
def page(browser, app, request):
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    pg.shots = Shots(request.node.name)
    pg.goto(app[0])
    pg.wait_for_selector("#upload")
    yield pg
    context.close()


# ---- what a person does, and what they see ---------------------------------------------------------
class Shots:
    """Numbered screenshots of one test, at desktop and phone size, into test-artifacts/browser/."""

    def __init__(self, test_name: str):
        self.prefix = re.sub(r"[^A-Za-z0-9_.-]+", "-", test_name).strip("-")
        self.n = 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(self, page, step: str) -> None:
        self.n += 1
        original = page.viewport_size
        for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
            page.set_viewport_size(size)
            settle(page)
            width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= width[1], f"{step}: the page scrolls sideways at {label} size ({width})"
            hidden = page.evaluate("""() => { const g = document.querySelector('#gallery .grid-wrap');
                return g ? g.scrollWidth - g.clientWidth : 0; }""")
            assert hidden <= 1, f"{step}: {hidden} px of thumbnails hidden sideways at {label} size"
            page.screenshot(path=str(ARTIFACTS / f"{self.prefix}-{self.n:02d}-{step}-{label}.png"), full_page=True)
        page.set_viewport_size(original)
        settle(page)


def settle(page) -> None:
    """Let the layout catch up (two animation frames)."""
    page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")


def composite_src(page) -> str | None:
    img = page.locator("#composite img")
    return img.first.get_attribute("src") if img.count() else None


def updating(page, action) -> None:
    """Do `action`, then wait until the composite shows a new picture, fully loaded."""
    before = composite_src(page)
    action()
    page.wait_for_function(
        """(before) => { const img = document.querySelector('#composite img');
            return img && img.src && img.src !== before && img.complete && img.naturalWidth > 0; }""",
        arg=before,
    )


def upload(page, path: Path, image_id: str | None = None) -> None:
    if image_id:
        page.locator("#custom_id textarea, #custom_id input").first.fill(image_id)
    updating(page, lambda: page.locator("#upload input[type=file]").set_input_files(str(path)))


def click_pixel(page, tx: int, ty: int, *, changes: bool = True) -> None:
    """Click (or tap, on a touch screen) image pixel (tx, ty) of the displayed composite (and, unless
    `changes` is False, wait for the new picture)."""
    img = page.locator("#composite img")
    img.scroll_into_view_if_needed()
    box = img.bounding_box()
    nw, nh = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    r = min(box["width"] / nw, box["height"] / nh, 1)
    x = box["x"] + (box["width"] - nw * r) / 2 + (tx + 0.5) * r
    y = box["y"] + (box["height"] - nh * r) / 2 + (ty + 0.5) * r
    touch = page.evaluate("navigator.maxTouchPoints > 0")  # a phone context: tap as a finger does
    act = lambda: page.touchscreen.tap(x, y) if touch else page.mouse.click(x, y)  # noqa: E731
    updating(page, act) if changes else act()


def shown_pixel(page, x: int, y: int) -> np.ndarray:
    """The displayed composite's pixel, read back from the <img> through a canvas."""
    rgba = page.evaluate(
        """([x, y]) => { const img = document.querySelector('#composite img');
            const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext('2d'); g.drawImage(img, 0, 0);
            return Array.from(g.getImageData(x, y, 1, 1).data); }""",
        [x, y],
    )
    return np.array(rgba[:3])


def blend(rgba, under) -> np.ndarray:
    """Source-over of one RGBA colour on an RGB pixel (the app's composite)."""
    a = rgba[3] / 255
    return np.array(rgba[:3]) * a + np.asarray(under, float) * (1 - a)


def assert_close(actual, expected, tol: float = 2) -> None:
    actual, expected = np.asarray(actual, float), np.asarray(expected, float)
    assert np.all(np.abs(actual - expected) <= tol), f"pixel {actual} is not {np.round(expected)} (±{tol})"


def selection(page) -> str:
    return page.locator("#selection").inner_text()


def painted_ids(page) -> list[int]:
    """The mask column of the "Painted masks" table, top to bottom."""
    cells = page.locator("#painted [role=gridcell][data-col='0']")
    return [int(t) for t in cells.all_inner_texts()]


def set_color(page, hex_color: str) -> None:
    page.locator("#color button.dialog-button").click()
    field = page.locator("#color .input-wrap input").first

    def type_it():
        field.fill(hex_color)
        field.press("Enter")

    updating(page, type_it)
    page.keyboard.press("Escape")
    page.locator("#title").click()  # close the picker's dialog, as a person clicks away


def set_opacity(page, value: float) -> None:
    field = page.locator("#opacity input[type=number]")

    def type_it():
        field.fill(f"{value}")
        field.press("Tab")  # the slider reports a release when its number field loses focus

    updating(page, type_it)


def open_panel(page, title: str) -> None:
    page.get_by_text(title, exact=True).first.click()


def toast_texts(page) -> str:
    return " ".join(page.locator(".toast-body").all_inner_texts())


def download(page, button: str) -> bytes:
    """Click a download button, then the file link that appears, as a person does; the file's bytes."""
    link = page.locator("#downloads a").first
    before = link.get_attribute("href") if link.count() else None
    page.locator(f"#{button}").click()
    page.wait_for_function(
        """(before) => { const a = document.querySelector('#downloads a');
            return a && a.getAttribute('href') && a.getAttribute('href') !== before; }""",
        arg=before,
    )
    with page.expect_download() as info:
        page.locator("#downloads a").first.click()
    return Path(info.value.path()).read_bytes()


def ids_of(studio, image_id: str) -> dict[str, int]:
    """The stored mask ids of the house, window, sun and lower half (from the app's own index)."""
    at = {
        name: studio.mask_at_point(image_id, x, y, EVERYONE)["candidates"]
        for name, (x, y) in {"window": WINDOW_PX, "sun": SUN_PX}.items()
    }
    window, house, lower = at["window"]
    return {"window": window, "house": house, "lower": lower, "sun": at["sun"][0]}


# ---- the scenarios ---------------------------------------------------------------------------------
def test_1_upload_shows_masks_and_names_engine(browser, tmp_path):
    """First visit: upload comes first; a real photo → masks in the gallery, the engine named once."""
    from skimage import data as samples

    photo = tmp_path / "coffee.png"
    photo.write_bytes(encode(samples.coffee()))
    with running_app(tmp_path / "data") as (url, studio, _):
        context = browser.new_context(viewport=PHONE, has_touch=True)
        context.set_default_timeout(60_000)
        page = context.new_page()
        page.shots = Shots("test_1_upload")
        page.goto(url)
        page.wait_for_selector("#upload input[type=file]", state="attached")
        engine = studio.segmenter.engine
        page.wait_for_function("(e) => document.querySelector('#status')?.innerText.includes(e)", arg=engine)
        # A new visitor on a phone sees the upload control on the first screen, and no empty picture box.
        up = page.locator("#upload").bounding_box()
        assert up["y"] + up["height"] <= PHONE["height"], "the upload control is below the first screen"
        assert page.locator("#composite img").count() == 0
        page.shots.take(page, "first-visit")

        upload(page, photo)
        page.wait_for_selector("#gallery .thumbnail-item")
        status = page.locator("#status").inner_text()
        assert status.count(engine) == 1, status
        stored = studio.list_images(EVERYONE)
        assert len(stored) == 1 and stored[0]["mask_count"] > 1
        assert page.locator("#gallery .thumbnail-item").count() == stored[0]["mask_count"]
        assert f"{stored[0]['mask_count']} masks from the {engine}" in toast_texts(page)
        page.shots.take(page, "uploaded")
        context.close()


@pytest.mark.parametrize("viewport", ["desktop", "phone"])
def test_2_click_selects_then_steps_to_larger(browser, app, photo, pixels, viewport, request):
    """A click selects and paints the smallest mask under it; the same spot again → the next larger one."""
    url, studio = app
    phone = viewport == "phone"
    context = browser.new_context(viewport=PHONE if phone else DESKTOP, has_touch=phone)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.shots = Shots(request.node.name)
    page.goto(url)
    upload(page, photo, f"click-{viewport}")
    ids = ids_of(studio, f"click-{viewport}")
    page.shots.take(page, "uploaded")

    click_pixel(page, *WINDOW_PX)
    assert f"Selected mask {ids['window']}" in selection(page)
    assert_close(shown_pixel(page, *WINDOW_PX), blend(DEFAULT_RGBA, pixels[WINDOW_PX[1], WINDOW_PX[0]]))
    assert_close(shown_pixel(page, *HOUSE_PX), pixels[HOUSE_PX[1], HOUSE_PX[0]])
    assert painted_ids(page) == [ids["window"]]
    page.shots.take(page, "window-selected")

    click_pixel(page, *WINDOW_PX)
    assert f"Selected mask {ids['house']}" in selection(page)
    assert_close(shown_pixel(page, *HOUSE_PX), blend(DEFAULT_RGBA, pixels[HOUSE_PX[1], HOUSE_PX[0]]))
    assert painted_ids(page) == [ids["house"]]  # the window's paint was taken back
    page.shots.take(page, "house-selected")

    # A finger does not land on the same pixel twice: a tap a few pixels off still steps up (house → lower half).
    click_pixel(page, WINDOW_PX[0] + 3, WINDOW_PX[1] + 2)
    assert f"Selected mask {ids['lower']}" in selection(page)
    assert painted_ids(page) == [ids["lower"]]

    # Where no mask is, the page says so.
    click_pixel(page, *SKY_PX, changes=False)  # the picture stays as it is
    page.wait_for_function("() => document.body.innerText.includes('No mask covers pixel')")
    page.shots.take(page, "no-mask-here")
    context.close()


def test_3_colour_and_opacity_blend(page, app, photo, pixels):
    """The picked colour at the picked opacity, read back from the displayed picture, is the exact blend."""
    upload(page, photo, "colour")
    # At 1280×800 the whole picture is on the first screen, next to the colour and opacity controls.
    pic, opacity = page.locator("#composite img").bounding_box(), page.locator("#opacity").bounding_box()
    assert pic["y"] + pic["height"] <= DESKTOP["height"], pic
    assert opacity["y"] + opacity["height"] <= DESKTOP["height"], opacity
    click_pixel(page, *WINDOW_PX)
    set_color(page, "#2060c0")
    assert_close(shown_pixel(page, *WINDOW_PX), blend((0x20, 0x60, 0xC0, 153), pixels[WINDOW_PX[1], WINDOW_PX[0]]))
    page.shots.take(page, "colour-picked")

    set_opacity(page, 0.25)
    expected = blend((0x20, 0x60, 0xC0, round(0.25 * 255)), pixels[WINDOW_PX[1], WINDOW_PX[0]])
    assert_close(shown_pixel(page, *WINDOW_PX), expected)
    assert "#2060c0" in page.locator("#painted").inner_text()
    page.shots.take(page, "opacity-set")

    # Dragging the slider, as a person does: the picture follows when the thumb is let go.
    track = page.locator("#opacity input[type=range]")
    box = track.bounding_box()
    y = box["y"] + box["height"] / 2

    def drag():
        page.mouse.move(box["x"] + 0.25 * box["width"], y)
        page.mouse.down()
        page.mouse.move(box["x"] + 0.8 * box["width"], y, steps=8)
        page.mouse.up()

    updating(page, drag)
    dragged = float(page.locator("#opacity input[type=number]").input_value())
    assert 0.6 < dragged < 1.0, dragged
    expected = blend((0x20, 0x60, 0xC0, round(dragged * 255)), pixels[WINDOW_PX[1], WINDOW_PX[0]])
    assert_close(shown_pixel(page, *WINDOW_PX), expected)


def test_4_gallery_select_undo_remove_clear(page, app, photo, pixels):
    """A thumbnail selects and paints its mask; remove, undo and clear do what they say."""
    studio = app[1]
    upload(page, photo, "gallery")
    ids = ids_of(studio, "gallery")
    # Thumbnails come largest mask first.
    page.wait_for_selector("#gallery .thumbnail-item")
    captions = page.locator("#gallery .thumbnail-item").all_inner_texts()
    shown = [int(re.search(r"#(\d+)", c).group(1)) for c in captions]
    areas = {m["id"]: m["area"] for m in studio.info("gallery", EVERYONE)["available_masks"]}
    assert shown == sorted(areas, key=lambda m: -areas[m]), (shown, areas)
    sun, window = SUN_PX, WINDOW_PX
    thumb = page.locator("#gallery .thumbnail-item").filter(has_text=re.compile(rf"#{ids['sun']}\b"))
    updating(page, lambda: thumb.first.click())
    assert f"Selected mask {ids['sun']}" in selection(page)
    assert_close(shown_pixel(page, *sun), blend(DEFAULT_RGBA, pixels[sun[1], sun[0]]))
    page.shots.take(page, "thumbnail-selected")

    click_pixel(page, *window)
    assert painted_ids(page) == [ids["sun"], ids["window"]]
    updating(page, lambda: page.locator("#remove").click())
    assert painted_ids(page) == [ids["sun"]]
    assert_close(shown_pixel(page, *window), pixels[window[1], window[0]])
    assert "Click the picture" in selection(page)  # removed means unselected: a colour change won't repaint it
    page.shots.take(page, "window-removed")

    updating(page, lambda: page.locator("#undo").click())
    assert painted_ids(page) == [ids["sun"], ids["window"]]
    assert_close(shown_pixel(page, *window), blend(DEFAULT_RGBA, pixels[window[1], window[0]]))
    page.shots.take(page, "undone")

    updating(page, lambda: page.locator("#clear").click())
    assert painted_ids(page) == []
    for x, y in (sun, window):
        assert_close(shown_pixel(page, x, y), pixels[y, x])
    page.shots.take(page, "cleared")

    # Nothing painted: "Remove selected" says what to do, and the picture is not covered by an error badge.
    page.locator("#remove").click()
    page.wait_for_function("() => document.body.innerText.includes('Select a painted mask first')")
    shown_errors = ", ".join(f"#{i} .wrap:not(.hide) .error" for i in ("composite", "selection", "painted"))
    assert page.locator(shown_errors).count() == 0
    click_pixel(page, *window)
    assert painted_ids(page) == [ids["window"]]
    page.shots.take(page, "remove-refused-then-usable")


def test_5_transparent_background_download_has_alpha(page, app, photo, pixels):
    """Background "transparent": a checkerboard on screen; the PNG download is transparent outside the paint."""
    upload(page, photo, "transparent")
    updating(page, lambda: page.locator("#background").get_by_text("transparent", exact=True).click())
    # Unpainted pixels are shown on the light-grey checkerboard (white and #cccccc cells).
    sky = shown_pixel(page, *SKY_PX)
    assert min(np.abs(sky - 255).max(), np.abs(sky - 204).max()) <= 2, sky
    click_pixel(page, *WINDOW_PX)
    open_panel(page, "Download")
    png = np.asarray(Image.open(io.BytesIO(download(page, "dl_png"))))
    assert page.locator("#downloads a").first.get_attribute("download") == "transparent-composite.png"
    page.shots.take(page, "transparent-downloaded")

    window = house_masks(H, W)[1]
    assert png.shape == (H, W, 4)
    assert np.all(png[..., 3][~window] == 0)
    assert np.all(png[..., 3][window] == DEFAULT_RGBA[3])
    np.testing.assert_array_equal(png[WINDOW_PX[1], WINDOW_PX[0]], DEFAULT_RGBA)


def test_6_downloads_open(page, app, photo, pixels, tmp_path):
    """The composite PNG (full size, exact) and both COCO JSONs download; pycocotools loads them."""
    from pycocotools.coco import COCO

    studio = app[1]
    upload(page, photo, "downloads")
    ids = ids_of(studio, "downloads")
    click_pixel(page, *WINDOW_PX)
    click_pixel(page, *SUN_PX)
    open_panel(page, "Download")

    png = np.asarray(Image.open(io.BytesIO(download(page, "dl_png"))).convert("RGB"))
    assert png.shape == (H, W, 3)
    assert_close(png[WINDOW_PX[1], WINDOW_PX[0]], blend(DEFAULT_RGBA, pixels[WINDOW_PX[1], WINDOW_PX[0]]), 1)
    np.testing.assert_array_equal(png[SKY_PX[1], SKY_PX[0]], pixels[SKY_PX[1], SKY_PX[0]])

    masks = dict(zip(("house", "window", "sun", "lower"), house_masks(H, W)))
    for button, expected in (("dl_coco_painted", {"window", "sun"}), ("dl_coco_all", set(masks))):
        path = tmp_path / f"{button}.json"
        path.write_bytes(download(page, button))
        coco = COCO(str(path))
        anns = coco.loadAnns(coco.getAnnIds())
        assert sorted(a["mask_id"] for a in anns) == sorted(ids[name] for name in expected)
        for ann in anns:
            name = next(n for n in expected if ids[n] == ann["mask_id"])
            np.testing.assert_array_equal(coco.annToMask(ann).astype(bool), masks[name])
        assert json.loads(path.read_text())["images"][0]["width"] == W
    exported = json.loads((tmp_path / "dl_coco_painted.json").read_text())["annotations"]
    painted = {a["mask_id"]: a.get("color") for a in exported}
    assert painted == {ids["window"]: list(DEFAULT_RGBA), ids["sun"]: list(DEFAULT_RGBA)}
    page.shots.take(page, "downloaded")


def test_7_reload_reopen_then_delete(page, app, photo):
    """After a reload the image is reopened from the library; deleted, it leaves the library and the API."""
    from gradio_client import Client

    url = app[0]
    upload(page, photo, "reopen-me")
    page.reload()
    page.wait_for_selector("#upload input[type=file]", state="attached")
    assert page.locator("#composite img").count() == 0
    open_panel(page, "Library")
    choose_in_library(page, "reopen-me")
    page.shots.take(page, "library-after-reload")

    updating(page, lambda: page.locator("#open").click())
    assert page.locator("#gallery .thumbnail-item").count() == 4
    page.shots.take(page, "reopened")

    page.locator("#delete").click()
    page.wait_for_selector("#confirm_delete_row", state="visible")
    assert "reopen-me" in page.locator("#confirm_delete_text").inner_text()
    assert page.locator("#composite img").count() == 1  # nothing is deleted before the person confirms
    page.shots.take(page, "asked-to-confirm")
    page.locator("#confirm_delete").click()
    page.wait_for_selector("#composite img", state="detached")
    page.wait_for_selector("#confirm_delete_row", state="hidden")
    page.locator("#library input").click()
    options = page.locator("[role=option], ul.options li")
    assert not any("reopen-me" in t for t in options.all_inner_texts())
    page.keyboard.press("Escape")
    page.shots.take(page, "deleted")
    listed = Client(url, verbose=False).predict(api_name="/list_images")
    assert "reopen-me" not in [row["image_id"] for row in listed]


def test_7b_the_library_shows_thumbnails_and_a_click_opens_one(page, app, photo, tmp_path):
    """The Library shows each stored image as a thumbnail with its name, size and date; clicking one opens it."""
    other, house = tmp_path / "sunset.png", tmp_path / "my-house.png"
    Image.fromarray(np.full((60, 90, 3), (250, 140, 30), np.uint8)).save(other)
    house.write_bytes(photo.read_bytes())
    upload(page, house, "thumb-house")
    upload(page, other, "thumb-sunset")
    open_panel(page, "Library")
    items = page.locator("#library_gallery .thumbnail-item")
    items.first.wait_for()
    captions = " | ".join(page.locator("#library_gallery").all_inner_texts())
    assert captions.index("sunset.png") < captions.index("my-house.png")  # newest first
    assert "sunset.png · 90×60 · 20" in captions  # name, size, date
    sunset = items.filter(has_text="sunset.png").first.locator("img")
    rgb = np.asarray(Image.open(io.BytesIO(page.request.get(sunset.get_attribute("src")).body())).convert("RGB"))
    assert np.abs(rgb.reshape(-1, 3).mean(0) - (250, 140, 30)).max() < 4  # the picture's own thumbnail
    page.shots.take(page, "library-thumbnails")

    updating(page, lambda: items.filter(has_text="my-house.png").first.click())
    page.wait_for_function("() => document.querySelector('#library input').value.includes('thumb-house')")
    assert page.locator("#gallery .thumbnail-item").count() == 4  # the house's masks, not the sunset's
    page.shots.take(page, "opened-from-thumbnail")


def choose_in_library(page, image_id: str) -> None:
    page.locator("#library input").click()
    page.locator("[role=option], ul.options li").filter(has_text=image_id).first.click()
    page.wait_for_function("(id) => document.querySelector('#library input').value.includes(id)", arg=image_id)


def test_8_non_image_upload_is_refused_readably(page, app, photo, tmp_path):
    """A text file, and a file that only pretends to be a PNG: a readable message; the page still works."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.locator("#upload input[type=file]").set_input_files(str(notes))
    page.wait_for_function("() => document.body.innerText.includes('Only image allowed')")
    assert "notes.txt" in toast_texts(page)
    page.shots.take(page, "text-file-refused")

    fake = tmp_path / "fake.png"
    fake.write_bytes(b"this is not a PNG at all" * 10)
    clear_upload(page)
    page.locator("#upload input[type=file]").set_input_files(str(fake))
    page.wait_for_function("() => document.body.innerText.includes('not an image Mask Studio can read')")
    page.shots.take(page, "fake-png-refused")

    clear_upload(page)
    upload(page, photo, "after-errors")
    click_pixel(page, *WINDOW_PX)
    assert "Selected mask" in selection(page)
    page.shots.take(page, "still-usable")


def clear_upload(page) -> None:
    """The upload box after an error still shows it: clear it with its ✕, as a person does."""
    if page.locator("#upload input[type=file]").count() == 0:
        page.locator("#upload button[aria-label='Clear']").first.click()
        page.wait_for_selector("#upload input[type=file]", state="attached")


def test_9_two_browsers_do_not_share_selection_or_colours(browser, app, photo, pixels, request):
    """Two people on the same image at once: each sees only their own selection and colours."""
    url, studio = app
    pages = []
    for who in ("a", "b"):
        context = browser.new_context(viewport=DESKTOP)
        context.set_default_timeout(TIMEOUT_MS)
        pg = context.new_page()
        pg.shots = Shots(f"{request.node.name}-{who}")
        pg.goto(url)
        pages.append(pg)
    a, b = pages
    upload(a, photo, "shared")
    ids = ids_of(studio, "shared")
    b.reload()  # B's library was listed before A's upload: a reload lists it
    b.wait_for_selector("#upload input[type=file]", state="attached")
    open_panel(b, "Library")
    choose_in_library(b, "shared")
    updating(b, lambda: b.locator("#open").click())

    click_pixel(a, *WINDOW_PX)
    click_pixel(b, *SUN_PX)
    # B's click, just now, did not reach A's picture (A's sun unpainted, A's window painted).
    assert_close(shown_pixel(a, *SUN_PX), pixels[SUN_PX[1], SUN_PX[0]])
    assert_close(shown_pixel(a, *WINDOW_PX), blend(DEFAULT_RGBA, pixels[WINDOW_PX[1], WINDOW_PX[0]]))
    set_color(b, "#00a000")
    set_color(a, "#0000ff")

    assert f"Selected mask {ids['window']}" in selection(a)
    assert f"Selected mask {ids['sun']}" in selection(b)
    assert painted_ids(a) == [ids["window"]] and painted_ids(b) == [ids["sun"]]
    wx, wy = WINDOW_PX
    sx, sy = SUN_PX
    assert_close(shown_pixel(a, wx, wy), blend((0, 0, 255, 153), pixels[wy, wx]))
    assert_close(shown_pixel(a, sx, sy), pixels[sy, sx])
    assert_close(shown_pixel(b, sx, sy), blend((0, 0xA0, 0, 153), pixels[sy, sx]))
    assert_close(shown_pixel(b, wx, wy), pixels[wy, wx])
    for pg in pages:
        pg.shots.take(pg, "side-by-side")
        pg.context.close()


def test_10_add_object_with_points(page, app, photo, pixels):
    """Object mode (issue 3): include/exclude clicks preview the object; Keep stores it (or selects the mask
    it already is)."""
    url, studio = app
    upload(page, photo, "objects")
    before = studio.info("objects", EVERYONE)["mask_count"]
    page.locator("#click_mode").get_by_text("Add object: include").click()
    page.locator("#keep_object").wait_for(state="visible")
    click_pixel(page, *WINDOW_PX)  # an include point in the window → the window is previewed in cyan
    assert_close(shown_pixel(page, *WINDOW_PX), (40, 220, 60), tol=12)  # the green include marker
    preview = shown_pixel(page, 170, 280)  # in the window, away from the marker
    assert preview[2] > 200 and preview[0] < 160, f"no cyan preview over the window: {preview}"
    assert_close(shown_pixel(page, *SKY_PX), pixels[SKY_PX[1], SKY_PX[0]], tol=6)  # no preview (noisy sky)
    page.shots.take(page, "object-preview")
    updating(page, lambda: page.locator("#keep_object").click())
    # This test segmenter answers prompts with one of its own masks (the window): kept, it is that mask,
    # selected and painted, not a copy.
    window = studio.mask_at_point("objects", *WINDOW_PX, EVERYONE)["mask_id"]
    assert studio.info("objects", EVERYONE)["mask_count"] == before
    assert f"Selected mask {window}" in selection(page)
    assert f"That object is mask {window} already" in toast_texts(page)
    assert painted_ids(page) == [window]
    assert_close(shown_pixel(page, *WINDOW_PX), blend(DEFAULT_RGBA, pixels[WINDOW_PX[1], WINDOW_PX[0]]))
    page.shots.take(page, "object-kept")
    # Back to selecting: the Keep / Reset buttons go away.
    page.locator("#click_mode").get_by_text("Select masks").click()
    page.locator("#keep_object").wait_for(state="hidden")


def test_11_a_big_rotated_phone_photo_is_clicked_where_it_is_seen(page, app, tmp_path):
    """A 2048×1536 phone JPEG stored sideways (EXIF orientation 6): shown upright, downscaled for display,
    and a click on the window selects the window, whose pixels on screen take the colour."""
    h, w = 1536, 2048
    upright = make_photo(h, w)
    house, window, sun, _ = house_masks(h, w)
    upright[house], upright[window], upright[sun] = (170, 60, 40), (240, 240, 250), (250, 220, 60)
    sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # as the camera stored it
    exif = sideways.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to show"
    path = tmp_path / "phone.jpg"
    sideways.save(path, format="JPEG", quality=95, exif=exif)
    upload(page, path, "phone-photo")
    studio = app[1]
    natural = page.locator("#composite img").evaluate("i => [i.naturalWidth, i.naturalHeight]")
    assert natural == [1024, 768]  # upright, and a display copy rather than the full 2048 px
    x, y = int(0.30 * w), int(0.62 * h)  # inside the window, in the photo's own (full-size) pixels
    expected = studio.mask_at_point("phone-photo", x, y, EVERYONE)["mask_id"]
    click_pixel(page, x // 2, y // 2)  # the display copy's pixel the person sees there
    assert f"Selected mask {expected}" in selection(page)
    assert studio.load("phone-photo", EVERYONE).index.mask(expected).sum() == window.sum()
    assert_close(shown_pixel(page, x // 2, y // 2), blend(DEFAULT_RGBA, (240, 240, 250)), tol=4)
    page.shots.take(page, "phone-photo-window")


# ---- fixes found when tried as a new user would (issue 10) ------------------------------------------
def highlighted_thumbnails(page) -> list[str]:
    return page.locator("#gallery .thumbnail-item.selected").all_inner_texts()


def test_12_undo_moves_the_highlight_and_remove_acts_on_what_is_shown_selected(page, app, photo, pixels):
    """After Undo the undone mask's thumbnail is no longer highlighted; "Remove selected" straight after Undo
    removes the mask the page shows as selected (it refused)."""
    studio = app[1]
    upload(page, photo, "undo-highlight")
    ids = ids_of(studio, "undo-highlight")
    thumb = page.locator("#gallery .thumbnail-item").filter(has_text=re.compile(rf"#{ids['sun']}\b"))
    updating(page, lambda: thumb.first.click())
    assert [t.strip() for t in highlighted_thumbnails(page)] == [f"#{ids['sun']}"]
    updating(page, lambda: page.locator("#undo").click())
    assert painted_ids(page) == []
    page.wait_for_function("() => !document.querySelector('#gallery .thumbnail-item.selected')")
    page.shots.take(page, "undone-no-highlight")

    click_pixel(page, *WINDOW_PX)  # a click on the picture: its mask's thumbnail is highlighted just after
    page.wait_for_function(
        "(label) => [...document.querySelectorAll('#gallery .thumbnail-item.selected')]"
        ".map(t => t.innerText.trim()).join() === label",
        arg=f"#{ids['window']}",
    )
    updating(page, lambda: thumb.first.click())
    assert painted_ids(page) == [ids["window"], ids["sun"]]
    updating(page, lambda: page.locator("#undo").click())
    assert painted_ids(page) == [ids["window"]]
    assert f"Selected mask {ids['window']}" in selection(page)  # the selection before the undone step
    assert [t.strip() for t in highlighted_thumbnails(page)] == [f"#{ids['window']}"]
    updating(page, lambda: page.locator("#remove").click())
    assert painted_ids(page) == []
    assert "Select a painted mask first" not in toast_texts(page)
    assert_close(shown_pixel(page, *WINDOW_PX), pixels[WINDOW_PX[1], WINDOW_PX[0]])


def test_13_the_download_panel_forgets_the_previous_image(page, app, photo):
    """After another image is opened (or uploaded), the Download panel no longer offers the previous file."""
    upload(page, photo, "first-download")
    open_panel(page, "Download")
    download(page, "dl_png")
    assert page.locator("#downloads a").first.get_attribute("download") == "first-download-composite.png"
    page.locator("#gallery .thumbnail-item").first.click()  # a highlighted thumbnail of the first image
    page.wait_for_selector("#gallery .thumbnail-item.selected")
    other = photo.with_name("other.png")
    other.write_bytes(encode(make_photo(H, W, seed=7)))  # another photo: its own composite and thumbnails
    upload(page, other, "second-download")
    page.wait_for_selector("#downloads a", state="detached")
    page.wait_for_function("() => !document.querySelector('#gallery .thumbnail-item.selected')")
    page.shots.take(page, "download-panel-emptied")
    open_panel(page, "Library")
    download(page, "dl_png")
    choose_in_library(page, "first-download")
    updating(page, lambda: page.locator("#open").click())
    page.wait_for_selector("#downloads a", state="detached")


def test_14_the_selection_line_is_in_view_after_a_click_at_desktop_size(page, app, tmp_path):
    """At 1280×800 with a square photo, the line that says what the next click does is on screen right after
    a click, without scrolling (under the picture it was below the fold)."""
    path = tmp_path / "square.png"
    path.write_bytes(encode(make_photo(640, 640)))
    upload(page, path, "square")
    img = page.locator("#composite img")
    box = img.bounding_box()
    nw, nh = img.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    r = min(box["width"] / nw, box["height"] / nh, 1)
    tx, ty = 0.30 * nw, 0.62 * nh  # the window, in the upper part of the picture on screen
    x, y = box["x"] + (box["width"] - nw * r) / 2 + tx * r, box["y"] + (box["height"] - nh * r) / 2 + ty * r
    assert y < DESKTOP["height"], "the window is not on the first screen"
    updating(page, lambda: page.mouse.click(x, y))
    assert page.evaluate("window.scrollY") == 0
    rect = page.locator("#selection").evaluate(
        "e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; }"
    )
    assert 0 <= rect[0] and rect[1] <= DESKTOP["height"], f"the selection line is at {rect}, off the first screen"
    assert "click again for the next larger" in selection(page)
    page.screenshot(path=str(ARTIFACTS / "test_14-square-photo-clicked-desktop-first-screen.png"))


def test_15_on_a_phone_the_upload_notice_leaves_the_title_and_status_visible(browser, app, photo, request):
    """At 390 px the notice after an upload covered the title and the status line for seconds."""
    context = browser.new_context(viewport=PHONE, has_touch=True)
    context.set_default_timeout(TIMEOUT_MS)
    pg = context.new_page()
    pg.goto(app[0])
    pg.wait_for_function("document.querySelector('#status')?.innerText.includes('Engine')")
    upload(pg, photo, "phone-toast")
    toast = pg.locator(".toast-body").first
    toast.wait_for(state="visible")
    pg.screenshot(path=str(ARTIFACTS / "test_15-phone-upload-notice.png"))

    def rect(locator):
        return locator.evaluate("e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; }")

    top, bottom = rect(toast)
    for covered in ("#title", "#status"):
        above, below = rect(pg.locator(covered))
        assert bottom <= above or top >= below, f"the notice ({top}-{bottom}) covers {covered} ({above}-{below})"
    context.close()


def test_16_hf_login_off_a_space_starts_without_a_button_and_says_why(browser, tmp_path, monkeypatch, caplog):
    """HF_LOGIN=true off a Space on a machine not logged in to Hugging Face crashed at start-up (Gradio's local
    sign-in stand-in needs the machine's login). It starts, shows no button, and says why."""
    import logging

    for name in ("SYSTEM", "SPACE_ID", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.WARNING, logger="mask_studio")
    with running_app(tmp_path / "data", RecordsSegmenter(house_masks), hf_login=True) as (url, *_):
        context = browser.new_context(viewport=DESKTOP)
        pg = context.new_page()
        pg.goto(url)
        pg.wait_for_function("document.querySelector('#status')?.innerText.includes('Sign-in')")
        assert pg.locator("#login").count() == 0
        assert "not a Space" in pg.locator("#status").inner_text()
        context.close()
    assert any("HF_LOGIN is on, but this is not a Space" in r.getMessage() for r in caplog.records)
