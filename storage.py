"""Storage: images and masks in SQLite (through sqlite-utils), and blob stores for the bytes.

`BlobStore` is the interface for bytes (original images; mask PNGs when S3 is configured);
`LocalBlobStore` keeps blobs as files under one folder, written atomically (temp file + rename)
so a crash never leaves a half-written blob under its final name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import sqlite3
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import sqlite_utils

from errors import Conflict, InvalidInput, LimitExceeded, NotFound, StorageError

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,255}$")


class BlobStore(Protocol):
    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes: ...
    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""

    def keys(self) -> Iterator[str]: ...


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key) or ".." in key or "//" in key:
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


# --------------------------------------------------------------------------------------------
# SQLite: images and their masks
# --------------------------------------------------------------------------------------------


IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ID_RULE = "1–64 characters: letters, digits, '_' or '-', starting with a letter or digit"


# An owner's own image ids are kept as "<id>.<tag of the owner>", so two owners may both call an image
# "house" and nobody can learn, by trying an id, that someone else uses it. "local" (the one owner of
# AUTH_MODE=open) keeps ids as given, as the old backend did; generated ids are random and kept as made.
SHARED_NAMESPACE_OWNER = "local"
STORED_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}(\.[0-9a-f]{12})?$")


def owner_tag(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:12]


def stored_image_id(image_id: str, owner: str) -> str:
    """The id a caller's own image id is stored under (see SHARED_NAMESPACE_OWNER)."""
    return image_id if owner == SHARED_NAMESPACE_OWNER else f"{image_id}.{owner_tag(owner)}"


def shown_image_id(stored: str, owner: str | None) -> str:
    """The id shown to an owner (the admin, owner None, sees stored ids as they are)."""
    return stored if owner is None else stored.split(".", 1)[0]


def id_taken(image_id: str) -> Conflict:
    return Conflict(f"Image id {image_id!r} is already taken: choose another id, or delete that image first.")


def no_such_image(image_id: str) -> NotFound:
    """What an unknown id (or someone else's) answers, whoever asks."""
    shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
    return NotFound(f"No image with id {shown!r}. /list_images shows the stored ones.")


def new_image_id(now: _dt.datetime | None = None) -> str:
    """`img_YYYYMMDD_HHMMSS_<8 hex>`, the old backend's form."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return f"img_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


def check_image_id(image_id: object) -> str:
    """A caller's image id, validated; the error says what an id may look like."""
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        shown = repr(image_id) if len(repr(image_id)) <= 80 else repr(image_id)[:77] + "..."
        raise InvalidInput(f"Image id {shown} is not valid: use {ID_RULE}.")
    return image_id


@dataclass(frozen=True)
class ImageRow:
    id: str
    owner: str
    width: int
    height: int
    created_at: str
    engine: str
    mask_count: int
    blob_key: str

    def summary(self, owner: str | None = None) -> dict:
        """The API's description of the image, for `owner` (None: the admin, who is also told the owner)."""
        out = {
            "image_id": shown_image_id(self.id, owner),
            "width": self.width,
            "height": self.height,
            "created_at": self.created_at,
            "mask_count": self.mask_count,
        }
        return out if owner is not None else {**out, "owner": self.owner}


@dataclass(frozen=True)
class MaskRow:
    image_id: str
    mask_id: int
    counts: str
    area: int
    bbox: list[int]
    predicted_iou: float | None
    stability_score: float | None
    point_coords: list | None
    mask_url: str | None
    s3_key: str | None
    upload_state: str  # "none" (no S3), "pending" (to upload), "uploaded"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    engine TEXT NOT NULL,
    mask_count INTEGER NOT NULL DEFAULT 0,
    blob_key TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_owner_created ON images(owner, created_at);
