"""Image embeddings cached per image content, shared by all sessions: LRU bounded by bytes, one computation per key.

The key is a hash of the pixels and the shape (`image_key`), so the same picture uploaded twice, or by two
people, is encoded once. When several threads ask for the same missing key, the first computes it and the
others wait for that result (an embedding costs about a second of both CPU cores; computing it twice at once
would make both callers wait twice as long). A failed computation is not cached: the waiters get the same
error and the next caller tries again.

Optionally each embedding is also written to `disk_dir` (one .npy file per key, 4 MB each, oldest deleted
beyond `disk_max_bytes`) so clicks on a stored image work right after a restart without re-encoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic

import numpy as np

from byte_lru import ByteLru, V

log = logging.getLogger("mask_studio.embeddings")


def image_key(rgb: np.ndarray) -> str:
    """Content key of an image: SHA-256 of its shape, dtype and pixels (a CPU's SHA instructions hash a 1024²
    photo in ~2 ms, blake2b took ~6 ms: every click pays it)."""
    digest = hashlib.sha256()
    digest.update(f"{rgb.shape}{rgb.dtype}".encode())
    digest.update(np.ascontiguousarray(rgb).data)
    return digest.hexdigest()


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    value: object = None
    error: BaseException | None = None


class EmbeddingCache(Generic[V]):
    """Thread-safe LRU of values with an `nbytes`, bounded by their total bytes (at least one entry is kept)."""

    def __init__(self, max_bytes: int, *, disk: DiskStore | None = None):
        self.disk = disk
        self._values: ByteLru[V] = ByteLru(max_bytes)
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()  # over _pending; taken before the LRU's own lock, never after it

    @property
    def max_bytes(self) -> int:
        return self._values.max_bytes

    @property
    def nbytes(self) -> int:
        return self._values.nbytes

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: str) -> bool:
        return key in self._values

    def get(self, key: str, compute: Callable[[], V]) -> V:
        """The cached value for `key`, computing it once (other callers for the same key wait for it)."""
        with self._lock:  # a value is put before its pending entry goes: one of the two is always seen
            cached = self._values.get(key)
            if cached is not None:
                return cached
            pending = self._pending.get(key)
            owner = pending is None
            if owner:
                pending = self._pending[key] = _Pending()
        assert pending is not None
        if not owner:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.value  # type: ignore[return-value]
        try:
            value = self._load_or_compute(key, compute)
        except BaseException as exc:
            pending.error = exc
            raise
        else:
            pending.value = value
            self._values.put(key, value)
            return value
        finally:
            with self._lock:
                del self._pending[key]
            pending.done.set()

    def clear(self) -> None:
        self._values.clear()

    def _load_or_compute(self, key: str, compute: Callable[[], V]) -> V:
        if self.disk is not None:
            value = self.disk.load(key)
            if value is not None:
                return value
        value = compute()
        if self.disk is not None:
            self.disk.save(key, value)
        return value


class DiskStore:
    """Values saved as files under a folder by `to_array` / `from_array`, pruned oldest-first beyond max_bytes.

    Disk trouble is logged and otherwise ignored: the disk copy only saves time, the cache works without it."""

    def __init__(
        self,
        folder: Path,
        to_array: Callable[[object], np.ndarray],
        from_array: Callable[[np.ndarray], object],
        max_bytes: int,
    ):
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self._to_array, self._from_array = to_array, from_array
        self._lock = threading.Lock()

    def load(self, key: str):
        path = self.folder / f"{key}.npy"
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("Ignoring the unreadable cached embedding %s: %s", path, exc)
            return None
        os.utime(path)  # recently used: pruned last
        return self._from_array(arr)

    def save(self, key: str, value: object) -> None:
        path = self.folder / f"{key}.npy"
        tmp = self.folder / f".{key}.{threading.get_ident()}.tmp.npy"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            np.save(tmp, self._to_array(value), allow_pickle=False)
            os.replace(tmp, path)
            self._prune()
        except OSError as exc:
            log.warning("Could not keep the embedding on disk in %s: %s", self.folder, exc)
            tmp.unlink(missing_ok=True)

    def _prune(self) -> None:
        with self._lock:
            files = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
            total = 0
            for path in files:
                total += path.stat().st_size
                if total > self.max_bytes and not path.name.startswith("."):
                    path.unlink(missing_ok=True)
