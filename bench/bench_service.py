"""Benchmark: prompt requests through the SAM2 service (HTTP on loopback) against the in-process call, same run.

For 1 and 4 concurrent clients it sends REQUESTS point prompts at random include points on one photo
(skimage's astronaut, 512×512) and reports requests/s, p50 and p95 for:
- in-process: `engine.segment(image, points=...)` called from that many threads;
- service: the app's own client (`sam2_client.HttpSegmenter`) against `sam2_service` on 127.0.0.1 with as many
  inference slots as clients. The service has kept the image, so each prompt names it by its SHA-256;
- service, image resent: the same, the image (PNG, base64) in every request, as clients before image_sha256 did.
The HTTP overhead is (service p50 - in-process p50) / in-process p50; the target is under 20 %.
The engine's embedding (or hierarchy) is warmed first, so a prompt costs what a click on a known image costs.
CPU ms/req is this process's CPU time per request (client, service and engine together): it moves less with load.
The machine may be shared: the paths take turns in ROUNDS rounds (the order rotating), so a change of load
during the run falls on all of them alike.

Run: .venv/bin/python bench/bench_service.py [--engine mobilesam|builtin|sam2-random] [--requests 60]
(sam2-random: a SAM 2 with tiny Hiera dims and random weights at the real 1024² input: real decoder
geometry, not real cost.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sam2_service  # noqa: E402
from sam2_client import HttpSegmenter  # noqa: E402
from service_protocols import ServiceProtocol  # noqa: E402
from settings import Settings  # noqa: E402

TARGET = 0.20
CLIENTS = (1, 4)
ROUNDS = 6


def make_engine(name: str):
    if name == "builtin":
        from builtin_segmenter import BuiltinSegmenter

        return BuiltinSegmenter()
    if name == "mobilesam":  # the service's default engine: the real weights from ./models (scripts/test.sh)
        from mobilesam_engine import MobileSamSegmenter

        return MobileSamSegmenter.load(checkpoint=None, models_dir=ROOT / "models", max_masks=128)
    import torch
    from transformers import Sam2Config, Sam2Model

    import sam2_engine
    import sam2_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    hiera = dict(
        model_type="sam2_hiera_det_model",
        hidden_size=8,
        num_attention_heads=1,
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[8, 4, 14, 7],
        global_attention_blocks=[3],
    )
    config = Sam2Config(
        vision_config=dict(
            model_type="sam2_vision_model",
            backbone_config=hiera,
            backbone_channel_list=[64, 32, 16, 8],
            fpn_hidden_size=32,
        ),
        prompt_encoder_config=dict(hidden_size=32),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32),
    )
    adapter = sam2_model.Sam2Adapter(Sam2Model(config), model_id="tiny-random-sam2")
    return sam2_engine.Sam2Segmenter.from_adapter(adapter)


def run(calls: list[Callable[[], object]], clients: int) -> tuple[float, list[float]]:
    """Run the calls on `clients` threads; (wall seconds, each call's latency)."""
    latencies: list[float] = []
    lock = threading.Lock()
    queue = list(calls)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                call = queue.pop()
            start = time.perf_counter()
            call()
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def in_turns(paths: dict[str, list[Callable[[], object]]], clients: int) -> dict[str, tuple[float, float, list[float]]]:
    """Each path's calls in ROUNDS slices, the paths taking turns (order rotating); per path (wall seconds,
    this process's CPU seconds: client, service and engine together, latencies)."""
    totals: dict[str, tuple[float, float, list[float]]] = {name: (0.0, 0.0, []) for name in paths}
    names = list(paths)
    for r in range(ROUNDS):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            cpu = time.process_time()
            wall, latencies = run(paths[name][r::ROUNDS], clients)
            cpu = time.process_time() - cpu
            wall0, cpu0, latencies0 = totals[name]
            totals[name] = (wall0 + wall, cpu0 + cpu, latencies0 + latencies)
    return totals


def figures(wall: float, cpu: float, latencies: list[float]) -> tuple[float, float, float, float]:
    """(requests/s, p50, p95, CPU seconds per request): CPU per request moves less with the machine's load."""
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return len(latencies) / wall, statistics.median(ordered), p95, cpu / len(latencies)


class ImageEveryTime(ServiceProtocol):
    """The mask-studio protocol as clients before image_sha256 spoke it: the image in every request."""

    names_images = False


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("mobilesam", "builtin", "sam2-random"), default="mobilesam")
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    from skimage import data

    image = np.ascontiguousarray(data.astronaut())
    h, w = image.shape[:2]
    rng = np.random.default_rng(0)
    points = [[[float(rng.integers(0, w)), float(rng.integers(0, h))]] for _ in range(args.requests)]
    engine = make_engine(args.engine)
    engine.segment(image, points=points[0])  # warm: embedding / hierarchy cached
    print(f"engine: {engine.engine}; {args.requests} point prompts on a {w}×{h} photo per setting; load {load()}")
    print(f"{'clients':>7} {'path':<22} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'overhead':>9} {'CPU ms/req':>11}")
    verdicts = []
    for clients in CLIENTS:
        options = sam2_service.ServiceOptions(concurrency=clients, queue=4 * clients)
        app = sam2_service.build_service(Settings(), engine, options=options)
        with sam2_service.serving(app) as url:
            named = [HttpSegmenter(Settings(sam_api_url=url)) for _ in range(clients)]
            resent = [HttpSegmenter(Settings(sam_api_url=url)) for _ in range(clients)]
            for client in resent:
                client.protocol = ImageEveryTime()
            for client in named + resent:
                client.segment(image, points=points[0])  # warm the connection; the service keeps the image
            paths = {
                "in-process": [lambda p=p: engine.segment(image, points=p) for p in points],
                "service": [lambda p=p, c=named[i % clients]: c.segment(image, points=p) for i, p in enumerate(points)],
                "service, image resent": [
                    lambda p=p, c=resent[i % clients]: c.segment(image, points=p) for i, p in enumerate(points)
                ],
            }
            rows = {name: figures(*measured) for name, measured in in_turns(paths, clients).items()}
            for client in named + resent:
                client.close()
        base = rows["in-process"][1]
        for name, (rate, p50, p95, cpu) in rows.items():
            overhead = "" if name == "in-process" else f"{p50 / base - 1:+.0%}"
            print(
                f"{clients:>7} {name:<22} {rate:>7.1f} {p50 * 1000:>8.1f} {p95 * 1000:>8.1f} {overhead:>9} "
                f"{cpu * 1000:>11.1f}"
            )
        overhead = rows["service"][1] / base - 1
        added = (rows["service"][1] - base) * 1000
        verdict = "PASS" if overhead < TARGET else "FAIL"
        verdicts.append(verdict)
        print(f"{clients:>7} HTTP overhead at p50: {overhead:+.0%} ({added:+.1f} ms per prompt) {verdict} (< 20 %)")
    engine.close()
    return 0 if all(v == "PASS" for v in verdicts) else 1


def load() -> str:
    """The 1-minute load average, to read the figures by (a shared machine)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
