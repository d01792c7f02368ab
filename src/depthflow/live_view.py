"""What the live dashboard shows, kept in memory and bounded: no I/O here.

The analytics step feeds each symbol's WAP and SMA series and its signals (`LiveView.add_series`,
`add_signal`, on the event loop, once per micro-batch), the pipeline's gap rows pass through
`GapTap`. The dashboard's producer reads the service every `FRAME_INTERVAL_S` into one shared
`Snapshot` and hands it to every client's `Mailbox` through the `Hub`: a slot holding the latest
frame, not a queue, so a client that does not read costs one frame of memory and skipped frames,
never a wait on the producer's side (nor, therefore, on the ingestion's).
"""

from __future__ import annotations

import asyncio
from array import array
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np
import numpy.typing as npt

from depthflow.records import GapRow, SignalRow

if TYPE_CHECKING:
    from depthflow.pipeline import RowSink

__all__ = [
    "FRAME_INTERVAL_S",
    "LADDER_DEPTH",
    "POINTS",
    "GapTap",
    "Hub",
    "LiveView",
    "Mailbox",
    "RateMeter",
    "RateTable",
    "SeriesRing",
    "Snapshot",
    "client_frame",
    "ladder",
]

# A frame twice a second: fluid enough for a person, a few KB per client.
FRAME_INTERVAL_S = 0.5
# Chart points per symbol: 4 float64 columns are 19 KB a symbol, ~29 MB for 1,500 symbols; a
# minute at 10 ticks/s, enough to see both averages cross.
POINTS = 600
# Signal markers kept per symbol (older ones have scrolled out of a 600-point chart anyway).
MARKERS = 40
# Recent signals and gaps listed service-wide.
RECENT = 50
LADDER_DEPTH = 20

FloatArray = npt.NDArray[np.float64]
T = TypeVar("T")


class SeriesRing:
    """The last `size` points (time, WAP, short SMA, long SMA) of one symbol, in flat float arrays.

    Every point has a sequence number (the symbol's tick count when it was added), so a reader
    asks for what it has not seen yet (`since`) and learns when it fell behind the ring.
    """

    __slots__ = ("_long", "_short", "_size", "_t", "_wap", "count", "markers")

    def __init__(self, size: int = POINTS) -> None:
        if size < 1:
            raise ValueError(f"ring size must be at least 1, got {size}")
        self._size = size
        zeros = bytes(8 * size)
        self._t = array("d", zeros)
        self._wap = array("d", zeros)
        self._short = array("d", zeros)
        self._long = array("d", zeros)
        self.count = 0  # points ever added: the sequence number of the next one
        # (seq, time, "open"|"close", price) of the newest signals.
        self.markers: deque[tuple[int, float, str, float]] = deque(maxlen=MARKERS)

    @property
    def oldest(self) -> int:
        """Sequence number of the oldest point still held."""
        return max(0, self.count - self._size)

    def extend(
        self,
        times: Sequence[float],
        waps: Sequence[float],
        shorts: Sequence[float],
        longs: Sequence[float],
    ) -> int:
        """Append points, oldest first (equal lengths); returns the first one's sequence number."""
        first = self.count
        n = len(waps)
        skip = max(0, n - self._size)  # only the newest `size` could stay
        size = self._size
        slot = (first + skip) % size
        for k in range(skip, n):
            self._t[slot] = times[k]
            self._wap[slot] = waps[k]
            self._short[slot] = shorts[k]
            self._long[slot] = longs[k]
            slot += 1
            if slot == size:
                slot = 0
        self.count = first + n
        return first

    def since(self, seq: int) -> tuple[int, list[list[float]]]:
        """``(first, points)``: every point held from sequence number ``seq`` on, as
        ``[time, wap, sma_short, sma_long]`` (NaN where an SMA is not defined yet). ``first`` is
        larger than ``seq`` when the ring no longer holds what came in between."""
        first = min(max(seq, self.oldest), self.count)
        size = self._size
        t, wap, short, long = self._t, self._wap, self._short, self._long
        points = []
        for n in range(first, self.count):
            slot = n % size
            points.append([t[slot], wap[slot], short[slot], long[slot]])
        return first, points

    def last_wap(self) -> float | None:
        if self.count == 0:
            return None
        return self._wap[(self.count - 1) % self._size]


