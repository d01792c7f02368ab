"""Binance's REST request weight: what ``GET /api/v3/depth`` costs, and the weight used per minute.

Binance reports the weight an IP used in the last minute on every response, in the
``X-MBX-USED-WEIGHT-1M`` header; the simulator does the same over a rolling minute (it only
reports it: nothing is refused, there are no 429s).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["USED_WEIGHT_HEADER", "UsedWeight", "depth_weight"]

USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
WINDOW_S = 60.0
# (largest limit, weight) of GET /api/v3/depth, as Binance's spot API documents it.
_DEPTH_WEIGHTS = ((100, 5), (500, 25), (1000, 50), (5000, 250))


def depth_weight(limit: int) -> int:
    """The weight of ``GET /api/v3/depth?limit=<limit>``: 5, 25, 50 or 250."""
    for largest, weight in _DEPTH_WEIGHTS:
        if limit <= largest:
            return weight
    return _DEPTH_WEIGHTS[-1][1]  # Binance serves limits above 5000 as 5000


class UsedWeight:
    """Request weight spent per client over the last ``window_s`` seconds (a rolling window)."""

    def __init__(
        self, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window_s = window_s
        self._clock = clock
        self._spent: dict[str, deque[tuple[float, int]]] = {}
        self._totals: dict[str, int] = {}

    def add(self, client: str, weight: int) -> int:
        """Spend ``weight`` for ``client`` now; return its weight used in the last window."""
        now = self._clock()
        spent = self._spent.setdefault(client, deque())
        total = self._totals.get(client, 0)
        horizon = now - self._window_s
        while spent and spent[0][0] <= horizon:
            total -= spent.popleft()[1]
        spent.append((now, weight))
        total += weight
        self._totals[client] = total
        return total
