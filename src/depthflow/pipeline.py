"""frame -> event -> book -> rows: the synchronous heart of the ingestion path.

No I/O here. The feed (or a replay) hands in raw frames and snapshots; the pipeline keeps one
`BookSync` per symbol, turns every applied event into an ``orders`` row per changed level and a
``price_ticks`` row with the level-1 WAP, hands them to the writer and the WAP to the analytics
step, and accounts for every event that does not become a tick as data loss with a reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from depthflow.accounting import LossReason
from depthflow.book import BookSync, Outcome
from depthflow.events import DecodeError, DepthEvent, Snapshot, decode_frame
from depthflow.metrics import Metrics
from depthflow.records import OrderRow, TickRow

__all__ = ["Pipeline", "RowSink", "TickSink", "wap"]

log = logging.getLogger(__name__)


class RowSink(Protocol):
    def add_event(self, tick: TickRow | None, orders: Sequence[OrderRow]) -> bool: ...


class TickSink(Protocol):
    def add_tick(
        self, symbol: str, wap: float, event_time: datetime, last_update_id: int
    ) -> None: ...


_LOSS_OF_OUTCOME = {
    Outcome.STALE: LossReason.STALE,
    Outcome.GAP: LossReason.GAP,
    Outcome.OVERFLOW: LossReason.SYNC_BUFFER,
}


def wap(bid_px: float, bid_qty: float, ask_px: float, ask_qty: float) -> float:
    """Level-1 weighted average price, exactly as the product contract writes it."""
    return (bid_px * ask_qty + ask_px * bid_qty) / (bid_qty + ask_qty)


class Pipeline:
    """Owns the books of every configured symbol and turns frames into rows."""

    def __init__(
        self,
        symbols: Iterable[str],
        writer: RowSink,
        analytics: TickSink,
        metrics: Metrics,
        *,
        max_sync_buffer: int = 100_000,
    ) -> None:
        self.syncs: dict[str, BookSync] = {
            s.upper(): BookSync(s.upper(), max_buffer=max_sync_buffer) for s in symbols
        }
        self._writer = writer
        self._analytics = analytics
        self._metrics = metrics
        # Receipt time of each buffered event, so a tick replayed after a snapshot still reports
        # its latency (and received_at) from the moment its frame arrived.
        self._buffered_at: dict[int, float] = {}

    @property
    def in_sync(self) -> bool:
        return all(sync.last_update_id is not None for sync in self.syncs.values())

    def symbols_needing_snapshot(self) -> list[str]:
        return [symbol for symbol, sync in self.syncs.items() if sync.needs_snapshot]

    def on_frame(self, raw: str | bytes, received_at: float) -> str | None:
        """Handle one websocket frame; returns the symbol whose book now wants a snapshot."""
        metrics = self._metrics
        metrics.messages += 1
        try:
            event = decode_frame(raw)
        except DecodeError as exc:
            self._reject(exc.kind, exc.detail, raw)
            return None
        sync = self.syncs.get(event.symbol)
        if sync is None:
            self._reject(LossReason.UNKNOWN_SYMBOL, f"symbol {event.symbol!r}", raw)
            return None
        outcome = sync.on_event(event)
        if outcome is Outcome.APPLIED:
            self._emit(sync, event, received_at)
            return None
        self._account(sync, event, outcome, received_at)
        # A gap or the first buffered event: the book wants a snapshot now.
        return sync.symbol if sync.needs_snapshot else None

    def on_snapshot(self, symbol: str, snapshot: Snapshot) -> bool:
        """Apply a REST snapshot; returns True while the book still needs one (it was too old)."""
        sync = self.syncs[symbol.upper()]
        for event, outcome in sync.on_snapshot(snapshot):
            received_at = self._buffered_at.pop(id(event), time.time())
            if outcome is Outcome.APPLIED:
                self._emit(sync, event, received_at)
            else:
                self._account(sync, event, outcome, received_at)
        if sync.last_update_id is not None:
            log.info(
                "book_synced",
                extra={"fields": {"symbol": symbol, "last_update_id": sync.last_update_id}},
            )
        return sync.needs_snapshot

    def reset_all(self, reason: str = LossReason.RECONNECT) -> None:
        """Discard every book (after a reconnect, at shutdown); buffered events count as lost."""
        for sync in self.syncs.values():
            discarded = sync.reset()
            if discarded:
                self._metrics.count_loss(reason, discarded)
        self._buffered_at.clear()

    def _emit(self, sync: BookSync, event: DepthEvent, received_at: float) -> None:
        symbol = sync.symbol
        event_time = datetime.fromtimestamp(event.event_time / 1000, UTC)
        last_id = event.last_update_id
        orders: list[OrderRow] = [
            (symbol, event_time, last_id, "bid", price, qty) for price, qty in event.bids
        ]
        orders.extend((symbol, event_time, last_id, "ask", price, qty) for price, qty in event.asks)
        tick = self._tick(sync, event, event_time, received_at)
        self._writer.add_event(tick, orders)
        if tick is not None:
            self._analytics.add_tick(symbol, tick[9], event_time, last_id)
            self._metrics.ticks += 1
            self._metrics.observe_latency(time.time() - received_at)

    def _tick(
        self, sync: BookSync, event: DepthEvent, event_time: datetime, received_at: float
    ) -> TickRow | None:
        bid = sync.book.best_bid()
        ask = sync.book.best_ask()
        if bid is None or ask is None:
            self._metrics.count_loss(LossReason.EMPTY_SIDE)
            return None
        bid_px, bid_qty = bid
        ask_px, ask_qty = ask
        if bid_px >= ask_px:
            self._metrics.count_loss(LossReason.CROSSED)
            log.warning(
                "crossed_book",
                extra={
                    "fields": {
                        "symbol": sync.symbol,
                        "last_update_id": event.last_update_id,
                        "best_bid": bid_px,
                        "best_ask": ask_px,
                    }
                },
            )
            return None
        return (
            sync.symbol,
            event_time,
            datetime.fromtimestamp(received_at, UTC),
            event.first_update_id,
            event.last_update_id,
            bid_px,
            bid_qty,
            ask_px,
            ask_qty,
            wap(bid_px, bid_qty, ask_px, ask_qty),
        )

    def _account(
        self, sync: BookSync, event: DepthEvent, outcome: Outcome, received_at: float
    ) -> None:
        if outcome is Outcome.BUFFERED:
            self._buffered_at[id(event)] = received_at
            return
        reason = _LOSS_OF_OUTCOME[outcome]
        self._metrics.count_loss(reason)
        if outcome is not Outcome.STALE:
            log.warning(
                "data_loss",
                extra={
                    "fields": {
                        "reason": reason,
                        "symbol": sync.symbol,
                        "first_update_id": event.first_update_id,
                        "last_update_id": event.last_update_id,
                        "local_update_id": sync.last_update_id,
                    }
                },
            )

    def _reject(self, reason: str, detail: str, raw: str | bytes) -> None:
        self._metrics.count_error(reason)
        self._metrics.count_loss(reason)
        preview = raw[:200] if isinstance(raw, str) else raw[:200].decode("utf-8", "replace")
        log.warning(
            "bad_frame", extra={"fields": {"reason": reason, "detail": detail, "frame": preview}}
        )
