"""Replay at full speed: `depthflow replay` of Binance's recordings against the floor.

    python -m bench replay [--floor-connections 2] [--floor-batch-rows 20000]
        [--floor-encoding records]

BTCUSDT and ETHUSDT (tests/harness/real_data.py: both symbols as one connection received them,
each snapshot where a live client had it) go through ``depthflow replay FILE`` into a fresh,
migrated database (``SYMBOLS=btcusdt,ethusdt``, no Redis, everything else default), and through
the floor (`bench.floor`: read the file, build the same rows, COPY them) into another.

depthflow's time is the one its ``replayed`` log line reports: from its service started (the
file already checked and hashed) to its last row committed and the service stopped; the whole
command's wall time (Python start-up, imports, Numba, the file's checking pass) is shown beside
it. The floor's runs from its first frame read to its last commit.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.floor import FloorRun, floor_from_recording
from bench.machine import CpuTrace, run_async
from bench.observe import Stored, stored
from bench.results import LOG_DIR, Target, conclude, markdown_table
from bench.throughput import add_floor_options, add_server_options, floor_config
from tests.harness import real_data
from tests.harness.databases import scratch_database
from tests.harness.processes import Child, events_named

__all__ = ["ReplayResult", "ReplayRun", "main"]

RATIO_TARGET = 0.85


@dataclass(frozen=True)
class ReplayRun:
    frames: int
    seconds: float  # the `replayed` line's: service started -> last row committed, stopped
    wall_seconds: float  # the whole command
    process_cpu_s: float
    stored: Stored
    exit_code: int

    @property
    def events_per_s(self) -> float:
        return self.frames / self.seconds

    @property
    def rows_per_s(self) -> float:
        return (self.stored.price_ticks + self.stored.orders) / self.seconds


@dataclass(frozen=True)
class ReplayResult:
    recording_frames: int
    floor: FloorRun
    depthflow: ReplayRun

    @property
    def ratio(self) -> float:
        return self.depthflow.events_per_s / self.floor.events_per_s

    def targets(self) -> list[Target]:
        return [Target.at_least("replay.throughput_vs_floor", self.ratio, RATIO_TARGET)]


async def depthflow_replay(path: Path, server_url: str) -> ReplayRun:
    async with scratch_database(server_url, "depthflow_bench_replay") as db_url:
        env = {
            "DATABASE_URL": db_url,
            "SYMBOLS": ",".join(real_data.SPOT_SYMBOLS),
            "REDIS_URL": "",
            "LOG_FORMAT": "json",
        }
        argv = [sys.executable, "-m", "depthflow", "replay", str(path)]
        child = Child("replay", argv, env, LOG_DIR / f"replay-{time.time_ns()}.log")
        started = time.perf_counter()
        await child.start()
        trace = CpuTrace(child.pid, every_s=0.01)
        sampler = asyncio.create_task(trace.run())
        try:
            assert child.process is not None
            code = await asyncio.wait_for(child.process.wait(), 600)
        finally:
            sampler.cancel()
            await asyncio.wait([sampler])
        wall = time.perf_counter() - started
        await child.stop()
        lines = events_named(child, "replayed")
        if code != 0 or not lines:
            raise RuntimeError(f"depthflow replay exited {code}:\n{child.tail(40)}")
        summary = lines[-1]
        rows = await stored(db_url)
    cpu = trace.samples[-1][1] if trace.samples else float("nan")
    return ReplayRun(int(summary["frames"]), float(summary["seconds"]), wall, cpu, rows, code)


async def measure(args: argparse.Namespace) -> ReplayResult:
    with tempfile.TemporaryDirectory(prefix="depthflow-bench-") as tmp:
        path = real_data.write_spot_recording("combined", Path(tmp) / "spot.ndjson.gz")
        frames = sum(1 for _ in real_data.spot_frames("combined"))
        async with scratch_database(args.database_url, "depthflow_bench_floor") as db_url:
            floor = await floor_from_recording(path, db_url, floor_config(args))
        run = await depthflow_replay(path, args.database_url)
    return ReplayResult(frames, floor, run)


def report(r: ReplayResult) -> None:
    f, d = r.floor, r.depthflow
    print(f"\n### replay of the real recording: {r.recording_frames:,} frames, 2 symbols\n")
    rows = [
        [f"floor ({f.config.label})", f.events_per_s, f.rows_per_s, 1.0, f.seconds, ""],
        ["depthflow replay", d.events_per_s, d.rows_per_s, r.ratio, d.seconds, d.wall_seconds],
    ]
    headers = ["pipeline", "events/s", "rows/s", "x floor", "seconds", "whole command s"]
    print(markdown_table(headers, rows))
    print(
        f"\n- floor: {f.tick_rows:,} ticks + {f.order_rows:,} orders; its own CPU"
        f" {f.client_cpu_s:.2f} s; machine busy {f.machine_busy:.0%}"
    )
    print(
        f"- depthflow: {d.stored.price_ticks:,} ticks + {d.stored.orders:,} orders +"
        f" {d.stored.trading_signals:,} signals; process CPU {d.process_cpu_s:.2f} s over the"
        f" whole command; exit code {d.exit_code}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench replay", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_floor_options(p)
    add_server_options(p, redis=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    result = run_async(measure(parser().parse_args(argv)))
    report(result)
    conclude("replay", result.targets(), result)
    return 0
