"""Fast automatic masks from a SAM-family model: ~100–220 well-placed point prompts instead of a 32×32 grid.

SAM's standard generator decodes 1024 grid points (three masks each) and throws nearly all of them away as
duplicates; on a CPU that is a minute or two per photo. Here:
1. prompt points come from a cheap over-segmentation of the photo (Felzenszwalb's graph segmentation on a
   small copy) at two scales, coarse first and most salient region first, one point per region at its
   innermost pixel (distance-transform maximum). A point is skipped when a mask already accepted covers it
   and is not much larger than its region: prompts go where nothing fits yet. The number of prompts adapts
   to the picture: a scale stops once its last STALL_PROMPTS prompts found fewer than STALL_MASKS new masks
   that pass SAM's own thresholds (never before MIN_PROMPTS in all, never beyond PROMPT_BUDGET), so a plain
   photo costs ~100 prompts and a cluttered one up to PROMPT_BUDGET;
2. the decoder runs in batches (one include point per prompt; three multimask outputs: whole / part /
   sub-part, which is what makes the result hierarchical);
3. every decision is taken on the decoder's 256² low-resolution logits: keep outputs whose predicted IoU and
   stability score pass (stability = share of the mask that survives moving the logit cutoff from -1 to +1,
   measured on the logits around the mask upsampled 4×, as SAM measures it at full size: the 256² grid
   underrates small masks), that are not specks (< 0.1 % of the image), and that do not repeat an accepted
   mask (mask-IoU NMS, best predicted IoU first within a batch; accepted masks stay);
4. only the survivors are upscaled to full size and encoded as COCO RLE, one stage (scale) at a time so the
   gallery fills as they arrive; a final check at full size guarantees that no two records have IoU ≥ 0.95.
The model interface used: `decode(emb, points [N,K,2] (x, y) in original pixels, labels [N,K], None,
multimask=True) -> (low_res_logits [N,3,L,L], iou_pred [N,3])`, `to_full(emb, logits [M,L,L]) -> [M,H,W]` and
`low_res_frame(emb) -> (rows, cols, x_scale, y_scale)`: where the image lies in the L×L logits (MobileSAM pads
the image to a square, SAM 2 squashes it to one) and the scale from original to low-res pixels along x and y.
The result depends only on the image (fixed order everywhere, no time budget): it is deterministic.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

import masks as rle
from errors import InvalidInput
from segmenter import OnMasks, Progress, check_cancel, no_progress

PRED_IOU = 0.86  # a little under SAM's 0.88: SAM's grid may hit the same thing from a better-rated point
STABILITY = 0.90  # SAM keeps ≥ 0.95, but another prompt on the same thing may give a sharper mask than ours did
ROUGH_STABILITY = 0.75  # measured on the 256² logits, which underrate small masks (edges are coarse there)
STABILITY_OFFSET = 1.0
MIN_AREA_FRACTION = 0.001  # masks smaller than 0.1 % of the image are specks
NMS_IOU = 0.90  # low-res mask IoU from which a candidate repeats an accepted mask
DUPLICATE_IOU = 0.95  # the guarantee at full size
PROMPT_BUDGET = 240  # the most prompts a pass spends; the decoder is ~90 % of the time
BATCH = 24  # the decoder costs about the same per prompt from 8 to 32 prompts a batch
UPSCALE_CHUNK = 8
WORK_SIDE = 320  # the over-segmentation runs on a copy this long
# (Felzenszwalb scale, minimum region as a share of the working image), coarse first
SCALES = ((800.0, 1 / 150), (80.0, 1 / 2000))  # a middle scale measured worse: it spends prompts the fine one needs
MIN_REGION = 0.0003  # regions smaller than this share of the image get no prompt of their own
MIN_INNER = 1.5  # working pixels: thinner regions are slivers along an edge, not things
LOW_RES_AREA_SLACK = 0.7  # a mask of just 0.1 % can measure less on the coarse 256² grid
STALL_PROMPTS, STALL_MASKS = 48, 2  # a stage stops when its last 48 prompts added fewer than 2 masks
MIN_PROMPTS = 96  # below this many prompts the stall rule does not stop a pass (a few small things still count)
STRICT_IOU, STRICT_STABILITY = 0.88, 0.95  # SAM's generator's thresholds: the masks the stall rule counts
COVER_RATIO = 3.0  # a point is covered by an accepted mask at most this many times its region's area


def generate(
    model,
    emb,
    image: np.ndarray,
    *,
    max_masks: int,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    on_masks: OnMasks | None = None,
    pred_iou: float = PRED_IOU,
    stability: float = STABILITY,
) -> list[dict]:
    """Automatic masks of `image` (the RGB uint8 HxWx3 that `emb` embeds) as SAM2 records (module docstring).

    pred_iou and stability: the thresholds a mask must pass (tests with random weights open them)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidInput(f"Expected an RGB image of shape (H, W, 3), got {image.shape}.")
    if max_masks < 1:
        raise InvalidInput(f"max_masks must be at least 1, got {max_masks}.")
    report = progress or no_progress
    state = _Pass(model, emb, image.shape[0], image.shape[1], max_masks, pred_iou, stability)
    stages = region_points(image, SCALES, WORK_SIDE)
    records: list[dict] = []
    for stage in stages:
        pending = list(stage)
        yields: list[tuple[int, int]] = []  # (prompts, new masks) per batch of this stage
        while pending and state.prompts < PROMPT_BUDGET and len(state.accepted) < max_masks:
            check_cancel(cancel)
            batch: list[tuple[float, float]] = []
            while pending and len(batch) < min(BATCH, PROMPT_BUDGET - state.prompts):
                x, y, area = pending.pop(0)
                if not state.covered(x, y, area):
                    batch.append((x, y))
            if batch:
                yields.append((len(batch), state.decode(batch)))
                report(0.95 * state.prompts / PROMPT_BUDGET, f"{len(state.accepted)} masks found so far")
                if state.prompts >= MIN_PROMPTS and stalled(yields):
                    break
        new = state.finish_stage(cancel)
        records.extend(new)
        if new and on_masks is not None:
            on_masks(new)
    report(1.0, f"{len(records)} masks ready")
    return records


