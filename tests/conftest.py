"""Shared fixtures: a fresh, Alembic-migrated PostgreSQL database per test run, and Redis.

With ``CI=true`` a service that cannot be reached fails the test; elsewhere the test is skipped
with the reason, so a laptop without PostgreSQL can still run the pure tests.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import asyncpg
import pytest
import redis.asyncio as aioredis

from depthflow.config import Settings
from depthflow.storage import db
from tests.harness.databases import delete_keys, scratch_url

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
PG_SERVER_URL = os.environ.get(
    "DEPTHFLOW_TEST_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_TEST_URL = os.environ.get("DEPTHFLOW_TEST_REDIS", "redis://127.0.0.1:6379/0")
TABLES = (
    "price_ticks",
    "orders",
    "trading_signals",
    "ingest_batches",
    "data_gaps",
    "book_checkpoints",
    "runs",
)


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable: {exc!r}"
    if CI:
        pytest.fail(message + " (CI=true: services are required)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database created and migrated for this test run, dropped afterwards."""
    url = scratch_url(PG_SERVER_URL, "depthflow_test")
    try:
        asyncio.run(db.migrate(url))
    except (OSError, asyncpg.PostgresError) as exc:
        _unavailable("PostgreSQL", exc)
    yield url
    asyncio.run(db.drop_database(url))


@pytest.fixture
async def clean_db(database_url: str) -> str:
    """The test run's database with every table emptied."""
    conn = await asyncpg.connect(db.asyncpg_dsn(database_url))
    try:
        await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY")
    finally:
        await conn.close()
    return database_url


@pytest.fixture
async def redis_url() -> str:
    client = aioredis.from_url(REDIS_TEST_URL)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        _unavailable("Redis", exc)
    finally:
        await client.aclose()
    return REDIS_TEST_URL


@pytest.fixture
async def redis_prefix(redis_url: str) -> AsyncIterator[str]:
    """A key namespace of this test's own, deleted afterwards."""
    prefix = f"depthflow-test:{uuid.uuid4().hex[:10]}:"
    yield prefix
    await delete_keys(redis_url, prefix)


@pytest.fixture
def make_settings(clean_db: str, redis_url: str, redis_prefix: str) -> Callable[..., Settings]:
    """Settings pointing at the test database and Redis namespace; keyword overrides win."""

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": clean_db,
            "redis_url": redis_url,
            "redis_prefix": redis_prefix,
            "batch_max_delay_ms": 20,
            "metrics_flush_ms": 50,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)  # type: ignore[call-arg, arg-type]

    return build
