"""Benchmark: the fast automatic pass (auto_masks) against SAM's standard generator (amg_reference), same run.

Per photo (scikit-image's photos and four of Gradio's sample photos, resized so the longest side is 1024):
the time of each, encoder included (for ours also the encoder's part and the prompts decoded: the ratio is
about (encoder + 1024 prompts and their full-size work) / (encoder + our prompts)); the ratio; the masks each
found; recall = the share of the standard generator's masks (≥ 0.1 % of the image) that one of ours matches
at IoU ≥ 0.8. The tuning set (astronaut, coffee, hubble, ihc and Gradio's groot, tower, cheetah, lion) was
used to tune the fast pass; the held-out set (chelsea, rocket, camera, motorcycle, coins) was only measured,
and its figures are printed apart.
Both use the engine's runtimes (encoder and decoder on onnxruntime, the decoder one prompt at a time).
Targets: ≤ 5 s median, ≥ 12× faster, recall ≥ 0.85.

Run: .venv/bin/python bench/bench_automatic.py [--quick] [--photos a,b] [--reference-cache DIR]
    [--budgets 96,128] [--repeats 3]
--quick: one tuning photo and one held-out one. --reference-cache: reuse the standard generator's masks from
DIR (for tuning iterations only: its time is then not measured, and no ratio is printed). --budgets: run the
fast pass once per prompt budget (auto_masks.PROMPT_BUDGET, default the module's), each row measured against
the same reference masks. --repeats: the fast pass runs that many times per photo and its median time is
kept (default 3: a run of 4 s is at the mercy of a moment's load, while the standard generator's minute averages
it out; the median, not the best). Both passes use the same model and decoder; times are wall clock, with this
process's CPU time (both threads) beside ours: on a shared machine the wall time grows with the load.
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

import auto_masks
import masks
from amg_reference import generate_reference
from auto_masks import boxes_of, generate, pair_iou

TUNING = ("astronaut", "coffee", "hubble", "ihc", "groot", "tower", "cheetah", "lion")  # the last four: Gradio's photos
HELD_OUT = ("chelsea", "rocket", "camera", "motorcycle", "coins")
QUICK = ("astronaut", "chelsea")
MATCH_IOU = 0.8
MAX_MASKS = 128  # the app's default MAX_MASKS
TARGET_S, TARGET_RATIO, TARGET_RECALL = 5.0, 12.0, 0.85


GRADIO_PHOTOS = {"groot": "groot.jpeg", "tower": "tower.jpg", "cheetah": "cheetah.jpg", "lion": "lion.jpg"}
SKIMAGE_NAMES = {"motorcycle": "stereo_motorcycle", "hubble": "hubble_deep_field", "ihc": "immunohistochemistry"}


def photo(name: str) -> np.ndarray:
    """scikit-image's (or Gradio's sample) photo as RGB uint8, the longest side resized to 1024."""
    if name in GRADIO_PHOTOS:
        import gradio
        from PIL import Image

        path = Path(gradio.__file__).parent / "media_assets" / "images" / GRADIO_PHOTOS[name]
        img = np.asarray(Image.open(path).convert("RGB"))
    else:
        img = getattr(data, SKIMAGE_NAMES.get(name, name))()
        img = np.asarray(img[0] if isinstance(img, tuple) else img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = np.ascontiguousarray(img[..., :3]).astype(np.uint8)
    h, w = img.shape[:2]
    scale = 1024 / max(h, w)
    size = (round(w * scale), round(h * scale))
    return cv2.resize(img, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)


def recall(reference: list[np.ndarray], ours: list[np.ndarray]) -> float:
    """Share of the reference masks that some mask of ours matches at IoU ≥ MATCH_IOU (exact, full size)."""
    if not reference:
        return 1.0
    got = [(m, boxes_of(m[None])[0], int(m.sum())) for m in ours]
    hits = 0
    for ref in reference:
        box, area = boxes_of(ref[None])[0], int(ref.sum())
        hits += any(
            min(area, a) >= MATCH_IOU * max(area, a) and pair_iou(ref, box, area, m, b, a) >= MATCH_IOU
            for m, b, a in got
        )
    return hits / len(reference)


def load_model(runtime: str = "onnx"):
    """The MobileSAM network with the weights under models/ (or MOBILESAM_CHECKPOINT), its encoder and decoder on
    onnxruntime (as the engine runs them) or in torch."""
    import mobilesam_onnx
    import model_weights
    from mobilesam_model import load

    root = Path(__file__).resolve().parent.parent
    path = Path(os.environ.get("MOBILESAM_CHECKPOINT", root / "models" / "mobile_sam.pt"))
    model = load(path)
    if runtime == "onnx":  # as the engine runs it: encoder and decoder on onnxruntime
        digest = model_weights.sha256_of(path)
        if not mobilesam_onnx.attach_encoder(model, root / "models", digest):
            print("onnxruntime encoder unusable: the torch encoder runs")
        if not mobilesam_onnx.attach(model, root / "models", digest):
            print("onnxruntime decoder unusable: the torch decoder runs")
    return model


class CountingModel:
    """The model, counting the prompts a pass decodes (everything else passed through)."""

    def __init__(self, model):
        self.model, self.prompts = model, 0

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def decode(self, emb, points, *args, **kwargs):
        self.prompts += len(points)
        return self.model.decode(emb, points, *args, **kwargs)

    def decode_staged(self, emb, points, *args, **kwargs):
        self.prompts += len(points)
        return self.model.decode_staged(emb, points, *args, **kwargs)


def run_ours(model, image: np.ndarray, repeats: int = 1) -> tuple[float, float, float, int, list[np.ndarray]]:
    """(wall s, CPU s, encoder s, prompts, masks) of the fast pass, encoder included: the run of median wall
    time among `repeats` (the pass is deterministic, so every run gives the same masks and prompts)."""
    runs = []
    for _ in range(max(1, repeats)):
        counting = CountingModel(model)
        start, cpu = time.perf_counter(), time.process_time()
        emb = model.embed(image)
        encoded = time.perf_counter()
        records = generate(counting, emb, image, max_masks=MAX_MASKS)
        runs.append((time.perf_counter() - start, time.process_time() - cpu, encoded - start, counting.prompts))
    elapsed, cpu, encoder_s, prompts = sorted(runs)[len(runs) // 2]
    return elapsed, cpu, encoder_s, prompts, [masks.decode(r["segmentation"]) for r in records]


def run_reference(model, image: np.ndarray, name: str, cache: Path | None) -> tuple[float | None, list[np.ndarray]]:
    path = cache / f"{name}.npz" if cache else None
    if path is not None and path.exists():
        stored = np.load(path)
        return None, list(stored["masks"])
    start = time.perf_counter()
    emb = model.embed(image)
    records = generate_reference(model, emb, image)
    elapsed = time.perf_counter() - start
    found = [r["mask"] for r in records]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, masks=np.stack(found) if found else np.zeros((0, *image.shape[:2]), bool))
    return elapsed, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two photos instead of thirteen")
    parser.add_argument("--photos", help="comma-separated scikit-image photo names")
    parser.add_argument("--reference-cache", type=Path, help="reuse the standard generator's masks (tuning only)")
    parser.add_argument("--budgets", help="comma-separated prompt budgets for the fast pass")
    parser.add_argument("--runtime", choices=("onnx", "torch"), default="onnx", help="where the decoder runs")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast pass per photo (median kept)")
    args = parser.parse_args()
    names = args.photos.split(",") if args.photos else list(QUICK if args.quick else TUNING + HELD_OUT)
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else [auto_masks.PROMPT_BUDGET]
    print("load average at start: " + " ".join(f"{v:.1f}" for v in os.getloadavg()))
    model = load_model(args.runtime)
    print(f"decoder runtime: {'onnxruntime' if model.onnx_decoder is not None else 'torch'}")
    model.embed(photo("astronaut"))  # warm-up: first-call allocations are not what a photo costs
    header = f"{'photo':12} {'set':8} {'budget':>6} {'ours s':>7} {'enc s':>5} {'prompts':>7} {'cpu s':>6} {'masks':>5}"
    header += f" {'std s':>7} {'masks':>5}"
    print(header + f" {'ratio':>6} {'recall':>6}")
    rows = []
    for name in names:
        image = photo(name)
        std_s, reference = run_reference(model, image, name, args.reference_cache)
        for budget in budgets:
            auto_masks.PROMPT_BUDGET = budget
            ours_s, ours_cpu, enc_s, prompts, ours = run_ours(model, image, args.repeats)
            rec = recall(reference, ours)
            ratio = std_s / ours_s if std_s else None
            kind = "tuning" if name in TUNING else "held-out"
            rows.append((kind, budget, ours_s, ratio, rec))
            std = f"{std_s:7.1f}" if std_s else " cached"
            shown = f"{ratio:6.1f}" if ratio else "     -"
            print(
                f"{name:12} {kind:8} {budget:6d} {ours_s:7.2f} {enc_s:5.2f} {prompts:7d} {ours_cpu:6.2f} "
                f"{len(ours):5d} {std} {len(reference):5d} {shown} {rec:6.2f}",
                flush=True,
            )
    for budget in budgets:
        for kind in ("tuning", "held-out", "all"):
            chosen = [r for r in rows if r[1] == budget and (kind == "all" or r[0] == kind)]
            if not chosen:
                continue
            t = statistics.median(r[2] for r in chosen)
            ratios = [r[3] for r in chosen if r[3]]
            q = statistics.median(ratios) if ratios else None
            rec = statistics.median(r[4] for r in chosen)
            passed = t <= TARGET_S and rec >= TARGET_RECALL and (q is None or q >= TARGET_RATIO)
            verdict = ("PASS" if passed else "FAIL") if kind != "tuning" else ""  # tuned on: no verdict
            shown = f"{q:.1f}×" if q else "-"
            print(
                f"budget {budget} median {kind:9} ({len(chosen)}): time {t:.2f} s, ratio {shown}, "
                f"recall {rec:.2f} {verdict}"
            )
    print(f"targets: time ≤ {TARGET_S} s, ratio ≥ {TARGET_RATIO}×, recall ≥ {TARGET_RECALL}")
    print("load average at end: " + " ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
