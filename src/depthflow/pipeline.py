"""frame -> event -> book -> rows: the synchronous heart of the ingestion path.

No I/O here. The feed (or a replay) hands in raw frames and snapshots; the pipeline keeps one
`BookSync` per symbol, turns every applied event into an ``orders`` row per changed level and a
``price_ticks`` row with the level-1 WAP, hands them to the writer and the WAP to the analytics
step, accounts for every event that does not become a tick as data loss with a reason, and has the
`GapLedger` record every hole that leaves in the stored sequence. Nothing a frame holds can make
it raise: whatever goes wrong is counted, logged (rate-limited) and the stream goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from depthflow.accounting import AuditResult, ErrorKind, GapReason, LossReason, ResyncReason
from depthflow.audit import AuditReport, BookAudit
from depthflow.book import BookSync, Outcome, SyncState
from depthflow.events import DecodeError, DepthEvent, Snapshot, decode_frame
from depthflow.gaps import GapLedger
from depthflow.logs import LogLimiter
from depthflow.metrics import Metrics
from depthflow.records import CheckpointRow, EventOrders, GapRow, OrderRow, TickRow

__all__ = ["REPLAY_STEP", "Pipeline", "RowSink", "TickSink", "wap"]

log = logging.getLogger(__name__)

_PREVIEW_CHARS = 200
# Events of one symbol held during a rotation while the other connection catches up.
_MAX_HELD = 10_000
# Events replayed between two pauses of `load_snapshot` (~1 ms of work on real-shaped events).
REPLAY_STEP = 32
_NEVER = 1 << 62  # the checkpoint due time of a book that is not live


class RowSink(Protocol):
    def add_event(self, tick: TickRow | None, orders: Sequence[OrderRow]) -> bool: ...

    def add_gap(self, row: GapRow) -> bool: ...

    def add_checkpoint(self, row: CheckpointRow) -> bool: ...


class TickSink(Protocol):
    def add_tick(
        self, symbol: str, wap: float, event_time: datetime, last_update_id: int
    ) -> None: ...


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
        stale_resync_s: float = 5.0,
        checkpoint_interval_s: float = 300.0,
        ledger: GapLedger | None = None,
    ) -> None:
        self._syncs: dict[str, BookSync] = {
            s.upper(): BookSync(s.upper(), max_buffer=max_sync_buffer) for s in symbols
        }
        self._max_sync_buffer = max_sync_buffer
        self._writer = writer
        self._analytics = analytics
        self._metrics = metrics
        self._stale_resync_s = stale_resync_s
        self.ledger = ledger if ledger is not None else GapLedger()
        # Receipt time of each buffered event, so a tick replayed after a snapshot still reports
        # its latency (and received_at) from the moment its frame arrived.
        self._buffered_at: dict[int, float] = {}
        # Receipt time of the first of an unbroken run of stale events on a live book.
        self._stale_since: dict[str, float] = {}
        # Events refused by a full sync buffer in the current episode, per symbol.
        self._sync_overflow: dict[str, int] = {}
        self._bad_frames = LogLimiter()
        self._gap_lines = LogLimiter()
        self._current: BookSync | None = None  # the book the frame being handled changes
        self._audits: dict[str, BookAudit] = {}
        # Symbols two connections deliver (a rotation), and events held there meanwhile.
        self._overlap: set[str] = set()
        self._held: dict[str, deque[tuple[DepthEvent, float]]] = {}
        # (update id, event time) of each symbol's last applied event: a checkpoint's time.
        self._last_applied: dict[str, tuple[int, datetime]] = {}
        # Event time (ms) from which a live book's next applied event writes a checkpoint; 0:
        # at the next event (synced on a snapshot alone, so its state has no event time yet).
        # Event time, not the clock: a replay stores the checkpoints the live run did.
        self._checkpoint_every_ms = round(checkpoint_interval_s * 1000)
        self._checkpoint_due: dict[str, int] = {}

    # -- state -------------------------------------------------------------------------------------

    @property
    def syncs(self) -> Mapping[str, BookSync]:
        """Every symbol's book sync, by upper-case symbol (read only)."""
        return self._syncs

    def book(self, symbol: str) -> BookSync | None:
        return self._syncs.get(symbol.upper())

    def states(self) -> dict[str, SyncState]:
        return {symbol: sync.state for symbol, sync in self._syncs.items()}

    @property
    def in_sync(self) -> bool:
        return all(sync.live for sync in self._syncs.values())

    def symbols_needing_snapshot(self) -> list[str]:
        return [symbol for symbol, sync in self._syncs.items() if sync.needs_snapshot]

    # -- input -------------------------------------------------------------------------------------

    def on_frame(self, raw: str | bytes, received_at: float) -> str | None:
        """Handle one websocket frame; returns the symbol whose book now wants a snapshot."""
        self._metrics.messages += 1
        self._current = None
        try:
            return self._on_frame(raw, received_at)
        except Exception as exc:
            # A bug or an input nobody foresaw: the frame is counted as lost, never fatal.
            return self._internal_error(raw, exc)

    def on_snapshot(self, symbol: str, snapshot: Snapshot) -> bool:
        """Apply a REST snapshot and replay the sync buffer in one go; returns True while the
        book still needs one (it was too old, or crossed). See `load_snapshot`."""
        for _ in self.load_snapshot(symbol, snapshot):
            pass
        return self._syncs[symbol.upper()].needs_snapshot

    def load_snapshot(self, symbol: str, snapshot: Snapshot) -> Iterator[int]:
        """Apply a REST snapshot, then replay the sync buffer, yielding the number of events
        handled so far every `REPLAY_STEP` events.

        A caller may pause at each yield (to let its event loop run: a busy symbol can buffer
        tens of thousands of events while its snapshot is on the way); frames handed in
        meanwhile queue behind the replay. Exhaust the iterator; `needs_snapshot` of the book
        then says whether another snapshot is needed (it was too old, or crossed).
        """
        sync = self._syncs[symbol.upper()]
        replay = sync.on_snapshot(snapshot)
        if sync.state is SyncState.LIVE and sync.is_crossed():
            # Loaded, but no exchange book is crossed: throw it away before replaying anything
            # (the replay then keeps every buffered event for the next snapshot).
            self._resync(sync, ResyncReason.CROSSED)
        for handled, (event, outcome) in enumerate(replay, 1):
            received_at = self._buffered_at.pop(id(event), time.time())
            self._current = sync
            try:
                if outcome is Outcome.APPLIED:
                    self._emit(sync, event, received_at)
                else:
                    self._account(sync, event, outcome, None)
            except Exception as exc:
                # As in `on_frame`: an event nobody foresaw costs a resync, never the replay.
                self._internal_error(b"(replayed event)", exc)
            if handled % REPLAY_STEP == 0:
                yield handled
        if sync.live and self._syncs.get(sync.symbol) is sync:
            self._synced(sync)

    def add_symbols(self, symbols: Iterable[str]) -> list[str]:
        """Follow more symbols (new listings); returns the ones that were not followed yet."""
        added = []
        for symbol in symbols:
            symbol = symbol.upper()
            if symbol not in self._syncs:
                self._syncs[symbol] = BookSync(symbol, max_buffer=self._max_sync_buffer)
                added.append(symbol)
        return added

    def remove_symbols(self, symbols: Iterable[str]) -> list[str]:
        """Stop following symbols (delisted); their buffered events count as lost."""
        removed = []
        for symbol in symbols:
            sync = self._syncs.pop(symbol.upper(), None)
            if sync is None:
                continue
            self._discard(sync, LossReason.DELISTED)
            removed.append(sync.symbol)
        return removed

    # -- checkpoints -------------------------------------------------------------------------------

    def checkpoint(self, symbol: str) -> bool:
        """Hand the writer the whole live book of ``symbol`` at its update id; False if it is
        not live, has no event time yet (one is written after its next event) or was refused."""
        sync = self._syncs.get(symbol.upper())
        if sync is None or not sync.live:
            return False
        last = self._last_applied.get(sync.symbol)
        if last is None or last[0] != sync.last_update_id:
            self._checkpoint_due[sync.symbol] = 0
            return False
        update_id, event_time = last
        due_ms = round(event_time.timestamp() * 1000) + self._checkpoint_every_ms
        self._checkpoint_due[sync.symbol] = due_ms
        book = sync.book
        row: CheckpointRow = (
            sync.symbol,
            event_time,
            update_id,
            [[price, book.bids[price]] for price in sorted(book.bids, reverse=True)],
            [[price, book.asks[price]] for price in sorted(book.asks)],
        )
        return self._writer.add_checkpoint(row)

    # -- audits ------------------------------------------------------------------------------------

    def start_audit(self, symbol: str, top_n: int = 20) -> bool:
        """Begin auditing a live book: call when the audit snapshot request is sent, so every
        event from then on reaches the audit's shadow book. False if it is not live."""
        sync = self._syncs.get(symbol.upper())
        if sync is None or not sync.live:
            return False
        self._audits[sync.symbol] = BookAudit(sync.symbol, top_n=top_n)
        return True

    def on_audit_snapshot(self, symbol: str, snapshot: Snapshot) -> AuditReport | None:
        """The audit's snapshot; the report if the audit could be decided right away."""
        symbol = symbol.upper()
        audit = self._audits.get(symbol)
        if audit is None:
            return None
        audit.on_snapshot(snapshot)
        return self._poll_audit(self._syncs[symbol])

    def cancel_audit(self, symbol: str) -> None:
        """The snapshot never came, or the ids never met in time: the audit is skipped."""
        if self._audits.pop(symbol.upper(), None) is not None:
            self._metrics.count_audit(AuditResult.SKIPPED)

    def _poll_audit(self, sync: BookSync) -> AuditReport | None:
        audit = self._audits[sync.symbol]
        report = audit.poll(sync.book, sync.last_update_id)
        if report is None:
            return None
        del self._audits[sync.symbol]
        self._metrics.count_audit(report.result)
        if report.result is AuditResult.MISMATCH:
            log.warning(
                "book_audit_mismatch",
                extra={
                    "fields": {
                        "symbol": sync.symbol,
                        "update_id": report.update_id,
                        "levels_compared": report.levels_compared,
                        "mismatched": report.mismatched,
                        "differences": [str(d) for d in report.differences],
                    }
                },
            )
            self._resync(sync, ResyncReason.AUDIT)
        return report

    def restore(self, symbol: str, last_update_id: int | None, event_time: datetime | None) -> None:
        """An earlier run's last stored update id of ``symbol`` (None: it stored nothing), so
        the hole a restart or crash left is recorded."""
        symbol = symbol.upper()
        if last_update_id is None:
            self.ledger.forget_first(symbol)
            return
        row = self.ledger.restore(symbol, last_update_id, event_time)
        if row is not None:
            self._record_gap(row)

    def reset_all(self, reason: LossReason = LossReason.RECONNECT) -> None:
        """Discard every book (after a disconnect, at shutdown); buffered events count as lost."""
        self.reset(self._syncs, reason)

    def reset(self, symbols: Iterable[str], reason: LossReason = LossReason.RECONNECT) -> None:
        """Discard the books of ``symbols``; their buffered events count as lost."""
        gap_reason = GapReason.SHUTDOWN if reason is LossReason.SHUTDOWN else GapReason.RECONNECT
        for symbol in symbols:
            sync = self._syncs[symbol.upper()]
            was = sync.state
            if reason is LossReason.SHUTDOWN:
                self._close_ledger(sync)
            self._discard(sync, reason)
            if was is not SyncState.WAITING:
                self.ledger.note(sync.symbol, gap_reason)
                if reason is LossReason.RECONNECT:
                    self._metrics.count_resync(ResyncReason.RECONNECT)
        if not any(sync.buffered for sync in self._syncs.values()):
            self._buffered_at.clear()

    def _discard(self, sync: BookSync, reason: LossReason) -> None:
        """Drop a book and everything kept for it (audit, rotation overlap, held and buffered
        events, stale timer); the events that will never be handled count as lost."""
        self._audits.pop(sync.symbol, None)
        self._overlap.discard(sync.symbol)
        self._stale_since.pop(sync.symbol, None)
        self._checkpoint_due.pop(sync.symbol, None)
        lost = len(self._held.pop(sync.symbol, ())) + sync.reset()
        if lost:
            self._metrics.count_loss(reason, lost)

    def _close_ledger(self, sync: BookSync) -> None:
        last = sync.last_buffered
        if last is None:
            return
        event_time = datetime.fromtimestamp(last.event_time / 1000, UTC)
        row = self.ledger.close(sync.symbol, last.last_update_id, event_time, GapReason.SHUTDOWN)
        if row is not None:
            self._record_gap(row)

    # -- one frame ---------------------------------------------------------------------------------

    def _on_frame(self, raw: str | bytes, received_at: float) -> str | None:
        try:
            event = decode_frame(raw)
        except DecodeError as exc:
            self._reject(exc.kind, ErrorKind(exc.kind), exc.detail, raw)
            return None
        sync = self._syncs.get(event.symbol)
        if sync is None:
            self._reject(
                LossReason.UNKNOWN_SYMBOL,
                ErrorKind.UNKNOWN_SYMBOL,
                f"symbol {event.symbol[:_PREVIEW_CHARS]!r}",
                raw,
            )
            return None
        self._current = sync
        if self._overlap and sync.symbol in self._overlap:
            return self._overlapping(sync, event, received_at)
        return self._process(sync, event, received_at)

    def _process(self, sync: BookSync, event: DepthEvent, received_at: float) -> str | None:
        if self._audits:
            audit = self._audits.get(sync.symbol)
            if audit is not None:
                audit.on_event(event)
        expected = sync.last_update_id
        outcome = sync.on_event(event)
        wants = self._handle(sync, event, outcome, expected, received_at)
        if self._audits and sync.symbol in self._audits:
            # After the event is handled: both books are at the same id now, if ever.
            report = self._poll_audit(sync)
            if report is not None and report.result is AuditResult.MISMATCH:
                return sync.symbol
        return wants

    # -- connection rotation -----------------------------------------------------------------------

    def begin_overlap(self, symbols: Iterable[str]) -> None:
        """Two connections now deliver these symbols (a rotation): an event already applied is
        a duplicate, and one ahead of the book waits for the other connection to catch up
        instead of counting as a gap."""
        self._overlap.update(s.upper() for s in symbols if s.upper() in self._syncs)

    def end_overlap(self, symbols: Iterable[str]) -> list[str]:
        """One connection again: events still held go through the usual rules (a real gap is
        a gap now). Returns the symbols whose books want a snapshot."""
        wants = []
        for symbol in symbols:
            symbol = symbol.upper()
            self._overlap.discard(symbol)
            held = self._held.pop(symbol, None)
            sync = self._syncs.get(symbol)
            if not held or sync is None:
                continue
            for event, received_at in sorted(held, key=lambda item: item[0].first_update_id):
                wanted = self._process(sync, event, received_at)
                if wanted is not None:
                    wants.append(wanted)
        return list(dict.fromkeys(wants))

    def _overlapping(self, sync: BookSync, event: DepthEvent, received_at: float) -> str | None:
        local = sync.last_update_id
        if local is None or not sync.live:
            return self._process(sync, event, received_at)
        if event.last_update_id <= local:
            self._metrics.count_loss(LossReason.DUPLICATE)
            return None
        held = self._held.setdefault(sync.symbol, deque())
        if event.first_update_id > local + 1 and len(held) < _MAX_HELD:
            held.append((event, received_at))
            return None
        wants = self._process(sync, event, received_at)
        # The other connection caught up: what it was ahead with continues the book now.
        while held and (local := sync.last_update_id) is not None:
            first, at = held[0]
            if first.last_update_id <= local:
                held.popleft()
                self._metrics.count_loss(LossReason.DUPLICATE)
            elif first.first_update_id <= local + 1:
                held.popleft()
                wants = self._process(sync, first, at) or wants
            else:
                break
        return wants

    def _handle(
        self,
        sync: BookSync,
        event: DepthEvent,
        outcome: Outcome,
        expected: int | None,
        received_at: float,
    ) -> str | None:
        if outcome is Outcome.APPLIED:
            self._stale_since.pop(sync.symbol, None)
            return self._emit(sync, event, received_at)
        if outcome is Outcome.BUFFERED:
            self._buffered_at[id(event)] = received_at
            # Behind a replay in progress (catching up), no snapshot is wanted.
            return sync.symbol if sync.needs_snapshot else None
        self._account(sync, event, outcome, expected)
        if outcome is Outcome.STALE and expected is not None:
            return self._check_stale(sync, received_at)
        # A gap: the book wants a snapshot now.
        return sync.symbol if sync.needs_snapshot else None

    def _emit(self, sync: BookSync, event: DepthEvent, received_at: float) -> str | None:
        """Hand an applied event's rows on; returns the symbol if its book must be resynced."""
        symbol = sync.symbol
        event_time = datetime.fromtimestamp(event.event_time / 1000, UTC)
        last_id = event.last_update_id
        orders = EventOrders(symbol, event_time, last_id, event.bids, event.asks)
        self._last_applied[symbol] = (last_id, event_time)
        if event.event_time >= self._checkpoint_due.get(symbol, _NEVER):
            self.checkpoint(symbol)
        tick = self._tick(sync, event, event_time, received_at)
        if tick is None:
            self.ledger.note(symbol, GapReason.NO_TICK)
            self._writer.add_event(None, orders)
            if sync.is_crossed():
                self._resync(sync, ResyncReason.CROSSED)
                return symbol
            return None
        gap = self.ledger.before_tick(symbol, event.first_update_id, event_time)
        if gap is not None:
            self._record_gap(gap)
        if not self._writer.add_event(tick, orders):
            # Refused (buffer full, counted by the writer): the next stored tick records the hole.
            self.ledger.note(symbol, GapReason.OVERFLOW)
            return None
        self.ledger.stored(symbol, last_id, event_time)
        self._analytics.add_tick(symbol, tick[9], event_time, last_id)
        self._metrics.ticks += 1
        self._metrics.observe_latency(time.time() - received_at)
        return None

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

    def _check_stale(self, sync: BookSync, received_at: float) -> str | None:
        """A live book seeing only stale events for `stale_resync_s` ran ahead of the exchange."""
        since = self._stale_since.setdefault(sync.symbol, received_at)
        if received_at - since < self._stale_resync_s:
            return None
        self._resync(sync, ResyncReason.STALE)
        return sync.symbol

    def _account(
        self, sync: BookSync, event: DepthEvent, outcome: Outcome, expected: int | None
    ) -> None:
        if outcome is Outcome.STALE:
            self._metrics.count_loss(LossReason.STALE)
            return
        if outcome is Outcome.OVERFLOW:
            self._metrics.count_loss(LossReason.SYNC_BUFFER)
            dropped = self._sync_overflow.get(sync.symbol, 0)
            self._sync_overflow[sync.symbol] = dropped + 1
            if dropped == 0:
                # One line per episode; `_synced` reports how many were dropped in all.
                log.warning(
                    "sync_buffer_full",
                    extra={"fields": {"symbol": sync.symbol, "buffered": sync.buffered}},
                )
            return
        # A gap: the book was discarded, the event dropped.
        self._metrics.count_loss(LossReason.GAP)
        self._metrics.count_resync(ResyncReason.GAP)
        self.ledger.note(sync.symbol, GapReason.GAP)
        self._stale_since.pop(sync.symbol, None)
        log.warning(
            "data_loss",
            extra={
                "fields": {
                    "reason": LossReason.GAP,
                    "symbol": sync.symbol,
                    "first_update_id": event.first_update_id,
                    "last_update_id": event.last_update_id,
                    # What the gap was measured against (the book is gone by now).
                    "local_update_id": expected,
                    "missing": event.first_update_id - expected - 1
                    if expected is not None
                    else None,
                }
            },
        )

    def _resync(self, sync: BookSync, reason: ResyncReason) -> None:
        local_id = sync.last_update_id
        self._audits.pop(sync.symbol, None)
        sync.resync()
        self._metrics.count_resync(reason)
        self.ledger.note(sync.symbol, GapReason.RESYNC)
        self._stale_since.pop(sync.symbol, None)
        log.warning(
            "book_resync",
            extra={
                "fields": {"symbol": sync.symbol, "reason": reason, "local_update_id": local_id}
            },
        )

    def _synced(self, sync: BookSync) -> None:
        # The stored book of every sync: levels the events since do not touch are known only here.
        self.checkpoint(sync.symbol)
        dropped = self._sync_overflow.pop(sync.symbol, 0)
        log.info(
            "book_synced",
            extra={
                "fields": {
                    "symbol": sync.symbol,
                    "last_update_id": sync.last_update_id,
                    "sync_buffer_dropped": dropped,
                }
            },
        )

    def _record_gap(self, row: GapRow) -> None:
        symbol, first, last, _, _, reason = row
        self._writer.add_gap(row)
        # Every gap is a row; the log gets at most 10 lines a minute per reason (an overflow
        # episode of the whole market makes hundreds a second).
        held = self._gap_lines.allow(reason)
        if held is None:
            return
        log.warning(
            "data_gap",
            extra={
                "fields": {
                    "symbol": symbol,
                    "from_update_id": first,
                    "to_update_id": last,
                    "missing": last - first + 1,
                    "reason": reason,
                    "similar_not_logged": held,
                }
            },
        )

    def _reject(self, reason: LossReason, kind: ErrorKind, detail: str, raw: str | bytes) -> None:
        self._metrics.count_error(kind)
        self._metrics.count_loss(reason)
        held = self._bad_frames.allow(reason)
        if held is None:
            return
        log.warning(
            "bad_frame",
            extra={
                "fields": {
                    "reason": reason,
                    "detail": detail[:_PREVIEW_CHARS],
                    "frame": _preview(raw),
                    "similar_not_logged": held,
                }
            },
        )

    def _internal_error(self, raw: str | bytes, exc: Exception) -> str | None:
        self._metrics.count_error(ErrorKind.INTERNAL)
        self._metrics.count_loss(LossReason.INTERNAL)
        held = self._bad_frames.allow(LossReason.INTERNAL)
        if held is not None:
            log.error(
                "frame_failed",
                exc_info=exc,
                extra={"fields": {"frame": _preview(raw), "similar_not_logged": held}},
            )
        sync = self._current
        if sync is None or sync.state is not SyncState.LIVE:
            return None
        # The book being changed may be half updated: rebuild it from a snapshot.
        self._resync(sync, ResyncReason.INTERNAL)
        return sync.symbol


def _preview(raw: str | bytes) -> str:
    if isinstance(raw, bytes | bytearray | memoryview):
        return bytes(raw[:_PREVIEW_CHARS]).decode("utf-8", "replace")
    return raw[:_PREVIEW_CHARS]