def stalled(yields: list[tuple[int, int]], window: int = STALL_PROMPTS, least: int = STALL_MASKS) -> bool:
    """True when the last `window` prompts of `yields` ((prompts, new masks) per batch, oldest first) found
    fewer than `least` masks: the picture has given what this scale can find (a plain photo stops early; a
    cluttered one keeps adding and goes on). False while fewer than `window` prompts were spent."""
    prompts = found = 0
    for n, new in reversed(yields):
        prompts, found = prompts + n, found + new
        if prompts >= window:
            return found < least
    return False


@dataclass
class _Candidate:
    logits: np.ndarray  # the decoder's low-res logits, float32 (L, L), padding included
    mask: np.ndarray  # logits > 0
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive (low-res)
    area: int
    iou: float
    stability: float
    point: tuple[float, float]


class SamModel(Protocol):
    """The low-level calls of a SAM-family model this pass uses (sam_engine's module docstring)."""

    def decode(
        self, emb: Any, points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None, multimask: bool
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def to_full(self, emb: Any, low_res_logits: np.ndarray) -> np.ndarray: ...

    def low_res_frame(self, emb: Any) -> tuple[int, int, float, float]: ...


@dataclass
class _Pass:
    """State of one automatic pass: accepted low-res masks and what is already covered."""

    model: SamModel
    emb: Any
    h: int
    w: int
    max_masks: int
    pred_iou: float = PRED_IOU
    stability: float = STABILITY
    prompts: int = 0
    accepted: list[_Candidate] = field(default_factory=list)
    emitted: list[tuple[np.ndarray, list[int], int]] = field(default_factory=list)
    staged: list[_Candidate] = field(default_factory=list)

    def __post_init__(self) -> None:
        # the model says where the image lies in its logits (MobileSAM pads to a square, SAM 2 squashes)
        self.lh, self.lw, self.x_scale, self.y_scale = self.model.low_res_frame(self.emb)
        self.cover = np.full((self.lh, self.lw), np.inf, np.float32)  # smallest accepted area covering each pixel
        self.min_area = MIN_AREA_FRACTION * self.lh * self.lw

    def covered(self, x: float, y: float, area_fraction: float) -> bool:
        r = min(self.lh - 1, int(y * self.y_scale))
        c = min(self.lw - 1, int(x * self.x_scale))
        return bool(self.cover[r, c] <= COVER_RATIO * area_fraction * self.lh * self.lw)

    def decode(self, points: list[tuple[float, float]]) -> int:
        """Decode one batch of include points, accept what passes; return how many of the new masks pass SAM's
        own thresholds (STRICT_IOU, STRICT_STABILITY)."""
        pts = np.asarray(points, np.float32)[:, None, :]
        labels = np.ones((len(points), 1), np.int64)
        logits, iou = self.model.decode(self.emb, pts, labels, None, multimask=True)
        self.prompts += len(points)
        logits = np.asarray(logits, np.float32)
        whole = logits.reshape(-1, *logits.shape[-2:])
        iou = np.asarray(iou, np.float32)
        flat = whole[:, : self.lh, : self.lw]
        scores = iou.reshape(-1)
        keep = np.flatnonzero(scores >= self.pred_iou)
        if keep.size == 0:
            return 0
        rough = stability_score(flat[keep], 0.0, STABILITY_OFFSET)
        keep = keep[rough >= min(ROUGH_STABILITY, self.stability)]  # far below: no upsampling will rescue it
        stab = np.array([upsampled_stability(flat[k], STABILITY_OFFSET) for k in keep], np.float32)
        keep, stab = keep[stab >= self.stability], stab[stab >= self.stability]
        order = np.argsort(-scores[keep], kind="stable")
        before = len(self.accepted)
        for i in order:
            if len(self.accepted) >= self.max_masks:
                break
            k = int(keep[i])
            mask = flat[k] > 0
            area = int(mask.sum())
            if area < LOW_RES_AREA_SLACK * self.min_area:
                continue
            box = boxes_of(mask[None])[0]
            cand = _Candidate(
                whole[k].copy(),
                mask,
                (int(box[0]), int(box[1]), int(box[2]), int(box[3])),
                area,
                float(scores[k]),
                float(stab[i]),
                points[k // 3],
            )
            if self._repeats(cand):
                continue
            self.accepted.append(cand)
            self.staged.append(cand)
            np.minimum(self.cover, np.where(mask, np.float32(area), np.float32(np.inf)), out=self.cover)
        # what the stall rule counts: new masks good enough for SAM's own generator to keep
        return sum(c.iou >= STRICT_IOU and c.stability >= STRICT_STABILITY for c in self.accepted[before:])

    def _repeats(self, cand: _Candidate) -> bool:
        for other in self.accepted:
            if min(cand.area, other.area) < NMS_IOU * max(cand.area, other.area):
                continue  # IoU ≤ the ratio of the areas
            if pair_iou(cand.mask, cand.box, cand.area, other.mask, other.box, other.area) >= NMS_IOU:
                return True
        return False

    def finish_stage(self, cancel: threading.Event | None) -> list[dict]:
        """Upscale this stage's accepted masks, drop full-size duplicates, encode them as records."""
        out: list[dict] = []
        staged, self.staged = self.staged, []
        for start in range(0, len(staged), UPSCALE_CHUNK):
            check_cancel(cancel)
            chunk = staged[start : start + UPSCALE_CHUNK]
            low = np.stack([cand.logits for cand in chunk])
            full = full_masks(self.model, self.emb, low)
            for cand, mask in zip(chunk, full):
                record = self._record(cand, mask)
                if record is not None:
                    out.append(record)
        return out

    def _record(self, cand: _Candidate, mask: np.ndarray) -> dict | None:
        area = int(mask.sum())
        if area == 0:
            return None
        bbox = rle.bbox_of(mask)
        for other, obox, oarea in self.emitted:
            if min(area, oarea) < DUPLICATE_IOU * max(area, oarea):
                continue
            if pair_iou(mask, _xyxy(bbox), area, other, _xyxy(obox), oarea) >= DUPLICATE_IOU:
                return None
        self.emitted.append((mask, bbox, area))
        return {
            "segmentation": rle.encode(mask),
            "area": area,
            "bbox": bbox,
            "predicted_iou": round(cand.iou, 4),
            "stability_score": round(cand.stability, 4),
            "point_coords": [[round(float(cand.point[0]), 1), round(float(cand.point[1]), 1)]],
            "crop_box": [0, 0, self.w, self.h],
        }


def _xyxy(bbox: list[int]) -> tuple[int, int, int, int]:
    x, y, w, h = bbox
    return x, y, x + w - 1, y + h - 1


# ---- pure helpers -------------------------------------------------------------------------------------------


def stability_score(logits: np.ndarray, threshold: float = 0.0, offset: float = 1.0) -> np.ndarray:
    """Per mask of [N,H,W] logits: |logits > t + offset| / |logits > t - offset| (0 when both are empty)."""
    logits = np.asarray(logits)
    inner = (logits > threshold + offset).reshape(len(logits), -1).sum(axis=1)
    outer = (logits > threshold - offset).reshape(len(logits), -1).sum(axis=1)
    return np.where(outer > 0, inner / np.maximum(outer, 1), 0.0).astype(np.float32)


def upsampled_stability(low: np.ndarray, offset: float = 1.0, factor: int = 4) -> float:
    """Stability score of one 2-D low-res logit map after bilinear upsampling by `factor` (SAM scores masks at
    full size, where a small mask's edge is sharper than on the 256² grid); only the mask's surroundings are
    upsampled: outside the low-res pixels above -offset, and one pixel beyond them, nothing can exceed -offset."""
    import cv2

    outer = low > -offset
    rows, cols = np.flatnonzero(outer.any(axis=1)), np.flatnonzero(outer.any(axis=0))
    if rows.size == 0:
        return 0.0
    r0, r1 = max(0, int(rows[0]) - 1), min(low.shape[0], int(rows[-1]) + 2)
    c0, c1 = max(0, int(cols[0]) - 1), min(low.shape[1], int(cols[-1]) + 2)
    crop = np.ascontiguousarray(low[r0:r1, c0:c1], np.float32)
    up = cv2.resize(crop, (crop.shape[1] * factor, crop.shape[0] * factor), interpolation=cv2.INTER_LINEAR)
    inner, outer_count = int(np.count_nonzero(up > offset)), int(np.count_nonzero(up > -offset))
    return inner / max(1, outer_count)


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """[N,4] int boxes (x0, y0, x1, y1), the last row/column inclusive as SAM does; zeros for an empty mask."""
    masks = np.asarray(masks, bool)
    out = np.zeros((len(masks), 4), np.int64)
    rows = np.asarray(masks.any(axis=2))
    cols = np.asarray(masks.any(axis=1))
    for i in range(len(masks)):
        r, c = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if r.size:
            out[i] = (c[0], r[0], c[-1], r[-1])
    return out


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N,M] IoU of xyxy boxes, areas (x1 - x0) * (y1 - y0) as torchvision computes them."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def box_nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy box NMS, best score first; a box goes if its IoU with a kept one exceeds the threshold."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ious = box_iou_matrix(boxes, boxes)
    removed = np.zeros(len(order), bool)
    kept = []
    for i in order:
        if removed[i]:
            continue
        kept.append(int(i))
        removed |= ious[i] > iou_threshold
    return np.asarray(kept, np.int64)


def pair_iou(a: np.ndarray, box_a, area_a: int, b: np.ndarray, box_b, area_b: int) -> float:
    """Mask IoU of two boolean masks of one size, given their inclusive xyxy boxes and areas (cheap when apart)."""
    if area_a == 0 and area_b == 0:
        return 0.0
    x0, y0 = max(box_a[0], box_b[0]), max(box_a[1], box_b[1])
    x1, y1 = min(box_a[2], box_b[2]), min(box_a[3], box_b[3])
    if x1 < x0 or y1 < y0:
        return 0.0
    inter = int(np.count_nonzero(a[y0 : y1 + 1, x0 : x1 + 1] & b[y0 : y1 + 1, x0 : x1 + 1]))
    return inter / (area_a + area_b - inter)


def mask_nms(masks: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices kept by greedy mask NMS, best score first: a mask goes when its IoU with a kept one is ≥ the threshold.

    With a threshold of 0.95 this is the dedupe: no two kept masks are near-duplicates."""
    masks = np.asarray(masks, bool)
    boxes = boxes_of(masks)
    areas = masks.reshape(len(masks), -1).sum(axis=1)
    kept: list[int] = []
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        if all(pair_iou(masks[i], boxes[i], areas[i], masks[j], boxes[j], areas[j]) < iou_threshold for j in kept):
            kept.append(int(i))
    return np.asarray(kept, np.int64)


def region_points(image: np.ndarray, scales, work_side: int) -> list[list[tuple[float, float, float]]]:
    """Per scale, one (x, y, area share) per over-segmentation region, (x, y) in original pixels.

    The point is the region's innermost pixel (farthest from its edge), so a prompt lands inside the thing.
    Regions come most salient first: sqrt(area) times the mean colour step across the region's edge, so a
    small patch with a sharp outline goes before a fragment of texture cut out of a larger area."""
    import cv2
    from scipy import ndimage
    from skimage.segmentation import felzenszwalb

    h, w = image.shape[:2]
    factor = min(1.0, work_side / max(h, w))
    sh, sw = max(1, round(h * factor)), max(1, round(w * factor))
    small = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA) if factor < 1 else image
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    step_x = np.linalg.norm(lab[:, 1:] - lab[:, :-1], axis=2)
    step_y = np.linalg.norm(lab[1:] - lab[:-1], axis=2)
    out = []
    for scale, min_share in scales:
        labels = felzenszwalb(small, scale=scale, sigma=0.8, min_size=max(4, int(min_share * sh * sw)))
        n = int(labels.max()) + 1
        cut_x, cut_y = labels[:, 1:] != labels[:, :-1], labels[1:] != labels[:-1]
        edge = np.zeros((sh, sw), bool)
        edge[:, :-1] |= cut_x
        edge[:-1, :] |= cut_y
        edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
        dist = cv2.distanceTransform((~edge).astype(np.uint8), cv2.DIST_L2, 3)
        areas = np.bincount(labels.ravel(), minlength=n)
        # colour steps across each region's edge, counted on both sides
        sums = np.zeros(n)
        counts = np.zeros(n)
        for side_a, side_b, step, cut in (
            (labels[:, 1:], labels[:, :-1], step_x, cut_x),
            (labels[1:], labels[:-1], step_y, cut_y),
        ):
            for side in (side_a, side_b):
                sums += np.bincount(side[cut], weights=step[cut], minlength=n)
                counts += np.bincount(side[cut], minlength=n)
        contrast = sums / np.maximum(counts, 1)
        contrast[counts == 0] = contrast.max(initial=1.0)  # the whole image: nothing to contrast with
        pos = ndimage.maximum_position(dist, labels, np.arange(n))
        order = np.argsort(-(np.sqrt(areas) * contrast), kind="stable")
        stage = []
        for i in order:
            r, c = pos[i]
            if areas[i] < MIN_REGION * sh * sw or dist[r, c] < MIN_INNER:
                continue
            stage.append((float((c + 0.5) / factor), float((r + 0.5) / factor), float(areas[i]) / (sh * sw)))
        out.append(stage)
    return out


def full_masks(model: Any, emb: Any, low_res_logits: np.ndarray) -> np.ndarray:
    """Boolean masks M×H×W at the original size: the model's own `full_masks` when it has one (computed only
    where each mask can be), else `to_full(...) > 0`."""
    fast = getattr(model, "full_masks", None)
    if fast is not None:
        return np.asarray(fast(emb, low_res_logits))
    return np.asarray(model.to_full(emb, low_res_logits)) > 0
