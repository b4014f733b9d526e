"""Benchmark render.py against the naive baselines, measured in the same run (medians, interleaved).

    /tmp/venv/bin/python bench/bench_render.py [--size 2048] [--masks 200] [--painted 50]

Figures: render (ours vs a full-frame RGBA layer per mask + PIL alpha_composite), mask at point (ours vs
decoding every stored base64 PNG per click), stored bytes per mask (COCO RLE string vs base64 PNG mode
"1"), index build time, and the display-copy render a UI click pays. One PASS/FAIL line per target.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import instructions, make_workload  # noqa: E402

import imaging  # noqa: E402
import masks as rle  # noqa: E402
import render  # noqa: E402

DISPLAY_MAX_SIDE = 1024


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f} ms"


def verdict(ok: bool, text: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {text}")


def naive_render(image: np.ndarray, painted: list[np.ndarray], colours: list[tuple]) -> np.ndarray:
    """The baseline: one full-frame RGBA layer per painted mask, composited with PIL."""
    base = Image.fromarray(image).convert("RGBA")
    for mask, colour in zip(painted, colours, strict=True):
        layer = np.zeros((*image.shape[:2], 4), dtype=np.uint8)
        layer[mask] = colour
        base = Image.alpha_composite(base, Image.fromarray(layer, "RGBA"))
    return np.asarray(base.convert("RGB"))


def png_b64(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")  # a bool array is mode "1"
    return base64.b64encode(buf.getvalue()).decode("ascii")


def naive_mask_at(stored: list[tuple[int, str]], x: int, y: int) -> int | None:
    """The baseline click: decode every stored PNG and test the pixel; the smallest hit wins."""
    best = None
    for mask_id, text in stored:
        with Image.open(io.BytesIO(base64.b64decode(text))) as im:
            mask = np.asarray(im)
        if mask[y, x]:
            area = int(mask.sum())
            if best is None or (area, mask_id) < best:
                best = (area, mask_id)
    return None if best is None else best[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--masks", type=int, default=200)
    parser.add_argument("--painted", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5, help="naive render runs (ours runs 3x as often)")
    args = parser.parse_args()
    started = time.perf_counter()

    t = time.perf_counter()
    wl = make_workload(args.size, args.masks)
    h, w = wl.shape
    print(
        f"workload: {w}×{h} photo, {args.masks} masks (areas {min(wl.areas()) / (h * w):.2%}–"
        f"{max(wl.areas()) / (h * w):.1%}, {wl.mean_depth():.1f} masks per pixel on average), "
        f"{args.painted} painted; made in {time.perf_counter() - t:.1f} s"
    )

    # ---- index build ------------------------------------------------------------------------
    dshape = imaging.display_shape((h, w), DISPLAY_MAX_SIDE)
    produce, build_full, build_both = [], [], []
    for _ in range(3):
        t = time.perf_counter()
        for _ in wl.masks():
            pass
        produce.append(time.perf_counter() - t)
        t = time.perf_counter()
        index = render.MaskIndex.build((h, w), wl.masks())
        build_full.append(time.perf_counter() - t)
        t = time.perf_counter()
        index, display = render.build_indexes((h, w), wl.masks(), dshape)
        build_both.append(time.perf_counter() - t)
    assert display is not None
    p = statistics.median(produce)
    full_s, both_s = statistics.median(build_full) - p, statistics.median(build_both) - p
    print(f"\nindex build ({index.n_sets} coverage sets; {display.n_sets} at display size {dshape[1]}×{dshape[0]}):")
    print(f"  full size only          {ms(full_s)}   (after {ms(p).strip()} to expand the masks themselves)")
    print(f"  full + display, 1 pass  {ms(both_s)}   (display index adds {ms(both_s - full_s).strip()})")
    print(f"  memory held             {index.nbytes / 1e6:8.1f} MB full, {display.nbytes / 1e6:.1f} MB display")

    # ---- render -----------------------------------------------------------------------------
    todo = instructions(args.masks, args.painted)
    steps = render.parse_instructions(todo, index, "bench")
    painted = [wl.mask(mid) for mid, _ in steps]
    colours = [colour for _, colour in steps]
    ours, naive = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        slow = naive_render(wl.image, painted, colours)
        naive.append(time.perf_counter() - t)
        for _ in range(3):
            t = time.perf_counter()
            fast = render.render(wl.image, index, steps)
            ours.append(time.perf_counter() - t)
    del painted
    diff = int(np.abs(fast.astype(int) - slow.astype(int)).max())
    ours_s, naive_s = statistics.median(ours), statistics.median(naive)
    by_bg = {}
    for bg in render.BACKGROUNDS:
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            render.render(wl.image, index, steps, bg)
            runs.append(time.perf_counter() - t)
        by_bg[bg] = statistics.median(runs)
    display_rgb = imaging.resize(wl.image, dshape)
    disp = []
    for _ in range(9):
        t = time.perf_counter()
        render.render(display_rgb, display, steps)
        disp.append(time.perf_counter() - t)
    disp_s = statistics.median(disp)
    print(f"\nrender, {args.painted} painted masks ({len(ours)} runs ours, {len(naive)} naive, interleaved):")
    print(f"  ours                    {ms(ours_s)}")
    print(f"  naive PIL alpha_compose {ms(naive_s)}   ratio {naive_s / ours_s:.0f}x  (max channel diff {diff})")
    print("  by background           " + ", ".join(f"{bg} {v * 1000:.1f}" for bg, v in by_bg.items()) + " ms")
    print(f"  display copy {dshape[1]}×{dshape[0]}  {ms(disp_s)}   (what a UI click pays to render)")

    # ---- mask at point ----------------------------------------------------------------------
    rng = np.random.default_rng(2)
    xs, ys = rng.integers(0, w, 100_000).tolist(), rng.integers(0, h, 100_000).tolist()
    lookups = []
    for _ in range(5):
        t = time.perf_counter()
        for x, y in zip(xs, ys, strict=True):
            index.masks_at(x, y)
        lookups.append((time.perf_counter() - t) / len(xs))
    ours_at = statistics.median(lookups)

    stored_png, rle_bytes = [], []
    for mask_id, mask in wl.masks():
        stored_png.append((mask_id, png_b64(mask)))
        rle_bytes.append(len(rle.encode(mask)["counts"]))
    clicks, agree = [], True
    for x, y in zip(xs[:3], ys[:3], strict=True):
        t = time.perf_counter()
        hit = naive_mask_at(stored_png, x, y)
        clicks.append(time.perf_counter() - t)
        under = index.masks_at(x, y)
        agree &= hit == (under[0] if under else None)
    naive_at = statistics.median(clicks)
    print(f"\nmask at point ({len(xs)} lookups x5 ours, {len(clicks)} clicks naive):")
    print(f"  ours (every mask under the point) {ours_at * 1e6:8.2f} µs")
    print(
        f"  naive decode-all-PNGs             {naive_at * 1e6:8.0f} µs   ratio {naive_at / ours_at:,.0f}x"
        f"  (same answer: {agree})"
    )

    png_mean = statistics.mean(len(s) for _, s in stored_png)
    rle_mean = statistics.mean(rle_bytes)
    print("\nstored bytes per mask:")
    print(f"  COCO RLE string         {rle_mean:8.0f}")
    print(f"  base64 PNG mode '1'     {png_mean:8.0f}   RLE is {rle_mean / png_mean:.2f} of it")

    print()
    verdict(ours_s <= 0.060, f"render median {ours_s * 1000:.1f} ms <= 60 ms")
    verdict(naive_s / ours_s >= 40, f"render {naive_s / ours_s:.0f}x faster than naive PIL alpha_composite (>= 40x)")
    verdict(ours_at <= 20e-6, f"mask at point {ours_at * 1e6:.2f} µs <= 20 µs")
    verdict(
        naive_at / ours_at >= 1000 and agree,
        f"mask at point {naive_at / ours_at:,.0f}x faster than decoding every PNG (>= 1000x), same answers",
    )
    verdict(rle_mean <= png_mean / 3, f"RLE bytes per mask {rle_mean / png_mean:.2f} of base64 PNG (<= 1/3)")
    verdict(diff <= 2, f"ours agrees with PIL's integer alpha_composite within {diff} per channel (<= 2)")
    print(f"INFO  index build {full_s:.2f} s full size, {both_s:.2f} s with the display index (notes: 0.6-0.85 s)")
    print(f"INFO  display-copy render {disp_s * 1000:.1f} ms")
    print(f"\ntotal bench time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
