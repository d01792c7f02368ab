"""The dashboard's in-memory view: chart rings, rates, ladder, frames, latest-frame mailboxes."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from depthflow.live_view import (
    GapTap,
    Hub,
    LiveView,
    Mailbox,
    RateMeter,
    RateTable,
    SeriesRing,
    Snapshot,
    client_frame,
    ladder,
)
from depthflow.metrics import Metrics
from depthflow.records import CheckpointRow, GapRow, OrderRow, SignalRow, TickRow
from depthflow.signals import Analytics

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ring_of(size: int, waps: list[float]) -> SeriesRing:
    ring = SeriesRing(size)
    ring.extend([float(i) for i in range(len(waps))], waps, waps, waps)
    return ring


# -- SeriesRing --------------------------------------------------------------------------------


def test_ring_returns_points_in_order_with_sequence_numbers() -> None:
    ring = SeriesRing(4)
    first = ring.extend([10.0, 11.0], [1.0, 2.0], [math.nan, 1.5], [math.nan, math.nan])
    assert first == 0
    assert ring.extend([12.0], [3.0], [2.5], [2.0]) == 2
    start, points = ring.since(0)
    assert start == 0
    assert [p[:2] for p in points] == [[10.0, 1.0], [11.0, 2.0], [12.0, 3.0]]
    assert points[2][2:] == [2.5, 2.0]
    assert math.isnan(points[0][2])
    assert math.isnan(points[1][3])
    assert ring.since(2) == (2, [[12.0, 3.0, 2.5, 2.0]])
    assert ring.since(3) == (3, [])
    assert ring.last_wap() == 3.0


def test_ring_wraps_and_says_when_a_reader_fell_behind() -> None:
    ring = ring_of(3, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert ring.count == 5
    assert ring.oldest == 2
    start, points = ring.since(1)  # points 1 is gone: the reader gets the window from 2
    assert start == 2
    assert [p[1] for p in points] == [3.0, 4.0, 5.0]
    assert ring.last_wap() == 5.0


def test_ring_keeps_only_the_tail_of_a_batch_longer_than_itself() -> None:
    ring = SeriesRing(2)
    ring.extend([0.0, 1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0, 5.0], [0.0] * 5, [0.0] * 5)
    assert ring.count == 5
    assert ring.since(0) == (3, [[3.0, 4.0, 0.0, 0.0], [4.0, 5.0, 0.0, 0.0]])


def test_an_empty_ring_has_nothing() -> None:
    ring = SeriesRing(3)
    assert ring.since(0) == (0, [])
    assert ring.last_wap() is None
    with pytest.raises(ValueError, match="at least 1"):
        SeriesRing(0)


# -- LiveView ------------------------------------------------------------------------------------


def test_add_series_numbers_every_tick_even_those_the_ring_drops() -> None:
    view = LiveView(points=3)
    ones = np.ones(2)
    assert view.add_series("BTCUSDT", [at(0), at(1)], [1.0, 2.0], ones, ones) == 0
    five = np.arange(5, dtype=np.float64)
    times = [at(2 + i) for i in range(5)]
    assert view.add_series("BTCUSDT", times, [3.0, 4.0, 5.0, 6.0, 7.0], five, five) == 2
    ring = view.series("BTCUSDT")
    assert ring is not None
    assert ring.count == 7
    start, points = ring.since(0)
    assert start == 4
    assert points == [
        [at(4).timestamp(), 5.0, 2.0, 2.0],
        [at(5).timestamp(), 6.0, 3.0, 3.0],
        [at(6).timestamp(), 7.0, 4.0, 4.0],
    ]
    assert view.tick_counts() == {"BTCUSDT": 7}


def test_signals_and_gaps_are_kept_newest_first() -> None:
    view = LiveView()
    view.add_series("ETHUSDT", [at(0)], [100.0], np.ones(1), np.ones(1))
    row: SignalRow = ("ETHUSDT", "open", 100.0, 100.5, 99.5, at(0), 42)
    view.add_signal(row, 0)
    view.add_gap(("ETHUSDT", 101, 105, at(1), at(2), "gap"))
    view.add_gap(("ETHUSDT", 200, 200, None, None, "restart"))
    assert view.signals[0] == {
        "symbol": "ETHUSDT",
        "signal": "open",
        "price": 100.0,
        "sma_short": 100.5,
        "sma_long": 99.5,
        "time": at(0).timestamp(),
        "last_update_id": 42,
    }
    ring = view.series("ETHUSDT")
    assert ring is not None
    assert list(ring.markers) == [(0, at(0).timestamp(), "open", 100.0)]
    assert [(g["reason"], g["missing"], g["time"]) for g in view.gaps] == [
        ("restart", 1, None),
        ("gap", 5, at(2).timestamp()),
    ]


def test_recent_lists_are_bounded() -> None:
    view = LiveView()
    for i in range(500):
        view.add_gap(("BTCUSDT", i, i, None, None, "gap"))
    assert len(view.gaps) == 50
    assert view.gaps[0]["from_update_id"] == 499


async def test_analytics_feeds_the_chart_with_its_smas_and_signal_markers() -> None:
    class Rows:
        def __init__(self) -> None:
            self.signals: list[SignalRow] = []

        def add_signal(self, row: SignalRow) -> bool:
            self.signals.append(row)
            return True

    view = LiveView()
    rows = Rows()
    analytics = Analytics(sma_short=2, sma_long=3, writer=rows, metrics=Metrics(), chart=view)
    try:
        waps = [1.0, 1.0, 1.0, 2.0, 3.0, 1.0, 0.0]
        for i, wap in enumerate(waps[:4]):
            analytics.add_tick("BTCUSDT", wap, at(i), 100 + i)
        await analytics.drain()
        for i, wap in enumerate(waps[4:], 4):  # a second batch: sequence numbers go on
            analytics.add_tick("BTCUSDT", wap, at(i), 100 + i)
        await analytics.drain()
    finally:
        await analytics.stop()
    ring = view.series("BTCUSDT")
    assert ring is not None
    _, points = ring.since(0)
    shorts = [p[2] for p in points]
    longs = [p[3] for p in points]
    # By hand: SMA2 and SMA3 of 1, 1, 1, 2, 3, 1, 0.
    assert math.isnan(shorts[0])
    assert shorts[1:] == [1.0, 1.0, 1.5, 2.5, 2.0, 0.5]
    assert math.isnan(longs[0])
    assert math.isnan(longs[1])
    assert longs[2:] == pytest.approx([1.0, 4 / 3, 2.0, 2.0, 4 / 3])
    # Up-cross at tick 3 (1.5 > 4/3) opens, down-cross at tick 6 (0.5 < 4/3) closes.
    assert [(m[0], m[2], m[3]) for m in ring.markers] == [(3, "open", 2.0), (6, "close", 0.0)]
    assert [s["last_update_id"] for s in view.signals] == [106, 103]
    assert [r[6] for r in rows.signals] == [103, 106]


# -- GapTap --------------------------------------------------------------------------------------


def test_gap_tap_records_gaps_and_hands_everything_to_the_writer() -> None:
    class Writer:
        def __init__(self) -> None:
            self.gaps: list[GapRow] = []

        def add_event(self, tick: TickRow | None, orders: list[OrderRow]) -> bool:
            return True

        def add_gap(self, row: GapRow) -> bool:
            self.gaps.append(row)
            return False

        def add_checkpoint(self, row: CheckpointRow) -> bool:
            return True

    writer, view = Writer(), LiveView()
    tap = GapTap(writer, view)
    row: GapRow = ("BTCUSDT", 7, 9, None, at(1), "reconnect")
    assert tap.add_gap(row) is False  # the writer's answer
    assert writer.gaps == [row]
    assert view.gaps[0]["missing"] == 3
    # The hot path is the writer's own method, not a wrapper.
    assert tap.add_event == writer.add_event
    assert tap.add_checkpoint == writer.add_checkpoint


# -- rates ---------------------------------------------------------------------------------------


def test_rate_meter_spans_its_window() -> None:
    meter = RateMeter(window_s=2.0)
    assert meter.update(0.0, 0) == 0.0
    assert meter.update(1.0, 10) == 10.0
    assert meter.update(2.0, 30) == 15.0  # (30 - 0) / 2
    assert meter.update(3.0, 60) == 25.0  # (60 - 10) / 2: the sample at 0 s left the window
    assert meter.update(3.0, 60) == 25.0  # the same instant twice changes nothing


def test_rate_table_counts_new_symbols_from_zero() -> None:
    table = RateTable(window_s=10.0)
    assert table.update(0.0, {"A": 5}) == {"A": 0.0}
    assert table.update(2.0, {"A": 9, "B": 4}) == {"A": 2.0, "B": 2.0}


# -- ladder --------------------------------------------------------------------------------------


def test_ladder_has_cumulative_depth_spread_and_mid() -> None:
    out = ladder([[100.0, 1.0], [99.0, 2.0]], [[101.0, 3.0], [102.0, 0.5]])
    assert out["bids"] == [[100.0, 1.0, 1.0], [99.0, 2.0, 3.0]]
    assert out["asks"] == [[101.0, 3.0, 3.0], [102.0, 0.5, 3.5]]
    assert out["spread"] == 1.0
    assert out["mid"] == 100.5
    assert out["spread_bps"] == pytest.approx(99.50248756)


def test_ladder_of_a_one_sided_book_has_no_spread() -> None:
    out = ladder([[100.0, 1.0]], [])
    assert out["spread"] is None
    assert out["mid"] is None
    assert out["spread_bps"] is None


# -- client frames ------------------------------------------------------------------------------


def test_client_frame_sends_each_point_once_then_only_new_ones() -> None:
    view = LiveView(points=4)
    view.add_series("BTCUSDT", [at(0), at(1)], [1.0, 2.0], np.ones(2), np.ones(2))
    view.add_signal(("BTCUSDT", "open", 2.0, 1.0, 1.0, at(1), 2), 1)
    book = {"symbol": "BTCUSDT", "state": "live", "last_update_id": 2}
    snapshot = Snapshot(frame=1, at=5.0, shared={"service": {"ticks": 2}}, books={"BTCUSDT": book})
    cursors: dict[str, int] = {}

    frame = client_frame(snapshot, view, ["BTCUSDT"], cursors)
    assert frame["frame"] == 1
    assert frame["service"] == {"ticks": 2}
    chart = frame["books"]["BTCUSDT"]["chart"]
    assert (chart["from"], chart["next"], len(chart["points"])) == (0, 2, 2)
    assert chart["markers"] == [[1, at(1).timestamp(), "open", 2.0]]
    assert frame["books"]["BTCUSDT"]["state"] == "live"

    view.add_series("BTCUSDT", [at(2)], [3.0], np.ones(1), np.ones(1))
    chart = client_frame(snapshot, view, ["BTCUSDT"], cursors)["books"]["BTCUSDT"]["chart"]
    assert (chart["from"], chart["next"]) == (2, 3)
    assert [p[1] for p in chart["points"]] == [3.0]

    # Fell behind the ring (5 ticks while it holds 4): a whole window, from > what it had.
    five = np.ones(5)
    view.add_series("BTCUSDT", [at(3 + i) for i in range(5)], [9.0] * 5, five, five)
    chart = client_frame(snapshot, view, ["BTCUSDT"], cursors)["books"]["BTCUSDT"]["chart"]
    assert (chart["from"], chart["next"], len(chart["points"])) == (4, 8, 4)
    assert chart["markers"] == []  # the signal's tick left the window


def test_client_frame_names_a_symbol_without_ticks_or_book() -> None:
    snapshot = Snapshot(frame=3, at=1.0, shared={}, books={})
    frame = client_frame(snapshot, LiveView(), ["XRPUSDT"], {})
    assert frame["books"] == {"XRPUSDT": {"symbol": "XRPUSDT"}}


# -- mailboxes -----------------------------------------------------------------------------------


async def test_a_client_that_never_reads_holds_one_frame_and_skips_the_rest() -> None:
    hub: Hub[int] = Hub()
    slow = hub.subscribe(["BTCUSDT"])
    reader = hub.subscribe(["ETHUSDT"])
    got = []
    for frame in range(10_000):
        hub.publish(frame)  # plain call: the producer has nothing to wait for
        if frame % 1000 == 0:
            got.append(await reader.take())
    assert slow.pending == 1
    assert slow.skipped == 9_999
    assert await slow.take() == 9_999  # the newest, not the oldest
    assert slow.pending == 0
    assert got == list(range(0, 10_000, 1000))
    assert hub.watched() == {"BTCUSDT", "ETHUSDT"}
    assert hub.clients == 2


async def test_take_waits_for_the_next_frame() -> None:
    box: Mailbox[str] = Mailbox(["BTCUSDT"])
    waiting = asyncio.ensure_future(box.take())
    await asyncio.sleep(0)
    assert not waiting.done()
    box.put("frame")
    assert await waiting == "frame"


async def test_close_ends_every_take_and_refuses_new_clients() -> None:
    hub: Hub[str] = Hub()
    box = hub.subscribe(["BTCUSDT"])
    waiting = asyncio.ensure_future(box.take())
    await asyncio.sleep(0)
    hub.close()
    assert await waiting is None
    assert hub.closed.is_set()
    late = hub.subscribe(["BTCUSDT"])
    assert late.closed
    assert await late.take() is None
    assert hub.clients == 1  # the late one was never added


def test_skipped_frames_of_clients_that_left_still_count() -> None:
    hub: Hub[int] = Hub()
    box = hub.subscribe([])
    for frame in range(4):
        hub.publish(frame)
    hub.unsubscribe(box)
    hub.unsubscribe(box)  # twice is harmless
    assert hub.clients == 0
    assert hub.skipped == 3
    hub.publish(5)  # nobody left to hand it to
    assert box.pending == 1
    assert box.skipped == 3
