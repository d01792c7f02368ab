"""Order book and Binance spot sync rules, case by case and against a naive reference model."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from depthflow.book import BookSync, OrderBook, Outcome, SyncState
from depthflow.events import DepthEvent, Snapshot

Lv = list[tuple[float, float]]


def ev(first: int, last: int, bids: Lv | None = None, asks: Lv | None = None) -> DepthEvent:
    return DepthEvent(
        event_type="depthUpdate",
        event_time=1_700_000_000_000 + last,
        symbol="BTCUSDT",
        first_update_id=first,
        last_update_id=last,
        bids=bids or [],
        asks=asks or [],
    )


def snap(last_update_id: int, bids: Lv | None = None, asks: Lv | None = None) -> Snapshot:
    return Snapshot(last_update_id=last_update_id, bids=bids or [], asks=asks or [])


BASE = snap(100, bids=[(10.0, 1.0), (9.0, 2.0)], asks=[(11.0, 1.0), (12.0, 2.0)])


def live_sync(snapshot: Snapshot = BASE) -> BookSync:
    """A LIVE sync at `snapshot`'s id, via one buffered event the snapshot already covers."""
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(snapshot.last_update_id - 1, snapshot.last_update_id))
    assert [o for _, o in sync.on_snapshot(snapshot)] == [Outcome.STALE]
    assert sync.state is SyncState.LIVE
    return sync


# --- OrderBook ----------------------------------------------------------------------------------


def test_empty_book_has_no_best_levels() -> None:
    book = OrderBook()
    assert book.best_bid() is None
    assert book.best_ask() is None
    assert book.top(5) == ([], [])
    assert len(book) == 0


def test_load_skips_zero_quantities_and_replaces_contents() -> None:
    book = OrderBook()
    book.apply([(1.0, 1.0)], [(50.0, 1.0)])
    book.load([(10.0, 1.0), (10.5, 0.0)], [(11.0, 0.0), (12.0, 3.0)])
    assert book.bids == {10.0: 1.0}
    assert book.asks == {12.0: 3.0}
    assert book.best_bid() == (10.0, 1.0)
    assert book.best_ask() == (12.0, 3.0)


def test_zero_quantity_removes_level_and_best_moves_on() -> None:
    book = OrderBook()
    book.load([(10.0, 1.0), (9.0, 2.0), (8.0, 3.0)], [(11.0, 1.0), (12.0, 2.0)])
    book.apply([(10.0, 0.0), (9.0, 0.0)], [(11.0, 0.0)])
    assert book.best_bid() == (8.0, 3.0)
    assert book.best_ask() == (12.0, 2.0)
    assert 10.0 not in book.bids
    assert 11.0 not in book.asks


def test_removing_an_unknown_level_is_harmless() -> None:
    book = OrderBook()
    book.apply([(5.0, 0.0)], [(6.0, 0.0)])
    assert len(book) == 0
    assert book.best_bid() is None


def test_quantity_change_and_readded_level_are_seen() -> None:
    book = OrderBook()
    book.apply([(10.0, 1.0)], [])
    book.apply([(10.0, 0.0)], [])
    book.apply([(10.0, 4.0), (9.0, 1.0)], [])
    book.apply([(10.0, 5.0)], [])
    assert book.best_bid() == (10.0, 5.0)
    book.apply([(10.0, 0.0)], [])
    assert book.best_bid() == (9.0, 1.0)


def test_top_orders_bids_descending_asks_ascending() -> None:
    book = OrderBook()
    book.load(
        [(9.0, 1.0), (10.0, 2.0), (8.5, 3.0), (9.5, 4.0)],
        [(12.0, 1.0), (11.0, 2.0), (13.0, 3.0)],
    )
    bids, asks = book.top(3)
    assert bids == [[10.0, 2.0], [9.5, 4.0], [9.0, 1.0]]
    assert asks == [[11.0, 2.0], [12.0, 1.0], [13.0, 3.0]]
    assert book.top(100)[0][-1] == [8.5, 3.0]
    assert book.top(0) == ([], [])


def test_clear_empties_both_sides() -> None:
    book = OrderBook()
    book.load([(1.0, 1.0)], [(2.0, 1.0)])
    book.clear()
    assert len(book) == 0
    assert book.best_bid() is None
    assert book.best_ask() is None


