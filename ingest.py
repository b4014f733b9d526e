"""Storing images and their masks: new ids, the one-transaction ingest, and masks added later without near-duplicates.

Two ways in. `ingest` is the whole upload at once (decode, segment, one transaction, index, S3): the API's
/generate_and_store_masks and every engine that cannot stream masks. `store_image` stores the picture with no
masks yet (the page's upload with a SAM engine); `add_masks` then stores what a click's prompt or the background
pass finds, reusing a stored mask instead of storing one that repeats it (IoU ≥ 0.95). Masks are added under one
lock, so a click and the pass adding the same mask at the same moment store it once.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
from collections.abc import Callable

import numpy as np

import image_cache
import imaging
import masks as rle
from access import check_image_id, id_taken, meanings, new_image_id, shown_image_id, stored_image_id
from errors import Conflict, SegmentationRejected
from image_cache import ImageCache, Loaded
from mask_passes import PassState
from publish import MaskPublisher
from quotas import Quotas, room_refusal
from records import mask_rows
from segmenter import Progress, SamEngine, check_cancel
from settings import Settings
from storage import BlobStore, Database, ImageRow, MaskRow, OwnerFull

log = logging.getLogger("mask_studio")

DUPLICATE_IOU = 0.95  # a mask this alike to a stored one is that mask
NO_OBJECT = "The segmenter found no object at those prompts."


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def fraction(progress: Progress | None, start: float, end: float) -> Progress | None:
    """A progress callback that maps 0..1 onto start..end of the caller's bar."""
    if progress is None:
        return None
    return lambda f, text: progress(start + (end - start) * max(0.0, min(1.0, f)), text)


