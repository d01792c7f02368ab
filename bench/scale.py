"""Whole-market scale: 1,500 symbols from a simulator, one `depthflow serve`, the weight budget.

    python bench/scale.py [--symbols 1500] [--total-rate 3000] [--snapshot-limit 100]
                          [--weight-per-minute 3000] [--duration 60] [--out FILE]

A `depthflow simulate --symbols-count N --total-rate R --weight-limit 6000` (its own process, so
its own core) serves N symbols sharing R events/s Zipf-like; a `depthflow serve` (``SYMBOLS=*``,
``SNAPSHOT_LIMIT``, ``REST_WEIGHT_PER_MINUTE``, a fresh migrated database, a scratch Redis prefix)
follows all of them. Measured: the time until every book is live against the lower bound the
weight budget allows, the 429/418 answers and the peak weight per minute, RSS per symbol, serve's
CPU, the ``/health`` latency seen by a separate process polling it every 50 ms throughout, and
the ticks/s stored over ``--duration`` seconds once every book is live. Prints a markdown table
and writes the JSON (``--out``, default ``bench/out/scale-<time>.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from _common import (
    DEFAULT_REDIS,
    DEFAULT_SERVER,
    OUT_DIR,
    Child,
    MachineCpu,
    ServeHandle,
    environment,
    free_port,
    fresh_database,
    markdown_table,
    redis_namespace,
    run_async,
    serve_process,
    write_result,
)
from depthflow.rest import EXCHANGE_INFO_WEIGHT, depth_weight
from depthflow.simulate.activity import generated_symbols
from depthflow.storage.db import asyncpg_dsn

LOG_DIR = OUT_DIR / "logs"
SELF = str(Path(__file__).resolve())
WINDOW_S = 60.0  # Binance's (and the simulator's) fixed weight minute
SCRAPE_S = 1.0  # /prometheus poll while waiting for the books
HEALTH_POLL_S = 0.05
HEALTH_MAX_IN_FLIGHT = 16
HEALTH_TIMEOUT_S = 5.0
FLUSH_WAIT_S = 15.0
NAMED = ("btcusdt", "ethusdt")  # the simulator's first symbols; generated names follow


def served_symbols(count: int) -> list[str]:
    """The names the simulator lists for ``--symbols-count`` (its own naming function)."""
    return [*NAMED, *generated_symbols(count - len(NAMED), NAMED)][:count]


Result = dict[str, Any]


# == the simulator ==============================================================================


@dataclass(frozen=True)
class Simulator:
    child: Child
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def simulator(args: argparse.Namespace, wait_s: float = 120.0) -> AsyncIterator[Simulator]:
    """`depthflow simulate` for the whole market; yielded once it answers HTTP.

    The probe asks for an unknown path (404, no weight), so the simulator's minute starts with
    nothing used.
    """
    port = free_port()
    argv = [sys.executable, "-m", "depthflow", "simulate", "--port", str(port)]
    argv += ["--symbols", ",".join(NAMED), "--symbols-count", str(args.symbols)]
    argv += ["--total-rate", str(args.total_rate), "--weight-limit", str(args.sim_weight_limit)]
    child = Child("simulate", argv, {"LOG_LEVEL": "WARNING"}, LOG_DIR / f"scale-sim-{port}.log")
    try:
        await child.start()
        deadline = time.monotonic() + wait_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if not child.alive():
                    raise RuntimeError(f"simulator exited early:\n{child.tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"http://127.0.0.1:{port}/probe")).status_code == 404:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"simulator silent for {wait_s} s:\n{child.tail()}")
                await asyncio.sleep(0.1)
        yield Simulator(child, port)
    finally:
        await child.stop(wait_s=10.0)


# == /prometheus ================================================================================


@dataclass
class Sample:
    """What one ``/prometheus`` answer says about the sync and the REST side."""

    at: float
    books: int
    live: int
    weight_total: float
    used_weight: float  # depthflow's estimate of the IP's use in the current minute
    rest_queue: float
    rest: dict[str, float]  # "endpoint status" -> requests
    messages: float
    ticks: float
    rows_written: dict[str, float]
    data_loss: dict[str, float]
    errors: dict[str, float]
    resyncs: dict[str, float]
    snapshots: dict[str, float]
    buffered_rows: float
    throttled_s: float
    banned_s: float
    loop_lag_max: float  # the service's own largest event-loop lag of the last minute
    time_to_live: dict[str, float] = field(default_factory=dict)


async def sample(client: httpx.AsyncClient) -> Sample:
    text = (await client.get("/prometheus")).raise_for_status().text
    at = time.time()
    plain: dict[str, float] = {}
    by: dict[str, dict[str, float]] = {
        k: {} for k in ("rest", "rows", "loss", "errors", "resyncs", "snapshots", "ttl")
    }
    books = live = 0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels = s.name, s.labels
            if name == "depthflow_book_in_sync":
                books += 1
                live += s.value == 1.0
            elif name == "depthflow_book_time_to_live_seconds":
                by["ttl"][labels["symbol"]] = s.value
            elif name == "depthflow_rest_requests_total":
                by["rest"][f"{labels['endpoint']} {labels['status']}"] = s.value
            elif name == "depthflow_rows_written_total":
                by["rows"][labels["table"]] = s.value
            elif name == "depthflow_data_loss_total":
                by["loss"][labels["reason"]] = s.value
            elif name == "depthflow_errors_total":
                by["errors"][labels["kind"]] = s.value
            elif name == "depthflow_resyncs_total":
                by["resyncs"][labels["reason"]] = s.value
            elif name == "depthflow_snapshots_total":
                by["snapshots"][labels["reason"]] = s.value
            elif not labels:
                plain[name] = s.value
    return Sample(
        at=at,
        books=books,
        live=live,
        weight_total=plain.get("depthflow_rest_weight_used_total", 0.0),
        used_weight=plain.get("depthflow_rest_used_weight", 0.0),
        rest_queue=plain.get("depthflow_rest_queue", 0.0),
        rest=by["rest"],
        messages=plain.get("depthflow_messages_total", 0.0),
        ticks=plain.get("depthflow_ticks_total", 0.0),
        rows_written=by["rows"],
        data_loss=by["loss"],
        errors=by["errors"],
        resyncs=by["resyncs"],
        snapshots=by["snapshots"],
        buffered_rows=plain.get("depthflow_buffered_rows", 0.0),
        throttled_s=plain.get("depthflow_rest_throttled_seconds_total", 0.0),
        banned_s=plain.get("depthflow_rest_banned_seconds_total", 0.0),
        loop_lag_max=plain.get("depthflow_event_loop_lag_max_seconds", 0.0),
        time_to_live=by["ttl"],
    )


def statuses(s: Sample, status: str) -> float:
    return sum(v for k, v in s.rest.items() if k.endswith(f" {status}"))


def weight_per_window(samples: Sequence[Sample]) -> dict[int, float]:
    """Weight depthflow sent per fixed wall-clock minute, from the counter's samples (each
    minute gets the increase up to its last sample: +-one poll at the edges)."""
    last: dict[int, float] = {}
    for s in samples:
        last[math.floor(s.at / WINDOW_S)] = s.weight_total
    out: dict[int, float] = {}
    previous = 0.0
    for window in sorted(last):
        out[window] = last[window] - previous
        previous = last[window]
    return out


# == the /health poller (a separate process: its loop must not be the orchestrator's) ===========


async def health_poller(base_url: str) -> Result:
    """Open loop: GET /health every 50 ms until stdin gets a line; at most 16 in flight."""
    samples: list[list[float]] = []  # [sent at (epoch s), latency s, HTTP status, books live]
    errors = skipped = 0
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=HEALTH_MAX_IN_FLIGHT)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=HEALTH_TIMEOUT_S, limits=limits
    ) as client:

        async def one(sent: float) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                response = await client.get("/health")
                latency = time.perf_counter() - started
                books = response.json()["checks"]["books"]
            except (httpx.HTTPError, ValueError, KeyError):
                errors += 1
                return
            live = sum(state == "live" for state in books.values())
            samples.append([sent, latency, response.status_code, live, len(books)])

        stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
        print("ready", flush=True)
        start = time.perf_counter()
        i = 0
        while not stop.done():
            delay = start + i * HEALTH_POLL_S - time.perf_counter()
            if delay > 0:
                await asyncio.wait([stop], timeout=delay)
                continue
            i += 1
            if len(in_flight) >= HEALTH_MAX_IN_FLIGHT:
                skipped += 1
                continue
            task = asyncio.create_task(one(time.time()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=HEALTH_TIMEOUT_S + 1)
    return {"samples": samples, "errors": errors, "skipped": skipped, "slots": i}


@contextlib.asynccontextmanager
async def health_process(base_url: str) -> AsyncIterator[dict[str, Any]]:
    """Run `health_poller` in a child process; its result lands in the yielded dict on exit."""
    argv = [sys.executable, SELF, "--health-poller", base_url]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    result: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        ready = await asyncio.wait_for(proc.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise RuntimeError(f"health poller failed to start: {ready!r}")
        yield result
        out, _ = await asyncio.wait_for(proc.communicate(b"stop\n"), 60)
        result.update(json.loads(out))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"n": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": ordered[-1]}


# == measurement ================================================================================


def lower_bound_s(
    symbols: int, weight: int, budget: int, extra: int = EXCHANGE_INFO_WEIGHT
) -> float:
    """Seconds the weight budget forces at the least: the first minute's ``budget`` is there at
    once, every further minute adds ``budget``; ``extra`` is the exchangeInfo call at start."""
    total = symbols * weight + extra
    return max(0.0, (total - budget) / budget) * WINDOW_S


def fixed_window_bound_s(
    symbols: int, weight: int, budget: int, first_at: float, extra: int = EXCHANGE_INFO_WEIGHT
) -> float:
    """The same bound on fixed wall-clock minutes, starting at epoch ``first_at``: the last
    minute needed starts ``ceil(total / budget) - 1`` minutes after the first one."""
    windows = math.ceil((symbols * weight + extra) / budget)
    if windows <= 1:
        return 0.0
    return (windows - 1) * WINDOW_S - (first_at % WINDOW_S)


def postgres_cpu_s() -> float:
    """CPU seconds of every PostgreSQL server process on this machine (read only)."""
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if proc.info["name"] in ("postgres", "postmaster") and times is not None:
            total += times.user + times.system
    return total


class Cpu:
    """CPU seconds (user + system) of a process, read now."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)

    def seconds(self) -> float:
        t = self.process.cpu_times()
        return float(t.user + t.system)

    def rss(self) -> int:
        return int(self.process.memory_info().rss)


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
                f" queue {s.rest_queue:.0f}, 429s {statuses(s, '429'):.0f}",
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


