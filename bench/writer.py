"""COPY (``copy_records_to_table``) vs ``executemany`` INSERT for the writer's rows.

    python -m bench writer [--database-url URL] [--rows 100000]

Creates and migrates a scratch database, writes realistic order-level and tick rows in batches of
1k and 10k (one transaction per batch, as the writer does), prints rows/s as markdown tables,
then drops the database; last, the same order rows through `BatchWriter` (``add_event`` per
event, then ``flush``).
"""

from __future__ import annotations

import argparse
import itertools
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from bench.machine import run_async
from bench.results import Target, markdown_table, write_result
from bench.throughput import DEFAULT_SERVER
from depthflow.metrics import Metrics
from depthflow.records import ORDER_COLUMNS, TICK_COLUMNS, EventOrders, OrderRow, TickRow
from depthflow.storage import db
from depthflow.storage.copy_orders import encode_orders, once
from depthflow.storage.partitions import ensure_spans, spans_between
from depthflow.storage.writer import BatchWriter
from tests.harness.databases import scratch_database

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


async def timed(
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


def order_blocks(rows: list[OrderRow]) -> list[EventOrders]:
    """``rows`` as the pipeline hands them on: one `EventOrders` per event (bids, then asks)."""
    blocks: list[EventOrders] = []
    for _, group in itertools.groupby(rows, key=lambda row: row[2]):
        levels = list(group)
        symbol, event_time, last_id = levels[0][:3]
        bids = [(r[4], r[5]) for r in levels if r[3] == "bid"]
        asks = [(r[4], r[5]) for r in levels if r[3] == "ask"]
        blocks.append(EventOrders(symbol, event_time, last_id, bids, asks))
    return blocks


@dataclass(frozen=True)
class Encoding:
    """One way of encoding ``orders`` COPY rows: wall rows/s, and this process's CPU per row."""

    name: str
    batch_rows: int
    rows_per_s: float
    client_cpu_us_per_row: float


async def encoding_cases(conn: Any, rows: list[OrderRow], batch: int) -> list[Encoding]:
    """asyncpg's encoding of row tuples against depthflow's binary encoder of event blocks, in
    transactions of about ``batch`` rows (the same rows, the same COPY, the same table)."""
    blocks = order_blocks(rows)
    per_batch = max(1, batch // LEVELS_PER_EVENT)

    async def records() -> None:
        for i in range(0, len(rows), batch):
            async with conn.transaction():
                await write_copy(conn, "orders", ORDER_COLUMNS, rows[i : i + batch])

    async def binary() -> None:
        for i in range(0, len(blocks), per_batch):
            data = encode_orders(blocks[i : i + per_batch])
            async with conn.transaction():
                await conn.copy_to_table(
                    "orders", source=once(data), columns=list(ORDER_COLUMNS), format="binary"
                )

    encode_orders(blocks[:1])  # compiled (or loaded from Numba's cache) outside the timing
    cases = []
    for name, write in (("asyncpg records (tuples)", records), ("binary from levels", binary)):
        await conn.execute("TRUNCATE orders")
        cpu, start = time.process_time(), time.perf_counter()
        await write()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert await conn.fetchval("SELECT count(*) FROM orders") == len(rows)
        cases.append(Encoding(name, batch, len(rows) / wall, cpu / len(rows) * 1e6))
    return cases


async def measure_writer(url: str, rows: list[OrderRow], batch: int) -> float:
    """Rows/s end to end through `BatchWriter` (add_event per event's block, then flush)."""
    engine = db.make_engine(url, pool_size=1)
    try:
        writer = BatchWriter(
            engine,
            Metrics(),
            batch_max_rows=batch,
            batch_max_delay_ms=60_000,
            buffer_max_rows=len(rows) + 1,
        )
        blocks = order_blocks(rows)  # as the pipeline hands them on
        start = time.perf_counter()
        for block in blocks:
            writer.add_event(None, block)
        await writer.flush()
        return len(rows) / (time.perf_counter() - start)
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class CopyVsInsert:
    table: str
    batch_rows: int
    copy_rows_per_s: float
    executemany_rows_per_s: float

    @property
    def speed_up(self) -> float:
        return self.copy_rows_per_s / self.executemany_rows_per_s


@dataclass(frozen=True)
class WriterResult:
    rows: int
    copy_vs_insert: list[CopyVsInsert]
    batch_writer_rows_per_s: dict[int, float]  # by batch_max_rows
    encodings: list[Encoding]


async def measure(server_url: str, n: int) -> WriterResult:
    async with scratch_database(server_url, "depthflow_bench_writer") as url:
        orders, ticks = order_rows(n), tick_rows(n)
        conn = await asyncpg.connect(db.asyncpg_dsn(url))
        # The rows' days need their time partitions (the writer makes its own; COPY here does not).
        days = {row[1].date() for row in (orders[0], orders[-1], ticks[0], ticks[-1])}
        await ensure_spans(conn, list(spans_between(min(days), max(days), 1)))
        cases = []
        try:
            for table, columns, rows in (
                ("orders", ORDER_COLUMNS, orders),
                ("price_ticks", TICK_COLUMNS, ticks),
            ):
                for batch in BATCH_SIZES:
                    copy = await timed(conn, write_copy, table, columns, rows, batch)
                    many = await timed(conn, write_executemany, table, columns, rows, batch)
                    cases.append(CopyVsInsert(table, batch, copy, many))
            encodings = [
                e for batch in BATCH_SIZES for e in await encoding_cases(conn, orders, batch)
            ]
            await conn.execute("TRUNCATE orders")
        finally:
            await conn.close()
        writer = {batch: await measure_writer(url, orders, batch) for batch in BATCH_SIZES}
    return WriterResult(n, cases, writer, encodings)


def report(r: WriterResult) -> None:
    print(f"rows per case: {r.rows:,}\n")
    rows = [
        [c.table, c.batch_rows, c.copy_rows_per_s, c.executemany_rows_per_s, f"{c.speed_up:.1f}x"]
        for c in r.copy_vs_insert
    ]
    headers = ["table", "batch", "COPY rows/s", "executemany rows/s", "COPY speed-up"]
    print(markdown_table(headers, rows))
    print()
    rows = [["add_event + flush", b, v] for b, v in r.batch_writer_rows_per_s.items()]
    print(markdown_table(["BatchWriter (orders, COPY, end to end)", "batch", "rows/s"], rows))
    print()
    rows = [[e.name, e.batch_rows, e.rows_per_s, e.client_cpu_us_per_row] for e in r.encodings]
    print(markdown_table(["orders COPY encoding", "batch", "rows/s", "client CPU us/row"], rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench writer", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--database-url",
        default=DEFAULT_SERVER,
        help="any database URL on the server; a scratch database is created",
    )
    parser.add_argument("--rows", type=int, default=100_000, help="rows per measured case")
    args = parser.parse_args(argv)
    result = run_async(measure(args.database_url, args.rows))
    report(result)
    # Informational: it chose COPY for the writer (see depthflow.storage.batches).
    targets: list[Target] = []
    print(f"\n(result written to {write_result('writer', targets, result)})")
    return 0
