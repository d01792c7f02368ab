"""`depthflow record` a simulated exchange, then `depthflow replay` it into PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from depthflow.config import Settings
from depthflow.recording import RecordedFrame, RecordedSnapshot, RecordingWriter, read_recording
from depthflow.redis_sink import COUNTERS_KEY, STARTED_AT
from depthflow.replay import run_replay
from depthflow.simulate.server import Simulator
from depthflow.storage.db import asyncpg_dsn
from tests.harness.frames import depth_frame


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(["btcusdt"], seed=3, rate=300, gap_every=120, max_events=450)
    await sim.start()
    yield sim
    await sim.stop()


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "depthflow", *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_record_then_replay_stores_the_true_ticks(
    simulator: Simulator, clean_db: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "capture.ndjson.gz"
    env = {
        "SYMBOLS": "btcusdt",
        "BINANCE_WS_URL": f"ws://127.0.0.1:{simulator.port}",
        "BINANCE_REST_URL": f"http://127.0.0.1:{simulator.port}",
        "DATABASE_URL": clean_db,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": redis_prefix,
    }
    code, out = await run_cli("record", str(path), "--duration", "2.5", env=env)
    assert code == 0, out
    # Recording keeps its counters to itself: nothing under the live service's prefix.
    live = aioredis.from_url(redis_url)
    try:
        assert [k async for k in live.scan_iter(match=redis_prefix + "*")] == []
    finally:
        await live.aclose()
    items = list(read_recording(path))
    frames = [i for i in items if isinstance(i, RecordedFrame)]
    snapshots = [i for i in items if isinstance(i, RecordedSnapshot)]
    assert len(frames) >= 100
    # One snapshot at start-up and one after each injected gap.
    assert len(snapshots) >= 2

    code, out = await run_cli("replay", str(path), env=env)
    assert code == 0, out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["frames"] == len(frames)

    conn = await asyncpg.connect(asyncpg_dsn(clean_db))
    try:
        ticks = await conn.fetch("SELECT last_update_id, wap FROM price_ticks")
    finally:
        await conn.close()
    assert len(ticks) == summary["tick_count"] > 0
    market = simulator.markets["btcusdt"]
    assert all(market.true_wap[t["last_update_id"]] == t["wap"] for t in ticks)
    assert summary["message_count"] == summary["tick_count"] + summary["data_loss_count"]


def _frame(first: int, last: int, bid_qty: float) -> str:
    return depth_frame(first, last, [("99.0", bid_qty)])


async def test_replay_keeps_its_counters_out_of_the_live_ones(
    make_settings: Callable[..., Settings], redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    # The live service's counters, under the prefix the replay is configured with.
    live = aioredis.from_url(redis_url, decode_responses=True)
    key = redis_prefix + COUNTERS_KEY
    await live.hset(key, mapping={"message_count": 5, "latency_sum": 0.5, STARTED_AT: "1.5"})
    path = tmp_path / "old.ndjson"
    recorded_at = 1_700_000_000.0  # long ago: "received to now" would be a huge latency
    with RecordingWriter(path) as writer:
        writer.write_frame(recorded_at, _frame(100, 101, 2.0))
        snapshot = '{"lastUpdateId":100,"bids":[["99.0","1.0"]],"asks":[["101.0","3.0"]]}'
        writer.write_snapshot(recorded_at + 0.1, "btcusdt", snapshot)
        for u in range(102, 106):
            writer.write_frame(recorded_at + u / 1000, _frame(u, u, 1.0 + u % 3))
    try:
        summary = await run_replay(make_settings(metrics_flush_ms=10), path)
        keys = sorted([k async for k in live.scan_iter(match=redis_prefix + "*")])
        counters = await live.hgetall(key)
    finally:
        await live.aclose()

    assert summary["frames"] == summary["message_count"] == 5
    assert summary["tick_count"] == 5
    assert "latency_sum" not in summary
    # Nothing pushed: no push ids, and the live totals (and when they started) are as they were.
    assert keys == [key]
    assert counters == {"message_count": "5", "latency_sum": "0.5", STARTED_AT: "1.5"}
