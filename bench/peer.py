"""depthflow against cryptofeed 3.x, a real peer, storing the same rows from the same stream.

    python -m bench peer [--events 60000] [--python python3.13]

cryptofeed needs Python >= 3.13, so it gets its own virtualenv (``bench/out/cryptofeed-venv``,
made on the first run with ``pip install 'cryptofeed>=3,<4' asyncpg uvloop``). Each side reads
its own fresh `depthflow simulate` sending the same prebuilt frames of one symbol at full speed
into its own freshly migrated database: depthflow as ``depthflow serve`` with its defaults,
cryptofeed as ``bench/peers/cryptofeed_store.py`` (its `Binance` feed keeps the book; a backend
COPYs the same ``price_ticks`` and ``orders`` rows, in 20,000-row batches on two connections:
cryptofeed at its best, not behind a slow backend). Both windows start at the first frame
received and end at the last commit; CPU is each process's own over that window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.machine import run_async
from bench.results import LOG_DIR, OUT_DIR, Target, conclude, markdown_table
from bench.throughput import (
    Case,
    DepthflowRun,
    add_service_options,
    depthflow_run,
    synthetic_case,
)
from depthflow.storage import db
from tests.harness.databases import scratch_database
from tests.harness.processes import SimulatorProcess

__all__ = ["PeerRun", "main"]

PEER = Path(__file__).resolve().parent / "peers" / "cryptofeed_store.py"
VENV = OUT_DIR / "cryptofeed-venv"
REQUIREMENTS = ("cryptofeed>=3,<4", "asyncpg", "uvloop")
SPEEDUP_TARGET = 2.0
PEER_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PeerRun:
    """cryptofeed's run, as its script reports it."""

    version: str
    events: int
    seconds: float
    cpu_s: float
    peak_rss_mb: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    @property
    def cpu_us_per_event(self) -> float:
        return self.cpu_s / self.events * 1e6


@dataclass(frozen=True)
class ComparisonResult:
    case: Case
    cryptofeed: PeerRun
    depthflow: DepthflowRun

    @property
    def speedup(self) -> float:
        return self.depthflow.events_per_s / self.cryptofeed.events_per_s

    def targets(self) -> list[Target]:
        return [Target.at_least("depthflow_vs_cryptofeed", self.speedup, SPEEDUP_TARGET)]


def peer_python(base: str) -> Path:
    """The venv's interpreter, made (and cryptofeed installed) from ``base`` on first use."""
    python = VENV / "bin" / "python"
    if not python.exists():
        found = shutil.which(base) or base
        check = [found, "-c", "import sys; sys.exit(sys.version_info < (3, 13))"]
        if subprocess.run(check, check=False).returncode != 0:
            raise SystemExit(f"cryptofeed 3.x needs Python >= 3.13; {base} is not (--python)")
        subprocess.run([found, "-m", "venv", str(VENV)], check=True)
        install = [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS]
        subprocess.run(install, check=True)
    return python


async def cryptofeed_run(python: Path, sim: SimulatorProcess, case: Case, server: str) -> PeerRun:
    async with scratch_database(server, "depthflow_bench_cryptofeed") as db_url:
        argv = [str(python), str(PEER), "--ws-url", sim.ws_url, "--rest-url", sim.rest_url]
        argv += ["--db-url", db.asyncpg_dsn(db_url)]
        argv += ["--symbols", ",".join(_cryptofeed_name(s) for s in case.symbols)]
        log = LOG_DIR / f"cryptofeed-{sim.port}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        argv += ["--log", str(log)]
        with log.with_suffix(".stderr").open("wb") as stderr:  # cryptofeed logs there too
            child = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONPATH": ""},
            )
            out, _ = await asyncio.wait_for(child.communicate(), PEER_TIMEOUT_S)
        if child.returncode != 0:
            raise RuntimeError(f"cryptofeed exited with {child.returncode}; see {log}")
    report = json.loads(out.decode().strip().splitlines()[-1])
    return PeerRun(
        version=report["cryptofeed"],
        events=report["events"],
        seconds=report["seconds"],
        cpu_s=report["cpu_s"],
        peak_rss_mb=report["peak_rss_bytes"] / 2**20,
    )


def _cryptofeed_name(symbol: str) -> str:
    """BTCUSDT -> BTC-USDT, cryptofeed's normalised name."""
    upper = symbol.upper()
    for quote in ("USDT", "FDUSD", "USDC", "BTC", "ETH"):
        if upper.endswith(quote) and len(upper) > len(quote):
            return f"{upper[: -len(quote)]}-{quote}"
    raise ValueError(f"no known quote asset in {symbol!r}")


async def run(args: argparse.Namespace) -> ComparisonResult:
    python = peer_python(args.python)
    case = synthetic_case(1, args.events)
    sims = [
        SimulatorProcess(case.simulator_args, LOG_DIR / f"simulate-cryptofeed-{i}.log")
        for i in range(2)
    ]
    async with sims[0], sims[1]:
        peer = await cryptofeed_run(python, sims[0], case, args.database_url)
        await sims[0].stop()
        ours = await depthflow_run(sims[1], case, args)
    return ComparisonResult(case, peer, ours)


def print_result(r: ComparisonResult) -> None:
    c, d = r.cryptofeed, r.depthflow
    print(f"\n### depthflow vs cryptofeed {c.version}: {r.case.events:,} frames, 1 symbol\n")
    headers = ["", "events/s", "CPU us/event", "peak RSS MB"]
    rows = [
        [f"cryptofeed {c.version}", c.events_per_s, c.cpu_us_per_event, c.peak_rss_mb],
        ["depthflow serve", d.events_per_s, d.cpu_us_per_event, d.peak_rss_mb],
    ]
    print(markdown_table(headers, rows))
    print(f"\n- depthflow / cryptofeed: {r.speedup:.2f}x the events/s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench peer", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--events", type=int, default=60_000)
    p.add_argument("--python", default="python3.13", help="a Python >= 3.13 for cryptofeed")
    add_service_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    result = run_async(run(args))
    print_result(result)
    conclude("peer", result.targets(), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
