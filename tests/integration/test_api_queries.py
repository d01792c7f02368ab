"""Stored-row routes against the real PostgreSQL: order by time, /gaps, 503 on a cancelled query
or a drained pool, and the plans of the route's own query on a million ticks."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from depthflow.api import create_app
from depthflow.api.data import newest_query
from depthflow.config import Settings
from depthflow.records import GAP_COLUMNS, SIGNAL_COLUMNS, TICK_COLUMNS
from depthflow.service import Service
from depthflow.storage import db
from depthflow.storage.models import PriceTick

T0 = datetime(2026, 1, 1, tzinfo=UTC)
STATEMENT_TIMEOUT_MS = 500


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[FastAPI]:
    application = create_app(make_settings(symbols="btcusdt"), with_feed=False)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


@pytest.fixture
async def conn(clean_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(db.asyncpg_dsn(clean_db))
    try:
        await connection.execute("TRUNCATE data_gaps RESTART IDENTITY")
        yield connection
    finally:
        await connection.close()


@pytest.fixture
async def api_engine(app: FastAPI, clean_db: str) -> AsyncIterator[None]:
    """The service's API engine as `Service` builds it with a statement timeout of 500 ms."""
    service: Service = app.state.service
    original = service.engine
    service.engine = db.make_engine(clean_db, statement_timeout_ms=STATEMENT_TIMEOUT_MS)
    try:
        yield
    finally:
        await service.engine.dispose()
        service.engine = original


def tick(symbol: str, event_time: datetime, u: int) -> tuple[Any, ...]:
    row = (symbol, event_time, event_time, u, u, 100.0, 1.0, 101.0, 1.0, 100.5)
    assert len(row) == len(TICK_COLUMNS)
    return row


