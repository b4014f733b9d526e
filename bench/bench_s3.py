"""Uploading 200 mask PNGs (1024²) to S3: S3BlobStore.upload_many (a bounded pool) versus one put at a time.

Against moto's standalone server started here on loopback; also through a loopback proxy that adds a
fixed one-way delay per direction, since loopback has none and a real bucket is tens of ms away.
Both methods run interleaved in the same process; medians of several runs.

    /tmp/venv/bin/python bench/bench_s3.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import masks  # noqa: E402
from s3_server import MotoServer, free_port  # noqa: E402
from s3_store import UPLOAD_WORKERS, S3BlobStore  # noqa: E402

N_MASKS = 200
SIZE = 1024
RUNS = 5
DELAY_MS = 10  # one way, so ~20 ms round trip: a nearby region


def make_masks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Irregular blobs (a wobbly ellipse each) with areas from ~0.1 % to ~40 % of the frame."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        area = size * size * 10 ** rng.uniform(-3, np.log10(0.4))
        r = np.sqrt(area / np.pi)
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        # Only the blob's neighbourhood is computed: the rest of the frame is 0.
        y0, y1 = int(max(0, cy - 1.5 * r)), int(min(size, cy + 1.5 * r + 1))
        x0, x1 = int(max(0, cx - 1.5 * r)), int(min(size, cx + 1.5 * r + 1))
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = 1 + sum(rng.uniform(0, 0.12) * np.sin(k * theta + rng.uniform(0, 6.3)) for k in (2, 3, 5, 9))
        mask = np.zeros((size, size), dtype=bool)
        mask[y0:y1, x0:x1] = np.hypot(yy - cy, xx - cx) < r * wobble
        out.append(mask)
    return out


class DelayProxy:
    """A loopback TCP proxy that delivers every byte `delay` seconds after it arrives, in both directions."""

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _handle(self, client_r, client_w) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def _pipe(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - self.loop.time()))
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((self.loop.time() + self.delay, data))
        except ConnectionError:
            pass  # the peer went away: close our side below
        queue.put_nowait(None)
        await sender


def one_by_one(store: S3BlobStore, items: list[tuple[str, bytes]]) -> None:
    for key, data in items:
        store.put(key, data, "image/png")


def concurrent(store: S3BlobStore, items: list[tuple[str, bytes]]) -> None:
    report = store.upload_many(items)
    assert report.ok, report.failed


def measure(store: S3BlobStore, pngs: list[bytes]) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"one by one": [], f"upload_many ({UPLOAD_WORKERS} workers)": []}
    methods = dict(zip(times, (one_by_one, concurrent)))
    concurrent(store, [(store.new_mask_key(), p) for p in pngs[:16]])  # warm up connections
    for _ in range(RUNS):
        for name, method in methods.items():
            items = [(store.new_mask_key(), p) for p in pngs]
            t0 = time.perf_counter()
            method(store, items)
            times[name].append(time.perf_counter() - t0)
            store.delete_many(k for k, _ in items)
    return times


def report(title: str, times: dict[str, list[float]]) -> None:
    (base_name, base), (name, fast) = times.items()
    b, f = statistics.median(base), statistics.median(fast)
    print(f"\n{title}")
    print(f"  {base_name:<28} {b * 1000:8.0f} ms   ({b / N_MASKS * 1000:.1f} ms per mask)")
    print(f"  {name:<28} {f * 1000:8.0f} ms   ({f / N_MASKS * 1000:.1f} ms per mask)")
    print(
        f"  speed-up: {b / f:.1f}x   (median of {RUNS} interleaved runs; all runs: "
        f"{', '.join(f'{x:.2f}' for x in base)} s vs {', '.join(f'{x:.2f}' for x in fast)} s)"
    )


def main() -> None:
    t0 = time.perf_counter()
    pngs = [masks.to_png(m) for m in make_masks(N_MASKS, SIZE)]
    sizes = [len(p) for p in pngs]
    print(
        f"{N_MASKS} mask PNGs at {SIZE}²: mean {statistics.mean(sizes) / 1024:.1f} KB, "
        f"range {min(sizes) / 1024:.1f}–{max(sizes) / 1024:.1f} KB (built in {time.perf_counter() - t0:.1f} s)"
    )
    with MotoServer() as server:
        server.create_bucket("bench-masks")
        direct = S3BlobStore.from_settings(server.settings(s3_bucket="bench-masks"), server.session())
        report("moto on loopback (no network delay):", measure(direct, pngs))

        proxy = DelayProxy(server.port, DELAY_MS / 1000)
        delayed = S3BlobStore.from_settings(
            server.settings(s3_bucket="bench-masks", s3_endpoint_url=proxy.url), server.session()
        )
        report(f"moto behind a {DELAY_MS} ms one-way delay (~{2 * DELAY_MS} ms round trip):", measure(delayed, pngs))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
