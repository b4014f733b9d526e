"""The segmenter's health for the status line, never blocking a page: the last answer, refreshed in the background."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Health = tuple[bool, str]  # (ok, a sentence for the status line)


class HealthMonitor:
    """Asks `check` in a background thread when the last answer is older than `max_age_s`; one check at a time."""

    def __init__(self, check: Callable[[], Health], clock: Callable[[], float] = time.monotonic):
        self._check = check
        self._clock = clock
        self._lock = threading.Lock()
        self._last: tuple[float, Health] | None = None  # (when, answer)
        self._running = False

    def status(self, max_age_s: float = 30.0) -> Health | None:
        """The last answer (None before the first one); starts a refresh when it is missing or stale."""
        with self._lock:
            last = self._last
            stale = last is None or self._clock() - last[0] > max_age_s
            if stale and not self._running:
                self._running = True
                threading.Thread(target=self._refresh, daemon=True, name="segmenter health").start()
        return last[1] if last is not None else None

    def _refresh(self) -> None:
        try:
            result = self._check()
        except Exception as exc:  # health() must never raise; if it does, show it, don't crash
            result = (False, f"health check failed ({type(exc).__name__})")
        with self._lock:
            self._last = (self._clock(), result)
            self._running = False
