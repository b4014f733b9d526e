"""Two anonymous browsers under AUTH_MODE=keys: each keeps its own library (a key in its local storage)."""

from access import EVERYONE
from app_server import free_port, running_app
from chromium import launch, require_browser
from helpers import RecordsSegmenter, encode, house_masks, make_photo


def library_after_load(page) -> str:
    """What the library dropdown shows once the page has loaded (its first choice, or empty)."""
    page.wait_for_selector("#upload input[type=file]", state="attached")
    page.wait_for_function("document.querySelector('#status').innerText.includes('Engine')")  # on_load ran
    if not page.locator("#library input").count():
        page.locator("#library_panel button.label-wrap").click()  # the closed accordion renders nothing
    return page.locator("#library input").input_value()


def upload_as(page, photo, image_id: str) -> None:
    """Upload the photo under that id and wait until it is shown."""
    page.locator("#custom_id input").fill(image_id)
    page.locator("#upload input[type=file]").set_input_files(str(photo))
    page.wait_for_function(
        "document.querySelector('#selection').innerText.includes('Click the picture')", timeout=30_000
    )


def test_two_anonymous_browsers_do_not_see_each_others_images(tmp_path):
    sync_api = require_browser()
    photo = tmp_path / "house.png"
    photo.write_bytes(encode(make_photo(48, 64)))
    with running_app(tmp_path / "data", RecordsSegmenter(house_masks), auth_mode="keys") as (url, studio, _):
        with sync_api.sync_playwright() as p:
            browser = launch(p)
            one, two = browser.new_context(), browser.new_context()
            a, b = one.new_page(), two.new_page()
            for page in (a, b):
                page.goto(url)
                assert library_after_load(page) == ""
            upload_as(a, photo, "from-browser-one")

            owners = {r.owner for r in studio.db.list_images(EVERYONE)}
            assert len(owners) == 1 and next(iter(owners)).startswith("anon:")

            assert "(from-browser-one)" in library_after_load(a)
            b.reload()
            assert library_after_load(b) == ""
            a.reload()  # the same browser, later: its key is in local storage, its library is back
            assert "(from-browser-one)" in library_after_load(a)
            browser.close()


def test_a_browser_keeps_its_library_across_a_server_restart(tmp_path):
    sync_api = require_browser()
    photo = tmp_path / "house.png"
    photo.write_bytes(encode(make_photo(48, 64)))
    port = free_port()
    with sync_api.sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context()
        page = context.new_page()
        with running_app(tmp_path / "data", RecordsSegmenter(house_masks), auth_mode="keys", port=port) as (url, *_):
            page.goto(url)
            assert library_after_load(page) == ""
            upload_as(page, photo, "before-restart")
        # The old tab goes (once, navigating it to the restarted server hung for 30 s: it was still trying to
        # reach the stopped one). The same data folder and address after a restart: the browser's stored key
        # (local storage, kept by the browser context) still opens its library in a new tab.
        page.close()
        page = context.new_page()
        with running_app(tmp_path / "data", RecordsSegmenter(house_masks), auth_mode="keys", port=port) as (url, *_):
            page.goto(url)
            assert "(before-restart)" in library_after_load(page)
        browser.close()
