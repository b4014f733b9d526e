"""Headless Chromium for the browser tests and bench_click: Debian's /usr/bin/chromium driven by Playwright.

Never `playwright install` (its own browser download cannot work here). The flags keep Chromium off the
network: this machine reaches nothing but loopback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def launch(playwright):
    """A headless Chromium from a running `sync_playwright()`."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)


def require_browser():
    """The playwright sync API, or skip (off CI) / fail loudly (on CI) when Chromium or playwright is missing."""
    if in_ci():
        from playwright import sync_api  # CI must run these tests: a missing package fails loudly
    else:
        sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: install Debian's chromium (scripts/test.sh does, as root)."
        if in_ci():
            pytest.fail(f"CI needs the browser tests: {message}", pytrace=False)
        pytest.skip(message)
    return sync_api
