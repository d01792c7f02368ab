"""The websocket feed: the thin I/O shell around `Pipeline`.

One task reads Binance's combined diff-depth stream and hands every frame to the pipeline; REST
snapshots are fetched by short-lived tasks it owns. On any close or error it reconnects with
exponential backoff and jitter, and every book is resynced from a fresh snapshot after a reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Protocol

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidURI

from depthflow.accounting import ErrorKind, LossReason
from depthflow.config import Settings
from depthflow.events import Snapshot, decode_snapshot
from depthflow.metrics import Metrics
from depthflow.pipeline import Pipeline

__all__ = ["Feed", "FeedState", "Tap", "backoff_delays"]

log = logging.getLogger(__name__)

# Hand the loop to other tasks (HTTP routes, writer, analytics) at least this often.
_YIELD_EVERY = 32
# A connection that lived this long was healthy: the next reconnect starts the backoff afresh.
_STABLE_AFTER_S = 30.0


class Tap(Protocol):
    """Receives every frame and snapshot body as received (used by `depthflow record`)."""

    def write_frame(self, received_at: float, raw: str) -> None: ...

    def write_snapshot(self, received_at: float, symbol: str, raw: str) -> None: ...


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


class Feed:
    """Reads the stream of every configured symbol until cancelled."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        metrics: Metrics,
        http: httpx.AsyncClient,
        *,
        wait_capacity: Callable[[], Awaitable[None]] | None = None,
        tap: Tap | None = None,
    ) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._metrics = metrics
        self._http = http
        self._wait_capacity = wait_capacity
        self._tap = tap
        self._snapshot_tasks: dict[str, asyncio.Task[None]] = {}
        self.state = FeedState.DISCONNECTED
        self.connections = 0
        # Monotonic time of the last frame (or of the connect, before the first frame).
        self.last_frame_at = time.monotonic()

    async def run(self) -> None:
        """Consume the stream forever, reconnecting as needed; cancel the task to stop."""
        url = self._settings.stream_url
        closes = backoff_delays()
        try:
            async for ws in connect(
                url,
                reconnect_delays=backoff_delays,
                process_exception=self._connect_failed,
                open_timeout=10,
                close_timeout=2,
                max_size=2**22,
                # Frames queue in the library while the pipeline works; a deeper queue smooths
                # bursts (Binance sends up to 10 frames/s per symbol, the simulator far more).
                max_queue=1024,
            ):
                started = time.monotonic()
                await self._connection(ws, url)
                if time.monotonic() - started > _STABLE_AFTER_S:
                    closes = backoff_delays()
                delay = next(closes)
                log.info("feed_reconnecting", extra={"fields": {"delay_s": round(delay, 3)}})
                await asyncio.sleep(delay)
        finally:
            self.state = FeedState.DISCONNECTED
            await self._cancel_snapshots()

    async def _connection(self, ws: ClientConnection, url: str) -> None:
        """One connection's life: resync, then frames until it closes or is rotated."""
        self.connections += 1
        await self._cancel_snapshots()
        self._pipeline.reset_all()
        self.last_frame_at = time.monotonic()
        self.state = FeedState.CONNECTED
        watchdog = asyncio.create_task(self._watchdog(ws), name="depthflow-feed-watchdog")
        # Resync every book now rather than on its first event, so a quiet symbol is live too.
        for symbol in self._pipeline.symbols_needing_snapshot():
            self._request_snapshot(symbol)
        log.info("feed_connected", extra={"fields": {"url": url, "connection": self.connections}})
        try:
            rotated = await self._consume(ws)
        except ConnectionClosed as exc:
            self._metrics.count_error(ErrorKind.CONNECTION)
            log.warning(
                "feed_closed", extra={"fields": {"code": _close_code(exc), "error": str(exc)}}
            )
        else:
            if rotated:
                log.info(
                    "feed_rotating", extra={"fields": {"max_age_s": self._settings.ws_max_age_s}}
                )
                await ws.close()
            else:
                self._metrics.count_error(ErrorKind.CONNECTION)
                log.warning("feed_closed", extra={"fields": {"code": ws.close_code}})
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
                self._pipeline.reset_all(LossReason.RECONNECT)

    async def _consume(self, ws: ClientConnection) -> bool:
        """Hand frames to the pipeline; True when the connection reached its maximum age."""
        deadline = time.monotonic() + self._settings.ws_max_age_s
        pipeline = self._pipeline
        tap = self._tap
        count = 0
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
            count += 1
            if count % _YIELD_EVERY == 0:
                if self._wait_capacity is not None:
                    await self._wait_capacity()
                await asyncio.sleep(0)
                if time.monotonic() >= deadline:
                    return True
        return False

    async def _watchdog(self, ws: ClientConnection) -> None:
        """Close a connection that delivers nothing for `feed_stall_s`: the server may keep it
        open and answer pings while sending no data, and the books would silently rot."""
        stall = self._settings.feed_stall_s
        while True:
            await asyncio.sleep(min(1.0, stall / 4))
            silent = time.monotonic() - self.last_frame_at
            if silent >= stall:
                self._metrics.count_error(ErrorKind.CONNECTION)
                log.warning("feed_stalled", extra={"fields": {"silent_s": round(silent, 1)}})
                await ws.close(code=1001, reason="stalled")
                return

    @property
    def stalled(self) -> bool:
        """Connected, but nothing received for `feed_stall_s`."""
        return (
            self.state == FeedState.CONNECTED
            and time.monotonic() - self.last_frame_at >= self._settings.feed_stall_s
        )

    def _connect_failed(self, exc: Exception) -> Exception | None:
        """websockets asks whether a failed connect is worth retrying: always, but a bad URI."""
        if isinstance(exc, InvalidURI):
            return exc
        self._metrics.count_error(ErrorKind.CONNECT)
        log.warning("feed_connect_failed", extra={"fields": {"error": repr(exc)}})
        return None

    def _request_snapshot(self, symbol: str) -> None:
        task = self._snapshot_tasks.get(symbol)
        if task is not None and not task.done():
            return
        task = asyncio.create_task(self._snapshot(symbol), name=f"depthflow-snapshot-{symbol}")
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

    async def _snapshot(self, symbol: str) -> None:
        """Fetch snapshots until the book is live (or no longer wants one)."""
        delays = backoff_delays(initial=0.05, maximum=10.0)
        while self._pipeline.syncs[symbol].needs_snapshot:
            fetched = await self._fetch(symbol)
            if fetched is not None and not self._pipeline.on_snapshot(symbol, fetched):
                return
            # Binance: a snapshot older than the first buffered event means "fetch again".
            await asyncio.sleep(next(delays))

    async def _fetch(self, symbol: str) -> Snapshot | None:
        url = f"{self._settings.binance_rest_url.rstrip('/')}/api/v3/depth"
        params: dict[str, str | int] = {"symbol": symbol, "limit": self._settings.snapshot_limit}
        try:
            # One deadline for connect, headers and body: httpx's timeouts are per read, so a
            # server trickling a byte every few seconds would never trip them.
            async with asyncio.timeout(self._settings.snapshot_timeout_s):
                response = await self._http.get(url, params=params)
            response.raise_for_status()
            body = response.text
            if self._tap is not None:
                self._tap.write_snapshot(time.time(), symbol.lower(), body)
            return decode_snapshot(body)
        except (
            httpx.HTTPError,
            msgspec.DecodeError,
            msgspec.ValidationError,
            RecursionError,
            TimeoutError,
        ) as exc:
            self._metrics.count_error(ErrorKind.SNAPSHOT)
            log.warning("snapshot_failed", extra={"fields": {"symbol": symbol, "error": repr(exc)}})
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
