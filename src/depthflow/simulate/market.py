"""A seeded random-walk order book that speaks Binance's diff-depth shapes (pure, no I/O).

Prices and quantities are integers internally (price in ticks, quantity in 1e-8 units) so the
book never suffers float drift; they are formatted only when an event or snapshot is built, as
Binance's 8-decimal strings ("65000.01000000").
"""

from __future__ import annotations

import copy
import random
import zlib
from typing import Final, Self, TypedDict

__all__ = ["DepthSnapshot", "DepthUpdate", "Market", "format_e8"]

_E8: Final = 10**8
# Rough real-world levels so logs and dashboards look familiar; other symbols get a hashed price.
_KNOWN_PRICES: Final = {
    "btcusdt": 65_000,
    "ethusdt": 3_500,
    "bnbusdt": 600,
    "solusdt": 150,
    "xrpusdt": 1,
}
_LOT_E8: Final = 1_000  # quantities are multiples of 0.00001
_MAX_LOTS: Final = 400_000  # up to 4.0 per level
_WAP_HISTORY: Final = 2_000_000  # bounds memory of a simulator left running for days


class DepthUpdate(TypedDict):
    """A spot diff-depth event (``<symbol>@depth``) exactly as Binance sends it."""

    e: str
    E: int
    s: str
    U: int
    u: int
    b: list[list[str]]
    a: list[list[str]]


class DepthSnapshot(TypedDict):
    """A ``GET /api/v3/depth`` response body."""

    lastUpdateId: int
    bids: list[list[str]]
    asks: list[list[str]]


def format_e8(value: int) -> str:
    """Format a non-negative integer in 1e-8 units as Binance does: ``"65000.01000000"``."""
    return f"{value // _E8}.{value % _E8:08d}"


def _base_price(symbol: str) -> int:
    """Whole-unit starting price: a known one, else derived from a stable hash of the name."""
    known = _KNOWN_PRICES.get(symbol)
    if known is not None:
        return known
    digest = zlib.crc32(symbol.encode())
    # At least 10 units: the seeded book reaches ~300 ticks (3.00) below the mid.
    return (10, 100, 1000, 10_000)[digest % 4] * (1 + (digest >> 8) % 9)


