"""End-to-end benchmark: `depthflow simulate` -> `depthflow serve` -> PostgreSQL, vs two floors.

Subcommands (each prints markdown tables and writes a JSON result to ``bench/out/``)::

    python bench/e2e.py throughput [--symbols 1 50] [--events 200000] [--log-levels INFO WARNING]
    python bench/e2e.py latency [--rate 1000] [--seconds 20]
    python bench/e2e.py monitoring [--rate 5000] [--seconds 15]
    python bench/e2e.py all

``throughput`` serves ``--events`` prebuilt events (split over the symbols) at full speed from a
fresh simulator to each of: (a) a bare websockets client with depthflow's decoder, (b) the
irreducible pipeline (read, decode, COPY the same ``price_ticks`` and ``orders`` rows in batches of
5,000), (c) the real service; it reports depthflow's ticks/s as a ratio of (b). Uses the real
PostgreSQL and Redis on 127.0.0.1 (``--database-url``, ``--redis-url``); every database, Redis key
and process it creates is removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from websockets.asyncio.client import connect

from _common import (
    DEFAULT_REDIS,
    DEFAULT_SERVER,
    OUT_DIR,
    CpuMeter,
    MachineCpu,
    Scrape,
    ServeHandle,
    SimulatorHandle,
    bucket_delta,
    environment,
    fresh_database,
    histogram_quantile,
    markdown_table,
    max_bucket,
    redis_namespace,
    run_async,
    scrape,
    serve_process,
    simulator_process,
    symbol_names,
    write_result,
)
from depthflow.config import Settings
from depthflow.events import DepthEvent, decode_frame
from depthflow.pipeline import wap
from depthflow.records import ORDER_COLUMNS, TICK_COLUMNS, OrderRow, TickRow
from depthflow.storage.db import asyncpg_dsn
from depthflow.storage.writer import CATCH_UP_FACTOR

# The feed's own websocket settings (depthflow.feed), so floor (a) reads exactly as it does.
WS_MAX_SIZE = 2**22
WS_MAX_QUEUE = 1024
YIELD_EVERY = 32  # the feed hands the loop over this often; so do the floors
COPY_BATCH_ROWS: int = Settings.model_fields["batch_max_rows"].default
# The writer's own policy: up to this many batches per transaction while behind, and a
# backpressure high water of twice that.
CATCH_UP_BATCHES = CATCH_UP_FACTOR
COPY_QUEUE_BATCHES = 2 * CATCH_UP_FACTOR
POLL_S = 0.05
STALL_S = 30.0  # no progress for this long: the run failed
LOAD_PATHS = ("/metrics", "/prometheus")
LOG_DIR = OUT_DIR / "logs"
SELF = str(Path(__file__).resolve())
PCTS = ("p50", "p99", "max")

Result = dict[str, Any]


# == floors =====================================================================================


def stream_url(ws_url: str, symbols: Sequence[str]) -> str:
    """The combined-stream URL depthflow subscribes to (DEPTH_INTERVAL_MS=100)."""
    return f"{ws_url}/stream?streams={'/'.join(s + '@depth@100ms' for s in symbols)}"


async def floor_read(sim: SimulatorHandle, symbols: Sequence[str], expected: int) -> Result:
    """Floor (a): websockets + `decode_frame`, nothing else; frames/s first frame to last."""
    first = last = 0.0
    frames = 0
    async with connect(
        stream_url(sim.ws_url, symbols), max_size=WS_MAX_SIZE, max_queue=WS_MAX_QUEUE
    ) as ws:
        async for raw in ws:
            last = time.perf_counter()
            if frames == 0:
                first = last
            decode_frame(raw)
            frames += 1
            if frames % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if frames >= expected:
                break
    seconds = last - first
    return {"frames": frames, "seconds": seconds, "frames_per_s": frames / seconds}


def event_rows(event: DepthEvent, received_at: float) -> tuple[TickRow, list[OrderRow]]:
    """The rows depthflow stores for one event, built without a book (content is irrelevant).

    The event's first bid and ask stand in for the best levels, so there is one tick per event
    and one order row per level, as in the service.
    """
    symbol = event.symbol
    event_time = datetime.fromtimestamp(event.event_time / 1000, UTC)
    last_id = event.last_update_id
    orders: list[OrderRow] = [(symbol, event_time, last_id, "bid", p, q) for p, q in event.bids]
    orders.extend((symbol, event_time, last_id, "ask", p, q) for p, q in event.asks)
    bid_px, bid_qty = event.bids[0] if event.bids else (1.0, 1.0)
    ask_px, ask_qty = event.asks[0] if event.asks else (bid_px, bid_qty)
    # Removed levels carry quantity 0; keep the spec's formula without dividing by zero.
    price = wap(bid_px, bid_qty, ask_px, ask_qty) if bid_qty + ask_qty > 0 else bid_px
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
        price,
    )
    return tick, orders


Batch = tuple[list[TickRow], list[OrderRow]]


async def copy_batches(conn: Any, queue: asyncio.Queue[Batch | None]) -> None:
    """COPY queued batches (ticks then orders) in one transaction each; when batches are waiting,
    up to CATCH_UP_BATCHES of them go in one transaction, the writer's own catch-up policy, so
    the floor is not slowed by more commits than depthflow makes."""
    done = False
    while not done:
        first = await queue.get()
        if first is None:
            return
        ticks, orders = list(first[0]), list(first[1])
        for _ in range(CATCH_UP_BATCHES - 1):
            if queue.empty():
                break
            more = queue.get_nowait()
            if more is None:
                done = True
                break
            ticks.extend(more[0])
            orders.extend(more[1])
        async with conn.transaction():
            await conn.copy_records_to_table("price_ticks", records=ticks, columns=TICK_COLUMNS)
            await conn.copy_records_to_table("orders", records=orders, columns=ORDER_COLUMNS)


async def floor_copy(
    sim: SimulatorHandle, symbols: Sequence[str], expected: int, db_url: str
) -> Result:
    """Floor (b): read, decode, build rows, COPY them (one writer task, 5,000-row batches)."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    machine = MachineCpu()
    cpu_before = time.process_time()
    try:
        queue: asyncio.Queue[Batch | None] = asyncio.Queue(maxsize=COPY_QUEUE_BATCHES)
        writer = asyncio.create_task(copy_batches(conn, queue))
        try:
            first, frames = await _read_into(sim, symbols, expected, queue)
            await queue.put(None)
            await writer
        finally:
            writer.cancel()
        seconds = time.perf_counter() - first
        busy = machine.busy()
        client_cpu = time.process_time() - cpu_before
        ticks = await conn.fetchval("SELECT count(*) FROM price_ticks")
        orders = await conn.fetchval("SELECT count(*) FROM orders")
    finally:
        await conn.close()
    return {
        "frames": frames,
        "ticks_rows": ticks,
        "orders_rows": orders,
        "seconds": seconds,
        "events_per_s": frames / seconds,
        "rows_per_s": (ticks + orders) / seconds,
        "levels_per_event": orders / max(frames, 1),
        "machine_cpu_busy": busy,
        "client_cpu_s": client_cpu,
    }


