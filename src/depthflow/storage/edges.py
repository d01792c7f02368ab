"""Where each symbol's stored sequence ends: what an earlier run (or a crash) left behind.

The gap ledger compares it with this run's first stored tick, so the hole a restart or a
``kill -9`` leaves gets its ``data_gaps`` row too.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["Edge", "stored_edges"]

# (last update id, its event time), or (None, None) when nothing is stored for the symbol.
Edge = tuple[int | None, datetime | None]

# Rows received before this run started are an earlier run's: this run may already be writing.
# The edge is the row stored last (by event time), not the highest id: one event that claimed ids
# far ahead would otherwise hide every later hole. Both lookups walk an index backwards:
# (symbol, event_time) and (symbol, to_time).
_EDGE = text(
    """
    SELECT
        (SELECT last_update_id FROM price_ticks
          WHERE symbol = :symbol AND received_at < :before
          ORDER BY event_time DESC, last_update_id DESC LIMIT 1) AS tick_id,
        (SELECT event_time FROM price_ticks
          WHERE symbol = :symbol AND received_at < :before
          ORDER BY event_time DESC, last_update_id DESC LIMIT 1) AS tick_time,
        (SELECT to_update_id FROM data_gaps
          WHERE symbol = :symbol AND detected_at < :before AND to_time IS NOT NULL
          ORDER BY to_time DESC, to_update_id DESC LIMIT 1) AS gap_id,
        (SELECT to_time FROM data_gaps
          WHERE symbol = :symbol AND detected_at < :before AND to_time IS NOT NULL
          ORDER BY to_time DESC, to_update_id DESC LIMIT 1) AS gap_time
    """
)


async def stored_edges(
    engine: AsyncEngine, symbols: Iterable[str], before: float
) -> dict[str, Edge]:
    """The last update id stored (by a tick or a recorded gap, whichever is latest in event
    time) of each symbol, from rows written before ``before`` (unix seconds)."""
    cutoff = datetime.fromtimestamp(before, UTC)
    edges: dict[str, Edge] = {}
    async with engine.connect() as conn:
        for symbol in symbols:
            row = (await conn.execute(_EDGE, {"symbol": symbol, "before": cutoff})).one()
            tick_id, tick_time, gap_id, gap_time = row
            gap_is_later = gap_id is not None and (
                tick_id is None or (gap_time, gap_id) > (tick_time, tick_id)
            )
            if gap_is_later:
                edges[symbol] = (gap_id, gap_time)
            else:
                edges[symbol] = (tick_id, tick_time)
    return edges