@dataclass(slots=True)
class LiveView:
    """Every symbol's chart ring, and the newest signals and data gaps of the service."""

    points: int = POINTS
    signals: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    gaps: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))
    _series: dict[str, SeriesRing] = field(default_factory=dict)

    def add_series(
        self,
        symbol: str,
        event_times: Sequence[datetime],
        waps: Sequence[float],
        sma_short: FloatArray,
        sma_long: FloatArray,
    ) -> int:
        """One micro-batch of a symbol's ticks; returns the first tick's sequence number."""
        ring = self._series.get(symbol)
        if ring is None:
            ring = self._series[symbol] = SeriesRing(self.points)
        n = len(waps)
        dropped = max(0, n - self.points)
        # Convert only what the ring can hold (a replayed batch may be thousands long); the
        # ticks left out still take their sequence numbers.
        ring.count += dropped
        ring.extend(
            [t.timestamp() for t in event_times[dropped:]],
            waps[dropped:],
            sma_short[dropped:].tolist(),
            sma_long[dropped:].tolist(),
        )
        return ring.count - n

    def add_signal(self, row: SignalRow, seq: int) -> None:
        """A signal of the tick numbered ``seq`` in its symbol's series."""
        symbol, signal, price, sma_short, sma_long, event_time, last_update_id = row
        at = event_time.timestamp()
        ring = self._series.get(symbol)
        if ring is not None:
            ring.markers.append((seq, at, signal, price))
        self.signals.appendleft(
            {
                "symbol": symbol,
                "signal": signal,
                "price": price,
                "sma_short": sma_short,
                "sma_long": sma_long,
                "time": at,
                "last_update_id": last_update_id,
            }
        )

    def add_gap(self, row: GapRow) -> None:
        symbol, first, last, from_time, to_time, reason = row
        at = to_time or from_time
        self.gaps.appendleft(
            {
                "symbol": symbol,
                "from_update_id": first,
                "to_update_id": last,
                "missing": last - first + 1,
                "reason": reason,
                "time": None if at is None else at.timestamp(),
            }
        )

    def series(self, symbol: str) -> SeriesRing | None:
        return self._series.get(symbol)

    def tick_counts(self) -> dict[str, int]:
        """Ticks seen per symbol since the start."""
        return {symbol: ring.count for symbol, ring in self._series.items()}


class GapTap:
    """The writer as the pipeline sees it, with each gap row also kept by the `LiveView`.

    Every other method is the writer's own bound method: the hot path pays no extra call.
    """

    def __init__(self, writer: RowSink, view: LiveView) -> None:
        self.add_event = writer.add_event
        self.add_checkpoint = writer.add_checkpoint
        self._add_gap = writer.add_gap
        self._view = view

    def add_gap(self, row: GapRow) -> bool:
        self._view.add_gap(row)
        return self._add_gap(row)


class RateMeter:
    """Per-second rate of a growing counter over the last `window_s`, however often sampled."""

    def __init__(self, window_s: float = 5.0) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()

    def update(self, now: float, value: float) -> float:
        samples = self._samples
        samples.append((now, value))
        # Keep one sample at least `window_s` old: the rate spans the whole window.
        while len(samples) > 2 and now - samples[1][0] >= self._window_s:
            samples.popleft()
        then, before = samples[0]
        return (value - before) / (now - then) if now > then else 0.0


class RateTable:
    """Per-second rates of many counters (ticks per symbol) over the last `window_s`."""

    def __init__(self, window_s: float = 10.0) -> None:
        self._window_s = window_s
        self._samples: deque[tuple[float, dict[str, int]]] = deque()

    def update(self, now: float, counts: Mapping[str, int]) -> dict[str, float]:
        samples = self._samples
        samples.append((now, dict(counts)))
        while len(samples) > 2 and now - samples[1][0] >= self._window_s:
            samples.popleft()
        then, before = samples[0]
        span = now - then
        if span <= 0:
            return dict.fromkeys(counts, 0.0)
        return {symbol: (n - before.get(symbol, 0)) / span for symbol, n in counts.items()}


