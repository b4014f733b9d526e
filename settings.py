"""One frozen Settings, read once from the environment (and a `.env` file) at start-up.

No side effects at import: nothing is created and nothing is contacted here. Tests build
`Settings(...)` directly; `Settings.from_env()` is what app.py uses.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from errors import InvalidInput

ENGINE_BUILTIN = "built-in classical segmenter (offline)"
# On a Hugging Face Space, where anyone can reach the app, stored images are limited unless told otherwise.
# (Not segmentations: behind the Space's proxy every visitor has the proxy's address, so a default per-address
# limit would be one limit shared by everyone.)
SPACE_IMAGES = 50
# SEGMENTER: auto = the SAM2 service when SAM_API_URL is set, else MobileSAM when it loads, else built-in.
SEGMENTER_CHOICES = ("auto", "service", "sam2", "mobilesam", "builtin")


@dataclass(frozen=True)
class Settings:
    # Server
    host: str = "127.0.0.1"
    port: int = 7860
    data_dir: Path = Path("data")
    # Limits on what people send
    max_image_pixels: int = 40_000_000
    max_upload_mb: int = 50
    max_masks: int = 128
    # Which engine segments (segmenter.make_segmenter), and where in-process models are found
    segmenter: str = "auto"
    mobilesam_checkpoint: Path | None = None  # a local mobile_sam.pt; unset: looked for in models_dir
    models_folder: Path | None = None  # MODELS_DIR; unset: <data_dir>/models (see models_dir)
    sam2_model: str | None = None  # SAM2_MODEL, a Hub id such as facebook/sam2.1-hiera-tiny (SEGMENTER=sam2)
    sam2_device: str | None = None  # SAM2_DEVICE: cuda, mps or cpu; unset: the best there is
    # External SAM2 service (unset: the built-in segmenter runs)
    sam_api_url: str | None = field(default=None, repr=False)  # may hold user:password@
    sam_api_token: str | None = field(default=None, repr=False)
    sam_api_timeout: float = 150.0
    sam_api_segment_path: str = "/segment"
    sam_api_protocol: str = "mask-studio"
    sam_max_side: int = 2048
    sam_api_retries: int = 2
    sam_mask_url_hosts: tuple[str, ...] = ()
    # S3 (unset bucket: mask_url stays null)
    s3_bucket: str | None = None
    aws_region: str | None = None
    s3_endpoint_url: str | None = None
    s3_prefix: str = "sam2-api-masks/"
    s3_url_mode: str = "public"
    s3_public_base_url: str | None = None
    s3_presign_seconds: int = 3600
    s3_object_acl: str | None = None
    s3_upload_originals: bool = False
    # Ownership and abuse limits
    auth_mode: str = "open"
    app_api_keys: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    segment_rate_limit: int = 0
    max_images_per_owner: int = 0
    retention_days: float = 0.0
    # On a Hugging Face Space (SPACE_ID set) or when asked: show the HF sign-in button
    hf_login: bool = False
    # The old backend's REST API: origins allowed to call it from a browser (unset: none)
    cors_origins: tuple[str, ...] = ()
    # Also an MCP server for AI agents (None: Gradio's own GRADIO_MCP_SERVER decides)
    mcp_server: bool | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mask_studio.db"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def models_dir(self) -> Path:
        """Where model weights are kept and downloaded to: MODELS_DIR, else <DATA_DIR>/models."""
        return self.models_folder if self.models_folder is not None else self.data_dir / "models"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def engine_name(self) -> str:
        return f"SAM2 service at {public_url(self.sam_api_url)}" if self.sam_api_url else ENGINE_BUILTIN

    def with_(self, **changes) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env") -> Settings:
        """Build settings from `env` (default: os.environ), with a `.env` file filling in what is unset."""
        values: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            from dotenv import dotenv_values

            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        values.update(os.environ if env is None else env)
        return cls(**_parse(values))


def public_url(url: str) -> str:
    """A URL as it may be shown to people and logs: without user:password@ and without a query string.

    ValueError for what cannot be read as a URL (a bad port or IPv6 address)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, host_port(parts.hostname or "", parts.port), parts.path, "", ""))


