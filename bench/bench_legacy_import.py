"""Importing a large old data.json: generates one (default 2 GB) in a temp folder, runs the importer as a subprocess
(`python app.py import-legacy`), prints its time and peak memory (RSS), and the file size for scale.

    python bench/bench_legacy_import.py [--gb 2] [--side 1600] [--masks 64]

The file is written entry by entry (never held whole) and deleted afterwards with the imported data. Each image is
photo-like with noise (so its PNG is megabytes, as a phone photo's would be) and has `--masks` masks drawn with numpy.
The memory to compare with is the importer's target: under 500 MB for a 2 GB file.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import masks as rle  # noqa: E402


def photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([90 + 60 * yy / h, 140 + 40 * xx / w, 220 - 50 * yy / h], axis=2)
    img = img + rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def entry_parts(side: int, n_masks: int, seed: int) -> tuple[str, str]:
    """The JSON text of one entry around its created_at: (before, after), to repeat cheaply under many ids."""
    h, w = side * 3 // 4, side
    rgb = photo(h, w, seed)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = []
    for i in range(n_masks):
        cy, cx, r = rng.integers(h), rng.integers(w), rng.integers(10, max(11, side // 4))
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        masks.append(
            {
                "id": i,
                "area": int(m.sum()),
                "bbox": rle.bbox_of(m),
                "mask_b64": base64.b64encode(rle.to_png(m)).decode(),
            }
        )
    body = {
        "width": w,
        "height": h,
        "original_image_b64": "data:image/png;base64," + base64.b64encode(png(rgb)).decode(),
        "available_masks": masks,
    }
    text = json.dumps(body, indent=2)
    return '{\n  "created_at": "', '",\n' + text[2:]


def generate(path: Path, target_bytes: int, side: int, n_masks: int) -> int:
    """Write entries until the file reaches target_bytes; returns how many."""
    variants = [entry_parts(side, n_masks, seed) for seed in range(3)]
    written = n = 0
    with open(path, "w") as f:
        f.write("{")
        while written < target_bytes:
            before, after = variants[n % len(variants)]
            image_id = f"img_20250101_{n // 3600 % 24:02d}{n // 60 % 60:02d}{n % 60:02d}_{n:08x}"
            text = f'{"," if n else ""}\n  "{image_id}": {before}2025-01-01T00:00:00{after}'
            f.write(text)
            written += len(text)
            n += 1
        f.write("\n}\n")
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of the generated data.json in GB")
    parser.add_argument("--side", type=int, default=1600, help="image width in pixels (height is 3/4 of it)")
    parser.add_argument("--masks", type=int, default=64, help="masks per image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-legacy-import-") as tmp:
        path = Path(tmp) / "data.json"
        t0 = time.perf_counter()
        n = generate(path, int(args.gb * 1e9), args.side, args.masks)
        size = path.stat().st_size
        print(
            f"generated {size / 1e9:.2f} GB, {n} images of {args.side}×{args.side * 3 // 4} with {args.masks} masks "
            f"in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        env = {**os.environ, "DATA_DIR": str(Path(tmp) / "data"), "SEGMENTER": "builtin"}
        env.pop("S3_BUCKET_NAME_STAGING", None)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), "import-legacy", str(path)],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
        print(done.stdout.strip())
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)
        print(
            f"exit code {done.returncode}; import took {seconds:.0f} s ({size / 1e6 / seconds:.1f} MB/s, "
            f"{n / seconds:.1f} images/s); peak RSS {peak_mb:.0f} MB (target: under 500 MB), "
            f"{peak_mb / (size / 1e6):.3f} MB per MB of file"
        )


if __name__ == "__main__":
    main()
