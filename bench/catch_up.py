"""Catch-up stall: how long `depthflow serve`'s loop stalls while it replays a big sync buffer.

    python -m bench catch-up [--events 50000] [--levels 20]

A stand-in exchange of this process (`tests.harness.hostile_exchange`, what
tests/integration/test_catch_up.py uses in-process) holds BTCUSDT's snapshot back while
``--events`` real-shaped events (about ``--levels`` level changes each, like Binance's busy
ones) reach a `depthflow serve` on a fresh database, then answers it: the book replays the whole
buffer (time-sliced) before it is live. Measured over that catch-up, from the snapshot's answer
to the first ``/prometheus`` scrape (every 100 ms) that shows the book in sync:

- the longest event-loop stall: serve's ``depthflow_event_loop_lag_max_seconds`` (the largest
  lag of its 20 ms timer in the last minute), read once the catch-up is over. Start-up stalls
  the loop ~0.1 s, so the exchange refuses the feed's connections until that has left the
  gauge's minute (about 1 minute, then the feed's reconnect backoff, up to 30 s); the report
  says when the gauge did not grow during the catch-up (then the catch-up's stall is at most
  the value shown);
- ``/health`` latency from a separate process sending one request every 50 ms (p50/p99/max of
  the requests sent during the catch-up);
- whether the writer committed rows while the catch-up ran (the committed-ticks counter moved
  between the snapshot's answer and the last scrape before the book was in sync).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import httpx

from bench.machine import run_async
from bench.observe import Scrape, scrape, serve_env
from bench.probes import health_probe
from bench.results import LOG_DIR, Percentiles, Target, conclude, ms
from bench.throughput import add_server_options
from tests.harness.databases import redis_namespace, scratch_database
from tests.harness.hostile_exchange import Event, HostileExchange, SnapshotReply, real_shaped
from tests.harness.processes import ServeProcess, events_named

__all__ = ["CatchUpResult", "main"]

STALL_TARGET_S = 0.050
HEALTH_P99_TARGET_S = 0.050
SYMBOL = "btcusdt"
SCRAPE_S = 0.1
QUIET_LAG_S = 0.02
QUIET_WAIT_S = 70.0  # the gauge's window is a minute


@dataclass(frozen=True)
class CatchUpResult:
    events: int
    levels: int
    buffered: float  # frames serve had received when the snapshot was answered
    seconds: float  # snapshot answered -> book in sync (first scrape saying so)
    loop_lag_max_s: float  # serve's gauge (largest lag of the last minute) after the catch-up
    loop_lag_max_at_health_s: float  # the same gauge when /health first answered (start-up)
    loop_lag_max_quiet_s: float  # ... when the feed was let in (start-up's stalls gone)
    loop_lag_max_before_s: float  # ... just before the snapshot was answered (buffering too)
    stall_lines: int  # serve's event_loop_stalled log lines (>= 250 ms) during the catch-up
    health: Percentiles  # /health requests sent during the catch-up
    health_errors: int
    committed_before: float  # ticks committed when the snapshot was answered
    committed_during: float  # ... by the last scrape before the book was in sync
    committed_at_end: float
    scrapes_during: int
    exit_code: int

    @property
    def stall_isolated(self) -> bool:
        """Whether the gauge's maximum is the catch-up's own: it grew during the catch-up. If
        not, start-up or the buffering held a stall as long, and the catch-up's is at most it."""
        return self.loop_lag_max_s > self.loop_lag_max_before_s

    @property
    def writer_committed_during_catch_up(self) -> bool:
        return self.committed_during > self.committed_before

    def targets(self) -> list[Target]:
        return [
            Target.below("catch_up.loop_stall_max_s", self.loop_lag_max_s, STALL_TARGET_S),
            Target.below("catch_up.health_p99_s", self.health.p99, HEALTH_P99_TARGET_S),
            Target.holds(
                "catch_up.writer_committed_during_catch_up", self.writer_committed_during_catch_up
            ),
        ]


async def _wait_quiet(client: httpx.AsyncClient) -> Scrape:
    deadline = time.monotonic() + QUIET_WAIT_S
    while True:
        s = await scrape(client)
        if s.loop_lag_max_s < QUIET_LAG_S or time.monotonic() > deadline:
            return s
        await asyncio.sleep(1.0)


async def _wait_buffered(client: httpx.AsyncClient, frames: int) -> Scrape:
    deadline = time.monotonic() + 10
    while True:
        s = await scrape(client)
        if s.messages >= frames:
            return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"serve received {s.messages:.0f} of {frames} frames")
        await asyncio.sleep(0.2)


