"""The benchmarks' floor stores depthflow's rows: the same ``orders`` rows as a replay of the
same recording, whichever encoding it COPYs with, and one ``price_ticks`` row per event."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from bench.floor import Encoding, FloorConfig, floor_from_recording
from depthflow.config import Settings
from depthflow.replay import run_replay
from depthflow.storage.db import asyncpg_dsn
from tests.conftest import PG_SERVER_URL
from tests.harness.databases import scratch_database
from tests.harness.real_data import SPOT, available, write_spot_recording

FRAMES = 300
ORDERS = "SELECT symbol, event_time, last_update_id, side, price, quantity FROM orders"


async def fetch(url: str, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return sorted(tuple(row) for row in await conn.fetch(sql))
    finally:
        await conn.close()


@pytest.fixture
def recording(tmp_path: Path) -> Path:
    """The first `FRAMES` frames of the BTCUSDT recording, its snapshot after the second."""
    if not available():
        pytest.skip(f"{SPOT} is not there")
    whole = write_spot_recording("btcusdt", tmp_path / "whole.ndjson")
    cut = tmp_path / "cut.ndjson.gz"
    with whole.open() as source, gzip.open(cut, "wt") as target:
        for line in list(source)[: FRAMES + 1]:  # + the snapshot line
            target.write(line)
    return cut


@pytest.mark.parametrize("encoding", ["records", "text"])
async def test_the_floor_stores_the_orders_rows_a_replay_stores(
    encoding: Encoding,
    recording: Path,
    make_settings: Callable[..., Settings],
    clean_db: str,
) -> None:
    await run_replay(make_settings(symbols="btcusdt", redis_url=""), recording)
    replayed = await fetch(clean_db, ORDERS)
    async with scratch_database(PG_SERVER_URL, "depthflow_test_floor") as url:
        config = FloorConfig(connections=2, batch_rows=1_000, encoding=encoding)
        run = await floor_from_recording(recording, url, config)
        floor = await fetch(url, ORDERS)
        ticks = await fetch(url, "SELECT last_update_id FROM price_ticks")
    assert run.events == FRAMES
    assert len(ticks) == FRAMES == len(set(ticks))
    # The replay drops the events older than the snapshot; the floor stores every event.
    first_applied = min(row[2] for row in replayed)
    assert [row for row in floor if row[2] >= first_applied] == replayed
    assert len(floor) > len(replayed) > 0
