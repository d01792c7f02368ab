"""Table definitions of the product contract (SPEC.md "Storage"), plus the writer's batch markers.

Column order after ``id`` matches `depthflow.records` so rows can be COPYed as plain tuples. The
schema itself is created only by the Alembic migrations; these models are their reference and the
``target_metadata`` for autogenerate diffs.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Double,
    Identity,
    Index,
    Integer,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "BookCheckpoint",
    "DataGap",
    "IngestBatch",
    "Order",
    "PriceTick",
    "Run",
    "TradingSignal",
]

TIMESTAMPTZ = DateTime(timezone=True)
# Range-partitioned on event_time (see `depthflow.storage.partitions`).
PARTITIONED = {"postgresql_partition_by": "RANGE (event_time)"}


class Base(DeclarativeBase):
    pass


class PriceTick(Base):
    """One row per applied depth event whose book has both sides: level-1 prices and the WAP."""

    __tablename__ = "price_ticks"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    symbol: Mapped[str] = mapped_column(Text)
    # Part of the key: PostgreSQL requires a partitioned table's key to hold its partition key.
    event_time: Mapped[datetime] = mapped_column(TIMESTAMPTZ, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ)
    first_update_id: Mapped[int] = mapped_column(BigInteger)
    last_update_id: Mapped[int] = mapped_column(BigInteger)
    best_bid: Mapped[float] = mapped_column(Double)
    best_bid_qty: Mapped[float] = mapped_column(Double)
    best_ask: Mapped[float] = mapped_column(Double)
    best_ask_qty: Mapped[float] = mapped_column(Double)
    wap: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        Index("ix_price_ticks_symbol_event_time", "symbol", "event_time"),
        Index("ix_price_ticks_symbol_last_update_id", "symbol", "last_update_id"),
        Index("ix_price_ticks_event_time", "event_time"),
        PARTITIONED,
    )


class Order(Base):
    """Every price level of every applied depth event (quantity 0 = level removed)."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    symbol: Mapped[str] = mapped_column(Text)
    # Part of the key: PostgreSQL requires a partitioned table's key to hold its partition key.
    event_time: Mapped[datetime] = mapped_column(TIMESTAMPTZ, primary_key=True)
    last_update_id: Mapped[int] = mapped_column(BigInteger)
    side: Mapped[str] = mapped_column(Text)
    price: Mapped[float] = mapped_column(Double)
    quantity: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_orders_symbol_event_time", "symbol", "event_time"), PARTITIONED)


class TradingSignal(Base):
    """An ``open``/``close`` signal from an SMA crossover, priced at the tick's WAP."""

    __tablename__ = "trading_signals"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    symbol: Mapped[str] = mapped_column(Text)
    signal: Mapped[str] = mapped_column(Text)
    price: Mapped[float] = mapped_column(Double)
    sma_short: Mapped[float] = mapped_column(Double)
    sma_long: Mapped[float] = mapped_column(Double)
    # Part of the key: PostgreSQL requires a partitioned table's key to hold its partition key.
    event_time: Mapped[datetime] = mapped_column(TIMESTAMPTZ, primary_key=True)
    last_update_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now())

    __table_args__ = (
        Index("ix_trading_signals_symbol_event_time", "symbol", "event_time"),
        Index("ix_trading_signals_event_time", "event_time"),
        PARTITIONED,
    )


class DataGap(Base):
    """A hole in a symbol's stored sequence: update ids no stored tick covers, and why.

    With the ticks it covers the update-id range from a symbol's first stored tick to its last
    without overlap; ``from_time``/``to_time`` are the event times of the stored ticks around it.
    """

    __tablename__ = "data_gaps"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    symbol: Mapped[str] = mapped_column(Text)
    from_update_id: Mapped[int] = mapped_column(BigInteger)
    to_update_id: Mapped[int] = mapped_column(BigInteger)
    from_time: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ, nullable=True)
    to_time: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ, nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    detected_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now())

    __table_args__ = (
        Index("ix_data_gaps_symbol_to_time", "symbol", "to_time"),
        Index("ix_data_gaps_symbol_to_update_id", "symbol", "to_update_id"),
    )


class BookCheckpoint(Base):
    """The whole local book of a symbol after the event ``last_update_id``: written when a book
    goes live and every ``CHECKPOINT_INTERVAL_S``. With the ``orders`` rows after it, it rebuilds
    the book at any later instant up to the next hole in the stored sequence."""

    __tablename__ = "book_checkpoints"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    symbol: Mapped[str] = mapped_column(Text)
    # Part of the key: PostgreSQL requires a partitioned table's key to hold its partition key.
    event_time: Mapped[datetime] = mapped_column(TIMESTAMPTZ, primary_key=True)
    last_update_id: Mapped[int] = mapped_column(BigInteger)
    # [[price, qty], ...] best first: a 2-D array, as /book answers.
    bids: Mapped[list[list[float]]] = mapped_column(ARRAY(Double, dimensions=2))
    asks: Mapped[list[list[float]]] = mapped_column(ARRAY(Double, dimensions=2))

    __table_args__ = (
        Index("ix_book_checkpoints_symbol_event_time", "symbol", "event_time"),
        Index("ix_book_checkpoints_symbol_last_update_id", "symbol", "last_update_id"),
        PARTITIONED,
    )


class Run(Base):
    """One ingesting process or replay: where its rows came from and which it wrote.

    A stored row (symbol, last_update_id) belongs to the run whose ``update_ids`` range of that
    symbol holds it; ``update_ids`` is ``{"BTCUSDT": [first, last], ...}``, refreshed while the
    run goes on (`last_seen_at`), so a run killed mid-way keeps what it had written by then.
    """

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text)  # live | file
    file_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    file_sha256: Mapped[str | None] = mapped_column(Text, nullable=True)
    symbols: Mapped[list[str]] = mapped_column(ARRAY(Text))
    status: Mapped[str] = mapped_column(Text)  # running | completed | failed | crashed
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now())
    ended_at: Mapped[datetime | None] = mapped_column(TIMESTAMPTZ, nullable=True)
    update_ids: Mapped[dict[str, list[int]]] = mapped_column(JSONB, server_default="{}")

    __table_args__ = (
        Index("ix_runs_started_at", "started_at"),
        Index("ix_runs_file_sha256", "file_sha256"),
    )


class IngestBatch(Base):
    """One marker per committed writer batch, written in the same transaction as its rows.

    A retried batch whose marker exists was already committed (only the acknowledgement was lost),
    so its rows are not written twice.
    """

    __tablename__ = "ingest_batches"

    batch_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    rows: Mapped[int] = mapped_column(Integer)
    written_at: Mapped[datetime] = mapped_column(TIMESTAMPTZ, server_default=func.now())