class Ingest:
    """New images and new masks into the database, the blob store, the image cache and (optionally) S3."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        blobs: BlobStore,
        cache: ImageCache,
        quotas: Quotas,
        publisher: MaskPublisher | None = None,
    ):
        self.settings, self.db, self.blobs, self.cache, self.quotas = settings, db, blobs, cache, quotas
        self.publisher = publisher
        self.adding = threading.Lock()  # masks are added one caller at a time (no duplicate from a race)

    # ---- new images ------------------------------------------------------------------------------
    def new_id(self, image_id: str | None, owner: str) -> str:
        """The stored id of a new image: the owner's own id (refused when it names one of their images, or
        is stored already), or a generated one."""
        if image_id is None or image_id == "":
            return new_image_id()
        wanted = check_image_id(image_id)
        stored = stored_image_id(wanted, owner)  # each owner's ids are their own
        if self.db.image_exists(stored) or any(self.db.image_exists(i, owner) for i in meanings(wanted, owner)):
            raise id_taken(wanted)
        return stored

    def ingest(
        self,
        data: bytes,
        image_id: str | None,
        owner: str,
        address: str | None,
        records_for: Callable[[np.ndarray], list[dict]],
        say: Progress,
        engine: str,
        empty: str | None = None,
        name: str | None = None,
    ) -> dict:
        """The whole ingest at once: checks, segmentation, blob + one DB transaction, index, S3 uploads.

        `empty`: the refusal when the segmenter's masks are all empty (nothing is stored then)."""
        image_id, rgb = self._admit(data, image_id, owner, address, say)
        h, w = rgb.shape[:2]
        rows = self.mask_rows(image_id, records_for(rgb), (h, w))
        if empty is not None and not rows:
            raise SegmentationRejected(empty)
        return self._commit(image_id, owner, rgb, rows, engine, say, name)[1]

    def store_image(
        self,
        data: bytes,
        image_id: str | None,
        owner: str,
        address: str | None,
        engine: str,
        say: Progress,
        name: str | None = None,
        on_decoded: Callable[[np.ndarray], object] | None = None,
    ) -> tuple[Loaded, dict]:
        """The picture stored with no masks yet (they follow through `add_masks`): its cache entry and summary.
        The automatic pass that will follow is counted as a segmentation now. `on_decoded(rgb)` is called once
        the picture is decoded and admitted, before it is stored (to start work that needs only the pixels)."""
        image_id, rgb = self._admit(data, image_id, owner, address, say)
        if on_decoded is not None:
            on_decoded(rgb)
        return self._commit(image_id, owner, rgb, [], engine, say, name)

    def _admit(
        self, data: bytes, image_id: str | None, owner: str, address: str | None, say: Progress
    ) -> tuple[str, np.ndarray]:
        """The checks before any segmentation: room, id, a decodable image, the rate limits."""
        self.quotas.check_room(owner)  # before segmenting: a full library must not cost a segmentation
        image_id = self.new_id(image_id, owner)
        say(0.02, "Reading the image")
        rgb = imaging.load_image(
            data, max_pixels=self.settings.max_image_pixels, max_bytes=self.settings.max_upload_bytes
        )
        self.quotas.allow_segmentation(owner, address)  # counted when attempted, whatever the outcome
        return image_id, rgb

    def _commit(
        self,
        image_id: str,
        owner: str,
        rgb: np.ndarray,
        rows: list[MaskRow],
        engine: str,
        say: Progress,
        name: str | None = None,
    ) -> tuple[Loaded, dict]:
        h, w = rgb.shape[:2]
        say(0.78, f"Storing {len(rows)} masks")
        row = ImageRow(
            id=image_id,
            owner=owner,
            width=w,
            height=h,
            created_at=now(),
            engine=engine,
            mask_count=len(rows),
            blob_key=f"images/{image_id}-{secrets.token_hex(4)}.png",
            name=name,
        )
        self._store(row, rgb, rows)
        say(0.82, "Indexing masks")
        loaded = image_cache.build(row, rgb, rows)
        self.cache.remember(loaded)
        s3 = None
        if self.publisher is not None:
            say(0.85, f"Uploading {len(rows)} masks to S3")
            s3 = self.publisher.publish_new(row.id, rgb, loaded.index, rows, fraction(say, 0.85, 1.0))
        say(1.0, "Done")
        shown = shown_image_id(image_id, owner)
        return loaded, {
            "message": f"Stored {len(rows)} masks for image {shown}.",
            "image_id": shown,
            "mask_count": len(rows),
            "image_dimensions": {"width": w, "height": h},
            "mask_ids": [m.mask_id for m in rows],
            "mask_urls": (
                self.publisher.mask_urls(image_id, [m.mask_id for m in rows])
                if self.publisher is not None
                else [None] * len(rows)
            ),
            "engine": row.engine,
            "s3": s3,
        }

    def _store(self, row: ImageRow, rgb: np.ndarray, rows: list[MaskRow]) -> None:
        """The blob, then the rows in one transaction; a refused or failed insert takes the blob back."""
        self.blobs.put(row.blob_key, imaging.encode_png(rgb), "image/png")
        limit = self.settings.max_images_per_owner
        try:
            self.db.insert_image(row, rows, max_per_owner=limit)
        except OwnerFull as exc:
            # Another upload of the same owner committed first: the quota is checked atomically there.
            self.blobs.delete(row.blob_key)
            raise room_refusal(exc.count, limit, self.settings.retention_days) from None
        except Conflict:  # the same id, taken by a concurrent upload of the same owner
            self.blobs.delete(row.blob_key)
            raise id_taken(shown_image_id(row.id, row.owner)) from None
        except BaseException:
            self.blobs.delete(row.blob_key)
            raise

    def mask_rows(self, image_id: str, records: list[dict], shape: tuple[int, int]) -> list[MaskRow]:
        """The segmenter's records as rows numbered largest first (records.py); pending upload with S3."""
        publisher = self.publisher
        new_key = publisher.new_mask_key if publisher is not None else None
        return mask_rows(image_id, records, shape, self.settings.max_masks, new_key)

    # ---- masks added to a stored image -------------------------------------------------------------
    def add_masks(
        self,
        row: ImageRow,
        records: list[dict],
        *,
        limit: int | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[list[int], list[int]]:
        """Store the records' masks with a stored image, each unless a stored mask repeats it (IoU ≥ 0.95):
        (the ids, stored or reused, largest mask first; the ids newly stored). `limit`: no new mask once the
        image has that many. `stop` set (the image is being deleted): nothing more is stored."""
        rows = mask_rows(row.id, records, (row.height, row.width), len(records) or 1)
        if not rows:
            return [], []
        ids: list[int] = []
        added: list[MaskRow] = []
        with self.adding:
            stored = self.db.masks(row.id)
            for new in rows:
                same = next((m for m in stored if same_mask(m, new, (row.height, row.width))), None)
                if same is not None:
                    ids.append(same.mask_id)
                    continue
                if (stop is not None and stop.is_set()) or (limit is not None and len(stored) >= limit):
                    continue
                key = self.publisher.new_mask_key() if self.publisher is not None else None
                m = self.db.add_mask(_with_key(new, key))
                stored.append(m)
                added.append(m)
                ids.append(m.mask_id)
            if added:
                self.cache.forget(row.id)
        if added and self.publisher is not None:
            self.publisher.upload_masks(row.id, self.cache.load(self.db.get_image(row.id)).index, added)
        return ids, [m.mask_id for m in added]

    def add_object_mask(self, loaded: Loaded, record: dict, shown: str) -> dict:
        """Store one more mask (from a prompt) with an image, or name the stored mask that is the same pixels;
        S3 upload when configured. `shown`: the image id the caller is told."""
        r = loaded.row
        rows = self.mask_rows(r.id, [record], (r.height, r.width))
        if not rows:
            raise SegmentationRejected(NO_OBJECT)
        same = next((m for m in loaded.masks.values() if m.counts == rows[0].counts), None)
        if same is not None:  # already one of this image's masks (e.g. picked from the hierarchy): no copy
            s3 = None if self.publisher is None else {"uploaded": 0, "failed": 0}
            return {"image_id": shown, "mask_id": same.mask_id, "mask_url": self._url(same), "s3": s3, "existing": True}
        with self.adding:
            m = self.db.add_mask(rows[0])
            self.cache.forget(r.id)
        s3 = None
        if self.publisher is not None:
            fresh = self.cache.load(self.db.get_image(r.id))
            s3 = self.publisher.summary(self.publisher.upload_masks(r.id, fresh.index, [m]))
            m = self.cache.load(self.db.get_image(r.id)).masks[m.mask_id]
        return {"image_id": shown, "mask_id": m.mask_id, "mask_url": self._url(m), "s3": s3, "existing": False}

    def store_pass(self, engine: SamEngine, row: ImageRow, rgb: np.ndarray, state: PassState) -> None:
        """A background pass (mask_passes) over a stored image: masks stored as they are found, at most
        MAX_MASKS in all, none repeating a stored one; nothing more once the pass is stopped."""
        streamed = False

        def store(records: list[dict]) -> None:
            check_cancel(state.stop)
            _, added = self.add_masks(row, records, limit=self.settings.max_masks, stop=state.stop)
            state.stored += len(added)

        def on_masks(records: list[dict]) -> None:
            nonlocal streamed
            streamed = True
            store(records)

        def progress(f: float, text: str) -> None:
            state.fraction = f

        records = engine.generate(rgb, progress=progress, cancel=state.stop, on_masks=on_masks)
        if not streamed:  # an engine that gave its masks only at the end
            store(records)

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

    def _url(self, m: MaskRow) -> str | None:
        return self.publisher.mask_url(m) if self.publisher is not None else None


def same_mask(a: MaskRow, b: MaskRow, shape: tuple[int, int]) -> bool:
    """Whether two masks of one image overlap at IoU ≥ 0.95 (the areas say "no" first: IoU ≤ small / large)."""
    small, large = sorted((a.area, b.area))
    if large == 0 or small < DUPLICATE_IOU * large:
        return False
    if a.counts == b.counts:
        return True
    size = [shape[0], shape[1]]
    ma = rle.decode({"size": size, "counts": a.counts})
    mb = rle.decode({"size": size, "counts": b.counts})
    union = np.count_nonzero(ma | mb)
    return bool(union > 0 and np.count_nonzero(ma & mb) / union >= DUPLICATE_IOU)


def _with_key(row: MaskRow, key: str | None) -> MaskRow:
    """The row waiting for its S3 upload under `key` (or with no S3 at all)."""
    return MaskRow(**{**vars(row), "s3_key": key, "upload_state": "pending" if key is not None else "none"})
