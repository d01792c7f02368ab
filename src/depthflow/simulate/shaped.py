"""A `Market` whose events are shaped like real Binance spot ``@depth@100ms`` events, cheaply.

The recordings in ``/work/shared/data/binance/spot-2024-08-08/`` (BTCUSDT, ETHUSDT) have a median
of ~20 changed levels per event with a mean of ~45 (a long tail up to ~1,000), roughly a third to
a half of them removals (quantity 0), and ``U..u`` spans with a median of ~25 ids. `ShapedMarket`
draws each event's level count from a log-normal with that median and mean, touches levels near
the top of the book more often than deep ones (widening the reach for big events, which in the
recordings touch levels far from the top), and spans ``U..u`` in proportion to the levels.

It is built for whole-market runs (1,500 symbols at thousands of events/s on one core): no
per-change list building, quantities from a pre-formatted pool, price strings cached. The book
stays consistent with `Market.snapshot` exactly as the base class's does.
"""

from __future__ import annotations

import math
import random
from typing import Final

from depthflow.simulate.market import DepthUpdate, Market, format_e8

__all__ = ["ShapedMarket"]

_POOL_SIZE: Final = 4096
_LOT_E8: Final = 1_000
_PRICE_CACHE_MAX: Final = 100_000


def _quantity_pool() -> tuple[list[int], dict[int, str]]:
    """Log-uniform quantities from 0.00001 to ~40, multiples of the lot, with their strings."""
    rng = random.Random("depthflow-quantities")
    pool = sorted({max(int(10 ** rng.uniform(0, 6.6)), 1) * _LOT_E8 for _ in range(_POOL_SIZE)})
    text = {qty: format_e8(qty) for qty in pool}
    text[0] = format_e8(0)
    return pool, text


_QTY_POOL, _QTY_TEXT = _quantity_pool()


class ShapedMarket(Market):
    """`Market` with recording-shaped events (see module doc); ``record_wap`` off by default.

    ``median_levels``/``mean_levels``: changed levels per event; ``max_levels_per_event`` caps
    the tail; ``removal_share``: how often a change to an existing level removes it.
    """

    def __init__(
        self,
        symbol: str,
        *,
        seed: int = 1,
        levels: int = 100,
        record_wap: bool = False,
        median_levels: float = 20.0,
        mean_levels: float = 50.0,
        max_levels_per_event: int = 1000,
        removal_share: float = 0.5,
    ) -> None:
        if not 0 < median_levels <= mean_levels:
            raise ValueError("need 0 < median_levels <= mean_levels")
        super().__init__(symbol, seed=seed, levels=levels, record_wap=record_wap)
        self._mu = math.log(median_levels)
        self._sigma = math.sqrt(2 * math.log(mean_levels / median_levels))
        self._cap = max_levels_per_event
        self._removal = removal_share
        self._span = max(levels * 4, 8)  # ticks from the mid a normal event reaches
        self._price_text: dict[int, str] = {}
        self._pool_size = len(_QTY_POOL)

    def _qty(self) -> int:
        return _QTY_POOL[int(self._rng.random() * len(_QTY_POOL))]

    def next_event(self, event_time_ms: int) -> DepthUpdate:
        rng = self._rng
        rand = rng.random
        changes_b: dict[int, int] = {}
        changes_a: dict[int, int] = {}
        self._walk_mid(changes_b, changes_a)
        target = min(int(rng.lognormvariate(self._mu, self._sigma)) + 1, self._cap)
        span = self._span * (1 + target // 60)
        bids, asks, mid = self._bids, self._asks, self._mid
        floor_levels = self._min_levels
        removal = self._removal
        pool, pool_size = _QTY_POOL, self._pool_size
        for _ in range(target):  # repeats of a price make an event a little smaller
            u = rand()
            if u < 0.5:
                r = u * 2.0
                price = mid - int(r * r * r * span)
                if price < 1:
                    continue
                side, changes = bids, changes_b
            else:
                r = u * 2.0 - 1.0
                price = mid + 1 + int(r * r * r * span)
                side, changes = asks, changes_a
            if price in side and rand() < removal and len(side) > floor_levels:
                del side[price]
                changes[price] = 0
            else:
                qty = pool[int(rand() * pool_size)]
                side[price] = qty
                changes[price] = qty
        self._trim(bids, changes_b, bids=True)
        self._trim(asks, changes_a, bids=False)
        self._bound_depth(bids, changes_b, bids=True)
        self._bound_depth(asks, changes_a, bids=False)
        first = self.last_update_id + 1
        span_ids = max(int(target * rng.lognormvariate(0.15, 0.4)), 1)
        self.last_update_id = first + span_ids - 1
        if self._record_wap:
            self._store_wap()
        return {
            "e": "depthUpdate",
            "E": event_time_ms,
            "s": self.symbol,
            "U": first,
            "u": self.last_update_id,
            "b": self._texts(changes_b, descending=True),
            "a": self._texts(changes_a, descending=False),
        }

    def _trim(self, side: dict[int, int], changes: dict[int, int], *, bids: bool) -> None:
        """Drop the deepest levels beyond the maximum depth in one sort (big events add many)."""
        excess = len(side) - self._max_levels
        if excess <= 0:
            return
        ordered = sorted(side)
        deepest = ordered[:excess] if bids else ordered[-excess:]
        for price in deepest:
            del side[price]
            changes[price] = 0

    def _texts(self, changes: dict[int, int], *, descending: bool) -> list[list[str]]:
        cache = self._price_text
        if len(cache) > _PRICE_CACHE_MAX:
            cache.clear()
        tick = self.tick_e8
        out = []
        for price in sorted(changes, reverse=descending):
            text = cache.get(price)
            if text is None:
                text = cache[price] = format_e8(price * tick)
            out.append([text, _QTY_TEXT[changes[price]]])
        return out
