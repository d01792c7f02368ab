"""The simulator's random-walk market: Binance-shaped, self-consistent, deterministic."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from depthflow.simulate.market import DepthSnapshot, DepthUpdate, Market

DECIMAL_8 = re.compile(r"^\d+\.\d{8}$")


class ReferenceBook:
    """The naive client: a snapshot, then every event's levels set (qty 0 removes)."""

    def __init__(self, snapshot: DepthSnapshot) -> None:
        self.last_update_id = snapshot["lastUpdateId"]
        self.bids = {price: qty for price, qty in snapshot["bids"]}
        self.asks = {price: qty for price, qty in snapshot["asks"]}

    def apply(self, event: DepthUpdate) -> None:
        for side, levels in ((self.bids, event["b"]), (self.asks, event["a"])):
            for price, qty in levels:
                if float(qty) == 0:
                    side.pop(price, None)
                else:
                    side[price] = qty
        self.last_update_id = event["u"]

    def as_snapshot(self) -> DepthSnapshot:
        return {
            "lastUpdateId": self.last_update_id,
            "bids": [[p, self.bids[p]] for p in sorted(self.bids, key=float, reverse=True)],
            "asks": [[p, self.asks[p]] for p in sorted(self.asks, key=float)],
        }


def test_same_seed_same_events_and_other_seed_differs() -> None:
    first, second, other = (Market("btcusdt", seed=s) for s in (3, 3, 4))
    events = [first.next_event(1_000 + i) for i in range(200)]
    assert events == [second.next_event(1_000 + i) for i in range(200)]
    assert events != [other.next_event(1_000 + i) for i in range(200)]
    assert first.snapshot(1000) == second.snapshot(1000)


def test_event_shape_is_binance_diff_depth() -> None:
    market = Market("ethusdt", seed=1)
    event = market.next_event(1_700_000_000_123)
    assert set(event) == {"e", "E", "s", "U", "u", "b", "a"}
    assert (event["e"], event["E"], event["s"]) == ("depthUpdate", 1_700_000_000_123, "ETHUSDT")
    for price, qty in event["b"] + event["a"]:
        assert DECIMAL_8.match(price)
        assert DECIMAL_8.match(qty)
    # Levels within an event are unique and ordered best first, as Binance lists them.
    bid_prices = [float(p) for p, _ in event["b"]]
    ask_prices = [float(p) for p, _ in event["a"]]
    assert bid_prices == sorted(set(bid_prices), reverse=True)
    assert ask_prices == sorted(set(ask_prices))


def test_ids_are_contiguous_and_advance_by_more_than_one_sometimes() -> None:
    market = Market("btcusdt", seed=2)
    previous = market.last_update_id
    widths = set()
    for i in range(2_000):
        event = market.next_event(i)
        assert event["U"] == previous + 1
        assert event["u"] >= event["U"]
        widths.add(event["u"] - event["U"])
        previous = event["u"]
    assert market.last_update_id == previous
    assert widths == {0, 1, 2, 3}


def test_about_fifteen_levels_change_per_event() -> None:
    market = Market("btcusdt", seed=5)
    counts = [len(e["b"]) + len(e["a"]) for e in (market.next_event(i) for i in range(2_000))]
    assert 10 <= sum(counts) / len(counts) <= 20


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32), symbol=st.sampled_from(["btcusdt", "xrpusdt", "zzzusdt"]))
def test_book_never_crossed_or_empty_and_depth_bounded(seed: int, symbol: str) -> None:
    market = Market(symbol, seed=seed, levels=40)
    for i in range(300):
        market.next_event(i)
        _, bids, asks = market.top(1)
        assert bids
        assert asks
        assert bids[0][0] < asks[0][0]
        assert 20 <= market.bid_count <= 60
        assert 20 <= market.ask_count <= 60


def test_price_level_near_the_symbol_and_derived_for_unknown_ones() -> None:
    _, bids, _ = Market("BTCUSDT").top(1)
    assert 60_000 < bids[0][0] < 70_000
    _, eth_bids, _ = Market("ethusdt").top(1)
    assert 3_000 < eth_bids[0][0] < 4_000
    unknown = Market("abcdefusdt", seed=9)
    assert unknown.symbol == "ABCDEFUSDT"
    assert unknown.top(1)[1][0][0] > 0
    # The starting price comes from the name, not the seed.
    assert Market("abcdefusdt").top(1)[1][0][0] == unknown.top(1)[1][0][0]


def test_snapshot_is_top_levels_best_first_with_last_update_id() -> None:
    market = Market("btcusdt", seed=11)
    for i in range(50):
        market.next_event(i)
    full = market.snapshot(5000)
    top = market.snapshot(5)
    assert top["lastUpdateId"] == full["lastUpdateId"] == market.last_update_id
    assert top["bids"] == full["bids"][:5]
    assert top["asks"] == full["asks"][:5]
    bid_prices = [float(p) for p, _ in full["bids"]]
    ask_prices = [float(p) for p, _ in full["asks"]]
    assert bid_prices == sorted(bid_prices, reverse=True)
    assert ask_prices == sorted(ask_prices)
    assert bid_prices[0] < ask_prices[0]
    assert all(float(q) > 0 for _, q in full["bids"] + full["asks"])
    last_id, bids, asks = market.top(5)
    assert last_id == market.last_update_id
    assert bids == [(float(p), float(q)) for p, q in top["bids"]]
    assert asks == [(float(p), float(q)) for p, q in top["asks"]]


def test_events_applied_to_a_snapshot_reproduce_the_book() -> None:
    market = Market("btcusdt", seed=13)
    for i in range(100):
        market.next_event(i)
    reference = ReferenceBook(market.snapshot(5000))
    for i in range(1_000):
        reference.apply(market.next_event(i))
        if i % 50 == 0:
            assert reference.as_snapshot() == market.snapshot(5000)
    assert reference.as_snapshot() == market.snapshot(5000)


def test_wap_matches_the_spec_formula_on_level_one_and_is_recorded_per_event() -> None:
    market = Market("ethusdt", seed=17)
    for i in range(300):
        event = market.next_event(i)
        _, bids, asks = market.top(1)
        (bid_px, bid_qty), (ask_px, ask_qty) = bids[0], asks[0]
        expected = (bid_px * ask_qty + ask_px * bid_qty) / (bid_qty + ask_qty)
        assert market.wap() == expected
        assert market.true_wap[event["u"]] == expected
        assert bid_px <= expected <= ask_px
    assert len(market.true_wap) == 300


def test_replica_without_wap_history_follows_the_same_book() -> None:
    recorded = Market("btcusdt", seed=21)
    replica = Market("btcusdt", seed=21, record_wap=False)
    for i in range(100):
        recorded.next_event(i)
        replica.next_event(0)
    assert replica.snapshot(5000) == recorded.snapshot(5000)
    assert replica.true_wap == {}


@pytest.mark.parametrize("levels", [10, 100])
def test_levels_sets_the_seeded_depth(levels: int) -> None:
    market = Market("btcusdt", levels=levels)
    assert market.bid_count == market.ask_count == levels
