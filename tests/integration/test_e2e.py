"""The whole pipeline on loopback: `simulate` (with faults) feeds a real `depthflow serve`.

Checked from outside, like a user would: the stored ticks against the exchange's true books, the
live books against the exchange's, the signals against the spec's rules on the stored ticks, the
JSON log lines, and the accounting (every received frame is a tick or counted data loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from depthflow.simulate.server import Simulator
from depthflow.storage.db import asyncpg_dsn
from tests.harness.processes import ServeProcess, exchange_env
from tests.ledger_check import assert_sequence_covered
from tests.reference import spec_signals

SYMBOLS = ("btcusdt", "ethusdt")
EVENTS = 1201
SMA_SHORT, SMA_LONG = 3, 8


# Hang guards only, sized for a busy 2-core machine; on a quiet one the test takes ~10 s.
START_S = 180  # `depthflow serve` answering /health (imports, Numba compile, migrations check)
SUBSCRIBE_S = 180  # its feed subscribing, which starts the simulator's clock
RUN_S = 300  # the simulator sending its EVENTS per symbol
CATCH_UP_S = 180  # the service handling every frame sent
STOP_S = 120  # SIGTERM to exit: final flush and Redis push


async def wait_for(check: Callable[[], Awaitable[bool]], wait_s: float, what: str) -> None:
    """Poll ``check`` until it holds; fail after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {wait_s} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _wait_caught_up(client: httpx.AsyncClient, sim: Simulator, wait_s: float) -> None:
    """Until the service counted every frame the simulator sent as a tick or a loss, and its
    books stand where the exchange's do."""
    expected = sim.frames_sent + sim.malformed_sent
    seen: dict[str, Any] = {}

    async def caught_up() -> bool:
        metrics = (await client.get("/metrics")).json()
        seen.update(metrics)
        handled = metrics["tick_count"] + metrics["data_loss_count"]
        if metrics["message_count"] < expected or handled < metrics["message_count"]:
            return False
        for symbol in SYMBOLS:
            book = (await client.get(f"/book/{symbol}")).json()
            seen[symbol] = book["last_update_id"]
            if book["last_update_id"] != sim.markets[symbol].last_update_id:
                return False
        return True

    try:
        await wait_for(caught_up, wait_s, "the service to catch up")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: expected {expected} messages, last seen {seen}") from None


async def _wait_healthy(client: httpx.AsyncClient, wait_s: float) -> dict[str, Any]:
    """The first OK /health (a probe can time out on a loaded machine; the next one decides)."""
    health: dict[str, Any] = {}

    async def ok() -> bool:
        nonlocal health
        response = await client.get("/health")
        assert response.status_code == 200
        health = response.json()
        return bool(health["status"] == "OK")

    with contextlib.suppress(TimeoutError):  # asserted by the caller, with the last body seen
        await wait_for(ok, wait_s, "/health OK")
    return health


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    # Paced, but its clock starts only when the service subscribes: however slowly
    # `depthflow serve` starts, it gets every event but those the faults below take.
    sim = Simulator(
        SYMBOLS,
        seed=7,
        rate=250,
        gap_every=200,
        malformed_every=150,
        disconnect_every=700,
        max_events=EVENTS,
    )
    await sim.start()
    yield sim
    await sim.stop()


