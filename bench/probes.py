"""HTTP probes of a running service, each in a process of its own (its loop and CPU must be
neither the service's nor the orchestrating benchmark's).

    python -m bench.probes health URL   # GET /health every 50 ms until stdin gets a line
    python -m bench.probes load URL --rps 200 --seconds 15   # /metrics + /prometheus

Both are open loop (request i goes out at start + i x period whatever earlier ones do, with a
bound on those in flight), print ``ready`` once started and one JSON document at the end;
`health_probe` and `load_probe` run them from a benchmark and return typed results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from bench.machine import run_async
from bench.results import Percentiles
from tests.harness.processes import REPO_ROOT

__all__ = [
    "HealthProbe",
    "HealthSample",
    "LoadResult",
    "LoadRun",
    "RouteStats",
    "health_probe",
    "load_probe",
]

HEALTH_EVERY_S = 0.05
HEALTH_MAX_IN_FLIGHT = 16
HEALTH_TIMEOUT_S = 5.0
LOAD_PATHS = ("/metrics", "/prometheus")
LOAD_MAX_IN_FLIGHT = 64
LOAD_TIMEOUT_S = 2.0


# -- /health ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthSample:
    sent_at: float  # time.time()
    latency_s: float
    status: int
    feed: str  # checks.feed: "ok", "syncing", ...
    books_live: int
    books: int


@dataclass
class HealthProbe:
    """What the /health poller saw; filled in when its context ends."""

    samples: list[HealthSample] = field(default_factory=list)
    errors: int = 0
    skipped: int = 0  # slots not sent: HEALTH_MAX_IN_FLIGHT requests were outstanding

    def latencies(self, start: float = 0.0, end: float = float("inf")) -> Percentiles:
        """Of the requests sent in [start, end)."""
        return Percentiles.of([s.latency_s for s in self.samples if start <= s.sent_at < end])


async def _poll_health(base_url: str) -> HealthProbe:
    probe = HealthProbe()
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=HEALTH_MAX_IN_FLIGHT)
    async with httpx.AsyncClient(
        base_url=base_url, timeout=HEALTH_TIMEOUT_S, limits=limits
    ) as client:

        async def one(sent_at: float) -> None:
            started = time.perf_counter()
            try:
                response = await client.get("/health")
                latency = time.perf_counter() - started
                checks = response.json()["checks"]
            except (httpx.HTTPError, ValueError, KeyError):
                probe.errors += 1
                return
            books = checks.get("books", {})
            live = sum(state == "live" for state in books.values())
            feed = str(checks.get("feed"))
            probe.samples.append(
                HealthSample(sent_at, latency, response.status_code, feed, live, len(books))
            )

        stop = asyncio.ensure_future(asyncio.to_thread(sys.stdin.readline))
        print("ready", flush=True)
        start = time.perf_counter()
        i = 0
        while not stop.done():
            delay = start + i * HEALTH_EVERY_S - time.perf_counter()
            if delay > 0:
                await asyncio.wait([stop], timeout=delay)
                continue
            i += 1
            if len(in_flight) >= HEALTH_MAX_IN_FLIGHT:
                probe.skipped += 1
                continue
            task = asyncio.create_task(one(time.time()))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=HEALTH_TIMEOUT_S + 1)
    return probe


@contextlib.asynccontextmanager
async def health_probe(base_url: str) -> AsyncIterator[HealthProbe]:
    """Poll ``base_url``'s /health from a child process while the context runs; the yielded
    `HealthProbe` is filled in on exit."""
    result = HealthProbe()
    async with _child(["health", base_url]) as child:
        yield result
        document = await child.finish(b"stop\n", 60.0)
    result.samples = [HealthSample(**s) for s in document["samples"]]
    result.errors, result.skipped = document["errors"], document["skipped"]


# -- /metrics + /prometheus under load -------------------------------------------------------------


@dataclass
class RouteStats:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    skipped: int = 0
    latency: Percentiles = field(default_factory=lambda: Percentiles.of([]))


@dataclass(frozen=True)
class LoadResult:
    routes: dict[str, RouteStats]
    achieved_rps: float
    max_send_lag_s: float
    cpu_cores: float  # the load generator's own

    @property
    def worst_p99_s(self) -> float:
        return max(r.latency.p99 for r in self.routes.values())


async def _load(base_url: str, rps: float, seconds: float) -> LoadResult:
    total = int(rps * seconds)
    samples: dict[str, list[float]] = {p: [] for p in LOAD_PATHS}
    stats = {p: RouteStats() for p in LOAD_PATHS}
    in_flight: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(
        max_connections=LOAD_MAX_IN_FLIGHT, max_keepalive_connections=LOAD_MAX_IN_FLIGHT
    )
    async with httpx.AsyncClient(
        base_url=base_url, timeout=LOAD_TIMEOUT_S, limits=limits
    ) as client:

        async def one(path: str) -> None:
            started = time.perf_counter()
            try:
                response = await client.get(path)
            except httpx.HTTPError:
                stats[path].errors += 1
                return
            samples[path].append(time.perf_counter() - started)
            if response.is_success:
                stats[path].ok += 1
            else:
                stats[path].errors += 1

        print("ready", flush=True)
        start = time.perf_counter()
        max_lag = 0.0
        for i in range(total):
            delay = start + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            max_lag = max(max_lag, -delay)
            path = LOAD_PATHS[i % len(LOAD_PATHS)]
            if len(in_flight) >= LOAD_MAX_IN_FLIGHT:  # a stuck server must not pile requests up
                stats[path].skipped += 1
                continue
            stats[path].sent += 1
            task = asyncio.create_task(one(path))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=LOAD_TIMEOUT_S + 3)
        elapsed = time.perf_counter() - start
    for path, latencies in samples.items():
        stats[path].latency = Percentiles.of(latencies)
    sent = sum(s.sent for s in stats.values())
    return LoadResult(stats, sent / elapsed, max_lag, time.process_time() / elapsed)


class LoadRun:
    """A running load generator (see `load_probe`)."""

    def __init__(self, child: _Probe, seconds: float) -> None:
        self._child = child
        self._seconds = seconds

    async def result(self) -> LoadResult:
        """Wait until it has sent everything; what it saw."""
        document = await self._child.finish(None, self._seconds + 30)
        return LoadResult(
            routes={
                path: RouteStats(**{**stats, "latency": Percentiles(**stats["latency"])})
                for path, stats in document["routes"].items()
            },
            achieved_rps=document["achieved_rps"],
            max_send_lag_s=document["max_send_lag_s"],
            cpu_cores=document["cpu_cores"],
        )


@contextlib.asynccontextmanager
async def load_probe(base_url: str, rps: float, seconds: float) -> AsyncIterator[LoadRun]:
    """Send ``rps`` requests/s for ``seconds`` (half /metrics, half /prometheus) from a child
    process, which has started sending when the context is entered."""
    async with _child(["load", base_url, "--rps", str(rps), "--seconds", str(seconds)]) as child:
        yield LoadRun(child, seconds)


# -- the child process -----------------------------------------------------------------------------


class _Probe:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def finish(self, stdin: bytes | None, wait_s: float) -> dict[str, Any]:
        out, _ = await asyncio.wait_for(self.process.communicate(stdin), wait_s)
        document: dict[str, Any] = json.loads(out)
        return document


@contextlib.asynccontextmanager
async def _child(args: Sequence[str]) -> AsyncIterator[_Probe]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.probes",
        *args,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        ready = await asyncio.wait_for(process.stdout.readline(), 30)
        if ready.strip() != b"ready":
            raise RuntimeError(f"probe {args[0]} failed to start: {ready!r}")
        yield _Probe(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes")
    p.add_argument("probe", choices=["health", "load"])
    p.add_argument("base_url")
    p.add_argument("--rps", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=15.0)
    args = p.parse_args(argv)
    result: HealthProbe | LoadResult
    if args.probe == "health":
        result = run_async(_poll_health(args.base_url))
    else:
        result = run_async(_load(args.base_url, args.rps, args.seconds))
    # NaN (no sample) is fine here: the other end is json.loads.
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