def test_heaps_stay_bounded_under_level_churn() -> None:
    book = OrderBook()
    book.load([(1.0, 1.0)], [(1000.0, 1.0)])
    for i in range(10_000):
        price = 2.0 + i
        book.apply([(price, 1.0)], [(2000.0 + i, 1.0)])
        book.apply([(price, 0.0)], [(2000.0 + i, 0.0)])
    # Private look on purpose: the bound is what keeps a long-running process's memory flat.
    assert len(book._bid_heap) <= 4 * len(book.bids) + 64 + 1
    assert len(book._ask_heap) <= 4 * len(book.asks) + 64 + 1
    assert book.best_bid() == (1.0, 1.0)
    assert book.best_ask() == (1000.0, 1.0)


prices = st.integers(min_value=1, max_value=40).map(lambda p: p / 4)
quantities = st.sampled_from([0.0, 0.0, 1.0, 2.5, 3.0])
level_lists = st.lists(st.tuples(prices, quantities), max_size=8)
book_ops = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), level_lists, level_lists),
        st.tuples(st.just("load"), level_lists, level_lists),
        st.tuples(st.just("clear"), st.just([]), st.just([])),
    ),
    max_size=60,
)


def ref_set(side: dict[float, float], levels: Lv) -> None:
    for price, qty in levels:
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)


def ref_top(side: dict[float, float], depth: int, descending: bool) -> list[list[float]]:
    return [[p, side[p]] for p in sorted(side, reverse=descending)[:depth]]


def assert_matches(
    book: OrderBook, ref_bids: dict[float, float], ref_asks: dict[float, float]
) -> None:
    assert book.bids == ref_bids
    assert book.asks == ref_asks
    best_bid = max(ref_bids.items()) if ref_bids else None
    best_ask = min(ref_asks.items()) if ref_asks else None
    assert book.best_bid() == best_bid
    assert book.best_ask() == best_ask
    for depth in (1, 3, 50):
        assert book.top(depth) == (
            ref_top(ref_bids, depth, descending=True),
            ref_top(ref_asks, depth, descending=False),
        )


@settings(max_examples=300, deadline=None)
@given(book_ops)
def test_book_matches_naive_reference(ops: list[tuple[str, Lv, Lv]]) -> None:
    book = OrderBook()
    ref_bids: dict[float, float] = {}
    ref_asks: dict[float, float] = {}
    for op, bids, asks in ops:
        if op == "apply":
            book.apply(bids, asks)
            ref_set(ref_bids, bids)
            ref_set(ref_asks, asks)
        elif op == "load":
            book.load(bids, asks)
            # A snapshot skips qty-0 levels rather than removing earlier ones of the same price.
            ref_bids = {p: q for p, q in bids if q}
            ref_asks = {p: q for p, q in asks if q}
        else:
            book.clear()
            ref_bids, ref_asks = {}, {}
        assert_matches(book, ref_bids, ref_asks)


# --- BookSync: buffering and snapshots ----------------------------------------------------------


def test_new_sync_is_waiting_with_nothing_buffered() -> None:
    sync = BookSync("BTCUSDT")
    assert sync.state is SyncState.WAITING
    assert sync.needs_snapshot  # resync at once, without waiting for a first event
    assert sync.first_buffered_id is None
    assert sync.last_update_id is None


def test_first_event_is_buffered_and_asks_for_snapshot() -> None:
    sync = BookSync("BTCUSDT")
    assert sync.on_event(ev(101, 105, bids=[(10.0, 9.0)])) is Outcome.BUFFERED
    assert sync.on_event(ev(106, 110)) is Outcome.BUFFERED
    assert sync.state is SyncState.BUFFERING
    assert sync.needs_snapshot
    assert sync.first_buffered_id == 101
    assert sync.buffered == 2
    assert sync.last_update_id is None
    assert len(sync.book) == 0


def test_snapshot_replays_buffer_dropping_covered_events() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(90, 95, bids=[(10.0, 99.0)]))  # u < lastUpdateId
    sync.on_event(ev(96, 100, bids=[(10.0, 98.0)]))  # u == lastUpdateId: still covered
    sync.on_event(ev(99, 103, bids=[(10.0, 7.0)]))  # overlaps: U <= 101 <= u
    sync.on_event(ev(104, 104, asks=[(11.0, 0.0)]))  # exact continuation
    replay = sync.on_snapshot(BASE)
    assert sync.state is SyncState.LIVE
    assert sync.book.best_bid() == (10.0, 1.0)  # snapshot loaded before the first yield
    seen = []
    for event, outcome in replay:
        seen.append((event.last_update_id, outcome))
        if event.last_update_id == 103:
            # The caller reads the book at each yield: it must reflect exactly this event.
            assert sync.book.best_bid() == (10.0, 7.0)
            assert sync.book.best_ask() == (11.0, 1.0)
            assert sync.last_update_id == 103
    assert seen == [
        (95, Outcome.STALE),
        (100, Outcome.STALE),
        (103, Outcome.APPLIED),
        (104, Outcome.APPLIED),
    ]
    assert sync.book.best_ask() == (12.0, 2.0)
    assert sync.last_update_id == 104
    assert sync.buffered == 0
    assert not sync.needs_snapshot


