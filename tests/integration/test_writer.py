"""BatchWriter against the real PostgreSQL: flush triggers, outages through a TCP proxy, overflow,
idempotent retries, shutdown and backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.metrics import Metrics
from depthflow.records import EventOrders, OrderRow, SignalRow, TickRow
from depthflow.storage import db
from depthflow.storage.batches import Batch, write_batch
from depthflow.storage.maintenance import prune_batch_markers
from depthflow.storage.writer import CATCH_UP_FACTOR, BatchWriter, WriteBatch
from tests.tcp_proxy import TcpProxy

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def event(symbol: str, update_id: int, levels: int = 2) -> tuple[TickRow, list[OrderRow]]:
    """One depth event's rows: a tick and ``levels`` order-book level updates."""
    t = T0 + timedelta(milliseconds=100 * update_id)
    tick: TickRow = (symbol, t, t, update_id, update_id, 99.0, 1.0, 101.0, 1.0, 100.0)
    orders: list[OrderRow] = [
        (symbol, t, update_id, "bid" if i % 2 else "ask", 100.0 + i, float(i))
        for i in range(levels)
    ]
    return tick, orders


def signal(symbol: str, update_id: int) -> SignalRow:
    return (symbol, "open", 100.0, 100.5, 100.2, T0, update_id)


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait until ``predicate()`` holds; the generous limit only turns a hang into a failure."""
    async with asyncio.timeout(10.0):
        while not predicate():  # noqa: ASYNC110 (polls state that no event announces)
            await asyncio.sleep(0.005)


def progressed(value: Callable[[], int], *, by: int) -> Callable[[], bool]:
    """A predicate: ``value()`` has grown by more than ``by`` since this call."""
    start = value()
    return lambda: value() > start + by


async def fetchval(url: str, query: str) -> int:
    conn = await asyncpg.connect(db.asyncpg_dsn(url))
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


async def count(url: str, table: str) -> int:
    return await fetchval(url, f"SELECT count(*) FROM {table}")


class Harness:
    """Builds writers on engines (direct or through the proxy) and tears all of them down."""

    def __init__(self, url: str, proxy: TcpProxy) -> None:
        self.url = url
        self.proxy = proxy
        self.metrics = Metrics()
        self._engines: list[AsyncEngine] = []
        self._writers: list[BatchWriter] = []
        self._tasks: list[asyncio.Task[None]] = []

    def writer(
        self,
        *,
        via_proxy: bool = False,
        batch_max_rows: int = 1000,
        batch_max_delay_ms: int = 60_000,
        buffer_max_rows: int = 1_000_000,
        connections: int = 1,
        write: WriteBatch | None = None,
    ) -> BatchWriter:
        url = self.url
        if via_proxy:
            url = make_url(url).set(port=self.proxy.port).render_as_string(hide_password=False)
        engine = db.make_engine(url, pool_size=connections)
        self._engines.append(engine)
        writer = BatchWriter(
            engine,
            self.metrics,
            batch_max_rows=batch_max_rows,
            batch_max_delay_ms=batch_max_delay_ms,
            buffer_max_rows=buffer_max_rows,
            connections=connections,
            write=write,
        )
        self._writers.append(writer)
        return writer

    def run(self, writer: BatchWriter) -> asyncio.Task[None]:
        task = asyncio.create_task(writer.run())
        self._tasks.append(task)
        return task

    async def close(self) -> None:
        await self.proxy.restore()
        for writer in self._writers:
            await writer.stop(timeout=5.0)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for engine in self._engines:
            await engine.dispose()


@pytest.fixture
async def harness(clean_db: str) -> AsyncIterator[Harness]:
    server = make_url(clean_db)
    proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432)
    await proxy.start()
    h = Harness(clean_db, proxy)
    try:
        yield h
    finally:
        await h.close()
        await proxy.stop()


async def test_flushes_when_batch_is_full_without_waiting_for_the_delay(harness: Harness) -> None:
    writer = harness.writer(batch_max_rows=10, batch_max_delay_ms=600_000)
    harness.run(writer)
    for update_id in range(1, 5):  # 4 events x 3 rows = 12 >= 10
        assert writer.add_event(*event("btcusdt", update_id))

    await eventually(lambda: writer.buffered == 0)

    assert await count(harness.url, "price_ticks") == 4
    assert await count(harness.url, "orders") == 8
    assert writer.rows_written == {
        "price_ticks": 4,
        "orders": 8,
        "trading_signals": 0,
        "data_gaps": 0,
        "book_checkpoints": 0,
    }
    assert harness.metrics.rows_written["orders"] == 8


async def test_flushes_a_small_batch_once_the_delay_has_passed(harness: Harness) -> None:
    writer = harness.writer(batch_max_rows=100_000, batch_max_delay_ms=30)
    harness.run(writer)
    assert writer.add_event(*event("btcusdt", 1))
    assert writer.add_signal(signal("btcusdt", 1))

    await eventually(lambda: writer.buffered == 0)

    assert await count(harness.url, "price_ticks") == 1
    assert await count(harness.url, "orders") == 2
    assert await count(harness.url, "trading_signals") == 1
    created = await fetchval(
        harness.url, "SELECT count(*) FROM trading_signals WHERE created_at IS NOT NULL"
    )
    assert created == 1


async def test_connection_cut_mid_stream_loses_and_duplicates_nothing(harness: Harness) -> None:
    writer = harness.writer(via_proxy=True, batch_max_rows=50, batch_max_delay_ms=10)
    harness.run(writer)
    added = {"ticks": 0, "orders": 0}
    produce = True

    async def producer() -> None:
        update_id = 0
        while produce:
            update_id += 1
            for symbol in ("btcusdt", "ethusdt"):
                tick, orders = event(symbol, update_id, levels=update_id % 4)
                assert writer.add_event(tick, orders)
                added["ticks"] += 1
                added["orders"] += len(orders)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(producer())
    for _ in range(4):
        await eventually(progressed(lambda: writer.rows_written["price_ticks"], by=100))
        # Cut while a write is in flight (connecting, COPY, or waiting for the COMMIT's ack).
        await eventually(writer._lock.locked)
        await harness.proxy.cut()
        await eventually(lambda: not writer.healthy)
        await eventually(progressed(lambda: added["ticks"], by=100))
        await harness.proxy.restore()
        await eventually(lambda: writer.healthy)
    produce = False
    await task
    await writer.stop()

    assert harness.metrics.errors["database"] >= 4
    assert writer.buffered == 0
    assert await count(harness.url, "price_ticks") == added["ticks"]
    assert await count(harness.url, "orders") == added["orders"]
    distinct_events = await fetchval(
        harness.url, "SELECT count(DISTINCT (symbol, last_update_id)) FROM price_ticks"
    )
    assert distinct_events == added["ticks"]
    assert await fetchval(harness.url, "SELECT count(DISTINCT id) FROM orders") == added["orders"]
    assert harness.metrics.data_loss == {}


async def test_overflow_while_database_is_away_is_counted_and_the_rest_written(
    harness: Harness,
) -> None:
    writer = harness.writer(via_proxy=True, batch_max_rows=5, buffer_max_rows=30)
    await harness.proxy.cut()
    harness.run(writer)

    accepted = [writer.add_event(*event("btcusdt", update_id)) for update_id in range(1, 21)]
    await eventually(lambda: not writer.healthy)
    signal_accepted = writer.add_signal(signal("btcusdt", 99))

    assert accepted == [True] * 10 + [False] * 10  # 3 rows each, 30 fit
    assert not signal_accepted
    assert harness.metrics.data_loss["overflow"] == 11
    assert writer.buffered == 30

    await harness.proxy.restore()
    await eventually(lambda: writer.buffered == 0)
    await writer.stop()
    assert await count(harness.url, "price_ticks") == 10
    assert await count(harness.url, "orders") == 20
    assert await count(harness.url, "trading_signals") == 0


async def test_retry_of_a_batch_committed_with_its_ack_lost_writes_nothing_again(
    harness: Harness,
) -> None:
    writer = harness.writer()
    for update_id in range(1, 4):
        writer.add_event(*event("btcusdt", update_id))
    batch = writer._take_batch()
    assert batch is not None
    # The first attempt committed (marker and rows) but its acknowledgement never arrived.
    assert await writer._write_batch(batch) is True
    assert await count(harness.url, "price_ticks") == 3

    assert await writer._attempt() == 9  # the retry of the same batch

    assert await count(harness.url, "price_ticks") == 3
    assert await count(harness.url, "orders") == 6
    assert await count(harness.url, "ingest_batches") == 1
    assert writer.buffered == 0
    assert writer.rows_written == {
        "price_ticks": 3,
        "orders": 6,
        "trading_signals": 0,
        "data_gaps": 0,
        "book_checkpoints": 0,
    }


async def test_marker_from_an_earlier_commit_makes_the_batch_a_no_op(harness: Harness) -> None:
    writer = harness.writer()
    writer.add_event(*event("btcusdt", 1))
    batch = writer._take_batch()
    assert batch is not None
    conn = await asyncpg.connect(db.asyncpg_dsn(harness.url))
    try:
        await conn.execute(
            "INSERT INTO ingest_batches (batch_id, rows) VALUES ($1, 3)", batch.batch_id
        )
    finally:
        await conn.close()

    assert await writer._write_batch(batch) is False
    assert await count(harness.url, "price_ticks") == 0


async def test_stop_flushes_everything_and_refuses_later_rows(harness: Harness) -> None:
    writer = harness.writer(batch_max_rows=100_000, batch_max_delay_ms=600_000)
    task = harness.run(writer)
    for update_id in range(1, 101):
        writer.add_event(*event("ethusdt", update_id))
    writer.add_signal(signal("ethusdt", 100))

    await writer.stop()
    await asyncio.wait_for(task, 5.0)

    assert await count(harness.url, "price_ticks") == 100
    assert await count(harness.url, "orders") == 200
    assert await count(harness.url, "trading_signals") == 1
    assert not writer.add_event(*event("ethusdt", 101))
    assert harness.metrics.data_loss["shutdown"] == 1


async def test_stop_counts_rows_it_could_not_write_as_shutdown_loss(harness: Harness) -> None:
    writer = harness.writer(via_proxy=True)
    await harness.proxy.cut()
    for update_id in range(1, 6):
        writer.add_event(*event("btcusdt", update_id))

    await writer.stop(timeout=0.3)

    assert harness.metrics.data_loss["shutdown"] == 15
    assert writer.buffered == 15


async def test_batch_the_database_refuses_is_dropped_and_counted(harness: Harness) -> None:
    writer = harness.writer()
    bad: TickRow = ("btcusdt", T0, None, 1, 1, 99.0, 1.0, 101.0, 1.0, 100.0)  # type: ignore[assignment]
    writer.add_event(bad, [])

    for _ in range(2):
        with pytest.raises(asyncpg.NotNullViolationError):
            await writer.flush()
    await writer.flush()  # third refusal: dropped, not retried forever

    assert harness.metrics.data_loss["rejected"] == 1
    writer.add_event(*event("btcusdt", 2))
    await writer.flush()
    assert writer.buffered == 0
    assert await count(harness.url, "price_ticks") == 1
    hole = "SELECT count(*) FROM data_gaps WHERE reason = 'rejected' AND from_update_id = 1"
    assert await fetchval(harness.url, hole) == 1


async def marker_committed(url: str, batch: Batch) -> bool:
    query = f"SELECT count(*) FROM ingest_batches WHERE batch_id = '{batch.batch_id}'"
    return await fetchval(url, query) == 1


async def test_batches_written_side_by_side_commit_in_the_order_they_were_taken(
    harness: Harness,
) -> None:
    engine = db.make_engine(harness.url, pool_size=2)
    harness._engines.append(engine)
    second_sent = asyncio.Event()
    seen: list[Batch] = []
    checked_before_second_commit: list[bool] = []

    async def write(batch: Batch, before_commit: Callable[[], Any] | None = None) -> bool:
        seen.append(batch)
        if len(seen) == 1:
            # The first batch of the first attempt waits until the second one sent every row,
            # then fails: the second must roll back, not commit past it.
            await second_sent.wait()
            assert await count(harness.url, "price_ticks") == 0
            raise OSError("connection lost before the first batch committed")

        async def gate() -> None:
            second_sent.set()
            if before_commit is not None:
                await before_commit()
            if len(seen) >= 4 and batch is seen[-1]:
                # The retry: the batch taken first is committed before this one commits.
                checked_before_second_commit.append(await marker_committed(harness.url, seen[-2]))

        return await write_batch(engine, batch, before_commit=gate)

    writer = harness.writer(batch_max_rows=2, connections=2, write=write)
    # 10 rows, 5 batches' worth: behind, so the queue is split into one equal share per
    # connection (each at most a catch-up batch of 8).
    for update_id in range(1, 11):
        writer.add_event(*event("btcusdt", update_id, levels=0))

    assert await writer._attempt() is None
    assert [batch.rows for batch in seen] == [5, 5]
    assert await count(harness.url, "price_ticks") == 0
    assert writer.buffered == 10
    assert harness.metrics.errors["database"] == 1  # the failure, not the rollback behind it

    assert await writer._attempt() == sum(batch.rows for batch in seen[:2])
    assert [batch.batch_id for batch in seen[2:4]] == [batch.batch_id for batch in seen[:2]]
    assert checked_before_second_commit == [True]
    assert await count(harness.url, "price_ticks") == 10
    assert writer.buffered == 0


async def test_rejected_batch_records_its_hole_before_the_batch_behind_it_commits(
    harness: Harness,
) -> None:
    writer = harness.writer(batch_max_rows=4, connections=2)
    # 20 ticks, behind: split over both connections, the first batch holding the tick at 3,
    # which PostgreSQL refuses (no receipt time), and the batch behind it only ticks after it.
    for update_id in range(1, 21):
        tick, _ = event("btcusdt", update_id, levels=0)
        if update_id == 3:
            tick = (*tick[:2], None, *tick[3:])  # type: ignore[assignment]
        writer.add_event(tick, [])

    for _ in range(2):
        with pytest.raises(asyncpg.NotNullViolationError):
            await writer.flush()
    await writer.flush()  # third refusal: the first batch is dropped, its ticks become holes

    assert harness.metrics.data_loss["rejected"] > 0
    stored = await fetchval(harness.url, "SELECT count(*) FROM price_ticks")
    holes = await fetchval(harness.url, "SELECT count(*) FROM data_gaps WHERE reason = 'rejected'")
    covered = [
        await fetchval(harness.url, f"SELECT {edge} FROM data_gaps WHERE reason = 'rejected'")
        for edge in ("min(from_update_id)", "max(to_update_id)")
    ]
    first_stored = await fetchval(harness.url, "SELECT min(last_update_id) FROM price_ticks")
    # Every tick is stored or a hole; the dropped batch's ticks (from 1, past the bad one at 3)
    # are the holes, and the batch behind committed what follows them.
    assert stored + holes == 20
    assert 3 <= holes < 20
    assert covered == [1, holes]
    assert first_stored == holes + 1
    assert writer.buffered == 0


async def test_wait_capacity_blocks_while_healthy_and_behind_until_a_flush(
    harness: Harness,
) -> None:
    writer = harness.writer(batch_max_rows=5, buffer_max_rows=1000)
    high_water = 2 * CATCH_UP_FACTOR * 5  # a catch-up batch in flight, one queued behind it
    for update_id in range(1, high_water // 3 + 2):
        writer.add_event(*event("btcusdt", update_id))
    assert writer.buffered > high_water
    waiter = asyncio.create_task(writer.wait_capacity())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()  # nothing flushes: no run() task

    await writer.flush()

    await asyncio.wait_for(waiter, 5.0)
    assert writer.buffered == 0


async def test_wait_capacity_returns_at_once_while_the_database_is_away(harness: Harness) -> None:
    writer = harness.writer(via_proxy=True, batch_max_rows=5, buffer_max_rows=1000)
    await harness.proxy.cut()
    for update_id in range(1, 11):
        writer.add_event(*event("btcusdt", update_id))
    assert await writer._attempt() is None  # failed
    assert not writer.healthy

    await asyncio.wait_for(writer.wait_capacity(), 5.0)

    assert writer.buffered == 30


async def test_an_unexpected_driver_error_does_not_kill_the_writer(harness: Harness) -> None:
    # Fault injection: the first write attempt raises something no database error list names.
    engine = db.make_engine(harness.url, pool_size=1)
    harness._engines.append(engine)  # disposed with the harness
    calls = 0

    async def flaky(batch: Batch, **kwargs: Any) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("driver in an impossible state")
        return await write_batch(engine, batch, **kwargs)

    writer = harness.writer(batch_max_rows=5, write=flaky)
    task = harness.run(writer)
    for update_id in range(1, 3):  # 6 rows: one full batch
        writer.add_event(*event("btcusdt", update_id))

    await eventually(lambda: writer.buffered == 0)

    assert not task.done()
    assert calls == 2
    assert harness.metrics.errors["database"] == 1
    assert await count(harness.url, "price_ticks") == 2
    assert writer.healthy


async def test_old_batch_markers_are_pruned_and_recent_ones_kept(clean_db: str) -> None:
    conn = await asyncpg.connect(db.asyncpg_dsn(clean_db))
    try:
        await conn.execute(
            "INSERT INTO ingest_batches (batch_id, rows, written_at) "
            "SELECT gen_random_uuid(), 1, now() - make_interval(days => 2)"
            " FROM generate_series(1, 25)"
        )
        await conn.execute(
            "INSERT INTO ingest_batches (batch_id, rows) VALUES (gen_random_uuid(), 1)"
        )
        engine = db.make_engine(clean_db, pool_size=1)
        try:
            assert await prune_batch_markers(engine, chunk=10) == 25
        finally:
            await engine.dispose()
        assert await conn.fetchval("SELECT count(*) FROM ingest_batches") == 1
    finally:
        await conn.close()


async def test_orders_are_stored_exactly_as_handed_in(harness: Harness) -> None:
    # The binary COPY encoding against what PostgreSQL reads back: symbols of other lengths,
    # prices no decimal prints short, a removed level, bigint's largest id, microseconds, and
    # plain rows beside an event's levels.
    at = datetime(2025, 1, 1, 23, 59, 59, 999_999, tzinfo=UTC)
    blocks: list[Sequence[OrderRow]] = [
        EventOrders("BTCUSDT", at, 7, [(0.1 + 0.2, 1e-8), (61_234.56, 0.0)], [(61_234.57, 3.5)]),
        EventOrders("1000SATSFDUSD", at + timedelta(microseconds=1), 2**63 - 1, [], [(5e-7, 1e9)]),
        EventOrders("ETHUSDT", T0, 9, [(2_500.25, 0.125)], []),
        [("BNBUSDT", T0, 11, "ask", 590.1, 2.0), ("BNBUSDT", T0, 11, "bid", 590.0, 0.5)],
    ]
    writer = harness.writer()
    for orders in blocks:
        assert writer.add_event(None, orders)
    await writer.flush()

    conn = await asyncpg.connect(db.asyncpg_dsn(harness.url))
    try:
        stored = await conn.fetch(
            "SELECT symbol, event_time, last_update_id, side, price, quantity FROM orders"
            " ORDER BY id"
        )
    finally:
        await conn.close()
    assert [tuple(row) for row in stored] == [row for orders in blocks for row in orders]
    assert writer.rows_written["orders"] == 7


def test_an_order_row_with_no_side_is_refused_before_anything_is_queued() -> None:
    with pytest.raises(ValueError, match="order side None"):
        EventOrders.of_row(("BTCUSDT", T0, 1, None, 1.0, 1.0))  # type: ignore[arg-type]
