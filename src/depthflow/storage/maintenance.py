"""Housekeeping of the writer's own table.

``ingest_batches`` holds one marker per committed batch; a marker only matters while its batch
may still be retried (seconds), so markers older than a day are deleted, in small chunks that
never hold a lock for long.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["prune_batch_markers"]

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