def test_snapshot_older_than_buffer_is_rejected_then_a_newer_one_works() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(101, 105, bids=[(10.0, 5.0)]))
    assert list(sync.on_snapshot(snap(100, bids=[(1.0, 1.0)]))) == []
    assert sync.state is SyncState.BUFFERING
    assert sync.needs_snapshot
    assert len(sync.book) == 0
    assert sync.first_buffered_id == 101
    sync.on_event(ev(106, 108, asks=[(20.0, 1.0)]))
    outcomes = [o for _, o in sync.on_snapshot(snap(105, bids=[(10.0, 5.0)]))]
    assert outcomes == [Outcome.STALE, Outcome.APPLIED]
    assert sync.last_update_id == 108
    assert sync.book.best_ask() == (20.0, 1.0)


def test_snapshot_equal_to_first_u_is_accepted() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(101, 105, bids=[(10.0, 5.0)]))
    assert [o for _, o in sync.on_snapshot(snap(101))] == [Outcome.APPLIED]
    assert sync.book.best_bid() == (10.0, 5.0)


def test_gap_on_first_replayed_event_discards_book() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(95, 100))
    sync.on_event(ev(102, 104))  # id 101 never arrived
    sync.on_event(ev(105, 106))
    replay = sync.on_snapshot(BASE)
    assert next(replay)[1] is Outcome.STALE
    assert next(replay)[1] is Outcome.GAP
    assert len(sync.book) == 0
    assert sync.state is SyncState.BUFFERING
    assert sync.last_update_id is None
    assert list(replay) == []  # the replay stops at the gap
    assert sync.first_buffered_id == 105
    assert sync.buffered == 1


def test_gap_inside_replay_keeps_remaining_events_for_next_snapshot() -> None:
    sync = BookSync("BTCUSDT")
    for first, last in [(99, 102), (103, 105), (107, 110), (111, 112), (113, 115)]:
        sync.on_event(ev(first, last, bids=[(10.0, float(last))]))
    outcomes = [(e.last_update_id, o) for e, o in sync.on_snapshot(BASE)]
    assert outcomes == [(102, Outcome.APPLIED), (105, Outcome.APPLIED), (110, Outcome.GAP)]
    assert sync.state is SyncState.BUFFERING
    assert len(sync.book) == 0
    assert sync.first_buffered_id == 111
    assert sync.buffered == 2
    sync.on_event(ev(116, 116))
    second = [o for _, o in sync.on_snapshot(snap(112, bids=[(10.0, 112.0)]))]
    assert second == [Outcome.STALE, Outcome.APPLIED, Outcome.APPLIED]
    assert sync.last_update_id == 116
    assert sync.book.best_bid() == (10.0, 115.0)


def test_gap_on_last_replayed_event_leaves_waiting() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(99, 101))
    sync.on_event(ev(103, 104))
    assert [o for _, o in sync.on_snapshot(BASE)] == [Outcome.APPLIED, Outcome.GAP]
    assert sync.state is SyncState.WAITING
    assert sync.buffered == 0
    assert sync.needs_snapshot


def test_late_snapshot_is_ignored() -> None:
    sync = live_sync()
    sync.on_event(ev(101, 101, bids=[(10.0, 3.0)]))
    assert list(sync.on_snapshot(snap(500, bids=[(1.0, 1.0)]))) == []
    assert sync.last_update_id == 101
    assert sync.book.best_bid() == (10.0, 3.0)


def test_snapshot_while_waiting_goes_live_and_checks_the_next_event() -> None:
    # After a gap (or a reconnect) the snapshot may arrive before any event: the book goes live
    # and the first event is held to the live rules (Binance's "U <= lastUpdateId + 1" check).
    waiting = BookSync("BTCUSDT")
    assert list(waiting.on_snapshot(BASE)) == []
    assert waiting.state is SyncState.LIVE
    assert waiting.last_update_id == 100
    assert waiting.on_event(ev(95, 99)) is Outcome.STALE
    assert waiting.on_event(ev(99, 102, bids=[(10.0, 4.0)])) is Outcome.APPLIED
    assert waiting.book.best_bid() == (10.0, 4.0)
    too_new = BookSync("BTCUSDT")
    assert list(too_new.on_snapshot(BASE)) == []
    assert too_new.on_event(ev(103, 105)) is Outcome.GAP
    assert too_new.needs_snapshot


