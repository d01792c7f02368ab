"""Row shapes handed to the writer: plain tuples in table column order (cheap to build and COPY)."""

from __future__ import annotations

from datetime import datetime
from typing import Final

TickRow = tuple[str, datetime, datetime, int, int, float, float, float, float, float]
OrderRow = tuple[str, datetime, int, str, float, float]
SignalRow = tuple[str, str, float, float, float, datetime, int]
# symbol, from_update_id, to_update_id, from_time, to_time, reason
GapRow = tuple[str, int, int, datetime | None, datetime | None, str]
# symbol, event_time, last_update_id, bids, asks: the whole local book, [[price, qty], ...] best
# first, after the event with that update id.
CheckpointRow = tuple[str, datetime, int, list[list[float]], list[list[float]]]

TICK_COLUMNS: Final = (
    "symbol",
    "event_time",
    "received_at",
    "first_update_id",
    "last_update_id",
    "best_bid",
    "best_bid_qty",
    "best_ask",
    "best_ask_qty",
    "wap",
)
ORDER_COLUMNS: Final = ("symbol", "event_time", "last_update_id", "side", "price", "quantity")
SIGNAL_COLUMNS: Final = (
    "symbol",
    "signal",
    "price",
    "sma_short",
    "sma_long",
    "event_time",
    "last_update_id",
)
GAP_COLUMNS: Final = (
    "symbol",
    "from_update_id",
    "to_update_id",
    "from_time",
    "to_time",
    "reason",
)
CHECKPOINT_COLUMNS: Final = ("symbol", "event_time", "last_update_id", "bids", "asks")
