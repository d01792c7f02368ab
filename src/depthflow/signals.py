"""Trading signals: per-symbol position state, and the asyncio task that batches ticks through the
SMA kernel in an executor and turns crossovers into signal rows and log lines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

import numpy as np

from depthflow import indicators
from depthflow.metrics import Metrics
from depthflow.records import SignalRow

__all__ = [
    "BATCH_INTERVAL_S",
    "SUMMARY_INTERVAL_S",
    "Analytics",
    "ChartSink",
    "Position",
    "Signal",
    "SignalSink",
    "SignalSummary",
]

Signal = Literal["open", "close"]

_log = logging.getLogger("depthflow.signals")
# Shortest time between two micro-batches: signals come at most this much later than the tick.
BATCH_INTERVAL_S = 0.05
# One `signals_summary` line at most this often (counted from the window's first signal): in a
# replay or a burst the per-signal lines come by the thousand, and the console shows only a few.
SUMMARY_INTERVAL_S = 10.0
# Symbols named in a summary (the busiest); the others are only counted.
_SUMMARY_TOP = 10

_Results = list[tuple[indicators.FloatArray, indicators.FloatArray, indicators.CrossArray]]


class SignalSink(Protocol):
    def add_signal(self, row: SignalRow) -> bool: ...


class ChartSink(Protocol):
    """Where the live dashboard's series go (`depthflow.live_view.LiveView`)."""

    def add_series(
        self,
        symbol: str,
        event_times: Sequence[datetime],
        waps: Sequence[float],
        sma_short: indicators.FloatArray,
        sma_long: indicators.FloatArray,
    ) -> int: ...

    def add_signal(self, row: SignalRow, seq: int) -> None: ...


class Position:
    """One symbol's position: starts flat; an up-cross while flat opens, a down-cross while open
    closes; every other crossover gives nothing, so open and close alternate."""

    def __init__(self) -> None:
        self.is_open = False

    def on_cross(self, direction: int) -> Signal | None:
        """The signal a crossover (+1 up, -1 down, 0 none) gives, updating the state."""
        if direction == indicators.CROSS_UP and not self.is_open:
            self.is_open = True
            return "open"
        if direction == indicators.CROSS_DOWN and self.is_open:
            self.is_open = False
            return "close"
        return None


