"""Time partitions against the real PostgreSQL: the migration of a populated database keeps every
row, the writer creates the partitions its rows need, and retention drops whole old partitions
while ingestion goes on."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import asyncpg
import pytest
from sqlalchemy import make_url

from depthflow.metrics import Metrics
from depthflow.storage import db
from depthflow.storage.maintenance import maintain_partitions
from depthflow.storage.partitions import (
    PARTITIONED_TABLES,
    list_partitions,
    span_of,
    spans_between,
)
from depthflow.storage.writer import BatchWriter

NOW = datetime.now(UTC)


@pytest.fixture
async def scratch_url(database_url: str) -> AsyncIterator[str]:
    url = make_url(database_url).set(database=f"depthflow_part_{uuid.uuid4().hex[:8]}")
    rendered = url.render_as_string(hide_password=False)
    yield rendered
    await db.drop_database(rendered)


async def connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(db.asyncpg_dsn(url))


def tick(symbol: str, at: datetime, u: int) -> tuple[object, ...]:
    return (symbol, at, at, u, u, 100.0, 1.0, 101.0, 2.0, 100.5)


def test_spans_are_aligned_on_the_epoch() -> None:
    assert span_of(date(2024, 8, 8), 1) == (date(2024, 8, 8), date(2024, 8, 9))
    start, end = span_of(date(2024, 8, 8), 7)
    assert (end - start).days == 7
    assert start <= date(2024, 8, 8) < end
    assert (start - date(1970, 1, 1)).days % 7 == 0
    assert list(spans_between(date(2024, 8, 8), date(2024, 8, 10), 2)) == [
        span_of(date(2024, 8, 8), 2),
        span_of(date(2024, 8, 10), 2),
    ]


async def test_the_migration_partitions_a_populated_database_keeping_every_row(
    scratch_url: str,
) -> None:
    await db.ensure_database(scratch_url)
    await asyncio.to_thread(db.upgrade, scratch_url, "0004")
    days = [NOW - timedelta(days=d) for d in (40, 3, 2, 0)]
    conn = await connect(scratch_url)
    try:
        for i, at in enumerate(days):
            await conn.execute(
                "INSERT INTO price_ticks (symbol, event_time, received_at, first_update_id, "
                "last_update_id, best_bid, best_bid_qty, best_ask, best_ask_qty, wap) "
                "VALUES ($1, $2, $2, $3, $3, 100, 1, 101, 2, 100.5)",
                "BTCUSDT",
                at,
                i + 1,
            )
            await conn.execute(
                "INSERT INTO orders (symbol, event_time, last_update_id, side, price, quantity) "
                "VALUES ('BTCUSDT', $1, $2, 'bid', 100, 1)",
                at,
                i + 1,
            )
        await conn.execute(
            "INSERT INTO trading_signals (symbol, signal, price, sma_short, sma_long, "
            "event_time, last_update_id) VALUES ('BTCUSDT', 'open', 1, 1, 1, $1, 7)",
            days[0],
        )
        before = await conn.fetch("SELECT * FROM price_ticks ORDER BY id")
    finally:
        await conn.close()

    await db.migrate(scratch_url)

    conn = await connect(scratch_url)
    try:
        kinds = await conn.fetch(
            "SELECT relname, relkind::text FROM pg_class WHERE relname = ANY($1::text[])",
            list(PARTITIONED_TABLES),
        )
        assert {r["relname"]: r["relkind"] for r in kinds} == dict.fromkeys(PARTITIONED_TABLES, "p")
        assert await conn.fetch("SELECT * FROM price_ticks ORDER BY id") == before
        assert await conn.fetchval("SELECT count(*) FROM orders") == 4
        assert await conn.fetchval("SELECT count(*) FROM trading_signals") == 1
        # One partition per day the rows cover, plus today and the two days after it.
        spans = [span for _, span in await list_partitions(conn, "price_ticks")]
        for at in [*days, NOW + timedelta(days=2)]:
            assert span_of(at.date(), 1) in spans
        # The identity goes on after the highest id kept.
        new_id = await conn.fetchval(
            "INSERT INTO price_ticks (symbol, event_time, received_at, first_update_id, "
            "last_update_id, best_bid, best_bid_qty, best_ask, best_ask_qty, wap) "
            "VALUES ('BTCUSDT', now(), now(), 9, 9, 100, 1, 101, 2, 100.5) RETURNING id"
        )
        assert new_id == max(r["id"] for r in before) + 1
    finally:
        await conn.close()


async def test_the_writer_creates_the_partitions_its_rows_need(clean_db: str) -> None:
    # A replay of a recording from 2024 needs partitions nobody created ahead.
    old = datetime(2024, 8, 8, 23, 59, 59, tzinfo=UTC)
    engine = db.make_engine(clean_db, pool_size=1)
    writer = BatchWriter(
        engine, Metrics(), batch_max_rows=100, batch_max_delay_ms=10, buffer_max_rows=10_000
    )
    task = asyncio.create_task(writer.run())
    try:
        for u, at in enumerate([old, old + timedelta(seconds=2)], start=1):
            assert writer.add_event(tick("BTCUSDT", at, u), [])  # type: ignore[arg-type]
        await writer.stop()
        await task
    finally:
        await engine.dispose()
    conn = await connect(clean_db)
    try:
        assert await conn.fetchval("SELECT count(*) FROM price_ticks_p20240808") == 1
        assert await conn.fetchval("SELECT count(*) FROM price_ticks_p20240809") == 1
    finally:
        await conn.close()


async def test_retention_drops_whole_old_partitions_while_ingestion_goes_on(
    clean_db: str,
) -> None:
    engine = db.make_engine(clean_db, pool_size=3)
    writer = BatchWriter(
        engine, Metrics(), batch_max_rows=50, batch_max_delay_ms=5, buffer_max_rows=100_000
    )
    # Several days of history, each day in its own partition.
    for age in (9, 8, 7, 1):
        assert writer.add_event(tick("ETHUSDT", NOW - timedelta(days=age), age), [])  # type: ignore[arg-type]
    task = asyncio.create_task(writer.run())
    stop = asyncio.Event()

    async def ingest() -> int:
        sent = 0
        while not stop.is_set():
            sent += 1
            assert writer.add_event(tick("BTCUSDT", datetime.now(UTC), 100 + sent), [])  # type: ignore[arg-type]
            await asyncio.sleep(0.002)
        return sent

    try:
        await writer.flush()
        producer = asyncio.create_task(ingest())
        await asyncio.sleep(0.2)
        _, dropped = await maintain_partitions(engine, partition_days=1, retention_days=3)
        await asyncio.sleep(0.2)
        stop.set()
        sent = await producer
        await writer.stop()
        await task
    finally:
        await engine.dispose()
    old_days = {(NOW - timedelta(days=age)).date() for age in (9, 8, 7)}
    assert {f"price_ticks_p{day:%Y%m%d}" for day in old_days} <= set(dropped)
    conn = await connect(clean_db)
    try:
        spans = [span for _, span in await list_partitions(conn, "price_ticks")]
        assert not [span for span in spans if span[0] in old_days]
        assert span_of((NOW - timedelta(days=1)).date(), 1) in spans
        # Every row sent during the drop was stored; only the expired days are gone.
        assert (
            await conn.fetchval("SELECT count(*) FROM price_ticks WHERE symbol = 'BTCUSDT'") == sent
        )
        assert await conn.fetchval("SELECT count(*) FROM price_ticks WHERE symbol = 'ETHUSDT'") == 1
    finally:
        await conn.close()
