"""The segmenter's health monitor (health.py): never blocks, one check at a time, refreshed when stale."""

import threading

from health import HealthMonitor


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def test_first_answer_arrives_in_the_background_and_is_refreshed_when_stale():
    release, calls, done = threading.Event(), [], threading.Event()

    def check():
        calls.append(1)
        release.wait(5)
        done.set()
        return True, f"ready {len(calls)}"

    clock = Clock()
    monitor = HealthMonitor(check, clock=clock)
    assert monitor.status() is None and monitor.status() is None  # no answer yet; one check running
    release.set()
    assert done.wait(5)
    while monitor.status() is None:
        pass
    assert monitor.status() == (True, "ready 1") and len(calls) == 1
    done.clear()
    clock.t = 31.0  # stale: the old answer is shown while a new one is asked for
    assert monitor.status() == (True, "ready 1")
    assert done.wait(5)
    while monitor.status() == (True, "ready 1"):
        pass
    assert monitor.status() == (True, "ready 2")


def test_a_check_that_raises_is_shown_not_raised():
    def check():
        raise RuntimeError("boom")

    monitor = HealthMonitor(check)
    monitor.status()
    while (answer := monitor.status()) is None:
        pass
    assert answer == (False, "health check failed (RuntimeError)")
