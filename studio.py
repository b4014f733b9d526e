"""The Mask Studio service: what every UI event and API endpoint does, without any Gradio in it.

`Studio` ties the segmenter, the database, the blob store and the renderer together, checks every
input once at this edge, and keeps a small in-process cache of decoded images and their mask
indexes so that clicks and renders never touch the disk or decode a mask.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

import imaging
import masks as rle
import render
from errors import Conflict, InvalidInput, NotFound, SegmentationRejected
from sam2_client import Progress, Segmenter
from settings import Settings
from storage import BlobStore, Database, ImageRow, MaskRow, check_image_id, new_image_id

log = logging.getLogger("mask_studio")

DISPLAY_MAX_SIDE = 1024
CACHE_BUDGET_BYTES = 1_500_000_000
MAX_LIST = 1000


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


def check_point(x: object, y: object, width: int, height: int) -> tuple[int, int]:
    """Pixel coordinates as ints inside the image, or a message giving the image's size."""
    out = []
    for name, v in (("x", x), ("y", y)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidInput(f"{name} must be a number (a pixel coordinate), got {v!r}.")
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidInput(f"{name} must be a finite number, got {v!r}.")
        out.append(int(math.floor(v)))
    px, py = out
    if not (0 <= px < width and 0 <= py < height):
        raise InvalidInput(
            f"Point ({x}, {y}) is outside the image, which is {width}×{height} pixels "
            f"(x from 0 to {width - 1}, y from 0 to {height - 1})."
        )
    return px, py


def check_mask_id(mask_id: object) -> int:
    if isinstance(mask_id, bool) or not isinstance(mask_id, (int, float)) or (
        isinstance(mask_id, float) and not mask_id.is_integer()
    ):
        raise InvalidInput(f"mask_id must be a whole number, got {mask_id!r}.")
    return int(mask_id)


class Studio:
    def __init__(self, settings: Settings, segmenter: Segmenter, db: Database, blobs: BlobStore):
        self.settings = settings
        self.segmenter = segmenter
        self.db = db
        self.blobs = blobs
        self._cache: OrderedDict[str, Loaded] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    # ---- ingest ----------------------------------------------------------------------------
    def generate_and_store(
        self,
        data: bytes,
        *,
        image_id: str | None = None,
        owner: str = "local",
        progress: Progress | None = None,
    ) -> dict:
        """Decode, segment, store (one transaction) and index an image; returns the API summary."""
        say = progress or (lambda f, t: None)
        if image_id is not None and image_id != "":
            image_id = check_image_id(image_id)
            if self.db.image_exists(image_id):
                raise Conflict(
                    f"Image id {image_id!r} is already taken: choose another id, or delete that image first."
                )
        else:
            image_id = new_image_id()
        say(0.02, "Reading the image")
        rgb = imaging.load_image(
            data, max_pixels=self.settings.max_image_pixels, max_bytes=self.settings.max_upload_bytes
        )
        h, w = rgb.shape[:2]
        say(0.05, f"Segmenting {w}×{h} with the {self.segmenter.engine}")
        records = self.segmenter.generate(rgb, progress=_fraction(progress, 0.05, 0.8))
        mask_rows = self._mask_rows(image_id, records, (h, w))
        say(0.82, f"Storing {len(mask_rows)} masks")
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
            self.db.insert_image(row, mask_rows)
        except BaseException:
            self.blobs.delete(row.blob_key)
            raise
        say(0.9, "Indexing masks")
        self._remember(self._build(row, rgb, mask_rows))
        say(1.0, "Done")
        return {
            "message": f"Stored {len(mask_rows)} masks for image {image_id}.",
            "image_id": image_id,
            "mask_count": len(mask_rows),
            "image_dimensions": {"width": w, "height": h},
            "mask_ids": [m.mask_id for m in mask_rows],
            "engine": row.engine,
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
                    s3_key=None,
                    upload_state="none",
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

    def _remember(self, loaded: Loaded) -> None:
        with self._cache_lock:
            self._cache[loaded.row.id] = loaded
            self._cache.move_to_end(loaded.row.id)
            total = sum(v.nbytes for v in self._cache.values())
            while len(self._cache) > 1 and total > CACHE_BUDGET_BYTES:
                _, old = self._cache.popitem(last=False)
                total -= old.nbytes

    def _forget(self, image_id: str) -> None:
        with self._cache_lock:
            self._cache.pop(image_id, None)

    def load(self, image_id: object, owner: str | None) -> Loaded:
        """The image, from the cache or rebuilt from storage; another owner's image is 'not found'."""
        if not isinstance(image_id, str) or not image_id:
            raise InvalidInput("image_id is required (a string such as 'img_20260101_120000_ab12cd34').")
        row = self.db.get_image(check_image_id_lenient(image_id), owner)
        with self._cache_lock:
            hit = self._cache.get(image_id)
            if hit is not None and hit.row.mask_count == row.mask_count:
                self._cache.move_to_end(image_id)
                return hit
            lock = self._load_locks.setdefault(image_id, threading.Lock())
        with lock:  # one build per image, however many requests arrive at once
            with self._cache_lock:
                hit = self._cache.get(image_id)
            if hit is not None and hit.row.mask_count == row.mask_count:
                return hit
            rgb = imaging.decode_png(self.blobs.get(row.blob_key))
            loaded = self._build(row, rgb, self.db.masks(image_id))
            self._remember(loaded)
            return loaded

    # ---- reading -----------------------------------------------------------------------------
    def info(self, image_id: object, owner: str | None) -> dict:
        loaded = self.load(image_id, owner)
        r = loaded.row
        return {
            "image_id": r.id,
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
        return m.mask_url

    def list_images(self, owner: str | None) -> list[dict]:
        return [r.summary() for r in self.db.list_images(owner, limit=MAX_LIST)]

    def mask_at_point(self, image_id: object, x: object, y: object, owner: str | None) -> dict:
        loaded = self.load(image_id, owner)
        px, py = check_point(x, y, loaded.row.width, loaded.row.height)
        candidates = loaded.index.masks_at(px, py)
        if not candidates:
            return {"mask_id": None, "candidates": [], "area": None, "bbox": None}
        m = loaded.masks[candidates[0]]
        return {"mask_id": m.mask_id, "candidates": candidates, "area": m.area, "bbox": m.bbox}

    def mask(self, loaded: Loaded, mask_id: object) -> MaskRow:
        mid = check_mask_id(mask_id)
        if mid not in loaded.masks:
            raise NotFound(f"Image {loaded.row.id} has no mask {mid} ({_id_range(loaded)}).")
        return loaded.masks[mid]

    def mask_png(self, image_id: object, mask_id: object, owner: str | None) -> bytes:
        loaded = self.load(image_id, owner)
        m = self.mask(loaded, mask_id)
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
        steps = render.parse_instructions(instructions, loaded.index, loaded.row.id)
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
        if mask_ids is None:
            chosen = sorted(loaded.masks)
        else:
            if not isinstance(mask_ids, (list, tuple)):
                raise InvalidInput("mask_ids must be a list of mask ids, or null for all masks.")
            chosen = list(dict.fromkeys(self.mask(loaded, m).mask_id for m in mask_ids))
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
            "info": {"description": f"Mask Studio export of {r.id}", "date_created": _now(), "engine": r.engine},
            "images": [
                {"id": 1, "width": r.width, "height": r.height, "file_name": f"{r.id}.png", "image_id": r.id}
            ],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
        }

    # ---- deleting ----------------------------------------------------------------------------
    def delete(self, image_id: object, owner: str | None) -> dict:
        if not isinstance(image_id, str) or not image_id:
            raise InvalidInput("image_id is required.")
        row = self.db.get_image(check_image_id_lenient(image_id), owner)
        self.db.delete_image(row.id)
        self._forget(row.id)
        self.blobs.delete(row.blob_key)
        return {"message": f"Image {row.id} and its {row.mask_count} masks were deleted.", "image_id": row.id}

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


def check_image_id_lenient(image_id: str) -> str:
    """Looking up an id that could never exist answers like any unknown id (and never reaches SQL oddly)."""
    try:
        return check_image_id(image_id)
    except InvalidInput:
        shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
        raise NotFound(f"No image with id {shown!r}. /list_images shows the stored ones.") from None


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

