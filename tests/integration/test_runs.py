"""The `runs` table and safe replay: every stored row traced to the run that wrote it, and a
second replay of the same file refused before it stores anything."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from depthflow.config import Settings
from depthflow.progress import Progress
from depthflow.replay import run_replay
from depthflow.service import Service
from depthflow.storage import db
from depthflow.storage.runs import mark_crashed
from tests.harness.real_data import SPOT, available, write_spot_recording


async def fetch(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


async def replay_cli(path: Path, url: str, *extra: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "depthflow", "replay", str(path), *extra,
        env={**os.environ, "DATABASE_URL": url, "SYMBOLS": "btcusdt", "REDIS_URL": ""},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_a_second_replay_of_a_file_stores_nothing_and_says_why(
    make_settings: Callable[..., Settings], clean_db: str, tmp_path: Path
) -> None:
    if not available():
        pytest.skip(f"{SPOT} is not there")
    path = write_spot_recording("btcusdt", tmp_path / "btcusdt.ndjson.gz")
    shown = io.StringIO()
    progress = Progress(shown, "replay", tty=False, every_s=0, unit="frames")
    await run_replay(make_settings(symbols="btcusdt", redis_url=""), path, progress=progress)
    # The frame count comes from the pass that checks the file before anything is stored.
    assert shown.getvalue().splitlines()[-1].startswith("replay: 6,495 / 6,495 frames (100%)")
    ticks = await fetch(
        clean_db, "SELECT min(last_update_id), max(last_update_id), count(*) FROM price_ticks"
    )
    first, last, count = ticks[0]
    assert count == 6_493

    (run,) = await fetch(clean_db, "SELECT * FROM runs")
    assert run["source"] == "file"
    assert run["file_path"] == str(path.resolve())
    assert run["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert run["status"] == "completed"
    assert run["ended_at"] is not None
    assert run["symbols"] == ["BTCUSDT"]
    # Every stored tick lies in the run's update-id range of its symbol.
    assert json.loads(run["update_ids"]) == {"BTCUSDT": [first, last]}

    code, out, err = await replay_cli(path, clean_db)
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"{first}..{last} of BTCUSDT are stored already by run {run['id']}" in lines[0]
    assert "--force" in lines[0]
    assert "Traceback" not in err + out
    assert (await fetch(clean_db, "SELECT count(*) FROM price_ticks"))[0][0] == count
    assert len(await fetch(clean_db, "SELECT id FROM runs")) == 1

    code, out, err = await replay_cli(path, clean_db, "--force")
    assert code == 0, err
    assert (await fetch(clean_db, "SELECT count(*) FROM price_ticks"))[0][0] == 2 * count
    statuses = [r[0] for r in await fetch(clean_db, "SELECT status FROM runs ORDER BY id")]
    assert statuses == ["completed", "completed"]


async def test_a_live_run_has_its_row_and_a_dead_one_is_marked_crashed(
    make_settings: Callable[..., Settings], clean_db: str
) -> None:
    service = Service(make_settings(symbols="btcusdt,ethusdt"), with_feed=False)
    await service.start()
    try:
        for _ in range(200):
            if service.run.run_id is not None:
                break
            await asyncio.sleep(0.05)
        assert service.run.run_id is not None
        (row,) = await fetch(clean_db, "SELECT source, status, symbols, pid FROM runs")
        assert tuple(row) == ("live", "running", ["BTCUSDT", "ETHUSDT"], os.getpid())
    finally:
        await service.stop()
    (row,) = await fetch(clean_db, "SELECT status, ended_at FROM runs")
    assert row["status"] == "completed"
    assert row["ended_at"] is not None

    # A run whose heartbeat stopped long ago (kill -9) is found and marked at the next start.
    conn = await asyncpg.connect(db.asyncpg_dsn(clean_db))
    try:
        await conn.execute(
            "INSERT INTO runs (source, symbols, status, host, pid, last_seen_at) "
            "VALUES ('live', '{BTCUSDT}', 'running', 'gone', 1, now() - interval '1 hour')"
        )
    finally:
        await conn.close()
    engine = db.make_engine(clean_db, pool_size=1)
    try:
        assert await mark_crashed(engine) == 1
        assert await mark_crashed(engine) == 0
    finally:
        await engine.dispose()
    statuses = await fetch(clean_db, "SELECT status FROM runs ORDER BY id")
    assert [r[0] for r in statuses] == ["completed", "crashed"]
