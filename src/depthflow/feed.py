"""The websocket feed: the thin I/O shell around `Pipeline`, sharded over connections.

Binance allows 1024 streams per connection and 300 connection attempts per 5 minutes per IP, so
the symbols are split into shards of at most `STREAMS_PER_CONNECTION` streams, one connection
each, named in its URL (~5 KB for 200 streams, under the ~8 KB that servers accept; no SUBSCRIBE
messages to pace under Binance's 5 per second). Each shard reconnects with its own backoff and
jitter, every attempt of every shard goes through one `ConnectPacer`, and a shard that drops
resyncs its own books only. Snapshots go through one `SnapshotSource` (the REST scheduler) that
keeps the whole process inside Binance's request weight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Final, Protocol

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from depthflow.accounting import ErrorKind, LossReason, SnapshotReason
from depthflow.config import Settings
from depthflow.errors import offline_hint, unresolved_host
from depthflow.events import Snapshot, decode_snapshot
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline
from depthflow.timeslice import TimeSlice

__all__ = [
    "ConnectPacer",
    "Feed",
    "FeedState",
    "Shard",
    "SnapshotSource",
    "Tap",
    "backoff_delays",
    "display_url",
    "shard_symbols",
]

log = logging.getLogger(__name__)

# Events of one catch-up replayed before it starts waiting for the writer (~20 levels each).
_REPLAY_BACKPRESSURE_AFTER = 2_000

# A connection that lived this long was healthy: the next reconnect starts the backoff afresh.
_STABLE_AFTER_S = 30.0
# Both connections are read this long during a rotation: every symbol's next event (10 per
# second on a busy stream) arrives on the new one meanwhile.
_ROTATION_OVERLAP_S = 3.0
_CONNECT_OPTIONS: Final[dict[str, Any]] = {
    "open_timeout": 10,
    "close_timeout": 2,
    "max_size": 2**22,
    # Frames queue in the library while the pipeline works; a deeper queue smooths bursts
    # (Binance sends up to 10 frames/s per symbol, the simulator far more).
    "max_queue": 1024,
}


class Tap(Protocol):
    """Receives every frame and snapshot body as received (used by `depthflow record`)."""

    def write_frame(self, received_at: float, raw: str) -> None: ...

    def write_snapshot(self, received_at: float, symbol: str, raw: str) -> None: ...


class SnapshotSource(Protocol):
    """Where snapshot bodies come from (the REST scheduler); raises when none can be had."""

    async def depth(self, symbol: str, limit: int, reason: SnapshotReason) -> str: ...


class FeedState:
    DISCONNECTED = "disconnected"
    CONNECTED = "connected"


def backoff_delays(
    initial: float = 0.1, maximum: float = 30.0, factor: float = 2.0
) -> Generator[float]:
    """Exponential backoff with full jitter: uniform(0, min(maximum, initial * factor**n))."""
    ceiling = initial
    while True:
        yield random.uniform(0.0, ceiling)
        ceiling = min(maximum, ceiling * factor)


def display_url(url: str) -> str:
    """``url`` for a log line: a combined-stream URL naming many streams (~5 KB for 200) keeps
    its first stream and the count of the others."""
    base, sep, query = url.partition("?streams=")
    streams = query.split("/") if sep else []
    if len(streams) <= 2:
        return url
    return f"{base}?streams={streams[0]}/...(+{len(streams) - 1} more)"


def shard_symbols(symbols: Sequence[str], per_connection: int) -> list[list[str]]:
    """Split ``symbols`` (in order) into shards of at most ``per_connection``."""
    return [list(symbols[i : i + per_connection]) for i in range(0, len(symbols), per_connection)]


class ConnectPacer:
    """Spaces connection attempts of every shard at least ``interval_s`` apart (Binance: 300
    attempts per 5 minutes per IP), so a mass reconnect cannot get the IP banned."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._next = 0.0

    def reserve(self) -> float:
        """Book the next free slot; the seconds to wait for it."""
        now = self._clock()
        slot = max(now, self._next)
        self._next = slot + self._interval_s
        return slot - now

    def paced(self, delays: Generator[float]) -> Generator[float]:
        """``delays`` stretched so that every attempt also waits for its slot."""
        for delay in delays:
            yield max(delay, self.reserve())


