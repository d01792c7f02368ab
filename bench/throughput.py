"""Throughput: `depthflow serve` against the floor, from the same stand-in exchange stream.

    python -m bench throughput [--cases 1 50 real] [--events 60000] [--repeat 1]
        [--floor-connections 2] [--floor-batch-rows 20000] [--floor-encoding records]

Each case gets two fresh `depthflow simulate` processes sending the same frames at full speed,
one to the floor (`bench.floor`), one to a `depthflow serve` with its defaults on a fresh
database. A synthetic case (``1``, ``50``: that many symbols) prebuilds ``--events`` events split
over its symbols (``--prebuild N --rate 0``); ``real`` replays Binance's recordings of BTCUSDT and
ETHUSDT (``--replay FILE --rate 0``, both symbols on one connection as recorded).

Both windows start at the first frame received (for depthflow: its ``feed_connected`` log line,
just before; frames older than the snapshot included) and end when the last row is committed
(for depthflow: once ``/prometheus`` counts every frame received, ``price_ticks`` is counted in
its database every 10 ms; the first count equal to ``depthflow_ticks_total`` ends it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import statistics
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.floor import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_CONNECTIONS,
    DEFAULT_ENCODING,
    FloorConfig,
    FloorRun,
    floor_from_stream,
)
from bench.machine import CpuTrace, MachineCpu, run_async
from bench.observe import (
    Stored,
    feed_connected_at,
    scrape,
    serve_env,
    stored,
    symbol_names,
    wait_committed,
)
from bench.results import LOG_DIR, Target, conclude, markdown_table, ms
from tests.harness import real_data
from tests.harness.databases import redis_namespace, scratch_database
from tests.harness.processes import Child, ServeProcess, SimulatorProcess

__all__ = ["Case", "CaseResult", "DepthflowRun", "main", "measure_case"]

DEFAULT_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
RATIO_TARGET = 0.85
CPU_US_PER_EVENT_TARGET = 35.0
PEAK_RSS_MB_TARGET = 300.0
SCRAPES_TO_PRICE = 20  # scrapes after the run, to price the ones made during it


@dataclass(frozen=True)
class Case:
    key: str  # "1sym", "50sym", "real"
    symbols: tuple[str, ...]
    events: int  # frames the exchange sends
    simulator_args: tuple[str, ...]

    @property
    def synthetic(self) -> bool:
        return self.key != "real"


def synthetic_case(n_symbols: int, events: int) -> Case:
    symbols = tuple(symbol_names(n_symbols))
    per_symbol = max(1, events // n_symbols)
    args = ("--symbols", ",".join(symbols), "--rate", "0", "--prebuild", str(per_symbol))
    return Case(f"{n_symbols}sym", symbols, per_symbol * n_symbols, args)


def real_case(recording: Path) -> Case:
    frames = sum(1 for _ in real_data.spot_frames("combined"))
    args = ("--replay", str(recording), "--rate", "0")
    return Case("real", real_data.SPOT_SYMBOLS, frames, args)


@dataclass(frozen=True)
class DepthflowRun:
    """One `depthflow serve` run over a case's frames."""

    frames: float
    ticks: float
    stored: Stored
    data_loss: dict[str, float]
    seconds: float  # feed_connected to the query that saw the last tick stored
    seconds_lower_bound: float  # ... to the query before it (the commit was after)
    first_tick_received_after_s: float  # min(received_at) - feed_connected
    serve_cpu_s: float  # from feed_connected to the end of the window
    frames_at_health: float  # frames already received when /health first answered
    serve_cpu_from_health_s: float  # from /health's first answer to the end of the window
    scrapes: int  # /prometheus requests the bench made in that time
    scrape_cpu_s: float  # their estimated share of serve_cpu_s (priced after the run)
    simulator_cpu_s: float
    machine_busy: float
    peak_rss_mb: float
    latency_p50_s: float  # frame receipt to rows handed to the writer (histogram, whole run)
    latency_p99_s: float
    exit_code: int

    @property
    def events_per_s(self) -> float:
        return self.frames / self.seconds

    @property
    def rows_per_s(self) -> float:
        return (self.stored.price_ticks + self.stored.orders) / self.seconds

    @property
    def cpu_us_per_event(self) -> float:
        return self.serve_cpu_s / self.frames * 1e6 if self.frames else math.nan

    @property
    def cpu_us_per_level(self) -> float:
        """Per ``orders`` row: events of the real case carry 40+ levels, synthetic ones ~15."""
        orders = self.stored.orders
        return self.serve_cpu_s / orders * 1e6 if orders else math.nan

    @property
    def cpu_us_per_event_from_health(self) -> float:
        """The same from /health's first answer on, over the frames received after it: too
        low when it answers late (the replay of the frames buffered before it comes after)."""
        counted = self.frames - self.frames_at_health
        return self.serve_cpu_from_health_s / counted * 1e6 if counted > 0 else math.nan


