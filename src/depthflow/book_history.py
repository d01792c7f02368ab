"""The book at a past instant, from what is stored: a checkpoint, then the level updates after it.

Pure: the caller fetches the checkpoint, the ``orders`` rows and any hole in between
(`depthflow.storage.book_at`) and hands them in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from heapq import nlargest, nsmallest

__all__ = ["LevelUpdate", "PastBook", "parse_at", "replay_levels"]

# (side, price, quantity) of one stored ``orders`` row, in stored order; quantity 0 removes.
LevelUpdate = tuple[str, float, float]


@dataclass(frozen=True, slots=True)
class PastBook:
    """Both sides of a symbol's book after the event ``last_update_id``."""

    symbol: str
    last_update_id: int
    event_time: datetime
    bids: dict[float, float]
    asks: dict[float, float]

    def top(self, depth: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Up to ``depth`` levels a side, best first."""
        return (
            [(price, self.bids[price]) for price in nlargest(depth, self.bids)],
            [(price, self.asks[price]) for price in nsmallest(depth, self.asks)],
        )


def replay_levels(
    bids: Iterable[Iterable[float]],
    asks: Iterable[Iterable[float]],
    updates: Iterable[LevelUpdate],
) -> tuple[dict[float, float], dict[float, float]]:
    """A checkpoint's ``[[price, qty], ...]`` sides with ``updates`` applied in order."""
    sides: dict[str, dict[float, float]] = {
        "bid": {price: qty for price, qty in bids},
        "ask": {price: qty for price, qty in asks},
    }
    for side, price, qty in updates:
        levels = sides[side]
        if qty:
            levels[price] = qty
        else:
            levels.pop(price, None)
    return sides["bid"], sides["ask"]


def parse_at(value: str) -> int | datetime:
    """``at=`` of ``GET /book/{symbol}``: an update id (digits) or an ISO-8601 time with a zone.

    Raises ValueError with a message fit for the client.
    """
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"at={value!r} is neither an update id nor an ISO-8601 time (e.g. 2024-08-08T23:59:30Z)"
        ) from None
    if moment.tzinfo is None:
        raise ValueError(f"at={value!r} has no time zone (add Z or +00:00)")
    return moment
