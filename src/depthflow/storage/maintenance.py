"""Housekeeping: the writer's batch markers, and the time partitions.

``ingest_batches`` holds one marker per committed batch; a marker only matters while its batch
may still be retried (seconds), so markers older than a day are deleted, in small chunks that
never hold a lock for long. Partitions are created ahead of time and, with ``RETENTION_DAYS``,
old ones dropped whole (`depthflow.storage.partitions`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.storage.partitions import create_ahead, drop_older

__all__ = ["maintain_partitions", "prune_batch_markers"]

_PRUNE = text(
    """
    DELETE FROM ingest_batches
    WHERE batch_id IN (
        SELECT batch_id FROM ingest_batches
        WHERE written_at < now() - make_interval(secs => :older_than_s)
        LIMIT :chunk
    )
    """
)


async def prune_batch_markers(
    engine: AsyncEngine, *, older_than_s: float = 86_400.0, chunk: int = 10_000
) -> int:
    """Delete markers older than ``older_than_s``; the number deleted."""
    deleted = 0
    while True:
        async with engine.begin() as conn:
            result = await conn.execute(_PRUNE, {"older_than_s": older_than_s, "chunk": chunk})
        deleted += result.rowcount or 0
        if (result.rowcount or 0) < chunk:
            return deleted


async def maintain_partitions(
    engine: AsyncEngine, *, partition_days: int, retention_days: int | None
) -> tuple[int, list[str]]:
    """Create the next spans' partitions; with ``retention_days``, drop the expired ones.
    Returns how many were created and the names dropped."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        # The driver connection itself: autocommit, as DETACH ... CONCURRENTLY requires.
        apg: Any = raw.driver_connection
        created = await create_ahead(apg, partition_days)
        dropped = [] if retention_days is None else await drop_older(apg, retention_days)
    return created, dropped
