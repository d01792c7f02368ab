"""cryptofeed 3.x storing depthflow's rows, for a side-by-side run against the same simulator.

Runs in cryptofeed's own virtualenv (it needs Python >= 3.13), so it imports nothing of depthflow
or of the bench package: `bench/cryptofeed.py` builds that venv, starts the simulator and a
migrated database, and runs this script. cryptofeed's `Binance` feed keeps the book (its own
snapshot sync and sequence checks) and calls back once per applied event; the backend here turns
each call into the rows depthflow stores (one `price_ticks` row with the level-1 WAP, one
`orders` row per level of the event) and COPYs them in large batches on two connections, the
fastest writer we found for these tables (see bench/README.md), so cryptofeed is measured at its
best, not behind a slow backend.

Prints one JSON line once the stream has been quiet for ``--idle-s`` and every row is committed:
the window from the first frame received to the last commit, and the process's CPU seconds
over it (the quiet time after the last frame is not in either).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import asyncpg
import cryptofeed.feed
import uvloop
from cryptofeed import FeedHandler
from cryptofeed.connection import RestEndpoint, Routes, WebsocketEndpoint, WSAsyncConn
from cryptofeed.defines import ASK, BID, L2_BOOK
from cryptofeed.exchanges import Binance

TICK_COLUMNS = (
    "symbol",
    "event_time",
    "received_at",
    "first_update_id",
    "last_update_id",
    "best_bid",
    "best_bid_qty",
    "best_ask",
    "best_ask_qty",
    "wap",
)
ORDER_COLUMNS = ("symbol", "event_time", "last_update_id", "side", "price", "quantity")
CONNECTIONS = 2


class PlainWebsocket(WSAsyncConn):  # type: ignore[misc]
    """cryptofeed refuses any address but ``wss://``; the stand-in speaks plain ``ws://`` on
    loopback, as it does to depthflow (TLS would cost both sides CPU that neither pays here)."""

    def __init__(self, address: str, conn_id: str, subscription: Any = None, **kwargs: Any):
        super().__init__("wss://" + address.removeprefix("ws://"), conn_id, subscription, **kwargs)
        self.address = address


def local_binance(ws_url: str, rest_url: str) -> type[Binance]:
    """cryptofeed's spot Binance feed with its endpoints pointed at the stand-in exchange."""

    class LocalBinance(Binance):  # type: ignore[misc]
        # cryptofeed reads its endpoints from class attributes; one class per run.
        websocket_endpoints = [WebsocketEndpoint(ws_url)]  # noqa: RUF012
        rest_endpoints = [  # noqa: RUF012
            RestEndpoint(
                rest_url,
                routes=Routes("/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}"),
            )
        ]

    cryptofeed.feed.WSAsyncConn = PlainWebsocket  # what `Feed.connect` instantiates
    return LocalBinance


