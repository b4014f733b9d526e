"""The in-process cache of decoded images and their mask indexes, so clicks and renders never touch the disk.

Each image's rows have a version, bumped whenever they change (`forget`, `rows_changed`); a build that
read older rows is not cached, so a load racing an upload or a new mask never keeps stale rows. The
cache has its own lock and a byte budget (least recently used images go first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

import imaging
import masks as rle
import render
from storage import BlobStore, Database, ImageRow, MaskRow

DISPLAY_MAX_SIDE = 1024
CACHE_BUDGET_BYTES = 1_500_000_000
MAX_VERSIONS = 100_000  # image versions remembered (then all reset at once, safely: see _bump)


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


def build(row: ImageRow, rgb: np.ndarray, mask_rows: list[MaskRow]) -> Loaded:
    """Decode the masks once into the full-size and display-size indexes."""
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


class ImageCache:
    """Built images by stored id, rebuilt from the database and blob store when missing or stale."""

    def __init__(self, db: Database, blobs: BlobStore, budget_bytes: int = CACHE_BUDGET_BYTES):
        self.db = db
        self.blobs = blobs
        self.budget_bytes = budget_bytes
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}
        self._versions: dict[str, int] = {}  # bumped when rows change: a build that saw older ones is not cached
        self._epoch = 0

    def load(self, row: ImageRow) -> Loaded:
        """The image of a row already found (and checked against its caller): cached, or built once."""
        image_id = row.id
        with self._lock:
            hit = self._cache.get(image_id)
            if hit is not None and hit.row.mask_count == row.mask_count:
                self._cache.move_to_end(image_id)
                return hit
            lock = self._load_locks.setdefault(image_id, threading.Lock())
        with lock:  # one build per image, however many requests arrive at once
            with self._lock:
                hit = self._cache.get(image_id)
                version = self._version(image_id)
            if hit is not None and hit.row.mask_count == row.mask_count:
                return hit
            row = self.db.get_image(image_id, row.owner)  # read after the version, like the mask rows
            rgb = imaging.decode_png(self.blobs.get(row.blob_key))
            loaded = build(row, rgb, self.db.masks(image_id))
            self.remember(loaded, version)
            return loaded

    def peek(self, image_id: str) -> Loaded | None:
        """The image if it is cached now (never builds it)."""
        with self._lock:
            return self._cache.get(image_id)

    def remember(self, loaded: Loaded, version: tuple[int, int] | None = None) -> None:
        """Cache a built image; with `version` (read before its rows were), only if nothing changed since."""
        with self._lock:
            if version is not None and self._version(loaded.row.id) != version:
                return  # its rows changed while it was built (e.g. an upload finished): the next load rebuilds
            self._cache[loaded.row.id] = loaded
            self._cache.move_to_end(loaded.row.id)
            total = sum(v.nbytes for v in self._cache.values())
            while len(self._cache) > 1 and total > self.budget_bytes:
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes

    def forget(self, image_id: str) -> None:
        """The image's rows changed: drop its cached copy, and any build under way from older rows."""
        with self._lock:
            self._cache.pop(image_id, None)
            self._bump(image_id)

    def rows_changed(self, image_id: str) -> None:
        """Only the S3 fields of some mask rows changed (the publisher): the cached copy takes the new rows
        in place; dropping it would cost a whole index rebuild at the next click after every upload."""
        with self._lock:
            self._bump(image_id)  # a build under way read the older rows: it is not cached
            hit = self._cache.get(image_id)
            if hit is not None:
                rows = {m.mask_id: m for m in self.db.masks(image_id)}
                if rows.keys() == hit.masks.keys():
                    hit.masks = rows
                else:  # masks were added or the image deleted meanwhile: rebuilt at the next load
                    self._cache.pop(image_id, None)

    def _version(self, image_id: str) -> tuple[int, int]:
        """The image's version (call under the lock): it changes whenever its rows do (_bump)."""
        return self._epoch, self._versions.get(image_id, 0)

    def _bump(self, image_id: str) -> None:
        """A new version of the image's rows (call under the lock)."""
        if len(self._versions) >= MAX_VERSIONS:
            self._versions.clear()
            self._epoch += 1  # every version read before this one is now stale
        self._versions[image_id] = self._versions.get(image_id, 0) + 1
