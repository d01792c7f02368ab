"""Event-loop lag: how late a short timer fires, the cost every route and task pays.

Every connection, the writer and the HTTP routes share one loop; a stretch of synchronous work
anywhere delays them all. `LoopLag.run` sleeps `interval_s` at a time and records how much later
than asked it woke; `recent_max` is what a person checks first when `/health` is slow.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections import deque
from typing import Final

__all__ = ["LoopLag"]

log = logging.getLogger(__name__)

_WINDOW_S: Final = 60.0
# Frames of the stalled stack kept in the log line (innermost last).
_STACK_FRAMES: Final = 12


class LoopLag:
    """Samples the running loop's lag; the last sample and the maximum over the last minute."""

    def __init__(
        self,
        interval_s: float = 0.02,
        window_s: float = _WINDOW_S,
        stall_report_s: float | None = None,
    ) -> None:
        self.interval_s = interval_s
        # With `stall_report_s`, a watchdog thread logs the loop thread's stack whenever the
        # loop has not run for that long: the stretch of code to blame, caught in the act.
        self._stall_report_s = stall_report_s
        self._beat = time.monotonic()
        self._loop_thread: int | None = None
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
        self._loop_thread = threading.get_ident()
        self._beat = time.monotonic()
        done = threading.Event()
        if self._stall_report_s is not None:
            threading.Thread(
                target=self._watch,
                args=(self._stall_report_s, done),
                daemon=True,
                name="depthflow-loop-watchdog",
            ).start()
        try:
            while True:
                asked = time.monotonic()
                await asyncio.sleep(interval)
                now = self._beat = time.monotonic()
                self.observe(now - asked - interval, now)
        finally:
            done.set()

    def _watch(self, threshold_s: float, done: threading.Event) -> None:
        reported = 0.0  # the beat already reported: one line per stall
        while not done.wait(threshold_s / 4):
            beat = self._beat
            if beat == reported or time.monotonic() - beat < threshold_s:
                continue
            reported = beat
            frame = sys._current_frames().get(self._loop_thread or 0)
            stack = traceback.format_stack(frame, limit=_STACK_FRAMES) if frame else []
            log.warning(
                "event_loop_stalled",
                extra={
                    "fields": {
                        "stalled_s": round(time.monotonic() - beat, 3),
                        "stack": [line.strip().replace("\n", " | ") for line in stack],
                    }
                },
            )
