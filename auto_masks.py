"""Fast automatic masks from a SAM-family model: at most 80 prompts, each where something new may be.

SAM's standard generator decodes all 1024 points of a 32×32 grid (three masks each) and throws nearly all of
them away as duplicates; on a CPU that is a minute or two per photo. Here the candidates are the same grid
points, but a point is decoded only while it may still give a mask not seen yet:
1. a point counts as explained once it lies inside a mask an earlier prompt gave (one of its outputs with a
   predicted IoU of at least EXPLORED_IOU) and its image embedding (the encoder's feature vector there) is
   close to that prompt's (cosine ≥ EXPLAINED_SIMILARITY): the same thing, seen from the same kind of place.
   A button on a jacket lies inside the jacket's mask but does not look like the jacket, so it stays open.
   The largest of a prompt's outputs explains nothing when a smaller one passed: a whole (a tray of coins, a
   sheet of cells) holds other things that look just like the prompt's own (measured: with it, recall fell to
   0.67 on a photo of stained cells; without it, 0.80, for ~5 more prompts a photo);
2. the next prompt is the open point least like anything that explains it: first the points no mask covers
   yet, coarse to fine (a 4×4 grid's points, then 8×8, 16×16, 32×32, in a fixed shuffled order within each),
   then the covered point least similar to its explainers. The pass ends when every point is explained (a
   plain photo: ~40 prompts), at PROMPT_BUDGET prompts, or at max_masks masks;
3. the decoder runs one prompt at a time (one include point, three multimask outputs: whole / part / sub-part,
   which is what makes the result hierarchical; one prompt at a time is also the fastest per prompt on a CPU);
4. every decision is taken on the decoder's 256² low-resolution logits: keep outputs whose predicted IoU and
   stability score pass (stability = share of the mask that survives moving the logit cutoff from -1 to +1,
   measured on the logits around the mask upsampled 4×, as SAM measures it at full size: the 256² grid
   underrates small masks), that are not specks (< 0.1 % of the image), and that do not repeat an accepted
   mask (mask-IoU NMS; accepted masks stay).
   A model that decodes in two stages (`staged_decoding`, `decode_staged`: MobileSAM) first gives the predicted
   IoUs and the logits at every LATTICE_STEP-th low-res pixel (1/16 of them, for 1/16 of the upscaling's work);
   the upscaling to the 256² logits (~40 % of a prompt) runs only when one of the outputs may pass: it is rated
   high enough and is not, on at least LATTICE_MIN_PIXELS lattice pixels, clearly unstable or clearly a repeat
   of an accepted mask (thresholds with a margin over the real ones; measured on 8 photos, 52 % of the prompts
   were spared the upscaling, and 1 of 629 a mask they would have given). A spared prompt explains points from
   the lattice (its nearest pixel up and left);
5. only the survivors are upscaled to full size and encoded as COCO RLE, every EMIT_EVERY prompts, so the
   gallery fills as they arrive; a final check at full size guarantees that no two records have IoU ≥ 0.95.
The model interface used: `decode(emb, points [N,K,2] (x, y) in original pixels, labels [N,K], None,
multimask=True) -> (low_res_logits [N,3,L,L], iou_pred [N,3])`, `to_full(emb, logits [M,L,L]) -> [M,H,W]`,
`low_res_frame(emb) -> (rows, cols, x_scale, y_scale)`: where the image lies in the L×L logits (MobileSAM pads
the image to a square, SAM 2 squashes it to one) and the scale from original to low-res pixels along x and y,
and `point_features(emb, xs, ys) -> [N, C]`: the image embedding at those original pixels, unit length;
optionally `staged_decoding` (bool) and `decode_staged(emb, points [1,1,2], labels [1,1])` ->
mask_decoder_fast.Staged (iou [1,3], lattice [1,3,L/4,L/4], logits() -> [1,3,L,L]).
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
PROMPT_BUDGET = 80  # the most prompts a pass spends (a cluttered photo): 128 found 3 % more masks in 40 % more time
GRID_SIDE = 32  # candidate points: SAM's own 32×32 grid
EXPLORED_IOU = 0.70  # an output this well rated explains the points inside it that look like its prompt's
EXPLAINED_SIMILARITY = 0.70  # cosine of two points' image embeddings from which they show the same thing
EMIT_EVERY = 16  # prompts between two deliveries of finished masks
UPSCALE_CHUNK = 8
LOW_RES_AREA_SLACK = 0.7  # a mask of just 0.1 % can measure less on the coarse 256² grid
LATTICE_STEP = 4  # the staged decoder's lattice: the logits at every 4th low-res pixel (mask_decoder_fast)
LATTICE_MIN_PIXELS = 16  # lattice pixels from which a mask's stability or overlap can be told on the lattice
LATTICE_UNSTABLE = 0.80  # lattice stability under which no upscaling will bring an output to STABILITY
LATTICE_REPEAT = 0.92  # lattice IoU with an accepted mask from which an output repeats it (NMS_IOU on low-res)


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
    guide = Guide.over(model, emb, image.shape[0], image.shape[1], GRID_SIDE)
    records: list[dict] = []
    while state.prompts < PROMPT_BUDGET and len(state.accepted) < max_masks:
        check_cancel(cancel)
        point = guide.next_point()
        if point is None:
            break  # every candidate point is explained
        logits, ious, step = state.prompt(guide.xy(point))
        guide.explore(point, logits, ious, step)
        report(0.95 * state.prompts / PROMPT_BUDGET, f"{len(state.accepted)} masks found so far")
        if state.prompts % EMIT_EVERY == 0:
            records.extend(_deliver(state, cancel, on_masks))
    records.extend(_deliver(state, cancel, on_masks))
    report(1.0, f"{len(records)} masks ready")
    return records


def _deliver(state: _Pass, cancel: threading.Event | None, on_masks: OnMasks | None) -> list[dict]:
    new = state.flush(cancel)
    if new and on_masks is not None:
        on_masks(new)
    return new


class Guide:
    """Where the next prompt goes (module docstring, 1–2): candidate grid points, and how well each is explained
    by the prompts decoded so far. Pure numpy; `over` builds one from a model's embedding."""

    def __init__(self, xs, ys, rows, cols, features: np.ndarray, order: np.ndarray):
        self.xs, self.ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        self.rows, self.cols = np.asarray(rows), np.asarray(cols)  # each point's low-res pixel
        self.features = np.asarray(features, np.float32)  # G×C, unit length
        self.order = np.asarray(order)  # rank among points nothing covers yet (coarse to fine)
        self.best = np.full(len(self.xs), -np.inf, np.float32)  # highest similarity to an explaining prompt
        self.done = np.zeros(len(self.xs), bool)

    @classmethod
    def over(cls, model: SamModel, emb: Any, h: int, w: int, side: int) -> Guide:
        lh, lw, x_scale, y_scale = model.low_res_frame(emb)
        centres = (np.arange(side) + 0.5) / side
        ys, xs = (a.ravel() for a in np.meshgrid(centres * h, centres * w, indexing="ij"))
        rows = np.minimum(lh - 1, (ys * y_scale).astype(np.int64))
        cols = np.minimum(lw - 1, (xs * x_scale).astype(np.int64))
        return cls(xs, ys, rows, cols, model.point_features(emb, xs, ys), coarse_to_fine(side))

    def xy(self, point: int) -> tuple[float, float]:
        return float(self.xs[point]), float(self.ys[point])

    def next_point(self) -> int | None:
        """The open point least like anything that explains it (uncovered ones first, coarse to fine); None when
        every point is explained or decoded."""
        key = np.where(self.done, np.inf, self.best)
        lowest = key.min(initial=np.inf)
        if lowest >= EXPLAINED_SIMILARITY:
            return None
        ties = np.flatnonzero(key == lowest)
        return int(ties[np.argmin(self.order[ties])])

    def explore(self, point: int, logits: np.ndarray, ious: np.ndarray, step: int = 1) -> None:
        """Record what decoding `point` gave: its outputs' low-res logits (3×L×L, padding included) and IoUs; with
        step > 1, the logits at every step-th low-res pixel only (the lattice: 3×L/step×L/step)."""
        self.done[point] = True
        own = self.features[point]
        rows, cols = self.rows // step, self.cols // step
        good = [out > 0 for out, iou in zip(logits, ious) if iou >= EXPLORED_IOU]
        good.sort(key=lambda mask: int(np.count_nonzero(mask)))
        for mask in good[:-1] or good:  # the largest explains nothing when a smaller one passed (docstring)
            inside = np.flatnonzero(mask[rows, cols])
            if inside.size:
                similar = self.features[inside] @ own
                self.best[inside] = np.maximum(self.best[inside], similar)


