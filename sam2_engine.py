"""The in-process SAM 2 engine, and the model-independent engine logic every SAM-family model shares.

`PromptModelSegmenter` is the `Segmenter` for any model with the low-level calls `embed` / `decode` /
`to_full` (see sam2_model's docstring); nothing in it knows which model it drives:
- one embedding per image, cached (LRU by the pixels' hash), so after `prepare` or a first click every
  further prompt on that image costs only the decoder;
- prompts go through the decoder: one point asks for SAM's three multimask candidates (whole / part /
  sub-part) and the best by predicted IoU wins; several points or a box ask for the single-mask answer;
  `candidates` returns all three, best first;
- automatic masks come from an automatic pass with the signature of `auto_masks.generate(model, emb,
  image, *, max_masks, progress, cancel, on_masks)`. Until that module lands, `grid_pass` below (a plain
  point grid, filtered on the low-res logits) is the default.
`Sam2Segmenter` is that engine on a SAM 2 / 2.1 checkpoint (`Sam2Segmenter.load(model_id, cache_dir, ...)`).
On a Hugging Face ZeroGPU Space the model work of each call runs inside `spaces.GPU` when `spaces` imports.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from segmenter import Progress
from validation import check_prompt, check_rgb

import masks as rle
from errors import InvalidInput, SegmentationCancelled, SegmentationRejected

log = logging.getLogger("mask_studio.sam2_engine")

OnMasks = Callable[[list[dict]], None]
AutoPass = Callable[..., list[dict]]  # (model, emb, image, *, max_masks, progress, cancel, on_masks)
EMBED_SHARE = 0.3  # of an automatic run's progress bar: the encoder's part
GPU_SECONDS = 120  # what a ZeroGPU call may take at most (an automatic pass on a large image included)


class PromptModelSegmenter:
    """A Segmenter over any SAM-family model with embed / decode / to_full (module docstring)."""

    prompts_natively = True

    def __init__(
        self,
        model: Any,
        *,
        engine: str,
        max_masks: int = 128,
        cache_size: int = 4,
        auto_pass: AutoPass | None = None,
        on_gpu: Callable[..., Any] | None = None,
    ):
        if max_masks < 1:
            raise InvalidInput(f"max_masks must be at least 1, got {max_masks}.")
        self.model = model
        self.engine = engine
        self.max_masks = int(max_masks)
        self.device = str(getattr(model, "device", "cpu"))
        self.model_id: str | None = getattr(model, "model_id", None)
        self._auto_pass = auto_pass or grid_pass
        self._on_gpu = on_gpu or _direct
        self._cache: OrderedDict[bytes, Any] = OrderedDict()
        self._cache_size = max(1, int(cache_size))
        self._lock = threading.Lock()

    # -- the Segmenter interface -------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> None:
        """Embed the image now (cached), so the first click on it costs only the decoder."""
        check_rgb(image)
        self._on_gpu(self._embedding, image, None, None)

    def generate(
        self,
        image: np.ndarray,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        params: dict | None = None,
        on_masks: OnMasks | None = None,
    ) -> list[dict]:
        """Automatic overlapping masks as SAM2 records. `params` (SAM2 generator arguments) are hints: ignored."""
        check_rgb(image)
        return self._on_gpu(self._generate, image, progress, cancel, on_masks)

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
        """The best mask for these prompts, as a record (SegmentationRejected when the mask is empty)."""
        return self.candidates(image, points=points, point_labels=point_labels, box=box, cancel=cancel)[0]

    def candidates(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[dict]:
        """The decoder's non-empty answers for these prompts, best predicted IoU first.

        One point without a box: up to three (whole / part / sub-part); otherwise the single-mask answer."""
        check_rgb(image)
        points, point_labels, box = check_prompt(points, point_labels, box, image.shape[1], image.shape[0])
        return self._on_gpu(self._prompted, image, points, point_labels, box, cancel)

    def health(self) -> tuple[bool, str]:
        return True, f"{self.engine} ready"

    def close(self) -> None:
        with self._lock:
            self._cache.clear()

    # -- the work (inside spaces.GPU on ZeroGPU) ---------------------------------------------------------

    def _generate(self, image, progress, cancel, on_masks) -> list[dict]:
        report = progress or _no_progress
        emb = self._embedding(image, report, cancel)

        def scaled(fraction: float, text: str) -> None:
            report(EMBED_SHARE + (1 - EMBED_SHARE) * fraction, text)

        records = self._auto_pass(
            self.model, emb, image, max_masks=self.max_masks, progress=scaled, cancel=cancel, on_masks=on_masks
        )
        report(1.0, f"{len(records)} masks ready")
        return records

    def _prompted(self, image, points, labels, box, cancel) -> list[dict]:
        emb = self._embedding(image, None, cancel)
        height, width = image.shape[:2]
        pts = None if points is None else np.asarray(points, np.float32)[None]
        lab = None if labels is None else np.asarray(labels, np.int64)[None]
        boxes = None if box is None else np.asarray(box, np.float32)[None]
        multimask = box is None and points is not None and len(points) == 1
        low, iou = self.model.decode(emb, pts, lab, boxes, multimask=multimask)
        _check_cancel(cancel)
        order = np.argsort(-iou[0], kind="stable")
        full = np.asarray(self.model.to_full(emb, low[0][order])) > 0
        point = [list(points[labels.index(1)])] if points and 1 in labels else None
        out = []
        for k, mask in zip(order, full):
            if mask.any():
                stability = float(stability_scores(low[0][k : k + 1])[0])
                out.append(mask_record(mask, float(iou[0][k]), stability, point, (height, width)))
        if not out:
            raise SegmentationRejected("No object was found at these prompts: try another point or a larger box.")
        return out

    def _embedding(self, image: np.ndarray, progress: Progress | None, cancel: threading.Event | None = None) -> Any:
        """The cached embedding of this image, computed (outside the lock) on a miss."""
        _check_cancel(cancel)
        digest = hashlib.blake2b(repr(image.shape).encode(), digest_size=16)
        digest.update(np.ascontiguousarray(image).data)
        key = digest.digest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        if progress is not None:
            progress(0.0, "Encoding the image")
        emb = self.model.embed(image)
        with self._lock:
            self._cache[key] = emb
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        if progress is not None:
            progress(EMBED_SHARE, "Image encoded")
        _check_cancel(cancel)
        return emb


class Sam2Segmenter(PromptModelSegmenter):
    """SAM 2 / 2.1 in this process (transformers), with the shared engine logic above."""

    @classmethod
    def load(
        cls,
        model_id: str,
        cache_dir: str | Path | None = None,
        device: str | None = None,
        *,
        max_masks: int = 128,
        cache_size: int = 4,
        auto_pass: AutoPass | None = None,
    ) -> Sam2Segmenter:
        """Load `model_id` (e.g. facebook/sam2.1-hiera-tiny) from the Hub into `cache_dir` onto `device`.

        SegmentationUnavailable (with the reason) when it cannot be loaded here."""
        import sam2_model

        adapter = sam2_model.load(model_id, cache_dir, device)
        return cls.from_adapter(adapter, max_masks=max_masks, cache_size=cache_size, auto_pass=auto_pass)

    @classmethod
    def from_adapter(cls, adapter: Any, **options: Any) -> Sam2Segmenter:
        """The engine on an already loaded `sam2_model.Sam2Adapter` (tests build one from a config)."""
        return cls(adapter, engine=f"SAM2 in-process ({adapter.description})", on_gpu=zero_gpu(), **options)


# ---------------------------------------------------------------------------------------------------------
# ZeroGPU: on a Hugging Face ZeroGPU Space a GPU is attached only inside functions decorated with
# spaces.GPU; elsewhere that decorator changes nothing, so it is used whenever the package imports.


def _direct(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def zero_gpu(seconds: int = GPU_SECONDS) -> Callable[..., Any]:
    """A runner `run(fn, *args)` that calls fn inside `spaces.GPU` when `spaces` is importable, else directly."""
    try:
        import spaces
    except ImportError:
        return _direct
    log.info("spaces is installed: SAM2 model work runs inside spaces.GPU (ZeroGPU)")
    return spaces.GPU(duration=seconds)(_direct)


# ---------------------------------------------------------------------------------------------------------
# Pure helpers shared with the automatic pass.


def _no_progress(fraction: float, text: str) -> None:
    pass


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise SegmentationCancelled("Segmentation cancelled.")


def stability_scores(logits: np.ndarray, offset: float = 1.0) -> np.ndarray:
    """SAM's stability: the share of the mask (logits > -offset) that stays when the cut-off moves to +offset."""
    flat = logits.reshape(logits.shape[0], -1)
    inner = (flat > offset).sum(axis=1)
    outer = (flat > -offset).sum(axis=1)
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0)


