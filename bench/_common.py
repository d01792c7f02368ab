"""Shared helpers of the benchmarks: subprocesses, scratch databases, scrapes, tables, results.

Everything runs on 127.0.0.1 and is bounded in time; every process and database a helper creates is
removed by the same helper (context managers), also when the benchmark fails half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import httpx
import psutil
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from depthflow.simulate.market import Market
from depthflow.storage import db

__all__ = [
    "DEFAULT_REDIS",
    "DEFAULT_SERVER",
    "OUT_DIR",
    "Child",
    "CpuMeter",
    "MachineCpu",
    "Scrape",
    "ServeHandle",
    "SimulatorHandle",
    "bucket_delta",
    "environment",
    "free_port",
    "fresh_database",
    "histogram_quantile",
    "loop_factory",
    "markdown_table",
    "max_bucket",
    "redis_namespace",
    "run_async",
    "scrape",
    "serve_process",
    "simulator_process",
    "symbol_names",
    "write_result",
]

DEFAULT_SERVER = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
OUT_DIR = Path(__file__).resolve().parent / "out"
_REPO_ROOT = Path(__file__).resolve().parents[1]
_T = TypeVar("_T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- event loop --------------------------------------------------------------------------------


def loop_factory() -> tuple[LoopFactory | None, str]:
    """The loop `depthflow serve` gets (uvicorn's ``loop="auto"``): the floors run on it too."""
    from uvicorn.loops.auto import auto_loop_factory

    factory = auto_loop_factory(use_subprocess=False)
    loop = factory()
    try:
        name = f"{type(loop).__module__}.{type(loop).__name__}"
    finally:
        loop.close()
    return factory, name


def run_async(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on the loop uvicorn would pick (uvloop when installed)."""
    factory, _ = loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


# -- databases and Redis -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, tag: str) -> AsyncIterator[str]:
    """A new database on ``server_url``'s server, migrated to head; dropped on exit."""
    url = server_url.rsplit("/", 1)[0] + f"/depthflow_bench_{tag}_{uuid.uuid4().hex[:8]}"
    try:
        await db.migrate(url)
        yield url
    finally:
        await db.drop_database(url)


@contextlib.asynccontextmanager
async def redis_namespace(redis_url: str) -> AsyncIterator[str]:
    """A unique ``REDIS_PREFIX``; its keys are deleted on exit."""
    prefix = f"depthflow-bench-{uuid.uuid4().hex[:8]}:"
    try:
        yield prefix
    finally:
        client = aioredis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=prefix + "*")]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


# -- subprocesses ------------------------------------------------------------------------------


