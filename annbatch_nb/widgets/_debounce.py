"""Trailing-edge debouncing of a callback (coalesces bursts of slider moves into one redraw)."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Debouncer:
    """Call ``fn`` once, ``delay`` seconds after the last of a burst of calls, in a timer thread.

    With ``delay <= 0`` every call runs ``fn`` at once, in the calling thread (what tests use).

    Parameters
    ----------
    fn
        The function to call (no arguments).
    delay
        Quiet time in seconds.
    """

    def __init__(self, fn: Callable[[], None], delay: float) -> None:
        self.fn = fn
        self.delay = float(delay)
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        """Whether a call is waiting for its quiet time."""
        return self._timer is not None

    def __call__(self) -> None:
        if self.delay <= 0:
            self.fn()
            return
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.delay, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            self._timer = None
        self.fn()

    def flush(self) -> None:
        """Run a pending call now (in this thread), if there is one."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            self.fn()

    def cancel(self) -> None:
        """Drop a pending call."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