def test_overflow_rejects_new_events_but_keeps_buffered_ones() -> None:
    sync = BookSync("BTCUSDT", max_buffer=2)
    assert sync.on_event(ev(101, 101)) is Outcome.BUFFERED
    assert sync.on_event(ev(102, 102)) is Outcome.BUFFERED
    assert sync.on_event(ev(103, 103)) is Outcome.OVERFLOW
    assert sync.buffered == 2
    assert sync.first_buffered_id == 101
    assert sync.needs_snapshot


def test_max_buffer_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_buffer"):
        BookSync("BTCUSDT", max_buffer=0)


def test_reset_counts_and_discards_buffered_events() -> None:
    sync = BookSync("BTCUSDT")
    for i in range(3):
        sync.on_event(ev(101 + i, 101 + i))
    assert sync.reset() == 3
    assert sync.state is SyncState.WAITING
    assert sync.buffered == 0
    assert sync.first_buffered_id is None


def test_reset_discards_live_book() -> None:
    sync = live_sync()
    assert sync.reset() == 0
    assert sync.state is SyncState.WAITING
    assert len(sync.book) == 0
    assert sync.last_update_id is None
    assert sync.on_event(ev(500, 501)) is Outcome.BUFFERED


def test_unfinished_replay_stops_after_reset() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(99, 101, bids=[(10.0, 5.0)]))
    sync.on_event(ev(102, 102, bids=[(10.0, 6.0)]))
    replay = sync.on_snapshot(BASE)
    assert next(replay)[1] is Outcome.APPLIED
    sync.reset()
    assert list(replay) == []
    assert len(sync.book) == 0


# --- BookSync: live rules -----------------------------------------------------------------------


def test_live_exact_continuation_applies() -> None:
    sync = live_sync()
    assert sync.on_event(ev(101, 103, bids=[(10.5, 1.0)], asks=[(11.0, 0.0)])) is Outcome.APPLIED
    assert sync.last_update_id == 103
    assert sync.book.best_bid() == (10.5, 1.0)
    assert sync.book.best_ask() == (12.0, 2.0)


def test_live_stale_event_is_ignored() -> None:
    sync = live_sync()
    sync.on_event(ev(101, 110))
    assert sync.on_event(ev(95, 109, bids=[(10.0, 77.0)])) is Outcome.STALE
    assert sync.last_update_id == 110
    assert sync.book.best_bid() == (10.0, 1.0)


def test_live_event_ending_at_local_id_is_stale() -> None:
    # The contract: u <= local id holds nothing new; applying it again would duplicate a tick.
    sync = live_sync()
    assert sync.on_event(ev(99, 100, bids=[(10.0, 77.0)])) is Outcome.STALE
    assert sync.last_update_id == 100
    assert sync.book.best_bid() == (10.0, 1.0)


def test_live_gap_discards_book_and_event() -> None:
    sync = live_sync()
    assert sync.on_event(ev(102, 105, bids=[(50.0, 1.0)])) is Outcome.GAP
    assert sync.state is SyncState.WAITING
    assert len(sync.book) == 0
    assert sync.last_update_id is None
    assert sync.buffered == 0
    assert sync.on_event(ev(106, 107)) is Outcome.BUFFERED
    assert sync.needs_snapshot
    assert sync.first_buffered_id == 106


# --- BookSync against a reference model ---------------------------------------------------------

# One raw update per id: (is_bid, price, qty). Events aggregate consecutive ids the way the
# 100 ms stream does: each touched level once, with its final quantity.
raw_updates = st.lists(
    st.tuples(st.booleans(), st.integers(1, 12).map(float), st.sampled_from([0.0, 1.0, 2.0])),
    min_size=1,
    max_size=60,
)


def group(updates: Sequence[tuple[bool, float, float]], sizes: Sequence[int]) -> list[DepthEvent]:
    events, start, i = [], 1, 0
    while start <= len(updates):
        end = min(start + sizes[i % len(sizes)] - 1, len(updates))
        bids: dict[float, float] = {}
        asks: dict[float, float] = {}
        for is_bid, price, qty in updates[start - 1 : end]:
            (bids if is_bid else asks)[price] = qty
        events.append(ev(start, end, list(bids.items()), list(asks.items())))
        start, i = end + 1, i + 1
    return events


