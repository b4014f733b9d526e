"""Soak: the real app (`python app.py`, loopback, a temp data folder) under 16 concurrent gradio_client
clients doing a realistic mix, with a 1-client baseline in the same run; then the data is checked.

    .venv/bin/python bench/soak.py [--seconds 60] [--clients 16] [--baseline-seconds 10]

Phases (interleaved so drift hits both): 1 client, N clients, 1 client. Each client works on its own
images: generate (256–512 px photos, the built-in segmenter), then info, mask_at_point, render, export,
get_mask and delete in realistic proportions, plus a few deliberate bad inputs (counted separately: they
must fail with a clear message), among them reads of another owner's images (AUTH_MODE=keys, four API
keys shared by the clients: such a read must answer like an unknown id). Printed: requests served,
errors (must be 0), p50/p95 latency per endpoint, the throughput ratio N clients / 1 client, and after a
clean stop PRAGMA integrity_check, that every stored mask decodes, and that blobs and rows match (no
orphans, none missing). Exit status 1 if anything is wrong.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from workload import photo  # noqa: E402

import masks as rle  # noqa: E402

MAX_REQUESTS_PER_PHASE = 200_000  # a bound on count as well as on time
OWNERS = 4  # API keys the clients share (client i uses key i % OWNERS)
KEYS = {f"owner{i}": f"soak-key-{i}-0123456789abcdef" for i in range(OWNERS)}
MAX_IMAGES_PER_CLIENT = 4
# (operation, weight): what a person or a script does with an image once it is stored
MIX = [
    ("info", 15),
    ("mask_at_point", 35),
    ("render", 25),
    ("export", 8),
    ("get_mask", 7),
    ("generate", 4),
    ("delete", 3),
]
BAD_RATE = 0.02  # share of requests that are deliberate bad inputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(data_dir: Path, work: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "GRADIO_TEMP_DIR": str(work / "gradio"),
        "SEGMENTER": os.environ.get("SEGMENTER", "builtin"),  # builtin: comparable with earlier soaks
        "AUTH_MODE": "keys",
        "APP_API_KEYS": ",".join(f"{owner}:{key}" for owner, key in KEYS.items()),
        "SEGMENT_RATE_LIMIT": "0",
        "MAX_IMAGES_PER_OWNER": "0",
    }
    log = open(work / "app.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited:\n{(work / 'app.log').read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the app did not start within 90 s")


def make_photos(work: Path, n: int = 6) -> list[str]:
    rng = np.random.default_rng(7)
    paths = []
    for i in range(n):
        side = (256, 288, 320, 352, 384, 256)[i % 6]
        p = work / f"photo-{i}.png"
        Image.fromarray(photo(side, int(side * 1.25), rng)).save(p)
        paths.append(str(p))
    return paths


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: list[str] = []
        self.deliberate = 0
        self.deliberate_wrong: list[str] = []

    def served(self) -> int:
        return sum(len(v) for v in self.latency.values()) + self.deliberate


class Worker:
    """One client: its own session, its owner's API key and its own images."""

    everyone: dict[str, str] = {}  # image id -> owner, of every client's images (for cross-owner probes)

    def __init__(self, url: str, photos: list[str], seed: int):
        from gradio_client import Client

        self.owner = f"owner{seed % OWNERS}"
        self.client = Client(url, verbose=False, headers={"Authorization": f"Bearer {KEYS[self.owner]}"})
        self.photos = photos
        self.rng = random.Random(seed)
        self.images: dict[str, tuple[int, int, int]] = {}  # id -> (width, height, mask_count)

    def call(self, stats: Stats, name: str, *args, api_name: str):
        t0 = time.perf_counter()
        try:
            out = self.client.predict(*args, api_name=api_name)
        except Exception as exc:  # every failure is counted and shown, none is ignored
            with stats.lock:
                stats.errors.append(f"{name}: {type(exc).__name__}: {str(getattr(exc, 'message', exc))[:160]}")
            return None
        with stats.lock:
            stats.latency[name].append(time.perf_counter() - t0)
        return out

    def generate(self, stats: Stats) -> None:
        from gradio_client import handle_file

        out = self.call(
            stats, "generate", handle_file(self.rng.choice(self.photos)), api_name="/generate_and_store_masks"
        )
        if out:
            d = out["image_dimensions"]
            self.images[out["image_id"]] = (d["width"], d["height"], out["mask_count"])
            Worker.everyone[out["image_id"]] = self.owner

    def bad(self, stats: Stats) -> None:
        """A deliberate bad input: it must fail, with a clear message."""
        from gradio_client.exceptions import AppError

        image_id = self.rng.choice(list(self.images)) if self.images else "nope"
        theirs = [i for i, o in list(Worker.everyone.items()) if o != self.owner] or ["nope"]
        args, api = self.rng.choice(
            [
                ((self.rng.choice(theirs),), "/image_info"),  # another owner's image: "No image with id"
                ((self.rng.choice(theirs), 1, 1), "/mask_at_point"),
                ((image_id, -5, 10**9), "/mask_at_point"),
                (("../../etc/passwd",), "/image_info"),
                ((image_id, [{"mask_id": 0, "color": "no-such-colour"}], "original"), "/render_masks"),
                ((image_id, 10**6), "/get_mask"),
            ]
        )
        try:
            self.client.predict(*args, api_name=api)
            problem = f"{api} {args!r} did not fail"
        except AppError as exc:
            problem = None if exc.message and "unexpected" not in exc.message.lower() else exc.message
            if (
                api in ("/image_info", "/mask_at_point")
                and args[0] != image_id
                and "No image with id" not in exc.message
            ):
                problem = f"another owner's image answered {exc.message!r}, not like an unknown id"
        except Exception as exc:
            problem = f"{api}: {type(exc).__name__}: {exc}"
        with stats.lock:
            stats.deliberate += 1
            if problem:
                stats.deliberate_wrong.append(problem)

    def step(self, stats: Stats) -> None:
        if self.rng.random() < BAD_RATE:
            return self.bad(stats)
        if not self.images:
            return self.generate(stats)
        op = self.rng.choices([m for m, _ in MIX], weights=[w for _, w in MIX])[0]
        image_id = self.rng.choice(list(self.images))
        w, h, n = self.images[image_id]
        mask = self.rng.randrange(max(n, 1))
        if op == "generate":
            if len(self.images) >= MAX_IMAGES_PER_CLIENT:
                op = "delete"
            else:
                return self.generate(stats)
        if op == "delete":
            if len(self.images) > 1 and self.call(stats, "delete", image_id, api_name="/delete_image"):
                del self.images[image_id]
                Worker.everyone.pop(image_id, None)
        elif op == "info":
            self.call(stats, "info", image_id, api_name="/image_info")
        elif op == "mask_at_point":
            self.call(
                stats,
                "mask_at_point",
                image_id,
                self.rng.randrange(w),
                self.rng.randrange(h),
                api_name="/mask_at_point",
            )
        elif op == "render":
            steps = [
                {"mask_id": self.rng.randrange(max(n, 1)), "color": [self.rng.randrange(256), 90, 200, 160]}
                for _ in range(self.rng.randint(1, 6))
            ]
            self.call(
                stats,
                "render",
                image_id,
                steps,
                self.rng.choice(["original", "dim", "transparent"]),
                api_name="/render_masks",
            )
        elif op == "export":
            self.call(stats, "export", image_id, None, api_name="/export_coco")
        elif op == "get_mask":
            self.call(stats, "get_mask", image_id, mask, api_name="/get_mask")


