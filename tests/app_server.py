"""Start the real Mask Studio app on a free loopback port (for gradio_client and browser tests)."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from pathlib import Path

from settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(data_dir: Path, segmenter=None, **overrides):
    """Yield (url, studio, settings) for the app launched exactly as app.main does, then close it."""
    import app

    overrides.setdefault("port", free_port())
    # The engine is the test's choice (most pass their own): a SAM2 service when a test names one, else the
    # built-in engine; never a model download behind a test's back.
    overrides.setdefault("segmenter", "service" if overrides.get("sam_api_url") else "builtin")
    settings = Settings(host="127.0.0.1", data_dir=Path(data_dir), **overrides)
    studio = app.create_studio(settings)
    if segmenter is not None:
        studio.segmenter = segmenter
    demo, (_, url, _) = app.launch(settings, studio, prevent_thread_lock=True, quiet=True)
    try:
        yield url, studio, settings
    finally:
        demo.close()
        studio.passes.close()
        studio.segmenter.close()
