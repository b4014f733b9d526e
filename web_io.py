"""What the page's handlers and the API endpoints share at Gradio's edge: files handed out, files received,
the caller's address, and whether the caller is still there."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import gradio.utils as gradio_utils

from errors import InvalidInput


class Outputs:
    """Files we hand to Gradio (composites, downloads), in one temp folder pruned as it goes."""

    def __init__(self, root: Path | None = None, max_age_s: float = 3600):
        self.root = root or Path(tempfile.gettempdir()) / "mask-studio-out"
        self.max_age_s = max_age_s
        self._last_prune = 0.0

    def write(self, name: str, data: bytes) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        self._prune()
        # A folder of its own keeps the file's name clean: it is the name a person's download gets.
        path = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{int(time.time())}-")) / name
        path.write_bytes(data)
        return str(path)

    def _prune(self) -> None:
        now = time.time()
        if now - self._last_prune < 60:
            return
        self._last_prune = now
        for p in self.root.iterdir():
            try:
                if now - p.stat().st_mtime > self.max_age_s:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            except OSError:
                pass


def client_address(request: gr.Request | None) -> str | None:
    """The caller's network address as the server sees it (abuse limits are also counted per address)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or None


def upload_name(image: Any) -> str | None:
    """The uploaded file's own name (what the person called it), for the library; None when unknown."""
    if image is None:
        return None
    name = image.get("orig_name") if isinstance(image, dict) else getattr(image, "orig_name", None)
    if not name:
        path = image.get("path") if isinstance(image, dict) else getattr(image, "path", image)
        name = Path(str(path)).name if isinstance(path, (str, Path)) else None
    return str(name)[:200] if name else None


def upload_bytes(image: Any) -> bytes | None:
    """A file parameter as gr.api delivers it (a path, or a FileData-like dict) → bytes."""
    if image is None:
        return None
    path = image.get("path") if isinstance(image, dict) else getattr(image, "path", image)
    if not isinstance(path, (str, Path)) or not str(path).strip() or "\x00" in str(path):
        raise InvalidInput("image must be an image file (use gradio_client.handle_file(path)).")
    # gr.api passes a bare string through unchecked: without this, a caller could name any file
    # on the server (another owner's blob, any picture on disk) and have it ingested.
    uploads = Path(gradio_utils.get_upload_folder()).resolve()
    if not Path(path).resolve().is_relative_to(uploads):
        raise InvalidInput(
            "image must be a file uploaded with the request (gradio_client.handle_file(path)); "
            "paths on the server are not accepted."
        )
    try:
        return Path(path).read_bytes()
    except OSError:
        raise InvalidInput("The uploaded file could not be read; please upload it again.") from None


class LeaveWatch:
    """Tells whether the person (or API client) behind a request has gone: tab closed, job cancelled.

    Gradio has no public call for this. While our job runs it sits in the queue's `active_jobs` with
    `alive` True; a closed event stream sets `alive` False, and a cancel removes the job. We only answer
    "gone" after having seen the job alive once, so if Gradio's internals change this answers False
    (nothing is cancelled) rather than cancelling work wrongly.
    """

    def __init__(self, demo: gr.Blocks, request: gr.Request | None):
        self.demo = demo
        self.session = getattr(request, "session_hash", None)
        self.seen = False

    def gone(self) -> bool:
        if self.session is None:
            return False
        alive = False
        for jobs in getattr(getattr(self.demo, "_queue", None), "active_jobs", None) or []:
            for job in jobs or []:
                if getattr(job, "session_hash", None) == self.session and getattr(job, "alive", False) is True:
                    alive = True
        if alive:
            self.seen = True
        return self.seen and not alive


@contextlib.contextmanager
def cancel_on_leave(demo: gr.Blocks, request: gr.Request | None) -> Iterator[threading.Event]:
    """An event that is set if the person behind the request goes away (tab closed, job cancelled)
    while the block runs, so a (possibly paid) segmentation can stop; watched every half second."""
    cancel, done, watch = threading.Event(), threading.Event(), LeaveWatch(demo, request)

    def watch_loop() -> None:
        while not done.wait(0.5):
            if watch.gone():
                cancel.set()
                return

    if watch.session is not None:
        threading.Thread(target=watch_loop, daemon=True, name="leave-watch").start()
    try:
        yield cancel
    finally:
        done.set()