async def _read_into(
    sim: SimulatorHandle, symbols: Sequence[str], expected: int, queue: asyncio.Queue[Batch | None]
) -> tuple[float, int]:
    """Read ``expected`` frames into row batches on ``queue``; (perf time of frame 1, frames)."""
    first = 0.0
    frames = 0
    ticks: list[TickRow] = []
    orders: list[OrderRow] = []
    async with connect(
        stream_url(sim.ws_url, symbols), max_size=WS_MAX_SIZE, max_queue=WS_MAX_QUEUE
    ) as ws:
        async for raw in ws:
            if frames == 0:
                first = time.perf_counter()
            tick, rows = event_rows(decode_frame(raw), time.time())
            ticks.append(tick)
            orders.extend(rows)
            frames += 1
            if len(ticks) + len(orders) >= COPY_BATCH_ROWS:
                await queue.put((ticks, orders))
                ticks, orders = [], []
            if frames % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if frames >= expected:
                break
    await queue.put((ticks, orders))
    return first, frames


# == depthflow serve ============================================================================


def serve_env(
    db_url: str,
    redis_url: str,
    prefix: str,
    sim: SimulatorHandle,
    symbols: Sequence[str],
    level: str,
) -> dict[str, str]:
    """What a user sets to run the service against the simulator; everything else default."""
    return {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "SYMBOLS": ",".join(symbols),
        "BINANCE_WS_URL": sim.ws_url,
        "BINANCE_REST_URL": sim.rest_url,
        "LOG_LEVEL": level,
    }


