"""SMA-crossover kernel (Numba) and the per-symbol state that feeds it micro-batches.

Every window mean is ``fsum(window) / n`` with an exactly rounded sum (Shewchuk's algorithm, the
one behind ``math.fsum``), so results do not depend on how ticks were split into batches, a constant
series gives ``short == long`` exactly (no spurious crossovers), and anyone can reproduce each
stored value from the stored ticks with ``math.fsum(window) / n``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

__all__ = ["CROSS_DOWN", "CROSS_NONE", "CROSS_UP", "SmaTracker", "sma_cross", "warm_up"]

CROSS_UP = 1
CROSS_DOWN = -1
CROSS_NONE = 0

FloatArray = npt.NDArray[np.float64]
CrossArray = npt.NDArray[np.int8]


@njit(nogil=True, cache=True)
def _fsum(values: FloatArray, lo_index: int, hi_index: int, partials: FloatArray) -> float:
    """Exactly rounded sum of ``values[lo_index:hi_index]`` (finite values only).

    A transcription of CPython's ``math_fsum`` without its inf/nan/overflow branches; ``partials``
    is scratch space of at least ``hi_index - lo_index`` slots (one partial per input at most).
    """
    count = 0
    for k in range(lo_index, hi_index):
        x = values[k]
        i = 0
        for j in range(count):
            y = partials[j]
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo != 0.0:
                partials[i] = lo
                i += 1
            x = hi
        partials[i] = x
        count = i + 1
    return float(_sum_partials(partials, count))


@njit(nogil=True, cache=True)
def _sum_partials(partials: FloatArray, count: int) -> float:
    """Round the non-overlapping ``partials[:count]`` (increasing magnitude) to one float."""
    if count == 0:
        return 0.0
    n = count - 1
    hi = partials[n]
    lo = 0.0
    while n > 0:
        x = hi
        n -= 1
        y = partials[n]
        hi = x + y
        lo = y - (hi - x)
        if lo != 0.0:
            break
    # Round half to even across the partials below, exactly as CPython does.
    if n > 0 and ((lo < 0.0 and partials[n - 1] < 0.0) or (lo > 0.0 and partials[n - 1] > 0.0)):
        y = lo * 2.0
        x = hi + y
        if y == x - hi:
            hi = x
    return float(hi)


@njit(nogil=True, cache=True)
def _window_means(series: FloatArray, first: int, window: int) -> FloatArray:
    """``out[k]`` = mean of the ``window`` values ending at ``series[first + k]``; NaN before the
    series holds ``window`` values."""
    n = series.shape[0]
    out = np.full(n - first, np.nan)
    partials = np.empty(window)
    for t in range(max(first, window - 1), n):
        out[t - first] = _fsum(series, t - window + 1, t + 1, partials) / window
    return out


@njit(nogil=True, cache=True)
def sma_cross(
    series: FloatArray, start: int, short: int, long: int
) -> tuple[FloatArray, FloatArray, CrossArray]:
    """SMAs and crossovers for the new ticks ``series[start:]``.

    ``series`` is the symbol's retained history (oldest first; all of it, or at least the last
    ``max(short, long)`` values) followed by the new WAPs. Returns ``(sma_short, sma_long, cross)``
    of length ``len(series) - start``: NaN where fewer than n ticks exist; cross is +1 (up), -1
    (down) or 0, and needs both SMAs defined at t-1 and t.
    """
    n = series.shape[0]
    if start < 0 or start > n:
        raise ValueError("start must be within the series")
    if short < 1 or long < 1:
        raise ValueError("window sizes must be >= 1")
    # One tick before `start` too: the crossover at the first new tick compares with it.
    first = max(start - 1, 0)
    s = _window_means(series, first, short)
    lg = _window_means(series, first, long)
    offset = start - first
    cross = np.zeros(n - start, dtype=np.int8)
    for k in range(offset, n - first):
        # NaN compares false, so ticks without both SMAs at t-1 and t never cross.
        if s[k - 1] <= lg[k - 1] and s[k] > lg[k]:
            cross[k - offset] = 1
        elif s[k - 1] >= lg[k - 1] and s[k] < lg[k]:
            cross[k - offset] = -1
    return s[offset:].copy(), lg[offset:].copy(), cross


class SmaTracker:
    """SMA-crossover state of one symbol: feed it WAP batches in tick order.

    Pure and synchronous (meant for an executor thread); results are identical however the series
    is split into batches, because it keeps the last ``max(short, long)`` WAPs: exactly what
    ``sma_long[t-1]`` needs for the first tick t of the next batch.
    """

    def __init__(self, short: int, long: int) -> None:
        if short < 1 or long < 1:
            raise ValueError(f"SMA windows must be >= 1, got short={short}, long={long}")
        self.short = short
        self.long = long
        self._keep = max(short, long)
        self._history: FloatArray = np.empty(0, dtype=np.float64)

    @property
    def ticks_retained(self) -> int:
        return int(self._history.shape[0])

    def update(self, waps: npt.ArrayLike) -> tuple[FloatArray, FloatArray, CrossArray]:
        """``(sma_short, sma_long, cross)`` for the new ``waps`` (see `sma_cross`)."""
        new = np.asarray(waps, dtype=np.float64)
        series = np.ascontiguousarray(np.concatenate((self._history, new.ravel())))
        result: tuple[FloatArray, FloatArray, CrossArray] = sma_cross(
            series, int(self._history.shape[0]), self.short, self.long
        )
        self._history = series[-self._keep :].copy()
        return result


def warm_up(short: int, long: int) -> None:
    """Compile (or load from cache) the kernel for the types `SmaTracker` passes, so no tick waits
    for the JIT."""
    SmaTracker(short, long).update(np.linspace(1.0, 2.0, max(short, long) + 2))
