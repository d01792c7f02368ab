"""Run a recording through the pipeline at full speed, with no network.

Frames and snapshots are handed over in the order they were recorded, so the books go through the
same buffering, snapshot and stale/gap decisions as they did live.

A replay stores its rows like the live service but keeps its counters to itself: it never pushes
to Redis (`replay_settings`), so the live service's shared totals and their `started_at` are not
touched, and the "receive time to now" latency of frames recorded long ago reaches no shared
counter. `run_replay` returns the counters in its summary instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from depthflow.config import Settings
from depthflow.events import decode_snapshot
from depthflow.pipeline import Pipeline
from depthflow.recording import RecordedFrame, RecordedSnapshot, read_recording
from depthflow.service import Service

__all__ = ["ReplayStats", "replay", "replay_settings", "run_replay"]

log = logging.getLogger(__name__)

_YIELD_EVERY = 256


# Receipt-to-now latency of recorded frames: meaningless in a replay, so left out of its summary.
_LATENCY_FIELDS = frozenset({"latency_sum", "latency_count"})


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


def replay_settings(settings: Settings) -> Settings:
    """`settings` for a replay: without Redis, so no counter of the replay is shared."""
    return settings.model_copy(update={"redis_url": ""})


async def run_replay(
    settings: Settings, path: Path, *, owns_process: bool = False
) -> dict[str, float | int | None]:
    """Replay `path` into the database of `settings` (its Redis is never used); the summary:
    frame and snapshot counts, duration, throughput and the replay's own counters.
    ``owns_process``: see `Service`."""
    service = Service(replay_settings(settings), with_feed=False, owns_process=owns_process)
    await service.start()
    started = time.monotonic()
    try:
        stats = await replay(path, service.pipeline, service.writer.wait_capacity)
    finally:
        await service.stop()
    elapsed = time.monotonic() - started
    counters = {
        field: value
        for field, value in service.metrics.local_totals().items()
        if field not in _LATENCY_FIELDS
    }
    return {
        "frames": stats.frames,
        "snapshots_used": stats.snapshots_used,
        "seconds": round(elapsed, 3),
        "frames_per_s": round(stats.frames / elapsed, 1) if elapsed else None,
        **counters,
    }


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
