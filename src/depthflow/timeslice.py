"""Cooperative time slices: long synchronous work hands the event loop back every few ms.

Every route, the writer and every connection share one event loop, so how long a request waits
is the sum of what the tasks ahead of it run without an ``await`` that suspends. A websocket
with frames queued never suspends on ``recv`` and a replayed sync buffer has no ``await`` at
all; each such loop asks a `TimeSlice` after every unit of work and yields once the slice is
used up. Loops may share one (the feed's connections and replays do): then a loop turn runs
about one slice of that work in all, however many connections have frames queued.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

__all__ = ["DEFAULT_SLICE_S", "TimeSlice"]

# A request waits about one slice per step it takes through the loop.
DEFAULT_SLICE_S: Final = 0.002


class TimeSlice:
    """How long its tasks have run since one of them last yielded, and a yield when due."""

    __slots__ = ("_since", "_slice_s")

    def __init__(self, slice_s: float = DEFAULT_SLICE_S) -> None:
        self._slice_s = slice_s
        self._since = time.monotonic()

    def due(self) -> bool:
        """True once this slice is used up."""
        return time.monotonic() - self._since >= self._slice_s

    async def pause(self) -> None:
        """Let every other ready task run once, then start a new slice."""
        await asyncio.sleep(0)
        self._since = time.monotonic()

    async def pause_if_due(self) -> None:
        if self.due():
            await self.pause()
