"""The loop-lag monitor and the cooperative time slice."""

from __future__ import annotations

import asyncio
import time

from depthflow.looplag import LoopLag
from depthflow.timeslice import TimeSlice


def test_recent_max_forgets_samples_older_than_the_window() -> None:
    lag = LoopLag(window_s=10.0)
    lag.observe(0.5, now=100.0)
    lag.observe(0.1, now=105.0)
    assert lag.recent_max(now=105.0) == 0.5
    assert lag.recent_max(now=111.0) == 0.1
    assert lag.recent_max(now=200.0) == 0.0
    assert lag.max_s == 0.5
    assert lag.samples == 2


def test_a_negative_sample_counts_as_no_lag() -> None:
    lag = LoopLag()
    lag.observe(-0.001, now=1.0)
    assert lag.last_s == 0.0


async def test_the_monitor_sees_a_blocked_loop() -> None:
    lag = LoopLag(interval_s=0.01)
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.03)
    time.sleep(0.2)  # noqa: ASYNC251 (the point: a long synchronous stretch)
    await asyncio.sleep(0.03)
    task.cancel()
    assert lag.recent_max() >= 0.15


async def test_a_time_slice_yields_only_once_used_up() -> None:
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    timeslice = TimeSlice(slice_s=3600.0)
    task = asyncio.create_task(other())
    await timeslice.pause_if_due()
    assert ran == []  # not due: no yield, the other task has not run
    timeslice = TimeSlice(slice_s=0.0)
    await timeslice.pause_if_due()
    assert ran == ["other"]
    await task


def test_chunked_rows_take_in_order_across_chunks() -> None:
    from depthflow.storage.buffer import CHUNK_ROWS, ChunkedRows

    rows: ChunkedRows[int] = ChunkedRows()
    total = 2 * CHUNK_ROWS + 10
    for start in range(0, total, 7):
        rows.extend(list(range(start, min(start + 7, total))))
    rows.append(total)
    assert len(rows) == total + 1
    first = rows.take(CHUNK_ROWS + 3)
    rest = rows.take(10 * CHUNK_ROWS)
    assert first + rest == list(range(total + 1))
    assert len(rows) == 0
    assert rows.take(5) == []
