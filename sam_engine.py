"""The engine logic every SAM-family model shares: cached embeddings, prompts through the decoder, automatic masks.

`PromptModelSegmenter` is the `Segmenter` for any model with the three low-level calls below; nothing in it
knows which model it drives (MobileSAM: mobilesam_engine; SAM 2: sam2_engine):
- `embed(rgb uint8 HxWx3) -> embedding` (with `nbytes`): the costly step, once per image;
- `decode(emb, points [N,K,2] (x, y) original pixels | None, labels [N,K] (1 include, 0 exclude, -1 pad) | None,
  boxes [N,4] | None, multimask=True) -> (low-res logits [N,3,L,L], predicted IoU [N,3])` (N×1 without multimask);
- `to_full(emb, low_res [M,L,L]) -> logits [M,H,W]` at the original size (mask = logits > 0); a model may also
  have `full_masks(emb, low_res) -> bool [M,H,W]`, the same masks computed faster (prompts and the automatic
  pass use it when present: auto_masks.full_masks), and `staged_decoding` with `decode_staged` (the automatic
  pass then upscales only the prompts whose outputs may be new masks: auto_masks).

How prompts are answered:
- one embedding per image, cached by the pixels' hash and shared by every session (embedding_cache), so after
  `prepare` or a first click every further prompt on that image costs only the decoder;
- `segment`: one point and no box → the best (highest predicted IoU) of SAM's three multimask outputs, as SAM
  recommends for an ambiguous single click; several points or a box → SAM's single-mask output;
- `candidates`: the three multimask outputs, largest first, near-duplicates (IoU ≥ 0.95) merged: whole / part /
  sub-part, for a second click at the same spot to step through;
- `generate`: the automatic pass (`auto_masks.generate`, or the pass the engine is given).
`run` wraps every piece of model work (on a ZeroGPU Space: inside `spaces.GPU`; see sam2_engine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

import auto_masks
import masks as rle
from embedding_cache import EmbeddingCache, image_key
from errors import InvalidInput, SegmentationRejected
from segmenter import OnMasks, Progress, check_cancel, no_progress
from validation import check_prompt, check_rgb

AutoPass = Callable[..., list[dict]]  # (model, emb, image, *, max_masks, progress, cancel, on_masks)
Runner = Callable[..., Any]  # run(fn, *args) -> fn(*args), possibly somewhere else (a GPU worker)
EMBED_SHARE = 0.3  # of an automatic run's progress bar: the encoder's part
DUPLICATE_IOU = 0.95  # two candidates this alike are one answer
STABILITY_OFFSET = 1.0  # SAM's: a mask is stable when cut-offs at logit ±1 give nearly the same mask


class PromptModelSegmenter:
    """A Segmenter over any SAM-family model with embed / decode / to_full (module docstring)."""

    prompts_natively = True

    def __init__(
        self,
        model: Any,
        *,
        engine: str,
        cache: EmbeddingCache,
        max_masks: int = 128,
        auto_pass: AutoPass | None = None,
        run: Runner | None = None,
    ):
        if max_masks < 1:
            raise InvalidInput(f"max_masks must be at least 1, got {max_masks}.")
        self.model = model
        self.engine = engine
        self.cache = cache
        self.max_masks = int(max_masks)
        # What /health and the status line name: the model's device and id, when the model has them.
        self.device: str = str(getattr(model, "device", "cpu"))
        self.model_id: str | None = getattr(model, "model_id", None)
        self._auto_pass = auto_pass or auto_masks.generate
        self._run = run or run_here

    # -- the Segmenter interface -------------------------------------------------------------------------

    def prepare(self, image: np.ndarray) -> None:
        """Embed the image now (cached), so the first click on it costs only the decoder."""
        check_rgb(image)
        self._run(self._embedding, image, None, None)

    def generate(
        self,
        image: np.ndarray,
        *,
        progress: Progress | None = None,
        cancel: threading.Event | None = None,
        on_masks: OnMasks | None = None,
    ) -> list[dict]:
        """Automatic overlapping masks as SAM2 records; `on_masks(new_records)` as they are found."""
        check_rgb(image)
        return self._run(self._generate, image, progress, cancel, on_masks)

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
        check_rgb(image)
        pts, labels, bx = check_prompt(points, point_labels, box, image.shape[1], image.shape[0])
        if progress is not None:
            progress(0.0, "Encoding the image")
        found = self._run(self._prompted, image, pts, labels, bx, cancel)
        if progress is not None:
            progress(1.0, "Mask ready")
        return max(found, key=lambda r: r["predicted_iou"])

    def candidates(
        self,
        image: np.ndarray,
        *,
        points: list[list[float]] | None = None,
        point_labels: list[int] | None = None,
        box: list[float] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[dict]:
        """The decoder's answers as records, largest first, near-duplicates merged: for one point, SAM's three
        (whole / part / sub-part); for several points or a box, its single answer."""
        check_rgb(image)
        pts, labels, bx = check_prompt(points, point_labels, box, image.shape[1], image.shape[0])
        found = self._run(self._prompted, image, pts, labels, bx, cancel)
        return sorted(found, key=lambda r: -r["area"])

    def health(self) -> tuple[bool, str]:
        return True, f"{self.engine} ready"

    def close(self) -> None:
        self.cache.clear()

    # -- the work (inside `run`) -------------------------------------------------------------------------

    def _generate(self, image, progress, cancel, on_masks) -> list[dict]:
        report = progress or no_progress
        emb = self._embedding(image, report, cancel)

        def scaled(fraction: float, text: str) -> None:
            report(EMBED_SHARE + (1 - EMBED_SHARE) * fraction, text)

        records = self._auto_pass(
            self.model, emb, image, max_masks=self.max_masks, progress=scaled, cancel=cancel, on_masks=on_masks
        )
        report(1.0, f"{len(records)} masks ready")
        return records

    def _prompted(self, image, points, labels, box, cancel) -> list[dict]:
        """The decoder's non-empty answers, near-duplicates merged (the better predicted IoU kept)."""
        emb = self._embedding(image, None, cancel)
        multimask = box is None and points is not None and len(points) == 1
        pts = None if points is None else np.asarray(points, np.float32)[None]
        lab = None if labels is None else np.asarray(labels, np.int64)[None]
        boxes = None if box is None else np.asarray(box, np.float32)[None]
        low, iou = self.model.decode(emb, pts, lab, boxes, multimask=multimask)
        check_cancel(cancel)
        order = np.argsort(-iou[0], kind="stable")  # better first: it survives a merge
        masks = auto_masks.full_masks(self.model, emb, low[0][order])
        point = [[float(x), float(y)] for (x, y), lab in zip(points or [], labels or []) if lab == 1] or None
        kept: list[tuple[np.ndarray, dict]] = []
        for k, mask in zip(order, masks):
            if mask.any() and all(mask_iou(mask, other) < DUPLICATE_IOU for other, _ in kept):
                stability = float(auto_masks.stability_score(low[0][k : k + 1], 0.0, STABILITY_OFFSET)[0])
                kept.append((mask, mask_record(mask, float(iou[0][k]), stability, point, image.shape[:2])))
        if not kept:
            raise SegmentationRejected("No object was found at these prompts: try another point or a larger box.")
        return [record for _, record in kept]

    def _embedding(self, image: np.ndarray, progress: Progress | None, cancel: threading.Event | None = None) -> Any:
        """The cached embedding of this image (computed once, however many callers ask at the same time)."""
        check_cancel(cancel)
        key = image_key(image)
        if progress is not None and key not in self.cache:
            progress(0.0, "Encoding the image")
        emb = self.cache.get(key, lambda: self.model.embed(image))
        if progress is not None:
            progress(EMBED_SHARE, "Image encoded")
        check_cancel(cancel)
        return emb


def run_here(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


# ---------------------------------------------------------------------------------------------------------
# Pure helpers, shared with the automatic pass.


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def mask_record(mask: np.ndarray, iou: float, stability: float, point, size: tuple[int, ...]) -> dict:
    """A boolean full-size mask as a SAM2 generator record (COCO compressed RLE)."""
    height, width = size[:2]
    return {
        "segmentation": rle.encode(mask),
        "area": int(np.count_nonzero(mask)),
        "bbox": rle.bbox_of(mask),
        "predicted_iou": round(float(iou), 4),
        "stability_score": round(float(stability), 4),
        "point_coords": point,
        "crop_box": [0, 0, int(width), int(height)],
    }