class SignalSummary:
    """Signals counted per symbol and kind since the window's first one; `take` hands out the
    fields of a `signals_summary` line once the window is `interval_s` old."""

    def __init__(
        self, interval_s: float = SUMMARY_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._by_symbol: Counter[str] = Counter()
        self._by_kind: Counter[str] = Counter()
        self._since: float | None = None

    def add(self, symbol: str, signal: Signal) -> None:
        if self._since is None:
            self._since = self._clock()
        self._by_symbol[symbol] += 1
        self._by_kind[signal] += 1

    def take(self, *, force: bool = False) -> dict[str, object] | None:
        """The summary fields and a new window, when due (or ``force`` and anything counted)."""
        if self._since is None:
            return None
        elapsed = self._clock() - self._since
        if elapsed < self._interval_s and not force:
            return None
        fields: dict[str, object] = {
            "signals": self._by_kind.total(),
            "open": self._by_kind["open"],
            "close": self._by_kind["close"],
            "seconds": round(elapsed, 1),
            "symbols": len(self._by_symbol),
            "by_symbol": dict(self._by_symbol.most_common(_SUMMARY_TOP)),
        }
        self._by_symbol.clear()
        self._by_kind.clear()
        self._since = None
        return fields


@dataclass(slots=True)
class _Pending:
    """Ticks of one symbol waiting for the next micro-batch (parallel lists, tick order)."""

    waps: list[float] = field(default_factory=list)
    event_times: list[datetime] = field(default_factory=list)
    update_ids: list[int] = field(default_factory=list)


class Analytics:
    """Ticks in (on the loop, O(1)), signals out (to the writer, metrics and the log).

    `run` processes micro-batches: everything pending is swapped out and sent through the kernel in
    ONE executor call (once per symbol), while new ticks accumulate for the next batch.
    """

    def __init__(
        self,
        *,
        sma_short: int,
        sma_long: int,
        writer: SignalSink,
        metrics: Metrics,
        executor: concurrent.futures.Executor | None = None,
        chart: ChartSink | None = None,
    ) -> None:
        """``chart``: also hand every batch's WAPs, SMAs and signals to the live dashboard."""
        self._short = sma_short
        self._long = sma_long
        self._writer = writer
        self._metrics = metrics
        self._chart = chart
        self._own_executor = executor is None
        self._executor: concurrent.futures.Executor = executor or (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="depthflow-sma")
        )
        self._pending: dict[str, _Pending] = {}
        self._pending_count = 0
        self._trackers: dict[str, indicators.SmaTracker] = {}
        self._positions: dict[str, Position] = {}
        self._wake = asyncio.Event()
        # Batches run one at a time (run, drain and stop may all process): keeps tick order.
        self._batch_lock = asyncio.Lock()
        self._stopping = False
        self._running = False
        self._run_done = asyncio.Event()
        self._summary = SignalSummary()

    @property
    def pending(self) -> int:
        """Ticks added but not yet taken into a batch."""
        return self._pending_count

    async def warm_up(self) -> None:
        """Compile the kernel in the executor before the first tick arrives."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, indicators.warm_up, self._short, self._long)

    def add_tick(self, symbol: str, wap: float, event_time: datetime, last_update_id: int) -> None:
        """Queue one tick for the next micro-batch (hot path: appends and a wake-up)."""
        pending = self._pending.get(symbol)
        if pending is None:
            pending = self._pending[symbol] = _Pending()
        pending.waps.append(wap)
        pending.event_times.append(event_time)
        pending.update_ids.append(last_update_id)
        self._pending_count += 1
        self._wake.set()

    async def run(self) -> None:
        """Process micro-batches until `stop`; returns once everything pending is processed."""
        self._running = True
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending_count:
                    await self._process_batch()
                    if not self._stopping:
                        # Let ticks gather: the executor thread holds the GIL between kernel
                        # calls, and back-to-back tiny batches would contend with the event loop
                        # for it all the time.
                        await asyncio.sleep(BATCH_INTERVAL_S)
                if self._stopping:
                    return
        finally:
            self._running = False
            self._run_done.set()

    async def drain(self) -> None:
        """Return once every tick added before the call has been turned into signals."""
        # Always enter the lock once: a batch in flight in `run` finishes first.
        await self._process_batch()
        while self._pending_count:
            await self._process_batch()

    async def stop(self) -> None:
        """Process everything pending, make `run` return, shut down our own executor."""
        self._stopping = True
        self._wake.set()
        await self.drain()
        if self._running:
            await self._run_done.wait()
        self._log_summary(force=True)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def _process_batch(self) -> None:
        async with self._batch_lock:
            if not self._pending_count:
                return
            batch, self._pending, self._pending_count = self._pending, {}, 0
            trackers = [self._tracker(symbol) for symbol in batch]
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(
                self._executor, _apply_trackers, trackers, [p.waps for p in batch.values()]
            )
            for (symbol, pending), result in zip(batch.items(), results, strict=True):
                self._emit(symbol, pending, result)
            self._log_summary()

    def _log_summary(self, *, force: bool = False) -> None:
        fields = self._summary.take(force=force)
        if fields is not None:
            _log.info("signals_summary", extra={"fields": fields})

    def _tracker(self, symbol: str) -> indicators.SmaTracker:
        tracker = self._trackers.get(symbol)
        if tracker is None:
            tracker = self._trackers[symbol] = indicators.SmaTracker(self._short, self._long)
            self._positions[symbol] = Position()
        return tracker

    def _emit(
        self,
        symbol: str,
        pending: _Pending,
        result: tuple[indicators.FloatArray, indicators.FloatArray, indicators.CrossArray],
    ) -> None:
        sma_short, sma_long, cross = result
        position = self._positions[symbol]
        chart = self._chart
        # Once per batch, after the kernel: the dashboard gets the SMAs without computing them.
        first = (
            chart.add_series(symbol, pending.event_times, pending.waps, sma_short, sma_long)
            if chart is not None
            else 0
        )
        # Only crossover ticks are visited in Python; a quiet batch costs one flatnonzero.
        for index in np.flatnonzero(cross).tolist():
            signal = position.on_cross(int(cross[index]))
            if signal is None:
                continue
            row: SignalRow = (
                symbol,
                signal,
                pending.waps[index],
                float(sma_short[index]),
                float(sma_long[index]),
                pending.event_times[index],
                pending.update_ids[index],
            )
            self._writer.add_signal(row)
            self._metrics.count_signal(signal)
            self._summary.add(symbol, signal)
            if chart is not None:
                chart.add_signal(row, first + index)
            _log.info("trading_signal", extra={"fields": _log_fields(row)})


def _apply_trackers(trackers: list[indicators.SmaTracker], waps: list[list[float]]) -> _Results:
    """Executor side of one micro-batch: each symbol's tracker once, on all its new WAPs."""
    return [
        tracker.update(np.array(values, dtype=np.float64))
        for tracker, values in zip(trackers, waps, strict=True)
    ]


def _log_fields(row: SignalRow) -> dict[str, object]:
    symbol, signal, price, sma_short, sma_long, event_time, last_update_id = row
    return {
        "symbol": symbol,
        "signal": signal,
        "price": price,
        "sma_short": sma_short,
        "sma_long": sma_long,
        "event_time": event_time.isoformat(),
        "last_update_id": last_update_id,
    }