async def wait_committed(client: httpx.AsyncClient, expected: int) -> Scrape:
    """Poll until every frame was received and every tick counted is committed.

    Returns the first scrape where ``depthflow_messages_total >= expected`` and
    ``depthflow_rows_written_total{table="price_ticks"} == depthflow_ticks_total``: its ``at``
    bounds the last commit from above (by at most one poll interval).
    """
    progress: tuple[float, float] = (-1.0, -1.0)
    moved = time.monotonic()
    while True:
        s = await scrape(client)
        committed = s.rows_written.get("price_ticks", 0.0)
        if s.messages >= expected and committed == s.ticks:
            return s
        if (s.messages, committed) != progress:
            progress, moved = (s.messages, committed), time.monotonic()
        elif time.monotonic() - moved > STALL_S:
            raise TimeoutError(f"no progress for {STALL_S} s: {s}")
        await asyncio.sleep(POLL_S)


async def wait_settled(client: httpx.AsyncClient, wait_s: float = 30.0) -> Scrape:
    """Poll until the analytics step and the writer are idle (signals flushed too)."""
    deadline = time.monotonic() + wait_s
    while True:
        s = await scrape(client)
        if (s.buffered_rows == 0 and s.analytics_pending == 0) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(POLL_S)


async def wait_ready(client: httpx.AsyncClient, wait_s: float = 30.0) -> None:
    deadline = time.monotonic() + wait_s
    while (await client.get("/ready")).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("service not ready (books not in sync)")
        await asyncio.sleep(0.1)


async def table_counts(db_url: str) -> Result:
    """Rows stored per table, and the receipt time of the first and last stored tick."""
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
    return {
        "price_ticks": row["n"],
        "orders": orders,
        "trading_signals": signals,
        "first_received": row["first"].timestamp() if row["first"] else math.nan,
        "last_received": row["last"].timestamp() if row["last"] else math.nan,
    }


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def depthflow_case(
    sim: SimulatorHandle,
    symbols: Sequence[str],
    expected: int,
    level: str,
    args: argparse.Namespace,
) -> Result:
    """(c): the real service from a fresh database; see `wait_committed` for the end point."""
    async with (
        fresh_database(args.database_url, "e2e") as db_url,
        redis_namespace(args.redis_url) as prefix,
    ):
        env = serve_env(db_url, args.redis_url, prefix, sim, symbols, level)
        env.update(item.split("=", 1) for item in args.serve_env)
        tag = f"{len(symbols)}sym-{level}"
        async with serve_process(env, log_dir=LOG_DIR, tag=tag) as serve:
            run = await _observe_run(serve, sim, expected)
        run["exit_code"] = serve.child.process.returncode if serve.child.process else None
        counts = await table_counts(db_url)
    return _summarise(run, counts, level)


async def _observe_run(serve: ServeHandle, sim: SimulatorHandle, expected: int) -> Result:
    cpu_before = cpu_seconds(serve.child.pid)
    sim_cpu_before = cpu_seconds(sim.child.pid)
    machine = MachineCpu()
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10.0) as client:
        done = await wait_committed(client, expected)
        busy = machine.busy()
        settled = await wait_settled(client)
        document = (await client.get("/metrics")).json()
    return {
        "done": done,
        "settled": settled,
        "metrics": document,
        "peak_rss_bytes": serve.child.peak_rss_bytes(),
        "serve_cpu_s": cpu_seconds(serve.child.pid) - cpu_before,
        "simulator_cpu_s": cpu_seconds(sim.child.pid) - sim_cpu_before,
        "machine_cpu_busy": busy,
    }


