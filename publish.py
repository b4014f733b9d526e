"""Publishing an image's masks (and originals, and shared renders) to S3 for the Mask Studio service.

`MaskPublisher` owns everything the studio does with the bucket: the start-up check and its status,
new mask keys, uploading masks (keeping their DB rows' keys, URLs and upload states in step),
uploading originals, retrying what stayed pending, sharing a rendered PNG, mask URLs, and deleting
an image's objects. It knows nothing of the studio's cache: it is told how to load an image and
tells the studio (`on_change`) which image's mask rows it has changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

import imaging
import masks as rle
import render
from errors import NotFound, StorageError
from s3_store import S3BlobStore, UploadReport
from sam2_client import Progress
from settings import Settings
from storage import Database, MaskRow

log = logging.getLogger("mask_studio")  # the studio's logger: one place to read what the service did


class Pixels(Protocol):
    """What uploads need of a loaded image (studio.Loaded has both)."""

    rgb: np.ndarray
    index: render.MaskIndex


class MaskPublisher:
    """The S3 side of the studio: one bucket, the database rows that track what is in it."""

    def __init__(
        self,
        s3: S3BlobStore,
        db: Database,
        settings: Settings,
        on_change: Callable[[str], None] = lambda image_id: None,
    ):
        self.s3 = s3
        self.db = db
        self.settings = settings
        self.on_change = on_change  # the studio's cached mask rows of that image are stale
        self.status: tuple[bool, str] = (True, "off")

    def check(self) -> tuple[bool, str]:
        """Check the bucket once (at start-up): the sentence goes to the log and the status line."""
        ok, sentence = self.s3.check()
        self.status = (ok, sentence)
        (log.info if ok else log.warning)("S3: %s", sentence)
        return self.status

    def new_mask_key(self) -> str:
        """A unique object key for a mask not yet uploaded."""
        return self.s3.new_mask_key()

    def mask_url(self, m: MaskRow) -> str | None:
        """The mask's S3 URL (presigned ones are issued fresh each time), or None until it is uploaded."""
        if m.upload_state != "uploaded" or not m.s3_key:
            return None
        return self.s3.url_for(m.s3_key)

    def publish_new(
        self,
        image_id: str,
        rgb: np.ndarray,
        index: render.MaskIndex,
        rows: list[MaskRow],
        progress: Progress | None = None,
    ) -> dict:
        """Upload a new image's masks (and its original, when configured); the API's `"s3"` summary."""
        report = self.upload_masks(image_id, index, rows, progress)
        summary: dict = report.counts()
        if report.failed:  # one reason is enough for a person to act on
            summary["error"] = next(iter(report.failed.values()))
        if self.settings.s3_upload_originals:
            self.upload_original(image_id, rgb)
        return summary

    def upload_masks(
        self, image_id: str, index: render.MaskIndex, rows: list[MaskRow], progress: Progress | None = None
    ) -> UploadReport:
        """Upload masks as PNGs (0/255, image size), concurrently; a failure leaves them pending."""
        total = len(rows)
        items = ((m.s3_key, rle.to_png(index.mask(m.mask_id))) for m in rows)
        on_progress = (
            (lambda done, n: progress(done / max(1, n), f"Uploaded {done} of {total} masks to S3"))
            if progress
            else None
        )
        report = self.s3.upload_many(items, progress=on_progress, content_type="image/png")
        failed = set(report.failed)
        updates = [
            (
                m.mask_id,
                None
                if m.s3_key in failed
                else self.s3.url_for(m.s3_key)
                if self.settings.s3_url_mode == "public"
                else None,
                m.s3_key,
                "pending" if m.s3_key in failed else "uploaded",
            )
            for m in rows
        ]
        self.db.set_mask_urls(image_id, updates)
        if report.failed:
            log.warning(
                "S3: %d of %d mask uploads of %s failed; they stay pending and are retried later.",
                report.n_failed,
                total,
                image_id,
            )
        self.on_change(image_id)
        return report

    def upload_original(self, image_id: str, rgb: np.ndarray) -> None:
        """Upload the image itself; it stays pending (retried later) if the upload fails."""
        key = self.s3.new_key(".png")
        self.db.add_object(image_id, key, "original", "pending")
        report = self.s3.upload_many([(key, imaging.encode_png(rgb))], content_type="image/png")
        if report.ok:
            self.db.set_object_state(key, "uploaded")

    def retry(self, owner: str | None, load: Callable[[str], Pixels]) -> dict:
        """Upload the owner's pending masks (all owners': also pending objects); `load` gives an image's pixels."""
        pending = self.db.pending_uploads(owner)
        by_image: dict[str, list[MaskRow]] = {}
        for m in pending:
            by_image.setdefault(m.image_id, []).append(m)
        uploaded = failed = 0
        for image_id, rows in by_image.items():
            try:
                loaded = load(image_id)
            except NotFound:
                continue  # deleted meanwhile
            report = self.upload_masks(image_id, loaded.index, rows)
            uploaded += report.n_uploaded
            failed += report.n_failed
        if owner is None:
            for key, image_id, _kind in self.db.pending_objects():
                try:
                    rgb = load(image_id).rgb
                except NotFound:
                    continue
                if self.s3.upload_many([(key, imaging.encode_png(rgb))], content_type="image/png").ok:
                    self.db.set_object_state(key, "uploaded")
                    uploaded += 1
                else:
                    failed += 1
        message = (
            f"Uploaded {uploaded} pending object(s) to S3."
            if not failed
            else f"Uploaded {uploaded} pending object(s); {failed} still failed and stay pending."
        )
        return {"message": message, "uploaded": uploaded, "failed": failed}

    def share(self, image_id: str, rgba: np.ndarray) -> dict:
        """Upload a rendered composite and return its URL."""
        key = self.s3.new_key(".png")
        self.db.add_object(image_id, key, "render", "pending")
        self.s3.put(key, imaging.encode_png(rgba), "image/png")
        self.db.set_object_state(key, "uploaded")
        return {"image_id": image_id, "url": self.s3.url_for(key), "key": key}

    def keys_of(self, image_id: str) -> list[str]:
        """Every object key of an image (masks, original, shared renders): read before its rows go."""
        keys = [m.s3_key for m in self.db.masks(image_id) if m.s3_key]
        return keys + [key for key, _, _ in self.db.objects(image_id)]

    def delete_objects(self, image_id: str, keys: list[str]) -> None:
        """Delete an image's objects; a failure is logged, not raised (the image itself is already gone)."""
        if not keys:
            return
        try:
            self.s3.delete_many(keys)
        except StorageError as exc:
            log.warning("S3: could not delete the objects of %s: %s", image_id, exc.message)
