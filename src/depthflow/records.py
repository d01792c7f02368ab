"""Row shapes handed to the writer: plain tuples in table column order (cheap to build and COPY)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Final, overload

TickRow = tuple[str, datetime, datetime, int, int, float, float, float, float, float]
OrderRow = tuple[str, datetime, int, str, float, float]
SignalRow = tuple[str, str, float, float, float, datetime, int]
# symbol, from_update_id, to_update_id, from_time, to_time, reason
GapRow = tuple[str, int, int, datetime | None, datetime | None, str]
# symbol, event_time, last_update_id, bids, asks: the whole local book, [[price, qty], ...] best
# first, after the event with that update id.
CheckpointRow = tuple[str, datetime, int, list[list[float]], list[list[float]]]


class EventOrders(Sequence[OrderRow]):
    """One applied event's `orders` rows, held as the event's levels (bids, then asks).

    Read as a sequence it is the `OrderRow` tuples; the writer encodes COPY straight from the
    levels (`depthflow.storage.copy_orders`), so the hot path builds no tuple per level.
    """

    __slots__ = ("asks", "bids", "event_time", "last_update_id", "symbol")

    def __init__(
        self,
        symbol: str,
        event_time: datetime,
        last_update_id: int,
        bids: Sequence[tuple[float, float]],
        asks: Sequence[tuple[float, float]],
    ) -> None:
        self.symbol = symbol
        self.event_time = event_time
        self.last_update_id = last_update_id
        self.bids = bids
        self.asks = asks

    @classmethod
    def of_row(cls, row: OrderRow) -> EventOrders:
        """One row on its own; ValueError for a side other than ``bid`` or ``ask``."""
        symbol, event_time, last_update_id, side, price, quantity = row
        if side not in ("bid", "ask"):
            raise ValueError(f"order side {side!r}")
        level = [(price, quantity)]
        return cls(
            symbol, event_time, last_update_id, *((level, []) if side == "bid" else ([], level))
        )

    def __len__(self) -> int:
        return len(self.bids) + len(self.asks)

    def __iter__(self) -> Iterator[OrderRow]:
        head = (self.symbol, self.event_time, self.last_update_id)
        for price, quantity in self.bids:
            yield (*head, "bid", price, quantity)
        for price, quantity in self.asks:
            yield (*head, "ask", price, quantity)

    @overload
    def __getitem__(self, index: int) -> OrderRow: ...
    @overload
    def __getitem__(self, index: slice) -> list[OrderRow]: ...
    def __getitem__(self, index: int | slice) -> OrderRow | list[OrderRow]:
        return list(self)[index]

    def __repr__(self) -> str:
        return f"EventOrders({list(self)!r})"


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