def _summarise(run: Result, counts: Result, level: str) -> Result:
    done: Scrape = run["done"]
    settled: Scrape = run["settled"]
    seconds = done.at - counts["first_received"]
    rows = counts["price_ticks"] + counts["orders"] + counts["trading_signals"]
    buckets = settled.latency_buckets
    return {
        "log_level": level,
        "seconds": seconds,
        "frames": done.messages,
        "ticks": done.ticks,
        "ticks_per_s": done.ticks / seconds,
        # Stale frames (sent before the snapshot) precede the first tick: outside the window.
        "frames_per_s": (done.messages - settled.data_loss.get("stale", 0.0)) / seconds,
        "rows_per_s": rows / seconds,
        "feed_span_s": counts["last_received"] - counts["first_received"],
        "stored": {k: counts[k] for k in ("price_ticks", "orders", "trading_signals")},
        "all_persisted": counts["price_ticks"] == done.ticks
        and counts["orders"] > 0
        and counts["trading_signals"] > 0,
        "data_loss": settled.data_loss,
        "latency_ring": {k: run["metrics"][f"latency_{k}"] for k in ("p50", "p99", "max")},
        "latency_histogram": {
            "p50": histogram_quantile(0.5, buckets),
            "p99": histogram_quantile(0.99, buckets),
            "max_bucket": max_bucket(buckets),
            "mean": settled.latency_sum / settled.latency_count if settled.latency_count else 0.0,
        },
        "peak_rss_mb": run["peak_rss_bytes"] / 2**20,
        "serve_cpu_s": run["serve_cpu_s"],
        "simulator_cpu_s": run["simulator_cpu_s"],
        "exit_code": run["exit_code"],
        "machine_cpu_busy": run["machine_cpu_busy"],
    }


# == throughput =================================================================================


async def throughput_case(n_symbols: int, args: argparse.Namespace) -> Result:
    """Floors (a), (b) and depthflow for one symbol count, each from its own fresh simulator."""
    symbols = symbol_names(n_symbols)
    per_symbol = max(1, args.events // n_symbols)
    expected = per_symbol * n_symbols
    async with contextlib.AsyncExitStack() as stack:
        # Built side by side: prebuilding is the slow part, and an idle simulator costs nothing.
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(
                    stack.enter_async_context(
                        simulator_process(symbols, rate=0, prebuild=per_symbol, log_dir=LOG_DIR)
                    )
                )
                for _ in range(2 + len(args.log_levels))
            ]
        sims = [task.result() for task in tasks]
        floor_a = await floor_read(sims[0], symbols, expected)
        async with fresh_database(args.database_url, "floor") as db_url:
            floor_b = await floor_copy(sims[1], symbols, expected, db_url)
        runs = [
            await depthflow_case(sim, symbols, expected, level, args)
            for sim, level in zip(sims[2:], args.log_levels, strict=True)
        ]
    for run in runs:
        run["ratio_to_floor_b"] = run["ticks_per_s"] / floor_b["events_per_s"]
    return {
        "symbols": n_symbols,
        "events": expected,
        "floor_a": floor_a,
        "floor_b": floor_b,
        "depthflow": runs,
    }


