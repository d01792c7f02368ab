"""Watching a running `depthflow serve` from outside: typed scrapes, its log, its database."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx

from depthflow.simulate.market import Market
from depthflow.storage.db import asyncpg_dsn
from tests.harness import prometheus
from tests.harness.databases import redis_namespace, scratch_database
from tests.harness.processes import ServeProcess, SimulatorProcess, events_named

__all__ = [
    "Completion",
    "Histogram",
    "Running",
    "Scrape",
    "Stored",
    "feed_connected_at",
    "paced_service",
    "scrape",
    "serve_env",
    "stored",
    "symbol_names",
    "wait_committed",
    "wait_ready",
]

# No progress for this long: the run failed.
STALL_S = 30.0


@dataclass(frozen=True)
class Histogram:
    """Cumulative ``(le, count)`` buckets (``+Inf`` last), with their sum and count."""

    buckets: tuple[tuple[float, float], ...]
    total: float
    count: float

    def since(self, before: Histogram) -> Histogram:
        """The samples observed after ``before`` was scraped."""
        old = dict(before.buckets)
        return Histogram(
            tuple((le, n - old.get(le, 0.0)) for le, n in self.buckets),
            self.total - before.total,
            self.count - before.count,
        )

    def quantile(self, q: float) -> float:
        """Prometheus' ``histogram_quantile``: linear within the bucket; in the +Inf bucket the
        highest finite bound; NaN without samples."""
        count = self.buckets[-1][1] if self.buckets else 0.0
        if count <= 0:
            return math.nan
        rank = q * count
        lower, below = 0.0, 0.0
        for le, n in self.buckets:
            if n >= rank:
                if math.isinf(le):
                    return lower
                inside = n - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, n
        return lower

    def max_bound(self) -> float:
        """Upper bound of the highest non-empty bucket (the histogram's bound on the maximum)."""
        below, highest = 0.0, math.nan
        for le, n in self.buckets:
            if n > below:
                highest = le
            below = n
        return highest

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan


@dataclass(frozen=True)
class Scrape:
    """The numbers of one ``/prometheus`` answer the benchmarks use."""

    at: float  # time.time() when the answer arrived
    sent_at: float  # time.time() when the request went out
    messages: float
    ticks: float
    rows_written: Mapping[str, float]
    data_loss: Mapping[str, float]
    buffered_rows: float
    analytics_pending: float
    loop_lag_max_s: float  # the largest event-loop lag of the last minute (serve's own gauge)
    books_in_sync: Mapping[str, float]
    latency: Histogram

    @property
    def committed_ticks(self) -> float:
        return self.rows_written.get("price_ticks", 0.0)

    @property
    def all_books_live(self) -> bool:
        return bool(self.books_in_sync) and all(v == 1.0 for v in self.books_in_sync.values())


async def scrape(client: httpx.AsyncClient) -> Scrape:
    sent_at = time.time()
    s = await prometheus.scrape(client)
    buckets = sorted(
        (float(labels["le"]), value)
        for name, labels, value in s.samples
        if name == "depthflow_latency_seconds_bucket"
    )
    return Scrape(
        at=s.at,
        sent_at=sent_at,
        messages=s.value("depthflow_messages_total"),
        ticks=s.value("depthflow_ticks_total"),
        rows_written=s.by_label("depthflow_rows_written_total", "table"),
        data_loss=s.by_label("depthflow_data_loss_total", "reason"),
        buffered_rows=s.value("depthflow_buffered_rows"),
        analytics_pending=s.value("depthflow_analytics_pending"),
        loop_lag_max_s=s.value("depthflow_event_loop_lag_max_seconds"),
        books_in_sync=s.by_label("depthflow_book_in_sync", "symbol"),
        latency=Histogram(
            tuple(buckets),
            s.value("depthflow_latency_seconds_sum"),
            s.value("depthflow_latency_seconds_count"),
        ),
    )


@dataclass(frozen=True)
class Completion:
    """When the last tick of a run was committed, as seen from outside."""

    scrape: Scrape  # serve's counters once every tick was committed
    committed_at: float  # time.time() of the first query that saw every tick stored
    committed_after: float  # ... of the query before it (the commit came later)
    scrapes: int  # /prometheus requests made
    queries: int  # counting queries made


async def wait_committed(
    client: httpx.AsyncClient,
    db_url: str,
    expected: int,
    *,
    poll_s: float = 0.2,
    query_s: float = 0.01,
) -> Completion:
    """Wait until serve received ``expected`` frames and its database holds every tick.

    ``/prometheus`` every ``poll_s`` until every frame is in (a scrape costs serve ~2 ms of CPU,
    and its answer waits behind the frames being handled); then the ticks stored are counted in
    PostgreSQL every ``query_s`` (committed rows only: the writer's tail, seen without going
    through serve's loop) until they reach ``depthflow_ticks_total``, confirmed by a scrape.
    """
    scrapes = queries = 0
    progress: tuple[float, float] = (-1.0, -1.0)
    moved = time.monotonic()

    def check_progress(s: Scrape, stored_ticks: float) -> None:
        nonlocal progress, moved
        if (s.messages, stored_ticks) != progress:
            progress, moved = (s.messages, stored_ticks), time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise TimeoutError(f"no progress for {STALL_S} s: {s}")

    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        while True:
            s = await scrape(client)
            scrapes += 1
            check_progress(s, s.committed_ticks)
            if s.messages >= expected:
                break
            await asyncio.sleep(poll_s)
        before = time.time()
        while True:
            asked = time.time()
            count = float(await conn.fetchval("SELECT count(*) FROM price_ticks"))
            answered = time.time()
            queries += 1
            if count >= s.ticks:
                s = await scrape(client)  # the ticks total is final once no replay runs
                scrapes += 1
                if count == s.ticks == s.committed_ticks:
                    return Completion(s, answered, before, scrapes, queries)
            check_progress(s, count)
            before = asked
            await asyncio.sleep(query_s)
    finally:
        await conn.close()


def feed_connected_at(serve: ServeProcess) -> float:
    """Epoch time of serve's first ``feed_connected`` log line (millisecond resolution,
    rounded down): just before its first frame arrives, so a window from it is not shorter
    than one from that frame."""
    lines = events_named(serve, "feed_connected")
    if not lines:
        raise RuntimeError(f"serve never logged feed_connected:\n{serve.tail(40)}")
    return datetime.fromisoformat(str(lines[0]["time"])).timestamp()


@dataclass(frozen=True)
class Stored:
    """Rows stored per table, and the receipt times of the first and last stored tick."""

    price_ticks: int
    orders: int
    trading_signals: int
    first_received: float
    last_received: float


async def stored(db_url: str) -> Stored:
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, min(received_at) AS first, max(received_at) AS last"
            " FROM price_ticks"
        )
        orders = await conn.fetchval("SELECT count(*) FROM orders")
        signals = await conn.fetchval("SELECT count(*) FROM trading_signals")
    finally:
        await conn.close()
    return Stored(
        price_ticks=int(row["n"]),
        orders=int(orders),
        trading_signals=int(signals),
        first_received=row["first"].timestamp() if row["first"] else math.nan,
        last_received=row["last"].timestamp() if row["last"] else math.nan,
    )


