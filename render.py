"""Compositing and hit-testing of one image's masks, in pure numpy: arrays in, new arrays out.

The design (measured in notes/performance.md) is a per-image "coverage-set" map, built once: an integer
label per pixel naming the exact set of masks covering it. Because every painted mask has one constant
colour, the composite at a pixel depends only on that set, so a render computes one affine colour rule
per set (`out = C + K * photo`) for the painted masks in order and then does one gather + blend over
the frame. Its cost does not grow with the number of painted masks, and "which masks are under this
pixel" is a single map lookup.
"""

from __future__ import annotations

import colorsys
import json
import math
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real

import numpy as np

from errors import InvalidInput, LimitExceeded, NotFound
from masks import bbox_of
from validation import point_outside

BACKGROUNDS = ("original", "dim", "transparent", "black", "white")
MAX_INSTRUCTIONS = 10_000
ORIGINAL = "original"
DEFAULT_ALPHA = 128
# Blend in row bands of about this many pixels: the temporaries stay in cache and are never big
# enough to be handed back to the OS and page-faulted again on the next call.
_BAND_PIXELS = 1 << 17
# Frames larger than this (full-size renders and downloads; not the ≤1024² display copy a click pays for)
# are blended as two halves on two threads: 1.6x faster on this 2-core machine when it is otherwise idle.
_PARALLEL_PIXELS = 1 << 21
_POOL: ThreadPoolExecutor | None = None

Color = tuple[int, int, int, int] | str


# ---- the index --------------------------------------------------------------------------------
class MaskIndex:
    """Everything needed to render and hit-test one image's masks, built once per image and cached by the app."""

    def __init__(
        self,
        shape: tuple[int, int],
        labels: np.ndarray,
        mask_ids: list[int],
        areas: dict[int, int],
        bboxes: dict[int, list[int]],
        set_ptr: np.ndarray,
        set_members: np.ndarray,
        sets_of: dict[int, np.ndarray],
    ):
        self.shape = shape
        self.mask_ids = mask_ids
        self.areas = areas
        self.bboxes = bboxes
        self.n_sets = int(set_ptr.size - 1)
        self._labels = labels  # HxW: the id of the set of masks covering each pixel (0: none)
        self._set_ptr = set_ptr  # CSR: members of set s are set_members[set_ptr[s]:set_ptr[s + 1]]
        self._set_members = set_members  # mask ids, smallest area first within each set
        self._sets_of = sets_of  # mask id → sorted int32 ids of the sets containing it
        self.nbytes = int(labels.nbytes + set_ptr.nbytes + set_members.nbytes + sum(s.nbytes for s in sets_of.values()))

    @classmethod
    def build(cls, shape: tuple[int, int], items: Iterable[tuple[int, np.ndarray]]) -> MaskIndex:
        """items yields (mask_id, bool HxW mask) one at a time; only the index is kept."""
        full, _ = build_indexes(shape, items, None)
        return full

    def masks_at(self, x: int, y: int) -> list[int]:
        """Ids of every mask containing pixel (x, y) (x = column), smallest area first, ties by id."""
        h, w = self.shape
        if not (0 <= x < w and 0 <= y < h):
            raise InvalidInput(point_outside(x, y, w, h))
        s = int(self._labels[y, x])
        return self._set_members[self._set_ptr[s] : self._set_ptr[s + 1]].tolist()

    def mask(self, mask_id: int) -> np.ndarray:
        """bool HxW mask reconstructed from the index."""
        sets = self._sets(mask_id)
        out = np.zeros(self.shape, dtype=bool)
        x, y, w, h = self.bboxes[mask_id]
        if sets.size:
            member = np.zeros(self.n_sets, dtype=bool)
            member[sets] = True
            out[y : y + h, x : x + w] = member[self._labels[y : y + h, x : x + w]]
        return out

    def _sets(self, mask_id: int) -> np.ndarray:
        try:
            return self._sets_of[mask_id]
        except KeyError:
            raise NotFound(f"There is no mask {mask_id} ({_id_range(self.mask_ids)}).") from None

    def __repr__(self) -> str:
        h, w = self.shape
        return f"MaskIndex({w}×{h}, {len(self.mask_ids)} masks, {self.n_sets} coverage sets, {self.nbytes} bytes)"


