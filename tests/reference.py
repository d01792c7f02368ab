"""Independent reference of the spec's derived values, for checking stored rows from outside."""

from __future__ import annotations

import math
from collections.abc import Sequence


def spec_signals(waps: Sequence[float], short: int, long: int) -> list[tuple[int, str]]:
    """(index, "open"/"close") per the product contract, from a symbol's WAPs in tick order."""

    def sma(t: int, n: int) -> float | None:
        return math.fsum(waps[t - n + 1 : t + 1]) / n if t + 1 >= n else None

    signals: list[tuple[int, str]] = []
    is_open = False
    for t in range(1, len(waps)):
        prev_s, prev_l, cur_s, cur_l = (
            sma(t - 1, short),
            sma(t - 1, long),
            sma(t, short),
            sma(t, long),
        )
        if prev_s is None or prev_l is None or cur_s is None or cur_l is None:
            continue
        if prev_s <= prev_l and cur_s > cur_l and not is_open:
            signals.append((t, "open"))
            is_open = True
        elif prev_s >= prev_l and cur_s < cur_l and is_open:
            signals.append((t, "close"))
            is_open = False
    return signals