def serve_env(args: argparse.Namespace, sim: Simulator, db_url: str, prefix: str) -> dict[str, str]:
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
    }
    env.update(item.split("=", 1) for item in args.serve_env)
    return env


async def measure(args: argparse.Namespace) -> Result:
    async with (
        simulator(args) as sim,
        fresh_database(args.database_url, "scale") as db_url,
        redis_namespace(args.redis_url) as prefix,
    ):
        env = serve_env(args, sim, db_url, prefix)
        print(f"simulator up ({args.symbols} symbols, {args.total_rate:,.0f} events/s); serve...")
        spawned = time.time()
        async with serve_process(env, log_dir=LOG_DIR, tag="scale", wait_s=180.0) as serve:
            result = await observe(args, sim, serve, db_url, spawned)
        result["serve_exit_code"] = serve.child.process.returncode if serve.child.process else None
    return result


async def observe(
    args: argparse.Namespace, sim: Simulator, serve: ServeHandle, db_url: str, spawned: float
) -> Result:
    healthy = time.time()
    cpu, sim_cpu = Cpu(serve.child.pid), Cpu(sim.child.pid)
    print(f"serve answers /health after {healthy - spawned:.1f} s; waiting for every book...")
    samples: list[Sample] = []
    async with (
        httpx.AsyncClient(base_url=serve.base_url, timeout=30.0) as client,
        health_process(serve.base_url) as health,
    ):
        at_health = (cpu.seconds(), sim_cpu.seconds(), cpu.rss(), MachineCpu())
        live = await wait_all_live(client, args.symbols, args.live_timeout, samples)
        at_live = (time.time(), cpu.seconds(), sim_cpu.seconds(), cpu.rss())
        sync_busy = at_health[3].busy()
        steady: Result | None = None
        if live is not None:
            print(f"every book live {live.at - healthy:.0f} s after /health; steady window...")
            steady = await steady_window(args, client, serve, sim, db_url)
        final = await sample(client)
        samples.append(final)
        peak_rss = serve.child.peak_rss_bytes()
    return summarise(
        args,
        samples=samples,
        live=live,
        final=final,
        health=health,
        steady=steady,
        times={"spawned": spawned, "healthy": healthy, "live": at_live[0]},
        sync={
            "serve_cpu_s": at_live[1] - at_health[0],
            "simulator_cpu_s": at_live[2] - at_health[1],
            "machine_busy": sync_busy,
            "rss_at_health": at_health[2],
            "rss_at_live": at_live[3],
        },
        peak_rss=peak_rss,
    )