class _Builder:
    """Accumulates the coverage-set map one mask at a time (each mask splits the sets it touches)."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape
        self.labels = np.zeros(shape, dtype=np.int32)
        self.n = 1  # label 0 is the empty set
        self.parents: list[np.ndarray] = [np.array([-1], dtype=np.int32)]
        self.added: list[np.ndarray] = [np.array([-1], dtype=np.int32)]
        self.ids: list[int] = []
        self.areas: dict[int, int] = {}
        self.bboxes: dict[int, list[int]] = {}

    def add(self, mask_id: int, bbox: list[int], crop: np.ndarray) -> None:
        """Add a mask given as its tight bbox [x, y, w, h] and the bool crop inside it."""
        k = len(self.ids)
        self.ids.append(mask_id)
        self.bboxes[mask_id] = bbox
        x, y, w, h = bbox
        if w == 0 or h == 0:
            self.areas[mask_id] = 0
            return
        sub = self.labels[y : y + h, x : x + w]
        old = sub[crop]
        self.areas[mask_id] = int(old.size)
        # Every set S touched by the mask becomes S ∪ {mask}: a fresh label per distinct old label.
        seen = np.zeros(self.n, dtype=bool)
        seen[old] = True
        parents = np.flatnonzero(seen).astype(np.int32)
        remap = np.zeros(self.n, dtype=np.int32)
        remap[parents] = np.arange(self.n, self.n + parents.size, dtype=np.int32)
        sub[crop] = remap[old]
        self.parents.append(parents)
        self.added.append(np.full(parents.size, k, dtype=np.int32))
        self.n += parents.size

    def finish(self) -> MaskIndex:
        """Drop the sets no pixel kept, number the rest densely and list their members."""
        parent = np.concatenate(self.parents)
        added = np.concatenate(self.added)
        live = np.flatnonzero(np.bincount(self.labels.ravel(), minlength=self.n))
        live = np.union1d(live, [0])  # the empty set always exists, even when masks cover everything
        n_sets = live.size
        dense = np.zeros(self.n, dtype=np.int64)
        dense[live] = np.arange(n_sets)
        label_dtype = np.uint16 if n_sets <= np.iinfo(np.uint16).max + 1 else np.int32
        labels = dense.astype(label_dtype)[self.labels]

        # (set, mask) pairs by walking each live set's chain of ancestors.
        set_col, mask_col = [], []
        cur, owner = live.copy(), np.arange(n_sets)
        while cur.size:
            keep = cur > 0
            cur, owner = cur[keep], owner[keep]
            set_col.append(owner)
            mask_col.append(added[cur])
            cur = parent[cur]
        sets = np.concatenate(set_col) if set_col else np.zeros(0, dtype=np.int64)
        ks = np.concatenate(mask_col).astype(np.int64) if mask_col else np.zeros(0, dtype=np.int64)

        n_masks = len(self.ids)
        ids = np.asarray(self.ids, dtype=np.int64)
        by_area = sorted(range(n_masks), key=lambda k: (self.areas[self.ids[k]], self.ids[k]))
        rank = np.empty(n_masks, dtype=np.int64)
        rank[by_area] = np.arange(n_masks)
        order = np.lexsort((rank[ks], sets))
        set_ptr = np.concatenate(([0], np.cumsum(np.bincount(sets, minlength=n_sets))))
        set_members = ids[ks[order]]

        order = np.lexsort((sets, ks))
        bounds = np.concatenate(([0], np.cumsum(np.bincount(ks, minlength=n_masks))))
        by_mask = sets[order].astype(np.int32)
        sets_of = {mid: by_mask[bounds[k] : bounds[k + 1]] for k, mid in enumerate(self.ids)}
        return MaskIndex(self.shape, labels, list(self.ids), self.areas, self.bboxes, set_ptr, set_members, sets_of)


def nearest_indices(n_src: int, n_dst: int) -> np.ndarray:
    """Source index of each destination pixel for a nearest-neighbour resize (pixel centres, like PIL)."""
    return np.minimum(((np.arange(n_dst) + 0.5) * (n_src / n_dst)).astype(np.int64), n_src - 1)


def build_indexes(
    shape: tuple[int, int],
    items: Iterable[tuple[int, np.ndarray]],
    display_shape: tuple[int, int] | None,
) -> tuple[MaskIndex, MaskIndex | None]:
    """One pass over items: the full-resolution index and, optionally, one for a nearest-downscaled display copy."""
    h, w = int(shape[0]), int(shape[1])
    full = _Builder((h, w))
    display = None
    if display_shape is not None:
        dh, dw = int(display_shape[0]), int(display_shape[1])
        display = _Builder((dh, dw))
        rows, cols = nearest_indices(h, dh), nearest_indices(w, dw)
    for mask_id, mask in items:
        if not isinstance(mask_id, Integral) or isinstance(mask_id, bool):
            raise InvalidInput(f"Mask ids must be integers; got {mask_id!r}.")
        mask_id = int(mask_id)
        if mask_id in full.areas:
            raise InvalidInput(f"Mask id {mask_id} appears twice.")
        mask = np.asarray(mask)
        if mask.shape != (h, w):
            raise InvalidInput(f"Mask {mask_id} is {_size(mask.shape)} but the image is {w}×{h}.")
        mask = mask.astype(bool, copy=False)
        bbox = bbox_of(mask)
        x, y, bw, bh = bbox
        full.add(mask_id, bbox, mask[y : y + bh, x : x + bw])
        if display is not None:
            # Only the display rows/columns whose source pixel falls inside the bbox can be set.
            r0, r1 = np.searchsorted(rows, [y, y + bh])
            c0, c1 = np.searchsorted(cols, [x, x + bw])
            small = mask[rows[r0:r1], x : x + bw][:, cols[c0:c1] - x]
            sx, sy, sw, sh = bbox_of(small)
            dbox = [int(c0) + sx, int(r0) + sy, sw, sh] if sw else [0, 0, 0, 0]
            display.add(mask_id, dbox, small[sy : sy + sh, sx : sx + sw])
    return full.finish(), (display.finish() if display is not None else None)


def _size(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape[::-1]) if len(shape) == 2 else f"an array of shape {shape}"


def _id_range(ids: list[int]) -> str:
    ids = sorted(ids)
    if not ids:
        return "it has no masks"
    if ids == list(range(ids[0], ids[-1] + 1)):
        return f"it has masks {ids[0]}–{ids[-1]}"
    return f"it has {len(ids)} masks, ids {ids[0]}–{ids[-1]}"


# ---- colours and instructions -----------------------------------------------------------------
_HEX = re.compile(r"#([0-9a-fA-F]{6})([0-9a-fA-F]{2})?")
_NUM = r"\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*"
_RGB = re.compile(rf"rgb\({_NUM},{_NUM},{_NUM}\)", re.IGNORECASE)
_RGBA = re.compile(rf"rgba\({_NUM},{_NUM},{_NUM},{_NUM}\)", re.IGNORECASE)


def default_color(mask_id: int) -> tuple[int, int, int, int]:
    """The mask's palette colour: well-separated hues by the golden ratio, deterministic per id, alpha 128."""
    hue = (int(mask_id) * 0.618033988749895) % 1.0
    sat = (0.85, 0.65, 0.75)[int(mask_id) % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, 0.95)
    return (round(r * 255), round(g * 255), round(b * 255), DEFAULT_ALPHA)


