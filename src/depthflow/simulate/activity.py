"""Whole-market activity: generated symbol names and skewed (Zipf-like) per-symbol event rates.

On Binance a few symbols are busy and a long tail is quiet; a ``@depth@100ms`` stream sends at
most one event per 100 ms per symbol. `symbol_rates` gives the i-th symbol (0-based rank) a
share proportional to ``1 / (i + 1) ** zipf_s`` of ``total_rate`` events/s, caps every rate at
``1 / min_gap_s`` and hands what the capped ones cannot take to the others (water-filling), so
the rates still sum to ``total_rate`` whenever that is possible at all.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

__all__ = ["EventClock", "generated_symbols", "symbol_rates"]

DEPTH_MIN_GAP_S = 0.1  # @depth@100ms: one event per symbol per 100 ms at most


def generated_symbols(count: int, taken: Iterable[str] = ()) -> list[str]:
    """``count`` lower-case names ``s0001usdt``, ``s0002usdt``, ... that are not in ``taken``."""
    used = {symbol.lower() for symbol in taken}
    width = max(4, len(str(count)))
    names: list[str] = []
    index = 0
    while len(names) < count:
        index += 1
        name = f"s{index:0{width}d}usdt"
        if name not in used:
            names.append(name)
    return names


def symbol_rates(
    count: int, total_rate: float, *, zipf_s: float = 1.0, min_gap_s: float = DEPTH_MIN_GAP_S
) -> list[float]:
    """Events/s per rank: Zipf-like shares of ``total_rate``, each at most ``1 / min_gap_s``."""
    if count <= 0:
        return []
    cap = 1.0 / min_gap_s if min_gap_s > 0 else float("inf")
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(count)]
    rates = [0.0] * count
    free = list(range(count))  # ranks not capped yet (weights decrease with rank)
    remaining = total_rate
    while free and remaining > 1e-12:
        scale = remaining / sum(weights[i] for i in free)
        if weights[free[0]] * scale <= cap:
            for i in free:
                rates[i] = weights[i] * scale
            break
        rates[free[0]] = cap  # the busiest uncapped one saturates; share the rest again
        remaining -= cap
        free.pop(0)
    return rates


class EventClock:
    """When a symbol's next event is due: at least ``min_gap_s`` apart, ``rate`` per s on average.

    Busy symbols (rate near the cap) tick every ``min_gap_s`` like Binance's 100 ms batches;
    quiet ones add an exponential wait, so the tail is irregular as it is on the exchange.
    """

    def __init__(self, rng: random.Random, min_gap_s: float = DEPTH_MIN_GAP_S) -> None:
        self._rng = rng
        self._min_gap_s = min_gap_s

    def first(self, now: float, rate: float) -> float:
        """A random phase within the first mean interval."""
        return now + self._rng.random() / rate

    def next(self, after: float, rate: float) -> float:
        extra = 1.0 / rate - self._min_gap_s
        if extra <= 1e-9:
            return after + self._min_gap_s
        return after + self._min_gap_s + self._rng.expovariate(1.0 / extra)
