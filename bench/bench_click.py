"""Click → new composite on screen, for a 2048×2048 photo, measured in headless Chromium.

Starts the app in-process on a free loopback port (built-in segmenter, temp data folder), uploads a
2048² photo through the page, then clicks points on the composite and times each click until the new
picture has loaded in the page. Baseline, in the same run: what the server would spend per click if it
rendered and sent the full-size composite as a PNG with PIL's default settings (the naive path),
compared with what it spends on our display path (display-size render + JPEG).

    .venv/bin/python bench/bench_click.py [--clicks 15]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from chromium import launch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photo_2048(path: Path) -> None:
    from skimage import data, transform

    img = (transform.resize(data.astronaut(), (2048, 2048), order=1) * 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=92)


def server_side(studio, image_id: str, steps: list[dict], runs: int = 7) -> tuple[float, float]:
    """Median ms per click: our display path vs the naive full-size PIL PNG path."""
    import imaging

    ours, naive = [], []
    for _ in range(runs):
        t = time.perf_counter()
        imaging.encode_jpeg(studio.render(image_id, steps, "original", "local", display=True))
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        buf = io.BytesIO()
        Image.fromarray(studio.render(image_id, steps, "original", "local")).save(buf, format="PNG")
        naive.append(time.perf_counter() - t)
    return statistics.median(ours) * 1000, statistics.median(naive) * 1000


def distinct_points(studio, image_id: str, n: int) -> list[tuple[float, float]]:
    """n points (as fractions of the picture) whose smallest masks are all different."""
    seen, out = set(), []
    for fy in np.linspace(0.1, 0.9, 17):
        for fx in np.linspace(0.1, 0.9, 17):
            hit = studio.mask_at_point(image_id, int(fx * 2048), int(fy * 2048), "local")["mask_id"]
            if hit is not None and hit not in seen:
                seen.add(hit)
                out.append((float(fx), float(fy)))
    return out[:n]


TARGET_MS = 150


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clicks", type=int, default=15)
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    import app
    from settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="bench-click-"))
    photo = tmp / "photo2048.jpg"
    photo_2048(photo)
    settings = Settings(host="127.0.0.1", port=free_port(), data_dir=tmp / "data", segmenter="builtin")
    studio = app.create_studio(settings)
    demo, (_, url, _) = app.launch(settings, studio, prevent_thread_lock=True, quiet=True)
    times = []
    try:
        with sync_playwright() as p:
            browser = launch(p)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.set_input_files("#upload input[type=file]", str(photo))
            page.wait_for_selector("#composite img", timeout=120_000)
            page.wait_for_selector("#gallery .thumbnail-item", timeout=120_000)
            page.locator("#composite img").scroll_into_view_if_needed()
            # Points whose smallest mask differs from click to click: every click paints a new mask,
            # so every click changes the picture (an identical picture would keep its URL).
            image_id = studio.list_images("local")[0]["image_id"]
            for fx, fy in distinct_points(studio, image_id, args.clicks):
                box = page.locator("#composite img").bounding_box()
                before = page.locator("#composite img").get_attribute("src")
                t = time.perf_counter()
                page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)
                page.wait_for_function(
                    """before => { const img = document.querySelector('#composite img');
                                   return img && img.src !== before && img.complete && img.naturalWidth > 0; }""",
                    arg=before,
                    timeout=30_000,
                    polling=5,
                )
                times.append((time.perf_counter() - t) * 1000)
                page.wait_for_timeout(150)
            browser.close()
        steps = [{"mask_id": i, "color": [255, 0, 0, 128]} for i in range(0, 100, 2)]
        ours_ms, naive_ms = server_side(studio, image_id, steps)
    finally:
        demo.close()
    med = statistics.median(times)
    print(f"click → new composite on screen (2048² photo, {len(times)} clicks in Chromium):")
    print(
        f"  median {med:.0f} ms, p90 {sorted(times)[int(0.9 * (len(times) - 1))]:.0f} ms, "
        f"min {min(times):.0f} ms, max {max(times):.0f} ms"
    )
    print("server work per click, 50 masks painted (same run):")
    print(f"  ours: display-size render + JPEG   {ours_ms:7.1f} ms")
    print(f"  naive: full-size render + PIL PNG  {naive_ms:7.1f} ms   ratio {naive_ms / ours_ms:.0f}x")
    # No number in the issue ("must feel instant"); 150 ms is where a response stops feeling immediate.
    print(f"{'PASS' if med <= TARGET_MS else 'FAIL'}  click → new composite median {med:.0f} ms <= {TARGET_MS} ms")


if __name__ == "__main__":
    main()
