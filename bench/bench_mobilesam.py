"""Benchmark the in-process MobileSAM engine: prompt latency, clicks-ready time, memory; baselines in the same run.

    .venv/bin/python bench/bench_mobilesam.py [--clicks 20] [--runs 3]

Figures (medians, runs interleaved with their baselines):
- prompt: segment() server time on the cached embedding (decoder + upscale + RLE), target ≤ 60 ms; baselines:
  the same click with the whole-frame upscale (to_full, what prompts did before mask_upscale), interleaved
  click by click, and the same click when the embedding has to be computed again (no cache);
- clicks ready: prepare() on a new 1024² photo (hash, resize, encoder), target ≤ 1.5 s; baselines, interleaved
  run by run: the same with the encoder in torch (before the onnxruntime export), and the built-in engine's
  first click on the same photo (it builds its whole hierarchy first);
- decoder per prompt at batch 1 and batched (8, 24, 64 prompts a call): the engine's decoder (mask_decoder_fast
  on onnxruntime), the same in torch, and the plain MaskDecoder module (baseline, ratios against it), interleaved;
- memory: resident set size with the model loaded and 10 different photos embedded, target < 1.5 GB;
  baseline: the process before the model was loaded.
Each time is printed as wall time and as CPU time (both threads together): on a machine shared with other
work the wall time grows with the load average (printed), the CPU time much less. One PASS/FAIL per target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mobilesam_model  # noqa: E402
import model_weights  # noqa: E402
from builtin_segmenter import BuiltinSegmenter  # noqa: E402
from mobilesam_engine import MobileSamSegmenter  # noqa: E402
from sam_engine import PromptModelSegmenter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_TARGET_S = 0.060
READY_TARGET_S = 1.5
MEMORY_TARGET_MB = 1536
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")


def photo(name: str, variant: int = 0, side: int = 1024) -> np.ndarray:
    """A scikit-image photo resized to side×side; variants are flipped/rotated (different pixels, same cost)."""
    img = cv2.resize(getattr(data, name)(), (side, side), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(np.rot90(img, variant % 4) if variant else img)


def timed(fn) -> tuple[float, float, object]:
    """(wall s, CPU s of this process, result)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def verdict(ok: bool, text: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {text}")


def load_avg() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _variant(model, *, fast: bool, onnx: bool):
    """The same loaded network with another decoder path (the engine's own model is left as it is)."""
    other = mobilesam_model.MobileSam.__new__(mobilesam_model.MobileSam)
    other.__dict__.update(model.__dict__)
    other.fast_decoder = fast
    other.onnx_decoder = model.onnx_decoder if onnx else None
    return other


class _WholeFrameUpscale:
    """The engine's model without `full_masks`: prompts upscale every mask over the whole frame (to_full)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name: str):
        if name == "full_masks":
            raise AttributeError(name)
        return getattr(self._model, name)


def clicks_ready(seg, builtin, runs: int) -> float:
    """prepare() on new 1024² photos: the engine (encoder on onnxruntime when it loaded), the encoder in torch,
    the built-in engine's first click; interleaved run by run. Returns the engine's median (s)."""
    onnx_encoder = seg.model.onnx_encoder
    found: dict[str, list[tuple[float, float]]] = {"engine": [], "torch encoder": [], "built-in first click": []}
    for run in range(runs):
        for k, name in enumerate(found):
            image = photo(PHOTOS[run % len(PHOTOS)], variant=1 + 3 * run + k)  # new pixels: never cached
            if name == "built-in first click":
                wall, cpu, _ = timed(lambda image=image: builtin.segment(image, points=[[512, 512]], point_labels=[1]))
            else:
                seg.model.onnx_encoder = onnx_encoder if name == "engine" else None
                wall, cpu, _ = timed(lambda image=image: seg.prepare(image))
            found[name].append((wall, cpu))
    seg.model.onnx_encoder = onnx_encoder
    medians = {name: [statistics.median(v) for v in zip(*found[name])] for name in found}
    r = medians["engine"][0]
    encoder = "onnxruntime" if onnx_encoder is not None else "torch"
    shown = "; ".join(f"{name} {w:.2f} s ({c:.2f} CPU, ratio {w / r:.2f}x)" for name, (w, c) in medians.items())
    print(f"clicks ready at 1024² (encoder on {encoder}): {shown}")
    return r


def prompt_latency(seg, image, clicks) -> float:
    """segment() on the cached embedding, click by click: the engine, then the same with the whole-frame
    upscale (interleaved). Returns the engine's median (s)."""
    whole = PromptModelSegmenter(_WholeFrameUpscale(seg.model), engine="whole-frame upscale", cache=seg.cache)
    found: dict[str, list[tuple[float, float]]] = {"engine": [], "whole-frame upscale": []}
    for x, y in clicks:
        for name, s in (("engine", seg), ("whole-frame upscale", whole)):
            wall, cpu, _ = timed(lambda s=s, x=x, y=y: s.segment(image, points=[[x, y]], point_labels=[1]))
            found[name].append((wall, cpu))
    medians = {name: [statistics.median(v) * 1000 for v in zip(*found[name])] for name in found}
    p = medians["engine"][0]
    shown = "; ".join(f"{name} {w:.1f} ms ({c:.1f} CPU, ratio {w / p:.2f}x)" for name, (w, c) in medians.items())
    print(f"prompt on the cached embedding: {shown}")
    return p / 1000


def decoder_latency(model, emb, runs: int) -> None:
    """Per-prompt decode time (ms, wall and CPU), batch by batch, interleaved: the engine's decoder (the fast
    one on onnxruntime, when it loaded), the fast one in torch and the plain module (the baseline)."""
    variants = {
        "onnxruntime": _variant(model, fast=True, onnx=True),
        "torch fast": _variant(model, fast=True, onnx=False),
        "torch plain": _variant(model, fast=False, onnx=False),
    }
    if model.onnx_decoder is None:
        del variants["onnxruntime"]
    rng = np.random.default_rng(1)
    chunk = mobilesam_model.DECODE_CHUNK
    for batch in (1, 8, 24, 64):
        points = rng.uniform(0, 1024, (batch, 1, 2)).astype(np.float32)
        labels = np.ones((batch, 1), np.int64)
        mobilesam_model.DECODE_CHUNK = batch
        found: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        model.decode(emb, points, labels)  # the per-image part of the fast decoder is made on the first call
        for _ in range(runs):
            for name, m in variants.items():
                wall, cpu, _ = timed(lambda m=m, p=points, lab=labels: m.decode(emb, p, lab))
                found[name].append((wall / batch, cpu / batch))
        medians = {name: [statistics.median(v) * 1000 for v in zip(*found[name])] for name in variants}
        base = medians["torch plain"]
        shown = "; ".join(f"{name} {w:.1f} ms ({c:.1f} CPU, {base[0] / w:.2f}x)" for name, (w, c) in medians.items())
        print(f"decoder per prompt, batch {batch:2d}: {shown}")
    mobilesam_model.DECODE_CHUNK = chunk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    args = parser.parse_args()
    print(f"load average at start: {load_avg()} ({os.cpu_count()} CPUs)")

    before_mb = rss_mb()
    model_weights.resolve(None, args.models)
    wall, cpu, seg = timed(lambda: MobileSamSegmenter.load(checkpoint=None, models_dir=args.models, max_masks=64))
    print(f"load model: {wall:.2f} s wall, {cpu:.2f} s CPU")
    seg.cache.disk = None  # measure the encoder, not the disk copy of an earlier run
    builtin = BuiltinSegmenter(max_masks=64)

    r = clicks_ready(seg, builtin, args.runs)

    image = photo("astronaut")
    decoder_latency(seg.model, seg.model.embed(image), args.runs)
    seg.prepare(image)
    rng = np.random.default_rng(0)
    clicks = rng.uniform(0, 1024, size=(args.clicks, 2)).tolist()
    p = prompt_latency(seg, image, clicks)
    uncached = []
    for x, y in clicks[: args.runs]:
        seg.cache.clear()
        wall, _, _ = timed(lambda x=x, y=y: seg.segment(image, points=[[x, y]], point_labels=[1]))
        uncached.append(wall)
    u = statistics.median(uncached)
    print(f"a click with the embedding recomputed: {u * 1000:.0f} ms (ratio to a cached one {u / p:.1f}x)")

    for i in range(10):
        seg.prepare(photo(PHOTOS[i % len(PHOTOS)], variant=4 + i))
    mem = rss_mb()
    print(
        f"resident memory, model + {len(seg.cache)} embeddings cached: {mem:.0f} MB "
        f"(before loading the model: {before_mb:.0f} MB, ratio {mem / before_mb:.1f}x)"
    )
    print(f"load average at end: {load_avg()}")
    verdict(p <= PROMPT_TARGET_S, f"prompt median {p * 1000:.1f} ms <= {PROMPT_TARGET_S * 1000:.0f} ms")
    verdict(r <= READY_TARGET_S, f"clicks ready median {r:.2f} s <= {READY_TARGET_S} s")
    verdict(mem < MEMORY_TARGET_MB, f"memory {mem:.0f} MB < {MEMORY_TARGET_MB} MB")


if __name__ == "__main__":
    main()