@dataclass(frozen=True)
class CaseResult:
    case: Case
    floor: FloorRun
    depthflow: DepthflowRun

    @property
    def ratio(self) -> float:
        return self.depthflow.events_per_s / self.floor.events_per_s

    @property
    def rows_ratio(self) -> float:
        """The same on rows/s: frames older than the snapshot cost depthflow a decode and
        store nothing, so when many are (50 symbols), events/s flatter it and rows/s do not."""
        return self.depthflow.rows_per_s / self.floor.rows_per_s


def case_targets(rounds: Sequence[CaseResult]) -> list[Target]:
    """The targets of one case: medians over its rounds (the largest peak RSS)."""
    key = rounds[0].case.key
    targets = [
        Target.at_least(
            f"{key}.throughput_vs_floor", statistics.median(r.ratio for r in rounds), RATIO_TARGET
        ),
        Target.at_least(
            f"{key}.rows_per_s_vs_floor",
            statistics.median(r.rows_ratio for r in rounds),
            RATIO_TARGET,
        ),
    ]
    if rounds[0].case.synthetic:
        cpu = statistics.median(r.depthflow.cpu_us_per_event for r in rounds)
        targets.append(
            Target.at_most(f"{key}.serve_cpu_us_per_event", cpu, CPU_US_PER_EVENT_TARGET)
        )
    rss = max(r.depthflow.peak_rss_mb for r in rounds)
    targets.append(Target.below(f"{key}.peak_rss_mb", rss, PEAK_RSS_MB_TARGET))
    return targets


@dataclass(frozen=True)
class ThroughputResult:
    cases: list[CaseResult]  # every round of every case, in the order run

    def targets(self) -> list[Target]:
        keys = dict.fromkeys(r.case.key for r in self.cases)
        return [t for k in keys for t in case_targets([r for r in self.cases if r.case.key == k])]


# -- depthflow -------------------------------------------------------------------------------------


async def depthflow_run(
    sim: SimulatorProcess, case: Case, args: argparse.Namespace
) -> DepthflowRun:
    async with (
        scratch_database(args.database_url, "depthflow_bench") as db_url,
        redis_namespace(args.redis_url, "depthflow-bench") as prefix,
    ):
        env = serve_env(
            db_url=db_url,
            redis_url=args.redis_url,
            redis_prefix=prefix,
            ws_url=sim.ws_url,
            rest_url=sim.rest_url,
            symbols=case.symbols,
            extra=dict(item.split("=", 1) for item in args.serve_env),
        )
        serve = ServeProcess(env, LOG_DIR / f"serve-{case.key}-{sim.port}.log")
        await serve.spawn()
        async with _stopping(serve), _tracing(serve.pid) as trace:
            await serve.wait_healthy()
            # The feed starts before the HTTP server: frames may be flowing already.
            cpu_at_health, sim_cpu_start = serve.cpu_seconds(), sim.cpu_seconds()
            async with httpx.AsyncClient(base_url=serve.base_url, timeout=10.0) as client:
                at_health = await scrape(client)
                machine = MachineCpu()
                end = await wait_committed(client, db_url, case.events)
                cpu_end = serve.cpu_seconds()
                sim_cpu = sim.cpu_seconds() - sim_cpu_start
                busy = machine.busy()
                scrape_cpu = await _price_scrapes(client, serve) * (end.scrapes + 1)
            peak_rss = serve.peak_rss_bytes()
            connected = feed_connected_at(serve)
            # Start-up (imports, Numba, migrations check) is left out: the CPU it had used
            # when its feed connected, read back from the trace.
            cpu_at_connect = trace.at(connected)
        rows = await stored(db_url)
    exit_code = serve.process.returncode if serve.process is not None else None
    assert exit_code is not None
    done = end.scrape
    return DepthflowRun(
        frames=done.messages,
        ticks=done.ticks,
        stored=rows,
        data_loss=dict(done.data_loss),
        seconds=end.committed_at - connected,
        seconds_lower_bound=end.committed_after - connected,
        first_tick_received_after_s=rows.first_received - connected,
        serve_cpu_s=cpu_end - cpu_at_connect,
        frames_at_health=at_health.messages,
        serve_cpu_from_health_s=cpu_end - cpu_at_health,
        scrapes=end.scrapes + 1,
        scrape_cpu_s=scrape_cpu,
        simulator_cpu_s=sim_cpu,
        machine_busy=busy,
        peak_rss_mb=peak_rss / 2**20,
        latency_p50_s=done.latency.quantile(0.5),
        latency_p99_s=done.latency.quantile(0.99),
        exit_code=exit_code,
    )


