"""Event-loop lag: how late a short timer fires, the cost every route and task pays.

Every connection, the writer and the HTTP routes share one loop; a stretch of synchronous work
anywhere delays them all. `LoopLag.run` sleeps `interval_s` at a time and records how much later
than asked it woke; `recent_max` is what a person checks first when `/health` is slow.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Final

__all__ = ["LoopLag"]

_WINDOW_S: Final = 60.0


class LoopLag:
    """Samples the running loop's lag; the last sample and the maximum over the last minute."""

    def __init__(self, interval_s: float = 0.02, window_s: float = _WINDOW_S) -> None:
        self.interval_s = interval_s
        self._window_s = window_s
        self.last_s = 0.0
        self.max_s = 0.0  # since start
        self.samples = 0
        # (monotonic time, lag) of samples that were the largest of their tail: a monotone
        # queue, so the window's maximum is its head and each sample costs O(1) amortised.
        self._peaks: deque[tuple[float, float]] = deque()

    def observe(self, lag_s: float, now: float | None = None) -> None:
        """Record one sample (seconds late)."""
        now = time.monotonic() if now is None else now
        lag_s = max(0.0, lag_s)
        self.last_s = lag_s
        self.max_s = max(self.max_s, lag_s)
        self.samples += 1
        peaks = self._peaks
        while peaks and peaks[-1][1] <= lag_s:
            peaks.pop()
        peaks.append((now, lag_s))
        self._expire(now)

    def recent_max(self, now: float | None = None) -> float:
        """The largest lag seen in the last `window_s` seconds (0.0 if none)."""
        self._expire(time.monotonic() if now is None else now)
        return self._peaks[0][1] if self._peaks else 0.0

    def _expire(self, now: float) -> None:
        peaks = self._peaks
        while peaks and peaks[0][0] < now - self._window_s:
            peaks.popleft()

    async def run(self) -> None:
        """Sample forever (cancel to stop)."""
        interval = self.interval_s
        while True:
            asked = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.observe(now - asked - interval, now)
