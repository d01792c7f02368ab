"""The whole pipeline on loopback: `simulate` (with faults) feeds a real `depthflow serve`.

Checked from outside, like a user would: the stored ticks against the exchange's true books, the
live books against the exchange's, the signals against the spec's rules on the stored ticks, the
JSON log lines, and the accounting (every received frame is a tick or counted data loss).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from depthflow.simulate.server import Simulator
from depthflow.storage.db import asyncpg_dsn
from tests.integration.serve_process import ServeProcess, exchange_env
from tests.reference import spec_signals

SYMBOLS = ("btcusdt", "ethusdt")
EVENTS = 1201
SMA_SHORT, SMA_LONG = 3, 8


async def _wait_caught_up(client: httpx.AsyncClient, sim: Simulator, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ids = []
        for symbol in SYMBOLS:
            book = (await client.get(f"/book/{symbol}")).json()
            ids.append(book["last_update_id"] == sim.markets[symbol].top(1)[0])
        if all(ids):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("books did not catch up with the exchange")


@pytest.fixture
async def simulator() -> Simulator:
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
    await serve.start()
    try:
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
            await asyncio.wait_for(simulator.done.wait(), 60)
            await _wait_caught_up(client, simulator, 30)
            for symbol in SYMBOLS:
                book = (await client.get(f"/book/{symbol}", params={"depth": 10})).json()
                last_id, bids, asks = simulator.markets[symbol].top(10)
                assert book["last_update_id"] == last_id
                assert book["bids"] == [list(level) for level in bids]
                assert book["asks"] == [list(level) for level in asks]
            metrics = (await client.get("/metrics")).json()
            prometheus = (await client.get("/prometheus")).text
            health = (await client.get("/health")).json()
    finally:
        exit_code = await serve.stop()
    log = serve.log_text()
    # uvicorn re-raises the SIGTERM it handled once shutdown is complete.
    assert exit_code in {0, -15}, log
    assert '"event":"service_stopped"' in log
    assert health["status"] == "OK", health

    # Faults were injected and show in the counters with their reasons.
    assert metrics["error_count"] >= 1
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
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        counters = await client.hgetall(f"{redis_prefix}counters")
    finally:
        await client.aclose()
    totals = Counter({k: float(v) for k, v in counters.items()})
    lost = sum(
        v for k, v in totals.items() if k.startswith("data_loss:") and k != "data_loss:overflow"
    )
    assert totals["tick_count"] == len(ticks)
    assert totals["message_count"] == totals["tick_count"] + lost, totals
