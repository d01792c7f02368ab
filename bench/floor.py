"""The floor: the fastest way found to put depthflow's rows into depthflow's tables.

From the same frames depthflow gets (a simulator's websocket stream, or a recording file), one
``price_ticks`` row per event and one ``orders`` row per level, with the columns depthflow fills
(`depthflow.records`), COPY'd by ``connections`` workers, each on its own connection, taking
batches of at least ``batch_rows`` rows (ticks and orders of whole events, one transaction each)
from one queue. No book, no validation, no analytics: the event's first bid and ask stand in for
the best levels, so the rows have depthflow's shape and count, not its content.

Two encodings (bench/README.md has the figures that chose the default):
- ``records``: tuples of Python values, encoded by asyncpg (`copy_records_to_table`, binary).
- ``text``: COPY text lines built straight from the frame's decimal strings (no float parsing
  but for the tick's four best values), sent with `copy_to_table`.

The window starts at the first frame read and ends when the last batch is committed.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

import asyncpg
import msgspec
from websockets.asyncio.client import connect

from bench.machine import MachineCpu
from depthflow.events import decode_frame
from depthflow.pipeline import wap
from depthflow.recording import RecordedFrame, read_recording
from depthflow.records import ORDER_COLUMNS, TICK_COLUMNS, OrderRow, TickRow
from depthflow.storage.db import asyncpg_dsn
from depthflow.storage.partitions import ensure_spans, spans_between

__all__ = [
    "DEFAULT_BATCH_ROWS",
    "DEFAULT_CONNECTIONS",
    "DEFAULT_ENCODING",
    "Encoding",
    "FloorConfig",
    "FloorRun",
    "floor_from_recording",
    "floor_from_stream",
    "stream_url",
]

Encoding = Literal["records", "text"]
# The best of the configurations measured on this 2-core machine (bench/README.md).
DEFAULT_CONNECTIONS = 2
DEFAULT_BATCH_ROWS = 20_000
DEFAULT_ENCODING: Encoding = "records"

# The feed's own websocket settings (depthflow.feed), so the floor reads as it does.
_WS_MAX_SIZE = 2**22
_WS_MAX_QUEUE = 1024
# Reading a burst of queued frames never suspends: hand the loop to the COPY workers this often.
_YIELD_EVERY = 32
_DAY_MS = 86_400_000


@dataclass(frozen=True)
class FloorConfig:
    connections: int = DEFAULT_CONNECTIONS
    batch_rows: int = DEFAULT_BATCH_ROWS
    encoding: Encoding = DEFAULT_ENCODING

    @property
    def label(self) -> str:
        return f"{self.connections} conn / {self.batch_rows:,} rows / {self.encoding}"


@dataclass(frozen=True)
class FloorRun:
    """One floor run: what it stored, in how long (first frame read to last commit)."""

    config: FloorConfig
    events: int
    tick_rows: int
    order_rows: int
    seconds: float
    client_cpu_s: float  # this process (reading, decoding, building, encoding)
    machine_busy: float  # share of the whole machine's CPU time over the window

    @property
    def rows(self) -> int:
        return self.tick_rows + self.order_rows

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


# -- rows ------------------------------------------------------------------------------------------


class _TextEvent(msgspec.Struct):
    E: int
    s: str
    U: int
    u: int
    b: list[tuple[str, str]]
    a: list[tuple[str, str]]


class _TextFrame(msgspec.Struct):
    data: _TextEvent


_text_frames = msgspec.json.Decoder(_TextFrame)


@dataclass
class _Batch:
    """Rows of whole events; ``days``: the event days (for their time partitions)."""

    encoding: Encoding
    ticks: list[Any] = field(default_factory=list)
    orders: list[Any] = field(default_factory=list)
    days: set[int] = field(default_factory=set)

    @property
    def rows(self) -> int:
        return len(self.ticks) + len(self.orders)

    def add(self, raw: str | bytes, received_at: float) -> None:
        if self.encoding == "text":
            self._add_text(raw, received_at)
        else:
            self._add_records(raw, received_at)

    def _add_records(self, raw: str | bytes, received_at: float) -> None:
        event = decode_frame(raw)
        symbol = event.symbol
        event_time = datetime.fromtimestamp(event.event_time / 1000, UTC)
        last_id = event.last_update_id
        orders: list[OrderRow] = self.orders
        orders.extend((symbol, event_time, last_id, "bid", p, q) for p, q in event.bids)
        orders.extend((symbol, event_time, last_id, "ask", p, q) for p, q in event.asks)
        bid_px, bid_qty = event.bids[0] if event.bids else (1.0, 1.0)
        ask_px, ask_qty = event.asks[0] if event.asks else (bid_px, bid_qty)
        tick: TickRow = (
            symbol,
            event_time,
            datetime.fromtimestamp(received_at, UTC),
            event.first_update_id,
            last_id,
            bid_px,
            bid_qty,
            ask_px,
            ask_qty,
            _wap(bid_px, bid_qty, ask_px, ask_qty),
        )
        self.ticks.append(tick)
        self.days.add(event.event_time // _DAY_MS)

    def _add_text(self, raw: str | bytes, received_at: float) -> None:
        event = _text_frames.decode(raw).data
        # The same datetime depthflow computes, rendered to the microsecond PostgreSQL keeps.
        event_time = datetime.fromtimestamp(event.E / 1000, UTC).isoformat()
        head = f"{event.s}\t{event_time}\t{event.u}\t"
        self.orders.extend(f"{head}bid\t{p}\t{q}\n" for p, q in event.b)
        self.orders.extend(f"{head}ask\t{p}\t{q}\n" for p, q in event.a)
        bid_px, bid_qty = (float(v) for v in event.b[0]) if event.b else (1.0, 1.0)
        ask_px, ask_qty = (float(v) for v in event.a[0]) if event.a else (bid_px, bid_qty)
        received = datetime.fromtimestamp(received_at, UTC).isoformat()
        # repr() is the shortest text that reads back as the same double.
        self.ticks.append(
            f"{event.s}\t{event_time}\t{received}\t{event.U}\t{event.u}\t{bid_px!r}\t{bid_qty!r}"
            f"\t{ask_px!r}\t{ask_qty!r}\t{_wap(bid_px, bid_qty, ask_px, ask_qty)!r}\n"
        )
        self.days.add(event.E // _DAY_MS)


def _wap(bid_px: float, bid_qty: float, ask_px: float, ask_qty: float) -> float:
    # A removed level carries quantity 0: keep the spec's formula without dividing by zero.
    return wap(bid_px, bid_qty, ask_px, ask_qty) if bid_qty + ask_qty > 0 else bid_px


# -- writing ---------------------------------------------------------------------------------------


async def _copy(conn: Any, batch: _Batch) -> None:
    async with conn.transaction():
        if batch.encoding == "text":
            for table, columns, lines in (
                ("price_ticks", TICK_COLUMNS, batch.ticks),
                ("orders", ORDER_COLUMNS, batch.orders),
            ):
                data = io.BytesIO("".join(lines).encode())
                await conn.copy_to_table(table, source=data, columns=list(columns), format="text")
        else:
            await conn.copy_records_to_table(
                "price_ticks", records=batch.ticks, columns=list(TICK_COLUMNS)
            )
            await conn.copy_records_to_table(
                "orders", records=batch.orders, columns=list(ORDER_COLUMNS)
            )


async def _worker(conn: Any, queue: asyncio.Queue[_Batch | None]) -> None:
    while (batch := await queue.get()) is not None:
        await _copy(conn, batch)


class _Sink:
    """Batches rows and hands full batches to the COPY workers; creates the time partitions a
    batch needs before it is queued (the days of live data exist already; a recording's may
    not)."""

    def __init__(self, config: FloorConfig, conns: list[Any], ddl: Any) -> None:
        self.config = config
        self._ddl = ddl
        self._queue: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=2 * len(conns))
        self._workers = [asyncio.create_task(_worker(c, self._queue)) for c in conns]
        self._batch = _Batch(config.encoding)
        self._days: set[int] = set()
        self.events = 0

    async def add(self, raw: str | bytes, received_at: float) -> None:
        self._batch.add(raw, received_at)
        self.events += 1
        if self._batch.rows >= self.config.batch_rows:
            await self._seal()
        elif self.events % _YIELD_EVERY == 0:
            await asyncio.sleep(0)

    async def finish(self) -> None:
        """Queue the last batch and wait for every commit."""
        if self._batch.rows:
            await self._seal()
        for _ in self._workers:
            await self._queue.put(None)
        await asyncio.gather(*self._workers)

    async def cancel(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)

    async def _seal(self) -> None:
        batch, self._batch = self._batch, _Batch(self.config.encoding)
        new = batch.days - self._days
        if new:
            days = [date.fromordinal(date(1970, 1, 1).toordinal() + d) for d in sorted(new)]
            await ensure_spans(self._ddl, list(spans_between(days[0], days[-1], 1)))
            self._days |= new
        await self._queue.put(batch)


async def _run(
    db_url: str, config: FloorConfig, frames: AsyncIterator[tuple[str | bytes, float]]
) -> FloorRun:
    dsn = asyncpg_dsn(db_url)
    # One more connection for partitions and the final counts: the workers' are always busy.
    ddl, *conns = [await asyncpg.connect(dsn) for _ in range(config.connections + 1)]
    try:
        sink = _Sink(config, conns, ddl)
        try:
            first, machine, cpu = 0.0, MachineCpu(), 0.0
            async for raw, received_at in frames:
                if sink.events == 0:
                    first, machine, cpu = time.perf_counter(), MachineCpu(), time.process_time()
                await sink.add(raw, received_at)
            await sink.finish()
        finally:
            await sink.cancel()
        seconds = time.perf_counter() - first
        busy, client_cpu = machine.busy(), time.process_time() - cpu
        ticks = await ddl.fetchval("SELECT count(*) FROM price_ticks")
        orders = await ddl.fetchval("SELECT count(*) FROM orders")
    finally:
        for conn in (ddl, *conns):
            await conn.close()
    return FloorRun(config, sink.events, ticks, orders, seconds, client_cpu, busy)


def stream_url(ws_url: str, symbols: Iterable[str]) -> str:
    """The combined-stream URL depthflow subscribes to (DEPTH_INTERVAL_MS=100)."""
    return f"{ws_url}/stream?streams={'/'.join(s + '@depth@100ms' for s in symbols)}"


async def floor_from_stream(
    ws_url: str, symbols: Iterable[str], expected: int, db_url: str, config: FloorConfig
) -> FloorRun:
    """Read ``expected`` frames of ``symbols`` from a simulator into ``db_url`` (migrated)."""

    async def frames() -> AsyncIterator[tuple[str | bytes, float]]:
        async with connect(
            stream_url(ws_url, symbols), max_size=_WS_MAX_SIZE, max_queue=_WS_MAX_QUEUE
        ) as ws:
            for _ in range(expected):
                # Bytes: msgspec reads UTF-8 itself, so the text decoding is saved.
                raw = await ws.recv(decode=False)
                yield raw, time.time()

    return await _run(db_url, config, frames())


async def floor_from_recording(path: Path, db_url: str, config: FloorConfig) -> FloorRun:
    """Every frame of a `depthflow record` file into ``db_url`` (migrated), its recorded
    receipt times as ``received_at`` (what `depthflow replay` stores)."""

    async def frames() -> AsyncIterator[tuple[str | bytes, float]]:
        for item in read_recording(path):
            if isinstance(item, RecordedFrame):
                yield item.raw, item.received_at

    return await _run(db_url, config, frames())
