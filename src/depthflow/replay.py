"""Run a recording through the pipeline at full speed, with no network.

Frames and snapshots are handed over in the order they were recorded, so the books go through the
same buffering, snapshot and stale/gap decisions as they did live.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from depthflow.events import decode_snapshot
from depthflow.pipeline import Pipeline
from depthflow.recording import RecordedFrame, RecordedSnapshot, read_recording

__all__ = ["ReplayStats", "replay"]

log = logging.getLogger(__name__)

_YIELD_EVERY = 256


@dataclass
class ReplayStats:
    frames: int = 0
    snapshots_used: int = 0
    snapshots_skipped: int = 0


async def replay(
    path: Path, pipeline: Pipeline, wait_capacity: Callable[[], Awaitable[None]] | None = None
) -> ReplayStats:
    """Feed every recorded frame (and the snapshots a book asks for) to `pipeline`."""
    stats = ReplayStats()
    for n, item in enumerate(read_recording(path), start=1):
        if isinstance(item, RecordedFrame):
            pipeline.on_frame(item.raw, item.received_at)
            stats.frames += 1
        elif isinstance(item, RecordedSnapshot):
            _use_snapshot(pipeline, item, stats)
        if n % _YIELD_EVERY == 0:
            if wait_capacity is not None:
                await wait_capacity()
            await asyncio.sleep(0)
    return stats


def _use_snapshot(pipeline: Pipeline, item: RecordedSnapshot, stats: ReplayStats) -> None:
    sync = pipeline.syncs.get(item.symbol.upper())
    if sync is None or not sync.needs_snapshot:
        stats.snapshots_skipped += 1
        return
    try:
        snapshot = decode_snapshot(item.raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning(
            "replay_bad_snapshot", extra={"fields": {"symbol": item.symbol, "error": str(exc)}}
        )
        stats.snapshots_skipped += 1
        return
    pipeline.on_snapshot(sync.symbol, snapshot)
    stats.snapshots_used += 1