def coarse_to_fine(side: int) -> np.ndarray:
    """Rank of each point of a side×side grid (row by row): a 4×4 grid's points first, then 8×8's, … (each
    level's points in a fixed shuffled order, so a budget that ends mid-level leaves no band unvisited)."""
    rank = np.full(side * side, -1, np.int64)
    nxt, n = 0, 4
    while n < side:
        step = side // n
        picks = np.arange(n) * step + step // 2
        cells = (picks[:, None] * side + picks[None, :]).ravel()
        for cell in cells[np.random.default_rng(n).permutation(len(cells))]:
            if rank[cell] < 0:
                rank[cell], nxt = nxt, nxt + 1
        n *= 2
    rest = np.flatnonzero(rank < 0)
    rank[rest] = nxt + np.random.default_rng(side).permutation(len(rest))
    return rank


@dataclass
class _Candidate:
    logits: np.ndarray  # the decoder's low-res logits, float32 (L, L), padding included
    mask: np.ndarray  # logits > 0
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive (low-res)
    area: int
    iou: float
    stability: float
    point: tuple[float, float]
    coarse: np.ndarray = field(init=False)  # the mask at the lattice's pixels (every LATTICE_STEP-th)
    coarse_area: int = field(init=False)

    def __post_init__(self) -> None:
        self.coarse = self.mask[::LATTICE_STEP, ::LATTICE_STEP]
        self.coarse_area = int(np.count_nonzero(self.coarse))


