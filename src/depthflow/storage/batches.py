"""One idempotent batch write: a marker insert and the COPY of every table in one transaction.

Each batch carries a uuid recorded in ``ingest_batches`` inside the same transaction as its rows.
A retry re-sends the same batch with the same uuid; the marker insert (``ON CONFLICT DO NOTHING``)
tells whether an earlier attempt committed after all (ack lost with the connection), in which case
the rows are not written again.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import asyncpg
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.records import (
    CHECKPOINT_COLUMNS,
    GAP_COLUMNS,
    ORDER_COLUMNS,
    SIGNAL_COLUMNS,
    TICK_COLUMNS,
    CheckpointRow,
    EventOrders,
    GapRow,
    SignalRow,
    TickRow,
)
from depthflow.storage.copy_orders import encode_orders, once
from depthflow.storage.partitions import KnownSpans, batch_spans, ensure_spans

__all__ = [
    "CHECKPOINTS",
    "COPY_CHUNK_ROWS",
    "GAPS",
    "ORDERS",
    "SIGNALS",
    "TICKS",
    "WRITE_ERRORS",
    "Batch",
    "prepare_partitions",
    "write_batch",
]

TICKS: Final = "price_ticks"
ORDERS: Final = "orders"
SIGNALS: Final = "trading_signals"
GAPS: Final = "data_gaps"
CHECKPOINTS: Final = "book_checkpoints"

# What a write attempt may raise when the database is away, slow or refuses a row.
WRITE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection left mid-protocol by a failed operation ("cannot switch to state 15; another
    # operation (2) is in progress", asyncpg#784, sqlalchemy#13241): seen once here at start-up.
    asyncpg.InternalClientError,
    SQLAlchemyError,
    # asyncpg's encoders raise these for a value that does not fit its column (e.g. bigint).
    OverflowError,
    ValueError,
)
# PostgreSQL error classes about the rows themselves (22 data exception, 23 integrity violation):
# retrying the same batch can never succeed, so after a few tries it is dropped and counted.
_POISON_SQLSTATE_CLASSES: Final = frozenset({"22", "23"})
_POISON_ATTEMPTS: Final = 3

# Rows per COPY statement: ~10 ms of encoding (see `_copy`), well inside the loop's 50 ms budget;
# 2,000 cost five times the round trips (`python -m bench throughput` ran a third slower).
COPY_CHUNK_ROWS: Final = 10_000

_MARK_BATCH = (
    "INSERT INTO ingest_batches (batch_id, rows) VALUES ($1, $2) "
    "ON CONFLICT (batch_id) DO NOTHING RETURNING true"
)


@dataclass(slots=True)
class Batch:
    """Rows of one transaction; kept, with the same id, until it is known to be committed."""

    batch_id: uuid.UUID
    ticks: list[TickRow]
    orders: list[EventOrders]  # one block of rows per event
    signals: list[SignalRow]
    gaps: list[GapRow]
    checkpoints: list[CheckpointRow] = field(default_factory=list)
    poison_failures: int = 0
    # Rows in ``orders``, counted once: a batch is asked its size several times per attempt.
    order_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.order_rows = sum(map(len, self.orders))

    @property
    def rows(self) -> int:
        return sum(count for _, count in self.table_rows())

    def table_rows(self) -> tuple[tuple[str, int], ...]:
        """Each table's name with the number of rows this batch holds for it."""
        return (
            (TICKS, len(self.ticks)),
            (ORDERS, self.order_rows),
            (SIGNALS, len(self.signals)),
            (GAPS, len(self.gaps)),
            (CHECKPOINTS, len(self.checkpoints)),
        )

    def event_times(self) -> tuple[tuple[str, list[datetime]], ...]:
        """Each partitioned table's name with the event times of this batch's rows for it."""
        return (
            (TICKS, [row[1] for row in self.ticks]),
            (ORDERS, [block.event_time for block in self.orders]),
            (SIGNALS, [row[5] for row in self.signals]),
            (CHECKPOINTS, [row[1] for row in self.checkpoints]),
        )

    def rejected_for_good(self, exc: BaseException) -> bool:
        """Count a failed attempt; True once the database refused these very rows often enough."""
        if not _is_poison(exc):
            return False
        self.poison_failures += 1
        return self.poison_failures >= _POISON_ATTEMPTS