async def _price_scrapes(client: httpx.AsyncClient, serve: ServeProcess) -> float:
    """Serve's CPU seconds per ``/prometheus`` request, measured now that it is idle (its idle
    CPU over the same time taken off)."""
    await asyncio.sleep(0.5)
    idle_start, t0 = serve.cpu_seconds(), asyncio.get_running_loop().time()
    await asyncio.sleep(0.5)
    idle_rate = (serve.cpu_seconds() - idle_start) / (asyncio.get_running_loop().time() - t0)
    start, t1 = serve.cpu_seconds(), asyncio.get_running_loop().time()
    for _ in range(SCRAPES_TO_PRICE):
        await scrape(client)
    spent = serve.cpu_seconds() - start
    idle = idle_rate * (asyncio.get_running_loop().time() - t1)
    return max(0.0, spent - idle) / SCRAPES_TO_PRICE


@contextlib.asynccontextmanager
async def _stopping(child: Child) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def _tracing(pid: int) -> AsyncIterator[CpuTrace]:
    trace = CpuTrace(pid)
    task = asyncio.create_task(trace.run())
    try:
        yield trace
    finally:
        task.cancel()
        await asyncio.wait([task])


# -- a case ----------------------------------------------------------------------------------------


async def measure_case(
    case: Case, config: FloorConfig, args: argparse.Namespace, *, depthflow_first: bool = False
) -> CaseResult:
    """The floor and depthflow on one case, each from its own fresh simulator (prebuilt frames
    and a recording go out once, to the first subscriber), one after the other."""
    async with contextlib.AsyncExitStack() as stack:
        sims = [
            SimulatorProcess(case.simulator_args, LOG_DIR / f"simulate-{case.key}-{i}.log")
            for i in range(2)
        ]
        # Built side by side: prebuilding is the slow part, and an idle simulator costs nothing.
        await asyncio.gather(*(stack.enter_async_context(sim) for sim in sims))

        async def floor() -> FloorRun:
            async with scratch_database(args.database_url, "depthflow_bench_floor") as db_url:
                run = await floor_from_stream(
                    sims[0].ws_url, case.symbols, case.events, db_url, config
                )
            await sims[0].stop()  # its frames are sent: free its memory
            return run

        if depthflow_first:
            depthflow = await depthflow_run(sims[1], case, args)
            await sims[1].stop()
            return CaseResult(case, await floor(), depthflow)
        floor_run = await floor()
        return CaseResult(case, floor_run, await depthflow_run(sims[1], case, args))


