"""Whole-market behaviour of a real `depthflow serve` against a simulator enforcing Binance's
limits: sharded connections, the REST weight budget (fixed wall-clock minutes), 429s, symbol
patterns resolved and refreshed through exchangeInfo, and a dropped shard resyncing alone.

The weight budget works on fixed minutes of the wall clock (as Binance counts): when the sync
weight does not fit one minute, the books cannot all be live before the next minute starts. The
tests that depend on it start the service early enough in a minute that the next one is the only
boundary needed, which keeps each of them well under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from depthflow.feed import shard_symbols
from depthflow.simulate.connections import Subscriber
from depthflow.simulate.server import Simulator
from depthflow.simulate.weight import Verdict
from depthflow.storage.db import asyncpg_dsn
from tests.harness.processes import (
    ServeProcess,
    events_named,
    exchange_env,
    log_lines,
)
from tests.harness.prometheus import prometheus
from tests.ledger_check import assert_sequence_covered

MINUTE = 60.0
DEPTH_WEIGHT = 5  # SNAPSHOT_LIMIT=100
EXCHANGE_INFO_WEIGHT = 20


# -- the simulator's side --------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One weighted REST request as the simulator answered it."""

    at: float  # wall time
    weight: int
    status: int
    used: int


@dataclass
class RestLog:
    """Every weighted request the simulator judged, and every snapshot it served (by symbol)."""

    requests: list[Sent] = field(default_factory=list)
    snapshots: list[tuple[float, str]] = field(default_factory=list)

    @classmethod
    def attach(cls, sim: Simulator) -> RestLog:
        log = cls()
        limiter = sim._limiter
        admit = limiter.admit

        def logged_admit(client: str, weight: int) -> Verdict:
            verdict = admit(client, weight)
            log.requests.append(Sent(time.time(), weight, int(verdict.status), verdict.used))
            return verdict

        limiter.admit = logged_admit  # type: ignore[method-assign]
        routes = sim._routes
        body = routes.snapshot_body

        def logged_body(symbol: str, limit: int) -> str | None:
            log.snapshots.append((time.time(), symbol.upper()))
            return body(symbol, limit)

        routes.snapshot_body = logged_body
        return log

    @property
    def first_at(self) -> float | None:
        return self.requests[0].at if self.requests else None

    def weight_per_minute(self) -> dict[int, int]:
        windows: dict[int, int] = {}
        for sent in self.requests:
            n = math.floor(sent.at / MINUTE)
            windows[n] = windows.get(n, 0) + sent.weight
        return windows

    def snapshots_since(self, at: float) -> list[str]:
        return [symbol for when, symbol in self.snapshots if when >= at]


def subscribers(sim: Simulator) -> list[Subscriber]:
    return list(sim._connections._subscribers)


def subscriber_of(sim: Simulator, symbols: list[str]) -> Subscriber:
    wanted = {s.lower() for s in symbols}
    found = [sub for sub in subscribers(sim) if set(sub.streams) == wanted]
    assert len(found) == 1, ([sorted(sub.streams) for sub in subscribers(sim)], sorted(wanted))
    return found[0]


# -- the service's side ----------------------------------------------------------------------------


async def start_simulator(
    running: contextlib.AsyncExitStack, symbols: tuple[str, ...] = (), **kwargs: Any
) -> Simulator:
    sim = Simulator(symbols, **kwargs)
    await sim.start()
    running.push_async_callback(sim.stop)
    return sim


def serve_env(
    sim: Simulator, spec: str, database_url: str, redis_url: str, prefix: str, **extra: str
) -> dict[str, str]:
    assert sim.port is not None
    return exchange_env(
        sim.port,
        [spec],
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        **{
            "SNAPSHOT_LIMIT": "100",
            "CONNECT_INTERVAL_S": "0.2",
            "AUDIT_INTERVAL_S": "0",  # audits would add snapshots to the request logs
            "BATCH_MAX_DELAY_MS": "50",
            "METRICS_FLUSH_MS": "100",
            **extra,
        },
    )


async def start_serve(
    running: contextlib.AsyncExitStack, env: dict[str, str], tmp_path: Path
) -> ServeProcess:
    serve = ServeProcess(env=env, log_path=tmp_path / "serve.log")
    running.push_async_callback(stop_serve, serve)
    await serve.start(wait_s=90)
    return serve


async def stop_serve(serve: ServeProcess) -> None:
    if serve.process is not None:
        await serve.stop()