def print_throughput(case: Result) -> None:
    a, b = case["floor_a"], case["floor_b"]
    print(f"\n### throughput: {case['symbols']} symbol(s), {case['events']:,} prebuilt events\n")
    rows: list[list[object]] = [
        ["(a) websockets + decode", a["frames_per_s"], "", "", "", "", "", ""],
        ["(b) read + decode + COPY", b["events_per_s"], b["rows_per_s"], 1.0, "", "", "", ""],
    ]
    for run in case["depthflow"]:
        ring, hist = run["latency_ring"], run["latency_histogram"]
        rows.append(
            [
                f"depthflow serve (LOG_LEVEL={run['log_level']})",
                run["ticks_per_s"],
                run["rows_per_s"],
                run["ratio_to_floor_b"],
                f"{_ms(hist['p50'])} / {_ms(hist['p99'])}",
                f"{_ms(ring['p50'])} / {_ms(ring['p99'])}",
                run["peak_rss_mb"],
                "yes" if run["all_persisted"] else "NO",
            ]
        )
    headers = [
        "pipeline",
        "events/s",
        "rows/s",
        "x floor (b)",
        "latency p50/p99, whole run (histogram)",
        "latency p50/p99, last 8192 (ring)",
        "peak RSS MB",
        "ticks+orders+signals stored",
    ]
    print(markdown_table(headers, rows))
    for run in case["depthflow"]:
        print(
            f"\n- LOG_LEVEL={run['log_level']}: {run['ticks']:,.0f} ticks of {run['frames']:,.0f}"
            f" frames in {run['seconds']:.2f} s from the first tick's receipt to the last tick"
            f" committed (non-stale frames/s {run['frames_per_s']:,.0f}; last tick received"
            f" after {run['feed_span_s']:.2f} s); stored {run['stored']}; data loss"
            f" {run['data_loss'] or {}} (stale = sent before the snapshot); CPU s: serve"
            f" {run['serve_cpu_s']:.1f}, simulator {run['simulator_cpu_s']:.1f}; machine CPU busy"
            f" {run['machine_cpu_busy'] * 100:.0f}% of {os.cpu_count()} cores; exit code"
            f" {run['exit_code']}"
        )
    print(
        f"- floor (b): {b['levels_per_event']:.1f} order rows per event, COPY batches of"
        f" {COPY_BATCH_ROWS:,} rows (up to {CATCH_UP_BATCHES} per transaction while behind, as"
        f" depthflow's writer); its process used {b['client_cpu_s']:.1f} CPU s in"
        f" {b['seconds']:.2f} s; machine CPU busy {b['machine_cpu_busy'] * 100:.0f}%"
    )


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.3f} ms"


async def throughput(args: argparse.Namespace) -> Result:
    cases = []
    for n in args.symbols:
        case = await throughput_case(n, args)
        print_throughput(case)
        cases.append(case)
    return {"cases": cases}


# == latency ====================================================================================


@contextlib.asynccontextmanager
async def paced_service(
    args: argparse.Namespace, symbols: Sequence[str], rate_per_symbol: float, tag: str
) -> AsyncIterator[tuple[SimulatorHandle, ServeHandle, str]]:
    """A paced simulator, a fresh database and Redis namespace, and a started service on them."""
    async with (
        simulator_process(symbols, rate=rate_per_symbol, prebuild=0, log_dir=LOG_DIR) as sim,
        fresh_database(args.database_url, tag) as db_url,
        redis_namespace(args.redis_url) as prefix,
    ):
        env = serve_env(db_url, args.redis_url, prefix, sim, symbols, "INFO")
        async with serve_process(env, log_dir=LOG_DIR, tag=tag) as serve:
            yield sim, serve, db_url


async def receipt_lag(db_url: str, start: float, end: float) -> Result:
    """Percentiles of received_at - event_time for ticks received in [start, end] (E is in ms)."""
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        row = await conn.fetchrow(
            "SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY lag) AS q,"
            " max(lag) AS max FROM (SELECT extract(epoch FROM received_at - event_time) AS lag"
            " FROM price_ticks WHERE received_at BETWEEN to_timestamp($1) AND to_timestamp($2)) t",
            start,
            end,
        )
    finally:
        await conn.close()
    q = row["q"] or [math.nan, math.nan]
    return {"p50": float(q[0]), "p99": float(q[1]), "max": float(row["max"] or math.nan)}


