"""The embedding cache: bounded by bytes (LRU), one computation per key under concurrency, optional disk copy."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest

from embedding_cache import DiskStore, EmbeddingCache, image_key


@dataclass
class Blob:
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def blob(n: int, fill: float = 0.0) -> Blob:
    return Blob(np.full(n, fill, np.float32))


def test_total_bytes_stay_within_the_bound_least_recently_used_go_first():
    cache = EmbeddingCache(max_bytes=3 * 4000)
    for key in "abc":
        cache.get(key, lambda: blob(1000))
    cache.get("a", lambda: pytest.fail("a is cached"))  # a is now the most recent
    cache.get("d", lambda: blob(1000))
    assert cache.nbytes == 3 * 4000 and len(cache) == 3
    assert "b" not in cache and all(k in cache for k in "acd")


def test_one_value_larger_than_the_bound_is_still_kept_alone():
    cache = EmbeddingCache(max_bytes=100)
    cache.get("a", lambda: blob(10))
    big = cache.get("big", lambda: blob(1000))
    assert len(cache) == 1 and "big" in cache and cache.nbytes == big.nbytes


def test_concurrent_callers_of_one_key_share_one_computation():
    cache = EmbeddingCache(max_bytes=1 << 20)
    calls = []
    started = threading.Event()

    def compute() -> Blob:
        calls.append(1)
        started.set()
        time.sleep(0.3)  # long enough for every other thread to arrive while this one computes
        return blob(10, 7.0)

    results: list[Blob] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", compute))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 6
    assert all(r is results[0] for r in results)


def test_a_failed_computation_reaches_every_waiter_and_is_not_cached():
    cache = EmbeddingCache(max_bytes=1 << 20)
    gate = threading.Event()

    def fail() -> Blob:
        gate.wait(2)
        raise RuntimeError("encoder broke")

    errors: list[BaseException] = []

    def call() -> None:
        try:
            cache.get("k", fail)
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join()
    assert len(errors) == 3 and all(str(e) == "encoder broke" for e in errors)
    assert "k" not in cache
    assert cache.get("k", lambda: blob(3)).nbytes == 12  # the next caller tries again


def test_different_keys_compute_in_parallel():
    cache = EmbeddingCache(max_bytes=1 << 20)
    inside = threading.Barrier(2, timeout=2)

    def compute() -> Blob:
        inside.wait()  # both computations must be under way at once, or this times out
        return blob(1)

    threads = [threading.Thread(target=cache.get, args=(k, compute)) for k in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not inside.broken and len(cache) == 2


def test_image_key_depends_on_pixels_and_shape():
    a = np.zeros((4, 6, 3), np.uint8)
    b = a.copy()
    b[1, 2, 0] = 1
    assert image_key(a) == image_key(a.copy())
    assert image_key(a) != image_key(b)
    assert image_key(a) != image_key(a.reshape(6, 4, 3))


def test_the_disk_copy_survives_a_new_cache_and_is_pruned_by_bytes(tmp_path):
    def store() -> DiskStore:
        return DiskStore(tmp_path, lambda v: v.data, Blob, max_bytes=2 * 4128)

    first = EmbeddingCache(max_bytes=1 << 20, disk=store())
    for i, key in enumerate("abc"):
        first.get(key, lambda i=i: blob(1000, float(i)))
        time.sleep(0.02)  # distinct modification times
    assert sorted(p.stem for p in tmp_path.glob("*.npy")) == ["b", "c"]  # a was the oldest
    second = EmbeddingCache(max_bytes=1 << 20, disk=store())
    got = second.get("c", lambda: pytest.fail("c is on disk"))
    np.testing.assert_array_equal(got.data, np.full(1000, 2.0, np.float32))


def test_an_unreadable_disk_copy_is_recomputed(tmp_path):
    (tmp_path / "k.npy").write_bytes(b"not an array")
    cache = EmbeddingCache(max_bytes=1 << 20, disk=DiskStore(tmp_path, lambda v: v.data, Blob, 1 << 20))
    assert cache.get("k", lambda: blob(5, 1.0)).data.tolist() == [1.0] * 5