class SamModel(Protocol):
    """The low-level calls of a SAM-family model this pass uses (sam_engine's module docstring)."""

    def decode(
        self, emb: Any, points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None, multimask: bool
    ) -> tuple[np.ndarray, np.ndarray]: ...

    def to_full(self, emb: Any, low_res_logits: np.ndarray) -> np.ndarray: ...

    def low_res_frame(self, emb: Any) -> tuple[int, int, float, float]: ...

    def point_features(self, emb: Any, xs: np.ndarray, ys: np.ndarray) -> np.ndarray: ...


@dataclass
class _Pass:
    """State of one automatic pass: the masks accepted on the low-res logits, those not yet delivered, and those
    delivered (at full size, for the final duplicate check)."""

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
        self.lh, self.lw, _, _ = self.model.low_res_frame(self.emb)
        self.min_area = MIN_AREA_FRACTION * self.lh * self.lw

    def prompt(self, point: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, int]:
        """Decode one include point and accept what passes → (its outputs' logits, their predicted IoUs (3), the
        step between the low-res pixels the logits are at: 1 when the outputs were upscaled, LATTICE_STEP when
        the lattice showed that none of them can be accepted (module docstring, 4))."""
        pts = np.asarray([point], np.float32)[:, None, :]
        labels = np.ones((1, 1), np.int64)
        staged_decode = getattr(self.model, "decode_staged", None)
        if staged_decode is None or not getattr(self.model, "staged_decoding", False):
            logits, iou = self.model.decode(self.emb, pts, labels, None, multimask=True)
            logits, iou = np.asarray(logits, np.float32), np.asarray(iou, np.float32)
            self.prompts += 1
            self._judge([point], logits, iou)
            return logits[0], iou[0], 1
        staged = staged_decode(self.emb, pts, labels)
        self.prompts += 1
        iou = np.asarray(staged.iou, np.float32)
        lattice = np.asarray(staged.lattice, np.float32)[0]
        if not self._may_add(lattice, iou[0]):
            return lattice, iou[0], LATTICE_STEP
        logits = np.asarray(staged.logits(), np.float32)
        self._judge([point], logits, iou)
        return logits[0], iou[0], 1

    def _judge(self, points: list[tuple[float, float]], logits: np.ndarray, iou: np.ndarray) -> None:
        """Accept what passes among the outputs (N×3×L×L low-res logits, N×3 predicted IoUs) of `points`."""
        whole = logits.reshape(-1, *logits.shape[-2:])
        flat = whole[:, : self.lh, : self.lw]
        scores = iou.reshape(-1)
        keep = np.flatnonzero(scores >= self.pred_iou)
        if keep.size > 0:
            self._accept(points, whole, flat, scores, keep)

    def _may_add(self, lattice: np.ndarray, iou: np.ndarray) -> bool:
        """Whether one of a prompt's outputs (lattice logits 3×S×S, predicted IoUs 3) may be accepted. No only
        when each is rated under pred_iou, or, on enough lattice pixels to tell (LATTICE_MIN_PIXELS), clearly
        unstable or clearly a repeat of an accepted mask (margins over the real tests on the low-res logits)."""
        rows, cols = -(-self.lh // LATTICE_STEP), -(-self.lw // LATTICE_STEP)
        for k in np.flatnonzero(iou >= self.pred_iou):
            coarse = lattice[k, :rows, :cols]
            unstable = stability_score(coarse[None], 0.0, STABILITY_OFFSET)[0] < LATTICE_UNSTABLE
            if unstable and np.count_nonzero(coarse > -STABILITY_OFFSET) >= LATTICE_MIN_PIXELS:
                continue
            if not self._repeats_coarse(coarse > 0):
                return True
        return False

    def _repeats_coarse(self, mask: np.ndarray) -> bool:
        area = int(np.count_nonzero(mask))
        if area < LATTICE_MIN_PIXELS:
            return False  # too few pixels to tell
        for other in self.accepted:
            small, large = sorted((area, other.coarse_area))
            if other.coarse_area < LATTICE_MIN_PIXELS or small < LATTICE_REPEAT * large:
                continue  # IoU ≤ the ratio of the areas
            inter = int(np.count_nonzero(mask & other.coarse))
            if inter >= LATTICE_REPEAT * (area + other.coarse_area - inter):
                return True
        return False

    def _accept(self, points, whole: np.ndarray, flat: np.ndarray, scores: np.ndarray, keep: np.ndarray) -> None:
        rough = stability_score(flat[keep], 0.0, STABILITY_OFFSET)
        keep = keep[rough >= min(ROUGH_STABILITY, self.stability)]  # far below: no upsampling will rescue it
        stab = np.array([upsampled_stability(flat[k], STABILITY_OFFSET) for k in keep], np.float32)
        keep, stab = keep[stab >= self.stability], stab[stab >= self.stability]
        order = np.argsort(-scores[keep], kind="stable")
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

    def _repeats(self, cand: _Candidate) -> bool:
        for other in self.accepted:
            if min(cand.area, other.area) < NMS_IOU * max(cand.area, other.area):
                continue  # IoU ≤ the ratio of the areas
            if pair_iou(cand.mask, cand.box, cand.area, other.mask, other.box, other.area) >= NMS_IOU:
                return True
        return False

    def flush(self, cancel: threading.Event | None) -> list[dict]:
        """Upscale the masks accepted since the last call, drop full-size duplicates, encode them as records."""
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


def embedding_at(features: np.ndarray, xs, ys, x_scale: float, y_scale: float, input_side: int) -> np.ndarray:
    """Rows of a C×S×S image embedding (S×S cells over an input_side² model input) at original pixels (xs, ys),
    `x_scale`/`y_scale` taking original pixels to input pixels; each row scaled to unit length."""
    side = features.shape[-1]
    cell = input_side / side
    cols = np.clip((np.asarray(xs) * x_scale / cell).astype(np.int64), 0, side - 1)
    rows = np.clip((np.asarray(ys) * y_scale / cell).astype(np.int64), 0, side - 1)
    at = np.asarray(features, np.float32)[:, rows, cols].T
    return at / np.maximum(np.linalg.norm(at, axis=1, keepdims=True), np.float32(1e-12))


def full_masks(model: Any, emb: Any, low_res_logits: np.ndarray) -> np.ndarray:
    """Boolean masks M×H×W at the original size: the model's own `full_masks` when it has one (computed only
    where each mask can be), else `to_full(...) > 0`."""
    fast = getattr(model, "full_masks", None)
    if fast is not None:
        return np.asarray(fast(emb, low_res_logits))
    return np.asarray(model.to_full(emb, low_res_logits)) > 0