async def latency(args: argparse.Namespace) -> Result:
    """p50/p99/max of frame receipt -> rows handed to the writer at a steady ``--rate``."""
    async with paced_service(args, ["btcusdt"], args.rate, "latency") as (_, serve, db_url):
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10.0) as client:
            await wait_ready(client)
            await asyncio.sleep(args.warmup)
            before = await scrape(client)
            await asyncio.sleep(args.seconds)
            after = await scrape(client)
            document = (await client.get("/metrics")).json()
        rss = serve.child.peak_rss_bytes()
        lag = await receipt_lag(db_url, before.at, after.at)
    buckets = bucket_delta(before.latency_buckets, after.latency_buckets)
    count = after.latency_count - before.latency_count
    result = {
        "rate": args.rate,
        "seconds": after.at - before.at,
        "ticks_per_s": (after.ticks - before.ticks) / (after.at - before.at),
        "samples": count,
        "histogram": {
            "p50": histogram_quantile(0.5, buckets),
            "p99": histogram_quantile(0.99, buckets),
            "max_bucket": max_bucket(buckets),
            "mean": (after.latency_sum - before.latency_sum) / count if count else math.nan,
        },
        "ring": {k: document[f"latency_{k}"] for k in ("p50", "p99", "max")},
        "receipt_lag": lag,
        "peak_rss_mb": rss / 2**20,
    }
    print_latency(result)
    return result


def print_latency(r: Result) -> None:
    h, ring, lag = r["histogram"], r["ring"], r["receipt_lag"]
    print(
        f"\n### latency: 1 symbol at {r['rate']:,.0f} events/s, window {r['seconds']:.1f} s"
        f" after warm-up, {r['samples']:,.0f} ticks ({r['ticks_per_s']:,.0f}/s)\n"
    )
    rows = [
        ["frame receipt -> rows to writer, histogram delta over the window",
         _ms(h["p50"]), _ms(h["p99"]), f"<= {_ms(h['max_bucket'])}", _ms(h["mean"])],
        ["same, /metrics ring (last 8192 samples at the end)",
         _ms(ring["p50"]), _ms(ring["p99"]), _ms(ring["max"]), ""],
        ["simulator event time E -> feed receipt (E truncated to ms)",
         _ms(lag["p50"]), _ms(lag["p99"]), _ms(lag["max"]), ""],
    ]  # fmt: skip
    print(markdown_table(["measure", "p50", "p99", "max", "mean"], rows))
    verdict = "PASS" if h["p99"] < 0.005 else "FAIL"
    print(f"\n- target p99 < 5 ms at 1,000 events/s: {verdict}; peak RSS {r['peak_rss_mb']:.0f} MB")


# == monitoring under load ======================================================================


async def sequential_latency(client: httpx.AsyncClient, n: int) -> dict[str, Result]:
    """One request at a time per route (closed loop): the routes' own cost while ingesting."""
    result: dict[str, Result] = {}
    for path in LOAD_PATHS:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            (await client.get(path)).raise_for_status()
            samples.append(time.perf_counter() - started)
        result[path] = _percentiles(samples)
    return result


async def ingest_window(
    client: httpx.AsyncClient, seconds: float, pids: Mapping[str, int]
) -> Result:
    meter = CpuMeter(pids)
    before = await scrape(client)
    await asyncio.sleep(seconds)
    after = await scrape(client)
    return _window(before, after, meter)


def _window(before: Scrape, after: Scrape, meter: CpuMeter) -> Result:
    span = after.at - before.at
    loss = {k: v - before.data_loss.get(k, 0.0) for k, v in after.data_loss.items()}
    return {
        "seconds": span,
        "ticks_per_s": (after.ticks - before.ticks) / span,
        "frames_per_s": (after.messages - before.messages) / span,
        "data_loss": {k: v for k, v in loss.items() if v},
        "cpu_cores": meter.result(),
    }


