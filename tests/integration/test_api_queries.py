"""Stored-row routes against the real PostgreSQL: order by time, /gaps, 503 on a cancelled query
or a drained pool, and the plans of the route's own query on a million ticks."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
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
from depthflow.api.history import HistoryParams, history_query
from depthflow.config import Settings
from depthflow.records import GAP_COLUMNS, SIGNAL_COLUMNS, TICK_COLUMNS
from depthflow.service import Service
from depthflow.storage import db
from depthflow.storage.models import PriceTick
from depthflow.storage.partitions import ensure_spans, spans_between

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
        # Rows copied straight in need their time partitions (the writer makes its own).
        first = T0.date()
        await ensure_spans(connection, list(spans_between(first, first + timedelta(days=5), 1)))
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


async def pages(client: httpx.AsyncClient, path: str, **params: Any) -> list[list[int]]:
    """The ids of every page of a history query, following `next` to the end."""
    ids: list[list[int]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"rows", "next"}
        ids.append([row["id"] for row in body["rows"]])
        assert response.headers.get("x-next-cursor") == body["next"]
        cursor = body["next"]
        if cursor is None:
            return ids
        assert len(ids) < 100, "the cursor must make progress"


async def test_history_pages_cover_a_time_range_once_in_either_order(
    client: httpx.AsyncClient, conn: asyncpg.Connection
) -> None:
    # 50 ticks a second apart over two days' boundary, ties included (two rows per second).
    times = [T0 + timedelta(days=1, seconds=-25 + s // 2) for s in range(50)]
    ticks = [tick("BTCUSDT", t, u) for u, t in enumerate(times, start=1)]
    await conn.copy_records_to_table("price_ticks", records=ticks, columns=TICK_COLUMNS)
    start, end = times[10].isoformat(), times[40].isoformat()
    expected = [i + 1 for i in range(50) if times[10] <= times[i] < times[40]]

    desc = await pages(client, "/ticks", symbol="btcusdt", start=start, end=end, limit=7)
    assert [len(p) for p in desc[:-1]] == [7] * (len(desc) - 1)
    flat = [i for page in desc for i in page]
    assert flat == sorted(expected, key=lambda i: (times[i - 1], i), reverse=True)

    asc = await pages(client, "/ticks", start=start, end=end, limit=7, order="asc")
    assert [i for page in asc for i in page] == flat[::-1]

    # /orders: one symbol's level updates, paged the same way.
    levels = [("BTCUSDT", t, u, "bid", 100.0 + u, 1.0) for u, t in enumerate(times, start=1)]
    await conn.copy_records_to_table(
        "orders",
        records=levels,
        columns=("symbol", "event_time", "last_update_id", "side", "price", "quantity"),
    )
    order_pages = await pages(client, "/orders", symbol="btcusdt", start=start, limit=9)
    assert len({i for page in order_pages for i in page}) == sum(t >= times[10] for t in times)
    assert (await client.get("/orders")).status_code == 422, "one symbol at a time"


async def test_history_refuses_what_it_cannot_answer(client: httpx.AsyncClient) -> None:
    naive = await client.get("/ticks", params={"start": "2026-01-01T00:00:00"})
    assert naive.status_code == 422
    assert "time zone" in naive.text
    backwards = {"start": "2026-01-02T00:00:00Z", "end": "2026-01-01T00:00:00Z"}
    assert (await client.get("/ticks", params=backwards)).status_code == 422
    assert (await client.get("/ticks", params={"cursor": "nonsense"})).status_code == 422
    # A cursor of the descending order is no cursor of the ascending one.
    page = (await client.get("/signals", params={"start": "2026-01-01T00:00:00Z"})).json()
    assert page == {"rows": [], "next": None}


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
    """One event every 300 ms (3.5 days, four daily partitions): nineteen busy symbols
    interleaved and a rarely traded one."""
    step = timedelta(milliseconds=300)
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


def partition_index(parent_index: str) -> re.Pattern[str]:
    """The name PostgreSQL gives a partition's copy of ``parent_index``
    (``price_ticks_p20260101_symbol_event_time_idx`` for ``ix_price_ticks_symbol_event_time``)."""
    table, columns = {
        "ix_price_ticks_symbol_event_time": ("price_ticks", "symbol_event_time"),
        "ix_price_ticks_event_time": ("price_ticks", "event_time"),
    }[parent_index]
    return re.compile(rf"^{table}_p\d{{8}}_{columns}_idx$")


# The partitions the million rows are in; the planner may scan the empty ones (today's, made
# ahead) any way it likes.
FILLED = {f"price_ticks_p{T0 + timedelta(days=d):%Y%m%d}" for d in range(4)}


def index_scans(nodes: list[dict[str, Any]], *indexes: str) -> list[dict[str, Any]]:
    """The plan's index scans of the filled partitions, asserting they walk backwards on one of
    ``indexes`` (each in its partition), with no sequential scan and no sort."""
    types = [n["Node Type"] for n in nodes]
    assert "Seq Scan" not in types, nodes
    assert "Sort" not in types, nodes  # an Incremental Sort (ties on id only) is fine
    scans = [
        n
        for n in nodes
        if n["Node Type"] in {"Index Scan", "Index Only Scan"} and n["Relation Name"] in FILLED
    ]
    assert scans, nodes
    patterns = [partition_index(index) for index in indexes]
    for scan in scans:
        assert any(p.match(scan["Index Name"]) for p in patterns), scan["Index Name"]
        assert scan["Scan Direction"] == "Backward", scan
    return scans


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
        index_scans(rare, "ix_price_ticks_symbol_event_time")
        # For a busy symbol PostgreSQL may as well walk (event_time) and skip the others' rows
        # (the table is in time order, so that is a sequential read): either index, no sort.
        busy = await explain(conn, newest_query(PriceTick, MAJORS[0].lower(), 100))
        index_scans(busy, "ix_price_ticks_symbol_event_time", "ix_price_ticks_event_time")
        every_symbol = await explain(conn, newest_query(PriceTick, None, 1000))
        index_scans(every_symbol, "ix_price_ticks_event_time")
        # A range inside one day reads that day's partition alone (pruned at plan time).
        day = T0 + timedelta(days=1)
        page = HistoryParams(day, day + timedelta(hours=6), "desc", None, 100)
        for symbol in (RARE, MAJORS[0], None):
            ranged = await explain(
                conn, history_query(PriceTick.__table__, "event_time", symbol, page)
            )
            scans = index_scans(
                ranged, "ix_price_ticks_symbol_event_time", "ix_price_ticks_event_time"
            )
            assert {s["Relation Name"] for s in scans} == {f"price_ticks_p{day:%Y%m%d}"}
        # The next page after a deep cursor is one more descent of the same index.
        deep = HistoryParams(None, None, "desc", (day + timedelta(hours=12), 123_456), 100)
        cursor_plan = await explain(
            conn, history_query(PriceTick.__table__, "event_time", RARE, deep)
        )
        index_scans(cursor_plan, "ix_price_ticks_symbol_event_time")
        # Partitions after the cursor's time are pruned (today's included).
        scanned = {n["Relation Name"] for n in cursor_plan if "Relation Name" in n}
        assert f"price_ticks_p{day:%Y%m%d}" in scanned
        assert max(scanned) == f"price_ticks_p{day:%Y%m%d}", scanned
    finally:
        await conn.execute("TRUNCATE price_ticks RESTART IDENTITY")
    print(f"filled {ROWS} ticks and analyzed in {filled_s:.1f} s")
