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
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from depthflow.config import Settings
from depthflow.errors import EXIT_USAGE, UserError
from depthflow.events import decode_snapshot
from depthflow.pipeline import Pipeline
from depthflow.progress import Progress
from depthflow.recording import RecordedFrame, RecordedSnapshot, RecordingError, read_recording
from depthflow.service import Service
from depthflow.storage.db import check_migrated, make_engine
from depthflow.storage.runs import RunSource, stored_ranges
from depthflow.symbols import is_pattern

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
    path: Path,
    pipeline: Pipeline,
    wait_capacity: Callable[[], Awaitable[None]] | None = None,
    *,
    stats: ReplayStats | None = None,
    progress: Progress | None = None,
) -> ReplayStats:
    """Feed every recorded frame (and the snapshots a book asks for) to `pipeline`; counted in
    ``stats`` (a new one by default), which also tells how far a replay that raised got."""
    stats = ReplayStats() if stats is None else stats
    shown = 0
    for n, item in enumerate(read_recording(path), start=1):
        if isinstance(item, RecordedFrame):
            pipeline.on_frame(item.raw, item.received_at)
            stats.frames += 1
        elif isinstance(item, RecordedSnapshot):
            _use_snapshot(pipeline, item, stats)
        if n % _YIELD_EVERY == 0:
            if progress is not None:
                progress.advance(stats.frames - shown)
                shown = stats.frames
            if wait_capacity is not None:
                await wait_capacity()
            await asyncio.sleep(0)
    if progress is not None:
        progress.advance(stats.frames - shown)
        progress.finish()
    return stats


def replay_settings(settings: Settings) -> Settings:
    """`settings` for a replay: without Redis, so no counter of the replay is shared."""
    return settings.model_copy(update={"redis_url": ""})


async def run_replay(
    settings: Settings,
    path: Path,
    *,
    owns_process: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, float | int | None]:
    """Replay `path` into the database of `settings` (its Redis is never used); the summary:
    frame and snapshot counts, duration, throughput and the replay's own counters.
    ``owns_process``: see `Service`.

    Raises `UserError` before anything is stored when the file cannot be read, the database
    is not ready (missing, unreachable, not migrated) or already holds update ids of the file
    (unless ``force``: a second replay of a file adds nothing), and when a line of the file is
    corrupt (the frames before it are stored)."""
    _check_readable(path)
    await check_migrated(settings.database_url)
    # A pass over the file before the service starts: blocking, so off the loop.
    try:
        sha256, ranges, frames = await asyncio.to_thread(scan_recording, path, followed(settings))
    except RecordingError as exc:
        raise UserError(f"{exc} (nothing was replayed: fix or cut the file there)") from exc
    if not force:
        await _refuse_stored(settings, path, ranges)
    source = RunSource("file", str(await asyncio.to_thread(path.resolve)), sha256)
    service = Service(
        replay_settings(settings),
        with_feed=False,
        owns_process=owns_process,
        run_source=source,
    )
    await service.start()
    started = time.monotonic()
    stats = ReplayStats()
    try:
        if progress is not None:
            progress.begin(frames, exact=True)
        await replay(
            path, service.pipeline, service.writer.wait_capacity, stats=stats, progress=progress
        )
    except RecordingError as exc:
        raise UserError(
            f"{exc} (the replay stopped there; the rows of the {stats.frames} frame(s) before "
            "it are stored)"
        ) from exc
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


class _Data(msgspec.Struct):
    s: str
    u: int


class _Frame(msgspec.Struct):
    data: _Data


_frame_ids = msgspec.json.Decoder(_Frame)


def followed(settings: Settings) -> set[str]:
    """The symbols a replay stores (patterns need exchangeInfo, which a replay does not ask)."""
    return {s.upper() for s in settings.symbols if not is_pattern(s)}


def scan_recording(path: Path, symbols: set[str]) -> tuple[str, dict[str, tuple[int, int]], int]:
    """The file's SHA-256; per followed symbol, the lowest and highest update id its frames end
    at (frames that do not decode are left out: the replay rejects them anyway); its frames."""
    digest = hashlib.sha256()
    with path.open("rb") as raw:
        for block in iter(lambda: raw.read(1 << 20), b""):
            digest.update(block)
    ranges: dict[str, tuple[int, int]] = {}
    frames = 0
    for item in read_recording(path):
        if not isinstance(item, RecordedFrame):
            continue
        frames += 1
        try:
            data = _frame_ids.decode(item.raw).data
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if data.s not in symbols:
            continue
        low, high = ranges.get(data.s, (data.u, data.u))
        ranges[data.s] = (min(low, data.u), max(high, data.u))
    return digest.hexdigest(), ranges, frames


async def _refuse_stored(
    settings: Settings, path: Path, ranges: dict[str, tuple[int, int]]
) -> None:
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        stored = await stored_ranges(engine, ranges)
    finally:
        await engine.dispose()
    if not stored:
        return
    first = stored[0]
    by = f" by run {first.run_id} ({first.run_source})" if first.run_id is not None else ""
    more = f" and {len(stored) - 1} more symbol(s)" if len(stored) > 1 else ""
    raise UserError(
        f"{path}: update ids {first.first}..{first.last} of {first.symbol}{more} are stored "
        f"already{by}; nothing stored (--force to replay anyway and store them twice)"
    )


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise UserError(f"recording {path} not found", exit_code=EXIT_USAGE)
    if not path.is_file():
        raise UserError(f"recording {path} is not a file", exit_code=EXIT_USAGE)
    try:
        path.open("rb").close()
    except OSError as exc:
        raise UserError(
            f"cannot read recording {path}: {exc.strerror or exc}", exit_code=EXIT_USAGE
        ) from exc


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
