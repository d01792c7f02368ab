"""Monitoring under load: ingest with and without HTTP clients on the same event loop.

    python -m bench monitoring [--rate 5000] [--symbols 5] [--seconds 15] [--rps 200]

``--rate`` events/s spread over ``--symbols`` paced symbols; once every book is live and
``--warmup`` seconds have passed: ingest ticks/s over ``--seconds`` without HTTP load, then
``--probes`` requests one at a time to each route, then ticks/s over ``--seconds`` while a
separate process (`bench.probes`) sends ``--rps`` requests/s (open loop, half ``/metrics``,
half ``/prometheus``, at most 64 in flight, 2 s timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.machine import MachineCpu, run_async
from bench.observe import Scrape, paced_service, scrape, symbol_names, wait_ready
from bench.probes import LOAD_PATHS, LoadResult, load_probe
from bench.results import (
    LOG_DIR,
    Percentiles,
    Target,
    conclude,
    markdown_table,
    ms,
)
from bench.throughput import add_server_options
from tests.harness.processes import Child

__all__ = ["MonitoringResult", "Window", "main"]

INGEST_DROP_TARGET = 0.10
HTTP_P99_TARGET_S = 0.050


@dataclass(frozen=True)
class Window:
    seconds: float
    ticks_per_s: float
    frames_per_s: float
    data_loss: dict[str, float]
    serve_cpu_cores: float
    simulator_cpu_cores: float
    machine_busy: float


@dataclass(frozen=True)
class MonitoringResult:
    rate: float
    symbols: int
    rps: float
    unloaded: Window
    loaded: Window
    sequential: dict[str, Percentiles]  # one request at a time, while ingesting
    http: LoadResult
    peak_rss_mb: float

    @property
    def ingest_drop(self) -> float:
        return 1.0 - self.loaded.ticks_per_s / self.unloaded.ticks_per_s

    def targets(self) -> list[Target]:
        return [
            Target.below("monitoring.ingest_drop", self.ingest_drop, INGEST_DROP_TARGET),
            Target.below("monitoring.http_p99_s", self.http.worst_p99_s, HTTP_P99_TARGET_S),
        ]


class _Meter:
    """CPU of serve and the simulator (in cores) and the machine's busy share from now on."""

    def __init__(self, serve: Child, sim: Child) -> None:
        self._children = (serve, sim)
        self._before = [c.cpu_seconds() for c in self._children]
        self._machine = MachineCpu()
        self._start = time.monotonic()

    def window(self, before: Scrape, after: Scrape) -> Window:
        span = time.monotonic() - self._start
        serve, sim = (
            c.cpu_seconds() - b for c, b in zip(self._children, self._before, strict=True)
        )
        seconds = after.at - before.at
        loss = {k: v - before.data_loss.get(k, 0.0) for k, v in after.data_loss.items()}
        return Window(
            seconds=seconds,
            ticks_per_s=(after.ticks - before.ticks) / seconds,
            frames_per_s=(after.messages - before.messages) / seconds,
            data_loss={k: v for k, v in loss.items() if v},
            serve_cpu_cores=serve / span,
            simulator_cpu_cores=sim / span,
            machine_busy=self._machine.busy(),
        )


async def sequential(client: httpx.AsyncClient, n: int) -> dict[str, Percentiles]:
    out = {}
    for path in LOAD_PATHS:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            (await client.get(path)).raise_for_status()
            samples.append(time.perf_counter() - started)
        out[path] = Percentiles.of(samples)
    return out


async def measure(args: argparse.Namespace) -> MonitoringResult:
    symbols = symbol_names(args.symbols)
    async with paced_service(
        symbols,
        args.rate / len(symbols),
        "monitoring",
        database_url=args.database_url,
        redis_url=args.redis_url,
        log_dir=LOG_DIR,
    ) as running:
        serve, sim = running.serve, running.sim
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10.0) as client:
            await wait_ready(client)
            await asyncio.sleep(args.warmup)
            meter, before = _Meter(serve, sim), await scrape(client)
            await asyncio.sleep(args.seconds)
            unloaded = meter.window(before, await scrape(client))
            one_at_a_time = await sequential(client, args.probes)
            async with load_probe(serve.base_url, args.rps, args.seconds) as load:
                meter, before = _Meter(serve, sim), await scrape(client)
                http = await load.result()
                loaded = meter.window(before, await scrape(client))
        rss = serve.peak_rss_bytes()
    return MonitoringResult(
        args.rate, len(symbols), args.rps, unloaded, loaded, one_at_a_time, http, rss / 2**20
    )


def report(r: MonitoringResult) -> None:
    print(
        f"\n### monitoring under load: {r.symbols} symbols x {r.rate / r.symbols:,.0f} events/s,"
        f" {r.rps:.0f} requests/s ({' + '.join(LOAD_PATHS)}, evenly)\n"
    )
    rows = [
        [name, w.seconds, w.ticks_per_s, w.frames_per_s, str(w.data_loss or "-"),
         w.serve_cpu_cores, w.simulator_cpu_cores, w.machine_busy]
        for name, w in (("unloaded", r.unloaded), ("under HTTP load", r.loaded))
    ]  # fmt: skip
    headers = ["window", "seconds", "ticks/s", "frames/s", "data loss", "serve CPU (cores)",
               "simulator CPU (cores)", "machine busy (share)"]  # fmt: skip
    print(markdown_table(headers, rows))
    print()
    rows = [
        [path, s.sent, s.ok, s.errors, s.skipped, ms(s.latency.p50), ms(s.latency.p99),
         ms(s.latency.max)]
        for path, s in r.http.routes.items()
    ]  # fmt: skip
    print(markdown_table(["route", "sent", "2xx", "errors", "skipped", "p50", "p99", "max"], rows))
    one = ", ".join(f"{p} p50 {ms(s.p50)} p99 {ms(s.p99)}" for p, s in r.sequential.items())
    print(f"\n- one request at a time while ingesting (before the load): {one}")
    print(
        f"- achieved {r.http.achieved_rps:.0f} requests/s (send lag max"
        f" {ms(r.http.max_send_lag_s)}; generator CPU {r.http.cpu_cores:.2f} cores); ingest drop"
        f" {r.ingest_drop:.1%}; peak RSS {r.peak_rss_mb:.0f} MB"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench monitoring", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--rate", type=float, default=5000.0, help="events/s over all symbols")
    p.add_argument("--symbols", type=int, default=5, help="symbols sharing --rate")
    p.add_argument("--seconds", type=float, default=15.0, help="each measured window")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the first window")
    p.add_argument("--probes", type=int, default=100, help="sequential requests per route")
    p.add_argument("--rps", type=float, default=200.0, help="requests/s under load")
    add_server_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    result = run_async(measure(parser().parse_args(argv)))
    report(result)
    conclude("monitoring", result.targets(), result)
    return 0