CREATE TABLE IF NOT EXISTS masks (
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    mask_id INTEGER NOT NULL,
    counts TEXT NOT NULL,
    area INTEGER NOT NULL,
    bbox TEXT NOT NULL,
    predicted_iou REAL,
    stability_score REAL,
    point_coords TEXT,
    mask_url TEXT,
    s3_key TEXT,
    upload_state TEXT NOT NULL DEFAULT 'none',
    PRIMARY KEY (image_id, mask_id)
);
CREATE INDEX IF NOT EXISTS masks_upload_state ON masks(upload_state);
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    upload_state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_image ON objects(image_id);
CREATE TABLE IF NOT EXISTS s3_deletions (
    key TEXT PRIMARY KEY,
    owner TEXT
);
"""

_IMAGE_COLS = "id, owner, width, height, created_at, engine, mask_count, blob_key"
_MASK_COLS = (
    "image_id, mask_id, counts, area, bbox, predicted_iou, stability_score, point_coords, "
    "mask_url, s3_key, upload_state"
)


def _mask_row(r: tuple) -> MaskRow:
    return MaskRow(
        image_id=r[0],
        mask_id=r[1],
        counts=r[2],
        area=r[3],
        bbox=json.loads(r[4]),
        predicted_iou=r[5],
        stability_score=r[6],
        point_coords=json.loads(r[7]) if r[7] else None,
        mask_url=r[8],
        s3_key=r[9],
        upload_state=r[10],
    )


class Database:
    """Images and masks in one SQLite file (WAL, foreign keys), one connection per thread."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._write_lock:
            self.db.executescript(_SCHEMA)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    def _q(self, sql: str, params: Sequence = ()) -> list[tuple]:
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"The database could not be read ({exc}).") from exc

    def _write(self, statements: list[tuple[str, Sequence]] | None = None, many=None, guard=None) -> None:
        """Run statements in ONE transaction: all of them land, or none does.

        `guard(conn)` runs first inside the transaction (under the write lock): it may raise to refuse.
        """
        conn = self.db.conn
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                if guard is not None:
                    guard(conn)
                for sql, params in statements or []:
                    conn.execute(sql, params)
                for sql, rows in many or []:
                    conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK")
                raise Conflict(f"That record already exists ({exc}).") from exc
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"The database could not be written ({exc}).") from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    # ---- images --------------------------------------------------------------------------
    def insert_image(self, row: ImageRow, masks: list[MaskRow], max_per_owner: int = 0) -> None:
        """Insert an image and its masks in one transaction (an id already taken: Conflict).

        With max_per_owner > 0 the owner's count is checked inside the same transaction, so two
        concurrent inserts can never take an owner past it (LimitExceeded).
        """
        if self.image_exists(row.id):
            raise id_taken(row.id)

        def quota(conn: sqlite3.Connection) -> None:
            (count,) = conn.execute("SELECT count(*) FROM images WHERE owner = ?", (row.owner,)).fetchone()
            if count >= max_per_owner:
                raise LimitExceeded(f"Owner {row.owner!r} already has {count} images (the most is {max_per_owner}).")

        try:
            self._write(
                [("INSERT INTO images (" + _IMAGE_COLS + ") VALUES (?,?,?,?,?,?,?,?)", _image_values(row))],
                many=[
                    (
                        "INSERT INTO masks (" + _MASK_COLS + ") VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                        [_mask_values(m) for m in masks],
                    )
                ],
                guard=quota if max_per_owner > 0 else None,
            )
        except Conflict:
            raise id_taken(row.id) from None

    def image_exists(self, image_id: str) -> bool:
        return bool(self._q("SELECT 1 FROM images WHERE id = ?", (image_id,)))

    def get_image(self, image_id: str, owner: str | None = None) -> ImageRow:
        """The image row; someone else's image answers exactly like an unknown id."""
        rows = self._q(f"SELECT {_IMAGE_COLS} FROM images WHERE id = ?", (image_id,))
        if not rows or (owner is not None and rows[0][1] != owner):
            raise no_such_image(image_id)
        return ImageRow(*rows[0])

    def list_images(self, owner: str | None = None, limit: int = 1000) -> list[ImageRow]:
        """Newest first; owner None lists everyone's."""
        if owner is None:
            rows = self._q(f"SELECT {_IMAGE_COLS} FROM images ORDER BY created_at DESC, rowid DESC LIMIT ?", (limit,))
        else:
            rows = self._q(
                f"SELECT {_IMAGE_COLS} FROM images WHERE owner = ? ORDER BY created_at DESC, rowid DESC LIMIT ?",
                (owner, limit),
            )
        return [ImageRow(*r) for r in rows]

    def count_images(self, owner: str) -> int:
        return self._q("SELECT count(*) FROM images WHERE owner = ?", (owner,))[0][0]

    def images_older_than(self, created_before: str) -> list[ImageRow]:
        rows = self._q(f"SELECT {_IMAGE_COLS} FROM images WHERE created_at < ?", (created_before,))
        return [ImageRow(*r) for r in rows]

    def delete_image(self, image_id: str) -> list[str]:
        """Delete the image, its masks and objects; returns its S3 keys, recorded in `s3_deletions`.

        The keys are recorded in the same transaction as the delete, so a crash or an S3 outage
        afterwards can never forget them: they stay recorded until forget_s3_deletions.
        """
        keys: list[str] = []
        of_image = (
            "SELECT s3_key FROM masks WHERE image_id = ? AND s3_key IS NOT NULL "
            "UNION SELECT key FROM objects WHERE image_id = ?"
        )

        def collect(conn: sqlite3.Connection) -> None:
            keys.extend(r[0] for r in conn.execute(of_image, (image_id, image_id)))

        self._write(
            [
                (
                    "INSERT OR IGNORE INTO s3_deletions (key, owner) "
                    f"SELECT k.s3_key, (SELECT owner FROM images WHERE id = ?) FROM ({of_image}) k",
                    (image_id, image_id, image_id),
                ),
                ("DELETE FROM images WHERE id = ?", (image_id,)),
            ],
            guard=collect,
        )
        return sorted(keys)

    def blob_keys(self) -> set[str]:
        return {r[0] for r in self._q("SELECT blob_key FROM images")}

    # ---- masks ---------------------------------------------------------------------------
    def masks(self, image_id: str) -> list[MaskRow]:
        rows = self._q(f"SELECT {_MASK_COLS} FROM masks WHERE image_id = ? ORDER BY mask_id", (image_id,))
        return [_mask_row(r) for r in rows]

    def add_mask(self, mask: MaskRow) -> MaskRow:
        """Append one mask with the next free id (in one transaction with the count update)."""
        conn = self.db.conn
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                (next_id,) = conn.execute(
                    "SELECT coalesce(max(mask_id), -1) + 1 FROM masks WHERE image_id = ?", (mask.image_id,)
                ).fetchone()
                m = MaskRow(**{**mask.__dict__, "mask_id": next_id})
                conn.execute("INSERT INTO masks (" + _MASK_COLS + ") VALUES (?,?,?,?,?,?,?,?,?,?,?)", _mask_values(m))
                conn.execute("UPDATE images SET mask_count = mask_count + 1 WHERE id = ?", (mask.image_id,))
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"The database could not be written ({exc}).") from exc
        return m

    def set_mask_urls(self, image_id: str, updates: list[tuple[int, str | None, str | None, str]]) -> None:
        """updates: (mask_id, mask_url, s3_key, upload_state)."""
        self._write(
            many=[
                (
                    "UPDATE masks SET mask_url = ?, s3_key = ?, upload_state = ? WHERE image_id = ? AND mask_id = ?",
                    [(url, key, state, image_id, mid) for mid, url, key, state in updates],
                )
            ]
        )

    def pending_uploads(self, owner: str | None = None, limit: int = 10_000) -> list[MaskRow]:
        """Masks whose S3 upload has not succeeded yet (of one owner's images, or everyone's)."""
        cols = ", ".join(f"m.{c.strip()}" for c in _MASK_COLS.split(","))
        sql = f"SELECT {cols} FROM masks m JOIN images i ON i.id = m.image_id WHERE m.upload_state = 'pending'"
        params: tuple = ()
        if owner is not None:
            sql += " AND i.owner = ?"
            params = (owner,)
        rows = self._q(sql + " LIMIT ?", params + (limit,))
        return [_mask_row(r) for r in rows]

    # ---- other S3 objects of an image (original, shared renders) ------------------------------
    def add_object(self, image_id: str, key: str, kind: str, upload_state: str) -> None:
        """Record an object of an image; NotFound when the image is gone (deleted meanwhile)."""

        def image_exists(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM images WHERE id = ?", (image_id,)).fetchone() is None:
                raise NotFound(f"No image with id {image_id!r} (it was deleted).")

        self._write(
            [
                (
                    "INSERT OR REPLACE INTO objects (key, image_id, kind, upload_state) VALUES (?,?,?,?)",
                    (key, image_id, kind, upload_state),
                )
            ],
            guard=image_exists,
        )

    def objects(self, image_id: str) -> list[tuple[str, str, str]]:
        """(key, kind, upload_state) of an image's other S3 objects."""
        return [
            tuple(r) for r in self._q("SELECT key, kind, upload_state FROM objects WHERE image_id = ?", (image_id,))
        ]

    def pending_objects(self, owner: str | None = None, limit: int = 10_000) -> list[tuple[str, str, str]]:
        """(key, image_id, kind) of objects whose upload has not succeeded yet (of one owner's images, or all)."""
        sql = (
            "SELECT o.key, o.image_id, o.kind FROM objects o JOIN images i ON i.id = o.image_id "
            "WHERE o.upload_state = 'pending'"
        )
        params: tuple = ()
        if owner is not None:
            sql += " AND i.owner = ?"
            params = (owner,)
        return [tuple(r) for r in self._q(sql + " LIMIT ?", params + (limit,))]

    def set_object_state(self, key: str, upload_state: str) -> None:
        self._write([("UPDATE objects SET upload_state = ? WHERE key = ?", (upload_state, key))])

    def drop_object(self, key: str) -> None:
        """Forget an object and record its key for deletion from S3 (in one transaction)."""
        self._write(
            [
                (
                    "INSERT OR IGNORE INTO s3_deletions (key, owner) "
                    "SELECT o.key, i.owner FROM objects o JOIN images i ON i.id = o.image_id WHERE o.key = ?",
                    (key,),
                ),
                ("DELETE FROM objects WHERE key = ?", (key,)),
            ]
        )

    # ---- S3 objects to delete (of images already deleted) -------------------------------------
    def record_s3_deletions(self, keys: Sequence[str], owner: str | None = None) -> None:
        """Remember keys to delete from S3 (an owner of None: only an all-owners retry deletes them)."""
        sql = "INSERT OR IGNORE INTO s3_deletions (key, owner) VALUES (?, ?)"
        self._write(many=[(sql, [(k, owner) for k in keys])])

    def s3_deletions(self, owner: str | None = None, limit: int = 10_000) -> list[str]:
        """Keys still to delete from S3 (one owner's, or everyone's)."""
        if owner is None:
            rows = self._q("SELECT key FROM s3_deletions ORDER BY key LIMIT ?", (limit,))
        else:
            rows = self._q("SELECT key FROM s3_deletions WHERE owner = ? ORDER BY key LIMIT ?", (owner, limit))
        return [r[0] for r in rows]

    def forget_s3_deletions(self, keys: Sequence[str]) -> None:
        """The keys are gone from S3."""
        self._write(many=[("DELETE FROM s3_deletions WHERE key = ?", [(k,) for k in keys])])

    def integrity_ok(self) -> bool:
        return self._q("PRAGMA integrity_check")[0][0] == "ok"


def _image_values(r: ImageRow) -> tuple:
    return (r.id, r.owner, r.width, r.height, r.created_at, r.engine, r.mask_count, r.blob_key)


def _mask_values(m: MaskRow) -> tuple:
    return (
        m.image_id,
        m.mask_id,
        m.counts,
        m.area,
        json.dumps(m.bbox),
        m.predicted_iou,
        m.stability_score,
        json.dumps(m.point_coords) if m.point_coords is not None else None,
        m.mask_url,
        m.s3_key,
        m.upload_state,
    )