@dataclass
class Child:
    """One subprocess with stdout+stderr in a log file; `stop` sends SIGTERM, then SIGKILL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env={**os.environ, **self.env},
            cwd=_REPO_ROOT,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def peak_rss_bytes(self) -> int:
        """VmHWM (peak resident set size) of the process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found in /proc status")

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def stop(self, wait_s: float = 30.0) -> int | None:
        """Ask the process to stop (SIGTERM, as Docker does); kill it after ``wait_s``."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), wait_s)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode


async def _wait_http(child: Child, url: str, wait_s: float, ok: Callable[[int], bool]) -> None:
    deadline = time.monotonic() + wait_s
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited early:\n{child.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if ok((await client.get(url)).status_code):
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{child.name} did not answer {url} within {wait_s} s:\n{child.tail()}")


@dataclass(frozen=True)
class SimulatorHandle:
    child: Child
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def simulator_process(
    symbols: Sequence[str], *, rate: float, prebuild: int, log_dir: Path, wait_s: float = 180.0
) -> AsyncIterator[SimulatorHandle]:
    """`depthflow simulate` on a free port, yielded once its REST side answers (frames built)."""
    port = free_port()
    argv = [sys.executable, "-m", "depthflow", "simulate", "--port", str(port)]
    argv += ["--symbols", ",".join(symbols), "--rate", str(rate)]
    if prebuild:
        argv += ["--prebuild", str(prebuild)]
    child = Child("simulate", argv, {"LOG_LEVEL": "WARNING"}, log_dir / f"simulate-{port}.log")
    try:
        await child.start()
        # A REST call does not subscribe, so prebuilt frames keep waiting for the first client.
        probe = f"http://127.0.0.1:{port}/api/v3/depth?symbol={symbols[0]}&limit=1"
        await _wait_http(child, probe, wait_s, lambda status: status == 200)
        yield SimulatorHandle(child, port)
    finally:
        await child.stop(wait_s=10.0)


@dataclass(frozen=True)
class ServeHandle:
    child: Child
    port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def serve_process(
    env: Mapping[str, str], *, log_dir: Path, tag: str, wait_s: float = 90.0
) -> AsyncIterator[ServeHandle]:
    """`depthflow serve` with ``env`` on a free port, yielded once ``/health`` answers 200."""
    port = free_port()
    argv = [sys.executable, "-m", "depthflow", "serve", "--port", str(port)]
    child = Child("serve", argv, dict(env), log_dir / f"serve-{tag}-{port}.log")
    try:
        await child.start()
        url = f"http://127.0.0.1:{port}/health"
        await _wait_http(child, url, wait_s, lambda status: status == 200)
        yield ServeHandle(child, port)
    finally:
        await child.stop(wait_s=60.0)


# -- Prometheus scrapes ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """The counters of one ``/prometheus`` answer that the benchmarks need."""

    at: float  # time.time() when the answer arrived
    messages: float
    ticks: float
    rows_written: dict[str, float]
    data_loss: dict[str, float]
    buffered_rows: float
    analytics_pending: float
    latency_buckets: list[tuple[float, float]]  # (le, cumulative count), +Inf last
    latency_sum: float
    latency_count: float


async def scrape(client: httpx.AsyncClient) -> Scrape:
    """GET ``/prometheus`` of the service ``client`` is based on, and pick the counters."""
    text = (await client.get("/prometheus")).raise_for_status().text
    at = time.time()
    values: dict[str, float] = {}
    labelled: dict[str, dict[str, float]] = {"rows_written": {}, "data_loss": {}}
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "depthflow_latency_seconds_bucket":
                buckets.append((float(s.labels["le"]), s.value))
            elif s.name == "depthflow_rows_written_total":
                labelled["rows_written"][s.labels["table"]] = s.value
            elif s.name == "depthflow_data_loss_total":
                labelled["data_loss"][s.labels["reason"]] = s.value
            elif not s.labels:
                values[s.name] = s.value
    buckets.sort()
    return Scrape(
        at=at,
        messages=values.get("depthflow_messages_total", 0.0),
        ticks=values.get("depthflow_ticks_total", 0.0),
        rows_written=labelled["rows_written"],
        data_loss=labelled["data_loss"],
        buffered_rows=values.get("depthflow_buffered_rows", 0.0),
        analytics_pending=values.get("depthflow_analytics_pending", 0.0),
        latency_buckets=buckets,
        latency_sum=values.get("depthflow_latency_seconds_sum", 0.0),
        latency_count=values.get("depthflow_latency_seconds_count", 0.0),
    )


def bucket_delta(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]]
) -> list[tuple[float, float]]:
    """Cumulative buckets of the samples observed between two scrapes."""
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in after]


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' ``histogram_quantile``: linear within the bucket, lower bound of the first 0.

    A quantile in the +Inf bucket returns the highest finite bound; NaN when there are no samples.
    """
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def max_bucket(buckets: Sequence[tuple[float, float]]) -> float:
    """Upper bound of the highest non-empty bucket (the histogram's bound on the maximum)."""
    below = 0.0
    highest = math.nan
    for le, count in buckets:
        if count > below:
            highest = le
        below = count
    return highest


# -- output ------------------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; numbers right-aligned."""
    numeric = [any(isinstance(row[i], int | float) for row in rows) for i in range(len(headers))]
    align = ["---:" if n else "---" for n in numeric]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class MachineCpu:
    """Share of the whole machine's CPU time that was busy since this object was created."""

    def __init__(self) -> None:
        self._before = psutil.cpu_times()

    def busy(self) -> float:
        after = psutil.cpu_times()
        total = sum(after) - sum(self._before)
        idle = (after.idle + after.iowait) - (self._before.idle + self._before.iowait)
        return 1.0 - idle / total if total > 0 else math.nan


class CpuMeter:
    """CPU used by named processes (in cores) and the machine's busy share since creation."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._before = {name: _cpu_s(p) for name, p in self._processes.items()}
        self._machine = MachineCpu()
        self._start = time.monotonic()

    def result(self) -> dict[str, float]:
        span = time.monotonic() - self._start
        cores = {
            name: (_cpu_s(p) - self._before[name]) / span for name, p in self._processes.items()
        }
        return {**cores, "machine_busy": self._machine.busy()}


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def environment() -> dict[str, Any]:
    """Where the numbers come from: machine, Python, event loop."""
    _, loop_name = loop_factory()
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "event_loop": loop_name,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_result(name: str, data: Mapping[str, Any]) -> Path:
    """Store ``data`` as ``bench/out/<name>-<UTC time>.json``; returns the path."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = OUT_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path
