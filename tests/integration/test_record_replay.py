"""`depthflow record` a simulated exchange, then `depthflow replay` it into PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from depthflow.recording import RecordedFrame, RecordedSnapshot, read_recording
from depthflow.simulate.server import Simulator
from depthflow.storage.db import asyncpg_dsn


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