class Feed:
    """Every shard of the stream; runs until cancelled. A shard that fails takes the whole feed
    down with it (a bug, not a network problem): the service's supervisor restarts the feed."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        metrics: Metrics,
        snapshots: SnapshotSource,
        *,
        symbols: Sequence[str] | None = None,
        wait_capacity: Callable[[], Awaitable[None]] | None = None,
        tap: Tap | None = None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._metrics = metrics
        self._snapshots = snapshots
        self._wait_capacity = wait_capacity
        self._tap = tap
        self._pacer = ConnectPacer(settings.connect_interval_s)
        # One time slice for every connection and snapshot replay: a loop turn then runs about
        # one slice of frames in all, not one per connection (eight shards, 16 ms, ahead of
        # each step of every HTTP request: /health p99 over 100 ms on the whole market).
        self._timeslice = TimeSlice()
        # An empty list is a real answer (only patterns, resolved later), not "use the settings".
        chosen = settings.symbols if symbols is None else symbols
        self._symbols: list[str] = [s.upper() for s in chosen]
        self.shards: list[Shard] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        # Seconds from a shard's connect to each of its books going live (the latest sync).
        self.time_to_live: dict[str, float] = {}

    # -- state -------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """Connected when every shard is."""
        if self.shards and all(s.state == FeedState.CONNECTED for s in self.shards):
            return FeedState.CONNECTED
        return FeedState.DISCONNECTED

    @property
    def stalled(self) -> bool:
        """A connected shard has received nothing for `FEED_STALL_S`."""
        return any(shard.stalled for shard in self.shards)

    @property
    def connections(self) -> int:
        """Connections opened so far, over all shards."""
        return sum(shard.connections for shard in self.shards)

    def shard_states(self) -> dict[str, str]:
        return {str(shard.index): shard.state for shard in self.shards}

    # -- life --------------------------------------------------------------------------------------

    async def run(self) -> None:
        self.shards = []
        self._tasks = {}
        async with asyncio.TaskGroup() as group:
            self._group = group
            try:
                for symbols in shard_symbols(self._symbols, self._settings.streams_per_connection):
                    self._start_shard(symbols)
                await asyncio.Event().wait()
            finally:
                self._group = None

    def add_symbols(self, symbols: Sequence[str]) -> None:
        """New listings: into the last shard while it has room (it reconnects with the longer
        URL, resyncing its books), else into new shards."""
        new = [s.upper() for s in symbols if s.upper() not in self._symbols]
        if not new:
            return
        self._symbols.extend(new)
        if self._group is None:
            return
        per = self._settings.streams_per_connection
        last = self.shards[-1] if self.shards else None
        if last is not None and len(last.symbols) < per:
            room = per - len(last.symbols)
            joined, new = new[:room], new[room:]
            self._restart_shard(last, [*last.symbols, *joined])
        for symbols in shard_symbols(new, per):
            self._start_shard(symbols)

    def remove_symbols(self, symbols: Sequence[str]) -> None:
        """Delisted: no longer ours. Their streams stay subscribed until the shard's next
        reconnect (a delisted symbol sends nothing), so no other book pays a resync."""
        gone = {s.upper() for s in symbols}
        self._symbols = [s for s in self._symbols if s not in gone]
        for shard in self.shards:
            shard.forget(gone)

    def _start_shard(self, symbols: list[str]) -> None:
        assert self._group is not None
        shard = Shard(
            len(self.shards),
            symbols,
            self._settings,
            self._pipeline,
            self._metrics,
            self._snapshots,
            self._pacer,
            time_to_live=self.time_to_live,
            wait_capacity=self._wait_capacity,
            tap=self._tap,
            timeslice=self._timeslice,
        )
        self.shards.append(shard)
        self._tasks[shard.index] = self._group.create_task(
            shard.run(), name=f"depthflow-shard-{shard.index}"
        )

    def _restart_shard(self, shard: Shard, symbols: list[str]) -> None:
        assert self._group is not None
        self._tasks[shard.index].cancel()
        shard.symbols = symbols
        self._tasks[shard.index] = self._group.create_task(
            shard.run(), name=f"depthflow-shard-{shard.index}"
        )


class Shard:
    """One connection's worth of symbols: connect, resync its books, hand frames on, repeat."""

    def __init__(
        self,
        index: int,
        symbols: list[str],
        settings: Settings,
        pipeline: Pipeline,
        metrics: Metrics,
        snapshots: SnapshotSource,
        pacer: ConnectPacer,
        *,
        time_to_live: dict[str, float],
        wait_capacity: Callable[[], Awaitable[None]] | None = None,
        tap: Tap | None = None,
        timeslice: TimeSlice | None = None,
    ) -> None:
        self.index = index
        self.symbols = symbols
        self._settings = settings
        self._pipeline = pipeline
        self._metrics = metrics
        self._snapshots = snapshots
        self._pacer = pacer
        self._time_to_live = time_to_live
        self._wait_capacity = wait_capacity
        self._tap = tap
        # The feed's one slice, shared by its shards (see `Feed`); its own when run alone.
        self._timeslice = timeslice if timeslice is not None else TimeSlice()
        self._snapshot_tasks: dict[str, asyncio.Task[None]] = {}
        self._live_once: set[str] = set()  # synced at least once on this connection
        self._connected_at = time.monotonic()
        self.state = FeedState.DISCONNECTED
        self.connections = 0
        self._ws: ClientConnection | None = None
        self._dialing = ""  # the URL the connect loop uses
        # Monotonic time of the last frame (or of the connect, before the first frame).
        self.last_frame_at = time.monotonic()

    @property
    def url(self) -> str:
        return self._settings.stream_url(self.symbols)

    @property
    def stalled(self) -> bool:
        """Connected, but nothing received for `feed_stall_s`."""
        return (
            self.state == FeedState.CONNECTED
            and time.monotonic() - self.last_frame_at >= self._settings.feed_stall_s
        )

    def forget(self, symbols: set[str]) -> None:
        self.symbols = [s for s in self.symbols if s not in symbols]
        for symbol in symbols:
            task = self._snapshot_tasks.pop(symbol, None)
            if task is not None:
                task.cancel()

    async def run(self) -> None:
        """Consume this shard's streams forever, reconnecting as needed; cancel to stop.

        The URL names the shard's streams: when they change (a delisting), the connect loop is
        left and entered again with the new URL rather than retrying the old one forever.
        """
        await asyncio.sleep(self._pacer.reserve())
        try:
            while True:
                self._dialing = self.url
                try:
                    await self._connect_loop(self._dialing)
                except (OSError, TimeoutError, InvalidHandshake):
                    if self.url == self._dialing:
                        raise
                    log.info("feed_streams_changed", extra={"fields": {"shard": self.index}})
        finally:
            self.state = FeedState.DISCONNECTED
            await self._cancel_snapshots()

    async def _connect_loop(self, url: str) -> None:
        closes = backoff_delays()
        async for ws in connect(
            url,
            reconnect_delays=lambda: self._pacer.paced(backoff_delays()),
            process_exception=self._connect_failed,
            **_CONNECT_OPTIONS,
        ):
            started = time.monotonic()
            await self._connection(ws)
            if time.monotonic() - started > _STABLE_AFTER_S:
                closes = backoff_delays()
            delay = max(next(closes), self._pacer.reserve())
            log.info(
                "feed_reconnecting",
                extra={"fields": {"shard": self.index, "delay_s": round(delay, 3)}},
            )
            await asyncio.sleep(delay)
            if self.url != url:
                return

    async def _connection(self, ws: ClientConnection) -> None:
        """One connection's life: resync, then frames until it closes. At its maximum age it is
        replaced without a resync (`_rotate`), and the replacement's life goes on here."""
        self.connections += 1
        await self._cancel_snapshots()
        self._pipeline.reset(self._own_symbols())
        self._live_once.clear()
        self._connected_at = self.last_frame_at = time.monotonic()
        self.state = FeedState.CONNECTED
        self._ws = ws
        watchdog = asyncio.create_task(self._watchdog(), name=f"depthflow-watchdog-{self.index}")
        # Resync every book now rather than on its first event, so a quiet symbol is live too.
        for symbol in self._own_symbols():
            self._request_snapshot(symbol)
        log.info(
            "feed_connected",
            extra={
                "fields": {
                    "shard": self.index,
                    "streams": len(self.symbols),
                    "connection": self.connections,
                }
            },
        )
        try:
            while await self._consume(self._ws, self._settings.ws_max_age_s):
                replacement = await self._rotate(self._ws)
                if replacement is None:
                    await self._ws.close()
                    return
                self._ws = replacement
            self._metrics.count_error(ErrorKind.CONNECTION)
            log.warning(
                "feed_closed",
                extra={
                    "fields": {
                        "shard": self.index,
                        "url": display_url(self.url),
                        "code": self._ws.close_code,
                    }
                },
            )
        except ConnectionClosed as exc:
            self._metrics.count_error(ErrorKind.CONNECTION)
            log.warning(
                "feed_closed",
                extra={
                    "fields": {
                        "shard": self.index,
                        "url": display_url(self.url),
                        "code": _close_code(exc),
                        "error": str(exc),
                    }
                },
            )
        finally:
            watchdog.cancel()
            await asyncio.wait([watchdog])
            # Not live from the moment the stream stops: /health, /ready and /book say so now,
            # not at the next connect.
            self.state = FeedState.DISCONNECTED
            await self._cancel_snapshots()
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                # (When the service stops us, it counts what was buffered as `shutdown`.)
                self._pipeline.reset(self._own_symbols(), LossReason.RECONNECT)

    async def _rotate(self, old: ClientConnection) -> ClientConnection | None:
        """Replace ``old`` before Binance's 24 h cut without a hole or a snapshot: open the new
        connection first, read both for `_ROTATION_OVERLAP_S` (each event is applied once,
        whichever connection brings it first; one ahead of the book waits for the other), then
        close the old one. None if the new one cannot be opened: the caller reconnects."""
        await asyncio.sleep(self._pacer.reserve())
        try:
            new = await connect(self.url, **_CONNECT_OPTIONS)
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            self._metrics.count_error(ErrorKind.CONNECT)
            log.warning(
                "feed_rotation_failed",
                extra={
                    "fields": {
                        "shard": self.index,
                        "url": display_url(self.url),
                        "error": repr(exc),
                    }
                },
            )
            return None
        self.connections += 1
        symbols = self._own_symbols()
        self._pipeline.begin_overlap(symbols)
        old_reader = asyncio.create_task(self._consume(old, math.inf))
        replacement: ClientConnection | None = new
        try:
            async with asyncio.timeout(_ROTATION_OVERLAP_S):
                await self._consume(new, math.inf)
            replacement = None  # it closed during the overlap
        except TimeoutError:
            pass  # the overlap is over: the new connection takes over
        except ConnectionClosed:
            replacement = None
        finally:
            old_reader.cancel()
            await asyncio.wait([old_reader])
            if not old_reader.cancelled() and old_reader.exception() is not None:
                log.info(
                    "feed_old_connection_closed_early",
                    extra={"fields": {"shard": self.index, "error": repr(old_reader.exception())}},
                )
            await old.close()
            if replacement is None:
                # The replacement died during the overlap: the caller reconnects and resyncs.
                await new.close()
            for symbol in self._pipeline.end_overlap(symbols):
                self._request_snapshot(symbol)
        log.info(
            "feed_rotated",
            extra={
                "fields": {
                    "shard": self.index,
                    "ok": replacement is not None,
                    "streams": len(symbols),
                }
            },
        )
        return replacement

    def _own_symbols(self) -> list[str]:
        """This shard's symbols the pipeline still has (a delisted one may be gone)."""
        return [s for s in self.symbols if self._pipeline.book(s) is not None]

    async def _consume(self, ws: ClientConnection, max_age_s: float) -> bool:
        """Hand frames to the pipeline; True once ``max_age_s`` have passed, False when the
        connection closed cleanly."""
        deadline = time.monotonic() + max_age_s
        pipeline = self._pipeline
        tap = self._tap
        timeslice = self._timeslice
        async for raw in ws:
            received_at = time.time()
            self.last_frame_at = time.monotonic()
            if tap is not None:
                tap.write_frame(
                    received_at, raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
                )
            wants = pipeline.on_frame(raw, received_at)
            if wants is not None:
                self._request_snapshot(wants)
            if timeslice.due():
                if self._wait_capacity is not None:
                    await self._wait_capacity()
                await timeslice.pause()
                if time.monotonic() >= deadline:
                    return True
        return False

    async def _watchdog(self) -> None:
        """Close a connection that delivers nothing for `feed_stall_s`: the server may keep it
        open and answer pings while sending no data, and the books would silently rot."""
        stall = self._settings.feed_stall_s
        while True:
            await asyncio.sleep(min(1.0, stall / 4))
            silent = time.monotonic() - self.last_frame_at
            if silent >= stall:
                self._metrics.count_error(ErrorKind.CONNECTION)
                log.warning(
                    "feed_stalled",
                    extra={
                        "fields": {
                            "shard": self.index,
                            "url": display_url(self.url),
                            "silent_s": round(silent, 1),
                        }
                    },
                )
                if self._ws is not None:
                    await self._ws.close(code=1001, reason="stalled")
                return

    def _connect_failed(self, exc: Exception) -> Exception | None:
        """websockets asks whether a failed connect is worth retrying: always, but a bad URI."""
        if isinstance(exc, InvalidURI):
            return exc
        if self.url != self._dialing:
            return exc  # the streams changed: `run` dials the new URL
        self._metrics.count_error(ErrorKind.CONNECT)
        fields: dict[str, object] = {
            "shard": self.index,
            "url": display_url(self._dialing),
            "error": repr(exc),
        }
        if unresolved_host(exc):
            fields["hint"] = offline_hint(self._dialing)
        log.warning("feed_connect_failed", extra={"fields": fields})
        return None

    # -- snapshots ---------------------------------------------------------------------------------

    def _request_snapshot(self, symbol: str) -> None:
        task = self._snapshot_tasks.get(symbol)
        if task is not None and not task.done():
            return
        reason = SnapshotReason.RESYNC if symbol in self._live_once else SnapshotReason.SYNC
        task = asyncio.create_task(
            self._snapshot(symbol, reason), name=f"depthflow-snapshot-{symbol}"
        )
        task.add_done_callback(self._snapshot_done)
        self._snapshot_tasks[symbol] = task

    def _snapshot_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        # A bug, not a network problem: say so loudly; the next buffered event asks again.
        self._metrics.count_error(ErrorKind.SNAPSHOT)
        log.error(
            "snapshot_task_failed",
            exc_info=task.exception(),
            extra={"fields": {"task": task.get_name()}},
        )

    async def _snapshot(self, symbol: str, reason: SnapshotReason) -> None:
        """Fetch snapshots until the book is live (or no longer wants one)."""
        delays = backoff_delays(initial=0.05, maximum=10.0)
        while (sync := self._pipeline.book(symbol)) is not None and sync.needs_snapshot:
            fetched = await self._fetch(symbol, reason)
            if fetched is not None and not await self._load(symbol, fetched):
                self._live_once.add(symbol)
                self._time_to_live[symbol] = time.monotonic() - self._connected_at
                return
            # Binance: a snapshot older than the first buffered event means "fetch again".
            await asyncio.sleep(next(delays))

    async def _load(self, symbol: str, snapshot: Snapshot) -> bool:
        """Load a snapshot, replaying the sync buffer in time slices; True while the book
        still needs a snapshot."""
        timeslice = self._timeslice
        for handled in self._pipeline.load_snapshot(symbol, snapshot):
            if timeslice.due():
                # A long replay makes rows far faster than the writer stores them: past a
                # few thousand events it waits for the writer like live frames do, or a big
                # buffer would overflow the writer's. A short one (the usual sync, thousands
                # of books at start-up) goes live without waiting on rows of other books.
                if handled >= _REPLAY_BACKPRESSURE_AFTER and self._wait_capacity is not None:
                    await self._wait_capacity()
                await timeslice.pause()
        sync = self._pipeline.book(symbol)
        return sync is not None and sync.needs_snapshot

    async def _fetch(self, symbol: str, reason: SnapshotReason) -> Snapshot | None:
        try:
            body = await self._snapshots.depth(symbol, self._settings.snapshot_limit, reason)
            if self._tap is not None:
                self._tap.write_snapshot(time.time(), symbol.lower(), body)
            return decode_snapshot(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            error: Exception = exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The source's own failures (HTTP status, timeout, throttled): all mean "not now".
            error = exc
        self._metrics.count_error(ErrorKind.SNAPSHOT)
        rest_url = self._settings.binance_rest_url
        fields: dict[str, object] = {"symbol": symbol, "url": rest_url, "error": repr(error)}
        if unresolved_host(error):
            fields["hint"] = offline_hint(rest_url)
        log.warning("snapshot_failed", extra={"fields": fields})
        return None

    async def _cancel_snapshots(self) -> None:
        tasks = [t for t in self._snapshot_tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # wait(), not `await task`: a CancelledError of our own caller must still propagate.
            await asyncio.wait(tasks)
        self._snapshot_tasks.clear()


def _close_code(exc: ConnectionClosed) -> int | None:
    return exc.rcvd.code if exc.rcvd is not None else None