async def steady_window(
    args: argparse.Namespace,
    client: httpx.AsyncClient,
    serve: ServeHandle,
    sim: Simulator,
    db_url: str,
) -> Result:
    cpu, sim_cpu = Cpu(serve.child.pid), Cpu(sim.child.pid)
    before = await sample(client)
    cpu0, sim0, machine, started = cpu.seconds(), sim_cpu.seconds(), MachineCpu(), time.time()
    pg0 = postgres_cpu_s()
    spy = await start_py_spy(args, serve.child.pid, args.duration)
    await asyncio.sleep(args.duration)
    ended = time.time()
    cpu1, sim1, busy, rss = cpu.seconds(), sim_cpu.seconds(), machine.busy(), cpu.rss()
    pg1 = postgres_cpu_s()
    after = await sample(client)
    profile = await finish_py_spy(spy)
    await wait_flushed(client)
    stored = await stored_ticks(db_url, started, ended)
    span = ended - started
    return {
        "start": started,
        "end": ended,
        "seconds": span,
        "ticks_stored": stored,
        "ticks_stored_per_s": stored / span,
        "ticks_per_s": (after.ticks - before.ticks) / (after.at - before.at),
        "frames_per_s": (after.messages - before.messages) / (after.at - before.at),
        "rows_written_per_s": {
            k: (v - before.rows_written.get(k, 0.0)) / (after.at - before.at)
            for k, v in after.rows_written.items()
        },
        "buffered_rows": [before.buffered_rows, after.buffered_rows],
        "event_loop_lag_max_s": after.loop_lag_max,
        "serve_cpu_cores": (cpu1 - cpu0) / span,
        "simulator_cpu_cores": (sim1 - sim0) / span,
        "postgres_cpu_cores": (pg1 - pg0) / span,
        "py_spy": profile,
        "machine_busy": busy,
        "rss_bytes": rss,
        "books_live_at_end": after.live,
        "data_loss": _delta(before.data_loss, after.data_loss),
        "resyncs": _delta(before.resyncs, after.resyncs),
        "errors": _delta(before.errors, after.errors),
    }


