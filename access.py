"""Who is asking: the owner of a request, from an API key, a Hugging Face sign-in, or this browser's key.

With AUTH_MODE=open (the default off a Space) everyone without a key is the one local owner, as on
your own machine. With AUTH_MODE=keys, API callers must send a configured key and each browser gets
its own anonymous owner (a random key kept in its local storage). Keys are compared as SHA-256
digests in constant time; the keys themselves are never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from errors import StorageError, Unauthorized
from settings import Settings

LOCAL_OWNER = "local"
_BROWSER_KEY = re.compile(r"^[A-Za-z0-9_-]{20,100}$")


@dataclass(frozen=True)
class Caller:
    owner: str  # new images are stored under this owner
    admin: bool = False  # may list, read and delete everyone's images

    @property
    def scope(self) -> str | None:
        """The owner filter for reads: None means everything (admin)."""
        return None if self.admin else self.owner


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


def is_browser_key(value: object) -> bool:
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
            found = Caller("admin", admin=True)
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
