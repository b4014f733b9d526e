"""Thumbnails: the Library's (one small JPEG per stored image, kept in the database) and the masks' cut-outs.

A thumbnail is derived data: made from the image when the Library first shows it (from the cached picture when
the image was just uploaded or opened, else from the stored original), kept in the database's `thumbnails`
table (deleted with its image), and written as a file in a temp folder for the page's gallery: Gradio serves
files from the temp folder, not from a data folder that may lie elsewhere (a Space's persistent /data).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

import imaging
import render
from errors import MaskStudioError
from image_cache import ImageCache, Loaded
from storage import BlobStore, Database, ImageRow

log = logging.getLogger("mask_studio.thumbnails")

SIDE = 200  # px, the longer side: sharp in a gallery cell of ~100-200 CSS px
QUALITY = 82
SHOWN = 48  # the Library's gallery shows the newest this many; its list names every image


def cutouts(loaded: Loaded) -> list[tuple[int, np.ndarray]]:
    """The mask gallery's thumbnails: (mask id, RGBA cut-out), largest mask first; made once per cached image."""
    out = []
    for mid in loaded.by_area():
        thumb = loaded.thumbs.get(mid)
        if thumb is None:
            m = loaded.masks[mid]
            thumb = loaded.thumbs[mid] = render.cutout(loaded.rgb, loaded.index.mask(mid), m.bbox)
        out.append((mid, thumb))
    return out


def make_thumbnail(rgb: np.ndarray, side: int = SIDE) -> bytes:
    """The picture fitted into side×side (never enlarged), as JPEG bytes."""
    image = Image.fromarray(rgb)
    image.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return imaging.encode_jpeg(np.asarray(image), quality=QUALITY)


class LibraryThumbnails:
    """Thumbnail files for stored images: made once per image, then read from the database (module docstring)."""

    def __init__(self, db: Database, blobs: BlobStore, cache: ImageCache, folder: Path | None = None):
        self.db, self.blobs, self.cache = db, blobs, cache
        self.folder = folder or Path(tempfile.gettempdir()) / "mask-studio-thumbnails"

    def files(self, rows: Sequence[ImageRow]) -> list[str | None]:
        """A thumbnail file per row, in order; None for an image whose picture cannot be read (logged). Only the
        rows without a file yet are read from the database (a listing after an upload reads one)."""
        paths = [self._path(row) for row in rows]
        missing = [row for row, path in zip(rows, paths) if not path.is_file()]
        stored = self.db.thumbnails([r.id for r in missing])
        for row in missing:
            jpeg = stored.get(row.id) or self._make(row)
            if jpeg is not None:
                self._write(self._path(row), jpeg)
        return [str(path) if path.is_file() else None for path in paths]

    def _make(self, row: ImageRow) -> bytes | None:
        loaded = self.cache.peek(row.id)
        try:
            rgb = loaded.display_rgb if loaded is not None else imaging.decode_png(self.blobs.get(row.blob_key))
            jpeg = make_thumbnail(rgb)
            self.db.set_thumbnail(row.id, jpeg)
        except (MaskStudioError, OSError, ValueError) as exc:
            log.warning("No thumbnail for image %s: %s", row.id, exc)
            return None
        return jpeg

    def _path(self, row: ImageRow) -> Path:
        # Named by the stored original (a new image under a reused id gets a new file), not guessable from the id.
        name = hashlib.sha256(f"{row.id}\0{row.blob_key}".encode()).hexdigest()[:24] + ".jpg"
        return self.folder / name

    def _write(self, path: Path, jpeg: bytes) -> None:
        """Written whole under a temporary name first: never a half file under the final one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=self.folder, prefix=".part-")
        with os.fdopen(fd, "wb") as f:
            f.write(jpeg)
        os.replace(part, path)
