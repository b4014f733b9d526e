"""URLs and secrets fit for messages and logs: no user:password, no query string, no token, anywhere.

SAM_API_URL may carry a password (user:password@) or a key (in its query string), and SAM_API_TOKEN is a
secret: every message and log line about the SAM2 service goes through `safe_url` or a `Redactor`, and
httpx's own request log is redacted the same way.
"""

from __future__ import annotations

import logging
from urllib.parse import SplitResult, urljoin, urlsplit

import httpx

from settings import public_url


def safe_url(url: str) -> str:
    """A URL fit for a message or a log: no user:password, no query string (it may hold a key). Never raises."""
    try:
        return public_url(url) + ("?…" if urlsplit(url).query else "")
    except ValueError:  # not a valid URL (bad port, bad IPv6 address): cut by hand what may hold a secret
        head, query = url.partition("#")[0], ""
        head, mark, query = head.partition("?")
        scheme, sep, rest = head.rpartition("://") if "://" in head else ("", "", head)
        netloc, slash, path = rest.partition("/")
        return f"{scheme}{sep}{netloc.rpartition('@')[2]}{slash}{path}" + ("?…" if mark else "")


def checked_url(base: str, ref: str) -> tuple[str, SplitResult]:
    """`ref` resolved against `base`, checked to be a URL httpx can request; ValueError saying why not."""
    try:
        url = urljoin(base, ref.strip())
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a port out of range
        httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(str(exc)) from None
    return url, parts


class Redactor:
    """Replaces each secret (longest first, so one inside another leaves no tail) by ***."""

    def __init__(self, secrets: list[str]):
        self._secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _RedactURLs(logging.Filter):
    """httpx logs each request's URL at INFO: show it as safe_url does, without user:password or query."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, httpx.URL) for a in record.args):
            record.args = tuple(safe_url(str(a)) if isinstance(a, httpx.URL) else a for a in record.args)
        return True


_REDACT_URLS = _RedactURLs()


def quiet_http_logs() -> None:
    """The app logs at INFO, where httpx would log every request URL (a key in SAM_API_URL's query with it).

    httpx and httpcore are kept at WARNING unless someone configured them; either way httpx's URLs are redacted."""
    for name in ("httpx", "httpcore"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    httpx_log = logging.getLogger("httpx")
    if _REDACT_URLS not in httpx_log.filters:
        httpx_log.addFilter(_REDACT_URLS)