async def start_py_spy(
    args: argparse.Namespace, pid: int, seconds: float
) -> tuple[asyncio.subprocess.Process, Path] | None:
    """`py-spy record` of serve over the window (collapsed stacks), when ``--py-spy`` is given."""
    if args.py_spy is None:
        return None
    out = OUT_DIR / f"scale-py-spy-{pid}.txt"
    argv = [args.py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", "50", "--format", "raw", "--output", str(out), "--nonblocking"]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return proc, out


async def finish_py_spy(
    spy: tuple[asyncio.subprocess.Process, Path] | None, top: int = 25
) -> Result | None:
    """Own (leaf) and inclusive sample shares of the busiest functions in the profile."""
    if spy is None:
        return None
    proc, out = spy
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    if not out.exists():
        return {"error": f"py-spy exited {proc.returncode} without a profile"}
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n

    def ranked(table: Mapping[str, int]) -> list[tuple[str, float]]:
        best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(name, n / total) for name, n in best]

    return {"file": str(out), "samples": total, "own": ranked(own), "inclusive": ranked(inclusive)}


def _delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    out = {k: v - before.get(k, 0.0) for k, v in after.items()}
    return {k: v for k, v in out.items() if v}


def summarise(
    args: argparse.Namespace,
    *,
    samples: Sequence[Sample],
    live: Sample | None,
    final: Sample,
    health: Mapping[str, Any],
    steady: Result | None,
    times: Mapping[str, float],
    sync: Mapping[str, Any],
    peak_rss: int,
) -> Result:
    weight = depth_weight(args.snapshot_limit)
    budget = args.weight_per_minute
    bound = lower_bound_s(args.symbols, weight, budget)
    # The /health poller saw every book live first (50 ms resolution); else the scrape did.
    polled = [s for s in health.get("samples", []) if s[3] >= args.symbols and s[4] >= args.symbols]
    live_at = polled[0][0] if polled else (live.at if live is not None else math.nan)
    first_rest = next((s.at for s in samples if s.weight_total > 0), times["healthy"])
    fixed = fixed_window_bound_s(args.symbols, weight, budget, times["healthy"])
    windows = weight_per_window(samples)
    latencies = [s[1] for s in health.get("samples", [])]
    sync_lat = [s[1] for s in health.get("samples", []) if s[0] < live_at]
    steady_lat = [
        s[1]
        for s in health.get("samples", [])
        if steady and steady["start"] <= s[0] < steady["end"]
    ]
    ttl = sorted(final.time_to_live.values())
    from_health = live_at - times["healthy"]
    return {
        "symbols": args.symbols,
        "symbols_setting": "*" if args.pattern else "explicit list",
        "total_rate": args.total_rate,
        "snapshot_limit": args.snapshot_limit,
        "snapshot_weight": weight,
        "weight_per_minute": budget,
        "all_live": live is not None,
        "books_live_at_end_of_wait": samples[-2].live if len(samples) > 1 else final.live,
        "seconds_to_health": times["healthy"] - times["spawned"],
        "seconds_to_all_live_from_spawn": live_at - times["spawned"],
        "seconds_to_all_live_from_health": from_health,
        "first_rest_seen_after_health_s": first_rest - times["healthy"],
        "lower_bound_s": bound,
        "fixed_window_bound_s": fixed,
        "ratio_to_bound": from_health / bound if bound else math.nan,
        "ratio_to_fixed_window_bound": from_health / fixed if fixed else math.nan,
        "book_time_to_live_s": {
            "p50": ttl[len(ttl) // 2] if ttl else math.nan,
            "max": ttl[-1] if ttl else math.nan,
        },
        "rest_requests": final.rest,
        "http_429": statuses(final, "429"),
        "http_418": statuses(final, "418"),
        "rest_throttled_s": final.throttled_s,
        "rest_banned_s": final.banned_s,
        "weight_sent_total": final.weight_total,
        "weight_per_window": {str(k): v for k, v in windows.items()},
        "peak_weight_per_minute_counter": max(windows.values(), default=0.0),
        "peak_weight_per_minute_estimate": max((s.used_weight for s in samples), default=0.0),
        "snapshots": final.snapshots,
        "resyncs": final.resyncs,
        "errors": final.errors,
        "data_loss": final.data_loss,
        "sync_phase": dict(sync),
        "serve_cpu_cores_sync": sync["serve_cpu_s"] / from_health if from_health > 0 else math.nan,
        "rss_bytes_at_health": sync["rss_at_health"],
        "rss_bytes_at_live": sync["rss_at_live"],
        "peak_rss_bytes": peak_rss,
        "health": {
            "whole_run": percentiles(latencies),
            "until_all_live": percentiles(sync_lat),
            "steady": percentiles(steady_lat),
            "errors": health.get("errors", 0),
            "skipped": health.get("skipped", 0),
            "non_200": sum(1 for s in health.get("samples", []) if s[2] != 200),
        },
        "steady": steady,
        "timeline": [
            [round(s.at - times["healthy"], 2), s.live, s.books, s.weight_total, s.used_weight]
            for s in samples
        ],
    }


# == output =====================================================================================


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f} ms"


