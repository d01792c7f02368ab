"""The simulator's websocket subscribers: who gets which frame, and the faults injected on sends.

Every send is awaited in turn, so a slow client slows the pump calling `Connections.broadcast`
(backpressure) instead of frames piling up in memory.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from depthflow.simulate.frames import Frame, malformed_frame, now_ms
from depthflow.simulate.routes import Subscription

__all__ = ["Connections", "Subscriber"]

_DISCONNECT_CODE = 1001  # "going away", as a server restart would close it


@dataclass(eq=False)
class Subscriber:
    """One websocket connection and the streams it asked for (symbol -> stream name)."""

    connection: ServerConnection
    combined: bool
    streams: dict[str, str]
    sent: int = 0
    malformed_sent: int = 0
    kicked: bool = False


class Connections:
    """The open subscriptions; sends frames to them, injecting malformed frames and disconnects.

    ``malformed_every``: after every n-th frame to a connection, send it a malformed one too;
    ``disconnect_every``: close a connection once it got n frames. 0 disables each.
    """

    def __init__(self, *, disconnect_every: int = 0, malformed_every: int = 0) -> None:
        self._disconnect_every = disconnect_every
        self._malformed_every = malformed_every
        self.frames_sent = 0
        self.malformed_sent = 0
        self._subscribers: set[Subscriber] = set()
        self._targets: dict[str, tuple[Subscriber, ...]] = {}
        self._all_targets: tuple[Subscriber, ...] = ()
        self._has_subscribers = asyncio.Event()
        self._closers: set[asyncio.Task[None]] = set()

    async def wait_for_subscriber(self) -> None:
        """Return once at least one connection is subscribed."""
        await self._has_subscribers.wait()

    async def wait_closed(self) -> None:
        """Wait for the server-side closes of kicked connections to finish."""
        if self._closers:
            await asyncio.gather(*self._closers, return_exceptions=True)

    # -- membership -----------------------------------------------------------------------------

    def add(self, connection: ServerConnection, subscription: Subscription) -> Subscriber:
        """Start sending ``subscription``'s streams to ``connection``."""
        subscriber = Subscriber(connection, subscription.combined, subscription.streams)
        self._subscribers.add(subscriber)
        self._retarget()
        return subscriber

    def discard(self, subscriber: Subscriber) -> None:
        """Stop sending to ``subscriber`` (no-op if already gone)."""
        if subscriber in self._subscribers:
            self._subscribers.discard(subscriber)
            self._retarget()

    def _retarget(self) -> None:
        """Rebuild the per-symbol send lists, so the hot path iterates a ready tuple."""
        targets: dict[str, list[Subscriber]] = {}
        for subscriber in self._subscribers:
            for symbol in subscriber.streams:
                targets.setdefault(symbol, []).append(subscriber)
        self._targets = {symbol: tuple(subs) for symbol, subs in targets.items()}
        self._all_targets = tuple(self._subscribers)
        if self._subscribers:
            self._has_subscribers.set()
        else:
            self._has_subscribers.clear()

    # -- sending --------------------------------------------------------------------------------

    async def broadcast(self, frame: Frame) -> None:
        """Send ``frame`` to every connection subscribed to its symbol (all, if it names none)."""
        symbol = frame.symbol
        targets = self._all_targets if symbol is None else self._targets.get(symbol, ())
        for subscriber in targets:
            await self._send(subscriber, frame)

    async def _send(self, subscriber: Subscriber, frame: Frame) -> None:
        if subscriber.kicked:
            return
        stream = subscriber.streams.get(frame.symbol or "", "") if subscriber.combined else None
        connection = subscriber.connection
        try:
            await connection.send(frame.text(stream))
            subscriber.sent += 1
            self.frames_sent += 1
            every = self._malformed_every
            if every and subscriber.sent % every == 0:
                await connection.send(self._malformed(subscriber, frame, stream))
                self.malformed_sent += 1
        except ConnectionClosed:
            self.discard(subscriber)
            return
        limit = self._disconnect_every
        if limit and subscriber.sent >= limit:
            self._kick(subscriber)

    def _malformed(self, subscriber: Subscriber, frame: Frame, stream: str | None) -> str:
        symbol = frame.symbol or next(iter(subscriber.streams), "btcusdt")
        kind = subscriber.malformed_sent
        subscriber.malformed_sent += 1
        return malformed_frame(kind, symbol, stream or None, now_ms())

    def _kick(self, subscriber: Subscriber) -> None:
        """Close a connection from the server side without blocking the pump on the handshake."""
        subscriber.kicked = True
        self.discard(subscriber)
        closer = asyncio.create_task(
            subscriber.connection.close(_DISCONNECT_CODE, "simulated disconnect")
        )
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
