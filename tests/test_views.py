"""The page's texts, tables and choices, from plain values (no Gradio, no studio)."""

from pathlib import Path

import pytest

import views
from errors import InvalidInput
from page_state import PageState


@pytest.mark.parametrize(
    ("color", "opacity", "expected"),
    [
        ("#ff0000", 0.5, (255, 0, 0, 128)),
        (None, None, (0xFF, 0x3B, 0x30, 153)),
        ("rgba(0, 128, 255, 0.2)", 1, (0, 128, 255, 255)),  # the slider, not the text, gives the opacity
        ("#2060c0", 1.5, (0x20, 0x60, 0xC0, 255)),
        ("#2060c0", -1, (0x20, 0x60, 0xC0, 0)),
    ],
)
def test_colour_controls_become_rgba(color, opacity, expected):
    assert views.rgba_from_controls(color, opacity) == expected


def test_a_colour_the_picker_cannot_make_is_refused_readably():
    with pytest.raises(InvalidInput, match="Colour for mask 0"):
        views.rgba_from_controls("blue-ish", 0.5)
    with pytest.raises(InvalidInput, match="^Pick a colour to paint with.$"):
        views.rgba_from_controls("original", 0.5)


def test_selection_line_says_what_to_do_next():
    state = PageState(image_id="house", owner="local")
    assert views.selection_text(PageState()) == "Upload a photo, or open one from the library."
    assert views.selection_text(state) == "Click the picture (or a thumbnail) to select a mask."
    clicked = state.clicked((5, 5), (1, 0, 3), (255, 0, 0, 255), 1).clicked((5, 5), (1, 0, 3), (255, 0, 0, 255), 1)
    assert views.selection_text(clicked, 1536, (128, 96)) == (
        "**Selected mask 0** · 1,536 px (12.5 % of the image) · 2 of 3 masks under this point: "
        "click again for the next larger"
    )
    from_thumbnail = state.with_order([7]).picked_thumbnail(0, (255, 0, 0, 255))
    assert views.selection_text(from_thumbnail, 96, (128, 96)) == "**Selected mask 7** · 96 px (0.8 % of the image)"
    points = state.previewing(((1, 1, 1), (2, 2, 0), (3, 3, 1)), {})
    assert views.selection_text(points) == (
        "**New object** (cyan) from 2 include and 1 exclude point(s): click to refine, "
        "**Keep object** to store it as a mask."
    )


def test_painted_rows_and_gallery_items_and_library_choices():
    assert views.painted_rows([(3, (255, 59, 48, 153)), (1, "original")]) == [
        [3, "#ff3b30", 153],
        [1, "original pixels", 255],
    ]
    assert views.gallery_items([(4, "thumb-a"), (2, "thumb-b")]) == ([("thumb-a", "#4"), ("thumb-b", "#2")], [4, 2])
    rows = [
        {"image_id": "house", "width": 128, "height": 96, "mask_count": 4},
        {
            "image_id": "img_1",
            "width": 8,
            "height": 6,
            "mask_count": 1,
            "name": "garden.jpg",
            "created_at": "2026-01-02T03:04:05+00:00",
        },
        {
            "image_id": "old",
            "width": 8,
            "height": 6,
            "mask_count": 0,
            "name": "old",
            "created_at": "2025-12-31T23:59:00+00:00",
        },
    ]
    assert views.library_choices(rows) == [
        ("house · 128×96 · 4 masks", "house"),
        ("garden.jpg (img_1) · 8×6 · 2026-01-02 03:04 · 1 mask", "img_1"),
        ("old · 8×6 · 2025-12-31 23:59 · 0 masks", "old"),
    ]
    assert views.library_choices([]) == []


def test_status_line_names_the_engine_once_and_warns_where_something_is_wrong():
    data = Path("data")
    assert views.status_text("built-in segmenter", (True, "built-in segmenter ready"), data, (True, "off")) == (
        "**Engine:** built-in segmenter ready · **Storage:** SQLite and images in `data` · **S3:** off"
    )
    text = views.status_text("SAM2 service", (False, "unreachable"), data, (False, "bucket missing"), "no token")
    assert text.startswith("**Engine:** ⚠️ SAM2 service: unreachable")
    assert "**S3:** ⚠️ bucket missing" in text and text.endswith("**Sign-in:** ⚠️ no token")


def test_status_line_says_why_the_preferred_engine_is_not_running():
    note = "MobileSAM not used: no weights. Using the built-in classical segmenter instead"
    text = views.status_text(
        "built-in segmenter", (True, "built-in segmenter ready"), Path("data"), (True, "off"), None, note
    )
    assert text.startswith(f"**Engine:** built-in segmenter ready ({note})")


def test_notices():
    assert (
        views.upload_notice({"mask_count": 4, "engine": "built-in segmenter"}) == "4 masks from the built-in segmenter."
    )
    assert views.kept_notice({"mask_id": 5, "existing": True}) == "That object is mask 5 already: it is selected."
    assert views.kept_notice({"mask_id": 6, "existing": False}) == "Stored the object as mask 6."
    assert views.delete_question("house", 4) == "Delete **house** and its 4 masks? This cannot be undone."
    assert views.s3_warning(None, 4) is None and views.s3_warning({"failed": 0}, 4) is None
    assert views.s3_warning({"failed": 2, "error": "timeout"}, 4).startswith(
        "2 of 4 masks could not be uploaded to S3 (timeout). They are kept here"
    )


def test_the_pass_progress_line_says_how_far_and_how_it_ended():
    running = {"running": True, "fraction": 0.42, "stored": 30, "error": None, "mask_count": 37}
    assert views.pass_progress(running) == "Finding masks… 37 so far (42 %)"
    assert views.pass_progress({**running, "running": False}) == "Found all masks: 37 in all."
    failed = {**running, "running": False, "error": "The model ran out of memory."}
    assert views.pass_progress(failed) == (
        "⚠️ Finding masks failed: The model ran out of memory. The picture still works: click it to make masks."
    )
    assert views.pass_progress(None) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [({"image": {}, "caption": "#12"}, 12), ({"caption": "12"}, None), ({"caption": "#x"}, None), (None, None)],
)
def test_a_thumbnail_caption_names_its_mask(value, expected):
    assert views.caption_mask_id(value) == expected


def test_the_upload_notice_says_the_picture_is_ready_while_masks_are_found():
    summary = {"mask_count": 0, "engine": "MobileSAM (in-process, CPU)", "pending": True}
    assert views.upload_notice(summary) == (
        "Ready: click the picture. The MobileSAM (in-process, CPU) is finding its masks meanwhile."
    )
    assert (
        views.upload_notice({**summary, "mask_count": 5, "pending": False})
        == "5 masks from the MobileSAM (in-process, CPU)."
    )