def report(r: Result) -> str:
    steady: Result = r["steady"] or {}
    mb = 2**20
    rss = int(steady.get("rss_bytes") or r["rss_bytes_at_live"])
    h = r["health"]
    rows: list[list[object]] = [
        ["symbols / events/s offered", f"{r['symbols']:,} / {r['total_rate']:,.0f}"],
        ["snapshot weight x symbols (+ exchangeInfo 20)",
         f"{r['snapshot_weight']} x {r['symbols']:,} + 20 = "
         f"{r['snapshot_weight'] * r['symbols'] + 20:,}"],
        ["serve start -> /health 200", f"{r['seconds_to_health']:.1f} s"],
        ["/health 200 -> every book live",
         f"{r['seconds_to_all_live_from_health']:.1f} s" if r["all_live"] else
         f"NOT LIVE ({r['books_live_at_end_of_wait']}/{r['symbols']})"],
        ["lower bound (weight budget, continuous)", f"{r['lower_bound_s']:.1f} s"],
        ["ratio to the bound", f"{r['ratio_to_bound']:.2f}"],
        ["lower bound on fixed minutes (this run's phase)", f"{r['fixed_window_bound_s']:.1f} s"],
        ["ratio to the fixed-minute bound", f"{r['ratio_to_fixed_window_bound']:.2f}"],
        ["book time-to-live from its shard's connect p50 / max",
         f"{r['book_time_to_live_s']['p50']:.1f} / {r['book_time_to_live_s']['max']:.1f} s"],
        ["429 / 418 received", f"{r['http_429']:.0f} / {r['http_418']:.0f}"],
        ["peak weight per minute (counter per wall minute)",
         f"{r['peak_weight_per_minute_counter']:,.0f}"],
        ["peak weight per minute (depthflow's estimate gauge)",
         f"{r['peak_weight_per_minute_estimate']:,.0f}"],
        ["RSS at /health 200 / all live / end", f"{r['rss_bytes_at_health'] / mb:.0f} / "
         f"{r['rss_bytes_at_live'] / mb:.0f} / {rss / mb:.0f} MB"],
        ["RSS per symbol (total / above the /health baseline)",
         f"{rss / r['symbols'] / 1024:.0f} / "
         f"{(rss - r['rss_bytes_at_health']) / r['symbols'] / 1024:.0f} KiB"],
        ["serve CPU while syncing / steady", f"{r['serve_cpu_cores_sync']:.2f} / "
         f"{steady.get('serve_cpu_cores', math.nan):.2f} cores"],
        ["simulator CPU steady / machine busy steady",
         f"{steady.get('simulator_cpu_cores', math.nan):.2f} cores / "
         f"{steady.get('machine_busy', math.nan) * 100:.0f} %"],
        ["/health p50 / p99 / max, whole run",
         f"{_ms(h['whole_run']['p50'])} / {_ms(h['whole_run']['p99'])} / "
         f"{_ms(h['whole_run']['max'])} ({h['whole_run']['n']:,} requests)"],
        ["/health p99 until all live / steady",
         f"{_ms(h['until_all_live']['p99'])} / {_ms(h['steady']['p99'])}"],
        ["event-loop lag, largest in the last minute (serve's own gauge)",
         _ms(steady.get("event_loop_lag_max_s", math.nan))],
        ["ticks/s stored (steady window)",
         f"{steady.get('ticks_stored_per_s', math.nan):,.0f} over "
         f"{steady.get('seconds', math.nan):.0f} s"],
        ["ticks/s counted / frames/s received (steady window)",
         f"{steady.get('ticks_per_s', math.nan):,.0f} / "
         f"{steady.get('frames_per_s', math.nan):,.0f}"],
        ["rows written/s per table (steady window)",
         ", ".join(f"{k} {v:,.0f}" for k, v in steady.get("rows_written_per_s", {}).items())],
        ["writer buffer at start / end of the steady window (rows)",
         " / ".join(f"{v:,.0f}" for v in steady.get("buffered_rows", []))],
        ["PostgreSQL CPU (steady window)",
         f"{steady.get('postgres_cpu_cores', math.nan):.2f} cores"],
        ["data loss / resyncs in the steady window",
         f"{steady.get('data_loss') or '-'} / {steady.get('resyncs') or '-'}"],
    ]  # fmt: skip
    return markdown_table(["measure", "value"], rows)