def ladder(bids: Sequence[Sequence[float]], asks: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Levels ``[price, qty, cumulative qty]`` per side (best first), spread and mid."""
    out: dict[str, Any] = {"bids": _cumulative(bids), "asks": _cumulative(asks)}
    spread = mid = None
    if bids and asks:
        spread = asks[0][0] - bids[0][0]
        mid = (asks[0][0] + bids[0][0]) / 2
    out["spread"] = spread
    out["mid"] = mid
    out["spread_bps"] = None if spread is None or not mid else spread / mid * 10_000
    return out


def _cumulative(levels: Sequence[Sequence[float]]) -> list[list[float]]:
    total = 0.0
    rows = []
    for price, qty in levels:
        total += qty
        rows.append([price, qty, total])
    return rows


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One frame's shared part: built once, handed to every client."""

    frame: int
    at: float
    shared: Mapping[str, Any]  # service-wide figures, JSON-ready
    books: Mapping[str, Mapping[str, Any]]  # per watched symbol: state, ladder, update id


def client_frame(
    snapshot: Snapshot, view: LiveView, symbols: Iterable[str], cursors: dict[str, int]
) -> dict[str, Any]:
    """A client's frame: the snapshot with, per chosen symbol, its book and the chart points it
    has not been sent yet (``cursors`` holds the next sequence number per symbol, updated here).

    ``chart.from`` equal to what the client last got as ``chart.next`` means "append"; anything
    else (first frame, or the client fell behind the ring) means "replace your series".
    """
    books: dict[str, Any] = {}
    for symbol in symbols:
        entry: dict[str, Any] = dict(snapshot.books.get(symbol, {"symbol": symbol}))
        ring = view.series(symbol)
        if ring is not None:
            first, points = ring.since(cursors.get(symbol, 0))
            cursors[symbol] = ring.count
            entry["chart"] = {
                "from": first,
                "next": ring.count,
                "points": points,
                "markers": [list(m) for m in ring.markers if m[0] >= ring.oldest],
            }
        books[symbol] = entry
    return {"frame": snapshot.frame, "at": snapshot.at, **snapshot.shared, "books": books}


class Mailbox(Generic[T]):
    """One client's latest frame: a slot, not a queue.

    `put` never waits: a frame the client has not taken yet is replaced by the new one (and
    counted in `skipped`), so a client that stops reading holds one frame, whatever happens.
    """

    def __init__(self, symbols: Sequence[str]) -> None:
        self.symbols = tuple(symbols)
        self.skipped = 0
        self._item: T | None = None
        self._closed = False
        self._ready = asyncio.Event()

    @property
    def pending(self) -> int:
        """Frames waiting to be taken: 0 or 1."""
        return int(self._item is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T) -> None:
        if self._item is not None:
            self.skipped += 1
        self._item = item
        self._ready.set()

    def close(self) -> None:
        """No more frames: `take` returns None from now on."""
        self._closed = True
        self._ready.set()

    async def take(self) -> T | None:
        """The newest frame once there is one; None once closed."""
        while self._item is None and not self._closed:
            await self._ready.wait()
            self._ready.clear()
        if self._closed:
            return None
        item, self._item = self._item, None
        return item


class Hub(Generic[T]):
    """Every client's mailbox; `publish` puts a frame in each without ever waiting."""

    def __init__(self) -> None:
        self._boxes: set[Mailbox[T]] = set()
        self._skipped_gone = 0  # frames skipped by clients that left
        self.closed = asyncio.Event()

    @property
    def clients(self) -> int:
        return len(self._boxes)

    @property
    def skipped(self) -> int:
        """Frames replaced before their client took them, over every client so far."""
        return self._skipped_gone + sum(box.skipped for box in self._boxes)

    def subscribe(self, symbols: Sequence[str]) -> Mailbox[T]:
        box: Mailbox[T] = Mailbox(symbols)
        if self.closed.is_set():
            box.close()
        else:
            self._boxes.add(box)
        return box

    def unsubscribe(self, box: Mailbox[T]) -> None:
        if box in self._boxes:
            self._boxes.remove(box)
            self._skipped_gone += box.skipped

    def watched(self) -> set[str]:
        """The symbols some client shows."""
        return {symbol for box in self._boxes for symbol in box.symbols}

    def publish(self, item: T) -> None:
        for box in self._boxes:
            box.put(item)

    def close(self) -> None:
        """Shutdown: every client's `take` returns None, and new clients get a closed box."""
        self.closed.set()
        for box in self._boxes:
            box.close()
