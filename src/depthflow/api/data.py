"""Data routes: the live local book or a past one, and the newest stored ticks, signals and gaps.

Every stored-row query runs on the API engine, whose connections carry a statement timeout
(lock waits included) and whose pool wait is bounded: a slow or blocked database answers 503 with
the reason instead of holding the request.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query, Response
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from depthflow.api.deps import ServiceDep
from depthflow.api.history import HistoryParams, history_query, next_cursor, page_params
from depthflow.book_history import parse_at
from depthflow.service import Service
from depthflow.storage.book_at import Hole, NoCheckpoint, book_at
from depthflow.storage.models import DataGap, Order, PriceTick, TradingSignal

__all__ = ["newest_query", "router"]

router = APIRouter(tags=["data"])

RowT = TypeVar("RowT", bound=BaseModel)
RequiredSymbol = Annotated[
    str, Query(max_length=30, pattern=r"^[A-Za-z0-9]+$", description="e.g. btcusdt")
]
SymbolFilter = Annotated[
    str | None, Query(max_length=30, pattern=r"^[A-Za-z0-9]+$", description="e.g. btcusdt")
]


class Book(BaseModel):
    symbol: str
    last_update_id: int | None
    # Of the event the book is after; given for a past book (`at=`).
    event_time: datetime | None = None
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


class OrderLevel(BaseModel):
    id: int
    symbol: str
    event_time: datetime
    last_update_id: int
    side: str
    price: float
    quantity: float


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


At = Annotated[
    str | None,
    Query(
        max_length=40,
        description="A past instant: an update id, or an ISO-8601 time with a zone. The book "
        "is then rebuilt from stored data (the checkpoint before it and the level updates up "
        "to it) instead of read from the live book.",
    ),
]


@router.get(
    "/book/{symbol}",
    response_model=Book,
    responses={
        404: {"description": "Unknown symbol, or nothing stored at or before `at`"},
        409: {"description": "A recorded gap makes the book at `at` unknowable"},
        422: {"description": "`at` is neither an update id nor a time with a zone"},
    },
)
async def book(
    symbol: str,
    service: ServiceDep,
    depth: Annotated[int, Query(ge=1, le=5000)] = 10,
    at: At = None,
) -> Book:
    """The live local order book, best levels first; with `at`, the stored book then."""
    if at is not None:
        return await _book_at(service, symbol, at, depth)
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


async def _book_at(service: Service, symbol: str, at: str, depth: int) -> Book:
    try:
        instant = parse_at(at)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    async with _database_errors(), service.engine.connect() as conn:
        past = await book_at(conn, symbol, instant)
    if isinstance(past, NoCheckpoint):
        raise HTTPException(404, f"no stored book of {past.symbol} at or before {at}")
    if isinstance(past, Hole):
        raise HTTPException(
            409,
            {
                "message": f"the book of {past.symbol} at {at} is unknowable: update ids "
                f"{past.from_update_id}..{past.to_update_id} were not stored ({past.reason})",
                "gap": {
                    "from_update_id": past.from_update_id,
                    "to_update_id": past.to_update_id,
                    "reason": past.reason,
                },
            },
        )
    bids, asks = past.top(depth)
    return Book(
        symbol=past.symbol,
        last_update_id=past.last_update_id,
        event_time=past.event_time,
        bids=bids,
        asks=asks,
    )


_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"description": "Database unavailable, busy, or the query exceeded its timeout"}
}
# SQLSTATE query_canceled: the statement timeout fired (or an operator cancelled the query).
_QUERY_CANCELED = "57014"

# The time column each table is listed by; each has a (symbol, column) index.
_TIME_OF = {
    "price_ticks": "event_time",
    "trading_signals": "event_time",
    "data_gaps": "to_time",
    "orders": "event_time",
}
Listed = type[PriceTick] | type[TradingSignal] | type[DataGap] | type[Order]
_PAGING = (
    'With `start`, `end` or `cursor` the answer is a page, `{"rows": [...], "next": ...}`: '
    "pass `next` as `cursor` for the page after (null on the last). Without them, the newest "
    "rows as a list. The `X-Next-Cursor` header carries `next` either way."
)
Paging = Annotated[HistoryParams, Depends(page_params)]


class Page(BaseModel, Generic[RowT]):
    rows: list[RowT]
    next: str | None


@router.get(
    "/ticks",
    response_model=list[Tick] | Page[Tick],
    responses=_UNAVAILABLE,
    description="Stored ticks, newest first by event time. " + _PAGING,
)
async def ticks(
    service: ServiceDep, response: Response, page: Paging, symbol: SymbolFilter = None
) -> list[Tick] | Page[Tick]:
    return await _listed(service, response, PriceTick, Tick, symbol, page)


@router.get(
    "/signals",
    response_model=list[Signal] | Page[Signal],
    responses=_UNAVAILABLE,
    description="Stored signals, newest first by event time. " + _PAGING,
)
async def signals(
    service: ServiceDep, response: Response, page: Paging, symbol: SymbolFilter = None
) -> list[Signal] | Page[Signal]:
    return await _listed(service, response, TradingSignal, Signal, symbol, page)


@router.get(
    "/gaps",
    response_model=list[Gap] | Page[Gap],
    responses=_UNAVAILABLE,
    description="Recorded holes in the stored sequences, newest first by the event time after "
    "them (`to_time`). " + _PAGING,
)
async def gaps(
    service: ServiceDep, response: Response, page: Paging, symbol: SymbolFilter = None
) -> list[Gap] | Page[Gap]:
    return await _listed(service, response, DataGap, Gap, symbol, page)


@router.get(
    "/orders",
    response_model=list[OrderLevel] | Page[OrderLevel],
    responses=_UNAVAILABLE,
    description="Stored level updates of one symbol (quantity 0: level removed), newest first "
    "by event time. " + _PAGING,
)
async def orders(
    service: ServiceDep, response: Response, page: Paging, symbol: RequiredSymbol
) -> list[OrderLevel] | Page[OrderLevel]:
    return await _listed(service, response, Order, OrderLevel, symbol, page)


async def _listed(
    service: Service,
    response: Response,
    model: Listed,
    shape: type[RowT],
    symbol: str | None,
    page: HistoryParams,
) -> list[RowT] | Page[RowT]:
    time_name = _TIME_OF[model.__tablename__]
    rows = await _fetch(service, history_query(model.__table__, time_name, symbol, page))
    rows, cursor = next_cursor(rows, time_name, page)
    if cursor is not None:
        response.headers["X-Next-Cursor"] = cursor
    body = [shape.model_validate(row) for row in rows]
    return Page[shape](rows=body, next=cursor) if page.is_history else body  # type: ignore[valid-type]


def newest_query(model: Listed, symbol: str | None, limit: int) -> Select[Any]:
    """The newest rows, as the routes ask for them without a range: ``... ORDER BY <time> DESC,
    id DESC LIMIT limit + 1``, which walks the ``(symbol, <time>)`` index backwards (with a
    symbol) or ``(<time>)`` (ticks and signals without) and stops after the page."""
    page = HistoryParams(start=None, end=None, order="desc", after=None, limit=limit)
    return history_query(model.__table__, _TIME_OF[model.__tablename__], symbol, page)


async def _fetch(service: Service, query: Select[Any]) -> list[dict[str, Any]]:
    async with _database_errors(), service.engine.connect() as conn:
        result = await conn.execute(query)
        return [dict(row) for row in result.mappings()]


@contextlib.asynccontextmanager
async def _database_errors() -> AsyncIterator[None]:
    """A database that is away, busy or too slow answers 503 with the reason."""
    try:
        yield
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
