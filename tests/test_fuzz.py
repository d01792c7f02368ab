"""Fuzzing the frame decoder, the pipeline and the book sync with hypothesis (pure, no I/O).

Contracts: `Pipeline.on_frame` never raises whatever arrives (a raise would end the feed task), and
every frame is accounted for: a tick, counted data loss, or an event still buffered for a snapshot
(``messages == ticks + data loss + buffered``; after a reset, without the last term). Every row it
hands on fits the tables. `BookSync` fed a consistent stream, in any delivery order with drops,
repeats and snapshots of any age, never raises and, whenever live, holds exactly the exchange's
book at its update id (so never a crossed one).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from functools import cache
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from depthflow.book import BookSync, SyncState
from depthflow.events import DepthEvent, Snapshot, decode_frame, decode_snapshot
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline
from depthflow.simulate.frames import Frame
from depthflow.simulate.market import Market
from tests.harness.frames import depth_frame
from tests.sinks import Rows, Waps

T = TypeVar("T")
SYMBOLS = ("btcusdt", "ethusdt")
INT64_MAX = 2**63 - 1
# 2100-01-01 in ms: event times the fuzz draws stay where datetime can represent them (see
# test_out_of_range_event_time_is_counted_not_raised for the values beyond).
SANE_MS = 4_102_444_800_000


@pytest.fixture(autouse=True)
def _quiet_pipeline_logs() -> Iterator[None]:
    """One warning per rejected frame would dominate the run time; the counters are checked."""
    logger = logging.getLogger("depthflow")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Harness:
    def __init__(self) -> None:
        self.rows, self.waps, self.metrics = Rows(), Waps(), Metrics()
        self.pipeline = Pipeline(SYMBOLS, self.rows, self.waps, self.metrics)

    def live(self, last_update_id: int = 100) -> None:
        for symbol in SYMBOLS:
            self.pipeline.on_snapshot(symbol, snapshot(last_update_id))

    def check_accounting(self) -> None:
        m = self.metrics
        buffered = sum(sync.buffered for sync in self.pipeline.syncs.values())
        assert m.messages == m.ticks + sum(m.data_loss.values()) + buffered
        assert m.ticks == len(self.rows.ticks) == len(self.waps.ticks)
        self.pipeline.reset_all(reason="shutdown")
        assert m.messages == m.ticks + sum(m.data_loss.values())

    def check_rows(self) -> None:
        """Every row fits its table: bigint ids, finite positive prices, a real bid < ask."""
        for symbol, _, _, first_id, last_id, bid, bid_q, ask, ask_q, wap in self.rows.ticks:
            assert symbol in {s.upper() for s in SYMBOLS}
            assert -INT64_MAX <= first_id <= last_id <= INT64_MAX
            assert all(math.isfinite(x) for x in (bid, bid_q, ask, ask_q, wap))
            assert 0 < bid < ask
            assert bid <= wap <= ask
        for _, _, last_id, side, price, qty in self.rows.orders:
            assert side in {"bid", "ask"}
            assert -INT64_MAX <= last_id <= INT64_MAX
            assert math.isfinite(price)
            assert price > 0
            assert math.isfinite(qty)
            assert qty >= 0


def snapshot(last_update_id: int) -> Snapshot:
    return Snapshot(last_update_id=last_update_id, bids=[(99.0, 1.0)], asks=[(101.0, 1.0)])


# -- strategies ----------------------------------------------------------------------------------

NON_INT_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
JUNK = st.one_of(NON_INT_JUNK, st.integers(min_value=-(2**80), max_value=2**80))
NUMBER_TEXT = st.one_of(
    st.sampled_from(
        ["nan", "NaN", "inf", "-inf", "Infinity", "1e400", "1e15", "-1", "0", "", "abc", " 1"]
    ),
    st.decimals(allow_nan=False, allow_infinity=False, places=8).map(str),
    st.floats(min_value=0.01, max_value=200.0).map(repr),
)
# Bids below 100, asks above: the book crosses only when a mutation makes it.
BID_PRICE = st.integers(9_000, 9_999).map(lambda cents: f"{cents / 100:.2f}")
ASK_PRICE = st.integers(10_001, 11_000).map(lambda cents: f"{cents / 100:.2f}")
QTY = st.one_of(st.just("0"), st.integers(1, 10**6).map(lambda n: f"{n / 1000:.3f}"))
VALUE = st.one_of(NUMBER_TEXT, JUNK)
# Ids beyond bigint are left to test_update_ids_beyond_bigint_never_reach_the_writer, event times
# beyond datetime's range to test_out_of_range_event_time_is_counted_not_raised.
BAD: dict[str, st.SearchStrategy[Any]] = {
    "e": st.one_of(st.sampled_from(["trade", "", "DEPTHUPDATE", "depthupdate"]), JUNK),
    "E": st.one_of(st.integers(-(10**6), SANE_MS), NON_INT_JUNK),
    "s": st.one_of(st.sampled_from(["btcusdt", "XRPUSDT", "", "BTC USDT"]), JUNK),
    "U": st.one_of(st.integers(-INT64_MAX, INT64_MAX), NON_INT_JUNK),
    "u": st.one_of(st.integers(-INT64_MAX, INT64_MAX), NON_INT_JUNK),
    "b": st.one_of(st.lists(st.lists(VALUE, max_size=4), max_size=3), JUNK),
    "a": st.one_of(st.lists(st.lists(VALUE, max_size=4), max_size=3), JUNK),
}


@st.composite
def levels(draw: st.DrawFn, price: st.SearchStrategy[str]) -> list[list[str]]:
    return [[draw(price), draw(QTY)] for _ in range(draw(st.integers(0, 4)))]


@st.composite
def near_valid_frames(
    draw: st.DrawFn, symbol: str = "BTCUSDT", first: int = 101, last: int = 101
) -> str:
    """A valid depth frame, then up to three mutations: a field of the wrong type or value, a
    missing field, U > u, a bad level, an extra field, no envelope."""
    data: dict[str, Any] = {
        "e": "depthUpdate",
        "E": draw(st.integers(1_600_000_000_000, SANE_MS)),
        "s": symbol,
        "U": first,
        "u": last,
        "b": draw(levels(BID_PRICE)),
        "a": draw(levels(ASK_PRICE)),
    }
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))):
        mutation = draw(st.sampled_from(["bad", "bad", "missing", "reverse", "level", "extra"]))
        key = draw(st.sampled_from(sorted(BAD)))
        if mutation == "bad":
            data[key] = draw(BAD[key])
        elif mutation == "missing":
            data.pop(key, None)
        elif mutation == "reverse":
            data["U"], data["u"] = data.get("u"), data.get("U")
        elif mutation == "level":
            side = draw(st.sampled_from(["b", "a"]))
            kept = data.get(side)
            bad_level = draw(st.one_of(st.lists(VALUE, max_size=3), VALUE))
            data[side] = [*(kept if isinstance(kept, list) else []), bad_level]
        else:
            data[draw(st.text(max_size=3))] = draw(JUNK)
    shape = draw(st.sampled_from(["combined"] * 18 + ["raw", "no_stream"]))
    if shape == "raw":
        return json.dumps(data)
    if shape == "no_stream":
        return json.dumps({"data": data})
    return json.dumps({"stream": "btcusdt@depth@100ms", "data": data})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=15,
)


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[Any, ...]]:
    """Frames of both symbols that mostly follow on (some skip ahead, repeat or go back), with
    snapshots of about the current ids in between."""
    cursor = dict.fromkeys(SYMBOLS, 100)
    actions: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(0, 40))):
        symbol = draw(st.sampled_from(SYMBOLS))
        if draw(st.integers(0, 7)) == 0:
            actions.append(("snapshot", symbol, cursor[symbol] + draw(st.integers(-3, 3))))
            continue
        name = draw(st.sampled_from([symbol.upper()] * 8 + ["XRPUSDT"]))
        first = cursor[symbol] + 1 + draw(st.sampled_from([0] * 8 + [-4, -1, 2, 6]))
        last = first + draw(st.integers(0, 3))
        actions.append(("frame", draw(near_valid_frames(name, first, last))))
        cursor[symbol] = max(cursor[symbol], last)
    return actions


ACTIONS = streams()


# -- pipeline ------------------------------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300)))
def test_arbitrary_bytes_and_text_are_counted_as_malformed(raw: bytes | str) -> None:
    h = Harness()
    h.live()
    assert h.pipeline.on_frame(raw, 1.0) is None
    # Garbage cannot be a depth event: nothing reaches the books or the writer.
    assert h.metrics.messages == 1
    assert sum(h.metrics.data_loss.values()) == 1
    assert h.rows.orders == []
    h.check_accounting()


@FUZZ
@given(JSON)
def test_arbitrary_json_never_raises_and_is_counted(value: Any) -> None:
    h = Harness()
    h.live()
    h.pipeline.on_frame(json.dumps(value), 1.0)
    h.check_accounting()
    h.check_rows()


@FUZZ
@given(ACTIONS)
def test_near_valid_frames_and_snapshots_never_raise_and_are_accounted(
    actions: list[tuple[Any, ...]],
) -> None:
    h = Harness()
    h.live()
    run(h, actions)
    h.check_rows()
    h.check_accounting()


def test_the_fuzz_reaches_every_outcome() -> None:
    """Guards the strategies above: drawn actions make ticks, gaps, stale and rejected frames."""
    totals: Counter[str] = Counter()
    for actions in _examples(ACTIONS, 100):
        h = Harness()
        h.live()
        run(h, actions)
        totals.update({"ticks": h.metrics.ticks, **h.metrics.data_loss})
    assert {"ticks", "gap", "stale", "malformed", "unknown_event", "unknown_symbol"} <= set(totals)


def run(h: Harness, actions: list[tuple[Any, ...]]) -> None:
    for action in actions:
        if action[0] == "frame":
            h.pipeline.on_frame(action[1], 1.0)
        else:
            h.pipeline.on_snapshot(action[1], snapshot(action[2]))


def _examples(strategy: st.SearchStrategy[T], n: int) -> list[T]:
    found: list[T] = []

    @settings(max_examples=n, deadline=None, database=None)
    @given(strategy)
    def collect(value: T) -> None:
        found.append(value)

    collect()
    return found


def _depth_frame(first: int, last: int, e_ms: int) -> str:
    return depth_frame(first, last, [("99.5", "1")], [("100.5", "1")], E=e_ms)


@pytest.mark.parametrize("e_ms", [10**18, -(10**18), 2**63 - 1, 10**30])
def test_out_of_range_event_time_is_counted_not_raised(e_ms: int) -> None:
    h = Harness()
    h.live()
    h.pipeline.on_frame(_depth_frame(101, 101, e_ms), 1.0)
    h.check_accounting()


def test_update_ids_beyond_bigint_never_reach_the_writer() -> None:
    h = Harness()
    h.live()
    h.pipeline.on_frame(_depth_frame(101, 2**63, 1_700_000_000_000), 1.0)
    h.check_rows()
    h.check_accounting()


# -- book sync -----------------------------------------------------------------------------------

STREAM_LENGTH = 120


@cache
def market_stream() -> tuple[tuple[DepthEvent, ...], dict[int, Snapshot]]:
    """A consistent stream of one simulated market, and its full snapshot after each event
    (key -1: before the first event), by the index of that event."""
    market = Market("btcusdt", seed=3, levels=20)
    snapshots = {-1: decode_snapshot(json.dumps(market.snapshot(5000)))}
    events = []
    for i in range(STREAM_LENGTH):
        update = market.next_event(1_700_000_000_000 + i)
        events.append(decode_frame(Frame.from_event("btcusdt", update).text("btcusdt@depth")))
        snapshots[i] = decode_snapshot(json.dumps(market.snapshot(5000)))
    return tuple(events), snapshots


DELIVERY = st.lists(
    st.sampled_from(
        ["next"] * 6 + ["skip", "repeat", "swap", "snap_now", "snap_old", "snap_ahead"]
    ),
    min_size=STREAM_LENGTH // 2,
    max_size=3 * STREAM_LENGTH,
)


@FUZZ
@given(DELIVERY)
def test_book_sync_under_any_delivery_order_is_the_exchange_book(ops: list[str]) -> None:
    events, snapshots = market_stream()
    by_u = {event.last_update_id: i for i, event in enumerate(events)}
    by_u[snapshots[-1].last_update_id] = -1
    sync = BookSync("BTCUSDT", max_buffer=50)
    cursor = 0  # index of the next event the exchange publishes
    for op in ops:
        if op == "next" and cursor < len(events):
            sync.on_event(events[cursor])
            cursor += 1
        elif op == "skip":
            cursor = min(cursor + 1, len(events))
        elif op == "repeat" and cursor > 0:
            sync.on_event(events[cursor - 1])
        elif op == "swap" and cursor + 1 < len(events):
            sync.on_event(events[cursor + 1])
            sync.on_event(events[cursor])
            cursor += 2
        elif op.startswith("snap"):
            offset = {"snap_now": 0, "snap_old": -5, "snap_ahead": 3}[op]
            at = max(-1, min(cursor - 1 + offset, len(events) - 1))
            for _ in sync.on_snapshot(snapshots[at]):
                pass
        check_book(sync, snapshots, by_u)


def check_book(sync: BookSync, snapshots: dict[int, Snapshot], by_u: dict[int, int]) -> None:
    if sync.state is not SyncState.LIVE:
        return
    local_id = sync.last_update_id
    assert local_id in by_u, "live at an update id the exchange never had"
    truth = snapshots[by_u[local_id]]
    assert sync.book.bids == dict(truth.bids)
    assert sync.book.asks == dict(truth.asks)
    bid, ask = sync.book.best_bid(), sync.book.best_ask()
    assert bid is not None
    assert ask is not None
    assert bid[0] < ask[0]