class Store:
    """Rows from cryptofeed's book callbacks, COPY'd by `CONNECTIONS` writers in large batches."""

    def __init__(self, pool: asyncpg.Pool, batch_rows: int) -> None:
        self.pool = pool
        self.batch_rows = batch_rows
        self.ticks: list[tuple[Any, ...]] = []
        self.orders: list[tuple[Any, ...]] = []
        self.first_frame: float | None = None
        self.cpu_at_first_frame = 0.0
        self.cpu_at_last_commit = 0.0
        self.handed = 0
        self.committed = 0
        self.last_commit = 0.0
        self.queue: asyncio.Queue[tuple[list[Any], list[Any]] | None] = asyncio.Queue(8)
        self.last_event = 0.0  # monotonic

    async def on_book(self, book: Any, receipt_timestamp: float) -> None:
        delta = book.delta
        if delta is None:  # the snapshot itself: no event to store
            return
        raw = book.raw
        symbol = raw["s"]
        event_time = datetime.fromtimestamp(raw["E"] / 1000, UTC)
        last_id = raw["u"]
        bid_px, bid_qty = book.book.bids.index(0)
        ask_px, ask_qty = book.book.asks.index(0)
        bp, bq, ap, aq = float(bid_px), float(bid_qty), float(ask_px), float(ask_qty)
        wap = (bp * aq + ap * bq) / (bq + aq)
        self.ticks.append(
            (
                symbol,
                event_time,
                datetime.fromtimestamp(receipt_timestamp, UTC),
                raw["U"],
                last_id,
                bp,
                bq,
                ap,
                aq,
                wap,
            )
        )
        for side, name in ((BID, "bid"), (ASK, "ask")):
            for price, amount in delta[side]:
                self.orders.append((symbol, event_time, last_id, name, float(price), float(amount)))
        self.handed += 1
        self.last_event = time.monotonic()
        if len(self.orders) >= self.batch_rows:
            await self.flush()

    async def flush(self) -> None:
        if self.ticks:
            await self.queue.put((self.ticks, self.orders))
            self.ticks, self.orders = [], []

    async def writer(self) -> None:
        while (item := await self.queue.get()) is not None:
            ticks, orders = item
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.copy_records_to_table("price_ticks", records=ticks, columns=TICK_COLUMNS)
                await conn.copy_records_to_table("orders", records=orders, columns=ORDER_COLUMNS)
            self.committed += len(ticks)
            self.last_commit = time.time()
            self.cpu_at_last_commit = cpu_s()


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pool = await asyncpg.create_pool(args.db_url, min_size=CONNECTIONS, max_size=CONNECTIONS)
    store = Store(pool, args.batch_rows)
    feed_class = local_binance(args.ws_url, args.rest_url)
    feed = feed_class(
        symbols=args.symbols.split(","),
        channels=[L2_BOOK],
        callbacks={L2_BOOK: store.on_book},
        depth_interval=None,  # the bare <symbol>@depth stream, as depthflow reads
    )
    handler = feed.message_handler

    async def first_frame(msg: str, conn: Any, timestamp: float) -> None:
        if store.first_frame is None:
            store.first_frame = timestamp
            store.cpu_at_first_frame = cpu_s()
        await handler(msg, conn, timestamp)

    feed.message_handler = first_frame
    log = {"filename": args.log, "level": "INFO"} if args.log else {"disabled": True}
    handler_config = {"log": log, "uvloop": True}
    fh = FeedHandler(config=handler_config)
    fh.add_feed(feed)
    running = asyncio.create_task(fh.run_async(install_signal_handlers=False))
    writers = [asyncio.create_task(store.writer()) for _ in range(CONNECTIONS)]
    # The end is the absence of events, which nothing announces: poll for it.
    while not store.handed or time.monotonic() - store.last_event < args.idle_s:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await store.flush()
    for _ in writers:
        await store.queue.put(None)
    await asyncio.gather(*writers)
    fh.request_stop()
    await running
    await pool.close()
    assert store.first_frame is not None
    return {
        "events": store.committed,
        "first_frame": store.first_frame,
        "last_commit": store.last_commit,
        "seconds": store.last_commit - store.first_frame,
        "cpu_s": store.cpu_at_last_commit - store.cpu_at_first_frame,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cryptofeed": version("cryptofeed"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ws-url", required=True)
    parser.add_argument("--rest-url", required=True)
    parser.add_argument("--db-url", required=True, help="postgresql://... (asyncpg form)")
    parser.add_argument("--symbols", required=True, help="BTC-USDT,ETH-USDT (cryptofeed names)")
    parser.add_argument("--idle-s", type=float, default=1.0, help="quiet this long: the end")
    parser.add_argument("--batch-rows", type=int, default=20_000)
    parser.add_argument("--log", help="cryptofeed's log file (default: no log)")
    # The loop depthflow gets from uvicorn here (uvloop): neither side runs on a slower one.
    result = uvloop.run(run(parser.parse_args()))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
