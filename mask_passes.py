"""Automatic passes run after the upload has answered: a bounded worker, each image's progress, stopped by a delete.

A pass is one `generate` of a SAM engine over a stored image, storing masks as they are found. At most
PASS_WORKERS passes run at once (each uses the model's own threads: on a small CPU box more would only take
turns and starve other people's clicks and renders); the others wait their turn in order. Each image's latest
pass is remembered (a few hundred at most) so a page can show "Finding masks… 37 so far" and, afterwards, how
it ended. Nothing here knows the database: the studio gives each pass its work.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from errors import MaskStudioError, SegmentationCancelled

log = logging.getLogger("mask_studio.passes")

PASS_WORKERS = 1
REMEMBERED = 256  # finished passes whose outcome a page may still ask about


@dataclass
class PassState:
    """One image's automatic pass, as its page sees it; changed only by the pass's own thread."""

    image_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    fraction: float = 0.0
    stored: int = 0  # masks this pass stored (not counting ones a click had stored already)
    done: bool = False
    error: str | None = None  # why it failed, in words for a person
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        return not self.done


Work = Callable[[PassState], None]


class MaskPasses:
    """The background worker and what each image's pass has done so far."""

    def __init__(self, workers: int = PASS_WORKERS):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mask-pass")
        self._passes: OrderedDict[str, PassState] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, image_id: str, work: Work) -> PassState:
        """Queue `work` for the image (it reports through the PassState it is given)."""
        state = PassState(image_id)
        with self._lock:
            self._passes[image_id] = state
            self._passes.move_to_end(image_id)
            while len(self._passes) > REMEMBERED:
                oldest = next(iter(self._passes))
                if self._passes[oldest].running:
                    break
                del self._passes[oldest]
        self._pool.submit(self._run, work, state)
        return state

    def status(self, image_id: str) -> PassState | None:
        """The image's latest pass, or None when none ran since the process started."""
        with self._lock:
            return self._passes.get(image_id)

    def running(self, image_id: str) -> bool:
        state = self.status(image_id)
        return state is not None and state.running

    def stop(self, image_id: str) -> None:
        """Stop the image's pass (it is being deleted): it stores nothing more and is forgotten."""
        with self._lock:
            state = self._passes.pop(image_id, None)
        if state is not None:
            state.stop.set()  # checked before each batch of masks is stored (under Ingest.adding)

    def close(self) -> None:
        with self._lock:
            states = list(self._passes.values())
        for state in states:
            state.stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def _run(work: Work, state: PassState) -> None:
        try:
            if not state.stop.is_set():
                state.started = True
                work(state)
        except SegmentationCancelled:
            pass  # stopped on purpose (the image was deleted)
        except MaskStudioError as exc:
            if not state.stop.is_set():
                state.error = exc.message
                log.warning("The automatic pass for image %s failed: %s", state.image_id, exc.message)
        except Exception:
            if not state.stop.is_set():
                state.error = "Something unexpected went wrong while finding masks; it has been logged."
                log.exception("The automatic pass for image %s failed", state.image_id)
        finally:
            state.done = True
            state.finished.set()
