"""`depthflow migrate` as a user runs it: creates the missing database, then migrates it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import asyncpg

from depthflow.storage import db
from tests.conftest import PG_SERVER_URL


def migrate(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "depthflow", "migrate"],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_migrate_creates_the_database_and_the_tables(database_url: str) -> None:
    # `database_url` only makes sure the server is reachable (or fails under CI=true).
    url = PG_SERVER_URL.rsplit("/", 1)[0] + f"/depthflow_cli_{uuid.uuid4().hex[:8]}"
    try:
        result = await asyncio.to_thread(migrate, url)
        assert result.returncode == 0, result.stdout + result.stderr
        assert '"event":"migrated"' in result.stdout
        conn = await asyncpg.connect(db.asyncpg_dsn(url))
        try:
            tables = {
                r["tablename"]
                for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname='public'"
                )
            }
            version = await conn.fetchval("SELECT version_num FROM alembic_version")
        finally:
            await conn.close()
        assert {"price_ticks", "orders", "trading_signals"} <= tables
        assert version
        # Running it again is a no-op, not an error.
        again = await asyncio.to_thread(migrate, url)
        assert again.returncode == 0, again.stderr
    finally:
        await db.drop_database(url)
