"""Stored-data queries behind ``GET /book/{symbol}?at=``: the checkpoint at or before an instant,
the ``orders`` rows after it, and the hole, if any, that makes the book there unknowable."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from depthflow.accounting import GapReason
from depthflow.book_history import PastBook, replay_levels

__all__ = ["Hole", "NoCheckpoint", "book_at"]


@dataclass(frozen=True, slots=True)
class NoCheckpoint:
    """Nothing stored for the symbol at or before the instant."""

    symbol: str


@dataclass(frozen=True, slots=True)
class Hole:
    """A recorded gap between the checkpoint and the instant: levels were not stored there."""

    symbol: str
    from_update_id: int
    to_update_id: int
    reason: str


_CHECKPOINT_BY_ID = text(
    "SELECT last_update_id, event_time, bids, asks FROM book_checkpoints "
    "WHERE symbol = :symbol AND last_update_id <= :at "
    "ORDER BY last_update_id DESC LIMIT 1"
)
_CHECKPOINT_BY_TIME = text(
    "SELECT last_update_id, event_time, bids, asks FROM book_checkpoints "
    "WHERE symbol = :symbol AND event_time <= :at "
    "ORDER BY event_time DESC, last_update_id DESC LIMIT 1"
)
# event_time >= the checkpoint's bounds the scan on the (symbol, event_time) index: an event
# after the checkpoint's is never older than it.
_UPDATES_BY_ID = text(
    "SELECT side, price, quantity, last_update_id, event_time FROM orders "
    "WHERE symbol = :symbol AND event_time >= :since AND last_update_id > :after "
    "AND last_update_id <= :at ORDER BY last_update_id, id"
)
_UPDATES_BY_TIME = text(
    "SELECT side, price, quantity, last_update_id, event_time FROM orders "
    "WHERE symbol = :symbol AND event_time >= :since AND event_time <= :at "
    "AND last_update_id > :after ORDER BY last_update_id, id"
)
# A hole whose update ids meet (checkpoint, instant]. Applied events that gave no tick still
# stored their levels: that kind of hole does not hide the book.
_HOLE_BY_ID = text(
    "SELECT from_update_id, to_update_id, reason FROM data_gaps "
    "WHERE symbol = :symbol AND reason <> :no_tick AND to_update_id > :after "
    "AND from_update_id <= :at ORDER BY from_update_id LIMIT 1"
)
# By time the instant's update id is unknown past the last stored event: a hole that began
# (after the stored event at from_time) by then may hold events before it.
_HOLE_BY_TIME = text(
    "SELECT from_update_id, to_update_id, reason FROM data_gaps "
    "WHERE symbol = :symbol AND reason <> :no_tick AND to_update_id > :after "
    "AND (from_update_id <= :last_id OR from_time <= :at) ORDER BY from_update_id LIMIT 1"
)


async def book_at(
    conn: AsyncConnection, symbol: str, at: int | datetime
) -> PastBook | Hole | NoCheckpoint:
    """The stored book of ``symbol`` after the last event at or before ``at`` (an update id or
    an event time)."""
    symbol = symbol.upper()
    by_id = isinstance(at, int)
    checkpoint = (
        await conn.execute(
            _CHECKPOINT_BY_ID if by_id else _CHECKPOINT_BY_TIME, {"symbol": symbol, "at": at}
        )
    ).first()
    if checkpoint is None:
        return NoCheckpoint(symbol)
    after, since = checkpoint.last_update_id, checkpoint.event_time
    params: dict[str, Any] = {"symbol": symbol, "since": since, "after": after, "at": at}
    rows = (await conn.execute(_UPDATES_BY_ID if by_id else _UPDATES_BY_TIME, params)).all()
    last_id, event_time = (rows[-1][3], rows[-1][4]) if rows else (after, since)
    params.update(no_tick=GapReason.NO_TICK.value, last_id=last_id)
    hole = (await conn.execute(_HOLE_BY_ID if by_id else _HOLE_BY_TIME, params)).first()
    if hole is not None:
        return Hole(symbol, hole.from_update_id, hole.to_update_id, hole.reason)
    bids, asks = replay_levels(checkpoint.bids, checkpoint.asks, ((r[0], r[1], r[2]) for r in rows))
    return PastBook(symbol, last_id, event_time, bids, asks)
