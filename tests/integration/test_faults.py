"""Faults with real services: a real `depthflow serve` subprocess fed by the in-process simulator.

PostgreSQL and Redis outages use private servers (`private_services`), never the shared ones.
Each test checks from outside what the README promises: no tick lost or written twice across a
database restart, ingest going on without Redis and the shared counters catching up, reconnects
and sequence gaps resynced and counted, and every computed row flushed on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis

from depthflow.simulate.market import Market
from depthflow.simulate.server import Simulator
from depthflow.storage.db import asyncpg_dsn
from tests.harness.processes import (
    ServeProcess,
    events_named,
    exchange_env,
)
from tests.harness.prometheus import prometheus
from tests.integration.private_services import PrivatePostgres, PrivateRedis
from tests.ledger_check import assert_sequence_covered

SYMBOLS = ("btcusdt", "ethusdt")
SEED = 5
OUTAGE_S = 3.0
SMA_SHORT, SMA_LONG = 3, 8
# Data loss that would mean a computed row never reached the database.
ROW_LOSS = ("data_loss:overflow", "data_loss:rejected", "data_loss:shutdown")


# -- helpers -------------------------------------------------------------------------------------


def serve_env(
    sim: Simulator, database_url: str, redis_url: str, prefix: str, **extra: str
) -> dict[str, str]:
    assert sim.port is not None
    return exchange_env(
        sim.port,
        SYMBOLS,
        database_url=database_url,
        redis_url=redis_url,
        redis_prefix=prefix,
        **{
            "SMA_SHORT": str(SMA_SHORT),
            "SMA_LONG": str(SMA_LONG),
            "BATCH_MAX_DELAY_MS": "50",
            "METRICS_FLUSH_MS": "100",
            **extra,
        },
    )


async def start_simulator(running: contextlib.AsyncExitStack, **kwargs: Any) -> Simulator:
    sim = Simulator(SYMBOLS, seed=SEED, **kwargs)
    await sim.start()
    running.push_async_callback(sim.stop)
    return sim


async def start_serve(
    running: contextlib.AsyncExitStack, env: dict[str, str], tmp_path: Path
) -> ServeProcess:
    serve = ServeProcess(env=env, log_path=tmp_path / "serve.log")
    running.push_async_callback(stop_serve, serve)
    await serve.start()
    return serve


async def stop_serve(serve: ServeProcess) -> None:
    if serve.process is not None:
        await serve.stop()


async def terminate(serve: ServeProcess) -> dict[str, Any]:
    """SIGTERM the service; the counters of its final ``service_stopped`` log line."""
    code = await serve.stop()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert code in {0, -15}, serve.log_text()
    stopped = events_named(serve, "service_stopped")
    assert len(stopped) == 1, serve.log_text()
    return stopped[0]


async def ticks_now(client: httpx.AsyncClient) -> float:
    return (await prometheus(client))["depthflow_ticks_total"]


async def wait_until(check: Callable[[], Awaitable[bool]], wait_s: float, what: str) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out after {wait_s} s waiting for {what}")


async def wait_ticks(client: httpx.AsyncClient, at_least: float, wait_s: float = 30.0) -> None:
    async def enough() -> bool:
        return await ticks_now(client) >= at_least

    await wait_until(enough, wait_s, f"{at_least} ticks")


async def wait_quiet(client: httpx.AsyncClient, wait_s: float = 15.0) -> None:
    """Wait until the service has handled every frame it will get (message count stable)."""
    last = -1.0

    async def stable() -> bool:
        nonlocal last
        now = (await prometheus(client))["depthflow_messages_total"]
        done, last = now == last, now
        return done

    await wait_until(stable, wait_s, "the message count to settle")


async def poll_health(client: httpx.AsyncClient, seconds: float) -> list[dict[str, Any]]:
    """Every `/health` body seen over `seconds` (each one must be a 200)."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        response = await client.get("/health")
        assert response.status_code == 200
        seen.append(response.json())
        await asyncio.sleep(0.2)
    return seen


async def health_is_ok(client: httpx.AsyncClient) -> bool:
    return bool((await client.get("/health")).json()["status"] == "OK")


async def redis_counters(url: str, prefix: str) -> dict[str, float]:
    """The shared counters hash, read with a client of its own (a restart kills pooled ones)."""
    client = aioredis.from_url(url)
    try:
        raw = await client.hgetall(f"{prefix}counters")
    finally:
        await client.aclose()
    return {
        field.decode() if isinstance(field, bytes) else field: float(value)
        for field, value in raw.items()
    }


def levels_per_event(symbol: str, up_to: int) -> dict[int, int]:
    """Price levels of each event the simulator generated, by ``u``: a same-seed replica of its
    market replays the very same events."""
    replica = Market(symbol, seed=SEED, record_wap=False)
    levels: dict[int, int] = {}
    while replica.last_update_id < up_to:
        event = replica.next_event(0)
        levels[event["u"]] = len(event["b"]) + len(event["a"])
    return levels