async def measure(args: argparse.Namespace) -> CatchUpResult:
    async with HostileExchange([SYMBOL]) as exchange:
        assert exchange.port is not None
        book = exchange.books[SYMBOL]
        rng = random.Random(7)
        first = real_shaped(book, rng, args.levels)
        # The snapshot a live client gets a moment after its first event, held back.
        gate = asyncio.Event()
        exchange.script_snapshot(SYMBOL, SnapshotReply(body=book.snapshot(), gate=gate))
        print(f"making {args.events:,} events...", flush=True)
        rest = [real_shaped(book, rng, args.levels) for _ in range(args.events - 1)]
        async with (
            scratch_database(args.database_url, "depthflow_bench") as db_url,
            redis_namespace(args.redis_url, "depthflow-bench") as prefix,
        ):
            local = f"http://127.0.0.1:{exchange.port}"
            env = serve_env(
                db_url=db_url,
                redis_url=args.redis_url,
                redis_prefix=prefix,
                ws_url=local.replace("http", "ws"),
                rest_url=local,
                symbols=[SYMBOL],
                # The snapshot is held for as long as sending the buffer takes; no audit
                # snapshot may take its place.
                extra={"SNAPSHOT_TIMEOUT_S": "600", "AUDIT_INTERVAL_S": "0"},
            )
            serve = ServeProcess(env, LOG_DIR / f"serve-catch-up-{exchange.port}.log")
            exchange.refuse_streams = True
            async with serve:
                result = await _run(serve, exchange, gate, first, rest, args)
    return result


async def _run(
    serve: ServeProcess,
    exchange: HostileExchange,
    gate: asyncio.Event,
    first: Event,
    rest: list[Event],
    args: argparse.Namespace,
) -> CatchUpResult:
    async with (
        httpx.AsyncClient(base_url=serve.base_url, timeout=30.0) as client,
        health_probe(serve.base_url) as health,
    ):
        # serve's REST client gives up on a snapshot after 10 s without a byte (its httpx read
        # timeout, whatever SNAPSHOT_TIMEOUT_S says): from its feed's connect, the buffer must
        # be sent and the gate opened within that.
        at_health = await scrape(client)
        # Start-up stalls the loop for ~0.1 s, and the gauge keeps its maximum a minute: the
        # feed is kept out until that has passed, so the gauge's maximum is the catch-up's.
        quiet = await _wait_quiet(client)
        exchange.refuse_streams = False
        print("start-up's stalls are out of the gauge; letting the feed in...", flush=True)
        connection = await exchange.connection(1, timeout=120)
        connection.send(first)
        for start in range(0, len(rest), 1000):
            connection.send(*rest[start : start + 1000])
            await asyncio.sleep(0)
        await _wait_buffered(client, args.events)
        at_gate = await scrape(client)
        opened = time.time()
        gate.set()
        scrapes: list[Scrape] = []
        while not (s := await scrape(client)).all_books_live:
            scrapes.append(s)
            await asyncio.sleep(SCRAPE_S)
        live = s
        after = await scrape(client)
        stalls = [
            line
            for line in events_named(serve, "event_loop_stalled")
            if datetime.fromisoformat(str(line["time"])).timestamp() >= opened
        ]
        end = await _wait_all_committed(client, args.events - 1)
    code = await serve.stop()
    last_catching_up = scrapes[-1] if scrapes else at_gate
    return CatchUpResult(
        events=args.events,
        levels=args.levels,
        buffered=at_gate.messages,
        seconds=live.at - opened,
        loop_lag_max_s=after.loop_lag_max_s,
        loop_lag_max_at_health_s=at_health.loop_lag_max_s,
        loop_lag_max_quiet_s=quiet.loop_lag_max_s,
        loop_lag_max_before_s=at_gate.loop_lag_max_s,
        stall_lines=len(stalls),
        health=health.latencies(opened, live.at),
        health_errors=health.errors,
        committed_before=at_gate.committed_ticks,
        committed_during=last_catching_up.committed_ticks,
        committed_at_end=end.committed_ticks,
        scrapes_during=len(scrapes),
        exit_code=code,
    )


async def _wait_all_committed(client: httpx.AsyncClient, ticks: int) -> Scrape:
    deadline = time.monotonic() + 120
    while True:
        s = await scrape(client)
        if s.committed_ticks >= ticks or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.2)


def report(r: CatchUpResult) -> None:
    print(
        f"\n### catch-up: {r.buffered:,.0f} events buffered ({r.levels} levels each), replayed"
        f" in {r.seconds:.2f} s\n"
    )
    isolated = "" if r.stall_isolated else " (at most: as large before the catch-up)"
    print(
        f"- longest loop stall (serve's gauge): {ms(r.loop_lag_max_s)}{isolated}; the gauge at"
        f" /health's first answer {ms(r.loop_lag_max_at_health_s)}, when the feed was let in"
        f" {ms(r.loop_lag_max_quiet_s)}, before the snapshot"
        f" {ms(r.loop_lag_max_before_s)}; stall log lines (>= 250 ms): {r.stall_lines}"
    )
    h = r.health
    print(
        f"- /health during the catch-up: {h.n} requests, p50 {ms(h.p50)}, p99 {ms(h.p99)}, max"
        f" {ms(h.max)}; errors {r.health_errors}"
    )
    print(
        f"- ticks committed: {r.committed_before:,.0f} at the snapshot, {r.committed_during:,.0f}"
        f" at the last of {r.scrapes_during} scrapes before the book was in sync,"
        f" {r.committed_at_end:,.0f} in the end (of {r.events - 1:,}); exit code {r.exit_code}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench catch-up", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--events", type=int, default=50_000, help="buffered before the snapshot")
    p.add_argument("--levels", type=int, default=20, help="level changes per event, about")
    add_server_options(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    result = run_async(measure(parser().parse_args(argv)))
    report(result)
    conclude("catch-up", result.targets(), result)
    return 0
