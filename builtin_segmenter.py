"""The built-in classical segmenter: offline, hierarchical masks in the SAM2 record shape, no model needed.

How it works (all at a reduced working resolution, longer side `work_side`):
1. over-segment into a few hundred superpixels (Felzenszwalb's graph-based segmentation);
2. merge adjacent regions greedily, cheapest first, into one binary tree (every merge is a node):
   the cost is Ward-like, sqrt(n_a * n_b / (n_a + n_b)) times the colour distance (mean of the CIELAB
   distance between the two regions' mean colours and the mean CIELAB step across their shared boundary),
   so specks and similar neighbours merge first and strong edges last;
3. un-merge the tree from the root: every split reveals two regions, so the regions appear coarse to fine
   (whole / part / sub-part), and the first ones already cover the image;
4. in that order, keep regions that stand apart from their sibling (stability_score >= 1/3, below),
   are not specks (< 1/2000 of the image) and are not near-duplicates (IoU > 0.95 with the nearest kept
   ancestor), up to `max_masks`; encode each at full size (nearest-neighbour upscaling of the working
   mask) as COCO compressed RLE. The whole image is a mask only when its own split is arbitrary.

Score proxies (SAM2 gets these from the model; here they are measured on the image):
- predicted_iou = sqrt(homogeneity * contrast), homogeneity = 1 / (1 + s / 10) with s the RMS CIELAB
  distance of the mask's pixels to its mean colour, contrast = c / (c + 10) with c the CIELAB distance
  between the mask's mean colour and that of a 3-pixel ring around it (1 when nothing surrounds it).
- stability_score = max(0, 1 - 1 / R), R = (e + 0.5) / (t + 0.5), e the mean CIELAB step between
  neighbouring pixels across the boundary with the sibling the region merges with in the tree, t the mean
  step between neighbouring pixels inside the two; how much sharper the region's edge is than the texture
  on both sides (1 for the whole image). R < 1.5 means a flat or textured area cut in two arbitrary pieces.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

import masks
from errors import InvalidInput, SegmentationCancelled
from segmenter import Progress
from settings import ENGINE_BUILTIN
from validation import check_prompt

MIN_AREA_FRACTION = 1 / 2000  # masks smaller than this share of the image are specks
MIN_SEPARATION = 1.5  # boundary-to-texture ratio below which two sibling regions are one thing cut in two
DUPLICATE_IOU = 0.95
RING = 3  # working-resolution pixels around a mask that count as its surroundings
INSIDE_BOX = 0.9  # share of a mask that must lie inside a prompt box for it to qualify


class BuiltinSegmenter:
    """Classical hierarchical segmenter implementing the `Segmenter` protocol (see module docstring)."""

    engine = ENGINE_BUILTIN
    prompts_natively = True  # segment() walks the hierarchy: any prompt, any image, no stored masks needed

    def __init__(self, max_masks: int = 128, *, work_side: int = 512, cache_size: int = 4):
        if max_masks < 1:
            raise InvalidInput(f"max_masks must be at least 1, got {max_masks}.")
        self.max_masks = int(max_masks)
        self.work_side = int(work_side)
        self._cache: OrderedDict[str, _Hierarchy] = OrderedDict()
        self._cache_size = max(1, int(cache_size))
        self._lock = threading.Lock()

    def generate(
        self, image: np.ndarray, *, progress: Progress | None = None, cancel: threading.Event | None = None
    ) -> list[dict]:
        """Automatic overlapping masks of an RGB image, as SAM2 records (deterministic).

        `cancel` (set when the person has left) stops the work at the next stage.
        """
        if cancel is not None:
            progress = _cancellable(progress, cancel)
        return copy.deepcopy(self._hierarchy(image, progress).records)

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
        """One object's mask, chosen among the hierarchy's masks from points (1 include, 0 exclude) and/or a box.

        `progress` and `cancel` are accepted like the SAM2 client's; this runs in well under a second."""
        rgb = _as_rgb(image)
        height, width = rgb.shape[:2]
        pts, labels, checked_box = check_prompt(points, point_labels, box, width, height)
        rect = _pixel_rect(checked_box) if checked_box is not None else None
        hier = self._hierarchy(rgb, None)
        chosen = _choose(hier, [(x, y) for x, y in pts or []], labels or [], rect)
        return _prompt_record(hier, chosen, rect)

    def prepare(self, image: np.ndarray) -> None:
        """Build (and cache) the image's hierarchy now, so the prompts that follow answer at once."""
        self._hierarchy(image, None)

    def health(self) -> tuple[bool, str]:
        return True, f"{self.engine} ready"

    def close(self) -> None:
        with self._lock:
            self._cache.clear()

    def _hierarchy(self, image: np.ndarray, progress: Progress | None) -> _Hierarchy:
        """The cached hierarchy of this image, built (outside the lock) on a miss."""
        rgb = _as_rgb(image)
        key = hashlib.sha1(rgb.tobytes() + repr(rgb.shape).encode()).hexdigest()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is not None:
            if progress is not None:
                progress(1.0, "Masks ready (cached)")
            return hit
        hier = _build(rgb, self.max_masks, self.work_side, progress or _no_progress)
        with self._lock:
            self._cache[key] = hier
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return hier


