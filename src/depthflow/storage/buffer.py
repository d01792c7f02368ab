"""The writer's memory: rows queued per table, and the batches taken from them until they commit.

No I/O and no limits: `BatchWriter` decides what to admit, when to write and when a batch is done.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Final, Generic, TypeVar

from depthflow.records import CheckpointRow, EventOrders, GapRow, OrderRow, SignalRow, TickRow
from depthflow.storage.batches import Batch

__all__ = ["CHUNK_ROWS", "ChunkedRows", "RowBuffer"]

_T = TypeVar("_T")

CHUNK_ROWS: Final = 4_096


class RowBuffer:
    """Rows held in memory, not yet known to be committed: queued ones and the batches in flight
    (taken, oldest first; they commit in that order)."""

    def __init__(self) -> None:
        self._ticks: ChunkedRows[TickRow] = ChunkedRows()
        self._orders = _EventQueue()
        self._signals: ChunkedRows[SignalRow] = ChunkedRows()
        self._gaps: list[GapRow] = []
        self._checkpoints: list[CheckpointRow] = []
        self.queued = 0  # rows in the five queues above
        self.oldest = 0.0  # monotonic arrival time of the oldest queued row
        # Taken from the lists, not yet known committed, oldest first.
        self.inflight: deque[Batch] = deque()
        self._inflight_rows = 0

    @property
    def held(self) -> int:
        """Queued rows plus those of the batches in flight (all tables)."""
        return self.queued + self._inflight_rows

    def add_event(self, tick: TickRow | None, orders: Sequence[OrderRow]) -> None:
        """Queue one depth event's rows: ``orders`` is the pipeline's `EventOrders`, or plain
        rows (ValueError, before anything is queued, for one that no `EventOrders` holds)."""
        blocks = (
            [orders]
            if isinstance(orders, EventOrders)
            else [EventOrders.of_row(row) for row in orders]
        )
        self._count(len(orders) + (tick is not None))
        if tick is not None:
            self._ticks.append(tick)
        for block in blocks:
            self._orders.append(block)

    def add_signal(self, row: SignalRow) -> None:
        """Queue one signal row."""
        self._count(1)
        self._signals.append(row)

    def add_gap(self, row: GapRow) -> None:
        """Queue one data-gap row."""
        self._count(1)
        self._gaps.append(row)

    def add_checkpoint(self, row: CheckpointRow) -> None:
        """Queue one book checkpoint."""
        self._count(1)
        self._checkpoints.append(row)

    def _count(self, n: int) -> None:
        if n and not self.queued:
            self.oldest = time.monotonic()
        self.queued += n

    def due_in(self, max_rows: int, max_delay_s: float) -> float | None:
        """Seconds until a batch is due (0 or less: now); None while nothing is held."""
        if self.inflight or self.queued >= max_rows:
            return 0.0
        if not self.queued:
            return None
        return self.oldest + max_delay_s - time.monotonic()

    def take(self, n: int) -> Batch | None:
        """Move about ``n`` queued rows per table (orders: whole events) into a new batch in flight
        (the newest); None if none are queued."""
        if not self.queued:
            return None
        ticks = self._ticks.take(n)
        orders = self._orders.take(n)
        signals = self._signals.take(n)
        # Every queued gap goes with the first batch: it may only precede the ticks after it.
        gaps, self._gaps = self._gaps, []
        # Checkpoints too: each stands alone (rebuilds read the orders after it, whenever stored).
        checkpoints, self._checkpoints = self._checkpoints, []
        batch = Batch(uuid.uuid4(), ticks, orders, signals, gaps, checkpoints)
        # Rows left queued keep `oldest`: conservative, their flush can come early but never late.
        self.queued -= batch.rows
        self.inflight.append(batch)
        self._inflight_rows += batch.rows
        return batch

    def release(self, batch: Batch) -> int:
        """Forget the oldest batch in flight, ``batch`` (committed or given up); the rows it held.

        Batches commit in the order they were taken, so only the oldest can be done."""
        if not self.inflight or self.inflight[0] is not batch:
            raise ValueError("only the oldest batch in flight can be released")
        self.inflight.popleft()
        self._inflight_rows -= batch.rows
        return batch.rows

    def add_gaps_first(self, rows: Sequence[GapRow]) -> None:
        """Queue gap rows ahead of every tick not yet committed: into the oldest batch in flight
        if there is one (it has not committed: batches commit in order), else the queue."""
        if not self.inflight:
            for row in rows:
                self.add_gap(row)
            return
        self.inflight[0].gaps.extend(rows)
        self._inflight_rows += len(rows)


class _EventQueue:
    """Events' order rows, oldest first, one `EventOrders` block per event, taken whole."""

    __slots__ = ("_blocks", "rows")

    def __init__(self) -> None:
        self._blocks: deque[EventOrders] = deque()
        self.rows = 0

    def append(self, block: EventOrders) -> None:
        if block:
            self._blocks.append(block)
            self.rows += len(block)

    def take(self, n: int) -> list[EventOrders]:
        """The oldest blocks holding about ``n`` rows (whole events: the last may go past it)."""
        blocks = self._blocks
        taken: list[EventOrders] = []
        rows = 0
        while blocks and rows < n:
            block = blocks.popleft()
            taken.append(block)
            rows += len(block)
        self.rows -= rows
        return taken


class ChunkedRows(Generic[_T]):
    """A FIFO of rows kept in lists of about `CHUNK_ROWS`: taking from the front never copies
    the rest. (One big list re-sliced per batch is a new young object each time, and CPython's
    collector traverses every element of it at each generation-0 collection: ~20 ms per million
    rows held, many times a second while the database is behind.)"""

    __slots__ = ("_chunks", "_len")

    def __init__(self) -> None:
        self._chunks: deque[list[_T]] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, row: _T) -> None:
        self.extend((row,))

    def extend(self, rows: Sequence[_T]) -> None:
        if not rows:
            return
        chunks = self._chunks
        if chunks and len(chunks[-1]) < CHUNK_ROWS:
            chunks[-1].extend(rows)
        else:
            chunks.append(list(rows))
        self._len += len(rows)

    def take(self, n: int) -> list[_T]:
        """Remove and return the oldest ``n`` rows (fewer if fewer are held), in order."""
        chunks = self._chunks
        if len(chunks) == 1 and self._len <= n:
            taken = chunks.popleft()  # the common case: hand the one list over as is
        else:
            taken = []
            while chunks and len(taken) < n:
                head = chunks[0]
                room = n - len(taken)
                if len(head) <= room:
                    taken.extend(chunks.popleft())
                else:
                    taken.extend(head[:room])
                    chunks[0] = head[room:]
        self._len -= len(taken)
        return taken
