"""Whole-market scale: 1,500 symbols from a simulator, one `depthflow serve`, the weight budget.

    python -m bench scale [--symbols 1500] [--total-rate 3000] [--snapshot-limit 100]
        [--weight-per-minute 3000] [--duration 60] [--out FILE] [--py-spy PATH] [--pattern]

A `depthflow simulate --symbols-count N --total-rate R --weight-limit 6000` (its own process, so
its own core) serves N symbols sharing R events/s Zipf-like; a `depthflow serve` (the explicit
list of the simulator's names, or ``*`` with ``--pattern``; ``SNAPSHOT_LIMIT``,
``REST_WEIGHT_PER_MINUTE``, a fresh migrated database, a scratch Redis prefix) follows all of
them. Measured: the time until every book is live against the lower bound the weight budget
allows, the 429/418 answers and the peak weight per minute, RSS per symbol, serve's CPU, the
``/health`` latency seen by a separate process polling it every 50 ms throughout, and the ticks/s
stored over ``--duration`` seconds once every book is live.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import httpx

from bench.machine import MachineCpu, PostgresCpu, run_async
from bench.probes import HealthProbe, health_probe
from bench.pyspy import PySpy
from bench.results import (
    LOG_DIR,
    OUT_DIR,
    conclude,
)
from bench.scale_metrics import (
    Sample,
    delta,
    fixed_window_bound_s,
    lower_bound_s,
    sample,
    weight_per_window,
)
from bench.scale_result import ScaleResult, Steady, SyncPhase, health_stats, report
from bench.throughput import add_server_options
from depthflow.rest import depth_weight
from depthflow.simulate.activity import generated_symbols
from depthflow.storage.db import asyncpg_dsn
from tests.harness.databases import redis_namespace, scratch_database
from tests.harness.processes import ServeProcess, SimulatorProcess

__all__ = ["ScaleResult", "main"]

SCRAPE_S = 1.0  # /prometheus poll while waiting for the books
FLUSH_WAIT_S = 15.0
NAMED = ("btcusdt", "ethusdt")  # the simulator's first symbols; generated names follow


def served_symbols(count: int) -> list[str]:
    """The names the simulator lists for ``--symbols-count`` (its own naming function)."""
    return [*NAMED, *generated_symbols(count - len(NAMED), NAMED)][:count]


# -- running it ------------------------------------------------------------------------------------


async def wait_all_live(
    client: httpx.AsyncClient, symbols: int, timeout_s: float, samples: list[Sample]
) -> Sample | None:
    """Scrape every `SCRAPE_S` until every one of ``symbols`` books is live; None on timeout."""
    deadline = time.monotonic() + timeout_s
    last_print = 0.0
    while True:
        s = await sample(client)
        samples.append(s)
        if s.books >= symbols and s.live >= s.books:
            return s
        if time.monotonic() - last_print > 15:
            last_print = time.monotonic()
            print(
                f"  {s.live}/{s.books} live, weight sent {s.weight_total:.0f},"
                f" queue {s.rest_queue:.0f}, 429s {s.statuses('429'):.0f}",
                flush=True,
            )
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(SCRAPE_S)


async def wait_flushed(client: httpx.AsyncClient) -> Sample:
    deadline = time.monotonic() + FLUSH_WAIT_S
    while True:
        s = await sample(client)
        if s.buffered_rows == 0 or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.2)


async def stored_ticks(db_url: str, start: float, end: float) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(db_url))
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM price_ticks"
            " WHERE received_at >= to_timestamp($1) AND received_at < to_timestamp($2)",
            start,
            end,
        )
    finally:
        await conn.close()
    return int(count)


def simulator_args(args: argparse.Namespace) -> list[str]:
    return [
        *("--symbols", ",".join(NAMED), "--symbols-count", str(args.symbols)),
        *("--total-rate", str(args.total_rate), "--weight-limit", str(args.sim_weight_limit)),
    ]


def serve_env(
    args: argparse.Namespace, sim: SimulatorProcess, db_url: str, prefix: str
) -> dict[str, str]:
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": args.redis_url,
        "REDIS_PREFIX": prefix,
        "SYMBOLS": "*" if args.pattern else ",".join(served_symbols(args.symbols)),
        "BINANCE_WS_URL": sim.ws_url,
        "BINANCE_REST_URL": sim.rest_url,
        "SNAPSHOT_LIMIT": str(args.snapshot_limit),
        "REST_WEIGHT_PER_MINUTE": str(args.weight_per_minute),
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }
    env.update(item.split("=", 1) for item in args.serve_env)
    return env


async def measure(args: argparse.Namespace) -> ScaleResult:
    sim = SimulatorProcess(simulator_args(args), LOG_DIR / "scale-simulate.log")
    async with (
        sim,
        scratch_database(args.database_url, "depthflow_bench_scale") as db_url,
        redis_namespace(args.redis_url, "depthflow-bench") as prefix,
    ):
        print(f"simulator up ({args.symbols} symbols, {args.total_rate:,.0f} events/s); serve...")
        serve = ServeProcess(serve_env(args, sim, db_url, prefix), LOG_DIR / "scale-serve.log")
        spawned = time.time()
        async with serve:
            healthy = time.time()
            print(f"serve answers /health after {healthy - spawned:.1f} s; waiting for books...")
            result = await observe(args, sim, serve, db_url, spawned, healthy)
        return _with_exit(result, serve)


def _with_exit(result: ScaleResult, serve: ServeProcess) -> ScaleResult:
    code = serve.process.returncode if serve.process is not None else None
    assert code is not None
    return dataclasses.replace(result, serve_exit_code=code)


async def observe(
    args: argparse.Namespace,
    sim: SimulatorProcess,
    serve: ServeProcess,
    db_url: str,
    spawned: float,
    healthy: float,
) -> ScaleResult:
    samples: list[Sample] = []
    async with (
        httpx.AsyncClient(base_url=serve.base_url, timeout=30.0) as client,
        health_probe(serve.base_url) as health,
    ):
        cpu0, sim0, rss0, machine = (
            serve.cpu_seconds(),
            sim.cpu_seconds(),
            serve.rss_bytes(),
            MachineCpu(),
        )
        live = await wait_all_live(client, args.symbols, args.live_timeout, samples)
        sync = SyncPhase(
            serve.cpu_seconds() - cpu0, sim.cpu_seconds() - sim0, machine.busy(), rss0,
            serve.rss_bytes(),
        )  # fmt: skip
        steady: Steady | None = None
        if live is not None:
            print(f"every book live {live.at - healthy:.0f} s after /health; steady window...")
            steady = await steady_window(args, client, serve, sim, db_url)
        final = await sample(client)
        samples.append(final)
        peak_rss = serve.peak_rss_bytes()
    return summarise(args, samples, live, final, health, steady, sync, peak_rss, spawned, healthy)


async def steady_window(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    serve: ServeProcess,
    sim: SimulatorProcess,
    db_url: str,
) -> Steady:
    before = await sample(client)
    cpu0, sim0, pg = serve.cpu_seconds(), sim.cpu_seconds(), PostgresCpu()
    machine, started = MachineCpu(), time.time()
    spy = None
    if args.py_spy is not None:
        spy = PySpy(
            args.py_spy, serve.pid, args.duration, OUT_DIR / f"scale-py-spy-{serve.pid}.txt"
        )
        await spy.start()
    await asyncio.sleep(args.duration)
    ended = time.time()
    cpu1, sim1, pg_s, busy, rss = (
        serve.cpu_seconds(), sim.cpu_seconds(), pg.seconds(), machine.busy(),
        serve.rss_bytes(),
    )  # fmt: skip
    after = await sample(client)
    profile = await spy.finish() if spy is not None else None
    await wait_flushed(client)
    span, scraped = ended - started, after.at - before.at
    return Steady(
        start=started,
        end=ended,
        ticks_stored=await stored_ticks(db_url, started, ended),
        ticks_per_s=(after.ticks - before.ticks) / scraped,
        frames_per_s=(after.messages - before.messages) / scraped,
        rows_written_per_s={
            k: (v - before.rows_written.get(k, 0.0)) / scraped
            for k, v in after.rows_written.items()
        },
        buffered_rows=(before.buffered_rows, after.buffered_rows),
        loop_lag_max_s=after.loop_lag_max_s,
        serve_cpu_cores=(cpu1 - cpu0) / span,
        simulator_cpu_cores=(sim1 - sim0) / span,
        postgres_cpu_cores=pg_s / span,
        machine_busy=busy,
        rss_bytes=rss,
        books_live_at_end=after.live,
        data_loss=delta(before.data_loss, after.data_loss),
        resyncs=delta(before.resyncs, after.resyncs),
        errors=delta(before.errors, after.errors),
        py_spy=profile,
    )


def summarise(
    args: argparse.Namespace,
    samples: Sequence[Sample],
    live: Sample | None,
    final: Sample,
    health: HealthProbe,
    steady: Steady | None,
    sync: SyncPhase,
    peak_rss: int,
    spawned: float,
    healthy: float,
) -> ScaleResult:
    weight, budget = depth_weight(args.snapshot_limit), args.weight_per_minute
    # The /health poller saw every book live first (50 ms resolution); else the scrape did.
    polled = [s for s in health.samples if s.books_live >= args.symbols and s.books >= args.symbols]
    live_at = polled[0].sent_at if polled else (live.at if live is not None else math.nan)
    first_rest = next((s.at for s in samples if s.weight_total > 0), healthy)
    windows = weight_per_window(samples)
    ttl = sorted(final.time_to_live.values())
    return ScaleResult(
        symbols=args.symbols,
        symbols_setting="*" if args.pattern else "explicit list",
        total_rate=args.total_rate,
        snapshot_limit=args.snapshot_limit,
        snapshot_weight=weight,
        weight_per_minute=budget,
        all_live=live is not None,
        books_live_at_end_of_wait=samples[-2].live if len(samples) > 1 else final.live,
        seconds_to_health=healthy - spawned,
        seconds_to_all_live_from_spawn=live_at - spawned,
        seconds_to_all_live_from_health=live_at - healthy,
        first_rest_seen_after_health_s=first_rest - healthy,
        lower_bound_s=lower_bound_s(args.symbols, weight, budget),
        fixed_window_bound_s=fixed_window_bound_s(args.symbols, weight, budget, healthy),
        book_time_to_live_p50_s=ttl[len(ttl) // 2] if ttl else math.nan,
        book_time_to_live_max_s=ttl[-1] if ttl else math.nan,
        rest_requests=final.rest,
        http_429=final.statuses("429"),
        http_418=final.statuses("418"),
        rest_throttled_s=final.throttled_s,
        rest_banned_s=final.banned_s,
        weight_sent_total=final.weight_total,
        weight_per_window={str(k): v for k, v in windows.items()},
        peak_weight_per_minute_counter=max(windows.values(), default=0.0),
        peak_weight_per_minute_estimate=max((s.used_weight for s in samples), default=0.0),
        snapshots=final.snapshots,
        resyncs=final.resyncs,
        errors=final.errors,
        data_loss=final.data_loss,
        sync=sync,
        peak_rss_bytes=peak_rss,
        health=health_stats(health, live_at, steady),
        steady=steady,
        timeline=[
            (round(s.at - healthy, 2), s.live, s.books, s.weight_total, s.used_weight)
            for s in samples
        ],
        serve_exit_code=0,  # set once serve has stopped
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench scale", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--symbols", type=int, default=1500)
    p.add_argument("--total-rate", type=float, default=3000.0, help="events/s over all symbols")
    p.add_argument("--snapshot-limit", type=int, default=100, help="serve's SNAPSHOT_LIMIT")
    p.add_argument(
        "--weight-per-minute", type=int, default=3000, help="serve's REST_WEIGHT_PER_MINUTE"
    )
    p.add_argument("--sim-weight-limit", type=int, default=6000, help="simulator's weight limit")
    p.add_argument("--duration", type=float, default=60.0, help="steady seconds after all live")
    p.add_argument("--live-timeout", type=float, default=900.0, help="give up waiting after this")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    add_server_options(p)
    p.add_argument(
        "--pattern",
        action="store_true",
        help="SYMBOLS=* (resolved through exchangeInfo) instead of the explicit list",
    )
    p.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--py-spy", default=None, metavar="PATH", help="profile serve when steady")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run_async(measure(args))
    print()
    print(report(result))
    path = conclude("scale", result.targets(), result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(path.read_text())
    return 0 if result.all_live else 1