@dataclass
class _Tree:
    """A binary merge tree over superpixels; node ids < n_leaves are leaves, the last node is the root."""

    n_leaves: int
    left: np.ndarray  # child ids (-1 for leaves)
    right: np.ndarray
    count: np.ndarray  # pixels at working resolution
    mean: np.ndarray  # (nodes, 3) CIELAB
    spread: np.ndarray  # RMS CIELAB distance to the mean
    birth: np.ndarray  # merge step that created the node (0 for leaves)
    separation: np.ndarray  # boundary-to-texture ratio against the sibling (inf for the root)
    parent: np.ndarray  # -1 for the root
    lo: np.ndarray  # node = leaves with DFS rank in [lo, hi)
    hi: np.ndarray
    box: np.ndarray  # (nodes, 4) working-resolution r0, r1, c0, c1 (half-open)


@dataclass
class _Hierarchy:
    """Everything segment() needs about one image: ranked label map, index maps, selected nodes, records."""

    ranks: np.ndarray  # working-resolution map of leaf DFS ranks
    rows: np.ndarray  # full row -> working row (nearest neighbour)
    cols: np.ndarray
    lab: np.ndarray
    tree: _Tree
    nodes: list[int]
    records: list[dict]
    size: tuple[int, int]  # full (height, width)


def _cancellable(progress: Progress | None, cancel: threading.Event) -> Progress:
    """A progress callback that stops the work (SegmentationCancelled) once `cancel` is set."""

    def report(fraction: float, description: str) -> None:
        if cancel.is_set():
            raise SegmentationCancelled("Segmentation was cancelled: the person who asked for it has left.")
        if progress is not None:
            progress(fraction, description)

    return report


def _no_progress(fraction: float, description: str) -> None:
    return None


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate once at the edge: uint8 HxW, HxWx1, HxWx3 or HxWx4 → contiguous HxWx3."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InvalidInput(
            f"Expected an RGB image of shape (H, W, 3) and dtype uint8, got shape {arr.shape} and dtype {arr.dtype}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InvalidInput(f"The image is empty (shape {arr.shape}).")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _pixel_rect(box: list[float]) -> tuple[int, int, int, int]:
    """A checked box [x0, y0, x1, y1] (inside the image) → half-open pixel rectangle, at least one pixel wide."""
    x0, y0 = round(box[0]), round(box[1])
    return x0, y0, max(x0 + 1, round(box[2])), max(y0 + 1, round(box[3]))


# ---------------------------------------------------------------- building the hierarchy