async def check_stored_rows(database_url: str, sim: Simulator, final: dict[str, Any]) -> int:
    """Everything the service computed is stored exactly once and right; returns the tick count.

    Ticks: one per (symbol, u), as many as the service counted, each WAP the exchange's true one.
    Orders: every level of every ticked event, once. Signals: as many as the service counted.
    """
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        ticks = await conn.fetch("SELECT symbol, last_update_id, wap FROM price_ticks")
        order_events = await conn.fetch(
            "SELECT symbol, last_update_id, count(*) AS n FROM orders GROUP BY 1, 2"
        )
        orders = await conn.fetchval("SELECT count(*) FROM orders")
        duplicated_levels = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM orders"
            " GROUP BY symbol, last_update_id, side, price HAVING count(*) > 1) AS d"
        )
        signals = await conn.fetchval("SELECT count(*) FROM trading_signals")
    finally:
        await conn.close()

    keys = [(t["symbol"], t["last_update_id"]) for t in ticks]
    assert len(set(keys)) == len(keys), "a tick was written twice"
    assert len(ticks) == final["tick_count"] == final.get("rows_written:price_ticks", 0)
    wrong = [
        dict(t)
        for t in ticks
        if sim.markets[t["symbol"].lower()].true_wap[t["last_update_id"]] != t["wap"]
    ]
    assert wrong == []

    assert duplicated_levels == 0, "an order row was written twice"
    assert {(o["symbol"], o["last_update_id"]) for o in order_events} == set(keys)
    expected_orders = 0
    for symbol in SYMBOLS:
        ids = [u for s, u in keys if s == symbol.upper()]
        levels = levels_per_event(symbol, max(ids))
        expected_orders += sum(levels[u] for u in ids)
    assert orders == expected_orders == final.get("rows_written:orders", 0)

    assert signals == final["signal_count"] == final.get("rows_written:trading_signals", 0)
    assert {k: final.get(k, 0) for k in ROW_LOSS} == dict.fromkeys(ROW_LOSS, 0)
    # Every hole the faults left in the stored sequence has its data_gaps row.
    await assert_sequence_covered(database_url)
    return len(ticks)


# -- tests ---------------------------------------------------------------------------------------


