"""Data routes: the live local book, and the newest stored ticks, signals and data gaps.

Every stored-row query runs on the API engine, whose connections carry a statement timeout
(lock waits included) and whose pool wait is bounded: a slow or blocked database answers 503 with
the reason instead of holding the request.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import Select, select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from depthflow.api.deps import ServiceDep
from depthflow.service import Service
from depthflow.storage.models import DataGap, PriceTick, TradingSignal

__all__ = ["newest_query", "router"]

router = APIRouter(tags=["data"])

Limit = Annotated[int, Query(ge=1, le=1000, description="Rows to return, newest first")]
SymbolFilter = Annotated[
    str | None, Query(max_length=30, pattern=r"^[A-Za-z0-9]+$", description="e.g. btcusdt")
]


class Book(BaseModel):
    symbol: str
    last_update_id: int | None
    bids: list[tuple[float, float]]
    asks: list[tuple[float, float]]


class Tick(BaseModel):
    id: int
    symbol: str
    event_time: datetime
    received_at: datetime
    first_update_id: int
    last_update_id: int
    best_bid: float
    best_bid_qty: float
    best_ask: float
    best_ask_qty: float
    wap: float


class Gap(BaseModel):
    id: int
    symbol: str
    from_update_id: int
    to_update_id: int
    from_time: datetime | None
    to_time: datetime | None
    reason: str
    detected_at: datetime


class Signal(BaseModel):
    id: int
    symbol: str
    signal: str
    price: float
    sma_short: float
    sma_long: float
    event_time: datetime
    last_update_id: int
    created_at: datetime


@router.get("/book/{symbol}", response_model=Book, responses={404: {"description": "Unknown"}})
async def book(
    symbol: str, service: ServiceDep, depth: Annotated[int, Query(ge=1, le=5000)] = 10
) -> Book:
    """The live local order book, best levels first."""
    sync = service.pipeline.syncs.get(symbol.upper())
    if sync is None:
        raise HTTPException(404, f"symbol {symbol!r} is not configured")
    bids, asks = sync.book.top(depth)
    return Book(
        symbol=sync.symbol,
        last_update_id=sync.last_update_id,
        bids=[(p, q) for p, q in bids],
        asks=[(p, q) for p, q in asks],
    )


_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "Database unavailable, busy, or the query exceeded its timeout"}
}
# SQLSTATE query_canceled: the statement timeout fired (or an operator cancelled the query).
_QUERY_CANCELED = "57014"

# The time column each table is listed by, newest first; all three have a (symbol, column) index.
_NEWEST_BY = {"price_ticks": "event_time", "trading_signals": "event_time", "data_gaps": "to_time"}
Listed = type[PriceTick] | type[TradingSignal] | type[DataGap]


@router.get("/ticks", response_model=list[Tick], responses=_UNAVAILABLE)
async def ticks(service: ServiceDep, symbol: SymbolFilter = None, limit: Limit = 100) -> list[Tick]:
    """The newest stored ticks first (by event time)."""
    rows = await _fetch(service, newest_query(PriceTick, symbol, limit))
    return [Tick.model_validate(row) for row in rows]


@router.get("/signals", response_model=list[Signal], responses=_UNAVAILABLE)
async def signals(
    service: ServiceDep, symbol: SymbolFilter = None, limit: Limit = 100
) -> list[Signal]:
    """The newest stored signals first (by event time)."""
    rows = await _fetch(service, newest_query(TradingSignal, symbol, limit))
    return [Signal.model_validate(row) for row in rows]


@router.get("/gaps", response_model=list[Gap], responses=_UNAVAILABLE)
async def gaps(service: ServiceDep, symbol: SymbolFilter = None, limit: Limit = 100) -> list[Gap]:
    """The newest recorded holes in the stored sequences first (by the event time after them)."""
    rows = await _fetch(service, newest_query(DataGap, symbol, limit))
    return [Gap.model_validate(row) for row in rows]


def newest_query(model: Listed, symbol: str | None, limit: int) -> Select[Any]:
    """``SELECT * ... [WHERE symbol = ?] ORDER BY <time> DESC, id DESC LIMIT ?``.

    Ordered by time rather than id so that both forms walk an index backwards and stop after
    `limit` rows: ``(symbol, <time>)`` with a symbol, ``(<time>)`` without (ticks and signals;
    the gaps table stays small). Ids only break ties.
    """
    table = model.__table__
    time_column = table.c[_NEWEST_BY[model.__tablename__]]
    query = select(table).order_by(time_column.desc(), table.c.id.desc()).limit(limit)
    if symbol:
        query = query.where(table.c.symbol == symbol.upper())
    return query


async def _fetch(service: Service, query: Select[Any]) -> list[dict[str, Any]]:
    try:
        async with service.engine.connect() as conn:
            result = await conn.execute(query)
            return [dict(row) for row in result.mappings()]
    except PoolTimeoutError as exc:
        raise HTTPException(503, "database busy: no free connection in the pool") from exc
    except DBAPIError as exc:
        if _query_cancelled(exc):
            raise HTTPException(
                503, "query cancelled: it exceeded the API statement timeout"
            ) from exc
        raise HTTPException(503, f"database unavailable: {type(exc).__name__}") from exc
    except (OSError, SQLAlchemyError) as exc:
        raise HTTPException(503, f"database unavailable: {type(exc).__name__}") from exc


def _query_cancelled(exc: DBAPIError) -> bool:
    orig = exc.orig
    return getattr(orig, "sqlstate", None) == _QUERY_CANCELED or isinstance(
        getattr(orig, "__cause__", None), asyncpg.QueryCanceledError
    )