def run_phase(workers: list[Worker], seconds: float) -> tuple[Stats, float]:
    stats = Stats()
    stop_at = time.monotonic() + seconds

    def loop(worker: Worker) -> None:
        while time.monotonic() < stop_at and stats.served() < MAX_REQUESTS_PER_PHASE:
            worker.step(stats)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats, time.monotonic() - t0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1000


def report(title: str, stats: Stats, elapsed: float) -> float:
    served = stats.served()
    rate = served / elapsed
    print(
        f"\n{title}: {served} requests in {elapsed:.1f} s = {rate:.1f}/s; errors {len(stats.errors)}; "
        f"deliberate bad inputs {stats.deliberate} (wrongly answered: {len(stats.deliberate_wrong)})"
    )
    print(f"  {'endpoint':<14}{'count':>7}{'p50 ms':>10}{'p95 ms':>10}")
    for name in [m for m, _ in MIX]:
        v = stats.latency.get(name, [])
        if v:
            print(f"  {name:<14}{len(v):>7}{pct(v, 0.5):>10.0f}{pct(v, 0.95):>10.0f}")
    for e in (stats.errors + stats.deliberate_wrong)[:10]:
        print("  !", e)
    return rate


def check_data(data_dir: Path, expected_ids: set[str]) -> list[str]:
    """After a clean stop: integrity, every mask decodes to its stored area, blobs == rows."""
    problems = []
    conn = sqlite3.connect(data_dir / "mask_studio.db")
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    print(f"\nPRAGMA integrity_check = {integrity}")
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    rows = conn.execute("SELECT id, width, height, mask_count, blob_key FROM images").fetchall()
    decoded = 0
    for image_id, w, h, n, _ in rows:
        masks = conn.execute("SELECT mask_id, counts, area FROM masks WHERE image_id = ?", (image_id,)).fetchall()
        if len(masks) != n:
            problems.append(f"{image_id}: {len(masks)} mask rows, mask_count says {n}")
        for mask_id, counts, area in masks:
            try:
                if int(rle.decode({"size": [h, w], "counts": counts}).sum()) != area:
                    problems.append(f"{image_id}/{mask_id}: decoded area differs from the stored one")
                decoded += 1
            except Exception as exc:
                problems.append(f"{image_id}/{mask_id}: does not decode ({exc})")
    conn.close()
    root = data_dir / "blobs"
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} if root.exists() else set()
    keys = {r[4] for r in rows}
    orphans, missing = files - keys, keys - files
    ids = {r[0] for r in rows}
    print(
        f"images stored {len(rows)}, masks decoded {decoded}, orphaned blobs {len(orphans)}, "
        f"missing blobs {len(missing)}, clients' view matches the database: {ids == expected_ids}"
    )
    if orphans or missing:
        problems.append(f"orphaned blobs {sorted(orphans)[:5]}, missing blobs {sorted(missing)[:5]}")
    if ids != expected_ids:
        problems.append(f"stored ids differ from what the clients kept: {sorted(ids ^ expected_ids)[:5]}")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60, help="length of the N-client phase (default 60)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--baseline-seconds", type=float, default=10, help="each of the two 1-client phases")
    args = ap.parse_args()
    if not (0 < args.seconds <= 600 and 1 <= args.clients <= 64 and 0 < args.baseline_seconds <= 120):
        ap.error("keep it bounded: --seconds 1..600, --clients 1..64, --baseline-seconds 1..120")

    work = Path(tempfile.mkdtemp(prefix="mask-studio-soak-"))
    data = work / "data"
    proc, url = start_app(data, work)
    print(f"app at {url} (pid {proc.pid}), data in {data}; {os.cpu_count()} CPUs")
    photos = make_photos(work)
    try:
        base = [Worker(url, photos, seed=1000 + i) for i in range(1)]
        many = [Worker(url, photos, seed=i) for i in range(args.clients)]
        # Warm-up (untimed): every client stores one image first, as after a person's first upload.
        warm, _ = run_phase([], 0)
        threads = [threading.Thread(target=w.generate, args=(warm,)) for w in base + many]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates, problems = [], [f"warm-up: {e}" for e in warm.errors]
        for title, workers, seconds in [
            ("baseline, 1 client (before)", base, args.baseline_seconds),
            (f"soak, {args.clients} clients", many, args.seconds),
            ("baseline, 1 client (after)", base, args.baseline_seconds),
        ]:
            stats, elapsed = run_phase(workers, seconds)
            rates.append(report(title, stats, elapsed))
            if stats.errors or stats.deliberate_wrong:
                problems.append(f"{title}: {len(stats.errors)} errors, {len(stats.deliberate_wrong)} wrong answers")
        baseline = statistics.median([rates[0], rates[2]])
        print(
            f"\nthroughput {args.clients} clients / 1 client = {rates[1]:.1f} / {baseline:.1f} "
            f"= {rates[1] / baseline:.2f}x"
        )
        expected = {i for w in base + many for i in w.images}
    finally:
        proc.send_signal(signal.SIGINT)  # a clean stop; nothing is in flight any more
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    problems += check_data(data, expected)
    print("\nRESULT:", "OK" if not problems else "PROBLEMS\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
