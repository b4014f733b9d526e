"""The Mask Studio service: what every UI event and API endpoint does, without any Gradio in it.

`Studio` ties the segmenter, the database, the blob store and the renderer together, checks every
input once at this edge, and keeps a small in-process cache of decoded images and their mask
indexes so that clicks and renders never touch the disk or decode a mask. Publishing to S3, when a
bucket is configured, is delegated to publish.MaskPublisher.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import imaging
import masks as rle
import render
from errors import Conflict, InvalidInput, LimitExceeded, NotFound, SegmentationRejected
from limits import RateLimiter, minutes_text
from publish import MaskPublisher
from s3_store import S3BlobStore
from segmenter import Progress, Segmenter
from sam2_responses import pick_for_prompt
from settings import Settings
from storage import (
    STORED_ID,
    BlobStore,
    Database,
    ImageRow,
    MaskRow,
    check_image_id,
    id_taken,
    new_image_id,
    no_such_image,
    shown_image_id,
    stored_image_id,
)

log = logging.getLogger("mask_studio")

DISPLAY_MAX_SIDE = 1024
CACHE_BUDGET_BYTES = 1_500_000_000
MAX_LIST = 1000
NO_OBJECT = "The segmenter found no object at those prompts."
MAX_VERSIONS = 100_000  # image versions remembered for the cache (then all reset at once, safely)


@dataclass
class Loaded:
    """An image ready for interaction: pixels, masks and indexes, full size and display size."""

    row: ImageRow
    rgb: np.ndarray
    masks: dict[int, MaskRow]
    index: render.MaskIndex
    display_rgb: np.ndarray
    display: render.MaskIndex
    thumbs: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.rgb.nbytes + self.display_rgb.nbytes + self.index.nbytes + self.display.nbytes

    def by_area(self) -> list[int]:
        """Mask ids, largest first (ties by id)."""
        return sorted(self.masks, key=lambda m: (-self.masks[m].area, m))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _fraction(progress: Progress | None, start: float, end: float) -> Progress | None:
    """A progress callback that maps 0..1 onto start..end of the caller's bar."""
    if progress is None:
        return None
    return lambda f, text: progress(start + (end - start) * max(0.0, min(1.0, f)), text)


