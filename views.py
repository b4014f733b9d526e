"""What the page shows, as text and rows: pure functions from values to Markdown, table rows and choices.

No Gradio and no studio here: the handlers look things up and pass plain values in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import render
from errors import InvalidInput
from page_state import PageState, Rgba

DEFAULT_COLOR = "#ff3b30"
DEFAULT_OPACITY = 0.6


def rgba_from_controls(color: str | None, opacity: float | None) -> Rgba:
    """Colour picker value (#rrggbb, or rgb()/rgba() text) plus the opacity slider → (r, g, b, a)."""
    parsed = render.parse_color(color or DEFAULT_COLOR, 0)
    if isinstance(parsed, str):  # "original": a word the API takes, not a colour the picker can paint with
        raise InvalidInput("Pick a colour to paint with.")
    r, g, b, _ = parsed
    a = DEFAULT_OPACITY if opacity is None else float(opacity)
    return (r, g, b, int(round(max(0.0, min(1.0, a)) * 255)))


def selection_text(state: PageState, area: int | None = None, size: tuple[int, int] | None = None) -> str:
    """The line that says what is selected and what the next click does; `area` is the selected mask's pixel
    count and `size` the image's (width, height)."""
    if not state.image_id:
        return "Upload a photo, or open one from the library."
    if state.points:
        n_in = sum(1 for p in state.points if p[2] == 1)
        n_out = len(state.points) - n_in
        return (
            f"**New object** (cyan) from {n_in} include and {n_out} exclude point(s): "
            "click to refine, **Keep object** to store it as a mask."
        )
    sel = state.selected
    if sel is None or area is None or size is None:
        return "Click the picture (or a thumbnail) to select a mask."
    pct = 100 * area / (size[0] * size[1])
    where = ""
    if sel in state.candidates and len(state.candidates) > 1:
        pos = state.candidates.index(sel) + 1
        where = f" · {pos} of {len(state.candidates)} masks under this point: click again for the next larger"
    return f"**Selected mask {sel}** · {area:,} px ({pct:.1f} % of the image){where}"


def painted_rows(steps: Iterable[tuple[int, Any]]) -> list[list]:
    """The "Painted masks" table: mask id, colour as #rrggbb (or "original pixels"), alpha."""
    rows = []
    for mid, color in steps:
        if isinstance(color, str):
            rows.append([mid, "original pixels", 255])
        else:
            r, g, b, a = color
            rows.append([mid, f"#{r:02x}{g:02x}{b:02x}", a])
    return rows


def gallery_items(cutouts: Iterable[tuple[int, Any]]) -> tuple[list[tuple[Any, str]], list[int]]:
    """(mask id, thumbnail) pairs → the gallery's (thumbnail, "#id") items and its mask ids in that order."""
    items, order = [], []
    for mid, thumb in cutouts:
        items.append((thumb, f"#{mid}"))
        order.append(mid)
    return items, order


def library_choices(rows: Iterable[dict]) -> list[tuple[str, str]]:
    """Stored images (newest first, as listed) as (label, image id) dropdown choices: the file's name (and the
    id when it differs), size, date and mask count."""
    return [(library_label(r), r["image_id"]) for r in rows]


def library_gallery(rows: Sequence[dict], files: Sequence[str | None]) -> tuple[list[tuple[str, str]], list[str]]:
    """The Library's thumbnails: (file, label) items for the rows that have a file, and their image ids in order."""
    items, ids = [], []
    for row, file in zip(rows, files):
        if file is not None:
            items.append((file, library_caption(row)))
            ids.append(row["image_id"])
    return items, ids


def library_caption(row: dict) -> str:
    """A thumbnail's caption, short enough for its cell: `photo.jpg · 640×480 · 2026-01-01` (the id without a name)."""
    created = str(row.get("created_at") or "")[:10]
    return " · ".join(
        part for part in (row.get("name") or row["image_id"], f"{row['width']}×{row['height']}", created) if part
    )


def library_label(row: dict) -> str:
    """`photo.jpg (img_…) · 640×480 · 2026-01-01 12:00 · 12 masks`; an image without a name shows its id."""
    name = row.get("name")
    title = row["image_id"] if not name or name == row["image_id"] else f"{name} ({row['image_id']})"
    created = str(row.get("created_at") or "")
    when = f" · {created[:16].replace('T', ' ')}" if created else ""
    masks = f"{row['mask_count']} mask{'' if row['mask_count'] == 1 else 's'}"
    return f"{title} · {row['width']}×{row['height']}{when} · {masks}"


def status_text(
    engine: str,
    health: tuple[bool, str],
    data_dir: Path,
    s3: tuple[bool, str],
    sign_in_note: str | None = None,
    engine_note: str | None = None,
) -> str:
    """The status line: the engine's health (and why a preferred engine is not the one running), where
    things are stored, S3, and why there is no sign-in."""
    ok, sentence = health
    # Health sentences usually name the engine already: say it once.
    engine_text = sentence if engine in sentence else f"{engine}: {sentence}"
    if engine_note:
        engine_text += f" ({engine_note})"
    warn = "" if ok else "⚠️ "
    s3_ok, s3_text = s3
    text = (
        f"**Engine:** {warn}{engine_text} · **Storage:** SQLite and images in `{data_dir}`"
        f" · **S3:** {'' if s3_ok else '⚠️ '}{s3_text}"
    )
    return text + (f" · **Sign-in:** ⚠️ {sign_in_note}" if sign_in_note else "")


def delete_question(image_id: str, mask_count: int) -> str:
    return f"Delete **{image_id}** and its {mask_count} masks? This cannot be undone."


def upload_notice(summary: dict) -> str:
    if summary.get("pending"):
        return f"Ready: click the picture. The {summary['engine']} is finding its masks meanwhile."
    return f"{summary['mask_count']} masks from the {summary['engine']}."


def pass_progress(status: dict | None) -> str:
    """The line over the gallery while the automatic pass of the open image runs, and how it ended."""
    if status is None:
        return ""
    if status["error"]:
        return f"⚠️ Finding masks failed: {status['error']} The picture still works: click it to make masks."
    if status["running"]:
        return f"Finding masks… {status['mask_count']} so far ({100 * status['fraction']:.0f} %)"
    return f"Found all masks: {status['mask_count']} in all."


def caption_mask_id(value: object) -> int | None:
    """The mask id in a gallery thumbnail's caption ("#12"), or None."""
    caption = value.get("caption") if isinstance(value, dict) else None
    if isinstance(caption, str) and caption.startswith("#") and caption[1:].isdigit():
        return int(caption[1:])
    return None


def kept_notice(added: dict) -> str:
    if added["existing"]:
        return f"That object is mask {added['mask_id']} already: it is selected."
    return f"Stored the object as mask {added['mask_id']}."


def s3_warning(s3: dict | None, total: int) -> str | None:
    """The warning when some mask uploads to S3 failed (the masks themselves are kept), else None."""
    if not (s3 and s3.get("failed")):
        return None
    return (
        f"{s3['failed']} of {total} masks could not be uploaded to S3 ({s3.get('error', 'see the log')}). "
        "They are kept here and will be uploaded again later (at the next start, or with /retry_uploads)."
    )
