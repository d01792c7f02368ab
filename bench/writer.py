"""Benchmark: COPY (``copy_records_to_table``) vs ``executemany`` INSERT for the writer's rows.

Creates and migrates a scratch database, writes realistic order-level and tick rows in batches of
1k and 10k (one transaction per batch, as the writer does), prints rows/s as a markdown table,
then drops the database. Usage::

    python bench/writer.py [--database-url URL] [--rows N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from depthflow.metrics import Metrics
from depthflow.records import ORDER_COLUMNS, TICK_COLUMNS, OrderRow, TickRow
from depthflow.storage import db
from depthflow.storage.partitions import ensure_spans, spans_between
from depthflow.storage.writer import BatchWriter

DEFAULT_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
BATCH_SIZES = (1_000, 10_000)
LEVELS_PER_EVENT = 20  # a busy 100 ms diff-depth event touches a few dozen levels


def order_rows(n: int, seed: int = 1) -> list[OrderRow]:
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    rows: list[OrderRow] = []
    for i in range(n):
        event = i // LEVELS_PER_EVENT
        side = "bid" if rng.random() < 0.5 else "ask"
        price = round(60_000 + (-1 if side == "bid" else 1) * rng.uniform(0.01, 50), 2)
        qty = 0.0 if rng.random() < 0.3 else round(rng.uniform(0.0001, 3), 5)
        rows.append(
            ("BTCUSDT", start + timedelta(milliseconds=100 * event), event, side, price, qty)
        )
    return rows


def tick_rows(n: int, seed: int = 2) -> list[TickRow]:
    rng = random.Random(seed)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    rows: list[TickRow] = []
    mid = 60_000.0
    for i in range(n):
        mid += rng.gauss(0, 1)
        bid, ask = round(mid - 0.005, 2), round(mid + 0.005, 2)
        bq, aq = rng.uniform(0.01, 5), rng.uniform(0.01, 5)
        wap = (bid * aq + ask * bq) / (bq + aq)
        t = start + timedelta(milliseconds=100 * i)
        rows.append(("BTCUSDT", t, t + timedelta(milliseconds=3), i, i, bid, bq, ask, aq, wap))
    return rows


def insert_sql(table: str, columns: Sequence[str]) -> str:
    params = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({params})"


Writer = Callable[[Any, str, Sequence[str], list[Any]], Awaitable[None]]


async def write_copy(conn: Any, table: str, columns: Sequence[str], rows: list[Any]) -> None:
    await conn.copy_records_to_table(table, records=rows, columns=list(columns))


async def write_executemany(conn: Any, table: str, columns: Sequence[str], rows: list[Any]) -> None:
    await conn.executemany(insert_sql(table, columns), rows)


async def measure(
    conn: Any, write: Writer, table: str, columns: Sequence[str], rows: list[Any], batch: int
) -> float:
    """Rows/s writing ``rows`` in transactions of ``batch`` rows."""
    await conn.execute(f"TRUNCATE {table}")
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        async with conn.transaction():
            await write(conn, table, columns, rows[i : i + batch])
    elapsed = time.perf_counter() - start
    count = await conn.fetchval(f"SELECT count(*) FROM {table}")
    assert count == len(rows), (count, len(rows))
    return len(rows) / elapsed


async def measure_writer(url: str, rows: list[OrderRow], batch: int) -> float:
    """Rows/s end to end through `BatchWriter` (add_event per event, then flush)."""
    engine = db.make_engine(url, pool_size=1)
    try:
        writer = BatchWriter(
            engine,
            Metrics(),
            batch_max_rows=batch,
            batch_max_delay_ms=60_000,
            buffer_max_rows=len(rows) + 1,
        )
        start = time.perf_counter()
        for i in range(0, len(rows), LEVELS_PER_EVENT):
            writer.add_event(None, rows[i : i + LEVELS_PER_EVENT])
        await writer.flush()
        return len(rows) / (time.perf_counter() - start)
    finally:
        await engine.dispose()


async def main(server_url: str, n: int) -> None:
    url = server_url.rsplit("/", 1)[0] + f"/depthflow_bench_{uuid.uuid4().hex[:8]}"
    await db.migrate(url)
    try:
        orders, ticks = order_rows(n), tick_rows(n)
        conn = await asyncpg.connect(db.asyncpg_dsn(url))
        # The rows' days need their time partitions (the writer makes its own; COPY here does not).
        days = {row[1].date() for row in (orders[0], orders[-1], ticks[0], ticks[-1])}
        await ensure_spans(conn, list(spans_between(min(days), max(days), 1)))
        lines = [
            f"rows per case: {n}",
            "",
            "| table | batch | COPY rows/s | executemany rows/s | COPY speed-up |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        try:
            for table, columns, rows in (
                ("orders", ORDER_COLUMNS, orders),
                ("price_ticks", TICK_COLUMNS, ticks),
            ):
                for batch in BATCH_SIZES:
                    copy = await measure(conn, write_copy, table, columns, rows, batch)
                    many = await measure(conn, write_executemany, table, columns, rows, batch)
                    lines.append(
                        f"| {table} | {batch} | {copy:,.0f} | {many:,.0f} | {copy / many:.1f}x |"
                    )
            await conn.execute("TRUNCATE orders")
        finally:
            await conn.close()
        lines.append("")
        lines.append("| BatchWriter (orders, COPY, end to end) | batch | rows/s |")
        lines.append("| --- | ---: | ---: |")
        for batch in BATCH_SIZES:
            rate = await measure_writer(url, orders, batch)
            lines.append(f"| add_event + flush | {batch} | {rate:,.0f} |")
        print("\n".join(lines))
    finally:
        await db.drop_database(url)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database-url",
        default=DEFAULT_SERVER,
        help="any database URL on the server; a scratch database is created",
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows per measured case")
    args = parser.parse_args()
    asyncio.run(main(args.database_url, args.rows))


if __name__ == "__main__":
    cli()