class Market:
    """One symbol's true order book, advanced one diff-depth event at a time.

    Invariants after every event: both sides hold between ``levels // 2`` and ``levels * 3 // 2``
    levels, and every bid is strictly below every ask (bids <= ``mid`` < asks).
    """

    def __init__(
        self, symbol: str, *, seed: int = 1, levels: int = 100, record_wap: bool = True
    ) -> None:
        self.symbol = symbol.upper()
        self.stream_symbol = symbol.lower()
        self._rng = random.Random(f"{seed}:{self.stream_symbol}")
        base = _base_price(self.stream_symbol)
        self.tick_e8 = 1_000_000 if base >= 1 else 10_000  # 0.01, or 0.0001 for cheap coins
        self._levels = levels
        self._min_levels = max(levels // 2, 1)
        self._max_levels = max(levels * 3 // 2, 2)
        self._mid = base * _E8 // self.tick_e8
        self._bids: dict[int, int] = {}
        self._asks: dict[int, int] = {}
        self._record_wap = record_wap
        self.true_wap: dict[int, float] = {}
        self.last_update_id = self._rng.randrange(10**9, 10**10)
        self._seed_book()

    # -- public API ---------------------------------------------------------------------------

    def next_event(self, event_time_ms: int) -> DepthUpdate:
        """Advance the book by one event, apply it, and return it as Binance sends it."""
        changes_b: dict[int, int] = {}
        changes_a: dict[int, int] = {}
        self._walk_mid(changes_b, changes_a)
        for _ in range(self._rng.randint(9, 24)):  # ~15 changed levels per event on average
            self._random_change(changes_b, changes_a)
        self._bound_depth(self._bids, changes_b, bids=True)
        self._bound_depth(self._asks, changes_a, bids=False)
        first = self.last_update_id + 1
        # Binance ids advance by more than one per event: each event folds several updates.
        self.last_update_id = first + self._rng.randint(0, 3)
        if self._record_wap:
            self._store_wap()
        return {
            "e": "depthUpdate",
            "E": event_time_ms,
            "s": self.symbol,
            "U": first,
            "u": self.last_update_id,
            "b": self._format_changes(changes_b, descending=True),
            "a": self._format_changes(changes_a, descending=False),
        }

    def clone(self) -> Self:
        """A twin of the book as it stands that goes on with the very same events (same random
        state), without the WAP history."""
        twin = copy.copy(self)
        twin._rng = random.Random()
        twin._rng.setstate(self._rng.getstate())
        twin._bids = dict(self._bids)
        twin._asks = dict(self._asks)
        twin._record_wap = False
        twin.true_wap = {}
        return twin

    def snapshot(self, limit: int = 100) -> DepthSnapshot:
        """The top ``limit`` levels per side, best first, as ``GET /api/v3/depth`` returns them."""
        bids = sorted(self._bids, reverse=True)[:limit]
        asks = sorted(self._asks)[:limit]
        return {
            "lastUpdateId": self.last_update_id,
            "bids": [self._format_level(p, self._bids[p]) for p in bids],
            "asks": [self._format_level(p, self._asks[p]) for p in asks],
        }

    def top(
        self, depth: int = 10
    ) -> tuple[int, list[tuple[float, float]], list[tuple[float, float]]]:
        """``(last_update_id, bids, asks)`` with floats parsed from the Binance strings."""
        snap = self.snapshot(depth)
        bids = [(float(p), float(q)) for p, q in snap["bids"]]
        asks = [(float(p), float(q)) for p, q in snap["asks"]]
        return snap["lastUpdateId"], bids, asks

    def wap(self) -> float:
        """Level-1 WAP from the formatted strings, in the order the SPEC writes the formula."""
        best_bid = max(self._bids)
        best_ask = min(self._asks)
        bid_px = float(format_e8(best_bid * self.tick_e8))
        bid_qty = float(format_e8(self._bids[best_bid]))
        ask_px = float(format_e8(best_ask * self.tick_e8))
        ask_qty = float(format_e8(self._asks[best_ask]))
        return (bid_px * ask_qty + ask_px * bid_qty) / (bid_qty + ask_qty)

    @property
    def bid_count(self) -> int:
        return len(self._bids)

    @property
    def ask_count(self) -> int:
        return len(self._asks)

    # -- book construction ----------------------------------------------------------------------

    def _seed_book(self) -> None:
        price = self._mid
        for _ in range(self._levels):
            self._bids[price] = self._qty()
            price -= self._rng.randint(1, 3)
        price = self._mid + 1
        for _ in range(self._levels):
            self._asks[price] = self._qty()
            price += self._rng.randint(1, 3)

    def _qty(self) -> int:
        # random() is several times cheaper than randint(); prebuilt runs make millions of these.
        return (int(self._rng.random() * _MAX_LOTS) + 1) * _LOT_E8

    def _set(self, side: dict[int, int], changes: dict[int, int], price: int, qty: int) -> None:
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)
        changes[price] = qty

    # -- per-event moves ----------------------------------------------------------------------

    def _walk_mid(self, changes_b: dict[int, int], changes_a: dict[int, int]) -> None:
        """Random-walk the mid; levels it crosses are taken out, like aggressive orders would."""
        if self._rng.random() >= 0.3:
            return
        self._mid = max(self._mid + self._rng.randint(-3, 3), 2)
        for price in [p for p in self._bids if p > self._mid]:
            self._set(self._bids, changes_b, price, 0)
        for price in [p for p in self._asks if p <= self._mid]:
            self._set(self._asks, changes_a, price, 0)
        if not self._bids:
            self._set(self._bids, changes_b, self._mid, self._qty())
        if not self._asks:
            self._set(self._asks, changes_a, self._mid + 1, self._qty())

    def _random_change(self, changes_b: dict[int, int], changes_a: dict[int, int]) -> None:
        bids = self._rng.random() < 0.5
        side, changes = (self._bids, changes_b) if bids else (self._asks, changes_a)
        roll = self._rng.random()
        # Removals only above the target depth and additions weighted below it keep each side
        # hovering around ``levels`` instead of drifting to a bound.
        if roll < 0.55:
            price = self._rng.choice(list(side))
            self._set(side, changes, price, self._qty())
        elif roll < 0.775 and len(side) > self._levels:
            price = self._rng.choice(list(side))
            self._set(side, changes, price, 0)
        else:
            self._set(side, changes, self._near_top(bids), self._qty())

    def _near_top(self, bids: bool) -> int:
        """A price within a few ticks of the mid on the given side, never across it."""
        offset = self._rng.randint(0, 8)
        if bids:
            return max(self._mid - offset, 1)
        return self._mid + 1 + offset

    def _bound_depth(self, side: dict[int, int], changes: dict[int, int], *, bids: bool) -> None:
        while len(side) > self._max_levels:
            self._set(side, changes, min(side) if bids else max(side), 0)
        while len(side) < self._min_levels:
            step = self._rng.randint(1, 3)
            price = min(side) - step if bids else max(side) + step
            if price <= 0:
                return
            self._set(side, changes, price, self._qty())

    def _store_wap(self) -> None:
        self.true_wap[self.last_update_id] = self.wap()
        if len(self.true_wap) > _WAP_HISTORY:
            del self.true_wap[next(iter(self.true_wap))]

    # -- formatting -----------------------------------------------------------------------------

    def _format_level(self, price: int, qty: int) -> list[str]:
        return [format_e8(price * self.tick_e8), format_e8(qty)]

    def _format_changes(self, changes: dict[int, int], *, descending: bool) -> list[list[str]]:
        return [
            self._format_level(price, changes[price])
            for price in sorted(changes, reverse=descending)
        ]
