"""Batched, idempotent PostgreSQL writer for ticks, order-book levels and signals.

The hot path only appends tuples to in-memory lists (`RowBuffer`); one task (`BatchWriter.run`)
moves them to PostgreSQL with COPY (`write_batch`, idempotent across retries). Rows leave memory
only after their transaction committed, so a database outage costs nothing until the buffer bound
is reached; beyond it rows are refused and counted as data loss (``overflow``), never dropped
silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Final

from sqlalchemy.ext.asyncio import AsyncEngine

from depthflow.accounting import ErrorKind, GapReason, LossReason
from depthflow.metrics import Metrics
from depthflow.records import CheckpointRow, GapRow, OrderRow, SignalRow, TickRow
from depthflow.storage import copy_orders
from depthflow.storage.batches import (
    CHECKPOINTS,
    GAPS,
    ORDERS,
    SIGNALS,
    TICKS,
    WRITE_ERRORS,
    Batch,
    prepare_partitions,
    write_batch,
)
from depthflow.storage.buffer import RowBuffer
from depthflow.storage.partitions import KnownSpans

__all__ = ["CATCH_UP_FACTOR", "SLOW_ATTEMPT_S", "BatchWriter", "OutOfOrder", "WriteBatch"]

# Writes one batch in one transaction, awaiting ``before_commit`` (when given) just before its
# COMMIT; False if it was committed before (see `write_batch`).
WriteBatch = Callable[..., Awaitable[bool]]
BeforeCommit = Callable[[], Awaitable[None]]

logger = logging.getLogger(__name__)

# While the buffer holds two batches or more, one flush takes up to this many batches' worth.
CATCH_UP_FACTOR: Final = 4
_BACKOFF_MIN_S: Final = 0.1
_BACKOFF_MAX_S: Final = 5.0
# Bounds one attempt so a stalled connection cannot block the writer (a 15k-row COPY takes ~0.1 s).
_ATTEMPT_TIMEOUT_S: Final = 30.0
# The feed never waits longer than this for the writer to catch up; past it the bounded buffer
# absorbs (overflow counted) until a write completes again.
_MAX_BACKPRESSURE_WAIT_S: Final = 0.25
# A write attempt running longer than this makes the database "slow" (/health DEGRADED).
SLOW_ATTEMPT_S: Final = 3.0


class OutOfOrder(Exception):
    """A batch rolled back because the batch taken before it did not commit."""


class BatchWriter:
    """Buffers rows in memory and writes them in COPY batches from one task (`run`).

    Flushes when ``batch_max_rows`` rows are queued or the oldest queued row is
    ``batch_max_delay_ms`` old; retries failures with backoff; holds at most ``buffer_max_rows``.

    While a full batch more is queued, up to ``connections`` batches are written at once, each on
    its own connection (PostgreSQL parses and indexes each COPY in its own backend, so two run
    side by side on two cores), but they commit one after the other in the order they were
    taken: each waits, inside its transaction, for the one before it to commit, and rolls back
    if it did not. What is stored is therefore always a prefix of what was handed in, as with
    one connection: a crash between two commits leaves a hole at the end (recorded at the next
    start), never one in the middle that nobody records.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        metrics: Metrics,
        *,
        batch_max_rows: int,
        batch_max_delay_ms: int,
        buffer_max_rows: int,
        partition_days: int = 1,
        connections: int = 1,
        write: WriteBatch | None = None,
    ) -> None:
        # The time partitions known to exist; `forget_partitions` after retention dropped some.
        self.partitions = KnownSpans(partition_days)
        self._write: WriteBatch = write if write is not None else partial(write_batch, engine)
        self._prepare = partial(prepare_partitions, engine, spans=self.partitions)
        self._connections = max(1, connections)
        self._metrics = metrics
        self._batch_max_rows = max(1, batch_max_rows)
        self._max_delay_s = batch_max_delay_ms / 1000
        self._buffer_max_rows = buffer_max_rows
        # Room for a catch-up batch in flight on every connection plus one queued behind them
        # (lower, and the feed is held back while the next batches are still to be read).
        catch_up = CATCH_UP_FACTOR * batch_max_rows
        self._high_water = max(1, min((self._connections + 1) * catch_up, buffer_max_rows // 2))
        self._buffer = RowBuffer()
        self._lock = asyncio.Lock()  # one write attempt at a time (run, flush, stop)
        self._wake = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._progress = asyncio.Condition()
        self._stopped = False
        self._healthy = True
        self._failures = 0  # consecutive failed attempts, for backoff and logs
        self._last_error: BaseException | None = None
        self._overflow_dropped = 0  # events/signals refused since the buffer filled up
        self._attempt_started: float | None = None  # monotonic start of the attempt in flight
        self._last_attempt_s = 0.0  # duration of the last finished attempt
        # Set when a backpressure wait timed out; cleared by the next write that completes.
        self._backpressure_off = False
        self.rows_written: dict[str, int] = {
            TICKS: 0,
            ORDERS: 0,
            SIGNALS: 0,
            GAPS: 0,
            CHECKPOINTS: 0,
        }

    # -- hot path ----------------------------------------------------------------------------------

    def add_event(self, tick: TickRow | None, orders: Sequence[OrderRow]) -> bool:
        """Queue one depth event's rows, all or none; False (and counted) if the buffer is full."""
        if not self._admit(len(orders) + (tick is not None)):
            return False
        self._buffer.add_event(tick, orders)
        return True

    def add_signal(self, row: SignalRow) -> bool:
        """Queue one signal row; False (and counted) if the buffer is full."""
        if not self._admit(1):
            return False
        self._buffer.add_signal(row)
        return True

    def add_gap(self, row: GapRow) -> bool:
        """Queue one data-gap row. Admitted past the buffer bound (a few rows per outage, and a
        hole must never go unrecorded); refused only once the writer has stopped."""
        if self._stopped:
            logger.error("gap_not_recorded_at_shutdown", extra={"fields": {"gap": row}})
            return False
        self._buffer.add_gap(row)
        self._wake.set()
        return True

    def add_checkpoint(self, row: CheckpointRow) -> bool:
        """Queue one book checkpoint; False (an error counted, no event lost: the book just
        cannot be rebuilt past the next hole until the next checkpoint) if the buffer is full."""
        if self._stopped or self.buffered + 1 > self._buffer_max_rows:
            self._metrics.count_error(ErrorKind.CHECKPOINT)
            return False
        self._buffer.add_checkpoint(row)
        if self._buffer.queued == 1:
            self._wake.set()
        return True

    def _admit(self, n: int) -> bool:
        if n == 0:
            return True
        if self._stopped:
            self._metrics.count_loss(LossReason.SHUTDOWN)
            return False
        if self.buffered + n > self._buffer_max_rows:
            self._refuse()
            return False
        if self._buffer.queued == 0 or self._buffer.queued + n >= self._batch_max_rows:
            self._wake.set()  # starts the delay timer of `run`, or a batch is full
        return True

    def _refuse(self) -> None:
        self._metrics.count_loss(LossReason.OVERFLOW)
        if self._overflow_dropped == 0:
            logger.warning(
                "writer_buffer_full",
                extra={"fields": {"buffered": self.buffered, "limit": self._buffer_max_rows}},
            )
        self._overflow_dropped += 1

    # -- state -------------------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Rows held in memory, not yet known to be committed (all tables)."""
        return self._buffer.held

    @property
    def healthy(self) -> bool:
        """Whether the last write attempt succeeded (True before the first one)."""
        return self._healthy

    @property
    def slow(self) -> bool:
        """The attempt in flight, or the last one, took longer than `SLOW_ATTEMPT_S`."""
        started = self._attempt_started
        if started is not None and time.monotonic() - started > SLOW_ATTEMPT_S:
            return True
        return self._last_attempt_s > SLOW_ATTEMPT_S

    # -- task --------------------------------------------------------------------------------------

    async def wait_capacity(self) -> None:
        """Backpressure: wait while the database is healthy but behind (buffer above high water).

        Returns at once while the database is failing, so the producer keeps running and the
        buffer (bounded, counted on overflow) absorbs the outage.
        """
        if self._has_capacity():
            return
        self._wake.set()
        try:
            async with asyncio.timeout(_MAX_BACKPRESSURE_WAIT_S), self._progress:
                await self._progress.wait_for(self._has_capacity)
        except TimeoutError:
            # The database is slow (a lock, a stall): stop holding the feed back until a write
            # completes; the bounded buffer absorbs meanwhile.
            self._backpressure_off = True
            logger.warning(
                "writer_behind",
                extra={"fields": {"buffered": self.buffered, "wait_s": _MAX_BACKPRESSURE_WAIT_S}},
            )

    def _has_capacity(self) -> bool:
        return (
            self.buffered < self._high_water
            or not self._healthy
            or self._backpressure_off
            or self._stop_requested.is_set()
        )

    async def run(self) -> None:
        """Flush on size or age until `stop` is called; failed writes are retried with backoff."""
        # Off the loop: a cold Numba cache compiles for about a second.
        await asyncio.to_thread(copy_orders.warm_up)
        while not self._stop_requested.is_set():
            if not await self._wait_until_due():
                break
            if await self._attempt() is None:
                await self._backoff()

    async def stop(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109 (the contract's API)
        """Stop `run` and write everything buffered, retrying until ``timeout`` seconds.

        Rows still unwritten then are counted as data loss ``shutdown``; later rows are refused.
        """
        if self._stopped:
            return
        self._stop_requested.set()
        self._wake.set()
        await self._notify_progress()
        try:
            async with asyncio.timeout(timeout):
                await self._drain()
        except TimeoutError:
            logger.error("writer_stop_timeout", extra={"fields": {"timeout_s": timeout}})
        self._stopped = True
        lost = self.buffered
        if lost:
            self._metrics.count_loss(LossReason.SHUTDOWN, lost)
            logger.error(
                "writer_rows_lost_at_shutdown",
                extra={"fields": {"rows": lost, "error": repr(self._last_error)}},
            )

    async def flush(self) -> None:
        """Write every row buffered at the time of the call; re-raises a failed attempt's error."""
        remaining = self.buffered
        while remaining > 0:
            done = await self._attempt()
            if done is None:
                assert self._last_error is not None
                raise self._last_error
            if done == 0 and not self._buffer.inflight:
                return
            remaining -= done

    async def _drain(self) -> None:
        while self.buffered:
            if await self._attempt() is None:
                await asyncio.sleep(self._backoff_delay())

    async def _wait_until_due(self) -> bool:
        """Wait until a flush is due; False when stop was requested meanwhile."""
        while not self._stop_requested.is_set():
            timeout = self._buffer.due_in(self._batch_max_rows, self._max_delay_s)
            if timeout is not None and timeout <= 0:
                return True
            # No await since the checks above, so no wake-up can be lost between them and clear().
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        return False

    async def _backoff(self) -> None:
        # Wakes early on stop(): the final drain must not wait out a 5 s backoff.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._backoff_delay()):
                await self._stop_requested.wait()

    def _backoff_delay(self) -> float:
        base = min(_BACKOFF_MAX_S, _BACKOFF_MIN_S * 2.0 ** min(max(self._failures - 1, 0), 16))
        return max(_BACKOFF_MIN_S, base * random.uniform(0.5, 1.0))

    # -- one write attempt -------------------------------------------------------------------------

    async def _attempt(self) -> int | None:
        """Write the batches in flight (retried) or the next ones: rows that left the buffer, or
        None when a batch failed and is kept for a retry."""
        async with self._lock:
            batches = list(self._buffer.inflight) or self._take_batches()
            if not batches:
                return 0
            self._attempt_started = time.monotonic()
            try:
                async with asyncio.timeout(_ATTEMPT_TIMEOUT_S):
                    outcomes = await self._write_in_order(batches)
            except TimeoutError as exc:
                outcomes = _failed(exc, len(batches))
            finally:
                self._last_attempt_s = time.monotonic() - self._attempt_started
                self._attempt_started = None
                self._backpressure_off = False
            done: int | None = 0
            for batch, outcome in zip(batches, outcomes, strict=True):
                released = self._settle(batch, outcome)
                done = None if released is None or done is None else done + released
        await self._notify_progress()
        return done

    def _take_batches(self) -> list[Batch]:
        """The next batch; while behind, the queue split over up to one batch per connection."""
        n = self._batch_max_rows
        queued = self._buffer.queued
        if queued < 2 * n:
            batch = self._buffer.take(n)
            return [] if batch is None else [batch]
        # Behind: fewer, larger transactions catch up faster (each costs a marker insert and a
        # commit round trip): bench throughput gained ~30 % at a 20k-row batch size. Equal shares,
        # so that no connection idles while another writes the rest.
        share = max(n, min(CATCH_UP_FACTOR * n, -(-queued // self._connections)))
        batches: list[Batch] = []
        while len(batches) < self._connections and self._buffer.queued >= n:
            batch = self._buffer.take(share)
            if batch is None:
                break
            batches.append(batch)
        return batches

    def _take_batch(self) -> Batch | None:
        """The next batch alone (as `_take_batches` would take it first)."""
        batches = self._take_batches()
        return batches[0] if batches else None

    async def _write_in_order(self, batches: list[Batch]) -> list[bool | BaseException]:
        """Write ``batches`` concurrently, committing them in order; each one's outcome: fresh
        (True), committed before (False), or the error (`OutOfOrder` if an earlier one failed).
        """
        try:
            await self._prepare(batches)
        except Exception as exc:  # settled by the caller like any failed write
            return _failed(exc, len(batches))
        if len(batches) == 1:
            results = await asyncio.gather(self._write_batch(batches[0]), return_exceptions=True)
            return list(results)
        loop = asyncio.get_running_loop()
        committed = [loop.create_future() for _ in batches]
        writes = [
            self._write_committed(batch, committed[k], committed[k - 1] if k else None)
            for k, batch in enumerate(batches)
        ]
        return list(await asyncio.gather(*writes, return_exceptions=True))

    async def _write_committed(
        self,
        batch: Batch,
        done: asyncio.Future[None],
        previous: asyncio.Future[None] | None,
    ) -> bool:
        async def after_previous() -> None:
            if previous is not None and not await _succeeded(previous):
                raise OutOfOrder

        try:
            fresh = await self._write_batch(batch, before_commit=after_previous)
        except BaseException as exc:
            done.set_exception(OutOfOrder())
            done.exception()  # retrieved: a future nobody awaits must not log it
            raise exc
        done.set_result(None)
        return fresh

    async def _write_batch(self, batch: Batch, before_commit: BeforeCommit | None = None) -> bool:
        """Write ``batch`` in one transaction; False if it was committed before."""
        if before_commit is None:
            return await self._write(batch)
        return await self._write(batch, before_commit=before_commit)

    def _settle(self, batch: Batch, outcome: bool | BaseException) -> int | None:
        """Account for one batch's outcome; the rows released, or None if kept for a retry."""
        if isinstance(outcome, OutOfOrder):
            # Rolled back behind a failed batch, whose failure is what is counted (and what
            # makes the attempt fail, unless that batch was dropped: then this one goes next).
            return 0
        if isinstance(outcome, bool):
            return self._on_success(batch, outcome)
        if not isinstance(outcome, WRITE_ERRORS):
            # Not a known database failure; but the writer is the one task that must outlive
            # whatever a driver throws: keep the rows, log the traceback, retry with backoff.
            logger.error("writer_unexpected_error", exc_info=outcome)
        if not isinstance(outcome, Exception):
            raise outcome  # cancellation and the like: not the database's doing
        return self._on_failure(batch, outcome)

    def _on_success(self, batch: Batch, fresh: bool) -> int:
        for table, rows in batch.table_rows():
            if rows:
                self.rows_written[table] += rows
                self._metrics.count_rows_written(table, rows)
        if not fresh:
            logger.info(
                "writer_batch_already_committed",
                extra={"fields": {"batch_id": str(batch.batch_id), "rows": batch.rows}},
            )
        if self._failures:
            logger.info(
                "database_writes_resumed",
                extra={"fields": {"failed_attempts": self._failures, "buffered": self.buffered}},
            )
        if self._overflow_dropped:
            logger.warning(
                "writer_buffer_overflow_ended",
                extra={"fields": {"refused": self._overflow_dropped}},
            )
            self._overflow_dropped = 0
        self._healthy = True
        self._failures = 0
        self._last_error = None
        return self._buffer.release(batch)

    def _on_failure(self, batch: Batch, exc: BaseException) -> int | None:
        self._healthy = False
        self._failures += 1
        self._last_error = exc
        self._metrics.count_error(ErrorKind.DATABASE)
        logger.error(
            "database_write_failed",
            extra={
                "fields": {
                    "error": repr(exc),
                    "attempt": self._failures,
                    "batch_rows": batch.rows,
                    "buffered": self.buffered,
                    "refused": self._overflow_dropped,
                }
            },
        )
        if not batch.rejected_for_good(exc):
            return None
        self._metrics.count_loss(LossReason.REJECTED, batch.rows)
        logger.error(
            "writer_batch_rejected",
            extra={"fields": {"batch_id": str(batch.batch_id), "rows": batch.rows}},
        )
        released = self._buffer.release(batch)
        # The ticks' update ids are now missing from the stored sequence: record them as holes,
        # ahead of every later tick (the batch's own gap rows go again; they are never what
        # PostgreSQL refuses).
        holes: list[GapRow] = [
            (tick[0], tick[3], tick[4], tick[1], tick[1], GapReason.REJECTED.value)
            for tick in batch.ticks
        ]
        self._buffer.add_gaps_first(holes + batch.gaps)
        return released

    async def _notify_progress(self) -> None:
        async with self._progress:
            self._progress.notify_all()


async def _succeeded(future: asyncio.Future[None]) -> bool:
    try:
        await asyncio.shield(future)
    except OutOfOrder:
        return False
    return True


def _failed(exc: Exception, batches: int) -> list[bool | BaseException]:
    """The outcomes of batches whose first failed with ``exc`` before any could commit."""
    outcomes: list[bool | BaseException] = [exc]
    outcomes += [OutOfOrder() for _ in range(batches - 1)]
    return outcomes