def error_lines(serve: ServeProcess) -> list[dict[str, Any]]:
    return [line for line in log_lines(serve) if line.get("level") in {"ERROR", "CRITICAL"}]


async def terminate(serve: ServeProcess) -> dict[str, Any]:
    """SIGTERM the service; the counters of its final ``service_stopped`` log line."""
    code = await serve.stop()
    assert code in {0, -15}, serve.log_text()[-5000:]
    stopped = events_named(serve, "service_stopped")
    assert len(stopped) == 1, serve.log_text()[-5000:]
    return stopped[0]


async def wait_until(check: Callable[[], Awaitable[bool]], wait_s: float, what: str) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out after {wait_s} s waiting for {what}")


async def books(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.get("/health")
    assert response.status_code == 200
    books: dict[str, str] = response.json()["checks"]["books"]
    return books


def assert_streams_accepted(serve: ServeProcess) -> None:
    """Fail at once, not at a deadline, when the exchange keeps refusing a shard's stream URL."""
    if serve.log_text().count("status_code=400") < 5:
        return
    refused = [
        str(line.get("error"))
        for line in events_named(serve, "feed_connect_failed")
        if "status_code=400" in str(line.get("error"))
    ]
    if len(refused) >= 5:
        body = refused[-1][refused[-1].find("body=") :][:160]
        pytest.fail(f"the exchange refused a shard's stream URL {len(refused)} times: {body}")


async def wait_live(
    client: httpx.AsyncClient, symbols: list[str], wait_s: float, serve: ServeProcess
) -> None:
    async def all_live() -> bool:
        assert_streams_accepted(serve)
        states = await books(client)
        return all(states.get(s) == "live" for s in symbols)

    await wait_until(all_live, wait_s, f"{len(symbols)} books live")


async def wait_quiet(client: httpx.AsyncClient, wait_s: float = 20.0) -> None:
    """Wait until the service has handled every frame it will get (message count stable)."""
    last = -1.0

    async def stable() -> bool:
        nonlocal last
        now = (await prometheus(client))["depthflow_messages_total"]
        done, last = now == last, now
        return done

    await asyncio.sleep(0.3)
    await wait_until(stable, wait_s, "the message count to settle")


async def avoid_minute_end(latest_phase_s: float = 45.0) -> None:
    """Start in the first part of a minute (waiting for the next one if need be), so the sync
    weight a test spreads over two minutes cannot need a third."""
    phase = time.time() % MINUTE
    if phase > latest_phase_s:
        await asyncio.sleep(MINUTE - phase + 0.3)


async def stop_exchange(sim: Simulator, client: httpx.AsyncClient) -> None:
    await sim.stop()
    await wait_quiet(client)


def assert_frames_accounted(sim: Simulator, final: dict[str, Any]) -> None:
    """Every frame sent was received, and each one is a tick or counted data loss."""
    assert final["message_count"] == sim.frames_sent, (final, sim.frames_sent)
    assert final["message_count"] == final["tick_count"] + final["data_loss_count"], final


async def stored_ticks(database_url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT symbol, last_update_id, wap FROM price_ticks"
        )
        return rows
    finally:
        await conn.close()


async def assert_waps_true(database_url: str, sim: Simulator, final: dict[str, Any]) -> int:
    """Every stored tick once, as many as counted, each WAP the exchange's own."""
    ticks = await stored_ticks(database_url)
    keys = [(t["symbol"], t["last_update_id"]) for t in ticks]
    assert len(set(keys)) == len(keys), "a tick was written twice"
    assert len(ticks) == final["tick_count"]
    missing = [
        t for t in ticks if t["last_update_id"] not in sim.markets[t["symbol"].lower()].true_wap
    ]
    assert missing == [], "true WAP history not kept"
    wrong = [
        dict(t)
        for t in ticks
        if sim.markets[t["symbol"].lower()].true_wap[t["last_update_id"]] != t["wap"]
    ]
    assert wrong == []
    return len(ticks)


@dataclass
class HealthWatch:
    """Polls /health in the background: every latency and every body's book states."""

    client: httpx.AsyncClient
    interval_s: float = 0.1
    latencies: list[float] = field(default_factory=list)
    seen: list[tuple[float, dict[str, str], dict[str, str]]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            try:
                response = await self.client.get("/health")
            except httpx.HTTPError as exc:
                self.failures.append(repr(exc))
                await asyncio.sleep(self.interval_s)
                continue
            self.latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                self.failures.append(f"HTTP {response.status_code}")
            else:
                checks = response.json()["checks"]
                self.seen.append((time.time(), checks["books"], checks["connections"]))
            await asyncio.sleep(self.interval_s)

    def p99(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def first_all_live(self, symbols: list[str]) -> float | None:
        for at, states, _ in self.seen:
            if all(states.get(s) == "live" for s in symbols):
                return at
        return None


@contextlib.asynccontextmanager
async def watching(
    client: httpx.AsyncClient, interval_s: float = 0.1
) -> AsyncIterator[HealthWatch]:
    watch = HealthWatch(client, interval_s)
    task = asyncio.create_task(watch.run())
    try:
        yield watch
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def minute_bound(first_at: float, weight: int, budget: int) -> float:
    """The earliest wall time by which ``weight`` can have been sent in fixed minutes of
    ``budget`` each, the first of them the minute of ``first_at``."""
    windows_needed = math.ceil(weight / budget)
    return (math.floor(first_at / MINUTE) + windows_needed - 1) * MINUTE


# -- tests -----------------------------------------------------------------------------------------


async def test_300_symbols_on_3_connections_sync_within_the_weight_budget(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    count, per_connection, budget = 300, 100, 1000
    sim = await start_simulator(
        running,
        symbols_count=count,
        total_rate=150.0,
        seed=11,
        record_wap=True,  # off by default above 100 symbols
        weight_limit=6000,
        max_streams_per_connection=per_connection,
    )
    rest = RestLog.attach(sim)
    symbols = [s.upper() for s in sim.symbols]
    # 300 snapshots of weight 5 and exchangeInfo: more than one minute's budget, less than two.
    sync_weight = count * DEPTH_WEIGHT + EXCHANGE_INFO_WEIGHT
    assert budget < sync_weight <= 2 * budget - 2 * EXCHANGE_INFO_WEIGHT
    await avoid_minute_end()
    env = serve_env(
        sim,
        "*",
        clean_db,
        redis_url,
        redis_prefix,
        STREAMS_PER_CONNECTION=str(per_connection),
        REST_WEIGHT_PER_MINUTE=str(budget),
    )
    serve = await start_serve(running, env, tmp_path)
    async with (
        httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client,
        watching(client) as watch,
    ):
        await wait_until(lambda: _all_live(watch, symbols, serve), 120, "every book live")
        all_live_at = watch.first_all_live(symbols)
        assert all_live_at is not None
        # The service went on working: some more ticks, then the exchange goes quiet.
        await asyncio.sleep(2.0)
        assert len(subscribers(sim)) == 3
        assert sorted(len(sub.streams) for sub in subscribers(sim)) == [100, 100, 100]
        health = (await client.get("/health")).json()
        samples = await prometheus(client)
        await stop_exchange(sim, client)
    final = await terminate(serve)

    first_at = rest.first_at
    assert first_at is not None
    boundary = minute_bound(first_at, sync_weight, budget)
    forced = boundary - first_at
    took = all_live_at - first_at
    print(
        f"\nfirst request at minute+{first_at % MINUTE:.1f}s; all live after {took:.1f}s "
        f"(budget forces >= {forced:.1f}s); /health p99 {watch.p99() * 1000:.1f} ms over "
        f"{len(watch.latencies)} polls; per-minute weight {rest.weight_per_minute()}; "
        f"REST {sim.rest_stats.as_dict()}"
    )
    # Not before the budget allows it, and not much later.
    assert all_live_at >= boundary
    assert took <= 1.5 * forced + 15.0, (took, forced)
    # Binance's limits: never a ban, at most one 429 a minute, never over the limit; and the
    # service kept inside its own budget in every minute.
    stats = sim.rest_stats
    assert stats.banned == 0, stats.as_dict()
    assert stats.bans == 0, stats.as_dict()
    assert stats.max_429_per_interval <= 1, stats.as_dict()
    assert stats.peak_weight_1m <= 6000, stats.as_dict()
    assert max(rest.weight_per_minute().values()) <= budget, rest.weight_per_minute()
    assert stats.requests_by_path["/api/v3/depth"] >= count
    # Each book synced once: 300 snapshots of reason sync, none repeated.
    # Each book synced once; a snapshot served just before the book's first event arrived is
    # "older than the first buffered event" for Binance's rule and fetched again: a few only.
    synced = [line["symbol"] for line in events_named(serve, "book_synced")]
    assert sorted(synced) == sorted(symbols)
    assert sorted(set(symbol for _, symbol in rest.snapshots)) == sorted(symbols)
    assert count <= samples['depthflow_snapshots_total{reason="sync"}'] <= count * 1.1
    # Three connections, 100 streams each, opened once.
    assert watch.failures == []
    assert watch.p99() < 0.100, f"/health p99 {watch.p99() * 1000:.1f} ms"
    assert health["checks"]["connections"] == {"0": "connected", "1": "connected", "2": "connected"}
    connected = events_named(serve, "feed_connected")
    assert sorted(line["shard"] for line in connected) == [0, 1, 2]
    assert all(line["streams"] == per_connection for line in connected)
    assert all(state == "live" for state in health["checks"]["books"].values())
    assert len(health["checks"]["books"]) == count

    assert_frames_accounted(sim, final)
    assert final["tick_count"] > 0
    await assert_waps_true(clean_db, sim, final)
    await assert_sequence_covered(clean_db)


async def _all_live(watch: HealthWatch, symbols: list[str], serve: ServeProcess) -> bool:
    assert_streams_accepted(serve)
    return watch.first_all_live(symbols) is not None


async def test_a_dropped_connection_resyncs_only_its_own_symbols(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    per_connection = 10
    sim = await start_simulator(
        running, symbols_count=30, rate=5.0, seed=12, max_streams_per_connection=per_connection
    )
    rest = RestLog.attach(sim)
    symbols = [s.upper() for s in sim.symbols]
    shards = shard_symbols(symbols, per_connection)  # `*` resolves sorted
    kicked, others = shards[1], shards[0] + shards[2]
    env = serve_env(
        sim, "*", clean_db, redis_url, redis_prefix, STREAMS_PER_CONNECTION=str(per_connection)
    )
    serve = await start_serve(running, env, tmp_path)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await wait_live(client, symbols, 60, serve)
        await asyncio.sleep(1.0)
        before = await prometheus(client)
        untouched = {id(subscriber_of(sim, shards[0])), id(subscriber_of(sim, shards[2]))}
        async with watching(client, interval_s=0.05) as watch:
            kicked_at = time.time()
            sim._connections._kick(subscriber_of(sim, kicked))

            async def reconnected() -> bool:
                subs = [
                    s for s in subscribers(sim) if set(s.streams) == {k.lower() for k in kicked}
                ]
                states = await books(client)
                return bool(subs) and all(states.get(s) == "live" for s in kicked)

            await wait_until(reconnected, 30, "the dropped shard to reconnect and resync")
            # Let late resyncs (if any) show up.
            await asyncio.sleep(2.0)
        after = await prometheus(client)
        # The other shards' connections were never replaced.
        kept = {id(s) for s in subscribers(sim) if set(s.streams) != {k.lower() for k in kicked}}
        await stop_exchange(sim, client)
    final = await terminate(serve)

    assert kept == untouched
    requested = rest.snapshots_since(kicked_at)
    # Only the dropped shard's books; some may need a second snapshot (Binance's "older than
    # the first buffered event: fetch again"), on a busy machine often (14 for 10 seen).
    assert set(requested) == set(kicked), requested
    synced = (
        after['depthflow_snapshots_total{reason="sync"}']
        - before['depthflow_snapshots_total{reason="sync"}']
    )
    assert len(kicked) <= synced <= 3 * len(kicked), synced
    assert after.get('depthflow_snapshots_total{reason="resync"}', 0) == before.get(
        'depthflow_snapshots_total{reason="resync"}', 0
    )
    # The other shards' books stayed live in every /health seen, on their first connections.
    assert watch.seen, "no /health seen during the resync"
    not_live = [
        (at, s, states.get(s))
        for at, states, _ in watch.seen
        for s in others
        if states.get(s) != "live"
    ]
    assert not_live == []
    assert all(conns["0"] == conns["2"] == "connected" for _, _, conns in watch.seen)
    connected = events_named(serve, "feed_connected")
    assert sorted(line["shard"] for line in connected) == [0, 1, 1, 2]
    synced_after = [
        line["symbol"]
        for line in events_named(serve, "book_synced")
        if _unix(line["time"]) >= kicked_at
    ]
    assert sorted(synced_after) == sorted(kicked)

    assert_frames_accounted(sim, final)
    await assert_waps_true(clean_db, sim, final)
    await assert_sequence_covered(clean_db)


def _unix(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_an_explicit_symbol_not_listed_stops_start_up_naming_it(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    sim = await start_simulator(running, ("btcusdt", "ethusdt"), rate=5.0)
    env = serve_env(sim, "btcusdt,nosuchusdt,ethusdt", clean_db, redis_url, redis_prefix)
    serve = ServeProcess(env=env, log_path=tmp_path / "serve.log")
    running.push_async_callback(stop_serve, serve)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="serve exited early"):
        await serve.start(wait_s=90)
    assert serve.process is not None
    code = await asyncio.wait_for(serve.process.wait(), 30)
    took = time.monotonic() - started
    output = serve.log_text()
    print(f"\nexit code {code} after {took:.1f}s; output:\n{output}")
    assert code != 0
    assert took < 30
    named = [line for line in output.splitlines() if "symbols_not_listed" in line]
    assert len(named) == 1, output
    line = json.loads(named[0])
    assert line["symbols"] == ["NOSUCHUSDT"]
    assert line["level"] == "CRITICAL"
    # The listed ones are not blamed, and no stream was opened.
    assert "BTCUSDT" not in named[0]
    assert "ETHUSDT" not in named[0]
    assert subscribers(sim) == []
    assert sim.rest_stats.requests_by_path["/api/v3/depth"] == 0


async def test_symbols_refresh_adds_new_listings_and_drops_delisted(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    listed = ("btcusdt", "ethusdt", "solusdt", "bnbusdt", "ethbtc")
    sim = await start_simulator(running, listed, rate=5.0, seed=13)
    rest = RestLog.attach(sim)
    env = serve_env(sim, "*usdt", clean_db, redis_url, redis_prefix, SYMBOLS_REFRESH_S="1")
    serve = await start_serve(running, env, tmp_path)
    followed = ["BNBUSDT", "BTCUSDT", "ETHUSDT", "SOLUSDT"]
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await wait_live(client, followed, 60, serve)
        assert sorted(await books(client)) == followed  # ETHBTC does not match

        sim.list_symbol("dogeusdt")
        await wait_live(client, ["DOGEUSDT"], 30, serve)

        async def doge_ticks() -> bool:
            ticks = await stored_ticks(clean_db)
            return sum(1 for t in ticks if t["symbol"] == "DOGEUSDT") >= 3

        await wait_until(doge_ticks, 30, "DOGEUSDT ticks stored")
        joined = events_named(serve, "symbols_joined")
        assert [line["symbols"] for line in joined] == [followed, ["DOGEUSDT"]], joined

        sim.delist_symbol("bnbusdt")

        async def left() -> bool:
            return "BNBUSDT" not in await books(client) and bool(
                events_named(serve, "symbols_left")
            )

        await wait_until(left, 30, "BNBUSDT to leave")
        delisted_at = time.time()
        await asyncio.sleep(2.0)
        remaining = ["BTCUSDT", "DOGEUSDT", "ETHUSDT", "SOLUSDT"]
        states = await books(client)
        assert sorted(states) == remaining
        assert all(states[s] == "live" for s in remaining), states
        samples = await prometheus(client)
        await stop_exchange(sim, client)
    final = await terminate(serve)

    assert [line["symbols"] for line in events_named(serve, "symbols_left")] == [["BNBUSDT"]]
    assert error_lines(serve) == []
    errors = {k: v for k, v in samples.items() if k.startswith("depthflow_errors_total") and v}
    assert errors == {}
    assert "BNBUSDT" not in rest.snapshots_since(delisted_at)
    # A restart of a shard (the join) loses frames in flight on the old connection: received
    # frames are still all accounted for.
    assert final["message_count"] <= sim.frames_sent
    assert final["message_count"] == final["tick_count"] + final["data_loss_count"]
    await assert_waps_true(clean_db, sim, final)
    await assert_sequence_covered(clean_db)


async def test_a_reconnect_after_a_delisting_resyncs_the_remaining_symbols(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    # A delisted symbol's stream stays subscribed until the shard's next reconnect; that
    # reconnect must not ask for it again (the exchange no longer knows the stream).
    listed = ("btcusdt", "ethusdt", "solusdt")
    sim = await start_simulator(running, listed, rate=5.0, seed=14)
    env = serve_env(sim, "*usdt", clean_db, redis_url, redis_prefix, SYMBOLS_REFRESH_S="1")
    serve = await start_serve(running, env, tmp_path)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await wait_live(client, ["BTCUSDT", "ETHUSDT", "SOLUSDT"], 60, serve)
        sim.delist_symbol("solusdt")

        async def left() -> bool:
            return "SOLUSDT" not in await books(client)

        await wait_until(left, 30, "SOLUSDT to leave")
        (subscriber,) = subscribers(sim)
        sim._connections._kick(subscriber)

        async def closed() -> bool:
            return bool(events_named(serve, "feed_closed"))

        await wait_until(closed, 10, "the service to see its connection closed")

        async def connected_again() -> bool:
            # Fails at once if the reconnect still names the delisted stream.
            assert_streams_accepted(serve)
            return len(events_named(serve, "feed_connected")) >= 2

        await wait_until(connected_again, 20, "a second connection")
        await wait_live(client, ["BTCUSDT", "ETHUSDT"], 20, serve)
        (again,) = subscribers(sim)
        assert set(again.streams) == {"btcusdt", "ethusdt"}
        await stop_exchange(sim, client)
    final = await terminate(serve)
    assert final["message_count"] == final["tick_count"] + final["data_loss_count"]
    await assert_sequence_covered(clean_db)


async def test_an_exchange_limit_below_the_budget_is_planned_under_and_never_banned(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    count, limit, budget = 150, 500, 3000
    sim = await start_simulator(
        running,
        symbols_count=count,
        total_rate=75.0,
        seed=15,
        record_wap=True,
        weight_limit=limit,  # lower than the service's own budget: it will get a 429
        ban_base_s=2.0,
    )
    rest = RestLog.attach(sim)
    symbols = [s.upper() for s in sim.symbols]
    sync_weight = count * DEPTH_WEIGHT + EXCHANGE_INFO_WEIGHT
    assert limit < sync_weight <= 2 * limit - 2 * EXCHANGE_INFO_WEIGHT
    await avoid_minute_end()
    env = serve_env(sim, "*", clean_db, redis_url, redis_prefix, REST_WEIGHT_PER_MINUTE=str(budget))
    serve = await start_serve(running, env, tmp_path)
    async with (
        httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client,
        watching(client) as watch,
    ):
        await wait_until(lambda: _all_live(watch, symbols, serve), 120, "every book live")
        all_live_at = watch.first_all_live(symbols)
        assert all_live_at is not None
        await asyncio.sleep(1.0)
        samples = await prometheus(client)
        await stop_exchange(sim, client)
    final = await terminate(serve)

    stats = sim.rest_stats
    first_at = rest.first_at
    assert first_at is not None
    print(
        f"\nfirst request at minute+{first_at % MINUTE:.1f}s; all live after "
        f"{all_live_at - first_at:.1f}s; REST {stats.as_dict()}; "
        f"per-minute weight {rest.weight_per_minute()}"
    )
    # Every book went live, after the 429's minute was over.
    assert all_live_at >= (math.floor(first_at / MINUTE) + 1) * MINUTE
    assert watch.failures == []
    assert_frames_accounted(sim, final)
    await assert_waps_true(clean_db, sim, final)
    await assert_sequence_covered(clean_db)
    # The exchange announces its limit in exchangeInfo: the service plans under it instead of
    # its own larger budget, so it never even gets a 429 (how a 429 is lived through, with
    # Retry-After and no request meanwhile, is tests/test_rest.py's).
    lowered = events_named(serve, "rest_budget_lowered")
    assert [(e["from"], e["to"]) for e in lowered] == [(budget, limit)]
    assert stats.max_429_per_interval <= 1, stats.as_dict()
    # And never got banned: nothing reached the exchange between a 429 and its Retry-After.
    limited = [r for r in rest.requests if r.status != 200]
    for refused in (r for r in rest.requests if r.status == 429):
        resume = (math.floor(refused.at / MINUTE) + 1) * MINUTE
        after = [r for r in rest.requests if refused.at < r.at < resume]
        assert after == [], f"sent after the 429 {refused}: {after}"
    assert stats.banned == 0, (stats.as_dict(), limited)
    assert stats.bans == 0, (stats.as_dict(), limited)
    assert not events_named(serve, "rest_banned")
    assert samples.get("depthflow_rest_banned_seconds_total", 0) == 0