def parse_color(value: object, mask_id: int) -> Color:
    """[r, g, b(, a)] 0-255, "#rrggbb(aa)", "rgb(...)"/"rgba(..., 0-1)", "original" or None (the default)."""
    if value is None:
        return default_color(mask_id)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == ORIGINAL:
            return ORIGINAL
        if m := _HEX.fullmatch(text):
            rgb, alpha = m.group(1), m.group(2) or "ff"
            return (int(rgb[0:2], 16), int(rgb[2:4], 16), int(rgb[4:6], 16), int(alpha, 16))
        if m := (_RGB.fullmatch(text) or _RGBA.fullmatch(text)):
            nums = [float(g) for g in m.groups()]
            alpha = nums[3] if len(nums) == 4 else 1.0
            if all(0 <= v <= 255 for v in nums[:3]) and 0 <= alpha <= 1:
                return (*(int(round(v)) for v in nums[:3]), int(round(alpha * 255)))  # type: ignore[return-value]
    elif (isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1)) and len(value) in (
        3,
        4,
    ):
        channels = [_channel(v) for v in value]
        if None not in channels:
            return (*channels, 255) if len(channels) == 3 else tuple(channels)  # type: ignore[return-value]
    raise InvalidInput(
        f'Colour for mask {mask_id} must be [r, g, b, a] with values 0-255, "#rrggbb", "#rrggbbaa", '
        f'"original" or null; got {_short(value)}.'
    )


