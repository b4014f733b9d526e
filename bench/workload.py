"""A realistic synthetic segmentation workload, built in code, for the benchmarks.

A photo-like RGB image and SAM2-like masks: blobs, ellipses and rectangles with areas from 0.1 % to 40 %
of the frame, nested whole / part / sub-part so that a pixel lies in ~10+ masks. Masks are kept as
bounding-box crops (a full-frame bool mask per mask would be 800 MB at 2048² with 200 masks) and are
expanded one at a time on demand. Ids follow the app's convention: 0 is the largest mask.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Workload:
    image: np.ndarray  # HxWx3 uint8
    crops: list[tuple[int, list[int], np.ndarray]]  # (mask_id, [x, y, w, h], bool crop), largest first

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape[:2]

    def mask(self, i: int) -> np.ndarray:
        """Full-frame bool mask number i (a new array)."""
        _, (x, y, w, h), crop = self.crops[i]
        out = np.zeros(self.shape, dtype=bool)
        out[y : y + h, x : x + w] = crop
        return out

    def masks(self) -> Iterator[tuple[int, np.ndarray]]:
        """(mask_id, full-frame bool mask), one at a time."""
        for i, (mask_id, _, _) in enumerate(self.crops):
            yield mask_id, self.mask(i)

    def areas(self) -> list[int]:
        return [int(c.sum()) for _, _, c in self.crops]

    def mean_depth(self) -> float:
        """Mean number of masks covering a pixel."""
        return sum(self.areas()) / (self.shape[0] * self.shape[1])


def photo(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields, a gradient, some edges and fine noise: compresses and blends like a photo."""
    low = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    mid = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    detail = np.asarray(Image.fromarray(mid).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    ramp = np.linspace(-30, 30, w, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
    img = 0.7 * base + 0.3 * detail + ramp + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape(kind: str, h: int, w: int, cy: float, cx: float, area: float, rng) -> tuple[list[int], np.ndarray]:
    """One shape of roughly `area` pixels centred at (cy, cx), clipped to the frame: (bbox, crop)."""
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    if kind == "rect":
        rh, rw = np.sqrt(area / aspect) / 2, np.sqrt(area * aspect) / 2
    else:
        r = np.sqrt(area / np.pi)
        rh, rw = r / np.sqrt(aspect), r * np.sqrt(aspect)
    pad = 1.4 if kind == "blob" else 1.0
    y0, y1 = max(0, int(cy - rh * pad)), min(h, int(cy + rh * pad) + 1)
    x0, x1 = max(0, int(cx - rw * pad)), min(w, int(cx + rw * pad) + 1)
    if y1 <= y0 or x1 <= x0:
        return [0, 0, 0, 0], np.zeros((0, 0), dtype=bool)
    yy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / max(rh, 0.5)
    xx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / max(rw, 0.5)
    if kind == "rect":
        crop = (np.abs(yy) <= 1) & (np.abs(xx) <= 1)
    elif kind == "ellipse":
        crop = yy * yy + xx * xx <= 1
    else:  # a wobbly blob: radius varies with the angle
        theta = np.arctan2(yy, xx)
        radius = np.ones_like(theta)
        for k in (2, 3, 5):
            radius += rng.uniform(0.05, 0.18) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        crop = np.sqrt(yy * yy + xx * xx) <= radius
    return [x0, y0, x1 - x0, y1 - y0], crop


def make_workload(
    size: int = 2048, n_masks: int = 200, seed: int = 0, min_frac: float = 0.001, max_frac: float = 0.40
) -> Workload:
    """A photo and n_masks nested masks at size×size (ids by decreasing area, like the app stores them)."""
    rng = np.random.default_rng(seed)
    h = w = size
    image = photo(h, w, rng)
    fracs = np.sort(np.exp(rng.uniform(np.log(min_frac), np.log(max_frac), n_masks)))[::-1]
    made: list[tuple[list[int], np.ndarray]] = []
    made_areas: list[int] = []
    for frac in fracs:
        area = float(frac) * h * w
        kind = rng.choice(["blob", "blob", "ellipse", "rect"])
        # Most masks are parts of a bigger one: centre them on one of its pixels and keep them inside it.
        parents = [i for i, a in enumerate(made_areas) if a > 1.5 * area]
        parent = int(rng.choice(parents)) if parents and rng.random() < 0.75 else None
        if parent is None:
            cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        else:
            (px, py, _, _), pc = made[parent]
            cy, cx = _pixel_in(pc, rng)
            cy, cx = cy + py, cx + px
        bbox, crop = _shape(str(kind), h, w, cy, cx, area, rng)
        if parent is not None and crop.size:
            (px, py, pw, ph), pc = made[parent]
            inside = np.zeros_like(crop)
            x, y, cw, ch = bbox
            ix0, iy0 = max(x, px), max(y, py)
            ix1, iy1 = min(x + cw, px + pw), min(y + ch, py + ph)
            if ix1 > ix0 and iy1 > iy0:
                inside[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = pc[iy0 - py : iy1 - py, ix0 - px : ix1 - px]
            clipped = crop & inside
            if clipped.sum() >= min_frac * h * w:  # keep every mask at least min_frac of the frame
                crop = clipped
        made.append(_tight(bbox, crop))
        made_areas.append(int(made[-1][1].sum()))
    order = sorted(range(len(made)), key=lambda i: -made_areas[i])
    crops = [(mask_id, made[i][0], made[i][1]) for mask_id, i in enumerate(order)]
    return Workload(image=image, crops=crops)


def _pixel_in(crop: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    """A random pixel of a non-empty crop (rejection sampling: cheaper than listing every pixel)."""
    for _ in range(1000):
        y, x = int(rng.integers(crop.shape[0])), int(rng.integers(crop.shape[1]))
        if crop[y, x]:
            return y, x
    ys, xs = np.nonzero(crop)
    j = int(rng.integers(ys.size))
    return int(ys[j]), int(xs[j])


def _tight(bbox: list[int], crop: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Shrink a crop to the pixel extent of its mask."""
    rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    x, y = bbox[0], bbox[1]
    return [int(x + c0), int(y + r0), int(c1 - c0), int(r1 - r0)], np.ascontiguousarray(crop[r0:r1, c0:c1])


def instructions(n_masks: int, n_painted: int, seed: int = 1) -> list[dict]:
    """Render instructions painting n_painted random masks with random RGBA colours (alpha 60-230)."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(n_masks, size=n_painted, replace=False)
    return [
        {"mask_id": int(i), "color": [*(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(60, 231))]}
        for i in ids
    ]
