"""Collecting stand-ins for the writer and the analytics step (pure logic, for unit tests)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from depthflow.records import CheckpointRow, GapRow, OrderRow, TickRow


class Rows:
    """The writer, reduced to what the pipeline hands it."""

    def __init__(self) -> None:
        self.ticks: list[TickRow] = []
        self.orders: list[OrderRow] = []
        self.gaps: list[GapRow] = []
        self.checkpoints: list[CheckpointRow] = []

    def add_event(self, tick: TickRow | None, orders: Sequence[OrderRow]) -> bool:
        if tick is not None:
            self.ticks.append(tick)
        self.orders.extend(orders)
        return True

    def add_gap(self, row: GapRow) -> bool:
        self.gaps.append(row)
        return True

    def add_checkpoint(self, row: CheckpointRow) -> bool:
        self.checkpoints.append(row)
        return True


class Waps:
    """The analytics step, reduced to the ticks it was given."""

    def __init__(self) -> None:
        self.ticks: list[tuple[str, float, datetime, int]] = []

    def add_tick(self, symbol: str, wap: float, event_time: datetime, last_update_id: int) -> None:
        self.ticks.append((symbol, wap, event_time, last_update_id))
