"""The Mask Studio service: what every UI event and API endpoint does, without any Gradio in it.

`Studio` is the one place endpoints call. It checks every input once at this edge and ties together
what it is given: the segmenter, the database, the blob store, the image cache (image_cache.py), the
quotas (quotas.py) and, when a bucket is configured, the S3 publisher (publish.py). Storing images and
masks is ingest.py; the automatic passes that run after the page's upload (SAM engines) are mask_passes.py;
COCO export is coco.py; the segmenter's health for the status line is health.py.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from concurrent.futures import Future

import numpy as np

import coco
import masks as rle
import render
from access import (
    EVERYONE,
    LOCAL_OWNER,
    STORED_ID,
    Scope,
    counted_as,
    meanings,
    no_such_image,
    shown_image_id,
)
from errors import InvalidInput, MaskStudioError, NotFound, SegmentationRejected
from health import HealthMonitor
from image_cache import ImageCache, Loaded
from ingest import NO_OBJECT, Ingest, fraction
from ingest import now as timestamp
from mask_passes import MaskPasses
from publish import MaskPublisher
from quotas import Quotas
from s3_store import S3BlobStore
from sam2_responses import answer_from_masks
from segmenter import Progress, SamEngine, Segmenter, streaming_engine
from settings import Settings
from storage import BlobStore, Database, ImageRow, MaskRow
from thumbnails import SHOWN as SHOWN_THUMBNAILS
from thumbnails import LibraryThumbnails, cutouts
from validation import check_mask_id, check_point, check_prompt

log = logging.getLogger("mask_studio")

MAX_LIST = 1000


def _silent(fraction: float, text: str) -> None:
    pass


class _Prepare:
    """engine.prepare(rgb) on a thread of its own, started when an upload is decoded; `wait` for it after."""

    def __init__(self, engine: SamEngine):
        self.engine = engine
        self.future: Future[None] = Future()

    def start(self, rgb: np.ndarray) -> None:
        threading.Thread(target=self._run, args=(rgb,), name="encode-upload", daemon=True).start()

    def _run(self, rgb: np.ndarray) -> None:
        try:
            self.engine.prepare(rgb)
            self.future.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
            self.future.set_exception(exc)

    def wait(self, image_id: str) -> None:
        """Until the embedding is ready; an error of ours is only logged: the picture is stored and the automatic
        pass tries again (and says why if it fails); any other error is raised here."""
        try:
            self.future.result()
        except MaskStudioError as exc:
            log.warning("Could not encode image %s for clicks: %s", image_id, exc.message)


def _scope(owner: object) -> Scope:
    """An owner's name or EVERYONE; None is refused loudly (it once meant "everyone", silently)."""
    if owner is EVERYONE or (isinstance(owner, str) and owner):
        return owner
    raise TypeError(f"owner must be an owner's name or access.EVERYONE, got {owner!r}")


