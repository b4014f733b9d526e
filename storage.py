"""Storage: images and masks in SQLite (through sqlite-utils tables), and blob stores for the bytes.

`BlobStore` is the interface for bytes (original images; mask PNGs when S3 is configured);
`LocalBlobStore` keeps blobs as files under one folder, written atomically (temp file + rename)
so a crash never leaves a half-written blob under its final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import sqlite_utils

from access import EVERYONE, Scope, id_taken, no_such_image, shown_image_id
from errors import Conflict, NotFound, StorageError

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


class OwnerFull(Exception):
    "The owner already stores as many images as allowed (the caller words the refusal)"

    def __init__(self, count: int):
        super().__init__(count)
        self.count = count


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
    name: str | None = None  # the uploaded file's name (an imported image: its id in the old backend), or None

    def summary(self, scope: Scope) -> dict:
        """The API's description of the image for `scope` (EVERYONE: the admin, who is also told the owner)."""
        out = {
            "image_id": shown_image_id(self.id, scope),
            "width": self.width,
            "height": self.height,
            "created_at": self.created_at,
            "mask_count": self.mask_count,
            "name": self.name,
        }
        return out if scope is not EVERYONE else {**out, "owner": self.owner}


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


# The schema of every database this app has written: a file made by an older version opens unchanged, and
# gains the columns added since (_ADDED_COLUMNS) without losing a row.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    engine TEXT NOT NULL,
    mask_count INTEGER NOT NULL DEFAULT 0,
    blob_key TEXT NOT NULL,
    name TEXT
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
CREATE TABLE IF NOT EXISTS thumbnails (
    image_id TEXT PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    jpeg BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS s3_deletions (
    key TEXT PRIMARY KEY,
    owner TEXT
);
"""

# Columns added after the first release, each with its SQL type: ALTER TABLE ... ADD COLUMN keeps every row.
_ADDED_COLUMNS = {"images": {"name": "TEXT"}}
_IMAGE_COLS = "id, owner, width, height, created_at, engine, mask_count, blob_key, name"
_MASK_COLS = (
    "image_id, mask_id, counts, area, bbox, predicted_iou, stability_score, point_coords, "
    "mask_url, s3_key, upload_state"
)
_T = TypeVar("_T")


def _mask_record(m: MaskRow) -> dict:
    """A mask row as stored: bbox and point_coords as JSON text."""
    pc = json.dumps(m.point_coords) if m.point_coords is not None else None
    return {**vars(m), "bbox": json.dumps(m.bbox), "point_coords": pc}


def _mask_row(r: dict) -> MaskRow:
    pc = r["point_coords"]
    return MaskRow(**{**r, "bbox": json.loads(r["bbox"]), "point_coords": json.loads(pc) if pc else None})


def _owned(scope: Scope, column: str = "owner") -> tuple[str, list]:
    """A WHERE fragment (and its arguments) limiting rows to the scope's images."""
    return ("1", []) if scope is EVERYONE else (f"{column} = ?", [scope])


class Database:
    """Images and masks in one SQLite file (WAL, foreign keys), one connection per thread.

    Reads go through `_read`, every write through `_transaction`: one BEGIN IMMEDIATE under one lock,
    sqlite-utils' own writes nesting inside it as savepoints, sqlite3 errors translated once.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._write_lock:
            self.db.executescript(_SCHEMA)
        self._add_new_columns()

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

    def _read(self, fn: Callable[[sqlite_utils.Database], _T]) -> _T:
        """Run a read (which must consume its rows), translating sqlite3's errors."""
        try:
            return fn(self.db)
        except sqlite3.Error as exc:
            raise StorageError(f"The database could not be read ({exc}).") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite_utils.Database]:
        """ONE write transaction: everything done in the block lands, or nothing does.

        It takes the write lock first (BEGIN IMMEDIATE), so a check made in the block (a quota, an image that
        must still exist) holds when the block commits; an exception raised in the block rolls it all back.
        """
        db = self.db
        with self._write_lock:
            try:
                db.conn.execute("BEGIN IMMEDIATE")
                yield db
                db.conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                db.rollback()
                raise Conflict(f"That record already exists ({exc}).") from exc
            except sqlite3.Error as exc:
                db.rollback()
                raise StorageError(f"The database could not be written ({exc}).") from exc
            except BaseException:
                db.rollback()
                raise

    def _add_new_columns(self) -> None:
        """Give a database made by an older version the columns added since, keeping every row. Checked
        again inside the write transaction: another process opening the same file at once may add them first."""
        with self._transaction() as db:
            for table, columns in _ADDED_COLUMNS.items():
                have = {c.name for c in db.table(table).columns}
                for column, sql_type in columns.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")

    # ---- images --------------------------------------------------------------------------
    def insert_image(self, row: ImageRow, masks: list[MaskRow], max_per_owner: int = 0) -> None:
        """Insert an image and its masks in one transaction (an id already taken: Conflict).

        With max_per_owner > 0 the owner's count is checked inside the same transaction, so two
        concurrent inserts can never take an owner past it (OwnerFull).
        """
        try:
            with self._transaction() as db:
                if max_per_owner > 0:
                    count = db.table("images").count_where("owner = ?", [row.owner])
                    if count >= max_per_owner:
                        raise OwnerFull(count)
                db.table("images").insert(vars(row))
                db.table("masks").insert_all(_mask_record(m) for m in masks)
        except Conflict:
            raise id_taken(row.id) from None

    def image_exists(self, image_id: str, scope: Scope = EVERYONE) -> bool:
        """Whether the image is stored (and, for an owner's scope, theirs)."""
        where, args = _owned(scope)
        return self._read(lambda db: db.table("images").count_where(f"id = ? AND {where}", [image_id, *args]) > 0)

    def get_image(self, image_id: str, scope: Scope = EVERYONE) -> ImageRow:
        """The image row; someone else's image answers exactly like an unknown id."""
        where, args = _owned(scope)
        rows = self._read(
            lambda db: list(db.table("images").rows_where(f"id = ? AND {where}", [image_id, *args], select=_IMAGE_COLS))
        )
        if not rows:
            raise no_such_image(image_id)
        return ImageRow(**rows[0])

    def list_images(self, scope: Scope = EVERYONE, limit: int = 1000) -> list[ImageRow]:
        """Newest first: the scope's images."""
        where, args = _owned(scope)
        order = "created_at DESC, rowid DESC"
        return self._read(
            lambda db: [
                ImageRow(**r)
                for r in db.table("images").rows_where(where, args, order_by=order, select=_IMAGE_COLS, limit=limit)
            ]
        )

    def count_images(self, owner: str) -> int:
        return self._read(lambda db: db.table("images").count_where("owner = ?", [owner]))

    def images_older_than(self, created_before: str) -> list[ImageRow]:
        rows = self._read(
            lambda db: list(db.table("images").rows_where("created_at < ?", [created_before], select=_IMAGE_COLS))
        )
        return [ImageRow(**r) for r in rows]

    def delete_image(self, image_id: str) -> list[str]:
        """Delete the image, its masks and objects; returns its S3 keys, recorded in `s3_deletions`.

        The keys are recorded in the same transaction as the delete, so a crash or an S3 outage
        afterwards can never forget them: they stay recorded until forget_s3_deletions.
        """
        with self._transaction() as db:
            image = list(db.table("images").rows_where("id = ?", [image_id], select="owner"))
            masks = db.table("masks").rows_where("image_id = ? AND s3_key IS NOT NULL", [image_id], select="s3_key")
            objects = db.table("objects").rows_where("image_id = ?", [image_id], select="key")
            keys = sorted({r["s3_key"] for r in masks} | {r["key"] for r in objects})
            owner = image[0]["owner"] if image else None
            db.table("s3_deletions").insert_all(({"key": k, "owner": owner} for k in keys), ignore=True)
            db.table("images").delete_where("id = ?", [image_id])
        return keys

    # ---- the Library's thumbnails (derived from the original: made when first asked for) -------------
    def thumbnails(self, image_ids: Sequence[str]) -> dict[str, bytes]:
        """The stored thumbnails (JPEG bytes) of these images, by id; images without one are left out."""
        if not image_ids:
            return {}
        marks = ", ".join("?" * len(image_ids))
        rows = self._read(lambda db: list(db.table("thumbnails").rows_where(f"image_id IN ({marks})", list(image_ids))))
        return {r["image_id"]: r["jpeg"] for r in rows}

    def set_thumbnail(self, image_id: str, jpeg: bytes) -> bool:
        """Keep the image's thumbnail; False when the image is no longer stored (deleted meanwhile)."""
        with self._transaction() as db:
            if not db.table("images").count_where("id = ?", [image_id]):
                return False
            db.table("thumbnails").upsert({"image_id": image_id, "jpeg": jpeg}, pk="image_id")
        return True

    def blob_keys(self) -> set[str]:
        return self._read(lambda db: {r["blob_key"] for r in db.table("images").rows_where(select="blob_key")})

    # ---- masks ---------------------------------------------------------------------------
    def masks(self, image_id: str) -> list[MaskRow]:
        return self._read(
            lambda db: [
                _mask_row(r)
                for r in db.table("masks").rows_where("image_id = ?", [image_id], order_by="mask_id", select=_MASK_COLS)
            ]
        )

    def add_mask(self, mask: MaskRow) -> MaskRow:
        """Append one mask with the next free id (in one transaction with the count update)."""
        with self._transaction() as db:
            (last,) = db.execute("SELECT max(mask_id) FROM masks WHERE image_id = ?", [mask.image_id]).fetchone()
            m = MaskRow(**{**vars(mask), "mask_id": 0 if last is None else last + 1})
            db.table("masks").insert(_mask_record(m))
            db.execute("UPDATE images SET mask_count = mask_count + 1 WHERE id = ?", [mask.image_id])
        return m

    def set_mask_urls(self, image_id: str, updates: Sequence[tuple[int, str | None, str | None, str]]) -> None:
        """updates: (mask_id, mask_url, s3_key, upload_state)."""
        with self._transaction() as db:
            db.conn.executemany(
                "UPDATE masks SET mask_url = ?, s3_key = ?, upload_state = ? WHERE image_id = ? AND mask_id = ?",
                [(url, key, state, image_id, mid) for mid, url, key, state in updates],
            )

    def pending_uploads(self, scope: Scope = EVERYONE, limit: int = 10_000) -> list[MaskRow]:
        """Masks whose S3 upload has not succeeded yet (of the scope's images)."""
        where, args = _owned(scope, "i.owner")
        cols = ", ".join(f"m.{c.strip()}" for c in _MASK_COLS.split(","))
        sql = (
            f"SELECT {cols} FROM masks m JOIN images i ON i.id = m.image_id "
            f"WHERE m.upload_state = 'pending' AND {where} LIMIT ?"
        )
        return self._read(lambda db: [_mask_row(r) for r in db.query(sql, [*args, limit])])

    # ---- other S3 objects of an image (original, shared renders) ------------------------------
    def add_object(self, image_id: str, key: str, kind: str, upload_state: str) -> None:
        """Record an object of an image; NotFound when the image is gone (deleted meanwhile)."""
        with self._transaction() as db:
            if not db.table("images").count_where("id = ?", [image_id]):
                raise NotFound(f"No image with id {image_id!r} (it was deleted).")
            record = {"key": key, "image_id": image_id, "kind": kind, "upload_state": upload_state}
            db.table("objects").insert(record, replace=True)

    def objects(self, image_id: str) -> list[tuple[str, str, str]]:
        """(key, kind, upload_state) of an image's other S3 objects."""
        rows = self._read(lambda db: list(db.table("objects").rows_where("image_id = ?", [image_id])))
        return [(r["key"], r["kind"], r["upload_state"]) for r in rows]

    def pending_objects(self, scope: Scope = EVERYONE, limit: int = 10_000) -> list[tuple[str, str, str]]:
        """(key, image_id, kind) of objects whose upload has not succeeded yet (of the scope's images)."""
        where, args = _owned(scope, "i.owner")
        sql = (
            "SELECT o.key, o.image_id, o.kind FROM objects o JOIN images i ON i.id = o.image_id "
            f"WHERE o.upload_state = 'pending' AND {where} LIMIT ?"
        )
        rows = self._read(lambda db: list(db.query(sql, [*args, limit])))
        return [(r["key"], r["image_id"], r["kind"]) for r in rows]

    def set_object_state(self, key: str, upload_state: str) -> None:
        with self._transaction() as db:
            db.execute("UPDATE objects SET upload_state = ? WHERE key = ?", [upload_state, key])

    def drop_object(self, key: str) -> None:
        """Forget an object and record its key for deletion from S3 (in one transaction)."""
        with self._transaction() as db:
            found = list(
                db.query("SELECT i.owner FROM objects o JOIN images i ON i.id = o.image_id WHERE o.key = ?", [key])
            )
            if found:
                db.table("s3_deletions").insert({"key": key, "owner": found[0]["owner"]}, ignore=True)
            db.table("objects").delete_where("key = ?", [key])

    # ---- S3 objects to delete (of images already deleted) -------------------------------------
    def record_s3_deletions(self, keys: Sequence[str], owner: str | None = None) -> None:
        """Remember keys to delete from S3 (recorded without an owner: only an all-owners retry deletes them)."""
        with self._transaction() as db:
            db.table("s3_deletions").insert_all(({"key": k, "owner": owner} for k in keys), ignore=True)

    def s3_deletions(self, scope: Scope = EVERYONE, limit: int = 10_000) -> list[str]:
        """Keys still to delete from S3 (of the scope's deleted images)."""
        where, args = _owned(scope)
        rows = self._read(
            lambda db: list(db.table("s3_deletions").rows_where(where, args, order_by="key", limit=limit))
        )
        return [r["key"] for r in rows]

    def forget_s3_deletions(self, keys: Sequence[str]) -> None:
        """The keys are gone from S3."""
        with self._transaction() as db:
            db.conn.executemany("DELETE FROM s3_deletions WHERE key = ?", [(k,) for k in keys])

    def integrity_ok(self) -> bool:
        return self._read(lambda db: db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")
