"""Storage: images and masks in SQLite (through sqlite-utils), and blob stores for the bytes.

`BlobStore` is the interface for bytes (original images; mask PNGs when S3 is configured);
`LocalBlobStore` keeps blobs as files under one folder, written atomically (temp file + rename)
so a crash never leaves a half-written blob under its final name.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from errors import NotFound, StorageError

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,255}$")


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""

    def keys(self) -> Iterator[str]: ...


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key or "//" in key:
        raise StorageError(f"Invalid blob key {key!r}.")
    return key


class LocalBlobStore:
    """Blobs as files under `root` (created on first write, not on construction)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StorageError(f"Could not write to the local data folder ({exc.strerror}).") from exc

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"The stored file {key!r} is missing.") from None
        except OSError as exc:
            raise StorageError(f"Could not read from the local data folder ({exc.strerror}).") from exc

    def delete(self, key: str) -> None:
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"Could not delete from the local data folder ({exc.strerror}).") from exc

    def keys(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for p in sorted(self.root.rglob("*")):
            if p.is_file():
                rel = p.relative_to(self.root).as_posix()
                if p.name.startswith(".tmp-"):
                    p.unlink(missing_ok=True)  # leftover of a write interrupted by a crash
                    continue
                yield rel
