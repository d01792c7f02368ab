"""Pipeline: every frame becomes rows and a tick, or data loss with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from depthflow.accounting import LossReason
from depthflow.events import Snapshot
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline, wap
from tests.harness.frames import depth_frame as frame
from tests.sinks import Rows, Waps

SNAP = Snapshot(last_update_id=100, bids=[(99.0, 1.0), (98.0, 2.0)], asks=[(101.0, 3.0)])


@pytest.fixture
def parts() -> tuple[Pipeline, Rows, Waps, Metrics]:
    rows, waps, metrics = Rows(), Waps(), Metrics()
    return Pipeline(["btcusdt"], rows, waps, metrics), rows, waps, metrics


def live(pipeline: Pipeline) -> None:
    assert pipeline.on_snapshot("btcusdt", SNAP) is False


def test_wap_formula() -> None:
    assert wap(99.0, 1.0, 101.0, 3.0) == (99.0 * 3.0 + 101.0 * 1.0) / 4.0


def test_applied_event_gives_order_rows_and_a_tick(parts: Any) -> None:
    pipeline, rows, waps, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 102, b=[(99.5, 2.0), (98.0, 0)], a=[(101.0, 1.0)]), 1.0)
    assert [(r[3], r[4], r[5]) for r in rows.orders] == [
        ("bid", 99.5, 2.0), ("bid", 98.0, 0.0), ("ask", 101.0, 1.0),
    ]  # fmt: skip
    assert all(r[0] == "BTCUSDT" and r[2] == 102 for r in rows.orders)
    (tick,) = rows.ticks
    symbol, event_time, received_at, first_id, last_id, bid, bid_q, ask, ask_q, w = tick
    assert (symbol, first_id, last_id) == ("BTCUSDT", 101, 102)
    assert event_time == datetime.fromtimestamp(1_700_000_000, UTC)
    assert received_at == datetime.fromtimestamp(1.0, UTC)
    assert (bid, bid_q, ask, ask_q) == (99.5, 2.0, 101.0, 1.0)
    assert w == wap(99.5, 2.0, 101.0, 1.0)
    assert waps.ticks == [("BTCUSDT", w, event_time, 102)]
    assert (metrics.messages, metrics.ticks, sum(metrics.data_loss.values())) == (1, 1, 0)


def test_empty_side_and_crossed_books_store_orders_but_no_tick(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, a=[(101.0, 0)]), 1.0)
    pipeline.on_frame(frame(102, 102, a=[(98.5, 1.0)]), 1.0)
    assert rows.ticks == []
    assert len(rows.orders) == 2
    assert metrics.data_loss == {"empty_side": 1, "crossed": 1}


def test_bad_frames_are_counted_as_errors_and_loss(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame("{not json", 1.0)
    pipeline.on_frame(frame(101, 101, s="ETHUSDT"), 1.0)
    pipeline.on_frame(json.dumps({"stream": "x", "data": {"e": "trade"}}), 1.0)
    assert metrics.errors == {"malformed": 1, "unknown_symbol": 1, "unknown_event": 1}
    assert metrics.data_loss == metrics.errors
    assert metrics.messages == 3
    assert rows.orders == []


def test_gap_is_counted_and_asks_for_a_snapshot(parts: Any) -> None:
    pipeline, _, _, metrics = parts
    live(pipeline)
    assert pipeline.on_frame(frame(101, 101, b=[(99.0, 5.0)]), 1.0) is None
    assert pipeline.on_frame(frame(105, 106), 1.0) == "BTCUSDT"
    assert metrics.data_loss == {"gap": 1}
    assert pipeline.syncs["BTCUSDT"].book.best_bid() is None
    assert not pipeline.in_sync


def test_buffered_events_keep_their_receipt_time(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    assert pipeline.on_frame(frame(95, 99), 5.0) == "BTCUSDT"
    assert pipeline.on_frame(frame(100, 101, b=[(99.0, 4.0)]), 6.0) == "BTCUSDT"
    live(pipeline)
    assert [t[2] for t in rows.ticks] == [datetime.fromtimestamp(6.0, UTC)]
    assert metrics.data_loss == {"stale": 1}
    assert metrics.messages == metrics.ticks + sum(metrics.data_loss.values())


def test_reset_counts_buffered_events(parts: Any) -> None:
    pipeline, _, _, metrics = parts
    pipeline.on_frame(frame(101, 102), 1.0)
    pipeline.on_frame(frame(103, 104), 1.0)
    pipeline.reset_all("reconnect")
    assert metrics.data_loss == {"reconnect": 2}
    assert pipeline.symbols_needing_snapshot() == ["BTCUSDT"]


# -- hostile input and self-healing ---------------------------------------------------------------


def test_a_frame_that_makes_processing_raise_is_counted_and_the_stream_goes_on() -> None:
    class Exploding(Rows):
        def add_event(self, tick: Any, orders: Any) -> bool:
            if tick is not None and tick[4] == 101:
                raise RuntimeError("a bug downstream")
            return super().add_event(tick, orders)

    rows, metrics = Exploding(), Metrics()
    pipeline = Pipeline(["btcusdt"], rows, Waps(), metrics)
    live(pipeline)
    # The half-handled book is rebuilt: the pipeline asks for a snapshot.
    assert pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0) == "BTCUSDT"
    assert metrics.errors == {"internal": 1}
    assert metrics.data_loss == {"internal": 1}
    assert metrics.resyncs == {"internal": 1}
    assert not pipeline.in_sync
    live(pipeline)
    pipeline.on_frame(frame(101, 102, b=[(99.6, 1.0)]), 2.0)
    assert [t[4] for t in rows.ticks] == [102]


def test_a_deeply_nested_frame_is_malformed_not_fatal(parts: Any) -> None:
    pipeline, _, _, metrics = parts
    live(pipeline)
    pipeline.on_frame('{"stream":"x","junk":' + "[" * 1000 + "]" * 1000 + ',"data":{}}', 1.0)
    pipeline.on_frame("[" * 5000, 1.0)
    assert metrics.data_loss == {"malformed": 2}
    assert pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0) is None
    assert metrics.ticks == 1


def test_an_event_sent_twice_is_stale_the_second_time(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 103, b=[(99.5, 1.0)]), 1.0)
    pipeline.on_frame(frame(101, 103, b=[(99.5, 1.0)]), 1.0)
    assert [t[4] for t in rows.ticks] == [103]
    assert metrics.data_loss == {"stale": 1}


def test_an_id_far_ahead_wedges_the_book_only_until_stale_resync(parts: Any) -> None:
    rows, metrics = Rows(), Metrics()
    pipeline = Pipeline(["btcusdt"], rows, Waps(), metrics, stale_resync_s=5.0)
    live(pipeline)
    pipeline.on_frame(frame(101, 10**12, b=[(99.5, 1.0)]), 10.0)  # applied: the id jumps
    assert pipeline.on_frame(frame(102, 102), 11.0) is None  # stale from now on
    assert pipeline.on_frame(frame(103, 103), 14.9) is None
    assert pipeline.syncs["BTCUSDT"].last_update_id == 10**12
    assert pipeline.on_frame(frame(104, 104), 16.0) == "BTCUSDT"  # 5 s of stale only
    assert metrics.resyncs == {"stale": 1}
    assert not pipeline.in_sync
    assert metrics.data_loss == {"stale": 3}


def test_a_crossed_event_resyncs_once_instead_of_warning_per_event(
    parts: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline, _, _, metrics = parts
    live(pipeline)
    assert pipeline.on_frame(frame(101, 101, a=[(98.5, 1.0)]), 1.0) == "BTCUSDT"
    for u in range(102, 120):
        pipeline.on_frame(frame(u, u, a=[(98.5, 1.0)]), 1.0)  # buffered for the next snapshot
    assert metrics.resyncs == {"crossed": 1}
    assert metrics.data_loss == {"crossed": 1}
    assert [r.message for r in caplog.records].count("crossed_book") == 1
    assert pipeline.syncs["BTCUSDT"].buffered == 18


def test_a_crossed_snapshot_is_discarded_and_the_buffer_kept(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    pipeline.on_frame(frame(100, 101, b=[(99.5, 1.0)]), 1.0)
    crossed = Snapshot(last_update_id=100, bids=[(102.0, 1.0)], asks=[(101.0, 3.0)])
    assert pipeline.on_snapshot("btcusdt", crossed) is True
    assert metrics.resyncs == {"crossed": 1}
    assert rows.ticks == []
    assert pipeline.syncs["BTCUSDT"].buffered == 1
    live(pipeline)  # a sane snapshot: the kept event is applied
    assert [t[4] for t in rows.ticks] == [101]


def test_a_gap_line_carries_the_id_it_was_measured_against(
    parts: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pipeline, _, _, _ = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    pipeline.on_frame(frame(150, 151), 1.0)
    (line,) = [r for r in caplog.records if r.message == "data_loss"]
    fields = line.fields  # type: ignore[attr-defined]
    assert (fields["local_update_id"], fields["missing"]) == (101, 48)


def test_a_gap_then_resync_records_the_hole_in_the_ledger(parts: Any) -> None:
    pipeline, rows, _, _ = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    pipeline.on_frame(frame(150, 151), 2.0)  # gap: book discarded
    pipeline.on_frame(frame(160, 161, b=[(99.4, 1.0)]), 3.0)  # buffered
    later = Snapshot(last_update_id=160, bids=[(99.0, 1.0)], asks=[(101.0, 3.0)])
    assert pipeline.on_snapshot("btcusdt", later) is False
    # Ticks cover 101 and 160..161; 102..159 is the recorded hole.
    assert [(t[3], t[4]) for t in rows.ticks] == [(101, 101), (160, 161)]
    assert [(g[1], g[2], g[5]) for g in rows.gaps] == [(102, 159, "gap")]


def test_a_disconnect_records_a_reconnect_hole_at_the_next_tick(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    pipeline.reset_all()
    assert metrics.resyncs == {"reconnect": 1}
    assert pipeline.syncs["BTCUSDT"].book.best_bid() is None
    pipeline.on_frame(frame(300, 301, b=[(99.4, 1.0)]), 3.0)
    assert pipeline.on_snapshot("btcusdt", Snapshot(300, [(99.0, 1.0)], [(101.0, 1.0)])) is False
    assert [(g[1], g[2], g[5]) for g in rows.gaps] == [(102, 299, "reconnect")]


def test_a_restart_hole_is_recorded_against_the_earlier_runs_last_tick(parts: Any) -> None:
    pipeline, rows, _, _ = parts
    earlier = datetime(2026, 1, 1, tzinfo=UTC)
    pipeline.restore("btcusdt", 90, earlier)
    live(pipeline)  # snapshot at 100
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    ((symbol, first, last, from_time, _, reason),) = rows.gaps
    assert (symbol, first, last, from_time, reason) == ("BTCUSDT", 91, 100, earlier, "restart")


def test_events_buffered_at_shutdown_are_recorded_as_a_shutdown_hole(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    pipeline.on_frame(frame(150, 151), 2.0)  # gap: the book waits for a snapshot
    pipeline.on_frame(frame(152, 160), 2.0)  # buffered
    pipeline.reset_all(LossReason.SHUTDOWN)
    assert metrics.data_loss == {"gap": 1, "shutdown": 1}
    # 102..160 were received (or skipped) but never stored: one row, known now, not at restart.
    assert [(g[1], g[2], g[5]) for g in rows.gaps] == [(102, 160, "shutdown")]


# -- rotation: two connections deliver the same events for a while -------------------------------


def test_during_an_overlap_each_event_is_applied_once_whichever_connection_brings_it(
    parts: Any,
) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    pipeline.begin_overlap(["btcusdt"])
    # The new connection is ahead: 103 waits instead of being a gap ...
    assert pipeline.on_frame(frame(103, 103, b=[(99.6, 1.0)]), 2.0) is None
    # ... until the old one brings 102; then 103 follows at once.
    pipeline.on_frame(frame(102, 102, b=[(99.7, 1.0)]), 2.1)
    pipeline.on_frame(frame(102, 102, b=[(99.7, 1.0)]), 2.2)  # the new one's copy
    pipeline.on_frame(frame(103, 103, b=[(99.6, 1.0)]), 2.3)  # the old one's copy
    assert pipeline.end_overlap(["btcusdt"]) == []
    assert [t[4] for t in rows.ticks] == [101, 102, 103]
    assert metrics.data_loss == {"duplicate": 2}
    assert metrics.resyncs == {}
    assert rows.gaps == []


def test_a_real_gap_during_an_overlap_counts_when_the_overlap_ends(parts: Any) -> None:
    pipeline, rows, _, metrics = parts
    live(pipeline)
    pipeline.on_frame(frame(101, 101, b=[(99.5, 1.0)]), 1.0)
    pipeline.begin_overlap(["btcusdt"])
    assert pipeline.on_frame(frame(110, 110), 2.0) is None  # neither connection brings 102..109
    assert pipeline.end_overlap(["btcusdt"]) == ["BTCUSDT"]
    assert metrics.data_loss == {"gap": 1}
    assert [t[4] for t in rows.ticks] == [101]


def test_a_replay_paused_between_steps_interleaves_with_new_frames(parts: Any) -> None:
    from depthflow.pipeline import REPLAY_STEP

    pipeline, rows, waps, _ = parts
    buffered = 3 * REPLAY_STEP
    for i in range(buffered):
        # The first one overlaps the snapshot's id (100), as Binance's sync rules ask.
        pipeline.on_frame(frame(100 if i == 0 else 101 + i, 101 + i, b=[(99.0, i + 1.0)]), 1.0)
    steps = pipeline.load_snapshot("btcusdt", SNAP)
    assert next(steps) == REPLAY_STEP
    assert len(rows.ticks) == REPLAY_STEP
    # A frame arriving while the replay is paused waits its turn; it asks for no snapshot.
    assert pipeline.on_frame(frame(101 + buffered, 101 + buffered, b=[(99.0, 0.5)]), 2.0) is None
    assert not pipeline.in_sync
    assert list(steps) == [2 * REPLAY_STEP, 3 * REPLAY_STEP]
    assert pipeline.in_sync
    ids = [tick[4] for tick in rows.ticks]
    assert ids == list(range(101, 102 + buffered))
    assert waps.ticks[-1][3] == 101 + buffered