# == CLI ========================================================================================


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--symbols", type=int, default=1500)
    p.add_argument("--total-rate", type=float, default=3000.0, help="events/s over all symbols")
    p.add_argument("--snapshot-limit", type=int, default=100, help="serve's SNAPSHOT_LIMIT")
    p.add_argument(
        "--weight-per-minute", type=int, default=3000, help="serve's REST_WEIGHT_PER_MINUTE"
    )
    p.add_argument("--sim-weight-limit", type=int, default=6000, help="simulator's weight limit")
    p.add_argument("--duration", type=float, default=60.0, help="steady seconds after all live")
    p.add_argument("--live-timeout", type=float, default=900.0, help="give up waiting after this")
    p.add_argument("--out", type=Path, default=None, help="JSON result (default bench/out/...)")
    p.add_argument("--database-url", default=DEFAULT_SERVER, help="any database on the server")
    p.add_argument("--redis-url", default=DEFAULT_REDIS)
    p.add_argument(
        "--pattern",
        action="store_true",
        help="SYMBOLS=* (resolved through exchangeInfo) instead of the explicit list",
    )
    p.add_argument("--serve-env", nargs="*", default=[], metavar="KEY=VALUE")
    p.add_argument("--py-spy", default=None, metavar="PATH", help="profile serve when steady")
    p.add_argument("--health-poller", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.health_poller:
        print(json.dumps(run_async(health_poller(args.health_poller))), flush=True)
        return 0
    env = environment()
    started = time.monotonic()
    result = run_async(measure(args))
    print()
    print(report(result))
    data = {"environment": env, "argv": sys.argv, **result}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2, default=str) + "\n")
        path = args.out
    else:
        path = write_result("scale", data)
    print(f"\n(total {time.monotonic() - started:.0f} s; result written to {path})")
    return 0 if result["all_live"] else 1


if __name__ == "__main__":
    sys.exit(main())