def serve_env(
    *,
    db_url: str,
    redis_url: str,
    redis_prefix: str,
    ws_url: str,
    rest_url: str,
    symbols: Sequence[str],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """What a user sets to run the service against a stand-in exchange; the rest default."""
    return {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": redis_prefix,
        "SYMBOLS": ",".join(symbols),
        "BINANCE_WS_URL": ws_url,
        "BINANCE_REST_URL": rest_url,
        "LOG_LEVEL": "INFO",
        # The log is read back (feed_connected); JSON whatever the terminal.
        "LOG_FORMAT": "json",
        **(extra or {}),
    }


# Realistic names first; the rest only have to be valid, distinct stream names.
_NAMED_SYMBOLS = ("btcusdt", "ethusdt", "bnbusdt", "solusdt", "xrpusdt")


def symbol_names(n: int) -> list[str]:
    """``n`` distinct lower-case symbols accepted by both the simulator and `Settings`.

    Names whose simulated book starts with a bid at or below 0 are skipped: `Market` seeds 100 bid
    levels 1-3 ticks apart below a mid of ``base * 100`` ticks, so a base price of 1 (``xrpusdt``,
    some hashed names) yields prices <= 0, which the decoder rightly rejects as malformed.
    """
    candidates = [*_NAMED_SYMBOLS, *(f"coin{i:03d}usdt" for i in range(10 * n))]
    return [name for name in candidates if _positive_book(name)][:n]


def _positive_book(symbol: str) -> bool:
    bids = Market(symbol, seed=1, record_wap=False).snapshot(5000)["bids"]
    return all(not price.startswith(("-", "0.00000000")) for price, _ in bids)


@dataclass(frozen=True)
class Running:
    """A paced simulator and a `depthflow serve` following it on a fresh database."""

    sim: SimulatorProcess
    serve: ServeProcess
    db_url: str


@contextlib.asynccontextmanager
async def paced_service(
    symbols: Sequence[str],
    rate_per_symbol: float,
    tag: str,
    *,
    database_url: str,
    redis_url: str,
    log_dir: Path,
) -> AsyncIterator[Running]:
    """`depthflow simulate` at ``rate_per_symbol`` events/s a symbol (its clock starts at the
    first subscriber), a fresh database and Redis namespace, and a started service on them."""
    args = ["--symbols", ",".join(symbols), "--rate", str(rate_per_symbol)]
    sim = SimulatorProcess(args, log_dir / f"simulate-{tag}.log")
    async with (
        sim,
        scratch_database(database_url, "depthflow_bench") as db_url,
        redis_namespace(redis_url, "depthflow-bench") as prefix,
    ):
        env = serve_env(
            db_url=db_url,
            redis_url=redis_url,
            redis_prefix=prefix,
            ws_url=sim.ws_url,
            rest_url=sim.rest_url,
            symbols=symbols,
        )
        async with ServeProcess(env, log_dir / f"serve-{tag}-{sim.port}.log") as serve:
            yield Running(sim, serve, db_url)


async def wait_ready(client: httpx.AsyncClient, wait_s: float = 30.0) -> None:
    """Until ``/ready`` says every book is in sync."""
    deadline = time.monotonic() + wait_s
    while (await client.get("/ready")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("service not ready (books not in sync)")
        await asyncio.sleep(0.1)