async def loaded_window(
    client: httpx.AsyncClient, base_url: str, args: argparse.Namespace, pids: Mapping[str, int]
) -> tuple[Result, Result]:
    """Ingest rate while a separate process sends ``--rps`` requests/s; (ingest, HTTP stats)."""
    argv = [sys.executable, SELF, "_load", "--base-url", base_url]
    argv += ["--rps", str(args.rps), "--seconds", str(args.seconds)]
    load = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert load.stdout is not None
        ready = await asyncio.wait_for(load.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise RuntimeError(f"load generator failed to start: {ready!r}")
        meter = CpuMeter(pids)
        before = await scrape(client)
        out, _ = await asyncio.wait_for(load.communicate(), args.seconds + 30)
        after = await scrape(client)
    finally:
        if load.returncode is None:
            load.kill()
            await load.wait()
    return _window(before, after, meter), json.loads(out)


async def monitoring(args: argparse.Namespace) -> Result:
    """Ingest ticks/s without, then with, ``--rps`` monitoring requests/s; HTTP p50/p99."""
    symbols = symbol_names(args.monitor_symbols)
    per_symbol = args.rate / len(symbols)
    async with paced_service(args, symbols, per_symbol, "monitoring") as (sim, serve, _):
        pids = {"serve": serve.child.pid, "simulator": sim.child.pid}
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10.0) as client:
            await wait_ready(client)
            await asyncio.sleep(args.warmup)
            idle = await ingest_window(client, args.seconds, pids)
            sequential = await sequential_latency(client, args.probes)
            loaded, http = await loaded_window(client, serve.base_url, args, pids)
        rss = serve.child.peak_rss_bytes()
    drop = 1.0 - loaded["ticks_per_s"] / idle["ticks_per_s"]
    result = {
        "rate": args.rate,
        "symbols": len(symbols),
        "rps": args.rps,
        "unloaded": idle,
        "loaded": loaded,
        "http": http,
        "sequential": sequential,
        "ingest_drop": drop,
        "peak_rss_mb": rss / 2**20,
    }
    print_monitoring(result)
    return result


def print_monitoring(r: Result) -> None:
    idle, loaded, http = r["unloaded"], r["loaded"], r["http"]
    print(
        f"\n### monitoring under load: {r['symbols']} symbols x {r['rate'] / r['symbols']:,.0f}"
        f" events/s, {r['rps']} requests/s ({' + '.join(LOAD_PATHS)}, evenly)\n"
    )
    rows = [
        [
            name,
            *(w[k] for k in ("seconds", "ticks_per_s", "frames_per_s")),
            str(w["data_loss"] or "-"),
            *(w["cpu_cores"][k] for k in ("serve", "simulator", "machine_busy")),
        ]
        for name, w in (("unloaded", idle), ("under HTTP load", loaded))
    ]
    headers = ["window", "seconds", "ticks/s", "frames/s", "data loss"]
    headers += ["serve CPU (cores)", "simulator CPU (cores)", "machine busy (share)"]
    print(markdown_table(headers, rows))
    print()
    rows = [
        [path, s["sent"], s["ok"], s["errors"], s["skipped"], *(_ms(s[k]) for k in PCTS)]
        for path, s in http["paths"].items()
    ]
    print(markdown_table(["route", "sent", "2xx", "errors", "skipped", "p50", "p99", "max"], rows))
    worst = max(s["p99"] for s in http["paths"].values())
    one = ", ".join(
        f"{path} p50 {_ms(s['p50'])} p99 {_ms(s['p99'])}" for path, s in r["sequential"].items()
    )
    print(f"\n- one request at a time while ingesting (before the load): {one}")
    print(
        f"\n- achieved {http['achieved_rps']:.0f} requests/s"
        f" (send lag max {_ms(http['max_send_lag'])}; generator CPU"
        f" {http['cpu_cores']:.2f} cores);"
        f" ingest drop {r['ingest_drop'] * 100:.1f}% (target < 10%:"
        f" {'PASS' if r['ingest_drop'] < 0.10 else 'FAIL'}); HTTP p99 < 50 ms:"
        f" {'PASS' if worst < 0.05 else 'FAIL'}; peak RSS {r['peak_rss_mb']:.0f} MB"
    )


# == load generator (a separate process: its CPU must not be the service's) =====================