async def test_simulated_exchange_end_to_end(
    simulator: Simulator, clean_db: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    port = simulator.port
    assert port is not None
    serve = ServeProcess(
        env=exchange_env(
            port,
            SYMBOLS,
            database_url=clean_db,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            SMA_SHORT=str(SMA_SHORT),
            SMA_LONG=str(SMA_LONG),
            BATCH_MAX_DELAY_MS="50",
            METRICS_FLUSH_MS="100",
        ),
        log_path=tmp_path / "serve.log",
    )
    await serve.start(wait_s=START_S)
    try:
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=30) as client:
            await asyncio.wait_for(simulator.started.wait(), SUBSCRIBE_S)
            await asyncio.wait_for(simulator.done.wait(), RUN_S)
            await _wait_caught_up(client, simulator, CATCH_UP_S)
            for symbol in SYMBOLS:
                book = (await client.get(f"/book/{symbol}", params={"depth": 10})).json()
                last_id, bids, asks = simulator.markets[symbol].top(10)
                assert book["last_update_id"] == last_id
                assert book["bids"] == [list(level) for level in bids]
                assert book["asks"] == [list(level) for level in asks]
            health = await _wait_healthy(client, CATCH_UP_S)
            metrics = (await client.get("/metrics")).json()
            prometheus = (await client.get("/prometheus")).text
    finally:
        exit_code = await serve.stop(wait_s=STOP_S)
    log = serve.log_text()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert exit_code in {0, -15}, log
    assert '"event":"service_stopped"' in log
    assert health["status"] == "OK", health

    # Faults were injected and show in the counters with their reasons.
    assert metrics["error_count"] >= 1
    # Every frame sent reached the service (the faults drop events at the source, not in transit).
    assert metrics["message_count"] == simulator.frames_sent + simulator.malformed_sent, metrics
    assert metrics["data_loss_count"] >= 1
    loss = {
        s.labels["reason"]: s.value
        for family in text_string_to_metric_families(prometheus)
        if family.name == "depthflow_data_loss"
        for s in family.samples
    }
    assert loss.get("gap", 0) >= 1, loss
    assert loss.get("malformed", 0) >= 1, loss

    conn = await asyncpg.connect(asyncpg_dsn(clean_db))
    try:
        ticks = await conn.fetch(
            "SELECT symbol, last_update_id, wap FROM price_ticks ORDER BY symbol, last_update_id"
        )
        orders = await conn.fetchval("SELECT count(*) FROM orders")
        signals = await conn.fetch(
            "SELECT symbol, signal, price, last_update_id FROM trading_signals"
            " ORDER BY symbol, last_update_id"
        )
    finally:
        await conn.close()

    # Every stored tick's WAP is the exchange's true WAP at that update id, and none is doubled.
    by_symbol: dict[str, list[asyncpg.Record]] = {s.upper(): [] for s in SYMBOLS}
    for tick in ticks:
        by_symbol[tick["symbol"]].append(tick)
    mismatches = [
        t
        for t in ticks
        if simulator.markets[t["symbol"].lower()].true_wap[t["last_update_id"]] != t["wap"]
    ]
    assert mismatches == []
    assert len({(t["symbol"], t["last_update_id"]) for t in ticks}) == len(ticks)
    for symbol, rows in by_symbol.items():
        assert len(rows) > EVENTS // 2, (symbol, len(rows))
    assert orders > len(ticks)
    # The gaps, disconnects and malformed frames left holes: each one has its data_gaps row.
    await assert_sequence_covered(clean_db)

    # Signals are exactly the spec's rules applied to the stored ticks.
    expected = []
    for symbol, rows in sorted(by_symbol.items()):
        waps = [r["wap"] for r in rows]
        expected += [
            (symbol, kind, waps[i], rows[i]["last_update_id"])
            for i, kind in spec_signals(waps, SMA_SHORT, SMA_LONG)
        ]
    stored = [(s["symbol"], s["signal"], s["price"], s["last_update_id"]) for s in signals]
    assert stored == expected
    assert len(stored) >= 2

    # One JSON log line per signal row.
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    logged = [
        (x["symbol"], x["signal"], x["price"], x["last_update_id"])
        for x in lines
        if x.get("event") == "trading_signal"
    ]
    assert sorted(logged) == sorted(stored)

    # Accounting: every received frame became a tick or counted data loss with a reason.
    redis_client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        counters = await redis_client.hgetall(f"{redis_prefix}counters")
    finally:
        await redis_client.aclose()
    totals = Counter({str(k): float(v) for k, v in counters.items()})
    lost = sum(
        v for k, v in totals.items() if k.startswith("data_loss:") and k != "data_loss:overflow"
    )
    assert totals["tick_count"] == len(ticks)
    assert totals["message_count"] == totals["tick_count"] + lost, totals
