"""The writer's memory: rows queued per table, and the batch taken from them until it commits.

No I/O and no limits: `BatchWriter` decides what to admit, when to write and when a batch is done.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import TypeVar

from depthflow.records import GapRow, OrderRow, SignalRow, TickRow
from depthflow.storage.batches import Batch

__all__ = ["RowBuffer"]

_T = TypeVar("_T")


class RowBuffer:
    """Rows held in memory, not yet known to be committed: queued ones and the pending batch."""

    def __init__(self) -> None:
        self._ticks: list[TickRow] = []
        self._orders: list[OrderRow] = []
        self._signals: list[SignalRow] = []
        self._gaps: list[GapRow] = []
        self.queued = 0  # rows in the three lists above
        self.oldest = 0.0  # monotonic arrival time of the oldest queued row
        self.pending: Batch | None = None  # taken from the lists, not yet known committed
        self._pending_rows = 0

    @property
    def held(self) -> int:
        """Queued rows plus the pending batch's (all tables)."""
        return self.queued + self._pending_rows

    def add_event(self, tick: TickRow | None, orders: Sequence[OrderRow]) -> None:
        """Queue one depth event's rows."""
        self._count(len(orders) + (tick is not None))
        if tick is not None:
            self._ticks.append(tick)
        self._orders.extend(orders)

    def add_signal(self, row: SignalRow) -> None:
        """Queue one signal row."""
        self._count(1)
        self._signals.append(row)

    def add_gap(self, row: GapRow) -> None:
        """Queue one data-gap row."""
        self._count(1)
        self._gaps.append(row)

    def _count(self, n: int) -> None:
        if n and not self.queued:
            self.oldest = time.monotonic()
        self.queued += n

    def due_in(self, max_rows: int, max_delay_s: float) -> float | None:
        """Seconds until a batch is due (0 or less: now); None while nothing is held."""
        if self.pending is not None or self.queued >= max_rows:
            return 0.0
        if not self.queued:
            return None
        return self.oldest + max_delay_s - time.monotonic()

    def take(self, n: int) -> Batch | None:
        """Move up to ``n`` queued rows per table into a new pending batch; None if none queued."""
        if not self.queued:
            return None
        ticks, self._ticks = _split(self._ticks, n)
        orders, self._orders = _split(self._orders, n)
        signals, self._signals = _split(self._signals, n)
        # Every queued gap goes with the first batch: it may only precede the ticks after it.
        gaps, self._gaps = self._gaps, []
        batch = Batch(uuid.uuid4(), ticks, orders, signals, gaps)
        # Rows left queued keep `oldest`: conservative, their flush can come early but never late.
        self.queued -= batch.rows
        self.pending = batch
        self._pending_rows = batch.rows
        return batch

    def release(self) -> int:
        """Forget the pending batch (committed or given up); the rows it held."""
        rows = self._pending_rows
        self.pending = None
        self._pending_rows = 0
        return rows


def _split(rows: list[_T], n: int) -> tuple[list[_T], list[_T]]:
    """The first ``n`` rows and the rest; the common case (all fit) hands over the list as is."""
    if len(rows) <= n:
        return rows, []
    return rows[:n], rows[n:]
