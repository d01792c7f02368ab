"""Scratch PostgreSQL databases and Redis key namespaces, each removed by whoever made it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from depthflow.storage import db

__all__ = ["delete_keys", "redis_namespace", "scratch_database", "scratch_url"]


def scratch_url(server_url: str, prefix: str) -> str:
    """A URL on ``server_url``'s server naming a database nobody else uses (not created)."""
    return server_url.rsplit("/", 1)[0] + f"/{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def scratch_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """A new database on ``server_url``'s server, migrated to head with Alembic (what
    `depthflow migrate` does); dropped on exit."""
    url = scratch_url(server_url, prefix)
    try:
        await db.migrate(url)
        yield url
    finally:
        await db.drop_database(url)


async def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete every Redis key starting with ``prefix``."""
    client = aioredis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_namespace(redis_url: str, name: str = "depthflow-test") -> AsyncIterator[str]:
    """A unique ``REDIS_PREFIX``; its keys are deleted on exit."""
    prefix = f"{name}:{uuid.uuid4().hex[:10]}:"
    try:
        yield prefix
    finally:
        await delete_keys(redis_url, prefix)
