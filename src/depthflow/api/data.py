"""Data routes: the live local book, and the newest stored ticks and signals."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import FromClause, select
from sqlalchemy.exc import SQLAlchemyError

from depthflow.api.deps import ServiceDep
from depthflow.service import Service
from depthflow.storage.models import PriceTick, TradingSignal

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


@router.get(
    "/ticks", response_model=list[Tick], responses={503: {"description": "Database unavailable"}}
)
async def ticks(service: ServiceDep, symbol: SymbolFilter = None, limit: Limit = 100) -> list[Tick]:
    """The newest stored ticks first."""
    rows = await _newest(service, PriceTick.__table__, symbol, limit)
    return [Tick.model_validate(row) for row in rows]


@router.get(
    "/signals",
    response_model=list[Signal],
    responses={503: {"description": "Database unavailable"}},
)
async def signals(
    service: ServiceDep, symbol: SymbolFilter = None, limit: Limit = 100
) -> list[Signal]:
    """The newest stored signals first."""
    rows = await _newest(service, TradingSignal.__table__, symbol, limit)
    return [Signal.model_validate(row) for row in rows]


async def _newest(
    service: Service, table: FromClause, symbol: str | None, limit: int
) -> list[dict[str, Any]]:
    query = select(table).order_by(table.c.id.desc()).limit(limit)
    if symbol:
        query = query.where(table.c.symbol == symbol.upper())
    try:
        async with service.engine.connect() as conn:
            result = await conn.execute(query)
    except (OSError, SQLAlchemyError) as exc:
        raise HTTPException(503, f"database unavailable: {type(exc).__name__}") from exc
    return [dict(row) for row in result.mappings()]
