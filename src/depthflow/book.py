"""Sans-I/O local order book per symbol, kept in sync with Binance's spot diff-depth procedure.

`OrderBook` holds price levels; `BookSync` runs the sync state machine (buffer events, take a
snapshot, replay the buffer, then apply live events) and returns an `Outcome` for every event so
the feed, the thin I/O shell around it, decides what to count, write and fetch.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Iterator
from heapq import heapify, heappop, heappush, nlargest, nsmallest

from depthflow.events import DepthEvent, Snapshot

__all__ = ["BookSync", "OrderBook", "Outcome", "SyncState"]

Levels = Iterable[tuple[float, float]]

# Removed prices stay in the lazy heaps until they surface; rebuilding once a heap outgrows its
# dict by this much keeps memory bounded at an amortised O(1) cost per insertion.
_HEAP_GROWTH = 4
_HEAP_SLACK = 64


def _set_levels(
    levels: dict[float, float], heap: list[float], updates: Levels, sign: float
) -> None:
    """Set each level of one side (qty 0 removes it); `heap` holds ``sign * price``."""
    for price, qty in updates:
        if qty:
            # Only a new price needs a heap entry; a quantity change keeps the one it has.
            if price not in levels:
                heappush(heap, sign * price)
            levels[price] = qty
        else:
            # Binance may remove a level we never had; that is normal, not an error.
            levels.pop(price, None)
    if len(heap) > _HEAP_GROWTH * len(levels) + _HEAP_SLACK:
        _rebuild(levels, heap, sign)


def _rebuild(levels: dict[float, float], heap: list[float], sign: float) -> None:
    heap[:] = [sign * price for price in levels]
    heapify(heap)


def _best(levels: dict[float, float], heap: list[float], sign: float) -> tuple[float, float] | None:
    """Best level of one side, discarding heap entries of removed prices on the way."""
    while heap:
        price = sign * heap[0]
        qty = levels.get(price)
        if qty is not None:
            return price, qty
        heappop(heap)
    return None


class OrderBook:
    """Price levels of one symbol.

    `best_bid`/`best_ask` are O(log n) amortised through lazy heaps (bids negated); `top` is
    O(n log depth) and meant for occasional reads, not per event.
    """

    __slots__ = ("_ask_heap", "_bid_heap", "asks", "bids")

    def __init__(self) -> None:
        self.bids: dict[float, float] = {}
        self.asks: dict[float, float] = {}
        self._bid_heap: list[float] = []
        self._ask_heap: list[float] = []

    def __len__(self) -> int:
        """Number of price levels on both sides."""
        return len(self.bids) + len(self.asks)

    def load(self, bids: Levels, asks: Levels) -> None:
        """Replace the contents (a snapshot); levels with qty 0 are skipped."""
        self.bids.clear()
        self.asks.clear()
        self.bids.update((price, qty) for price, qty in bids if qty)
        self.asks.update((price, qty) for price, qty in asks if qty)
        _rebuild(self.bids, self._bid_heap, -1.0)
        _rebuild(self.asks, self._ask_heap, 1.0)

    def apply(self, bids: Levels, asks: Levels) -> None:
        """Set each level to its new quantity; qty 0 removes the level."""
        _set_levels(self.bids, self._bid_heap, bids, -1.0)
        _set_levels(self.asks, self._ask_heap, asks, 1.0)

    def best_bid(self) -> tuple[float, float] | None:
        """Highest bid as ``(price, qty)``, or None if there are no bids."""
        return _best(self.bids, self._bid_heap, -1.0)

    def best_ask(self) -> tuple[float, float] | None:
        """Lowest ask as ``(price, qty)``, or None if there are no asks."""
        return _best(self.asks, self._ask_heap, 1.0)

    def top(self, depth: int) -> tuple[list[list[float]], list[list[float]]]:
        """Up to `depth` levels per side, ``[[price, qty], ...]`` best first (bids descending)."""
        if depth <= 0:
            return [], []
        bids, asks = self.bids, self.asks
        return (
            [[price, bids[price]] for price in nlargest(depth, bids)],
            [[price, asks[price]] for price in nsmallest(depth, asks)],
        )

    def clear(self) -> None:
        """Remove every level."""
        self.bids.clear()
        self.asks.clear()
        self._bid_heap.clear()
        self._ask_heap.clear()


class Outcome(enum.Enum):
    """What `BookSync` did with one event."""

    APPLIED = "applied"  # levels set; the book reflects this event
    BUFFERED = "buffered"  # kept until a snapshot arrives
    STALE = "stale"  # already in the book (u <= local id); ignored
    GAP = "gap"  # update ids skipped: book discarded, event dropped, resync needed
    OVERFLOW = "overflow"  # buffer full: event dropped


class SyncState(enum.Enum):
    WAITING = "waiting"  # no book and no buffered event (start, after reset or a gap)
    BUFFERING = "buffering"  # events buffered; a snapshot is needed
    LIVE = "live"  # book in sync; events are applied as they come


class BookSync:
    """Binance spot local-book sync for one symbol, fed events and snapshots; does no I/O.

    Call `on_event` for every depth event of the symbol (checking the symbol is the caller's job).
    When `needs_snapshot` is True, fetch a snapshot and pass it to `on_snapshot`.
    """

    __slots__ = (
        "_buffer",
        "_generation",
        "_local_id",
        "_max_buffer",
        "_replaying",
        "book",
        "state",
        "symbol",
    )

    def __init__(self, symbol: str, *, max_buffer: int = 100_000) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, got {max_buffer}")
        self.symbol = symbol
        self.book = OrderBook()
        self.state = SyncState.WAITING
        self._max_buffer = max_buffer
        self._buffer: deque[DepthEvent] = deque()
        self._local_id = -1
        # Bumped whenever the book is loaded or discarded, so a replay left unfinished stops
        # instead of applying old events to a newer book.
        self._generation = 0
        # Loaded from a snapshot, the buffer not yet replayed: events queue behind the replay.
        self._replaying = False

    @property
    def last_update_id(self) -> int | None:
        """The local book's update id while LIVE (caught up or not, see `live`), else None."""
        return self._local_id if self.state is SyncState.LIVE else None

    @property
    def live(self) -> bool:
        """In sync with the exchange: LIVE, and the replay of the buffer (if any) finished."""
        return self.state is SyncState.LIVE and not self._replaying

    @property
    def catching_up(self) -> bool:
        """LIVE, but still replaying the events buffered before the snapshot."""
        return self._replaying

    @property
    def needs_snapshot(self) -> bool:
        """True until the book is live: a snapshot must be fetched."""
        return self.state is not SyncState.LIVE

    @property
    def first_buffered_id(self) -> int | None:
        """``U`` of the oldest buffered event, or None if the buffer is empty."""
        return self._buffer[0].first_update_id if self._buffer else None

    @property
    def buffered(self) -> int:
        """Number of buffered events."""
        return len(self._buffer)

    @property
    def last_buffered(self) -> DepthEvent | None:
        """The newest buffered event, or None if the buffer is empty."""
        return self._buffer[-1] if self._buffer else None

    def on_event(self, event: DepthEvent) -> Outcome:
        """Apply (LIVE) or buffer one event and say what happened.

        On GAP the book is discarded and the event dropped; the state becomes WAITING, so the
        next event is buffered and asks for a new snapshot.
        """
        if self.state is SyncState.LIVE and not self._replaying:
            return self._apply_live(event)
        if len(self._buffer) >= self._max_buffer:
            return Outcome.OVERFLOW
        self._buffer.append(event)
        if not self._replaying:
            self.state = SyncState.BUFFERING
        return Outcome.BUFFERED

    def on_snapshot(self, snapshot: Snapshot) -> Iterator[tuple[DepthEvent, Outcome]]:
        """Load `snapshot` and replay the buffer, yielding ``(event, outcome)`` per buffered event.

        The book is loaded when this is called; at each yield it reflects exactly the events
        handled so far. Yields nothing, and changes nothing, when LIVE (a late snapshot) or if
        the snapshot is older than the first buffered event (`needs_snapshot` stays True: fetch
        again). In WAITING (nothing buffered yet, e.g. right after a gap or a reconnect) the book
        is loaded and goes live at once: the next event is then checked by the live rules, which
        is Binance's first-event check, so a stream that pauses after a gap still resyncs.

        The replay may pause between items (a caller yielding to its event loop): events fed
        meanwhile are buffered behind it and replayed by the same iterator, and `live` turns
        True only when the buffer is empty. Exhaust the iterator: until then the book is
        `catching_up`. A `resync` or `reset` during the replay ends it; what is still buffered
        then waits for the next snapshot.
        """
        if self.state is SyncState.LIVE or (
            self.state is SyncState.BUFFERING
            and snapshot.last_update_id < self._buffer[0].first_update_id
        ):
            return iter(())
        self.book.load(snapshot.bids, snapshot.asks)
        self._local_id = snapshot.last_update_id
        self.state = SyncState.LIVE
        self._generation += 1
        self._replaying = bool(self._buffer)
        return self._replay(snapshot.last_update_id, self._generation)

    def reset(self) -> int:
        """Discard the book and the buffer (e.g. after a reconnect); return the events discarded."""
        discarded = len(self._buffer)
        self._buffer.clear()
        self._discard()
        return discarded

    def resync(self) -> None:
        """Discard the book but keep what is buffered (a crossed or stale book): the next
        snapshot rebuilds it. An unfinished replay puts its remaining events back first."""
        self._discard()

    def is_crossed(self) -> bool:
        """Best bid at or above best ask: no exchange book looks like that."""
        bid = self.book.best_bid()
        ask = self.book.best_ask()
        return bid is not None and ask is not None and bid[0] >= ask[0]

    def _apply_live(self, event: DepthEvent) -> Outcome:
        local_id = self._local_id
        # Binance's text says `u < local id`; an event with u == local id holds nothing new and
        # applying it twice would store a duplicate tick.
        if event.last_update_id <= local_id:
            return Outcome.STALE
        if event.first_update_id > local_id + 1:
            self._discard()
            return Outcome.GAP
        self.book.apply(event.bids, event.asks)
        self._local_id = event.last_update_id
        return Outcome.APPLIED

    def _replay(self, snapshot_id: int, generation: int) -> Iterator[tuple[DepthEvent, Outcome]]:
        buffer = self._buffer
        try:
            # A resync or reset bumps the generation (and ends the replay, `_discard`): the rest
            # stays buffered, in order, for the next snapshot.
            while buffer and self._generation == generation:
                event = buffer.popleft()
                # Binance: drop buffered events with u <= lastUpdateId; the snapshot has them.
                if event.last_update_id <= snapshot_id:
                    yield event, Outcome.STALE
                    continue
                # A GAP discards the book (`_discard`); the events after it wait for the next
                # snapshot, ahead of any newer ones.
                outcome = self._apply_live(event)
                yield event, outcome
                if outcome is Outcome.GAP:
                    return
        finally:
            if self._generation == generation:
                if buffer:
                    # Abandoned half way: the book is behind its buffer, so it is not live.
                    self._discard()
                else:
                    self._replaying = False

    def _discard(self) -> None:
        """Drop the book; whatever is still buffered waits for the next snapshot."""
        self.book.clear()
        self._local_id = -1
        self._generation += 1
        self._replaying = False
        self.state = SyncState.BUFFERING if self._buffer else SyncState.WAITING
