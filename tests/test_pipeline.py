"""Pipeline: every frame becomes rows and a tick, or data loss with a reason."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from depthflow.events import Snapshot
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline, wap
from tests.sinks import Rows, Waps


def frame(
    U: int,
    u: int,
    b: Any = (),
    a: Any = (),
    s: str = "BTCUSDT",
) -> str:
    data = {
        "e": "depthUpdate",
        "E": 1_700_000_000_000,
        "s": s,
        "U": U,
        "u": u,
        "b": [[str(p), str(q)] for p, q in b],
        "a": [[str(p), str(q)] for p, q in a],
    }
    return json.dumps({"stream": f"{s.lower()}@depth@100ms", "data": data})


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