def host_port(host: str, port: int | None) -> str:
    """host[:port] for a URL, an IPv6 address in brackets."""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def _get(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value is not None and value.strip() != "":
            return value.strip()
    return None


def env_number(env: Mapping[str, str], kind, names: tuple[str, ...], minimum: float = 0):
    """The first of these variables that is set, as `kind` (int or float) at least `minimum`; None when unset."""
    raw = _get(env, *names)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidInput(f"{names[0]} must be a number, got {raw!r}.", title="Configuration error") from None
    if value < minimum:
        raise InvalidInput(f"{names[0]} must be at least {minimum}, got {raw!r}.", title="Configuration error")
    return value


def _bool(raw: str | None) -> bool | None:
    if raw is None:
        return None
    return raw.lower() in {"1", "true", "yes", "on"}


def _api_keys(raw: str | None) -> tuple[tuple[str, str], ...]:
    """`APP_API_KEYS="alice:KEY1,bob:KEY2"` → ((owner, key), ...)."""
    if not raw:
        return ()
    pairs = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        owner, sep, key = item.partition(":")
        if not sep or not owner.strip() or not key.strip():
            raise InvalidInput("APP_API_KEYS must look like 'owner1:key1,owner2:key2'.", title="Configuration error")
        pairs.append((owner.strip(), key.strip()))
    return tuple(pairs)


def _choice(env: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str | None:
    raw = _get(env, name)
    if raw is None:
        return None
    if raw.lower() not in allowed:
        raise InvalidInput(f"{name} must be one of {', '.join(allowed)}; got {raw!r}.", title="Configuration error")
    return raw.lower()


def _space_default(env: Mapping[str, str], value, on_space):
    """The value as set; unset, `on_space` on a Hugging Face Space (SPACE_ID) and the class default elsewhere."""
    if value is not None:
        return value
    return on_space if _get(env, "SPACE_ID") else None


def _parse(env: Mapping[str, str]) -> dict:
    out: dict = {
        "host": _get(env, "HOST", "GRADIO_SERVER_NAME"),
        "port": env_number(env, int, ("PORT", "GRADIO_SERVER_PORT"), 1),
        "data_dir": Path(p) if (p := _get(env, "DATA_DIR")) else None,
        "max_image_pixels": env_number(env, int, ("MAX_IMAGE_PIXELS",), 1),
        "max_upload_mb": env_number(env, int, ("MAX_UPLOAD_MB",), 1),
        "max_masks": env_number(env, int, ("MAX_MASKS",), 1),
        "segmenter": _choice(env, "SEGMENTER", SEGMENTER_CHOICES),
        "mobilesam_checkpoint": Path(p) if (p := _get(env, "MOBILESAM_CHECKPOINT")) else None,
        "models_folder": Path(p) if (p := _get(env, "MODELS_DIR")) else None,
        "sam2_model": _get(env, "SAM2_MODEL"),
        "sam2_device": _choice(env, "SAM2_DEVICE", ("cuda", "mps", "cpu")),
        "sam_api_url": (u.rstrip("/") if (u := _get(env, "SAM_API_URL")) else None),
        "sam_api_token": _get(env, "SAM_API_TOKEN"),
        "sam_api_timeout": env_number(env, float, ("SAM_API_TIMEOUT",), 0.001),
        "sam_api_segment_path": _get(env, "SAM_API_SEGMENT_PATH"),
        "sam_api_protocol": _choice(env, "SAM_API_PROTOCOL", ("mask-studio", "cog", "replicate")),
        "sam_max_side": env_number(env, int, ("SAM_MAX_SIDE",), 16),
        "sam_api_retries": env_number(env, int, ("SAM_API_RETRIES",), 0),
        "sam_mask_url_hosts": tuple(
            h.strip().lower() for h in (_get(env, "SAM_MASK_URL_HOSTS") or "").split(",") if h.strip()
        )
        or None,
        "s3_bucket": _get(env, "S3_BUCKET_NAME_STAGING", "S3_BUCKET"),
        "aws_region": _get(env, "AWS_REGION", "AWS_DEFAULT_REGION"),
        "s3_endpoint_url": _get(env, "S3_ENDPOINT_URL"),
        "s3_prefix": _get(env, "S3_PREFIX"),
        "s3_url_mode": _choice(env, "S3_URL_MODE", ("public", "presigned")),
        "s3_public_base_url": (u.rstrip("/") if (u := _get(env, "S3_PUBLIC_BASE_URL")) else None),
        "s3_presign_seconds": env_number(env, int, ("S3_PRESIGN_SECONDS",), 1),
        "s3_object_acl": _get(env, "S3_OBJECT_ACL"),
        "s3_upload_originals": _bool(_get(env, "S3_UPLOAD_ORIGINALS")),
        # Off a Space the default is open (one owner); on a public Space, per-owner data by default.
        "auth_mode": _space_default(env, _choice(env, "AUTH_MODE", ("open", "keys")), "keys"),
        "app_api_keys": _api_keys(_get(env, "APP_API_KEYS")) or None,
        "admin_api_key": _get(env, "ADMIN_API_KEY"),
        # A public Space limits stored images unless told otherwise (0 turns it off there too).
        "segment_rate_limit": env_number(env, int, ("SEGMENT_RATE_LIMIT",), 0),
        "max_images_per_owner": _space_default(env, env_number(env, int, ("MAX_IMAGES_PER_OWNER",), 0), SPACE_IMAGES),
        "retention_days": env_number(env, float, ("RETENTION_DAYS",), 0),
        # HF_LOGIN as set wins (false turns the button off on a Space too); unset: on by itself on a Space.
        "hf_login": _space_default(env, _bool(_get(env, "HF_LOGIN")), True),
        "cors_origins": parse_cors_origins(_get(env, "CORS_ORIGINS")) or None,
        "mcp_server": mcp_switch(env),
    }
    known = {f.name for f in fields(Settings)}
    assert set(out) <= known
    return {k: v for k, v in out.items() if v is not None}


def parse_cors_origins(raw: str | None) -> tuple[str, ...]:
    """CORS_ORIGINS as the old .env wrote it (`["http://localhost:3000", ...]`) or `a, b` → origins.

    Unset or blank: no origin at all (no cross-origin access to the REST API)."""
    if raw is None or not raw.strip():
        return ()
    text = raw.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            try:  # the old backend read it with ast.literal_eval, so ['http://a'] worked there too
                items = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                items = None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise InvalidInput(
                'CORS_ORIGINS must be a JSON list of origins, like ["http://localhost:3000"], '
                f"or origins separated by commas; got {text[:80]!r}.",
                title="Configuration error",
            )
    else:
        items = text.split(",")
    return tuple(dict.fromkeys(o.strip().rstrip("/") for o in items if o.strip()))


def mcp_switch(env: Mapping[str, str]) -> bool | None:
    """MCP_SERVER as a yes/no; unset: None, which lets Gradio read its own GRADIO_MCP_SERVER."""
    raw = (env.get("MCP_SERVER") or "").strip().lower()
    if not raw:
        return None
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise InvalidInput(f"MCP_SERVER must be true or false; got {raw!r}.", title="Configuration error")