def print_case(r: CaseResult) -> None:
    f, d = r.floor, r.depthflow
    print(
        f"\n### throughput, {r.case.key}: {r.case.events:,} frames, {len(r.case.symbols)} symbols\n"
    )
    rows = [
        [f"floor ({f.config.label})", f.events_per_s, f.rows_per_s, 1.0, 1.0, "", "", ""],
        ["depthflow serve", d.events_per_s, d.rows_per_s, r.ratio, r.rows_ratio,
         d.cpu_us_per_event, d.cpu_us_per_level, d.peak_rss_mb],
    ]  # fmt: skip
    headers = ["pipeline", "events/s", "rows/s", "x floor (events)", "x floor (rows)",
               "serve CPU us/event", "serve CPU us/level", "peak RSS MB"]  # fmt: skip
    print(markdown_table(headers, rows))
    print(
        f"\n- floor: {f.events:,} events, {f.tick_rows:,} ticks + {f.order_rows:,} orders in"
        f" {f.seconds:.2f} s; its own CPU {f.client_cpu_s:.2f} s; machine busy"
        f" {f.machine_busy:.0%}"
    )
    print(
        f"- depthflow: {d.frames:,.0f} frames, {d.stored.price_ticks:,} ticks +"
        f" {d.stored.orders:,} orders + {d.stored.trading_signals:,} signals in {d.seconds:.2f} s"
        f" (last commit after {d.seconds_lower_bound:.2f} s at the least); data loss"
        f" {d.data_loss or '-'}; first stored tick received {d.first_tick_received_after_s:.2f} s"
        f" into the window; latency p50/p99 {ms(d.latency_p50_s)} / {ms(d.latency_p99_s)};"
        f" exit code {d.exit_code}"
    )
    print(
        f"- serve CPU {d.serve_cpu_s:.2f} s from feed_connected on, of which"
        f" ~{d.scrape_cpu_s:.2f} s the bench's {d.scrapes} scrapes (from /health's first answer,"
        f" {d.frames_at_health:,.0f} frames in: {d.cpu_us_per_event_from_health:.1f} us per"
        f" later frame); simulator CPU {d.simulator_cpu_s:.2f} s; machine busy"
        f" {d.machine_busy:.0%}"
    )


# -- CLI -------------------------------------------------------------------------------------------


def add_floor_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--floor-connections", type=int, default=DEFAULT_CONNECTIONS)
    p.add_argument("--floor-batch-rows", type=int, default=DEFAULT_BATCH_ROWS)
    p.add_argument("--floor-encoding", choices=["records", "text"], default=DEFAULT_ENCODING)


def floor_config(args: argparse.Namespace) -> FloorConfig:
    return FloorConfig(args.floor_connections, args.floor_batch_rows, args.floor_encoding)


def add_server_options(p: argparse.ArgumentParser, *, redis: bool = True) -> None:
    """Where a tool's scratch databases (and Redis key prefixes) go."""
    p.add_argument("--database-url", default=DEFAULT_SERVER, help="any database on the server")
    if redis:
        p.add_argument("--redis-url", default=DEFAULT_REDIS)


def add_service_options(p: argparse.ArgumentParser) -> None:
    add_server_options(p)
    p.add_argument(
        "--serve-env",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra settings for depthflow serve (e.g. BATCH_MAX_ROWS=20000)",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench throughput", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument(
        "--cases", nargs="+", default=["1", "50", "real"], help="symbol counts, and/or real"
    )
    p.add_argument("--events", type=int, default=60_000, help="per synthetic case")
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds per case; targets take the medians"
    )
    add_floor_options(p)
    add_service_options(p)
    return p


async def run(args: argparse.Namespace) -> ThroughputResult:
    config = floor_config(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="depthflow-bench-") as tmp:
        for name in args.cases:
            if name == "real":
                recording = real_data.write_spot_recording("combined", Path(tmp) / "spot.ndjson")
                case = real_case(recording)
            else:
                case = synthetic_case(int(name), args.events)
            for round_ in range(args.repeat):
                # Alternating which goes first: a slow spell of the shared machine then hits
                # the floor and depthflow alike, over the rounds.
                result = await measure_case(case, config, args, depthflow_first=round_ % 2 == 1)
                print_case(result)
                results.append(result)
    return ThroughputResult(results)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run_async(run(args))
    conclude("throughput", result.targets(), result)
    return 0
