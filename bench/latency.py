"""Latency at a steady rate: frame receipt to rows handed to the writer.

    python -m bench latency [--rate 1000] [--seconds 20] [--warmup 2]

One symbol paced at ``--rate`` events/s (not prebuilt); once the book is live and ``--warmup``
seconds have passed, the delta of ``depthflow_latency_seconds`` over ``--seconds`` gives p50 and
p99 (interpolated within buckets, like ``histogram_quantile``) and the bucket bounding the
maximum; ``/metrics``' ring of the last 8,192 samples and the simulator-event-time-to-receipt
lag of the stored ticks (``E`` has millisecond resolution) are shown beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import httpx

from bench.machine import run_async
from bench.observe import Histogram, paced_service, scrape, wait_ready
from bench.results import (
    LOG_DIR,
    Percentiles,
    Target,
    conclude,
    markdown_table,
    ms,
)
from bench.throughput import add_server_options
from depthflow.storage.db import asyncpg_dsn

__all__ = ["LatencyResult", "main"]

P99_TARGET_S = 0.005


@dataclass(frozen=True)
class LatencyResult:
    rate: float
    seconds: float
    ticks_per_s: float
    histogram: Histogram  # the window's samples
    ring: Percentiles  # /metrics' last 8,192 samples at the end (n: not reported there)
    receipt_lag: Percentiles  # E -> received_at of the window's stored ticks (n: not counted)
    peak_rss_mb: float

    @property
    def p50_s(self) -> float:
        return self.histogram.quantile(0.5)

    @property
    def p99_s(self) -> float:
        return self.histogram.quantile(0.99)

    def targets(self) -> list[Target]:
        return [Target.below("latency.p99_s", self.p99_s, P99_TARGET_S)]


async def receipt_lag(db_url: str, start: float, end: float) -> Percentiles:
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP"
            " (ORDER BY lag) AS q, max(lag) AS max FROM (SELECT extract(epoch FROM"
            " received_at - event_time) AS lag FROM price_ticks"
            " WHERE received_at BETWEEN to_timestamp($1) AND to_timestamp($2)) t",
            start,
            end,
        )
    finally:
        await conn.close()
    q = row["q"] or [math.nan, math.nan]
    return Percentiles(int(row["n"]), float(q[0]), float(q[1]), float(row["max"] or math.nan))


async def measure(args: argparse.Namespace) -> LatencyResult:
    async with paced_service(
        ["btcusdt"],
        args.rate,
        "latency",
        database_url=args.database_url,
        redis_url=args.redis_url,
        log_dir=LOG_DIR,
    ) as running:
        async with httpx.AsyncClient(base_url=running.serve.base_url, timeout=10.0) as client:
            await wait_ready(client)
            await asyncio.sleep(args.warmup)
            before = await scrape(client)
            await asyncio.sleep(args.seconds)
            after = await scrape(client)
            document = (await client.get("/metrics")).json()
        rss = running.serve.peak_rss_bytes()
        lag = await receipt_lag(running.db_url, before.at, after.at)
    span = after.at - before.at
    return LatencyResult(
        rate=args.rate,
        seconds=span,
        ticks_per_s=(after.ticks - before.ticks) / span,
        histogram=after.latency.since(before.latency),
        ring=Percentiles(
            0, document["latency_p50"], document["latency_p99"], document["latency_max"]
        ),
        receipt_lag=lag,
        peak_rss_mb=rss / 2**20,
    )


def report(r: LatencyResult) -> None:
    h, ring, lag = r.histogram, r.ring, r.receipt_lag
    print(
        f"\n### latency: 1 symbol at {r.rate:,.0f} events/s, window {r.seconds:.1f} s after"
        f" warm-up, {h.count:,.0f} ticks ({r.ticks_per_s:,.0f}/s)\n"
    )
    rows = [
        ["frame receipt -> rows to writer, histogram delta over the window",
         ms(r.p50_s), ms(r.p99_s), f"<= {ms(h.max_bound())}", ms(h.mean)],
        ["same, /metrics ring (last 8192 samples at the end)",
         ms(ring.p50), ms(ring.p99), ms(ring.max), ""],
        ["simulator event time E -> feed receipt (E truncated to ms)",
         ms(lag.p50), ms(lag.p99), ms(lag.max), ""],
    ]  # fmt: skip
    print(markdown_table(["measure", "p50", "p99", "max", "mean"], rows))
    print(f"\n- peak RSS {r.peak_rss_mb:.0f} MB")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--rate", type=float, default=1000.0, help="events/s")
    p.add_argument("--seconds", type=float, default=20.0, help="measured window")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window")
    add_server_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    result = run_async(measure(parser().parse_args(argv)))
    report(result)
    conclude("latency", result.targets(), result)
    return 0