async def test_ticks_and_signals_are_newest_by_event_time_not_by_id(
    client: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    # Inserted out of time order: ids say 1, 2, 3, 4; event times say 3, 1, 4 = 2 (a tie).
    times = [T0 + timedelta(seconds=s) for s in (3, 1, 4, 4)]
    ticks = [tick("BTCUSDT", t, u) for u, t in enumerate(times, start=1)]
    await conn.copy_records_to_table("price_ticks", records=ticks, columns=TICK_COLUMNS)
    signals = [("BTCUSDT", "open", 1.0, 1.0, 1.0, t, u) for u, t in enumerate(times, start=1)]
    await conn.copy_records_to_table("trading_signals", records=signals, columns=SIGNAL_COLUMNS)

    for path in ("/ticks", "/signals"):
        for params in ({}, {"symbol": "btcusdt"}):
            rows = (await client.get(path, params=params)).json()
            # Newest event first; on the tie the higher id first.
            assert [r["id"] for r in rows] == [4, 3, 1, 2], (path, params)
        limited = (await client.get(path, params={"limit": 2})).json()
        assert [r["id"] for r in limited] == [4, 3]


async def test_gaps_newest_first_by_symbol(
    client: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    gaps = [
        ("BTCUSDT", 10, 19, T0, T0 + timedelta(seconds=2), "sequence"),
        ("ETHUSDT", 5, 9, T0, T0 + timedelta(seconds=5), "reconnect"),
        ("BTCUSDT", 30, 39, T0, T0 + timedelta(seconds=9), "overflow"),
        ("BTCUSDT", 50, 59, T0, T0 + timedelta(seconds=9), "sequence"),
    ]
    assert len(gaps[0]) == len(GAP_COLUMNS)
    await conn.copy_records_to_table("data_gaps", records=gaps, columns=GAP_COLUMNS)

    every = (await client.get("/gaps")).json()
    assert [g["id"] for g in every] == [4, 3, 2, 1]
    btc = (await client.get("/gaps", params={"symbol": "btcusdt", "limit": 2})).json()
    assert [(g["id"], g["from_update_id"], g["to_update_id"]) for g in btc] == [
        (4, 50, 59),
        (3, 30, 39),
    ]
    assert btc[0]["reason"] == "sequence"
    assert datetime.fromisoformat(btc[0]["to_time"]) == T0 + timedelta(seconds=9)
    assert btc[0]["detected_at"]
    assert (await client.get("/gaps", params={"symbol": "dogeusdt"})).json() == []
    assert (await client.get("/gaps", params={"limit": 1001})).status_code == 422
    assert (await client.get("/gaps", params={"symbol": "a;b"})).status_code == 422


@contextlib.asynccontextmanager
async def exclusive_lock(url: str, table: str) -> AsyncIterator[None]:
    """ACCESS EXCLUSIVE on `table`, held by another connection until the block ends."""
    holder = await asyncpg.connect(db.asyncpg_dsn(url))
    try:
        async with holder.transaction():
            await holder.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await holder.close()


@pytest.mark.usefixtures("api_engine")
async def test_a_query_cancelled_by_the_statement_timeout_answers_503(
    client: httpx.AsyncClient, clean_db: str
) -> None:
    async with exclusive_lock(clean_db, "price_ticks"):
        started = time.monotonic()
        response = await client.get("/ticks", params={"symbol": "btcusdt"})
        elapsed = time.monotonic() - started
    assert response.status_code == 503
    assert "statement timeout" in response.json()["detail"]
    assert STATEMENT_TIMEOUT_MS / 1000 * 0.8 <= elapsed < 15
    # The connection went back to the pool in a usable state.
    assert (await client.get("/ticks")).status_code == 200


@pytest.mark.usefixtures("api_engine")
async def test_a_drained_pool_answers_503_after_the_pool_timeout(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    service: Service = app.state.service
    pool = service.engine.pool
    held: list[AsyncConnection] = []
    try:
        # pool_size + max_overflow: every connection the engine may open.
        for _ in range(pool.size() + pool._max_overflow):  # type: ignore[attr-defined]
            held.append(await service.engine.connect())
        started = time.monotonic()
        response = await client.get("/signals")
        elapsed = time.monotonic() - started
    finally:
        for connection in held:
            await connection.close()
    assert response.status_code == 503
    assert "no free connection" in response.json()["detail"]
    # pool_timeout follows the statement timeout (0.5 s), far from SQLAlchemy's 30 s default.
    assert elapsed < 15
    assert (await client.get("/signals")).status_code == 200


# -- plans on a million ticks --------------------------------------------------------------------

ROWS = 1_000_000
MAJORS = tuple(f"SYM{i}USDT" for i in range(19))
RARE = "RAREUSDT"  # 0.5 % of the rows


def million_ticks() -> Iterator[tuple[Any, ...]]:
    """One event every millisecond: nineteen busy symbols interleaved and a rarely traded one."""
    step = timedelta(milliseconds=1)
    majors = itertools.cycle(MAJORS)
    for u in range(ROWS):
        symbol = RARE if u % 200 == 0 else next(majors)
        event_time = T0 + u * step
        yield (symbol, event_time, event_time, u, u, 100.0, 1.0, 101.0, 1.0, 100.5)


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


async def explain(conn: asyncpg.Connection, query: Any) -> list[dict[str, Any]]:
    sql = str(query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    document = json.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}"))
    return list(plan_nodes(document[0]["Plan"]))


def assert_backward_index_scan(nodes: list[dict[str, Any]], *indexes: str) -> None:
    types = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in types, nodes
    assert "Sort" not in types, nodes  # an Incremental Sort (ties on id only) is fine
    scans = [n for n in nodes if n["Node Type"] in {"Index Scan", "Index Only Scan"}]
    assert len(scans) == 1, nodes
    assert scans[0]["Index Name"] in indexes, nodes
    assert scans[0]["Scan Direction"] == "Backward", nodes


async def test_newest_ticks_walk_an_index_backwards_on_a_million_rows(
    conn: asyncpg.Connection,
) -> None:
    started = time.monotonic()
    try:
        await conn.copy_records_to_table(
            "price_ticks", records=million_ticks(), columns=TICK_COLUMNS
        )
        await conn.execute("ANALYZE price_ticks")
        filled_s = time.monotonic() - started

        rare = await explain(conn, newest_query(PriceTick, RARE.lower(), 100))
        assert_backward_index_scan(rare, "ix_price_ticks_symbol_event_time")
        # For a busy symbol PostgreSQL may as well walk (event_time) and skip the others' rows
        # (the table is in time order, so that is a sequential read): either index, no sort.
        busy = await explain(conn, newest_query(PriceTick, MAJORS[0].lower(), 100))
        assert_backward_index_scan(
            busy, "ix_price_ticks_symbol_event_time", "ix_price_ticks_event_time"
        )
        every_symbol = await explain(conn, newest_query(PriceTick, None, 1000))
        assert_backward_index_scan(every_symbol, "ix_price_ticks_event_time")
    finally:
        await conn.execute("TRUNCATE price_ticks RESTART IDENTITY")
    print(f"filled {ROWS} ticks and analyzed in {filled_s:.1f} s")