async def write_batch(
    engine: AsyncEngine,
    batch: Batch,
    *,
    before_commit: Callable[[], Awaitable[None]] | None = None,
) -> bool:
    """COPY the batch and its marker in one transaction; False if it was committed before.

    ``before_commit`` runs inside the transaction once every row is sent; if it raises, the
    transaction rolls back (how `BatchWriter` keeps concurrent batches committing in order)."""
    async with engine.connect() as conn:
        try:
            raw = await conn.get_raw_connection()
            apg: Any = raw.driver_connection
            async with apg.transaction():
                if await apg.fetchval(_MARK_BATCH, batch.batch_id, batch.rows) is None:
                    return False
                await _copy(apg, TICKS, TICK_COLUMNS, batch.ticks)
                await _copy_orders(apg, batch.orders)
                await _copy(apg, SIGNALS, SIGNAL_COLUMNS, batch.signals)
                # In the same transaction as the ticks after it: a hole is never stored unrecorded.
                await _copy(apg, GAPS, GAP_COLUMNS, batch.gaps)
                # Few rows, but each a whole book (up to thousands of levels): one per COPY.
                await _copy(apg, CHECKPOINTS, CHECKPOINT_COLUMNS, batch.checkpoints, chunk=1)
                if before_commit is not None:
                    await before_commit()
            return True
        except BaseException:
            # The driver connection may be dead or mid-COPY: never hand it back to the pool.
            await conn.invalidate()
            raise


async def prepare_partitions(
    engine: AsyncEngine, batches: Sequence[Batch], spans: KnownSpans
) -> None:
    """Create the time partitions ``batches`` need that are not known to exist yet (a replay of
    an old recording, the first batch after midnight before maintenance ran).

    Run before any of their transactions starts: creating a partition locks its parent table
    against the inserts of a transaction in flight, which may itself be waiting on another
    batch's commit."""
    missing = spans.missing(
        span for batch in batches for span in batch_spans(batch.event_times(), spans.days)
    )
    if not missing:
        return
    async with engine.connect() as conn:
        try:
            raw = await conn.get_raw_connection()
            await ensure_spans(raw.driver_connection, missing)
        except BaseException:
            await conn.invalidate()
            raise
    spans.add(missing)


async def _copy(
    apg: Any, table: str, columns: Sequence[str], rows: list[Any], chunk: int = COPY_CHUNK_ROWS
) -> None:
    # COPY, not executemany INSERT: `python -m bench writer` measured order rows at 206k vs
    # 117k rows/s in 1k-row batches and 278k vs 150k in 10k-row batches (~1.8x; loopback).
    # asyncpg encodes a COPY's rows in one synchronous stretch (~1 us a row): one COPY per
    # chunk hands the event loop back between them, at one round trip per chunk.
    names = list(columns)
    for start in range(0, len(rows), chunk):
        await apg.copy_records_to_table(table, records=rows[start : start + chunk], columns=names)


async def _copy_orders(apg: Any, blocks: list[EventOrders]) -> None:
    # Encoded from the levels by `copy_orders` (~0.2 µs a row against asyncpg's ~1 µs from
    # tuples), in statements of about COPY_CHUNK_ROWS rows: the encoding holds the loop too.
    names = list(ORDER_COLUMNS)
    start = 0
    while start < len(blocks):
        end, rows = start, 0
        while end < len(blocks) and rows < COPY_CHUNK_ROWS:
            rows += len(blocks[end])
            end += 1
        data = encode_orders(blocks[start:end])
        await apg.copy_to_table(ORDERS, source=once(data), columns=names, format="binary")
        start = end


def _is_poison(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        return str(exc.sqlstate)[:2] in _POISON_SQLSTATE_CLASSES
    # asyncpg's client-side DataError (a value it cannot encode) is a ValueError; an integer
    # beyond its column's range is an OverflowError.
    return isinstance(exc, ValueError | OverflowError)