def _channel(v: object) -> int | None:
    """An integer 0-255 (integral floats such as 128.0 pass), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, Integral):
        n = int(v)
    elif isinstance(v, Real) and math.isfinite(float(v)) and float(v).is_integer():
        n = int(float(v))
    else:
        return None
    return n if 0 <= n <= 255 else None


def parse_instructions(instructions: object, index: MaskIndex, image_id: str) -> list[tuple[int, Color]]:
    """Validate render_instructions ([{"mask_id": int, "color": ...}], or that list as JSON) into steps."""
    if isinstance(instructions, str):
        if not instructions.strip():
            return []
        try:
            instructions = json.loads(instructions)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"render_instructions is not valid JSON ({exc.msg} at character {exc.pos}).") from exc
    if instructions is None:
        return []
    if not isinstance(instructions, (list, tuple)):
        raise InvalidInput(
            'render_instructions must be a list like [{"mask_id": 0, "color": [255, 0, 0, 128]}]; '
            f"got {type(instructions).__name__}."
        )
    if len(instructions) > MAX_INSTRUCTIONS:
        raise LimitExceeded(f"render_instructions has {len(instructions)} items; the limit is {MAX_INSTRUCTIONS}.")
    known = index.areas
    steps: list[tuple[int, Color]] = []
    for i, item in enumerate(instructions):
        if not isinstance(item, dict):
            raise InvalidInput(
                f'render_instructions[{i}] must be an object like {{"mask_id": 0, "color": [255, 0, 0, 128]}}; '
                f"got {_short(item)}."
            )
        extra = sorted(str(k) for k in item if k not in ("mask_id", "color"))
        if extra:
            raise InvalidInput(
                f"render_instructions[{i}] has unknown key(s) {', '.join(map(repr, extra))}; "
                'the keys are "mask_id" and "color".'
            )
        mid = item.get("mask_id")
        if isinstance(mid, bool) or not isinstance(mid, Integral):
            raise InvalidInput(f'render_instructions[{i}] needs "mask_id" as an integer; got {_short(mid)}.')
        mid = int(mid)
        if mid not in known:
            raise NotFound(f"Image {image_id} has no mask {mid} ({_id_range(index.mask_ids)}).")
        steps.append((mid, parse_color(item.get("color"), mid)))
    return steps


def _short(v: object) -> str:
    """A one-line repr, cut at 60 characters: enough to recognise what was sent."""
    text = " ".join(repr(v).split())
    return text if len(text) <= 60 else text[:57] + "..."


# ---- rendering --------------------------------------------------------------------------------
def set_rules(
    index: MaskIndex, steps: list[tuple[int, Color]], background: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per coverage set: C (n×3), K (n) so that out = C + K·photo, and alpha A (n) for "transparent"."""
    n = index.n_sets
    c = np.zeros((n, 3), dtype=np.float64)
    k = np.full(n, {"original": 1.0, "dim": 0.5}.get(background, 0.0))
    if background == "white":
        c[:] = 255.0
    a = np.zeros(n) if background == "transparent" else None
    for mask_id, color in steps:
        s = index._sets(mask_id)
        if not s.size:
            continue
        if isinstance(color, str):  # ORIGINAL, the only colour given as text: a cut-out, the photo's own pixel
            c[s] = 0.0
            k[s] = 1.0
            if a is not None:
                a[s] = 1.0
            continue
        r, g, b, alpha8 = color
        alpha = alpha8 / 255.0
        c[s] = alpha * np.array([r, g, b], dtype=np.float64) + (1.0 - alpha) * c[s]
        k[s] *= 1.0 - alpha
        if a is not None:
            a[s] = alpha + (1.0 - alpha) * a[s]
    if a is not None:  # straight (not premultiplied) colour out: divide by the coverage
        covered = a > 0
        c[covered] /= a[covered, None]
        k[covered] /= a[covered]
    return c, k, a


