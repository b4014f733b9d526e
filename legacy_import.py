"""Importing the old backend's store (its JSON_DB_PATH, `data.json`): every image with its id, created_at and masks.

The file is one JSON object keyed by image id; each entry is what the old `GET /images/{id}/info` answered:
`original_image_b64` (a data URL), `created_at`, `width`, `height` and `available_masks`, a list of
`{id, area, bbox, mask_b64}` (a PNG, 0 outside and 255 inside). It is read one entry at a time
(json_entries.py), so a file of several GB needs the memory of its largest entry, not of the file.

Each image is stored as an upload is: the original's blob first, then its row and its masks in ONE
transaction; a refused or failed insert takes the blob back, and a crash in between leaves only a blob no
row refers to, which the server's start-up (Studio.cleanup_orphans) removes. Masks keep their old ids,
areas and bounding boxes, and their exact pixels. An id already stored is skipped (so running the import
again imports nothing twice); an entry that cannot be imported (a missing field, an image that does not
decode, a mask of another size) is refused with its reason, and the rest goes on. With S3 configured,
masks are uploaded as after an upload; what fails stays pending for the server's retry.
"""

from __future__ import annotations

import datetime as dt
import io
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, UnidentifiedImageError

import image_cache
import imaging
import masks as rle
from access import LOCAL_OWNER, check_image_id, meanings, stored_image_id
from errors import Conflict, InvalidInput, MaskStudioError
from json_entries import JSONFormatError, entries
from publish import MaskPublisher
from s3_store import S3BlobStore
from settings import Settings
from storage import BlobStore, Database, ImageRow, LocalBlobStore, MaskRow

IMPORTED_ENGINE = "old backend (imported)"
# Room for an entry's JSON text: the original in base64 at the upload limit, plus its masks' PNGs.
MASKS_ROOM = 256 * 1024 * 1024


class EntryRefused(Exception):
    "One entry of the file cannot be imported (the message says why; the import goes on)"


@dataclass(frozen=True)
class OldImage:
    """One entry of the old store, checked and decoded: what will be stored."""

    image_id: str  # the id in the old backend (also the stored image's name)
    created_at: str
    rgb: np.ndarray
    masks: list[tuple[int, str, int, list[int]]]  # (mask id, COCO RLE counts, area, bbox [x, y, w, h])


# ---- one entry, checked (pure) ------------------------------------------------------------------
def parse_entry(image_id: str, entry: object, settings: Settings) -> OldImage:
    """An entry of data.json as an OldImage, or EntryRefused saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise EntryRefused(f"the entry is {type(entry).__name__}, not an object with the image's fields")
    missing = [f for f in ("original_image_b64", "created_at", "available_masks") if f not in entry]
    if missing:
        many = len(missing) > 1
        raise EntryRefused(f"the field{'s' if many else ''} {', '.join(missing)} {'are' if many else 'is'} missing")
    try:
        data = imaging.decode_base64(entry["original_image_b64"])
        rgb = imaging.load_image(data, max_pixels=settings.max_image_pixels, max_bytes=settings.max_upload_bytes)
    except InvalidInput as exc:
        raise EntryRefused(f"original_image_b64: {exc.message}") from exc
    h, w = rgb.shape[:2]
    said = (entry.get("width", w), entry.get("height", h))
    if said != (w, h):
        raise EntryRefused(f"width and height say {said[0]}×{said[1]}, but the image is {w}×{h}")
    old_masks = entry["available_masks"]
    if not isinstance(old_masks, list):
        raise EntryRefused("available_masks is not a list")
    masks, seen = [], set()
    for i, m in enumerate(old_masks):
        mask_id, counts, area, bbox = _old_mask(i, m, h, w)
        if mask_id in seen:
            raise EntryRefused(f"mask id {mask_id} appears twice")
        seen.add(mask_id)
        masks.append((mask_id, counts, area, bbox))
    return OldImage(image_id, _created_at(entry["created_at"]), rgb, masks)


def _old_mask(i: int, m: object, h: int, w: int) -> tuple[int, str, int, list[int]]:
    """The i-th of available_masks: its id, its pixels as RLE counts, its area and bbox (computed when absent)."""
    if not isinstance(m, dict) or "id" not in m or "mask_b64" not in m:
        raise EntryRefused(f"available_masks[{i}] needs an 'id' and a 'mask_b64'")
    mask_id = m["id"]
    if not isinstance(mask_id, int) or isinstance(mask_id, bool) or not 0 <= mask_id < 2**31:
        raise EntryRefused(f"available_masks[{i}] has the id {mask_id!r}; mask ids are whole numbers from 0")
    pixels = _mask_pixels(mask_id, m["mask_b64"], h, w)
    area = m["area"] if "area" in m else int(np.count_nonzero(pixels))
    if not isinstance(area, int) or isinstance(area, bool) or not 0 <= area <= h * w:
        raise EntryRefused(f"mask {mask_id} has the area {area!r}, not a pixel count of a {w}×{h} image")
    bbox = m["bbox"] if "bbox" in m else rle.bbox_of(pixels)
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise EntryRefused(f"mask {mask_id} has the bbox {bbox!r}, not [x, y, width, height]")
    return mask_id, rle.encode(pixels)["counts"], area, [int(round(v)) for v in bbox]


def _mask_pixels(mask_id: int, b64: object, h: int, w: int) -> np.ndarray:
    """A mask's PNG as a boolean h×w array (its size checked before its pixels are decoded)."""
    try:
        data = imaging.decode_base64(b64 if isinstance(b64, str) else "", field=f"mask {mask_id}'s mask_b64")
        with Image.open(io.BytesIO(data)) as im:
            if im.size != (w, h):
                raise EntryRefused(f"mask {mask_id} is {im.size[0]}×{im.size[1]}, but the image is {w}×{h}")
            return np.asarray(im.convert("L")) > 127
    except InvalidInput as exc:
        raise EntryRefused(exc.message) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise EntryRefused(f"mask {mask_id}'s mask_b64 is not an image PIL can read ({exc})") from exc


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _created_at(value: object) -> str:
    """The old created_at in our form (UTC, seconds); a time without a zone is taken as UTC."""
    try:
        when = dt.datetime.fromisoformat(value.strip() if isinstance(value, str) else "")
    except ValueError:
        raise EntryRefused(f"created_at {value!r} is not an ISO date and time") from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).isoformat(timespec="seconds")


