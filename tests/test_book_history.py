"""Checkpoints from the pipeline and the pure rebuild of a past book."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from depthflow.book_history import PastBook, parse_at, replay_levels
from depthflow.events import Snapshot
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline
from tests.harness.frames import EVENT_TIME_MS, depth_frame
from tests.sinks import Rows, Waps


def frame(U: int, u: int, b: Any = (), a: Any = ()) -> str:
    """A BTCUSDT depth frame whose event time is ``u`` ms after a fixed instant."""
    return depth_frame(U, u, b, a, E=EVENT_TIME_MS + u)


def synced(interval_s: float = 1.0) -> tuple[Pipeline, Rows]:
    rows = Rows()
    pipeline = Pipeline(["btcusdt"], rows, Waps(), Metrics(), checkpoint_interval_s=interval_s)
    # Buffered before the snapshot, which it straddles (Binance: U <= lastUpdateId < u).
    pipeline.on_frame(frame(100, 102, b=[(99.0, 2.0)]), 1.0)
    pipeline.on_snapshot("BTCUSDT", Snapshot(101, [(99.5, 1.0)], [(100.5, 1.0), (101.0, 3.0)]))
    return pipeline, rows


def test_a_sync_stores_the_whole_book_after_the_replayed_events() -> None:
    _, rows = synced()
    ((symbol, _, update_id, bids, asks),) = rows.checkpoints
    assert (symbol, update_id) == ("BTCUSDT", 102)
    assert bids == [[99.5, 1.0], [99.0, 2.0]]
    assert asks == [[100.5, 1.0], [101.0, 3.0]]


def test_a_sync_on_a_snapshot_alone_checkpoints_at_the_next_event() -> None:
    rows = Rows()
    pipeline = Pipeline(["btcusdt"], rows, Waps(), Metrics())
    pipeline.on_snapshot("BTCUSDT", Snapshot(100, [(99.5, 1.0)], [(100.5, 1.0)]))
    assert rows.checkpoints == [], "the snapshot alone has no event time"
    pipeline.on_frame(frame(101, 101, a=[(100.5, 0.0), (100.7, 4.0)]), 1.0)
    ((_, _, update_id, bids, asks),) = rows.checkpoints
    assert (update_id, bids, asks) == (101, [[99.5, 1.0]], [[100.7, 4.0]])


def test_checkpoints_follow_event_time_not_the_clock() -> None:
    pipeline, rows = synced(interval_s=1.0)
    # Event u is at base + u ms: one second of event time after 102 is 1102.
    for u in range(103, 1300):
        pipeline.on_frame(frame(u, u, b=[(99.0, float(u))]), 1.0)
    ids = [row[2] for row in rows.checkpoints]
    assert ids == [102, 1102]
    # Rebuilding from the first checkpoint and the stored levels after it gives the second.
    updates = [(side, price, qty) for _, _, u, side, price, qty in rows.orders if 102 < u <= 1102]
    bids, asks = replay_levels(rows.checkpoints[0][3], rows.checkpoints[0][4], updates)
    assert sorted(bids.items(), reverse=True) == [tuple(level) for level in rows.checkpoints[1][3]]
    assert sorted(asks.items()) == [tuple(level) for level in rows.checkpoints[1][4]]


def test_a_discarded_book_writes_no_checkpoint_until_it_syncs_again() -> None:
    pipeline, rows = synced(interval_s=0.001)
    pipeline.reset_all()
    pipeline.on_frame(frame(200, 200), 1.0)
    assert [row[2] for row in rows.checkpoints] == [102]
    assert pipeline.checkpoint("BTCUSDT") is False


def test_replay_levels_sets_and_removes_levels_in_order() -> None:
    bids, asks = replay_levels(
        [[10.0, 1.0], [9.0, 1.0]],
        [[11.0, 1.0]],
        [("bid", 10.0, 0.0), ("bid", 9.5, 2.0), ("ask", 11.0, 5.0), ("ask", 11.0, 0.0)],
    )
    assert bids == {9.0: 1.0, 9.5: 2.0}
    assert asks == {}
    book = PastBook("X", 1, datetime(2024, 1, 1, tzinfo=UTC), bids, asks)
    assert book.top(1) == ([(9.5, 2.0)], [])


def test_parse_at_takes_update_ids_and_zoned_times() -> None:
    assert parse_at("12345") == 12345
    assert parse_at("2024-08-08T23:59:30Z") == datetime(2024, 8, 8, 23, 59, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="time zone"):
        parse_at("2024-08-08T23:59:30")
    with pytest.raises(ValueError, match="neither"):
        parse_at("yesterday")
