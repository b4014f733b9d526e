"""The in-process MobileSAM engine: SAM masks on the CPU, no service, with the image embedding cached per image.

A click costs one decoder pass on the cached embedding (tens of ms); the embedding (about a second at 1024²)
is computed once per picture and shared by every session (embedding_cache). How prompts are answered:
- `segment`: one point and no box → the best (highest predicted IoU) of SAM's three multimask outputs, as SAM
  recommends for an ambiguous single click; several points or a box → SAM's single-mask output, which it
  is trained to give for unambiguous prompts.
- `candidates`: the three multimask outputs, largest first, near-duplicates (IoU ≥ 0.95) merged: whole /
  part / sub-part, for a second click at the same spot to step through.
- `generate`: the automatic pass, `auto_masks.generate` when that module is present, else `_grid_pass`
  below (a plain 16×16 grid of single-point prompts; slow and incomplete, a stand-in until auto_masks lands).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

import masks
from builtin_segmenter import _as_rgb, _cancellable, _check_box, _check_points
from embedding_cache import DiskStore, EmbeddingCache, image_key
from errors import InvalidInput, SegmentationUnavailable
from sam2_client import Progress

log = logging.getLogger("mask_studio.mobilesam")

ENGINE_MOBILESAM = "MobileSAM (in-process, CPU)"
THREADS = 2  # a small CPU box: more threads than cores only adds contention
CACHE_BYTES = 48 * 4 * 1024 * 1024  # 48 embeddings of 4 MB in memory
DISK_CACHE_BYTES = 256 * 4 * 1024 * 1024  # 256 on disk
DUPLICATE_IOU = 0.95
STABILITY_OFFSET = 1.0  # SAM's: a mask is stable when thresholds at logit ±1 give nearly the same mask
GRID_SIDE = 16
GRID_MIN_IOU = 0.86
GRID_MIN_STABILITY = 0.92


class MobileSamSegmenter:
    """The Segmenter that runs MobileSAM in this process (see the module docstring)."""

    engine = ENGINE_MOBILESAM
    prompts_natively = True

    def __init__(self, model, *, max_masks: int, cache: EmbeddingCache, checkpoint: Path, official: bool):
        self.model = model  # mobilesam_model.MobileSam: embed / decode / to_full
        self.max_masks = int(max_masks)
        self.cache = cache
        self.checkpoint = checkpoint
        self.official = official

    @classmethod
    def load(cls, *, checkpoint: Path | None, models_dir: Path, max_masks: int) -> MobileSamSegmenter:
        """Obtain the weights (downloading once when needed) and load the model, or raise
        SegmentationUnavailable saying why (no torch, no weights, a file that is not a MobileSAM checkpoint)."""
        import model_weights

        if max_masks < 1:
            raise InvalidInput(f"max_masks must be at least 1, got {max_masks}.")
        try:
            import torch

            import mobilesam_model
        except ImportError as exc:
            raise SegmentationUnavailable(
                f"MobileSAM needs PyTorch, which is not installed ({exc}). Install it with: pip install torch==2.13.0"
            ) from exc
        path, official = model_weights.resolve(checkpoint, Path(models_dir))
        torch.set_num_threads(THREADS)
        model = _load_model(mobilesam_model, path)
        if not official:
            log.warning("Running MobileSAM with %s, which is not the official checkpoint file", path)
        disk = DiskStore(
            Path(models_dir) / "embeddings" / model_weights.sha256_of(path)[:12],
            _embedding_to_array,
            _embedding_from_array,
            DISK_CACHE_BYTES,
        )
        return cls(
            model, max_masks=max_masks, cache=EmbeddingCache(CACHE_BYTES, disk=disk), checkpoint=path, official=official
        )

    # ----------------------------------------------------------------------------------- Segmenter interface

    def prepare(self, image: np.ndarray):
        """Compute (or find) the image's embedding; after this, prompts on the image cost only the decoder."""
        rgb = _as_rgb(image)
        return self.cache.get(image_key(rgb), lambda: self.model.embed(rgb))

    def segment(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> dict:
        """One object's mask from points (1 include, 0 exclude) and/or a box [x0, y0, x1, y1] (see module doc)."""
        rgb, pts, labels, rect = _prompts(image, points, point_labels, box)
        if cancel is not None:
            progress = _cancellable(progress, cancel)
        if progress is not None:
            progress(0.0, "Encoding the image")
        emb = self.prepare(rgb)
        single_click = len(pts) == 1 and rect is None
        low, iou = self.model.decode(emb, *_arrays(pts, labels, rect), multimask=single_click)
        best = int(np.argmax(iou[0]))
        logits = self.model.to_full(emb, low[0, best : best + 1])[0]
        if progress is not None:
            progress(1.0, "Mask ready")
        return _record(logits, float(iou[0, best]), pts, rgb.shape)

    def candidates(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
    ) -> list[dict]:
        """SAM's three multimask answers as records, largest first, near-duplicates merged (whole / part / sub-part)."""
        rgb, pts, labels, rect = _prompts(image, points, point_labels, box)
        emb = self.prepare(rgb)
        low, iou = self.model.decode(emb, *_arrays(pts, labels, rect), multimask=True)
        logits = self.model.to_full(emb, low[0])
        found = [(logits[k] > 0, float(iou[0, k]), k) for k in range(logits.shape[0])]
        kept: list[tuple[np.ndarray, float, int]] = []
        for mask, score, k in sorted(found, key=lambda f: -f[1]):  # better first: it survives a merge
            if mask.any() and all(_iou(mask, other) < DUPLICATE_IOU for other, _, _ in kept):
                kept.append((mask, score, k))
        kept.sort(key=lambda f: -int(f[0].sum()))
        return [_record(logits[k], score, pts, rgb.shape) for _, score, k in kept]

    def generate(
        self, image: np.ndarray, *, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> list[dict]:
        """Automatic masks of the whole image as SAM2 records (auto_masks' pass when present)."""
        rgb = _as_rgb(image)
        if progress is not None:
            progress(0.0, "Encoding the image")
        emb = self.prepare(rgb)
        try:
            import auto_masks
        except ImportError:
            return _grid_pass(self.model, emb, rgb, self.max_masks, progress, cancel)
        return auto_masks.generate(self.model, emb, rgb, max_masks=self.max_masks, progress=progress, cancel=cancel)

    def health(self) -> tuple[bool, str]:
        note = "" if self.official else f" with a non-official checkpoint ({self.checkpoint.name})"
        return True, f"{self.engine} ready{note}"

    def close(self) -> None:
        self.cache.clear()


# --------------------------------------------------------------------------------------------------- helpers


def _load_model(mobilesam_model, path: Path):
    """Load strictly; a file that is not a complete MobileSAM checkpoint becomes a clear message."""
    try:
        return mobilesam_model.load(path)
    except (RuntimeError, ValueError, EOFError, OSError, KeyError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise SegmentationUnavailable(
            f"{path} is not a usable MobileSAM checkpoint (truncated, damaged or another model: {first}). "
            "Point MOBILESAM_CHECKPOINT at the official mobile_sam.pt, or unset it to download that file."
        ) from exc


def _embedding_to_array(emb) -> np.ndarray:
    """Features flattened, followed by the original and input (h, w): one float32 vector per file."""
    sizes = np.array([*emb.original_size, *emb.input_size], np.float32)
    return np.concatenate([emb.features.numpy().ravel(), sizes])


def _embedding_from_array(arr: np.ndarray):
    import torch

    import mobilesam_model

    side, dim = mobilesam_model.EMBED_SIZE, mobilesam_model.PROMPT_DIM
    if arr.shape != (dim * side * side + 4,):
        raise ValueError(f"expected {dim * side * side + 4} values, got shape {arr.shape}")
    features = torch.from_numpy(np.ascontiguousarray(arr[:-4])).view(1, dim, side, side)
    h, w, ih, iw = (int(v) for v in arr[-4:])
    return mobilesam_model.Embedding(features, (h, w), (ih, iw))


def _prompts(image, points, point_labels, box):
    """Validate once at the edge (the built-in engine's checks and messages)."""
    rgb = _as_rgb(image)
    height, width = rgb.shape[:2]
    pts, labels = _check_points(points, point_labels, width, height)
    rect = _check_box(box, width, height)
    if not pts and rect is None:
        raise InvalidInput("Give at least one point or a box.")
    return rgb, pts, labels, rect


def _arrays(pts, labels, rect):
    """One prompt as the decoder's batched arrays (points at pixel centres are the decoder's job)."""
    points = np.array([pts], np.float32).reshape(1, -1, 2) if pts else None
    lab = np.array([labels], np.int64).reshape(1, -1) if pts else None
    boxes = None if rect is None else np.array([rect], np.float32)
    return points, lab, boxes


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


def stability(logits: np.ndarray, offset: float = STABILITY_OFFSET) -> np.ndarray:
    """SAM's stability score per mask: |logits > +offset| / |logits > -offset| (over the last two axes)."""
    inner = np.count_nonzero(logits > offset, axis=(-2, -1))
    outer = np.count_nonzero(logits > -offset, axis=(-2, -1))
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0)


def _record(logits: np.ndarray, predicted_iou: float, pts, shape) -> dict:
    """A full-size logit map → one SAM2 record."""
    mask = logits > 0
    bbox = masks.bbox_of(mask)
    return {
        "segmentation": masks.encode(mask),
        "area": int(np.count_nonzero(mask)),
        "bbox": bbox,
        "predicted_iou": round(predicted_iou, 4),
        "stability_score": round(float(stability(logits)), 4),
        "point_coords": [[float(x), float(y)] for x, y in pts] or None,
        "crop_box": [0, 0, int(shape[1]), int(shape[0])],
    }


def _grid_pass(model, emb, rgb: np.ndarray, max_masks: int, progress: Progress | None, cancel) -> list[dict]:
    """Stand-in automatic pass (replaced by auto_masks): a GRID_SIDE² grid of include points, filtered on the
    256² logits by predicted IoU and stability, deduplicated (IoU ≥ 0.95), the best max_masks kept."""
    report = _cancellable(progress, cancel) if cancel is not None else progress
    height, width = rgb.shape[:2]
    cells = (np.arange(GRID_SIDE) + 0.5) / GRID_SIDE
    grid = np.array([[x * width, y * height] for y in cells for x in cells], np.float32)
    chosen: list[tuple[float, np.ndarray, list[float]]] = []
    step = 32
    for start in range(0, len(grid), step):
        if report is not None:
            report(0.1 + 0.8 * start / len(grid), f"Prompting {start}/{len(grid)} points")
        pts = grid[start : start + step]
        low, iou = model.decode(emb, pts[:, None, :], np.ones((len(pts), 1), np.int64))
        good = (iou >= GRID_MIN_IOU) & (stability(low) >= GRID_MIN_STABILITY)
        for i, k in zip(*np.nonzero(good), strict=True):
            chosen.append((float(iou[i, k]), low[i, k], pts[i].tolist()))
    chosen.sort(key=lambda c: -c[0])
    records: list[dict] = []
    kept: list[np.ndarray] = []
    for score, low, point in chosen:
        if len(records) >= max_masks:
            break
        mask_logits = model.to_full(emb, low[None])[0]
        mask = mask_logits > 0
        if mask.any() and all(_iou(mask, other) < DUPLICATE_IOU for other in kept):
            kept.append(mask)
            records.append(_record(mask_logits, score, [point], rgb.shape))
    if report is not None:
        report(1.0, f"{len(records)} masks")
    return records