# ---- the summary ----------------------------------------------------------------------------------
@dataclass
class Summary:
    """What an import did: images imported, skipped (their id exists), refused (with why), and S3's part."""

    imported: int = 0
    skipped: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    s3_failed: int = 0
    stopped: str | None = None  # why the file could not be read to its end, or None

    @property
    def exit_code(self) -> int:
        """0: every entry imported or already there; 1: some refused; 2: the file could not be read to its end."""
        return 2 if self.stopped else 1 if self.refused else 0

    def text(self) -> str:
        lines = [
            f"Imported {self.imported} image(s); skipped {len(self.skipped)} whose id is already stored; "
            f"refused {len(self.refused)}."
        ]
        lines += [f"  refused {image_id}: {why}" for image_id, why in self.refused]
        if self.s3_failed:
            lines.append(
                f"{self.s3_failed} mask upload(s) to S3 failed: they stay pending and are uploaded when the server "
                "starts (or with /retry_uploads)."
            )
        if self.stopped:
            lines.append(f"Stopped before the end of the file: {self.stopped}")
        return "\n".join(lines)


# ---- storing ------------------------------------------------------------------------------------------
class Importer:
    """Stores checked entries under one owner, as an upload would: blob first, then one transaction."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        owner: str = LOCAL_OWNER,
        publisher: MaskPublisher | None = None,
        *,
        upload_now: bool = True,
    ):
        """`publisher` (S3 configured): masks get object keys; `upload_now` False leaves them pending (S3 is
        down: the server's retry uploads them) instead of waiting on S3 for every image."""
        self.settings, self.db, self.blobs, self.owner = settings, db, blobs, owner
        self.publisher, self.upload_now = publisher, upload_now

    def taken(self, image_id: str) -> bool:
        """Whether the owner already has an image by this id (the rule an upload with that id follows)."""
        stored = stored_image_id(image_id, self.owner)
        return self.db.image_exists(stored) or any(
            self.db.image_exists(i, self.owner) for i in meanings(image_id, self.owner)
        )

    def run(self, items: Iterator[tuple[str, object]], summary: Summary, on_entry: Callable[[], None]) -> None:
        """Import each (old id, entry); `on_entry` after each one (the progress bar)."""
        for key, entry in items:
            try:
                image_id = check_image_id(key)
                if self.taken(image_id):
                    summary.skipped.append(image_id)
                else:
                    summary.s3_failed += self.store(parse_entry(image_id, entry, self.settings))
                    summary.imported += 1
            except InvalidInput as exc:  # the id itself
                summary.refused.append((key[:80], exc.message))
            except EntryRefused as exc:
                summary.refused.append((key, str(exc)))
            except Conflict:  # stored meanwhile by someone else (the server, another import)
                summary.skipped.append(key)
            del entry  # the next entry is read with this one's memory already free
            on_entry()

    def store(self, old: OldImage) -> int:
        """Store one image; returns how many of its mask uploads to S3 failed (0 without S3)."""
        image_id = stored_image_id(old.image_id, self.owner)
        h, w = old.rgb.shape[:2]
        new_key = self.publisher.new_mask_key if self.publisher is not None else None
        rows = [
            MaskRow(
                image_id=image_id,
                mask_id=mask_id,
                counts=counts,
                area=area,
                bbox=bbox,
                predicted_iou=None,
                stability_score=None,
                point_coords=None,
                mask_url=None,
                s3_key=new_key() if new_key is not None else None,
                upload_state="pending" if new_key is not None else "none",
            )
            for mask_id, counts, area, bbox in old.masks
        ]
        row = ImageRow(
            id=image_id,
            owner=self.owner,
            width=w,
            height=h,
            created_at=old.created_at,
            engine=IMPORTED_ENGINE,
            mask_count=len(rows),
            blob_key=f"images/{image_id}-{secrets.token_hex(4)}.png",
            name=old.image_id,
        )
        self.blobs.put(row.blob_key, imaging.encode_png(old.rgb), "image/png")
        try:
            self.db.insert_image(row, rows)  # no per-owner quota: whoever runs the import decides
        except BaseException:
            self.blobs.delete(row.blob_key)
            raise
        if self.publisher is None or not self.upload_now or not rows:
            return 0
        index = image_cache.build(row, old.rgb, rows).index
        return int(self.publisher.publish_new(row.id, old.rgb, index, rows).get("failed", 0))


# ---- the progress bar (stderr) ---------------------------------------------------------------------------
class ProgressBar:
    """Bytes read of the file, and the counts so far: redrawn in place on a terminal, a line per 10 % in a log."""

    def __init__(self, out: TextIO, total: int, summary: Summary):
        self.out, self.total, self.summary = out, max(1, total), summary
        self.done = 0
        self.tty = out.isatty()
        self._last_draw = 0.0
        self._last_tenth = -1

    def read(self, n: int) -> None:
        self.done += n

    def draw(self, final: bool = False) -> None:
        fraction = min(1.0, self.done / self.total)
        now = time.monotonic()
        if self.tty and not final and now - self._last_draw < 0.1:
            return
        if not self.tty and not final and int(fraction * 10) == self._last_tenth:
            return
        self._last_draw, self._last_tenth = now, int(fraction * 10)
        s = self.summary
        bar = "#" * int(fraction * 30)
        line = (
            f"[{bar:<30}] {fraction:4.0%} {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB · "
            f"{s.imported} imported · {len(s.skipped)} skipped · {len(s.refused)} refused"
        )
        self.out.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        self.out.flush()


# ---- the command ------------------------------------------------------------------------------------------
def import_file(path: Path, importer: Importer, progress: TextIO | None = None) -> Summary:
    """Import every entry of the file at `path`; the summary says what happened (the file unreadable too)."""
    summary = Summary()
    try:
        with open(path, "rb") as f:
            bar = ProgressBar(progress or io.StringIO(), Path(path).stat().st_size, summary)
            limit = importer.settings.max_upload_bytes * 4 // 3 + MASKS_ROOM
            items = entries(f, max_entry_chars=limit, on_read=bar.read)
            try:
                importer.run(items, summary, bar.draw)
            finally:
                bar.draw(final=True)
    except FileNotFoundError:
        summary.stopped = f"there is no file {str(path)!r}."
    except IsADirectoryError:
        summary.stopped = f"{str(path)!r} is a folder, not the old backend's data.json."
    except JSONFormatError as exc:
        summary.stopped = str(exc)
    except OSError as exc:
        summary.stopped = f"{str(path)!r} could not be read ({exc.strerror})."
    return summary


def run_cli(
    path: str, owner: str | None, settings: Settings, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """`python app.py import-legacy PATH [--owner NAME]`: import into the configured storage, print the summary.
    Returns the exit code (Summary.exit_code)."""
    owner = LOCAL_OWNER if owner is None else owner.strip()
    if not owner:
        err.write("--owner needs a name (for example 'local', or an owner of APP_API_KEYS).\n")
        return 2
    try:
        s3 = S3BlobStore.from_settings(settings)
    except MaskStudioError as exc:
        err.write(f"S3 is configured but cannot be used: {exc.message}\n")
        return 2
    db = Database(settings.db_path)
    publisher = MaskPublisher(s3, db, settings) if s3 is not None else None
    upload_now = True
    if publisher is not None:
        upload_now, sentence = publisher.check()
        err.write(f"S3: {sentence}{'' if upload_now else ' (masks stay pending for the server to upload)'}\n")
    importer = Importer(settings, db, LocalBlobStore(settings.blob_dir), owner, publisher, upload_now=upload_now)
    err.write(f"Importing {path} for owner {owner!r} into {settings.data_dir}\n")
    try:
        summary = import_file(Path(path), importer, err)
    except KeyboardInterrupt:
        err.write("\nInterrupted: the images imported so far are kept; run the import again to go on.\n")
        return 130
    out.write(summary.text() + "\n")
    return summary.exit_code
