"""Who is asking and what they may reach: owners, scopes, and the owner-scoped image id rules.

The owner of a request comes from an API key, a Hugging Face sign-in, or this browser's key.

With AUTH_MODE=open (the default off a Space) everyone without a key is the one local owner, as on
your own machine. With AUTH_MODE=keys, API callers must send a configured key and each browser gets
its own anonymous owner (a random key kept in its local storage). Keys are compared as SHA-256
digests in constant time; the keys themselves are never logged or stored.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias, TypeGuard

from errors import Conflict, InvalidInput, NotFound, StorageError, Unauthorized
from settings import Settings

LOCAL_OWNER = "local"  # the one owner of AUTH_MODE=open (everyone without a key)
ADMIN_OWNER = "admin"  # the owner of what is stored with ADMIN_API_KEY
_BROWSER_KEY = re.compile(r"^[A-Za-z0-9_-]{20,100}$")


class Everyone(enum.Enum):
    """The admin's scope: every owner's images (the only value is EVERYONE)."""

    EVERYONE = "everyone"


EVERYONE = Everyone.EVERYONE
Scope: TypeAlias = str | Everyone  # whose images a read may reach: one owner's, or EVERYONE's


def counted_as(scope: Scope) -> str:
    """The owner a scope's use is counted against (rate limits): the admin's use counts as ADMIN_OWNER."""
    return ADMIN_OWNER if scope is EVERYONE else scope


@dataclass(frozen=True)
class Caller:
    owner: str  # new images are stored under this owner
    admin: bool = False  # may list, read and delete everyone's images

    @property
    def scope(self) -> Scope:
        """Whose images this caller's reads reach: their own, or EVERYONE (the admin)."""
        return EVERYONE if self.admin else self.owner


# ---- image ids, as each owner knows them ----------------------------------------------------------

IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ID_RULE = "1–64 characters: letters, digits, '_' or '-', starting with a letter or digit"
# An owner's own image ids are kept as "<id>.<tag of the owner>", so two owners may both call an image
# "house" and nobody can learn, by trying an id, that someone else uses it. LOCAL_OWNER (the one owner of
# AUTH_MODE=open) keeps ids as given, as the old backend did; generated ids are random and kept as made.
STORED_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}(\.[0-9a-f]{12})?$")


def owner_tag(owner: str) -> str:
    return hashlib.sha256(owner.encode()).hexdigest()[:12]


def stored_image_id(image_id: str, owner: str) -> str:
    """The id a caller's own image id is stored under (see STORED_ID)."""
    return image_id if owner == LOCAL_OWNER else f"{image_id}.{owner_tag(owner)}"


def shown_image_id(stored: str, scope: Scope) -> str:
    """The id shown to an owner (the admin, scope EVERYONE, sees stored ids as they are)."""
    return stored if scope is EVERYONE else stored.split(".", 1)[0]


def meanings(image_id: str, scope: Scope) -> list[str]:
    """The stored ids an id may name for this scope, in lookup order: the owner's own id first, then the id
    as it is (a generated one). An id is taken for an owner exactly when one of these is theirs."""
    if scope is EVERYONE or "." in image_id:
        return [image_id]
    return list(dict.fromkeys([stored_image_id(image_id, scope), image_id]))


def new_image_id(now: dt.datetime | None = None) -> str:
    """`img_YYYYMMDD_HHMMSS_<8 hex>`, the old backend's form."""
    now = now or dt.datetime.now(dt.UTC)
    return f"img_{now:%Y%m%d_%H%M%S}_{secrets.token_hex(4)}"


def check_image_id(image_id: object) -> str:
    """A caller's image id, validated; the error says what an id may look like."""
    if not isinstance(image_id, str) or not IMAGE_ID.fullmatch(image_id):
        shown = repr(image_id) if len(repr(image_id)) <= 80 else repr(image_id)[:77] + "..."
        raise InvalidInput(f"Image id {shown} is not valid: use {ID_RULE}.")
    return image_id


def id_taken(image_id: str) -> Conflict:
    return Conflict(f"Image id {image_id!r} is already taken: choose another id, or delete that image first.")


def no_such_image(image_id: str) -> NotFound:
    """What an unknown id (or someone else's) answers, whoever asks."""
    shown = image_id if len(image_id) <= 80 else image_id[:77] + "..."
    return NotFound(f"No image with id {shown!r}. /list_images shows the stored ones.")


# ---- callers -------------------------------------------------------------------------------------


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The API key from `Authorization: Bearer <key>` (or `X-API-Key: <key>`)."""
    auth = headers.get("authorization") or headers.get("Authorization") or ""
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("x-api-key") or headers.get("X-API-Key")
    return key.strip() if key and key.strip() else None


def is_browser_key(value: object) -> TypeGuard[str]:
    """Whether a value from a browser's local storage is a key this app made (random, URL-safe)."""
    return isinstance(value, str) and bool(_BROWSER_KEY.fullmatch(value))


def browser_secret(data_dir: Path) -> str:
    """The secret the browser's stored key is obfuscated with, kept in DATA_DIR so it survives restarts.

    Gradio sends it to the page: it is not a security boundary (the random key itself is), but a new
    secret at every start would make every browser's stored key unreadable, and its library lost.
    """
    path = Path(data_dir) / "browser-state-secret"
    try:
        secret = path.read_text().strip()
        if secret:
            return secret
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StorageError(f"Could not read {path} ({exc.strerror}).") from exc
    secret = secrets.token_urlsafe(24)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x") as f:  # "x": two processes starting at once cannot overwrite each other
            f.write(secret)
    except FileExistsError:
        return path.read_text().strip()
    except OSError as exc:
        raise StorageError(f"Could not write {path} ({exc.strerror}).") from exc
    return secret


class Access:
    def __init__(self, settings: Settings):
        self.open = settings.auth_mode == "open"
        self._owners = [(_digest(key), owner) for owner, key in settings.app_api_keys]
        self._admin = _digest(settings.admin_api_key) if settings.admin_api_key else None

    def from_key(self, key: str) -> Caller:
        d = _digest(key)
        found = None
        for digest, owner in self._owners:  # no early exit: the time taken says nothing about the key
            if hmac.compare_digest(d, digest):
                found = Caller(owner)
        if self._admin is not None and hmac.compare_digest(d, self._admin):
            found = Caller(ADMIN_OWNER, admin=True)
        if found is None:
            raise Unauthorized(
                "That API key is not recognised. Check the key you send as 'Authorization: Bearer <key>'."
            )
        return found

    def api_caller(self, headers: Mapping[str, str]) -> Caller:
        """The caller of an API endpoint."""
        key = bearer_key(headers)
        if key is not None:
            return self.from_key(key)
        if self.open:
            return Caller(LOCAL_OWNER)
        raise Unauthorized(
            "This server needs an API key: send it as the header 'Authorization: Bearer <key>' "
            "(gradio_client: Client(url, headers={'Authorization': 'Bearer <key>'}))."
        )

    def browser_caller(self, browser_key: str | None, hf_username: str | None = None) -> Caller:
        """The person using the web page: signed in with Hugging Face, the local owner, or this browser."""
        if hf_username:
            return Caller(f"hf:{hf_username}")
        if self.open:
            return Caller(LOCAL_OWNER)
        if not is_browser_key(browser_key):
            raise Unauthorized("This page lost its session key: reload the page.")
        return Caller("anon:" + hashlib.sha256(browser_key.encode()).hexdigest()[:24])
