"""The SMA-crossover kernel against an independent pure-Python reference of the SPEC rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from depthflow import indicators
from depthflow.indicators import SmaTracker, sma_cross


def reference(
    waps: list[float], short: int, long: int
) -> tuple[list[float], list[float], list[int]]:
    """SMAs as ``math.fsum(window) / n`` (NaN before n ticks) and the spec's crossover rule."""

    def sma(n: int) -> list[float]:
        return [
            math.fsum(waps[t - n + 1 : t + 1]) / n if t + 1 >= n else math.nan
            for t in range(len(waps))
        ]

    s, lg = sma(short), sma(long)
    cross = [0] * len(waps)
    for t in range(1, len(waps)):
        if any(math.isnan(v) for v in (s[t - 1], lg[t - 1], s[t], lg[t])):
            continue
        if s[t - 1] <= lg[t - 1] and s[t] > lg[t]:
            cross[t] = 1
        elif s[t - 1] >= lg[t - 1] and s[t] < lg[t]:
            cross[t] = -1
    return s, lg, cross


def run_in_batches(
    waps: list[float], short: int, long: int, sizes: list[int]
) -> tuple[list[float], list[float], list[int]]:
    """Feed ``waps`` to one tracker split by ``sizes`` (cycled), concatenating the outputs."""
    tracker = SmaTracker(short, long)
    s: list[float] = []
    lg: list[float] = []
    cross: list[int] = []
    pos = 0
    i = 0
    while pos < len(waps):
        size = sizes[i % len(sizes)]
        i += 1
        out_s, out_l, out_c = tracker.update(np.array(waps[pos : pos + size]))
        assert out_s.dtype == np.float64
        assert out_l.dtype == np.float64
        assert out_c.dtype == np.int8
        assert len(out_s) == len(out_l) == len(out_c) == min(size, len(waps) - pos)
        s += out_s.tolist()
        lg += out_l.tolist()
        cross += out_c.tolist()
        pos += size
    return s, lg, cross


def assert_same_floats(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    assert [math.isnan(v) for v in actual] == [math.isnan(v) for v in expected]
    assert [v for v in actual if not math.isnan(v)] == [v for v in expected if not math.isnan(v)]


def assert_matches_reference(waps: list[float], short: int, long: int, sizes: list[int]) -> None:
    s, lg, cross = run_in_batches(waps, short, long, sizes)
    ref_s, ref_l, ref_c = reference(waps, short, long)
    assert_same_floats(s, ref_s)
    assert_same_floats(lg, ref_l)
    assert cross == ref_c


prices = st.floats(min_value=1e-8, max_value=1e9, allow_nan=False, allow_infinity=False)
few_values = st.lists(prices, min_size=1, max_size=4).flatmap(
    lambda pool: st.lists(st.sampled_from(pool), max_size=120)
)
with_constant_runs = st.lists(
    st.tuples(prices, st.integers(min_value=1, max_value=30)), max_size=12
).map(lambda runs: [price for price, count in runs for _ in range(count)])
series = st.one_of(st.lists(prices, max_size=120), few_values, with_constant_runs)
windows = st.integers(min_value=1, max_value=12).flatmap(
    lambda short: st.tuples(st.just(short), st.integers(min_value=short, max_value=30))
)
batch_sizes = st.lists(st.integers(min_value=1, max_value=130), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(waps=series, sma_windows=windows, sizes=batch_sizes)
def test_matches_reference_for_any_batch_split(
    waps: list[float], sma_windows: tuple[int, int], sizes: list[int]
) -> None:
    short, long = sma_windows
    assert_matches_reference(waps, short, long, sizes)


@settings(max_examples=100, deadline=None)
@given(
    waps=st.lists(st.sampled_from([0.1, 0.2, 0.3, 1e8, 1e8 + 0.1]), max_size=80),
    short=st.integers(min_value=1, max_value=30),
    long=st.integers(min_value=1, max_value=30),
    sizes=batch_sizes,
)
def test_matches_reference_for_any_window_order(
    waps: list[float], short: int, long: int, sizes: list[int]
) -> None:
    # short > long and short == long are not a sensible configuration but must still be exact.
    assert_matches_reference(waps, short, long, sizes)


@pytest.mark.parametrize("sizes", [[1], [3], [7, 1, 2], [1000]])
def test_one_tick_batches_equal_whole_series(sizes: list[int]) -> None:
    rng = np.random.default_rng(7)
    waps = (100 + np.cumsum(rng.normal(0, 0.5, 400))).tolist()
    assert_matches_reference(waps, 5, 20, sizes)


def test_hand_computed_crossovers() -> None:
    # short=2, long=3. t:     0  1  2  3  4  5  6  7
    waps = [1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    s, lg, cross = SmaTracker(2, 3).update(np.array(waps))
    # sma2: nan 1 1 2.5 2.5 1 1 1 ; sma3: nan nan 1 2 2 2 1 1
    assert_same_floats(s.tolist(), [math.nan, 1, 1, 2.5, 2.5, 1, 1, 1])
    assert_same_floats(lg.tolist(), [math.nan, math.nan, 1, 2, 2, 2, 1, 1])
    # t=3: 1 <= 1 and 2.5 > 2 -> up; t=5: 2.5 >= 2 and 1 < 2 -> down; t=6: 1 == 1, no cross.
    assert cross.tolist() == [0, 0, 0, 1, 0, -1, 0, 0]


def test_constant_series_never_crosses() -> None:
    # 0.1 is not exact in binary: naive running sums would make sma5 != sma20 here.
    s, lg, cross = SmaTracker(5, 20).update(np.full(200, 0.1))
    assert (s[19:] == lg[19:]).all()
    assert not cross.any()


def test_crossover_at_batch_boundary_uses_retained_history() -> None:
    waps = [1.0, 1.0, 1.0, 4.0]
    tracker = SmaTracker(2, 3)
    first = tracker.update(np.array(waps[:3]))
    second = tracker.update(np.array(waps[3:]))
    assert first[2].tolist() == [0, 0, 0]
    assert second[2].tolist() == [1]
    assert tracker.ticks_retained == 3


def test_empty_batch_changes_nothing() -> None:
    tracker = SmaTracker(2, 3)
    tracker.update(np.array([1.0, 2.0]))
    s, lg, cross = tracker.update(np.array([], dtype=np.float64))
    assert len(s) == len(lg) == len(cross) == 0
    assert tracker.update(np.array([3.0]))[1].tolist() == [2.0]


def test_kernel_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="start"):
        sma_cross(np.ones(3), 4, 1, 2)
    with pytest.raises(ValueError, match="windows"):
        SmaTracker(0, 3)


def test_warm_up_runs() -> None:
    indicators.warm_up(5, 20)
