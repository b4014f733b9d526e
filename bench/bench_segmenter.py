"""Benchmark: the built-in segmenter's generate() on 1024x1024 photos against a naive baseline, same run.

Baseline: what one would write first, single-scale Felzenszwalb at full resolution, keeping the
max_masks largest regions as masks (a flat partition: one nesting level), encoded the same way.
Prints median-of-3 times (runs interleaved), the ratio, PASS/FAIL against the 3 s target, and for
each engine the mask count, the share of pixels in at least one mask and the number of nesting levels.

Run: /tmp/venv/bin/python bench/bench_segmenter.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data
from skimage.segmentation import felzenszwalb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import masks
from builtin_segmenter import BuiltinSegmenter

TARGET_S = 3.0
RUNS = 3
MAX_MASKS = 128


def baseline(image: np.ndarray, max_masks: int = MAX_MASKS) -> list[dict]:
    """Single-scale Felzenszwalb at full resolution; the largest regions as records."""
    labels = felzenszwalb(image, scale=100, sigma=0.8, min_size=50)
    counts = np.bincount(labels.ravel())
    largest = np.argsort(-counts, kind="stable")[:max_masks]
    records = []
    for label in largest:
        mask = labels == label
        records.append({"segmentation": masks.encode(mask), "area": int(counts[label]), "bbox": masks.bbox_of(mask)})
    return records


def coverage(records: list[dict], shape: tuple[int, int]) -> float:
    covered = np.zeros(shape, bool)
    for record in records:
        covered |= masks.decode(record["segmentation"])
    return float(covered.mean())


def nesting_levels(records: list[dict]) -> int:
    """Longest chain whole ⊃ part ⊃ sub-part ... (containment judged on a 2x subsampled grid)."""
    if not records:
        return 0
    flat = np.stack([masks.decode(r["segmentation"])[::2, ::2].ravel() for r in records]).astype(np.float32)
    inter = flat @ flat.T
    area = np.diag(inter).copy()
    order = np.argsort(area, kind="stable")
    depth = np.ones(len(records), int)
    for k, i in enumerate(order):
        for j in order[:k]:
            if area[j] < area[i] and inter[i, j] >= 0.98 * area[j]:
                depth[i] = max(depth[i], depth[j] + 1)
    return int(depth.max())


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> int:
    photos = {
        name: cv2.resize(getattr(data, name)(), (1024, 1024), interpolation=cv2.INTER_CUBIC)
        for name in ("astronaut", "coffee")
    }
    BuiltinSegmenter().generate(photos["astronaut"][:64, :64])  # warm imports outside the timings
    failed = False
    print(f"generate() on 1024x1024 photos, median of {RUNS} interleaved runs, 2-core machine")
    for name, image in photos.items():
        ours_t, base_t = [], []
        for _ in range(RUNS):
            t, ours = timed(BuiltinSegmenter(max_masks=MAX_MASKS).generate, image)  # fresh: no cache hit
            ours_t.append(t)
            t, base = timed(baseline, image)
            base_t.append(t)
        ours_s, base_s = statistics.median(ours_t), statistics.median(base_t)
        verdict = "PASS" if ours_s <= TARGET_S else "FAIL"
        failed |= verdict == "FAIL"
        print(f"\n{name} 1024x1024")
        ours_runs, base_runs = ", ".join(f"{t:.2f}" for t in ours_t), ", ".join(f"{t:.2f}" for t in base_t)
        print(f"  built-in segmenter : {ours_s:6.2f} s  (runs {ours_runs})  {verdict} (target {TARGET_S:.0f} s)")
        print(f"  baseline (full-res felzenszwalb, flat): {base_s:6.2f} s  (runs {base_runs})")
        print(f"  ratio built-in / baseline: {ours_s / base_s:.2f}x  ({base_s / ours_s:.1f}x faster)")
        for label, records in (("built-in", ours), ("baseline", base)):
            print(
                f"  {label:9s}: {len(records):3d} masks, coverage {coverage(records, image.shape[:2]):.1%}, "
                f"nesting levels {nesting_levels(records)}"
            )
    print("\nOVERALL", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