class Studio:
    def __init__(
        self,
        settings: Settings,
        segmenter: Segmenter,
        db: Database,
        blobs: BlobStore,
        publisher: MaskPublisher | None = None,
        *,
        cache: ImageCache | None = None,
        quotas: Quotas | None = None,
        s3_error: str | None = None,
        engine_note: str | None = None,
    ):
        """`publisher`: None without a bucket (masks then have no URL and the S3 endpoints say S3 is not
        configured); it must report row changes to `cache` (MaskPublisher(..., on_change=cache.rows_changed))."""
        if publisher is not None and cache is None:
            raise ValueError("A publisher needs the cache it reports its changes to: pass cache= as well.")
        self.settings = settings
        self.s3_error = s3_error  # S3 was configured but could not be set up (shown in the status line)
        self.engine_note = engine_note  # why a preferred engine is not the one running (status line), or None
        self.segmenter = segmenter
        self.db = db
        self.blobs = blobs
        self.publisher = publisher
        self.cache = cache or ImageCache(db, blobs)
        self.quotas = quotas or Quotas(settings, db)
        self.ingest = Ingest(settings, db, blobs, self.cache, self.quotas, publisher)
        self.thumbnails = LibraryThumbnails(db, blobs, self.cache)
        self.passes = MaskPasses()  # the automatic passes of the page's uploads with a SAM engine
        self._health = HealthMonitor(lambda: self.segmenter.health())

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

    # ---- abuse limits (quotas.py) ------------------------------------------------------------
    def allow_segmentation(self, owner: str, address: str | None = None) -> None:
        """Count one segmentation for the owner and the client address, or raise LimitExceeded.

        Every path that calls the segmenter (ingest, and prompt segmentation) calls this first.
        """
        self.quotas.allow_segmentation(owner, address)

    def check_room(self, owner: str, count: int | None = None) -> None:
        """Raise LimitExceeded when the owner already stores MAX_IMAGES_PER_OWNER images."""
        self.quotas.check_room(owner, count)

    # ---- ingest (ingest.py) --------------------------------------------------------------------
    def generate_and_store(
        self,
        data: bytes,
        *,
        image_id: str | None = None,
        owner: str = LOCAL_OWNER,
        progress: Progress | None = None,
        address: str | None = None,
        cancel: threading.Event | None = None,
        name: str | None = None,
    ) -> dict:
        """Decode, segment, store (one transaction) and index an image; returns the API summary.

        `address` is the client's network address: segmentations are limited per owner and per address.
        `cancel`, set when the person has left, stops a segmentation still running (nothing is stored).
        """
        say = progress or _silent

        def automatic(rgb: np.ndarray) -> list[dict]:
            h, w = rgb.shape[:2]
            say(0.05, f"Segmenting {w}×{h} with the {self.segmenter.engine}")
            return self.segmenter.generate(rgb, progress=fraction(progress, 0.05, 0.75), cancel=cancel)

        return self.ingest.ingest(data, image_id, owner, address, automatic, say, self.segmenter.engine, name=name)

    # ---- the page's upload and clicks with a SAM engine: the picture first, masks in the background ---
    def upload(
        self,
        data: bytes,
        *,
        image_id: str | None = None,
        owner: str = LOCAL_OWNER,
        progress: Progress | None = None,
        address: str | None = None,
        cancel: threading.Event | None = None,
        name: str | None = None,
    ) -> dict:
        """The page's upload: generate_and_store's summary plus "pending". With a SAM engine in this process the
        picture is stored with no masks, its embedding computed (clicks answer at once) and the automatic pass
        queued in the background ("pending": True; see pass_status); with any other engine, generate_and_store."""
        engine = streaming_engine(self.segmenter)
        if engine is None:
            summary = self.generate_and_store(
                data, image_id=image_id, owner=owner, progress=progress, address=address, cancel=cancel, name=name
            )
            return {**summary, "pending": False}
        say = progress or _silent
        prep = _Prepare(engine)  # started once decoded: the encoder runs while the picture is stored
        loaded, summary = self.ingest.store_image(data, image_id, owner, address, engine.engine, say, name, prep.start)
        say(0.9, "Encoding the picture for clicks")
        prep.wait(loaded.row.id)
        self.passes.start(loaded.row.id, functools.partial(self.ingest.store_pass, engine, loaded.row, loaded.rgb))
        return {**summary, "pending": True}

    def pass_status(self, image_id: object, owner: Scope) -> dict | None:
        """The image's automatic pass as its page shows it, or None when none ran since the process started:
        {"running", "fraction", "stored", "error", "mask_count"}."""
        row = self.find(image_id, owner)
        state = self.passes.status(row.id)
        if state is None:
            return None
        return {
            "running": state.running,
            "fraction": state.fraction,
            "stored": state.stored,
            "error": state.error,
            "mask_count": row.mask_count,
        }

    def click_masks(self, image_id: object, x: object, y: object, owner: Scope) -> dict:
        """mask_at_point for a click on the page. With a SAM engine in this process, when no stored mask covers
        the point or the automatic pass is still running, SAM's whole / part / sub-part masks at the point are
        stored first (a stored mask they repeat is reused). Free of the rate limits: a local model costs nothing."""
        found = self.mask_at_point(image_id, x, y, owner)
        engine = streaming_engine(self.segmenter)
        if engine is None:
            return found
        loaded = self.load(image_id, owner)
        if found["mask_id"] is not None and not self.passes.running(loaded.row.id):
            return found
        px, py = check_point(x, y, loaded.row.width, loaded.row.height)
        try:
            records = engine.candidates(loaded.rgb, points=[[px, py]], point_labels=[1])
        except SegmentationRejected:  # SAM sees nothing there: what is stored answers
            return found
        self.ingest.add_masks(loaded.row, records)
        return self.mask_at_point(image_id, x, y, owner)

    # ---- loading -----------------------------------------------------------------------------
    def load(self, image_id: object, owner: Scope) -> Loaded:
        """The image, from the cache or rebuilt from storage; another owner's image is 'not found'."""
        return self.cache.load(self.find(image_id, owner))

    def find(self, image_id: object, owner: Scope) -> ImageRow:
        """The image row an owner means by `image_id` (their own id, or a generated one); someone else's
        image, or an id that could never exist, answers like any unknown id."""
        scope = _scope(owner)
        if not isinstance(image_id, str) or not image_id:
            raise InvalidInput("image_id is required (a string such as 'img_20260101_120000_ab12cd34').")
        if not STORED_ID.fullmatch(image_id):
            raise no_such_image(image_id)
        for stored in meanings(image_id, scope):
            try:
                return self.db.get_image(stored, scope)
            except NotFound:
                pass  # not the owner's own id: maybe a generated one (or one stored as given)
        raise no_such_image(image_id)

    # ---- reading -----------------------------------------------------------------------------
    def info(self, image_id: object, owner: Scope) -> dict:
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

    def list_images(self, owner: Scope) -> list[dict]:
        scope = _scope(owner)
        return [r.summary(scope) for r in self.db.list_images(scope, limit=MAX_LIST)]

    def library(self, owner: Scope) -> tuple[list[dict], list[str | None]]:
        """The owner's images as `list_images` lists them, and thumbnail files for the newest `thumbnails.SHOWN`
        (None where a picture cannot be read)."""
        scope = _scope(owner)
        rows = self.db.list_images(scope, limit=MAX_LIST)
        return [r.summary(scope) for r in rows], self.thumbnails.files(rows[:SHOWN_THUMBNAILS])

    def mask_at_point(self, image_id: object, x: object, y: object, owner: Scope) -> dict:
        loaded = self.load(image_id, owner)
        px, py = check_point(x, y, loaded.row.width, loaded.row.height)
        candidates = loaded.index.masks_at(px, py)
        if not candidates:
            return {"mask_id": None, "candidates": [], "area": None, "bbox": None}
        m = loaded.masks[candidates[0]]
        return {"mask_id": m.mask_id, "candidates": candidates, "area": m.area, "bbox": m.bbox}

    def mask(self, loaded: Loaded, mask_id: object, owner: Scope = EVERYONE) -> MaskRow:
        """One of the image's masks; `owner`: whose id the message names the image by."""
        mid = check_mask_id(mask_id)
        if mid not in loaded.masks:
            raise NotFound(f"Image {shown_image_id(loaded.row.id, owner)} has no mask {mid} ({_id_range(loaded)}).")
        return loaded.masks[mid]

    def mask_png(self, image_id: object, mask_id: object, owner: Scope) -> bytes:
        loaded = self.load(image_id, owner)
        m = self.mask(loaded, mask_id, owner)
        return rle.to_png(loaded.index.mask(m.mask_id))

    def render(
        self,
        image_id: object,
        instructions: object,
        background: object = "original",
        owner: Scope = LOCAL_OWNER,
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

    def cutouts(self, image_id: str, owner: Scope) -> list[tuple[int, np.ndarray]]:
        """The mask gallery's thumbnails (RGBA cut-outs), largest mask first (thumbnails.cutouts)."""
        return cutouts(self.load(image_id, owner))

    def export_coco(
        self,
        image_id: object,
        mask_ids: object = None,
        owner: Scope = LOCAL_OWNER,
        colors: dict[int, object] | None = None,
    ) -> dict:
        """A COCO dict (RLE segmentations) of all masks or of the listed ones (coco.py)."""
        loaded = self.load(image_id, owner)
        if mask_ids is None:
            chosen = sorted(loaded.masks)
        else:
            if not isinstance(mask_ids, (list, tuple)):
                raise InvalidInput("mask_ids must be a list of mask ids, or null for all masks.")
            chosen = list(dict.fromkeys(self.mask(loaded, m, owner).mask_id for m in mask_ids))
        rows = [loaded.masks[mid] for mid in chosen]
        shown = shown_image_id(loaded.row.id, owner)
        urls = [self.mask_url(m) for m in rows]
        return coco.export(loaded.row, shown, rows, urls, created=timestamp(), colors=colors)

    # ---- deleting ----------------------------------------------------------------------------
    def delete(self, image_id: object, owner: Scope) -> dict:
        row = self.find(image_id, owner)
        self._delete_row(row)
        shown = shown_image_id(row.id, owner)
        return {"message": f"Image {shown} and its {row.mask_count} masks were deleted.", "image_id": shown}

    def _delete_row(self, row: ImageRow, s3_now: bool = True) -> None:
        # The row goes first, in one transaction that also records its S3 keys for deletion: a crash right
        # after it leaves only an orphaned blob, which cleanup_orphans removes at the next start, and
        # recorded keys, which the next retry or retention sweep deletes (as when S3 is unreachable now).
        # The other order could leave a listed image whose pixels are gone.
        self.passes.stop(row.id)  # its pass stores nothing more
        with self.ingest.adding:  # not while a click or the pass is adding a mask to it
            s3_keys = self.db.delete_image(row.id)
        self.cache.forget(row.id)
        self.blobs.delete(row.blob_key)
        if self.publisher is not None and s3_now:
            self.publisher.delete_now(row.id, s3_keys)

    def purge_expired(self, now: dt.datetime | None = None, *, flush_s3: bool = True) -> int:
        """Delete images older than RETENTION_DAYS (with their blobs); returns how many. Their S3 objects
        are deleted too (`flush_s3`), or left recorded for the next retry (at start-up: S3 may be slow)."""
        days = self.settings.retention_days
        if days <= 0:
            return 0
        now = now or dt.datetime.now(dt.UTC)
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
        owner: Scope = LOCAL_OWNER,
        address: str | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """One object's mask from points/box, stored with a new image (data) or a stored one (image_id).
        `owner`: who stores a new image, or whose stored images `image_id` may name."""
        if data is not None:

            def prompted(rgb: np.ndarray) -> list[dict]:
                pts, labels, bx = check_prompt(points, point_labels, box, rgb.shape[1], rgb.shape[0])
                return [self.segmenter.segment(rgb, points=pts, point_labels=labels, box=bx, cancel=cancel)]

            new_owner = counted_as(_scope(owner))
            engine = self.segmenter.engine
            out = self.ingest.ingest(data, image_id, new_owner, address, prompted, _silent, engine, empty=NO_OBJECT)
            return {
                "image_id": out["image_id"],
                "mask_id": out["mask_ids"][0],
                "mask_url": out["mask_urls"][0],
                "s3": out["s3"],
                "existing": False,
            }
        loaded = self.load(image_id, owner)
        pts, labels, bx = check_prompt(points, point_labels, box, loaded.row.width, loaded.row.height)
        self.allow_segmentation(counted_as(owner), address)
        return self.add_object_mask(loaded, self._object_record(loaded, pts, labels, bx, cancel), owner)

    def preview_object(
        self,
        image_id: str,
        points: object,
        point_labels: object,
        owner: Scope,
        *,
        address: str | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """The object mask for prompts without storing it (the UI's live preview); a SAM2 record."""
        loaded = self.load(image_id, owner)
        pts, labels, _ = check_prompt(points, point_labels, None, loaded.row.width, loaded.row.height)
        # Each preview may be a paid call to a SAM2 service: counted per owner and per address.
        self.allow_segmentation(counted_as(owner), address)
        return self._object_record(loaded, pts, labels, None, cancel)

    def _object_record(self, loaded: Loaded, points, labels, box, cancel: threading.Event | None) -> dict:
        """The segmenter's answer to prompts on a stored image; for a service that cannot take prompts
        (cog, replicate), picked among the masks it already made for this image: no second paid call."""
        if self.segmenter.prompts_natively or loaded.row.engine != self.segmenter.engine:
            return self.segmenter.segment(loaded.rgb, points=points, point_labels=labels, box=box, cancel=cancel)
        return answer_from_masks(_stored_records(loaded), points, labels, box, self.segmenter.engine)

    def add_object_mask(self, loaded: Loaded, record: dict, owner: Scope = EVERYONE) -> dict:
        """Store one more mask (from a prompt) with an image; S3 upload when configured. `owner`: who is
        told (by their own image id; EVERYONE: the stored id)."""
        return self.ingest.add_object_mask(loaded, record, shown_image_id(loaded.row.id, owner))

    # ---- health of the segmenter (health.py), never blocking a page -----------------------------
    def health(self, max_age_s: float = 30.0) -> tuple[bool, str]:
        """The segmenter's last known health; refreshed in the background when older than max_age_s."""
        last = self._health.status(max_age_s)
        return last if last is not None else (True, f"{self.segmenter.engine}: checking…")

    # ---- S3 (see publish.py) ------------------------------------------------------------------
    def check_s3(self) -> tuple[bool, str]:
        """Check the bucket once (at start-up): the sentence goes to the log and the status line."""
        return self.publisher.check() if self.publisher is not None else self.s3_status

    def retry_uploads(self, owner: Scope = EVERYONE) -> dict:
        """Upload every mask (and original) still pending of the owner's images (or EVERYONE's): after a
        failure, at start-up and on request."""
        scope = _scope(owner)
        if self.publisher is None:
            raise InvalidInput("S3 is not configured (set S3_BUCKET_NAME_STAGING): there is nothing to upload.")
        return self.publisher.retry(scope, lambda image_id: self.load(image_id, EVERYONE))

    def share_render(self, image_id: object, instructions: object, background: object, owner: Scope) -> dict:
        """Upload a rendered composite to S3 and return its URL."""
        if self.publisher is None:
            raise InvalidInput("Sharing needs S3: set S3_BUCKET_NAME_STAGING (and credentials) first.")
        arr = self.render(image_id, instructions, background, owner)
        row = self.load(image_id, owner).row
        return {**self.publisher.share(row.id, arr), "image_id": shown_image_id(row.id, owner)}

    def cleanup_orphans(self) -> int:
        """Remove blobs no image refers to (left by a crash between blob write and commit)."""
        return self.ingest.cleanup_orphans()


def _stored_records(loaded: Loaded) -> list[dict]:
    """An image's stored masks as the segmenter's records."""
    h, w = loaded.row.height, loaded.row.width
    return [
        {
            "segmentation": {"size": [h, w], "counts": m.counts},
            "area": m.area,
            "bbox": m.bbox,
            "predicted_iou": m.predicted_iou,
            "stability_score": m.stability_score,
        }
        for m in loaded.masks.values()
    ]


def _id_range(loaded: Loaded) -> str:
    ids = sorted(loaded.masks)
    if not ids:
        return "it has no masks"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"it has masks {ids[0]}–{ids[-1]}"
    return f"it has {len(ids)} masks, ids {ids[0]}–{ids[-1]}"
