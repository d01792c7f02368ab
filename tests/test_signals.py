"""Position state machine, and Analytics end to end on the loop (fake sink, real Metrics)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest

from depthflow.indicators import SmaTracker
from depthflow.metrics import Metrics
from depthflow.records import SignalRow
from depthflow.signals import Analytics, Position, SignalSummary

SHORT, LONG = 3, 8
T0 = datetime(2024, 1, 1, tzinfo=UTC)


class ListSink:
    """Keeps every signal row it is handed."""

    def __init__(self) -> None:
        self.rows: list[SignalRow] = []

    def add_signal(self, row: SignalRow) -> bool:
        self.rows.append(row)
        return True


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A real thread pool that counts submissions and can hold them until `release`."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.submissions = 0
        self.gate = threading.Event()
        self.gate.set()
        # run_in_executor submits from the loop thread, so an asyncio.Event is safe to set here.
        self.submitted = asyncio.Event()

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        self.submissions += 1
        self.submitted.set()
        return super().submit(self._gated, fn, *args, **kwargs)

    def _gated(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.gate.wait()
        return fn(*args, **kwargs)


def expected_signals(symbol: str, waps: list[float], ids: list[int]) -> list[SignalRow]:
    """The spec's signals, from fsum windows and the crossover rule, independent of the kernel."""

    def sma(n: int, t: int) -> float:
        return math.fsum(waps[t - n + 1 : t + 1]) / n

    rows: list[SignalRow] = []
    is_open = False
    for t in range(LONG, len(waps)):
        s0, l0, s1, l1 = sma(SHORT, t - 1), sma(LONG, t - 1), sma(SHORT, t), sma(LONG, t)
        up = s0 <= l0 and s1 > l1
        down = s0 >= l0 and s1 < l1
        if up and not is_open:
            signal = "open"
        elif down and is_open:
            signal = "close"
        else:
            continue
        is_open = signal == "open"
        rows.append((symbol, signal, waps[t], s1, l1, T0 + timedelta(milliseconds=t), ids[t]))
    return rows


def test_position_starts_flat_and_alternates() -> None:
    position = Position()
    assert not position.is_open
    assert position.on_cross(-1) is None
    assert position.on_cross(0) is None
    assert position.on_cross(1) == "open"
    assert position.on_cross(1) is None
    assert position.on_cross(0) is None
    assert position.on_cross(-1) == "close"
    assert position.on_cross(-1) is None
    assert position.on_cross(1) == "open"