def render(
    image: np.ndarray, index: MaskIndex, instructions: list[tuple[int, Color]], background: object = "original"
) -> np.ndarray:
    """The composite: background, then each mask's RGBA in order (source-over); a new HxWx3 (HxWx4 if transparent)."""
    if not isinstance(background, str) or background not in BACKGROUNDS:
        raise InvalidInput(f"Background must be one of {', '.join(BACKGROUNDS)}; got {_short(background)}.")
    h, w = index.shape
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (h, w, 3)):
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidInput(f"The image to render must be a uint8 array of shape ({h}, {w}, 3); got {got}.")
    c, k, a = set_rules(index, instructions, background)
    # One row per set: C + 0.5 (so truncating to uint8 rounds to nearest) and K, as float32.
    table = np.empty((index.n_sets, 4), dtype=np.float32)
    table[:, :3] = c + 0.5
    table[:, 3] = k
    alpha = None if a is None else np.floor(a * 255.0 + 0.5).astype(np.uint8)
    return _blend(image, index._labels, table, alpha)


def _blend(image: np.ndarray, labels: np.ndarray, table: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """out[p, ch] = trunc(table[l, ch] + table[l, 3]·image[p, ch]) with l = labels[p], in cache-sized bands."""
    h, w = labels.shape
    out = np.empty((h, w, 3 if alpha is None else 4), dtype=np.uint8)
    if h * w < _PARALLEL_PIXELS or h < 2:
        _blend_rows(image, labels, table, alpha, out, 0, h)
        return out
    mid = h // 2
    second = _pool().submit(_blend_rows, image, labels, table, alpha, out, mid, h)
    _blend_rows(image, labels, table, alpha, out, 0, mid)
    second.result()
    return out


def _pool() -> ThreadPoolExecutor:
    """One helper thread for the second half of large frames (numpy releases the GIL in these loops)."""
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="render")
    return _POOL


