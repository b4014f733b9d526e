"""byte_lru.ByteLru: what the embedding cache and the service's image store rely on."""

from __future__ import annotations

import numpy as np

from byte_lru import ByteLru


def test_the_least_recently_used_goes_first_and_the_newest_always_stays():
    lru: ByteLru[np.ndarray] = ByteLru(max_bytes=300)
    for key in "abc":
        lru.put(key, np.zeros(100, np.uint8))
    assert lru.get("a") is not None  # now the most recently used
    lru.put("d", np.zeros(100, np.uint8))
    assert "b" not in lru and all(k in lru for k in "acd") and lru.nbytes == 300
    lru.put("big", np.zeros(1000, np.uint8))
    assert len(lru) == 1 and "big" in lru and lru.nbytes == 1000


def test_putting_a_key_again_counts_its_bytes_once():
    lru: ByteLru[np.ndarray] = ByteLru(max_bytes=1000)
    lru.put("a", np.zeros(100, np.uint8))
    lru.put("a", np.zeros(200, np.uint8))
    assert len(lru) == 1 and lru.nbytes == 200 and lru.get("a").nbytes == 200
    assert lru.get("missing") is None
    lru.clear()
    assert len(lru) == 0 and lru.nbytes == 0