def _shown(v: object) -> str:
    """What the caller sent, cut short: a message must not echo a megabyte back."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 60 else text[:57] + "..."


def check_point(x: object, y: object, width: int, height: int) -> tuple[int, int]:
    """Pixel coordinates as ints inside the image, or a message giving the image's size."""
    out = []
    for name, v in (("x", x), ("y", y)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidInput(f"{name} must be a number (a pixel coordinate), got {_shown(v)}.")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidInput(f"{name} must be a finite number, got {_shown(v)}.")
        out.append(int(math.floor(v)))
    px, py = out
    if not (0 <= px < width and 0 <= py < height):
        raise InvalidInput(
            f"Point ({x}, {y}) is outside the image, which is {width}×{height} pixels "
            f"(x from 0 to {width - 1}, y from 0 to {height - 1})."
        )
    return px, py


def check_mask_id(mask_id: object) -> int:
    if (
        isinstance(mask_id, bool)
        or not isinstance(mask_id, (int, float))
        or (isinstance(mask_id, float) and not mask_id.is_integer())
    ):
        raise InvalidInput(f"mask_id must be a whole number, got {_shown(mask_id)}.")
    return int(mask_id)


class Studio:
    def __init__(
        self,
        settings: Settings,
        segmenter: Segmenter,
        db: Database,
        blobs: BlobStore,
        s3: S3BlobStore | None = None,
        *,
        s3_error: str | None = None,
    ):
        self.settings = settings
        self.s3_error = s3_error  # S3 was configured but could not be set up (shown in the status line)
        self.segmenter = segmenter
        self.db = db
        self.blobs = blobs
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._versions: dict[str, int] = {}  # bumped when rows change: a build that saw older ones is not cached
        self._epoch = 0
        self.segment_limiter = RateLimiter(settings.segment_rate_limit)
        # No bucket, no publisher: masks then have no URL and the S3 endpoints say S3 is not configured.
        self.publisher = MaskPublisher(s3, db, settings, on_change=self._urls_changed) if s3 is not None else None

    @property
    def s3(self) -> S3BlobStore | None:
        """The bucket masks are published to, or None when S3 is not configured."""
        return self.publisher.s3 if self.publisher is not None else None

    @property
    def s3_status(self) -> tuple[bool, str]:
        """The start-up check's result for the status line: (True, "off") without a bucket."""
        if self.publisher is not None:
            return self.publisher.status
        return (False, self.s3_error) if self.s3_error else (True, "off")

    # ---- abuse limits ------------------------------------------------------------------------
    def allow_segmentation(self, owner: str, address: str | None = None) -> None:
        """Count one segmentation for the owner and the client address, or raise LimitExceeded.

        Every path that calls the segmenter (ingest, and prompt segmentation) calls this first.
        """
        keys = [f"owner:{owner}"] + ([f"addr:{address}"] if address else [])
        refused = self.segment_limiter.hit(keys)
        if refused is None:
            return
        key, wait_s = refused
        n = self.segment_limiter.limit
        who = "You have used your" if key.startswith("owner:") else "Your network address has used its"
        raise LimitExceeded(
            f"{who} {n} segmentations for this hour (SEGMENT_RATE_LIMIT); "
            f"the next one is possible in {minutes_text(wait_s)}."
        )

    def check_room(self, owner: str, count: int | None = None) -> None:
        """Raise LimitExceeded when the owner already stores MAX_IMAGES_PER_OWNER images."""
        limit = self.settings.max_images_per_owner
        if limit <= 0:
            return
        count = self.db.count_images(owner) if count is None else count
        if count < limit:
            return
        later = ""
        if self.settings.retention_days > 0:
            later = f", or wait until your oldest image expires (RETENTION_DAYS = {self.settings.retention_days:g})"
        raise LimitExceeded(
            f"You have stored {count} images, the most allowed (MAX_IMAGES_PER_OWNER = {limit}); "
            f"delete one in the library (or with /delete_image) to make room{later}."
        )

    # ---- ingest ----------------------------------------------------------------------------
    def generate_and_store(
        self,
        data: bytes,
        *,
        image_id: str | None = None,
        owner: str = "local",
        progress: Progress | None = None,
        address: str | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """Decode, segment, store (one transaction) and index an image; returns the API summary.

        `address` is the client's network address: segmentations are limited per owner and per address.
        `cancel`, set when the person has left, stops a segmentation still running (nothing is stored).
        """
        say = progress or (lambda f, t: None)

        def automatic(rgb: np.ndarray) -> list[dict]:
            h, w = rgb.shape[:2]
            say(0.05, f"Segmenting {w}×{h} with the {self.segmenter.engine}")
            return self.segmenter.generate(rgb, progress=_fraction(progress, 0.05, 0.75), cancel=cancel)

        return self._ingest(data, image_id, owner, address, automatic, say)

    def _ingest(
        self,
        data: bytes,
        image_id: str | None,
        owner: str,
        address: str | None,
        records_for: Callable[[np.ndarray], list[dict]],
        say: Progress,
        empty: str | None = None,
    ) -> dict:
        """The one ingest path: checks, segmentation, blob + one DB transaction, index, S3 uploads.

        `empty`: the refusal when the segmenter's masks are all empty (nothing is stored then)."""
        self.check_room(owner)  # before segmenting: a full library must not cost a segmentation
        if image_id is not None and image_id != "":
            wanted = check_image_id(image_id)
            image_id = stored_image_id(wanted, owner)  # each owner's ids are their own
            if self.db.image_exists(image_id):
                raise id_taken(wanted)
        else:
            image_id = new_image_id()
        say(0.02, "Reading the image")
        rgb = imaging.load_image(
            data, max_pixels=self.settings.max_image_pixels, max_bytes=self.settings.max_upload_bytes
        )
        h, w = rgb.shape[:2]
        self.allow_segmentation(owner, address)  # counted when attempted, whatever the outcome
        mask_rows = self._mask_rows(image_id, records_for(rgb), (h, w))
        if empty is not None and not mask_rows:
            raise SegmentationRejected(empty)
        say(0.78, f"Storing {len(mask_rows)} masks")
        row = ImageRow(
            id=image_id,
            owner=owner,
            width=w,
            height=h,
            created_at=_now(),
            engine=self.segmenter.engine,
            mask_count=len(mask_rows),
            blob_key=f"images/{image_id}-{secrets.token_hex(4)}.png",
        )
        self.blobs.put(row.blob_key, imaging.encode_png(rgb), "image/png")
        try:
            self.db.insert_image(row, mask_rows, max_per_owner=self.settings.max_images_per_owner)
        except LimitExceeded:
            # Another upload of the same owner committed first: the quota is checked atomically there.
            self.blobs.delete(row.blob_key)
            self.check_room(owner, max(self.db.count_images(owner), self.settings.max_images_per_owner))
            raise
        except Conflict:  # the same id, taken by a concurrent upload of the same owner
            self.blobs.delete(row.blob_key)
            raise id_taken(shown_image_id(image_id, owner)) from None
        except BaseException:
            self.blobs.delete(row.blob_key)
            raise
        say(0.82, "Indexing masks")
        loaded = self._build(row, rgb, mask_rows)
        self._remember(loaded)
        s3 = None
        if self.publisher is not None:
            say(0.85, f"Uploading {len(mask_rows)} masks to S3")
            s3 = self.publisher.publish_new(row.id, rgb, loaded.index, mask_rows, _fraction(say, 0.85, 1.0))
        say(1.0, "Done")
        return {
            "message": f"Stored {len(mask_rows)} masks for image {shown_image_id(image_id, owner)}.",
            "image_id": shown_image_id(image_id, owner),
            "mask_count": len(mask_rows),
            "image_dimensions": {"width": w, "height": h},
            "mask_ids": [m.mask_id for m in mask_rows],
            "mask_urls": (
                self.publisher.mask_urls(image_id, [m.mask_id for m in mask_rows])
                if self.publisher is not None
                else [None] * len(mask_rows)
            ),
            "engine": row.engine,
            "s3": s3,
        }

    def _mask_rows(self, image_id: str, records: list[dict], shape: tuple[int, int]) -> list[MaskRow]:
        """Validate the segmenter's records and number them largest first."""
        h, w = shape
        parsed = []
        for i, rec in enumerate(records):
            try:
                seg = rec["segmentation"]
                size = [int(s) for s in seg["size"]]
                counts = seg["counts"]
            except (KeyError, TypeError, ValueError):
                raise SegmentationRejected(f"Mask {i} from the segmenter has no usable 'segmentation'.") from None
            if size != [h, w]:
                raise SegmentationRejected(
                    f"Mask {i} from the segmenter is {size[1]}×{size[0]}, but the image is {w}×{h}."
                )
            runs = rle.string_to_counts(counts) if isinstance(counts, str) else [int(c) for c in counts]
            if sum(runs) != h * w:
                raise SegmentationRejected(f"Mask {i} from the segmenter has a corrupt RLE.")
            area = rle.area_of_counts(runs)
            if area == 0:
                continue
            counts_str = counts if isinstance(counts, str) else rle.counts_to_string(runs)
            parsed.append((area, i, counts_str, rec))
        parsed.sort(key=lambda p: (-p[0], p[1]))
        publisher = self.publisher
        rows = []
        for mask_id, (area, _, counts_str, rec) in enumerate(parsed[: self.settings.max_masks]):
            bbox = rec.get("bbox")
            if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
                bbox = rle.bbox_of(rle.decode({"size": [h, w], "counts": counts_str}))
            rows.append(
                MaskRow(
                    image_id=image_id,
                    mask_id=mask_id,
                    counts=counts_str,
                    area=int(area),
                    bbox=[int(round(float(v))) for v in bbox],
                    predicted_iou=_opt_float(rec.get("predicted_iou")),
                    stability_score=_opt_float(rec.get("stability_score")),
                    point_coords=rec.get("point_coords"),
                    mask_url=None,
                    s3_key=publisher.new_mask_key() if publisher is not None else None,
                    upload_state="pending" if publisher is not None else "none",
                )
            )
        return rows

    # ---- loading and caching -----------------------------------------------------------------
    def _build(self, row: ImageRow, rgb: np.ndarray, mask_rows: list[MaskRow]) -> Loaded:
        shape = (row.height, row.width)
        dshape = imaging.display_shape(shape, DISPLAY_MAX_SIDE)
        items = ((m.mask_id, rle.decode({"size": list(shape), "counts": m.counts})) for m in mask_rows)
        index, display = render.build_indexes(shape, items, dshape if dshape != shape else None)
        return Loaded(
            row=row,
            rgb=rgb,
            masks={m.mask_id: m for m in mask_rows},
            index=index,
            display_rgb=imaging.resize(rgb, dshape),
            display=display if display is not None else index,
        )

    def _version(self, image_id: str) -> tuple[int, int]:
        """The image's version (call under _cache_lock): it changes whenever its rows do (_bump)."""
        return self._epoch, self._versions.get(image_id, 0)

    def _remember(self, loaded: Loaded, version: tuple[int, int] | None = None) -> None:
        """Cache a built image; with `version` (read before its rows were), only if nothing changed since."""
        with self._cache_lock:
            if version is not None and self._version(loaded.row.id) != version:
                return  # its rows changed while it was built (e.g. an upload finished): the next load rebuilds
            self._cache[loaded.row.id] = loaded
            self._cache.move_to_end(loaded.row.id)
            total = sum(v.nbytes for v in self._cache.values())
            while len(self._cache) > 1 and total > CACHE_BUDGET_BYTES:
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes

    def _forget(self, image_id: str) -> None:
        """The image's rows changed: drop its cached copy, and any build under way from older rows."""
        with self._cache_lock:
            self._cache.pop(image_id, None)
            self._bump(image_id)

    def _urls_changed(self, image_id: str) -> None:
        """Only the S3 fields of some mask rows changed (the publisher): the cached copy takes the new rows
        in place; dropping it would cost a whole index rebuild at the next click after every upload."""
        with self._cache_lock:
            self._bump(image_id)  # a build under way read the older rows: it is not cached
            hit = self._cache.get(image_id)
            if hit is not None:
                rows = {m.mask_id: m for m in self.db.masks(image_id)}
                if rows.keys() == hit.masks.keys():
                    hit.masks = rows
                else:  # masks were added or the image deleted meanwhile: rebuilt at the next load
                    self._cache.pop(image_id, None)

    def _bump(self, image_id: str) -> None:
        """A new version of the image's rows (call under _cache_lock)."""
        if len(self._versions) >= MAX_VERSIONS:
            self._versions.clear()
            self._epoch += 1  # every version read before this one is now stale
        self._versions[image_id] = self._versions.get(image_id, 0) + 1

    def load(self, image_id: object, owner: str | None) -> Loaded:
        """The image, from the cache or rebuilt from storage; another owner's image is 'not found'."""
        row = self.find(image_id, owner)
        image_id = row.id
        with self._cache_lock:
            hit = self._cache.get(image_id)
            if hit is not None and hit.row.mask_count == row.mask_count:
                self._cache.move_to_end(image_id)
                return hit
            lock = self._load_locks.setdefault(image_id, threading.Lock())
        with lock:  # one build per image, however many requests arrive at once
            with self._cache_lock:
                hit = self._cache.get(image_id)
                version = self._version(image_id)
            if hit is not None and hit.row.mask_count == row.mask_count:
                return hit
            row = self.db.get_image(image_id, owner)  # read after the version, like the mask rows
            rgb = imaging.decode_png(self.blobs.get(row.blob_key))
            loaded = self._build(row, rgb, self.db.masks(image_id))
            self._remember(loaded, version)
            return loaded

    def find(self, image_id: object, owner: str | None) -> ImageRow:
        """The image row an owner means by `image_id` (their own id, or a generated one); someone else's
        image, or an id that could never exist, answers like any unknown id."""
        if not isinstance(image_id, str) or not image_id:
            raise InvalidInput("image_id is required (a string such as 'img_20260101_120000_ab12cd34').")
        if not STORED_ID.fullmatch(image_id):
            raise no_such_image(image_id)
        if owner is not None and "." not in image_id:
            try:
                return self.db.get_image(stored_image_id(image_id, owner), owner)
            except NotFound:
                pass  # a generated id (or one stored as given): looked up as it is
        return self.db.get_image(image_id, owner)

    # ---- reading -----------------------------------------------------------------------------
    def info(self, image_id: object, owner: str | None) -> dict:
        loaded = self.load(image_id, owner)
        r = loaded.row
        return {
            "image_id": shown_image_id(r.id, owner),
            "width": r.width,
            "height": r.height,
            "created_at": r.created_at,
            "engine": r.engine,
            "mask_count": r.mask_count,
            "available_masks": [self.describe_mask(m) for m in loaded.masks.values()],
        }

    def describe_mask(self, m: MaskRow) -> dict:
        return {
            "id": m.mask_id,
            "area": m.area,
            "bbox": m.bbox,
            "predicted_iou": m.predicted_iou,
            "stability_score": m.stability_score,
            "mask_url": self.mask_url(m),
        }

    def mask_url(self, m: MaskRow) -> str | None:
        """The mask's S3 URL (presigned ones are issued fresh each time), or None until it is uploaded."""
        return self.publisher.mask_url(m) if self.publisher is not None else None

    def list_images(self, owner: str | None) -> list[dict]:
        return [r.summary(owner) for r in self.db.list_images(owner, limit=MAX_LIST)]

    def mask_at_point(self, image_id: object, x: object, y: object, owner: str | None) -> dict:
        loaded = self.load(image_id, owner)
        px, py = check_point(x, y, loaded.row.width, loaded.row.height)
        candidates = loaded.index.masks_at(px, py)
        if not candidates:
            return {"mask_id": None, "candidates": [], "area": None, "bbox": None}
        m = loaded.masks[candidates[0]]
        return {"mask_id": m.mask_id, "candidates": candidates, "area": m.area, "bbox": m.bbox}

    def mask(self, loaded: Loaded, mask_id: object, owner: str | None = None) -> MaskRow:
        mid = check_mask_id(mask_id)
        if mid not in loaded.masks:
            raise NotFound(f"Image {shown_image_id(loaded.row.id, owner)} has no mask {mid} ({_id_range(loaded)}).")
        return loaded.masks[mid]

    def mask_png(self, image_id: object, mask_id: object, owner: str | None) -> bytes:
        loaded = self.load(image_id, owner)
        m = self.mask(loaded, mask_id, owner)
        return rle.to_png(loaded.index.mask(m.mask_id))

    def render(
        self,
        image_id: object,
        instructions: object,
        background: object = "original",
        owner: str | None = "local",
        *,
        display: bool = False,
    ) -> np.ndarray:
        """The composite at full size (or the display copy's size, for the UI)."""
        loaded = self.load(image_id, owner)
        steps = render.parse_instructions(instructions, loaded.index, shown_image_id(loaded.row.id, owner))
        bg = background if background not in (None, "") else "original"
        if display:
            return render.render(loaded.display_rgb, loaded.display, steps, bg)
        return render.render(loaded.rgb, loaded.index, steps, bg)

    def cutouts(self, image_id: str, owner: str | None) -> list[tuple[int, np.ndarray]]:
        """Gallery thumbnails (RGBA cut-outs), largest mask first; computed once per cached image."""
        loaded = self.load(image_id, owner)
        out = []
        for mid in loaded.by_area():
            thumb = loaded.thumbs.get(mid)
            if thumb is None:
                m = loaded.masks[mid]
                thumb = loaded.thumbs[mid] = render.cutout(loaded.rgb, loaded.index.mask(mid), m.bbox)
            out.append((mid, thumb))
        return out

    def export_coco(
        self,
        image_id: object,
        mask_ids: object = None,
        owner: str | None = "local",
        colors: dict[int, object] | None = None,
    ) -> dict:
        """A COCO dict (RLE segmentations) of all masks or of the listed ones."""
        loaded = self.load(image_id, owner)
        r = loaded.row
        shown = shown_image_id(r.id, owner)
        if mask_ids is None:
            chosen = sorted(loaded.masks)
        else:
            if not isinstance(mask_ids, (list, tuple)):
                raise InvalidInput("mask_ids must be a list of mask ids, or null for all masks.")
            chosen = list(dict.fromkeys(self.mask(loaded, m, owner).mask_id for m in mask_ids))
        annotations = []
        for mid in chosen:
            m = loaded.masks[mid]
            ann = {
                "id": mid + 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": {"size": [r.height, r.width], "counts": m.counts},
                "area": m.area,
                "bbox": m.bbox,
                "iscrowd": 1,
                "mask_id": mid,
                "predicted_iou": m.predicted_iou,
                "stability_score": m.stability_score,
                "point_coords": m.point_coords,
                "mask_url": self.mask_url(m),
            }
            if colors and mid in colors:
                ann["color"] = colors[mid]
            annotations.append(ann)
        return {
            "info": {"description": f"Mask Studio export of {shown}", "date_created": _now(), "engine": r.engine},
            "images": [{"id": 1, "width": r.width, "height": r.height, "file_name": f"{shown}.png", "image_id": shown}],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
        }

    # ---- deleting ----------------------------------------------------------------------------
    def delete(self, image_id: object, owner: str | None) -> dict:
        row = self.find(image_id, owner)
        self._delete_row(row)
        shown = shown_image_id(row.id, owner)
        return {"message": f"Image {shown} and its {row.mask_count} masks were deleted.", "image_id": shown}

    def _delete_row(self, row: ImageRow, s3_now: bool = True) -> None:
        # The row goes first, in one transaction that also records its S3 keys for deletion: a crash right
        # after it leaves only an orphaned blob, which cleanup_orphans removes at the next start, and
        # recorded keys, which the next retry or retention sweep deletes (as when S3 is unreachable now).
        # The other order could leave a listed image whose pixels are gone.
        s3_keys = self.db.delete_image(row.id)
        self._forget(row.id)
        self.blobs.delete(row.blob_key)
        if self.publisher is not None and s3_now:
            self.publisher.delete_now(row.id, s3_keys)

    def purge_expired(self, now: dt.datetime | None = None, *, flush_s3: bool = True) -> int:
        """Delete images older than RETENTION_DAYS (with their blobs); returns how many. Their S3 objects
        are deleted too (`flush_s3`), or left recorded for the next retry (at start-up: S3 may be slow)."""
        days = self.settings.retention_days
        if days <= 0:
            return 0
        now = now or dt.datetime.now(dt.timezone.utc)
        cutoff = (now - dt.timedelta(days=days)).isoformat(timespec="seconds")
        expired = self.db.images_older_than(cutoff)
        for row in expired:
            self._delete_row(row, s3_now=False)
        if expired:
            log.info("Retention: deleted %d image(s) older than %g days.", len(expired), days)
        if self.publisher is not None and flush_s3:  # these images' objects, and any an earlier delete missed
            self.publisher.flush_deletions()
        return len(expired)

    # ---- prompt segmentation (the old service's /segment) -----------------------------------------
    def segment_object(
        self,
        *,
        data: bytes | None = None,
        image_id: str | None = None,
        points: object = None,
        point_labels: object = None,
        box: object = None,
        owner: str = "local",
        address: str | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """One object's mask from points/box, stored with a new image (data) or a stored one (image_id)."""
        if data is not None:

            def prompted(rgb: np.ndarray) -> list[dict]:
                pts, labels, bx = check_prompt(points, point_labels, box, rgb.shape[1], rgb.shape[0])
                return [self.segmenter.segment(rgb, points=pts, point_labels=labels, box=bx, cancel=cancel)]

            out = self._ingest(data, image_id, owner, address, prompted, lambda f, t: None, empty=NO_OBJECT)
            return {
                "image_id": out["image_id"],
                "mask_id": out["mask_ids"][0],
                "mask_url": out["mask_urls"][0],
                "s3": out["s3"],
                "existing": False,
            }
        loaded = self.load(image_id, owner)
        pts, labels, bx = check_prompt(points, point_labels, box, loaded.row.width, loaded.row.height)
        self.allow_segmentation(owner, address)
        return self.add_object_mask(loaded, self._object_record(loaded, pts, labels, bx, cancel), owner)

    def preview_object(
        self,
        image_id: str,
        points: object,
        point_labels: object,
        owner: str | None,
        *,
        address: str | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """The object mask for prompts without storing it (the UI's live preview); a SAM2 record."""
        loaded = self.load(image_id, owner)
        pts, labels, _ = check_prompt(points, point_labels, None, loaded.row.width, loaded.row.height)
        # Each preview may be a paid call to a SAM2 service: counted per owner and per address.
        self.allow_segmentation(owner or "admin", address)
        return self._object_record(loaded, pts, labels, None, cancel)

    def _object_record(self, loaded: Loaded, points, labels, box, cancel: threading.Event | None) -> dict:
        """The segmenter's answer to prompts on a stored image; for a service that cannot take prompts
        (cog, replicate), picked among the masks it already made for this image: no second paid call."""
        if getattr(self.segmenter, "prompts_natively", True) or loaded.row.engine != self.segmenter.engine:
            return self.segmenter.segment(loaded.rgb, points=points, point_labels=labels, box=box, cancel=cancel)
        h, w = loaded.row.height, loaded.row.width
        stored = [
            {
                "segmentation": {"size": [h, w], "counts": m.counts},
                "area": m.area,
                "bbox": m.bbox,
                "predicted_iou": m.predicted_iou,
                "stability_score": m.stability_score,
            }
            for m in loaded.masks.values()
        ]
        chosen = pick_for_prompt(stored, points, labels, box)
        if chosen is None:
            raise SegmentationRejected(
                f"None of this image's {len(stored)} masks covers all include points without an exclude point "
                f"(the {self.segmenter.engine} cannot segment from prompts directly)."
            )
        return chosen

    def add_object_mask(self, loaded: Loaded, record: dict, owner: str | None = None) -> dict:
        """Store one more mask (from a prompt) with an image; S3 upload when configured. `owner`: who is
        told (their own image id; None: the stored id)."""
        r = loaded.row
        shown = shown_image_id(r.id, owner)
        rows = self._mask_rows(r.id, [record], (r.height, r.width))
        if not rows:
            raise SegmentationRejected(NO_OBJECT)
        same = next((m for m in loaded.masks.values() if m.counts == rows[0].counts), None)
        if same is not None:  # already one of this image's masks (e.g. picked from the hierarchy): no copy
            s3 = None if self.publisher is None else {"uploaded": 0, "failed": 0}
            return {
                "image_id": shown,
                "mask_id": same.mask_id,
                "mask_url": self.mask_url(same),
                "s3": s3,
                "existing": True,
            }
        m = self.db.add_mask(rows[0])
        self._forget(r.id)
        s3 = None
        if self.publisher is not None:
            s3 = self.publisher.summary(self.publisher.upload_masks(r.id, self.load(r.id, None).index, [m]))
            m = self.load(r.id, None).masks[m.mask_id]
        return {"image_id": shown, "mask_id": m.mask_id, "mask_url": self.mask_url(m), "s3": s3, "existing": False}

    # ---- health of the segmenter, never blocking a page ------------------------------------------
    def health(self, max_age_s: float = 30.0) -> tuple[bool, str]:
        """The segmenter's last known health; refreshed in the background when older than max_age_s."""
        now = time.monotonic()
        with self._cache_lock:
            last = getattr(self, "_health", None)
            stale = last is None or now - last[0] > max_age_s
            if stale and not getattr(self, "_health_running", False):
                self._health_running = True
                threading.Thread(target=self._refresh_health, daemon=True).start()
        return last[1] if last is not None else (True, f"{self.segmenter.engine}: checking…")

    def _refresh_health(self) -> None:
        try:
            result = self.segmenter.health()
        except Exception as exc:  # health() must never raise; if it does, show it, don't crash
            result = (False, f"health check failed ({type(exc).__name__})")
        with self._cache_lock:
            self._health = (time.monotonic(), result)
            self._health_running = False

    # ---- S3 (see publish.py) ------------------------------------------------------------------
    def check_s3(self) -> tuple[bool, str]:
        """Check the bucket once (at start-up): the sentence goes to the log and the status line."""
        return self.publisher.check() if self.publisher is not None else self.s3_status

    def retry_uploads(self, owner: str | None = None) -> dict:
        """Upload every mask (and original) still pending: after a failure, at start-up and on request."""
        if self.publisher is None:
            raise InvalidInput("S3 is not configured (set S3_BUCKET_NAME_STAGING): there is nothing to upload.")
        return self.publisher.retry(owner, lambda image_id: self.load(image_id, None))

    def share_render(self, image_id: object, instructions: object, background: object, owner: str | None) -> dict:
        """Upload a rendered composite to S3 and return its URL."""
        if self.publisher is None:
            raise InvalidInput("Sharing needs S3: set S3_BUCKET_NAME_STAGING (and credentials) first.")
        arr = self.render(image_id, instructions, background, owner)
        row = self.load(image_id, owner).row
        return {**self.publisher.share(row.id, arr), "image_id": shown_image_id(row.id, owner)}

    def cleanup_orphans(self) -> int:
        """Remove blobs no image refers to (left by a crash between blob write and commit)."""
        known = self.db.blob_keys()
        removed = 0
        for key in list(self.blobs.keys()):
            if key.startswith("images/") and key not in known:
                self.blobs.delete(key)
                removed += 1
        if removed:
            log.info("Removed %d orphaned blob(s) left by an interrupted ingest or delete.", removed)
        return removed


def check_prompt(points: object, point_labels: object, box: object, width: int, height: int):
    """Validate point/box prompts against the image size: (points, labels, box) ready for a segmenter."""
    pts: list[list[int]] = []
    if points is not None:
        if not isinstance(points, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in points
        ):
            raise InvalidInput("points must be a list of [x, y] pairs, e.g. [[120, 80], [200, 90]].")
        if len(points) > 64:
            raise InvalidInput(f"At most 64 points, got {len(points)}.")
        pts = [list(check_point(p[0], p[1], width, height)) for p in points]
    if point_labels is None:
        labels = [1] * len(pts)
    else:
        if not isinstance(point_labels, (list, tuple)) or any(
            isinstance(v, bool) or v not in (0, 1) for v in point_labels
        ):
            raise InvalidInput("point_labels must be a list of 1 (include) and 0 (exclude), one per point.")
        labels = [int(v) for v in point_labels]
        if len(labels) != len(pts):
            raise InvalidInput(f"point_labels has {len(labels)} labels for {len(pts)} points: give one per point.")
    bx = None
    if box is not None:
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in box)
        ):
            raise InvalidInput("box must be [x0, y0, x1, y1] in pixels.")
        x0, y0, x1, y1 = (float(v) for v in box)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InvalidInput(
                f"box {list(box)} must have x0 < x1 and y0 < y1 inside the image, which is {width}×{height} pixels."
            )
        bx = [x0, y0, x1, y1]
    if not any(lab == 1 for lab in labels) and bx is None:
        raise InvalidInput("Give at least one include point (label 1) or a box.")
    return pts or None, labels or None, bx


def _id_range(loaded: Loaded) -> str:
    ids = sorted(loaded.masks)
    if not ids:
        return "it has no masks"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"it has masks {ids[0]}–{ids[-1]}"
    return f"it has {len(ids)} masks, ids {ids[0]}–{ids[-1]}"


def _opt_float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