async def test_signals_end_to_end_one_kernel_call_per_symbol_per_batch(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    series = {
        "btcusdt": (100 + np.cumsum(rng.normal(0, 1, 300))).tolist(),
        "ethusdt": (50 + np.round(np.cumsum(rng.normal(0, 1, 240)), 1)).tolist(),
    }
    ids = {symbol: [1000 + 7 * t for t in range(len(w))] for symbol, w in series.items()}
    updates: list[int] = []
    original_update = SmaTracker.update

    def counting_update(self: SmaTracker, waps: Any) -> Any:
        updates.append(len(waps))
        return original_update(self, waps)

    monkeypatch.setattr(SmaTracker, "update", counting_update)
    executor = CountingExecutor()
    sink, metrics = ListSink(), Metrics()
    analytics = Analytics(
        sma_short=SHORT, sma_long=LONG, writer=sink, metrics=metrics, executor=executor
    )
    await analytics.warm_up()
    updates.clear()
    caplog.set_level(logging.INFO, logger="depthflow.signals")
    task = asyncio.create_task(analytics.run())

    bursts = [(0, 1), (1, 50), (50, 51), (51, 200), (200, 300)]
    for lo, hi in bursts:
        for t in range(lo, hi):
            for symbol, waps in series.items():
                if t < len(waps):
                    analytics.add_tick(
                        symbol, waps[t], T0 + timedelta(milliseconds=t), ids[symbol][t]
                    )
        assert analytics.pending > 0
        await analytics.drain()
        assert analytics.pending == 0
    await analytics.stop()
    await task

    # warm_up's submission, then one per burst; each batch runs each present symbol's kernel once.
    assert executor.submissions == 1 + len(bursts)
    assert updates == [
        min(hi, len(w)) - lo for lo, hi in bursts for w in series.values() if lo < len(w)
    ]
    expected = {symbol: expected_signals(symbol, w, ids[symbol]) for symbol, w in series.items()}
    assert all(len(rows) >= 4 for rows in expected.values())
    for symbol, rows in expected.items():
        assert [row for row in sink.rows if row[0] == symbol] == rows
    assert metrics.signals == {
        "open": sum(row[1] == "open" for row in sink.rows),
        "close": sum(row[1] == "close" for row in sink.rows),
    }

    lines = [r for r in caplog.records if r.name == "depthflow.signals"]
    records = [r for r in lines if r.getMessage() == "trading_signal"]
    assert len(records) == len(sink.rows)
    # The rest are summaries (the last one at stop) that count every signal once.
    summaries = [r.fields for r in lines if r not in records]  # type: ignore[attr-defined]
    assert summaries
    assert lines[-1].getMessage() == "signals_summary"
    assert sum(s["signals"] for s in summaries) == len(sink.rows)
    assert sum(s["open"] for s in summaries) == sum(row[1] == "open" for row in sink.rows)
    by_symbol: dict[str, int] = {}
    for summary in summaries:
        for symbol, count in summary["by_symbol"].items():
            by_symbol[symbol] = by_symbol.get(symbol, 0) + count
    assert by_symbol == {symbol: len(rows) for symbol, rows in expected.items()}
    for record, row in zip(records, sink.rows, strict=True):
        fields = record.fields  # type: ignore[attr-defined]
        assert fields == {
            "symbol": row[0],
            "signal": row[1],
            "price": row[2],
            "sma_short": row[3],
            "sma_long": row[4],
            "event_time": row[5].isoformat(),
            "last_update_id": row[6],
        }


async def test_ticks_arriving_during_a_batch_form_the_next_batch() -> None:
    executor = CountingExecutor()
    sink = ListSink()
    analytics = Analytics(
        sma_short=2, sma_long=3, writer=sink, metrics=Metrics(), executor=executor
    )
    waps = [1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0]  # up at t=3, down at t=5
    executor.gate.clear()
    task = asyncio.create_task(analytics.run())
    analytics.add_tick("btcusdt", waps[0], T0, 0)
    await executor.submitted.wait()  # run() has taken the first tick into the executor
    for t in range(1, len(waps)):
        analytics.add_tick("btcusdt", waps[t], T0 + timedelta(seconds=t), t)
    assert analytics.pending == len(waps) - 1
    executor.gate.set()
    await analytics.stop()
    await task

    assert executor.submissions == 2
    assert [(row[1], row[2], row[6]) for row in sink.rows] == [("open", 4.0, 3), ("close", 1.0, 5)]
    executor.shutdown()


async def test_stop_without_run_processes_pending_and_shuts_down_own_executor() -> None:
    sink = ListSink()
    analytics = Analytics(sma_short=2, sma_long=3, writer=sink, metrics=Metrics())
    for t, wap in enumerate([1.0, 1.0, 1.0, 4.0]):
        analytics.add_tick("ethusdt", wap, T0, t)
    await analytics.stop()
    assert analytics.pending == 0
    assert [row[1] for row in sink.rows] == ["open"]
    with pytest.raises(RuntimeError):
        await analytics.warm_up()  # the own executor is shut down


def test_signal_summary_counts_a_window_from_its_first_signal() -> None:
    now = [100.0]
    summary = SignalSummary(interval_s=10.0, clock=lambda: now[0])
    assert summary.take() is None
    assert summary.take(force=True) is None  # nothing counted: no line, even at stop
    now[0] = 500.0  # a quiet stretch does not count towards the window
    summary.add("BTCUSDT", "open")
    summary.add("ETHUSDT", "open")
    now[0] = 509.0
    summary.add("BTCUSDT", "close")
    assert summary.take() is None  # 9 s into the window
    now[0] = 510.5
    assert summary.take() == {
        "signals": 3,
        "open": 2,
        "close": 1,
        "seconds": 10.5,
        "symbols": 2,
        "by_symbol": {"BTCUSDT": 2, "ETHUSDT": 1},
    }
    assert summary.take(force=True) is None  # a new, empty window
    summary.add("ETHUSDT", "close")
    now[0] = 511.0
    assert summary.take(force=True) == {
        "signals": 1,
        "open": 0,
        "close": 1,
        "seconds": 0.5,
        "symbols": 1,
        "by_symbol": {"ETHUSDT": 1},
    }


def test_signal_summary_names_only_the_busiest_symbols() -> None:
    summary = SignalSummary(interval_s=0.0, clock=lambda: 0.0)
    for n in range(15):
        for _ in range(n + 1):
            summary.add(f"S{n:02d}USDT", "open")
    fields = summary.take()
    assert fields is not None
    assert fields["symbols"] == 15
    assert fields["signals"] == sum(range(1, 16))
    by_symbol = fields["by_symbol"]
    assert isinstance(by_symbol, dict)
    assert list(by_symbol) == [f"S{n:02d}USDT" for n in range(14, 4, -1)]