async def load_generator(base_url: str, rps: float, seconds: float) -> Result:
    """Open loop: request i goes out at start + i/rps whatever earlier ones are doing."""
    total = int(rps * seconds)
    samples: dict[str, list[float]] = {p: [] for p in LOAD_PATHS}
    stats = {p: {"sent": 0, "ok": 0, "errors": 0, "skipped": 0} for p in LOAD_PATHS}
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=2.0, limits=limits) as client:

        async def one(path: str) -> None:
            started = time.perf_counter()
            try:
                response = await client.get(path)
            except httpx.HTTPError:
                stats[path]["errors"] += 1
                return
            samples[path].append(time.perf_counter() - started)
            stats[path]["ok" if response.is_success else "errors"] += 1

        print("ready", flush=True)
        start = time.perf_counter()
        max_lag = 0.0
        for i in range(total):
            delay = start + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            max_lag = max(max_lag, -delay)
            path = LOAD_PATHS[i % len(LOAD_PATHS)]
            if len(in_flight) >= 64:  # a stuck server must not make us pile up without bound
                stats[path]["skipped"] += 1
                continue
            stats[path]["sent"] += 1
            task = asyncio.create_task(one(path))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=5.0)
        elapsed = time.perf_counter() - start
    paths = {p: {**stats[p], **_percentiles(samples[p])} for p in LOAD_PATHS}
    sent = sum(s["sent"] for s in stats.values())
    return {
        "paths": paths,
        "achieved_rps": sent / elapsed,
        "max_send_lag": max_lag,
        "cpu_cores": time.process_time() / elapsed,
    }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"p50": at(0.5), "p99": at(0.99), "max": ordered[-1]}


# == CLI ========================================================================================


COMMANDS = {"throughput": throughput, "latency": latency, "monitoring": monitoring}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("command", choices=[*COMMANDS, "all", "_load"])
    p.add_argument("--database-url", default=DEFAULT_SERVER, help="any database on the server")
    p.add_argument("--redis-url", default=DEFAULT_REDIS)
    p.add_argument("--symbols", type=int, nargs="+", default=[1, 50], help="throughput cases")
    p.add_argument("--events", type=int, default=200_000, help="throughput: total per case")
    p.add_argument(
        "--log-levels", nargs="+", default=["INFO"], help="throughput: serve's LOG_LEVEL"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="events/s, all symbols (latency 1000, monitoring 5000)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="measured window (latency 20, monitoring 15 each)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before a window starts")
    p.add_argument("--probes", type=int, default=100, help="monitoring: sequential requests")
    p.add_argument("--rps", type=float, default=200.0, help="monitoring: requests/s")
    p.add_argument(
        "--monitor-symbols", type=int, default=5, help="monitoring: symbols sharing --rate"
    )
    p.add_argument(
        "--serve-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="throughput: extra settings for depthflow serve (e.g. BATCH_MAX_ROWS=20000)",
    )
    p.add_argument("--base-url", default="", help=argparse.SUPPRESS)
    return p  # fmt: skip


async def dispatch(args: argparse.Namespace) -> Result:
    if args.command == "all":
        throughput_result = await throughput(args)
        lat = await latency(_with(args, rate=args.rate or 1000.0, seconds=args.seconds or 20.0))
        mon = await monitoring(_with(args, rate=args.rate or 5000.0, seconds=args.seconds or 15.0))
        return {"throughput": throughput_result, "latency": lat, "monitoring": mon}
    defaults = {"latency": (1000.0, 20.0), "monitoring": (5000.0, 15.0)}
    rate, seconds = defaults.get(args.command, (0.0, 0.0))
    return await COMMANDS[args.command](
        _with(args, rate=args.rate or rate, seconds=args.seconds or seconds)
    )


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "_load":
        result = run_async(load_generator(args.base_url, args.rps, args.seconds))
        print(json.dumps(result), flush=True)
        return 0
    env = environment()
    print(
        "event loop of the floors and of `depthflow serve` (uvicorn loop=auto):",
        env["event_loop"],
    )
    started = time.monotonic()
    result = run_async(dispatch(args))
    path = write_result(
        f"e2e-{args.command}", {"environment": env, "argv": sys.argv, **_plain(result)}
    )
    print(f"\n(total {time.monotonic() - started:.0f} s; result written to {path})")
    return 0


def _plain(value: Any) -> Any:
    """Scrapes (dataclasses) are left out of the JSON: the summaries carry their numbers."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, Scrape)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
