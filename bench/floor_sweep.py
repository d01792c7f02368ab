"""The floor alone under several writer configurations, to choose its default (`bench.floor`).

    python -m bench floor [--cases 1 50 real] [--events 60000] [--repeat 1]
        [--configs 1x5000:records 2x5000:records 2x20000:records 2x20000:text ...]

A configuration is ``<connections>x<batch rows>:<encoding>``. Each run reads a fresh simulator's
stream (the same frames as `python -m bench throughput` serves) into a fresh database; the
fastest configuration of each case is marked.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bench.floor import Encoding, FloorConfig, FloorRun, floor_from_stream
from bench.machine import run_async
from bench.results import LOG_DIR, Target, markdown_table, write_result
from bench.throughput import Case, add_server_options, real_case, synthetic_case
from tests.harness import real_data
from tests.harness.databases import scratch_database
from tests.harness.processes import SimulatorProcess

__all__ = ["main", "parse_config"]

DEFAULT_CONFIGS = (
    "1x5000:records",
    "2x5000:records",
    "2x20000:records",
    "2x50000:records",
    "3x10000:records",
    "4x10000:records",
    "2x20000:text",
    "2x50000:text",
)


def parse_config(text: str) -> FloorConfig:
    """``2x20000:text`` -> 2 connections, 20,000-row batches, text encoding."""
    shape, _, encoding = text.partition(":")
    connections, _, rows = shape.partition("x")
    if encoding not in ("records", "text"):
        raise argparse.ArgumentTypeError(f"encoding must be records or text: {text!r}")
    return FloorConfig(int(connections), int(rows), cast(Encoding, encoding))


@dataclass(frozen=True)
class ConfigRuns:
    case: str
    config: FloorConfig
    runs: list[FloorRun]

    @property
    def events_per_s(self) -> float:
        """The median over the repeats."""
        return statistics.median(r.events_per_s for r in self.runs)


@dataclass(frozen=True)
class SweepResult:
    results: list[ConfigRuns]


async def floor_once(case: Case, config: FloorConfig, server_url: str) -> FloorRun:
    log = LOG_DIR / f"simulate-floor-{case.key}.log"
    async with (
        SimulatorProcess(case.simulator_args, log) as sim,
        scratch_database(server_url, "depthflow_bench_floor") as db_url,
    ):
        return await floor_from_stream(sim.ws_url, case.symbols, case.events, db_url, config)


async def sweep(args: argparse.Namespace) -> SweepResult:
    results = []
    with tempfile.TemporaryDirectory(prefix="depthflow-bench-") as tmp:
        for name in args.cases:
            if name == "real":
                path = real_data.write_spot_recording("combined", Path(tmp) / "spot.ndjson")
                case = real_case(path)
            else:
                case = synthetic_case(int(name), args.events)
            # Interleaved: a slow spell of the shared machine hits every configuration alike.
            runs: dict[FloorConfig, list[FloorRun]] = {c: [] for c in args.configs}
            for _ in range(args.repeat):
                for config in args.configs:
                    run = await floor_once(case, config, args.database_url)
                    print(f"{case.key} {config.label}: {run.events_per_s:,.0f} events/s")
                    runs[config].append(run)
            results += [ConfigRuns(case.key, c, r) for c, r in runs.items()]
    return SweepResult(results)


def report(result: SweepResult) -> None:
    for case in dict.fromkeys(r.case for r in result.results):
        mine = [r for r in result.results if r.case == case]
        best = max(mine, key=lambda r: r.events_per_s)
        print(f"\n### floor configurations, {case}\n")
        rows = [
            [
                r.config.label + (" (best)" if r is best else ""),
                r.events_per_s,
                statistics.median(run.rows_per_s for run in r.runs),
                statistics.median(run.client_cpu_s for run in r.runs),
                statistics.median(run.machine_busy for run in r.runs),
                len(r.runs),
            ]
            for r in mine
        ]
        headers = ["configuration", "events/s", "rows/s", "floor CPU s", "machine busy", "runs"]
        print(markdown_table(headers, rows))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench floor", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--cases", nargs="+", default=["1", "50", "real"])
    p.add_argument("--events", type=int, default=60_000, help="per synthetic case")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument(
        "--configs",
        nargs="+",
        type=parse_config,
        default=[parse_config(c) for c in DEFAULT_CONFIGS],
        metavar="NxROWS:ENCODING",
    )
    add_server_options(p, redis=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    result = run_async(sweep(parser().parse_args(argv)))
    report(result)
    # Informational: no target is named for the sweep itself.
    targets: list[Target] = []
    print(f"\n(result written to {write_result('floor', targets, result)})")
    return 0
