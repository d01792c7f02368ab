"""The ``runs`` table: which process or replay wrote which update ids, and whether a file's
update ids are stored already (so a second replay of it is refused instead of doubling rows)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.accounting import RunStatus

__all__ = [
    "RunRecorder",
    "RunSource",
    "StoredRange",
    "finish_run",
    "heartbeat",
    "mark_crashed",
    "start_run",
    "stored_ranges",
]

log = logging.getLogger(__name__)

HEARTBEAT_S: Final = 30.0
# A run whose heartbeat is older than this is dead (killed or crashed, never finished).
STALE_AFTER_S: Final = 300.0

Ranges = Mapping[str, tuple[int, int]]


@dataclass(frozen=True, slots=True)
class RunSource:
    """Where a run's rows come from: the live stream, or a recording and its SHA-256."""

    kind: str = "live"
    path: str | None = None
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class StoredRange:
    """Update ids of ``symbol`` a file holds that are stored already, and the run that wrote
    them if one is known."""

    symbol: str
    first: int
    last: int
    run_id: int | None
    run_source: str | None


def _ranges_json(ranges: Ranges) -> str:
    return json.dumps({symbol: [first, last] for symbol, (first, last) in ranges.items()})


async def start_run(engine: AsyncEngine, source: RunSource, symbols: Sequence[str]) -> int:
    """Insert this run's row; its id."""
    async with engine.begin() as conn:
        run_id = (
            await conn.execute(
                text(
                    "INSERT INTO runs (source, file_path, file_sha256, symbols, status, host, "
                    "pid) VALUES (:source, :path, :sha, :symbols, :status, :host, :pid) "
                    "RETURNING id"
                ),
                {
                    "source": source.kind,
                    "path": source.path,
                    "sha": source.sha256,
                    "symbols": list(symbols),
                    "status": RunStatus.RUNNING.value,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                },
            )
        ).scalar_one()
    return int(run_id)


async def heartbeat(engine: AsyncEngine, run_id: int, ranges: Ranges) -> None:
    """The run is alive, and has written these update ids so far."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE runs SET last_seen_at = now(), update_ids = CAST(:ids AS jsonb) "
                "WHERE id = :id"
            ),
            {"id": run_id, "ids": _ranges_json(ranges)},
        )


async def finish_run(engine: AsyncEngine, run_id: int, ranges: Ranges, status: RunStatus) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE runs SET last_seen_at = now(), ended_at = now(), status = :status, "
                "update_ids = CAST(:ids AS jsonb) WHERE id = :id"
            ),
            {"id": run_id, "ids": _ranges_json(ranges), "status": status.value},
        )


async def mark_crashed(engine: AsyncEngine, stale_after_s: float = STALE_AFTER_S) -> int:
    """Runs still 'running' whose heartbeat stopped: they died without finishing. How many."""
    async with engine.begin() as conn:
        result = await conn.execute(
            text(
                "UPDATE runs SET status = :crashed, ended_at = last_seen_at "
                "WHERE status = :running "
                "AND last_seen_at < now() - make_interval(secs => :stale)"
            ),
            {
                "crashed": RunStatus.CRASHED.value,
                "running": RunStatus.RUNNING.value,
                "stale": stale_after_s,
            },
        )
    return result.rowcount or 0


# Lowest and highest stored tick ids inside a range: each one descent of (symbol, last_update_id).
_LOWEST = text(
    "SELECT last_update_id FROM price_ticks WHERE symbol = :symbol "
    "AND last_update_id BETWEEN :first AND :last ORDER BY last_update_id LIMIT 1"
)
_HIGHEST = text(
    "SELECT last_update_id FROM price_ticks WHERE symbol = :symbol "
    "AND last_update_id BETWEEN :first AND :last ORDER BY last_update_id DESC LIMIT 1"
)
_WRITER = text(
    "SELECT id, source, file_path FROM runs WHERE update_ids ? :symbol "
    "AND (update_ids -> :symbol ->> 0)::bigint <= :last "
    "AND (update_ids -> :symbol ->> 1)::bigint >= :first ORDER BY id DESC LIMIT 1"
)


async def stored_ranges(engine: AsyncEngine, ranges: Ranges) -> list[StoredRange]:
    """For each symbol's [first, last] update ids, the part already stored as ticks (two index
    descents on ``(symbol, last_update_id)``), and which run wrote it."""
    found = []
    async with engine.connect() as conn:
        for symbol, (first, last) in ranges.items():
            params: dict[str, Any] = {"symbol": symbol, "first": first, "last": last}
            low = (await conn.execute(_LOWEST, params)).scalar()
            if low is None:
                continue
            high = (await conn.execute(_HIGHEST, params)).scalar_one()
            writer = (
                await conn.execute(_WRITER, {"symbol": symbol, "first": low, "last": high})
            ).first()
            source = None
            if writer is not None:
                source = writer.file_path if writer.source == "file" else writer.source
            found.append(StoredRange(symbol, low, high, writer.id if writer else None, source))
    return found


class RunRecorder:
    """This process's ``runs`` row: inserted once the database answers, refreshed every
    `HEARTBEAT_S` with the update ids written so far (``ranges``), closed at shutdown.

    Bookkeeping never stops ingestion: a database that is away only delays the row (the next
    beat tries again)."""

    def __init__(
        self,
        engine: AsyncEngine,
        source: RunSource,
        symbols: Callable[[], Sequence[str]],
        ranges: Callable[[], Ranges],
    ) -> None:
        self._engine = engine
        self._source = source
        self._symbols = symbols
        self._ranges = ranges
        self.run_id: int | None = None

    async def run(self) -> None:
        while True:
            try:
                await self._beat()
            except Exception as exc:
                log.warning("run_heartbeat_failed", extra={"fields": {"error": repr(exc)}})
            await asyncio.sleep(HEARTBEAT_S)

    async def _beat(self) -> None:
        if self.run_id is None:
            crashed = await mark_crashed(self._engine)
            if crashed:
                log.warning("runs_crashed", extra={"fields": {"runs": crashed}})
            self.run_id = await start_run(self._engine, self._source, self._symbols())
            log.info(
                "run_started",
                extra={"fields": {"run_id": self.run_id, "source": self._source.kind}},
            )
            return
        await heartbeat(self._engine, self.run_id, self._ranges())

    async def finish(self, status: RunStatus = RunStatus.COMPLETED) -> None:
        """Close the row with the final ranges (after the writer flushed)."""
        if self.run_id is None:
            # Never got in (the database was away all along): say so, in one try now.
            await self._beat()
        if self.run_id is not None:
            await finish_run(self._engine, self.run_id, self._ranges(), status)
