"""Sans-I/O audit of a live book against a fresh REST snapshot, compared at one update id.

A snapshot of a live symbol is never at the live book's id: the stream keeps moving while the
request is in flight. So the audit runs a shadow `BookSync`, started when the request is sent and
fed the same events as the live book; the snapshot loads the shadow and the buffer is replayed by
Binance's rules. From then on both books have seen the same events, so their ids meet at once or
after the next few events, and the shadow is the exchange's book at that id.

What the shadow knows for certain is bounded by the snapshot: the top 1000 levels of each side
are complete between the best and the deepest level listed, and nothing existed beyond the best,
so every level at or above the snapshot's lowest bid (at or below its highest ask) is known
exactly, whatever the events did since. Deeper, the shadow holds only what events touched, and a
local level it lacks there may well be real: those are not compared.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from heapq import nlargest, nsmallest
from typing import Literal

from depthflow.accounting import AuditResult
from depthflow.book import BookSync, OrderBook, Outcome
from depthflow.events import DepthEvent, Snapshot

__all__ = ["AuditReport", "BookAudit", "LevelDiff", "Side", "SkipReason"]

Side = Literal["bid", "ask"]

# Enough to see what went wrong in a log line; a broken book differs in many more.
_MAX_DIFFERENCES = 5


class SkipReason(enum.StrEnum):
    """Why an audit could not compare the two books at one update id."""

    SNAPSHOT_TOO_OLD = "snapshot_too_old"  # older than the first event buffered for it
    GAP = "gap"  # the shadow saw update ids skipped
    OVERFLOW = "overflow"  # the shadow's buffer filled before the snapshot came
    NO_SNAPSHOT = "no_snapshot"  # compared before the snapshot was loaded
    NOT_LIVE = "not_live"  # the live book is not in sync
    ID_MISMATCH = "id_mismatch"  # the ids differ (the shadow is behind: they cannot meet)


@dataclass(frozen=True, slots=True)
class LevelDiff:
    """One price where the books disagree; a quantity of None means the level is absent."""

    side: Side
    price: float
    local_qty: float | None
    exchange_qty: float | None


@dataclass(frozen=True, slots=True)
class AuditReport:
    """What one audit found. ``differences`` holds the first few, best prices first, bids before
    asks; ``mismatched`` counts them all."""

    result: AuditResult
    update_id: int | None
    levels_compared: int = 0
    differences: tuple[LevelDiff, ...] = ()
    mismatched: int = 0
    reason: SkipReason | None = None  # set only when SKIPPED


class BookAudit:
    """One audit of one symbol: create it when the snapshot request is sent.

    Feed it every depth event of the symbol from then on (`on_event`) and the snapshot when it
    arrives (`on_snapshot`); after each, `poll` says whether the verdict is in. Drop the audit
    once it has given a report.
    """

    __slots__ = ("_ask_high", "_bid_low", "_shadow", "_skip", "symbol", "top_n")

    def __init__(self, symbol: str, *, top_n: int = 20, max_buffer: int = 100_000) -> None:
        if top_n < 0:
            raise ValueError(f"top_n must be at least 0, got {top_n}")
        self.symbol = symbol
        self.top_n = top_n
        self._shadow = BookSync(symbol, max_buffer=max_buffer)
        self._skip: SkipReason | None = None
        # The window the snapshot makes certain (see the module docstring); an empty side in a
        # snapshot means the side was empty, so all of it is known.
        self._bid_low = -math.inf
        self._ask_high = math.inf

    @property
    def update_id(self) -> int | None:
        """The shadow book's update id once the snapshot is loaded, else None."""
        return None if self._skip is not None else self._shadow.last_update_id

    @property
    def book(self) -> OrderBook:
        """The shadow book: the exchange's book at `update_id` within the snapshot's window."""
        return self._shadow.book

    def on_event(self, event: DepthEvent) -> None:
        """Buffer (before the snapshot) or apply (after) one event of the symbol."""
        if self._skip is not None:
            return
        outcome = self._shadow.on_event(event)
        if outcome is Outcome.GAP:
            self._skip = SkipReason.GAP
        elif outcome is Outcome.OVERFLOW:
            self._skip = SkipReason.OVERFLOW

    def on_snapshot(self, snapshot: Snapshot) -> None:
        """Load the shadow from `snapshot` and replay what was buffered, as the sync does."""
        if self._skip is not None or not self._shadow.needs_snapshot:
            return  # decided already, or a second snapshot: the first one stands
        for _, outcome in self._shadow.on_snapshot(snapshot):
            if outcome is Outcome.GAP:
                self._skip = SkipReason.GAP
                return
        if self._shadow.needs_snapshot:
            # A sync would fetch again; an audit has no use for a second request.
            self._skip = SkipReason.SNAPSHOT_TOO_OLD
            return
        if snapshot.bids:
            self._bid_low = min(price for price, _ in snapshot.bids)
        if snapshot.asks:
            self._ask_high = max(price for price, _ in snapshot.asks)

    def poll(self, live_book: OrderBook, live_id: int | None) -> AuditReport | None:
        """The report once it can be given, None while the ids have yet to meet.

        Call after each `on_event`/`on_snapshot`, with the live book as it is then (`live_id`
        is its `BookSync.last_update_id`). Waiting ends on its own: the shadow is only ahead
        while the live book applies events the snapshot already held.
        """
        if self._skip is not None:
            return _skipped(self._skip, None)
        shadow_id = self._shadow.last_update_id
        if shadow_id is None:
            return None
        if live_id is None:
            return _skipped(SkipReason.NOT_LIVE, shadow_id)
        if shadow_id > live_id:
            return None
        return self.compare(live_book, live_id)

    def compare(self, live_book: OrderBook, live_id: int) -> AuditReport:
        """Compare `live_book` with the shadow; SKIPPED unless both are at `live_id`.

        Compared: the `top_n` best levels of each side of either book and every level in the
        snapshot's window. A level the shadow has with another quantity (or not at all locally)
        is a mismatch, and so is a local level inside the window the shadow lacks. Quantities are
        compared exactly: both are parsed from the same decimal strings.
        """
        if self._skip is not None:
            return _skipped(self._skip, None)
        shadow_id = self._shadow.last_update_id
        if shadow_id is None:
            return _skipped(SkipReason.NO_SNAPSHOT, None)
        if shadow_id != live_id:
            return _skipped(SkipReason.ID_MISMATCH, shadow_id)
        shadow = self._shadow.book
        bid_count, bid_diffs = self._diff_side(
            "bid", live_book.bids, shadow.bids, self._bid_window, nlargest
        )
        ask_count, ask_diffs = self._diff_side(
            "ask", live_book.asks, shadow.asks, self._ask_window, nsmallest
        )
        differences = bid_diffs + ask_diffs
        return AuditReport(
            result=AuditResult.MISMATCH if differences else AuditResult.MATCH,
            update_id=live_id,
            levels_compared=bid_count + ask_count,
            differences=tuple(differences[:_MAX_DIFFERENCES]),
            mismatched=len(differences),
        )

    def stale_levels(self, live_book: OrderBook) -> list[tuple[Side, float]]:
        """Local levels inside the snapshot's window that the exchange no longer has, best first.

        Meaningful only at the id `compare` was given (feed no event in between); empty before
        the snapshot is loaded or once the audit was skipped.
        """
        if self.update_id is None:
            return []
        shadow = self._shadow.book
        bids = sorted(
            (p for p in live_book.bids if p not in shadow.bids and self._bid_window(p)),
            reverse=True,
        )
        asks = sorted(p for p in live_book.asks if p not in shadow.asks and self._ask_window(p))
        stale: list[tuple[Side, float]] = [("bid", price) for price in bids]
        stale.extend(("ask", price) for price in asks)
        return stale

    def _bid_window(self, price: float) -> bool:
        return price >= self._bid_low

    def _ask_window(self, price: float) -> bool:
        return price <= self._ask_high

    def _diff_side(
        self,
        side: Side,
        local: dict[float, float],
        exchange: dict[float, float],
        in_window: Callable[[float], bool],
        best: Callable[[int, dict[float, float]], list[float]],
    ) -> tuple[int, list[LevelDiff]]:
        prices = {*best(self.top_n, local), *best(self.top_n, exchange)}
        prices.update(price for price in local if in_window(price))
        prices.update(price for price in exchange if in_window(price))
        compared = 0
        differences: list[LevelDiff] = []
        for price in sorted(prices, reverse=side == "bid"):
            exchange_qty = exchange.get(price)
            if exchange_qty is None and not in_window(price):
                continue  # deeper than the snapshot: the exchange may have it, nobody knows
            compared += 1
            local_qty = local.get(price)
            if local_qty != exchange_qty:
                differences.append(LevelDiff(side, price, local_qty, exchange_qty))
        return compared, differences


def _skipped(reason: SkipReason, update_id: int | None) -> AuditReport:
    return AuditReport(result=AuditResult.SKIPPED, update_id=update_id, reason=reason)