async def test_postgres_restart_mid_stream_loses_and_doubles_nothing(
    private_postgres: PrivatePostgres,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    sim = await start_simulator(running, rate=150)
    env = serve_env(sim, private_postgres.url, redis_url="", prefix="unused:")
    serve = await start_serve(running, env, tmp_path)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await wait_ticks(client, 100)
        await private_postgres.stop("fast")
        before = await ticks_now(client)
        during = await poll_health(client, OUTAGE_S)
        after = await ticks_now(client)
        await private_postgres.start()
        await wait_until(lambda: health_is_ok(client), 20, "/health OK after the restart")
        # Some ticks after the restart too, then the exchange goes quiet.
        await wait_ticks(client, after + 100)
        await sim.stop()
        await wait_quiet(client)
    final = await terminate(serve)

    # Ingest went on while the database was away, and /health said so.
    assert after > before
    down = [h for h in during if h["checks"]["database"] == "down"]
    assert down, during
    assert all(h["status"] == "DEGRADED" for h in down)
    failed = events_named(serve, "database_write_failed")
    assert failed, "the writer did not log the outage"
    assert events_named(serve, "database_writes_resumed")
    assert final["error:database"] >= len(failed)

    stored = await check_stored_rows(private_postgres.url, sim, final)
    assert stored > after


async def test_redis_stopped_mid_stream_ingest_goes_on_and_counters_catch_up(
    private_redis: PrivateRedis,
    clean_db: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    prefix = "depthflow-fault:"
    sim = await start_simulator(running, rate=150)
    serve = await start_serve(
        running, serve_env(sim, clean_db, private_redis.url, prefix), tmp_path
    )
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await wait_ticks(client, 100)

        async def pushed() -> bool:
            return (await redis_counters(private_redis.url, prefix)).get("tick_count", 0) > 0

        await wait_until(pushed, 10, "counters in Redis")
        await private_redis.stop(save=True)
        before = await ticks_now(client)
        during = await poll_health(client, OUTAGE_S)
        after = await ticks_now(client)
        await private_redis.start()
        await wait_until(lambda: health_is_ok(client), 20, "/health OK after the restart")
        seen = (await prometheus(client))["depthflow_messages_total"]

        async def caught_up() -> bool:
            counters = await redis_counters(private_redis.url, prefix)
            return counters.get("message_count", 0) >= seen

        # While running, not only in the final push at shutdown.
        await wait_until(caught_up, 10, "the Redis counters to catch up")
        await sim.stop()
        await wait_quiet(client)
    final = await terminate(serve)
    counters = await redis_counters(private_redis.url, prefix)

    assert after > before, "ingest stopped while Redis was away"
    down = [h for h in during if h["checks"]["redis"] == "down"]
    assert down, during
    assert all(h["status"] == "DEGRADED" and h["checks"]["database"] == "ok" for h in down)
    assert events_named(serve, "redis_unavailable")
    assert events_named(serve, "redis_restored")
    # The deltas kept while Redis was away were added once, not lost and not twice.
    for field in ("message_count", "tick_count", "data_loss_count", "signal_count"):
        assert counters[field] == final[field], (field, counters, final)
    await check_stored_rows(clean_db, sim, final)


async def test_disconnects_and_gaps_are_resynced_and_counted(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    events = 2001  # not a multiple of gap_every: the last event of each symbol is delivered
    # rate 0: events are made as the client reads them, so none is made before it connects.
    sim = await start_simulator(
        running, rate=0, gap_every=150, disconnect_every=1000, max_events=events
    )
    serve = await start_serve(running, serve_env(sim, clean_db, redis_url, redis_prefix), tmp_path)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await asyncio.wait_for(sim.done.wait(), 60)

        async def caught_up() -> bool:
            for symbol in SYMBOLS:
                book = (await client.get(f"/book/{symbol}")).json()
                if book["last_update_id"] != sim.markets[symbol].top(1)[0]:
                    return False
            return True

        await wait_until(caught_up, 30, "the books to catch up with the exchange")
        for symbol in SYMBOLS:
            book = (await client.get(f"/book/{symbol}", params={"depth": 20})).json()
            last_id, bids, asks = sim.markets[symbol].top(20)
            assert book["last_update_id"] == last_id
            assert book["bids"] == [list(level) for level in bids]
            assert book["asks"] == [list(level) for level in asks]
        samples = await prometheus(client)
    final = await terminate(serve)

    connections = events_named(serve, "feed_connected")
    assert len(connections) >= 2, "the simulator's disconnects caused no reconnect"
    gaps = samples.get('depthflow_data_loss_total{reason="gap"}', 0)
    dropped = sum(n // 150 for n in sim.events_generated.values())
    assert 1 <= gaps <= dropped
    synced = [line["symbol"] for line in events_named(serve, "book_synced")]
    # Each book was resynced at least once after the first sync (a reconnect or a gap).
    assert all(synced.count(symbol.upper()) >= 2 for symbol in SYMBOLS), synced
    assert final["data_loss:gap"] == gaps
    # Every frame is a tick or counted data loss.
    assert final["message_count"] == final["tick_count"] + final["data_loss_count"]
    await check_stored_rows(clean_db, sim, final)


async def test_sigterm_mid_stream_flushes_every_computed_row(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    # Full speed: frames are flowing as fast as the service reads them when SIGTERM lands.
    sim = await start_simulator(running, rate=0, max_events=10**7)
    # Big, slow batches: at SIGTERM many computed rows are still only in the writer's memory.
    env = serve_env(
        sim, clean_db, redis_url, redis_prefix, BATCH_MAX_ROWS="100000", BATCH_MAX_DELAY_MS="1000"
    )
    serve = await start_serve(running, env, tmp_path)
    async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
        await wait_ticks(client, 5000)
        samples = await prometheus(client)
        assert not sim.done.is_set()
        sent_at_sigterm = sim.frames_sent
    final = await terminate(serve)
    assert sim.frames_sent > sent_at_sigterm, "no frame was flowing at SIGTERM"
    written_before = sum(v for k, v in samples.items() if k.startswith("depthflow_rows_written"))
    assert final["rows_written_count"] > written_before

    assert not events_named(serve, "writer_rows_lost_at_shutdown")
    stored = await check_stored_rows(clean_db, sim, final)
    assert stored >= 5000
    assert final["signal_count"] >= 1
    logged = events_named(serve, "trading_signal")
    assert len(logged) == final["signal_count"]


async def test_a_locked_table_never_blocks_the_feed_and_health_says_slow(
    clean_db: str,
    redis_url: str,
    redis_prefix: str,
    running: contextlib.AsyncExitStack,
    tmp_path: Path,
) -> None:
    # An ACCESS EXCLUSIVE lock on price_ticks holds the writer's COPY: the feed must keep
    # reading (bounded backpressure), /health must say "slow", and nothing may be lost.
    lock_s = 8.0
    sim = await start_simulator(running, rate=150)
    env = serve_env(sim, clean_db, redis_url, redis_prefix)
    serve = await start_serve(running, env, tmp_path)
    holder = await asyncpg.connect(asyncpg_dsn(clean_db))
    try:
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
            await wait_ticks(client, 100)
            async with holder.transaction():
                await holder.execute("LOCK TABLE price_ticks IN ACCESS EXCLUSIVE MODE")
                messages_at_lock = (await prometheus(client))["depthflow_messages_total"]
                during = await poll_health(client, lock_s)
                samples = await prometheus(client)
            await wait_until(lambda: health_is_ok(client), 30, "/health OK after the lock")
            await sim.stop()
            await wait_quiet(client)
    finally:
        await holder.close()
    final = await terminate(serve)

    # The feed kept reading: ~150 frames/s per symbol went on arriving under the lock.
    assert samples["depthflow_messages_total"] - messages_at_lock > 150 * lock_s / 2
    slow = [h for h in during if h["checks"]["database"] == "slow"]
    assert slow, [h["checks"]["database"] for h in during]
    assert all(h["status"] == "DEGRADED" for h in slow)
    assert samples["depthflow_database_slow"] == 1.0
    assert samples["depthflow_database_up"] == 0.0
    await check_stored_rows(clean_db, sim, final)