Side = dict[float, float]


def states(updates: Sequence[tuple[bool, float, float]]) -> list[tuple[Side, Side]]:
    """Reference book after each update id (index 0 = empty book)."""
    bids: dict[float, float] = {}
    asks: dict[float, float] = {}
    out: list[tuple[Side, Side]] = [({}, {})]
    for is_bid, price, qty in updates:
        ref_set(bids if is_bid else asks, [(price, qty)])
        out.append((dict(bids), dict(asks)))
    return out


@settings(max_examples=300, deadline=None)
@given(raw_updates, st.lists(st.integers(1, 4), min_size=1, max_size=5), st.data())
def test_sync_matches_reference_for_contiguous_stream(
    updates: list[tuple[bool, float, float]], sizes: list[int], data: st.DataObject
) -> None:
    events = group(updates, sizes)
    ref = states(updates)
    start = data.draw(st.integers(0, len(events) - 1), label="first event seen")
    arrived = data.draw(st.integers(start + 1, len(events)), label="events before snapshot")
    snap_id = data.draw(
        st.integers(events[start].first_update_id, len(updates)), label="snapshot id"
    )
    bids, asks = ref[snap_id]
    sync = BookSync("BTCUSDT")
    for event in events[start:arrived]:
        assert sync.on_event(event) is Outcome.BUFFERED

    for event, outcome in sync.on_snapshot(snap(snap_id, list(bids.items()), list(asks.items()))):
        assert outcome in (Outcome.APPLIED, Outcome.STALE)
        if outcome is Outcome.APPLIED:
            assert (sync.book.bids, sync.book.asks) == ref[event.last_update_id]
    assert sync.state is SyncState.LIVE
    for event in events[arrived:]:
        outcome = sync.on_event(event)
        assert outcome is not Outcome.GAP
        if outcome is Outcome.APPLIED:
            assert (sync.book.bids, sync.book.asks) == ref[event.last_update_id]

    final_bids, final_asks = ref[-1]
    assert sync.last_update_id == len(updates)
    assert_matches(sync.book, final_bids, final_asks)


# --- BookSync: a replay that pauses (catching up) ---------------------------------------------


def test_events_fed_during_a_paused_replay_queue_behind_it() -> None:
    sync = BookSync("BTCUSDT")
    sync.on_event(ev(99, 101, bids=[(10.0, 5.0)]))
    sync.on_event(ev(102, 102, bids=[(10.0, 6.0)]))
    replay = sync.on_snapshot(BASE)
    assert next(replay)[1] is Outcome.APPLIED
    assert sync.catching_up
    assert not sync.live
    assert not sync.needs_snapshot
    # Arrives while the replay is paused: it continues the buffer, not the half-replayed book.
    assert sync.on_event(ev(103, 104, bids=[(10.0, 7.0)])) is Outcome.BUFFERED
    assert sync.state is SyncState.LIVE
    assert [(e.last_update_id, o) for e, o in replay] == [
        (102, Outcome.APPLIED),
        (104, Outcome.APPLIED),
    ]
    assert sync.live
    assert not sync.catching_up
    assert sync.last_update_id == 104
    assert sync.book.best_bid() == (10.0, 7.0)
    assert sync.on_event(ev(105, 105)) is Outcome.APPLIED


def test_a_resync_during_a_paused_replay_keeps_the_rest_for_the_next_snapshot() -> None:
    sync = BookSync("BTCUSDT")
    for first, last in ((100, 101), (102, 102), (103, 103)):
        sync.on_event(ev(first, last))
    replay = sync.on_snapshot(BASE)
    next(replay)
    sync.resync()
    assert list(replay) == []
    assert sync.state is SyncState.BUFFERING
    assert sync.needs_snapshot
    assert [sync.first_buffered_id, sync.buffered] == [102, 2]


def test_an_abandoned_replay_leaves_the_book_needing_a_snapshot() -> None:
    sync = BookSync("BTCUSDT")
    for first, last in ((100, 101), (102, 102), (103, 103)):
        sync.on_event(ev(first, last))
    replay = sync.on_snapshot(BASE)
    next(replay)
    replay.close()  # a caller that stopped half way (cancelled, or a bug)
    assert not sync.live
    assert sync.needs_snapshot
    assert sync.buffered == 2  # nothing thrown away: the next snapshot replays it
