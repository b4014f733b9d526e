"""Abuse limits: a sliding-window rate limiter and a periodic background job (for retention).

Pure bookkeeping, no Gradio and no storage here: Studio decides what is limited and words the
messages; this module only counts. The clock is injectable so tests never sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger("mask_studio")

HOUR = 3600.0


class RateLimiter:
    """At most `limit` events per `window_s` seconds for each key, over a sliding window; 0 = no limit."""

    def __init__(self, limit: int, window_s: float = HOUR, clock: Callable[[], float] = time.monotonic):
        self.limit = int(limit)
        self.window_s = float(window_s)
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._calls = 0

    def hit(self, keys: Iterable[str]) -> tuple[str, float] | None:
        """Count one event for every key; or, if any key is at its limit, count nothing and
        return (that key, seconds until it has room again)."""
        if self.limit <= 0:
            return None
        keys = list(dict.fromkeys(keys))
        with self._lock:
            now = self.clock()
            self._calls += 1
            if self._calls % 1024 == 0:
                self._prune(now)  # keys seen once (an address passing by) must not pile up forever
            for key in keys:
                q = self._recent(key, now)
                if len(q) >= self.limit:
                    return key, max(0.0, q[0] + self.window_s - now)
            for key in keys:
                self._events.setdefault(key, deque()).append(now)
            return None

    def used(self, key: str) -> int:
        """Events counted for `key` within the current window."""
        with self._lock:
            return len(self._recent(key, self.clock()))

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._events.get(key)
        if q is None:
            return deque()
        while q and q[0] <= now - self.window_s:
            q.popleft()
        return q

    def _prune(self, now: float) -> None:
        for key in [k for k, q in self._events.items() if not q or q[-1] <= now - self.window_s]:
            del self._events[key]


def minutes_text(seconds: float) -> str:
    """'12 minutes', '1 minute' (always rounded up, so the promise holds)."""
    minutes = max(1, int(-(-seconds // 60)))
    if minutes >= 120:
        hours = -(-minutes // 60)
        return f"{hours} hours"
    return "1 minute" if minutes == 1 else f"{minutes} minutes"


def run_periodically(fn: Callable[[], object], every_s: float, name: str) -> threading.Event:
    """Call fn every `every_s` seconds in a daemon thread (errors logged, the loop goes on);
    set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                fn()
            except Exception:
                log.exception("%s failed; it will run again in %.0f s", name, every_s)

    threading.Thread(target=loop, name=name, daemon=True).start()
    return stop