def mask_record(mask: np.ndarray, iou: float, stability: float, point, size: tuple[int, int]) -> dict:
    """A boolean full-size mask as a SAM2 generator record (COCO compressed RLE)."""
    height, width = size
    bbox = rle.bbox_of(mask)
    return {
        "segmentation": rle.encode(mask),
        "area": int(mask.sum()),
        "bbox": bbox,
        "predicted_iou": round(float(iou), 4),
        "stability_score": round(float(stability), 4),
        "point_coords": point,
        "crop_box": [0, 0, width, height],
    }


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


# ---------------------------------------------------------------------------------------------------------
# The automatic pass used until auto_masks lands (same signature): a regular point grid, three candidates
# per point, every decision on the low-res logits, only the survivors upscaled.


def grid_pass(
    model: Any,
    emb: Any,
    image: np.ndarray,
    *,
    max_masks: int,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_masks: OnMasks | None = None,
    points_per_side: int = 16,
    pred_iou: float = 0.88,
    stability: float = 0.92,
    nms_iou: float = 0.85,
    min_area_fraction: float = 0.001,
    batch: int = 64,
) -> list[dict]:
    """Automatic masks: grid prompts → filter (predicted IoU, stability, specks) → mask NMS → full size."""
    report = progress or _no_progress
    height, width = image.shape[:2]
    steps = (np.arange(points_per_side) + 0.5) / points_per_side
    grid = np.array([(x * width, y * height) for y in steps for x in steps], np.float32)
    kept: list[tuple[float, float, np.ndarray, np.ndarray, tuple[float, float]]] = []
    for start in range(0, len(grid), batch):
        _check_cancel(cancel)
        pts = grid[start : start + batch]
        low, iou = model.decode(emb, pts[:, None, :], np.ones((len(pts), 1), np.int64), None, multimask=True)
        flat, scores = low.reshape(-1, *low.shape[-2:]), iou.reshape(-1)
        stab = stability_scores(flat)
        min_area = min_area_fraction * flat.shape[-1] * flat.shape[-2]
        for k in np.flatnonzero((scores >= pred_iou) & (stab >= stability)):
            if np.count_nonzero(flat[k] > 0) >= min_area:
                kept.append((float(scores[k]), float(stab[k]), flat[k].copy(), flat[k] > 0, tuple(pts[k // 3])))
        report(0.8 * min(1.0, (start + batch) / len(grid)), f"{min(len(grid), start + batch)} of {len(grid)} prompts")
    kept.sort(key=lambda c: -c[0])
    chosen: list[tuple[float, float, np.ndarray, np.ndarray, tuple[float, float]]] = []
    for cand in kept:
        if len(chosen) >= max_masks:
            break
        if all(_mask_iou(cand[3], other[3]) < nms_iou for other in chosen):
            chosen.append(cand)
    records: list[dict] = []
    full_masks: list[np.ndarray] = []
    for start in range(0, len(chosen), 8):
        _check_cancel(cancel)
        part = chosen[start : start + 8]
        new = []
        for (score, stab, _, _, point), logits in zip(part, model.to_full(emb, np.stack([c[2] for c in part]))):
            mask = logits > 0
            if mask.any() and all(_mask_iou(mask, other) < 0.95 for other in full_masks):
                full_masks.append(mask)
                point_coords = [[round(float(point[0]), 1), round(float(point[1]), 1)]]
                new.append(mask_record(mask, score, stab, point_coords, (height, width)))
        records.extend(new)
        if new and on_masks is not None:
            on_masks(new)
        report(0.8 + 0.2 * min(1.0, (start + 8) / max(1, len(chosen))), f"{len(records)} masks ready")
    return records
