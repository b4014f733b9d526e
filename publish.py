"""Publishing an image's masks (and originals, and shared renders) to S3 for the Mask Studio service.

`MaskPublisher` owns everything the studio does with the bucket: the start-up check and its status,
new mask keys, uploading masks (keeping their DB rows' keys, URLs and upload states in step),
uploading originals, retrying what stayed pending, sharing a rendered PNG, mask URLs, and deleting
an image's objects. It knows nothing of the studio's cache: it is told how to load an image and
tells the studio (`on_change`) which image's mask rows it has changed.

Deleting is driven by the `s3_deletions` table: Database.delete_image records an image's keys in the
same transaction as the delete, and they are forgotten only once S3 has deleted them, so an outage or
a crash in between never leaves objects behind for good (`flush_deletions` runs with every retry and
retention sweep). An upload that lands after its image was deleted is deleted too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import numpy as np

import imaging
import masks as rle
import render
from access import EVERYONE, Scope
from errors import NotFound, StorageError
from s3_store import DELETE_BATCH, S3BlobStore, UploadReport
from segmenter import Progress
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
        self.status: tuple[bool, str] = (True, f"bucket {s3.bucket}: checking…")  # until check() has run

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

    def mask_urls(self, image_id: str, mask_ids: list[int]) -> list[str | None]:
        """The URLs of an image's masks, in the order given (None: not uploaded, or no such mask any more)."""
        by_id = {m.mask_id: m for m in self.db.masks(image_id)}
        return [self.mask_url(by_id[i]) if i in by_id else None for i in mask_ids]

    @staticmethod
    def summary(report: UploadReport) -> dict:
        """The API's `"s3"`: {"uploaded", "failed"}, plus "error" (one reason a person can act on) on failure."""
        out: dict = report.counts()
        if report.failed:
            out["error"] = report.stopped or next(iter(report.failed.values()))
        return out

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
        if self.settings.s3_upload_originals:
            # After a batch that stopped (S3 down or hung) the original is only recorded, for the retry.
            self.upload_original(image_id, rgb, attempt=not report.stopped)
        return self.summary(report)

    def upload_masks(
        self, image_id: str, index: render.MaskIndex, rows: list[MaskRow], progress: Progress | None = None
    ) -> UploadReport:
        """Upload masks as PNGs (0/255, image size), concurrently; a failure leaves them pending."""
        total = len(rows)
        keyed = [(_s3_key(m), m) for m in rows]
        items = ((key, rle.to_png(index.mask(m.mask_id))) for key, m in keyed)
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
                None if key in failed else self.s3.url_for(key) if self.settings.s3_url_mode == "public" else None,
                key,
                "pending" if key in failed else "uploaded",
            )
            for key, m in keyed
        ]
        self.db.set_mask_urls(image_id, updates)
        if report.failed:
            log.warning(
                "S3: %d of %d mask uploads of %s failed; they stay pending and are retried later.",
                report.n_failed,
                total,
                image_id,
            )
        if report.uploaded and not self.db.image_exists(image_id):
            self._discard(image_id, list(report.uploaded))  # the image was deleted while they were uploading
        self.on_change(image_id)
        return report

    def upload_original(self, image_id: str, rgb: np.ndarray, attempt: bool = True) -> None:
        """Upload the image itself; it stays pending (retried later) if the upload fails or is not attempted."""
        key = self.s3.new_key(".png")
        try:
            self.db.add_object(image_id, key, "original", "pending")
        except NotFound:
            return  # deleted meanwhile: nothing to upload
        if attempt:
            self._upload_object(image_id, key, imaging.encode_png(rgb))

    def _upload_object(self, image_id: str, key: str, data: bytes) -> str | None:
        """Upload one recorded object (an original) and mark it uploaded; the reason it failed, or None."""
        report = self.s3.upload_many([(key, data)], content_type="image/png")
        if not report.ok:
            return report.failed[key]
        self.db.set_object_state(key, "uploaded")
        if not self.db.image_exists(image_id):
            self._discard(image_id, [key])
        return None

    def retry(self, scope: Scope, load: Callable[[str], Pixels]) -> dict:
        """Upload the scope's pending masks and originals (one owner's, or EVERYONE's) and delete the objects
        of its deleted images; `load` gives an image's pixels."""
        by_image: dict[str, list[MaskRow]] = {}
        for m in self.db.pending_uploads(scope):
            by_image.setdefault(m.image_id, []).append(m)
        uploaded = failed = 0
        stopped = reason = ""
        for image_id, rows in by_image.items():
            if stopped:  # S3 is down or hung: the rest waits for the next retry, without paying for it
                failed += len(rows)
                continue
            try:
                loaded = load(image_id)
            except NotFound:
                continue  # deleted meanwhile
            report = self.upload_masks(image_id, loaded.index, rows)
            uploaded += report.n_uploaded
            failed += report.n_failed
            stopped = report.stopped
            reason = reason or self.summary(report).get("error", "")
        for key, image_id, kind in self.db.pending_objects(scope):
            if kind != "original":
                # A shared render whose upload failed or was cut short: its pixels are not kept anywhere,
                # so it is dropped (its key deleted from S3), never filled with something else.
                self.db.drop_object(key)
                continue
            if stopped:
                failed += 1
                continue
            try:
                rgb = load(image_id).rgb
            except NotFound:
                continue
            why = self._upload_object(image_id, key, imaging.encode_png(rgb))
            if why is None:
                uploaded += 1
            else:
                failed += 1
                reason = reason or why
        deleted, why = self.flush_deletions(scope) if not stopped else (0, "")
        message = (
            f"Uploaded {uploaded} pending object(s) to S3."
            if not failed
            else f"Uploaded {uploaded} pending object(s); {failed} still failed and stay pending."
        )
        if deleted:
            message += f" Deleted {deleted} object(s) of deleted images."
        if why:
            message += " Some objects of deleted images could not be deleted yet; they are tried again later."
        result: dict = {"message": message, "uploaded": uploaded, "failed": failed, "deleted": deleted}
        if reason or why:
            result["error"] = reason or why
        return result

    def share(self, image_id: str, rgba: np.ndarray) -> dict:
        """Upload a rendered composite and return its URL; StorageError (and nothing left pending) on failure."""
        key = self.s3.new_key(".png")
        self.db.add_object(image_id, key, "render", "pending")  # recorded first: a crash cannot orphan it
        try:
            self.s3.put(key, imaging.encode_png(rgba), "image/png")
        except (StorageError, NotFound) as exc:
            # Nothing to retry (the render is not kept): forget it, and delete whatever may have landed.
            self.db.drop_object(key)
            raise StorageError(f"Could not upload the render to S3: {exc.message}") from exc
        self.db.set_object_state(key, "uploaded")
        if not self.db.image_exists(image_id):
            self._discard(image_id, [key])
            raise NotFound(f"Image {image_id!r} was deleted while its render was being shared.")
        return {"image_id": image_id, "url": self.s3.url_for(key), "key": key}

    def delete_now(self, image_id: str, keys: list[str]) -> bool:
        """Delete objects whose keys are recorded in `s3_deletions`, then forget them; a failure is logged,
        not raised (the image itself is already gone), and the keys wait for the next retry or sweep."""
        if not keys:
            return True
        try:
            self.s3.delete_many(keys)
        except StorageError as exc:
            log.warning(
                "S3: could not delete the %d object(s) of %s yet (they are deleted at the next retry): %s",
                len(keys),
                image_id,
                exc.message,
            )
            return False
        self.db.forget_s3_deletions(keys)
        return True

    def _discard(self, image_id: str, keys: list[str]) -> None:
        """Objects that landed after their image was deleted: record them, then delete them."""
        log.info("S3: %s was deleted while %d object(s) were uploading; deleting them.", image_id, len(keys))
        self.db.record_s3_deletions(keys)
        self.delete_now(image_id, keys)

    def flush_deletions(self, scope: Scope = EVERYONE) -> tuple[int, str]:
        """Delete the recorded objects of deleted images (one owner's, or EVERYONE's).

        Returns (how many were deleted, the reason the rest could not be, or "").
        """
        keys = self.db.s3_deletions(scope)
        done = 0
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                self.s3.delete_many(batch)
            except StorageError as exc:
                log.warning(
                    "S3: %d object(s) of deleted images could not be deleted yet: %s", len(keys) - done, exc.message
                )
                return done, exc.message
            self.db.forget_s3_deletions(batch)
            done += len(batch)
        if done:
            log.info("S3: deleted %d object(s) of deleted images.", done)
        return done, ""


def _s3_key(m: MaskRow) -> str:
    """A mask's object key: every mask stored while S3 is configured was given one."""
    if not m.s3_key:
        raise StorageError(f"Mask {m.mask_id} of image {m.image_id} has no S3 key to upload it under.")
    return m.s3_key