def _blend_rows(
    image: np.ndarray,
    labels: np.ndarray,
    table: np.ndarray,
    alpha: np.ndarray | None,
    out: np.ndarray,
    start: int,
    stop: int,
) -> None:
    """Rows start..stop of _blend, in bands of about _BAND_PIXELS pixels with their own scratch buffers."""
    h, w = labels.shape
    band = max(1, _BAND_PIXELS // w)
    n = band * w
    idx = np.empty(n, dtype=np.intp)
    # Each 16-byte table row gathered as one complex128 scalar of a 1-D array, with mode="clip" (the labels
    # are valid by construction): 4x faster than take(axis=0) or mode="raise", which check every index.
    flat = np.ascontiguousarray(table, dtype=np.float32).view(np.complex128).reshape(-1)
    gathered = np.empty(n, dtype=np.complex128)
    rows = gathered.view(np.float32).reshape(n, 4)
    pix = np.empty((n, 3), dtype=np.float32)
    for r0 in range(start, stop, band):
        r1 = min(stop, r0 + band)
        m = (r1 - r0) * w
        np.copyto(idx[:m], labels[r0:r1].reshape(-1))  # np.take wants intp indices
        np.take(flat, idx[:m], out=gathered[:m], mode="clip")
        px = pix[:m]
        np.copyto(px, image[r0:r1].reshape(m, 3))  # contiguous uint8 → float32: cheap
        # The per-pixel factor differs per row of px, so these run channel by channel (strided, but a
        # length-3 inner loop would be far slower); conversions in and out stay contiguous.
        for ch in range(3):
            np.multiply(px[:, ch], rows[:m, 3], out=px[:, ch])
            np.add(px[:, ch], rows[:m, ch], out=px[:, ch])
        if alpha is None:
            np.copyto(out[r0:r1].reshape(m, 3), px, casting="unsafe")
        else:
            dst = out[r0:r1].reshape(m, 4)
            for ch in range(3):
                np.copyto(dst[:, ch], px[:, ch], casting="unsafe")
            dst[:, 3] = np.take(alpha, idx[:m], mode="clip")


def cutout(image: np.ndarray, mask: np.ndarray, bbox: list[int], max_side: int = 160) -> np.ndarray:
    """RGBA gallery thumbnail: the bbox crop, alpha 255 inside the mask, nearest-downscaled to max_side."""
    h, w = mask.shape
    x, y, bw, bh = (int(v) for v in bbox)
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + bw), min(h, y + bh)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((1, 1, 4), dtype=np.uint8)
    ch, cw = y1 - y0, x1 - x0
    scale = min(1.0, max_side / max(ch, cw))
    th, tw = max(1, round(ch * scale)), max(1, round(cw * scale))
    rows = y0 + nearest_indices(ch, th)
    cols = x0 + nearest_indices(cw, tw)
    out = np.empty((th, tw, 4), dtype=np.uint8)
    out[..., :3] = image[rows][:, cols]
    out[..., 3] = np.where(mask[rows][:, cols], 255, 0)
    return out


# ---- what the UI shows on top of a composite -------------------------------------------------------
def on_checkerboard(rgba: np.ndarray, cell: int = 12) -> np.ndarray:
    """An RGBA composite shown the way image editors show transparency: over a light grey checkerboard."""
    h, w = rgba.shape[:2]
    yy, xx = np.indices((h, w))
    board = np.where(((yy // cell + xx // cell) % 2)[..., None] == 0, 255, 204).astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgba[..., :3] * alpha + board * (255 - alpha) + 127) // 255).astype(np.uint8)


def prompt_overlay(
    image: np.ndarray, preview: np.ndarray | None, points: list[list[int]], shape: tuple[int, int]
) -> np.ndarray:
    """The object being built, on a display copy: the full-size `preview` mask in translucent cyan,
    include points (label 1) green and exclude points red; `points` are [x, y, label] in full-size pixels."""
    out = image.astype(np.float32)
    dh, dw = image.shape[:2]
    h, w = shape
    if preview is not None:
        small = preview[nearest_indices(h, dh)[:, None], nearest_indices(w, dw)[None, :]]
        out[small] = out[small] * 0.45 + np.array([0, 220, 255], np.float32) * 0.55
    r = max(3, min(dh, dw) // 120)
    for x, y, label in points:
        cx, cy = int(x * dw / w), int(y * dh / h)
        colour = (40, 220, 60) if label == 1 else (235, 40, 40)
        out[max(0, cy - r - 1) : cy + r + 2, max(0, cx - r - 1) : cx + r + 2] = (255, 255, 255)
        out[max(0, cy - r) : cy + r + 1, max(0, cx - r) : cx + r + 1] = colour
    return out.astype(np.uint8)