def _build(rgb: np.ndarray, max_masks: int, work_side: int, progress: Progress) -> _Hierarchy:
    """Over-segment, merge into a tree, select the masks and encode them at full size."""
    import cv2

    height, width = rgb.shape[:2]
    scale = min(1.0, work_side / max(height, width))
    wh, ww = max(1, round(height * scale)), max(1, round(width * scale))
    small = rgb if (wh, ww) == (height, width) else cv2.resize(rgb, (ww, wh), interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    progress(0.05, "Finding superpixels")
    leaves = _oversegment(small)
    progress(0.3, "Merging regions into a hierarchy")
    tree = _merge_tree(leaves, lab)
    ranks = _rank_leaves(tree)[leaves]
    rows = _index_map(height, wh)
    cols = _index_map(width, ww)
    min_area = max(1, math.ceil(MIN_AREA_FRACTION * height * width))
    hier = _Hierarchy(ranks, rows, cols, lab, tree, [], [], (height, width))
    progress(0.45, "Encoding masks")
    candidates = _select(tree, max_masks, MIN_AREA_FRACTION * wh * ww)
    for i, node in enumerate(candidates):
        full = _full_mask(hier, [node])
        area = int(full.sum())
        if area < min_area:
            continue  # the working-resolution area was a hair above the limit, the full one is not
        hier.nodes.append(node)
        hier.records.append(_record(full, area, *_scores(hier, node), _deepest_point(hier, node)))
        if i % 16 == 15:
            progress(0.45 + 0.55 * (i + 1) / len(candidates), f"Encoding masks ({i + 1}/{len(candidates)})")
    progress(1.0, f"{len(hier.records)} masks ready")
    return hier


def _oversegment(small: np.ndarray) -> np.ndarray:
    """A few hundred edge-following superpixels (int32 labels 0..n-1)."""
    from skimage.segmentation import felzenszwalb

    h, w = small.shape[:2]
    if h * w < 64:
        # Too small for graph segmentation to mean anything: one superpixel per distinct colour.
        return _colour_labels(small)
    min_size = max(4, h * w // 4000)
    labels = felzenszwalb(small, scale=100, sigma=0.8, min_size=min_size)
    return np.unique(labels, return_inverse=True)[1].reshape(h, w).astype(np.int32)


def _colour_labels(small: np.ndarray) -> np.ndarray:
    """One label per distinct colour (for tiny images)."""
    flat = small.reshape(-1, 3)
    return np.unique(flat, axis=0, return_inverse=True)[1].reshape(small.shape[:2]).astype(np.int32)


def _index_map(full: int, work: int) -> np.ndarray:
    """Nearest-neighbour map from full-size pixel index to working-resolution index (pixel centres aligned)."""
    return np.minimum(work - 1, ((np.arange(full) + 0.5) * work / full).astype(np.int64))


def _adjacency(leaves: np.ndarray, lab: np.ndarray) -> tuple[dict[tuple[int, int], list[float]], np.ndarray]:
    """Boundaries {(a, b), a < b: [sum of CIELAB steps across, pixel pairs]} and per-leaf [step sum, pairs] inside."""
    n = int(leaves.max()) + 1
    keys, steps = [], []
    inner = np.zeros((n, 2))
    for a, b, la, lb in (
        (leaves[:, :-1], leaves[:, 1:], lab[:, :-1], lab[:, 1:]),
        (leaves[:-1, :], leaves[1:, :], lab[:-1, :], lab[1:, :]),
    ):
        step = np.linalg.norm(la - lb, axis=2)
        differ = a != b
        inner[:, 0] += np.bincount(a[~differ], weights=step[~differ], minlength=n)
        inner[:, 1] += np.bincount(a[~differ], minlength=n)
        lo = np.minimum(a[differ], b[differ]).astype(np.int64)
        hi = np.maximum(a[differ], b[differ]).astype(np.int64)
        keys.append(lo * n + hi)
        steps.append(step[differ])
    key = np.concatenate(keys)
    if key.size == 0:
        return {}, inner
    uniq, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=np.concatenate(steps))
    counts = np.bincount(inverse)
    return {(int(k // n), int(k % n)): [float(s), int(c)] for k, s, c in zip(uniq, sums, counts)}, inner


def _merge_tree(leaves: np.ndarray, lab: np.ndarray) -> _Tree:
    """Greedy agglomerative merging of adjacent regions, cheapest first, recording every merge."""
    from scipy import ndimage

    n = int(leaves.max()) + 1
    total = 2 * n - 1
    flat = leaves.ravel()
    count = np.zeros(total, np.float64)
    sums = np.zeros((total, 3))
    sqsums = np.zeros((total, 3))
    count[:n] = np.bincount(flat, minlength=n)
    for c in range(3):
        channel = lab[:, :, c].ravel().astype(np.float64)
        sums[:n, c] = np.bincount(flat, weights=channel, minlength=n)
        sqsums[:n, c] = np.bincount(flat, weights=channel * channel, minlength=n)
    box = np.zeros((total, 4), np.int64)
    for i, sl in enumerate(ndimage.find_objects(leaves + 1)):
        box[i] = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
    left = np.full(total, -1, np.int64)
    right = np.full(total, -1, np.int64)
    birth = np.zeros(total, np.int64)

    neighbours: list[dict[int, list[float]]] = [{} for _ in range(total)]
    boundaries, inner_leaves = _adjacency(leaves, lab)
    for (a, b), entry in boundaries.items():
        neighbours[a][b] = neighbours[b][a] = entry
    inner = np.zeros((total, 2))  # CIELAB step sum and count over neighbouring pixel pairs inside each node
    inner[:n] = inner_leaves
    separation = np.full(total, np.inf)

    def cost(a: int, b: int) -> float:
        na, nb = count[a], count[b]
        colour = float(np.linalg.norm(sums[a] / na - sums[b] / nb))
        edge_sum, edge_count = neighbours[a][b]
        return math.sqrt(na * nb / (na + nb)) * 0.5 * (colour + edge_sum / edge_count)

    heap = [(cost(a, b), a, b) for a in range(n) for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    alive = np.zeros(total, bool)
    alive[:n] = True
    new = n
    while heap:
        _, a, b = heapq.heappop(heap)
        if not (alive[a] and alive[b]):
            continue  # stale: one side has merged since; its successor has its own entries
        alive[a] = alive[b] = False
        edge_sum, edge_count = neighbours[a][b]
        inside = inner[a] + inner[b]
        # How much stronger the boundary is than the texture on both sides of it.
        separation[a] = separation[b] = (edge_sum / edge_count + 0.5) / (inside[0] / max(1.0, inside[1]) + 0.5)
        inner[new] = inside + (edge_sum, edge_count)
        alive[new] = True
        left[new], right[new] = a, b
        count[new] = count[a] + count[b]
        sums[new] = sums[a] + sums[b]
        sqsums[new] = sqsums[a] + sqsums[b]
        low, high = np.minimum(box[a], box[b]), np.maximum(box[a], box[b])
        box[new] = (low[0], high[1], low[2], high[3])
        birth[new] = new - n + 1
        merged: dict[int, list[float]] = {}
        for old in (a, b):
            for k, (s, cnt) in neighbours[old].items():
                if k in (a, b):
                    continue
                entry = merged.setdefault(k, [0.0, 0])
                entry[0] += s
                entry[1] += cnt
                del neighbours[k][old]
            neighbours[old] = {}
        neighbours[new] = merged
        for k, entry in merged.items():
            neighbours[k][new] = entry
            heapq.heappush(heap, (cost(k, new), k, new))
        new += 1
    if new != total:
        raise AssertionError(f"merge tree incomplete: {new} of {total} nodes")  # the pixel grid is connected

    parent = np.full(total, -1, np.int64)
    internal = np.arange(n, total)
    parent[left[internal]] = internal
    parent[right[internal]] = internal
    mean = sums / count[:, None]
    spread = np.sqrt(np.maximum(0.0, sqsums / count[:, None] - mean**2).sum(axis=1))
    lo = np.zeros(total, np.int64)
    hi = np.zeros(total, np.int64)
    return _Tree(n, left, right, count, mean, spread, birth, separation, parent, lo, hi, box)


def _rank_leaves(tree: _Tree) -> np.ndarray:
    """Number leaves in depth-first order so every node is a contiguous rank range [lo, hi); returns leaf → rank."""
    n = tree.n_leaves
    rank = np.zeros(n, np.int32)
    next_rank = 0
    stack = [(len(tree.left) - 1, False)]
    while stack:
        node, done = stack.pop()
        if node < n:
            rank[node] = next_rank
            tree.lo[node], tree.hi[node] = next_rank, next_rank + 1
            next_rank += 1
        elif done:
            tree.lo[node], tree.hi[node] = tree.lo[tree.left[node]], tree.hi[tree.right[node]]
        else:
            stack += [(node, True), (int(tree.right[node]), False), (int(tree.left[node]), False)]
    return rank


def _select(tree: _Tree, max_masks: int, min_area: float) -> list[int]:
    """Eligible nodes in the order un-merging the tree from the root reveals them (coarse first), up to max_masks."""
    n = tree.n_leaves
    root = len(tree.left) - 1
    if n == 1:
        return [root]
    # The whole image is a mask only when its own split is arbitrary (else its two halves cover it).
    eligible = (tree.separation >= MIN_SEPARATION) & (tree.count >= min_area)
    eligible[root] = tree.separation[tree.left[root]] < MIN_SEPARATION
    # A node appears when its parent splits: the later the parent was merged, the coarser the level.
    death = np.where(tree.parent >= 0, tree.birth[np.maximum(tree.parent, 0)], np.iinfo(np.int64).max)
    order = np.lexsort((np.arange(len(death)), -death))
    chosen: list[int] = []
    kept = np.zeros(len(tree.left), bool)
    for v in order[eligible[order]]:
        if _duplicate(tree, int(v), kept):
            continue
        kept[v] = True
        chosen.append(int(v))
        if len(chosen) == max_masks:
            break
    return chosen


def _duplicate(tree: _Tree, node: int, kept: np.ndarray) -> bool:
    """Whether the nearest kept ancestor is nearly the same mask (IoU of nested masks = small / large)."""
    up = int(tree.parent[node])
    while up >= 0 and not kept[up]:
        up = int(tree.parent[up])
    return up >= 0 and tree.count[node] > DUPLICATE_IOU * tree.count[up]


# ---------------------------------------------------------------- masks, scores and records


def _work_mask(hier: _Hierarchy, nodes: list[int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Union of nodes at working resolution, cropped to their joint box (r0, r1, c0, c1)."""
    t = hier.tree
    r0, r1 = min(t.box[v, 0] for v in nodes), max(t.box[v, 1] for v in nodes)
    c0, c1 = min(t.box[v, 2] for v in nodes), max(t.box[v, 3] for v in nodes)
    crop = hier.ranks[r0:r1, c0:c1]
    mask = np.zeros(crop.shape, bool)
    for v in nodes:
        mask |= (crop >= t.lo[v]) & (crop < t.hi[v])
    return mask, (int(r0), int(r1), int(c0), int(c1))


def _full_mask(hier: _Hierarchy, nodes: list[int]) -> np.ndarray:
    """Union of nodes at full size (nearest-neighbour upscaling of the working-resolution mask)."""
    low, (r0, r1, c0, c1) = _work_mask(hier, nodes)
    y0, y1 = np.searchsorted(hier.rows, [r0, r1])
    x0, x1 = np.searchsorted(hier.cols, [c0, c1])
    full = np.zeros(hier.size, bool)
    full[y0:y1, x0:x1] = low[hier.rows[y0:y1] - r0][:, hier.cols[x0:x1] - c0]
    return full


def _scores(hier: _Hierarchy, node: int) -> tuple[float, float]:
    """(predicted_iou, stability_score) proxies of one node; see the module docstring."""
    import cv2

    t = hier.tree
    homogeneity = 1.0 / (1.0 + t.spread[node] / 10.0)
    r0, r1, c0, c1 = t.box[node]
    h, w = hier.ranks.shape
    R0, R1, C0, C1 = max(0, r0 - RING), min(h, r1 + RING), max(0, c0 - RING), min(w, c1 + RING)
    crop = hier.ranks[R0:R1, C0:C1]
    inside = (crop >= t.lo[node]) & (crop < t.hi[node])
    kernel = np.ones((2 * RING + 1, 2 * RING + 1), np.uint8)
    ring = cv2.dilate(inside.view(np.uint8), kernel).astype(bool) & ~inside
    if ring.any():
        distance = float(np.linalg.norm(t.mean[node] - hier.lab[R0:R1, C0:C1][ring].mean(axis=0)))
        contrast = distance / (distance + 10.0)
    else:
        contrast = 1.0
    separation = t.separation[node]
    stability = 1.0 if math.isinf(separation) else max(0.0, 1.0 - 1.0 / separation)
    return round(math.sqrt(homogeneity * contrast), 4), round(float(stability), 4)


def _deepest_point(hier: _Hierarchy, node: int) -> list[list[int]]:
    """[[x, y]] at full size of the pixel farthest from the node's edge (found at working resolution)."""
    low, (r0, _, c0, _) = _work_mask(hier, [node])
    return _deepest(low, r0, c0, hier)


def _deepest(low: np.ndarray, r0: int, c0: int, hier: _Hierarchy) -> list[list[int]]:
    import cv2

    padded = np.pad(low, 1).astype(np.uint8)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
    r, c = np.unravel_index(int(np.argmax(distance)), distance.shape)
    wr, wc = r0 + r - 1, c0 + c - 1
    # The middle full-size pixel of the working pixel's block, which maps back to it.
    ys, xs = np.flatnonzero(hier.rows == wr), np.flatnonzero(hier.cols == wc)
    return [[int(xs[len(xs) // 2]), int(ys[len(ys) // 2])]]


def _record(full: np.ndarray, area: int, predicted: float, stability: float, point: list[list[int]]) -> dict:
    """A SAM2 automatic-mask-generator record."""
    height, width = full.shape
    return {
        "segmentation": masks.encode(full),
        "area": area,
        "bbox": masks.bbox_of(full),
        "predicted_iou": predicted,
        "stability_score": stability,
        "point_coords": point,
        "crop_box": [0, 0, width, height],
    }


# ---------------------------------------------------------------- prompts


def _choose(hier, pts, labels, rect) -> list[int]:
    """Nodes answering the prompts: the smallest mask holding every positive and no negative point, etc."""
    t = hier.tree
    nodes = hier.nodes
    ranks = [int(hier.ranks[hier.rows[y], hier.cols[x]]) for x, y in pts]
    positive = [r for r, label in zip(ranks, labels) if label == 1]
    negative = [r for r, label in zip(ranks, labels) if label == 0]

    def holds(v: int, r: int) -> bool:
        return bool(t.lo[v] <= r < t.hi[v])

    def clean(v: int) -> bool:
        return not any(holds(v, r) for r in negative) and (rect is None or _inside_box(hier, v, rect) >= INSIDE_BOX)

    if positive:
        whole = [v for v in nodes if all(holds(v, r) for r in positive) and clean(v)]
        if whole:
            return [min(whole, key=lambda v: (t.count[v], v))]
        parts = set()
        for r in positive:
            under = [v for v in nodes if holds(v, r) and clean(v)]
            if not under:
                # Fall back to the superpixel under the point, unless it also holds a negative point.
                leaf = _leaf_of_rank(t, r)
                under = [leaf] if not any(holds(leaf, q) for q in negative) else []
            if under:
                parts.add(min(under, key=lambda v: (t.count[v], v)))
        if not parts:
            raise InvalidInput(
                "No region holds the included points without also holding an excluded point; "
                "move the points apart or remove an excluded point."
            )
        return sorted(parts)
    if rect is None:
        raise InvalidInput("Give at least one included point (label 1) or a box; excluded points alone select nothing.")
    candidates = [v for v in nodes if not any(holds(v, r) for r in negative)]
    if not candidates:
        raise InvalidInput("Every region holds an excluded point; remove an excluded point or draw a box.")
    return [max(candidates, key=lambda v: (_box_iou(hier, v, rect), -v))]


def _leaf_of_rank(tree: _Tree, rank: int) -> int:
    leaves = np.flatnonzero(tree.lo[: tree.n_leaves] == rank)
    return int(leaves[0])


def _work_rect(hier: _Hierarchy, rect) -> tuple[int, int, int, int]:
    """A full-size half-open rectangle (x0, y0, x1, y1) → working-resolution rows/columns it covers."""
    x0, y0, x1, y1 = rect
    return int(hier.rows[y0]), int(hier.rows[y1 - 1]) + 1, int(hier.cols[x0]), int(hier.cols[x1 - 1]) + 1


def _inside_box(hier: _Hierarchy, node: int, rect) -> float:
    """Share of the node's (working-resolution) pixels inside the box."""
    low, (r0, _, c0, _) = _work_mask(hier, [node])
    br0, br1, bc0, bc1 = _work_rect(hier, rect)
    inside = low[max(0, br0 - r0) : max(0, br1 - r0), max(0, bc0 - c0) : max(0, bc1 - c0)].sum()
    return float(inside) / max(1.0, float(low.sum()))


def _box_iou(hier: _Hierarchy, node: int, rect) -> float:
    """IoU of the node with the box rectangle (working resolution)."""
    br0, br1, bc0, bc1 = _work_rect(hier, rect)
    area = float(hier.tree.count[node])
    inside = _inside_box(hier, node, rect) * area
    box_area = float((br1 - br0) * (bc1 - bc0))
    return inside / (area + box_area - inside)


def _prompt_record(hier: _Hierarchy, nodes: list[int], rect) -> dict:
    """The record of the chosen nodes' union, clipped to the box."""
    full = _full_mask(hier, nodes)
    if rect is not None:
        x0, y0, x1, y1 = rect
        clipped = np.zeros_like(full)
        clipped[y0:y1, x0:x1] = full[y0:y1, x0:x1]
        full = clipped
    area = int(full.sum())
    if area == 0:
        raise InvalidInput("No region was found for these prompts; put a point on the object or draw a larger box.")
    scores = [_scores(hier, v) for v in nodes]
    predicted = min(s[0] for s in scores)
    stability = min(s[1] for s in scores)
    if len(nodes) == 1 and rect is None:
        point = _deepest_point(hier, nodes[0])
    else:
        point = _deepest_full(full)
    return _record(full, area, predicted, stability, point)


def _deepest_full(full: np.ndarray) -> list[list[int]]:
    """[[x, y]] of the pixel farthest from the edge of a full-size mask (searched inside its box)."""
    import cv2

    x, y, w, h = masks.bbox_of(full)
    padded = np.pad(full[y : y + h, x : x + w], 1).astype(np.uint8)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)
    r, c = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return [[int(x + c - 1), int(y + r - 1)]]
